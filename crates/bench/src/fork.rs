//! Fork: time to a ready clone (keep-alive snapshot + restore under a new
//! name) and how long the source is paused for it — of a booted VM (RAM in
//! a file of its own, copied while paused) and of a fork (RAM a
//! copy-on-write mapping of the fork's bundle, copied while the guest
//! runs), at the run's memory ceiling and at 4 GiB.

use std::time::Instant;

use anyhow::{Context as _, Result};
use machinen::ForkOptions;

use crate::ctx::{sh, stop, Ctx};
use crate::stats::{ms, Section};

/// The large ceiling the fork-of-a-fork rows are also taken at.
const LARGE_MIB: u32 = 4096;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let src = ctx.boot("src").await?;
    let r = measure(ctx, &src, sec, "").await;
    let r = match r {
        Ok(()) => of_a_fork(ctx, &src, sec, "fork_of_fork", "").await,
        e => e,
    };
    stop(src).await?;
    r?;
    let mut opts = ctx.boot_options("src4g");
    opts.memory_mib = Some(LARGE_MIB);
    let big = machinen::boot(opts).await.context("booting the 4 GiB VM")?;
    let r = of_a_fork(ctx, &big, sec, "fork_of_fork_4g", ", 4 GiB ceiling").await;
    stop(big).await?;
    r
}

/// Fork `src` once, then measure forks of that fork.
async fn of_a_fork(
    ctx: &Ctx,
    src: &machinen::Vm,
    sec: &mut Section,
    key: &str,
    what: &str,
) -> Result<()> {
    let (first, _) = src
        .fork(ForkOptions {
            new_name: Some(key.replace('_', "-")),
            ..Default::default()
        })
        .await
        .context("forking the first fork")?;
    let r = measure(ctx, &first, sec, &format!("{key}|{what}")).await;
    stop(first).await?;
    r
}

/// `tag`: empty for the booted source's rows, else `key|label suffix`.
async fn measure(ctx: &Ctx, src: &machinen::Vm, sec: &mut Section, tag: &str) -> Result<()> {
    sh(src, "sync").await?;
    let (mut ready, mut paused, mut snap) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ctx.cfg.runs {
        let t = Instant::now();
        let (fork, rep) = src
            .fork(ForkOptions {
                new_name: Some(format!("{}fork{i}", src.name())),
                ..Default::default()
            })
            .await
            .context("forking")?;
        ready.push(ms(t));
        paused.push(rep.snapshot.paused_ms as f64);
        snap.push(rep.snapshot.elapsed_ms as f64);
        let r = sh(&fork, "true").await;
        stop(fork).await?;
        r?;
    }
    if let Some((key, what)) = tag.split_once('|') {
        sec.add(
            &format!("{key}_to_ready_ms"),
            &format!("fork of a fork to agent-ready{what}"),
            "ms",
            ready,
        );
        sec.add(
            &format!("{key}_paused_ms"),
            &format!("fork of a fork: source paused{what}"),
            "ms",
            paused,
        );
        return Ok(());
    }
    sec.add(
        "fork_to_ready_ms",
        "fork to agent-ready (snapshot + restore)",
        "ms",
        ready,
    );
    sec.add("fork_snapshot_ms", "fork: its snapshot step", "ms", snap);
    sec.add("source_paused_ms", "fork: source paused", "ms", paused);
    Ok(())
}
