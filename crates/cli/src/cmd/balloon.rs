//! `machinen balloon TARGET [SIZE] [--wait SECS] [--json]`

use std::time::Duration;

use machinen::balloon::{parse_size, BalloonOutcome};
use machinen::Result;

use crate::cli::BalloonArgs;
use crate::output::print_json;

pub async fn run(a: BalloonArgs) -> Result<i32> {
    let vm = machinen::attach(&a.target).await?;
    let Some(size) = a.size else {
        let report = vm.balloon().await?;
        if a.json {
            print_json(&report);
        } else {
            print(vm.name(), &report, None);
        }
        return Ok(0);
    };
    let ceiling = u64::from(vm.info().memory_mib) << 20;
    let target = parse_size(&size, ceiling)?;
    let wait = (a.wait > 0).then(|| Duration::from_secs(a.wait));
    let outcome = vm.set_balloon(target, wait).await?;
    if a.json {
        print_json(&outcome);
    } else {
        print(vm.name(), &outcome.report, Some(&outcome));
    }
    Ok(0)
}

fn print(name: &str, r: &machinen::balloon::BalloonReport, outcome: Option<&BalloonOutcome>) {
    let mib = |b: u64| format!("{} MiB", b >> 20);
    let target = r.target_bytes.map(mib).unwrap_or_else(|| "-".into());
    crate::outln!(
        "{name}: ceiling {}, target {target}, guest has {}",
        mib(r.ceiling_bytes),
        mib(r.actual_bytes)
    );
    if let Some(o) = outcome {
        if o.settled {
            crate::outln!("reached in {} ms", o.elapsed_ms);
        } else {
            crate::outln!(
                "not reached after {} ms: the guest is still giving memory up, or cannot free more \
                 (it keeps trying; `machinen balloon {name}` shows where it is)",
                o.elapsed_ms
            );
        }
    }
}
