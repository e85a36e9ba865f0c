//! Exec: round-trip latency of a small command, and stdout throughput.

use std::time::Instant;

use anyhow::{bail, Result};
use machinen::ExecOptions;

use crate::ctx::{sh, stop, Counter, Ctx};
use crate::stats::{mib, ms, Section};

/// `--exec-rtt-of VM`: the library's exec round-trip against a VM someone
/// else booted, printed as a JSON array of milliseconds.
pub async fn rtt_of(name: &str, reps: usize) -> Result<()> {
    let vm = machinen::attach(name).await?;
    let lat = round_trips(&vm, reps).await?;
    println!("{}", serde_json::Value::from(lat));
    Ok(())
}

/// `reps` exec round-trips of `true`, in ms, after a warm-up (the first
/// exec pages in the guest's `true`).
async fn round_trips(vm: &machinen::Vm, reps: usize) -> Result<Vec<f64>> {
    sh(vm, "true").await?;
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
    let lat = round_trips(vm, ctx.cfg.reps).await?;
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
