//! `machinen stats [TARGET] [--json] [--watch SECS]`

use std::time::Duration;

use machinen::stats::MemoryStats;
use machinen::Result;

use crate::cli::StatsArgs;
use crate::output::print_json;

pub async fn run(a: StatsArgs) -> Result<i32> {
    loop {
        let stats = collect(a.target.as_deref()).await?;
        if a.json {
            match (&a.target, stats.as_slice()) {
                (Some(_), [one]) => print_json(one),
                _ => print_json(&stats),
            }
        } else {
            print(&stats);
        }
        let Some(secs) = a.watch else {
            return Ok(0);
        };
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs_f64(secs.max(0.5))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
        if !a.json {
            crate::outln!();
        }
    }
}

async fn collect(target: Option<&str>) -> Result<Vec<MemoryStats>> {
    let targets: Vec<String> = match target {
        Some(t) => vec![t.to_string()],
        None => machinen::list()?
            .into_iter()
            .map(|v| v.pid.to_string())
            .collect(),
    };
    let mut out = Vec::with_capacity(targets.len());
    for t in targets {
        let vm = match machinen::attach(&t).await {
            Ok(vm) => vm,
            // Listed a moment ago, gone now: not an error of `stats`.
            Err(_) if target.is_none() => continue,
            Err(e) => return Err(e),
        };
        out.push(vm.memory_stats().await?);
    }
    Ok(out)
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{} MiB", b >> 20))
        .unwrap_or_else(|| "-".into())
}

fn print(stats: &[MemoryStats]) {
    let rows: Vec<[String; 11]> = stats
        .iter()
        .map(|s| {
            let g = s.guest.as_ref();
            let host_pss = match (s.host.qemu_pss_bytes, s.host.supervisor_pss_bytes) {
                (Some(q), Some(v)) => Some(q + v),
                (q, v) => q.or(v),
            };
            [
                s.name.clone(),
                mib(Some(s.ceiling_bytes)),
                // What the balloon lets the guest use; `-` without one.
                mib(s.balloon.as_ref().map(|b| b.actual_bytes)),
                mib(g.map(|g| g.used_bytes)),
                mib(g.map(|g| g.cached_bytes)),
                mib(g.map(|g| g.available_bytes)),
                mib(host_pss),
                mib(s.host.ram_file_bytes),
                s.network
                    .as_ref()
                    .map_or("-".into(), |n| super::network::size(n.bytes_out)),
                s.network
                    .as_ref()
                    .map_or("-".into(), |n| super::network::size(n.bytes_in)),
                s.network
                    .as_ref()
                    .map_or("-".into(), |n| n.refused.to_string()),
            ]
        })
        .collect();
    super::ls::print_table(
        [
            "NAME",
            "CEILING",
            "BALLOON",
            "GUEST-USED",
            "GUEST-CACHED",
            "GUEST-AVAILABLE",
            "HOST-PSS",
            "RAM-FILE",
            "NET-OUT",
            "NET-IN",
            "REFUSED",
        ]
        .map(String::from),
        &rows,
    );
}
