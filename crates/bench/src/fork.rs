//! Fork: time to a ready clone (keep-alive snapshot + restore under a new
//! name) and how long the source is paused for it.

use std::time::Instant;

use anyhow::{Context as _, Result};
use machinen::ForkOptions;

use crate::ctx::{sh, stop, Ctx};
use crate::stats::{ms, Section};

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let src = ctx.boot("src").await?;
    let r = measure(ctx, &src, sec).await;
    stop(src).await?;
    r
}

async fn measure(ctx: &Ctx, src: &machinen::Vm, sec: &mut Section) -> Result<()> {
    sh(src, "sync").await?;
    let (mut ready, mut paused, mut snap) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..ctx.cfg.runs {
        let t = Instant::now();
        let (fork, rep) = src
            .fork(ForkOptions {
                new_name: Some(format!("fork{i}")),
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
