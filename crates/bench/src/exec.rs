//! Exec: round-trip latency of a small command, and stdout throughput.

use std::time::Instant;

use anyhow::{bail, Result};
use machinen::ExecOptions;

use crate::ctx::{sh, stop, Counter, Ctx};
use crate::stats::{mib, ms, Section};

/// `--exec-rtt-of VM`: the library's exec round-trip against a VM someone
/// else booted, printed as a JSON array of milliseconds.
pub fn rtt_of_main(vm: &str, reps: usize) -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: tokio runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(rtt_of(vm, reps)) {
        Ok(lat) => {
            println!("{}", serde_json::Value::from(lat));
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn rtt_of(name: &str, reps: usize) -> Result<Vec<f64>> {
    let vm = machinen::attach(name).await?;
    sh(&vm, "true").await?;
    let mut lat = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let o = vm
            .exec(ExecOptions {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await?;
        lat.push(ms(t));
        if o.status.code != Some(0) {
            bail!("`true` failed: {:?}", o.status);
        }
    }
    Ok(lat)
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let vm = ctx.boot("exec").await?;
    let r = measure(ctx, &vm, sec).await;
    stop(vm).await?;
    r
}

async fn measure(ctx: &Ctx, vm: &machinen::Vm, sec: &mut Section) -> Result<()> {
    // Warm up: the first exec pages in the guest's `true`.
    sh(vm, "true").await?;
    let mut lat = Vec::new();
    for _ in 0..ctx.cfg.reps {
        let t = Instant::now();
        let o = vm
            .exec(ExecOptions {
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await?;
        lat.push(ms(t));
        if o.status.code != Some(0) {
            bail!("`true` failed: {:?}", o.status);
        }
    }
    sec.add("latency_ms", "exec round-trip of `true`", "ms", lat);

    let n = ctx.cfg.stream_mib;
    let mut tput = Vec::new();
    for _ in 0..ctx.cfg.runs {
        let opts = ExecOptions {
            argv: vec![
                "head".into(),
                "-c".into(),
                format!("{n}M"),
                "/dev/zero".into(),
            ],
            ..Default::default()
        };
        let (mut out, mut err) = (Counter::default(), Counter::default());
        let t = Instant::now();
        let st = vm
            .exec_stream(opts, tokio::io::empty(), &mut out, &mut err)
            .await?;
        let secs = t.elapsed().as_secs_f64();
        if st.code != Some(0) || out.0 != u64::from(n) << 20 {
            bail!("head -c {n}M: status {st:?}, {} bytes", out.0);
        }
        tput.push(mib(out.0) / secs);
    }
    sec.add(
        "stdout_mib_s",
        &format!("exec stdout throughput (head -c {n}M /dev/zero)"),
        "MiB/s",
        tput,
    );
    Ok(())
}
