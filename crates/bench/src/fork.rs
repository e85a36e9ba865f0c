//! Fork: time to a ready clone (keep-alive snapshot + restore under a new
//! name) and how long the source is paused for it — of a booted VM (RAM in
//! a file of its own, copied while paused) and of a fork (RAM a
//! copy-on-write mapping of the fork's bundle, copied while the guest
//! runs), at the run's memory ceiling and at 4 GiB; and the pause of a
//! keep-alive snapshot and of a fork of a VM restored (the default,
//! copy-on-write restore) from a bundle, at both ceilings.

use std::time::Instant;

use anyhow::{Context as _, Result};
use machinen::ForkOptions;

use crate::ctx::{sh, stop, Ctx, SNAPSHOT_TIMEOUT};
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
    let r = match r {
        Ok(()) => of_a_restore(ctx, &src, sec, "restored", "").await,
        e => e,
    };
    stop(src).await?;
    r?;
    let mut opts = ctx.boot_options("src4g");
    opts.memory_mib = Some(LARGE_MIB);
    let big = machinen::boot(opts).await.context("booting the 4 GiB VM")?;
    let r = of_a_fork(ctx, &big, sec, "fork_of_fork_4g", ", 4 GiB ceiling").await;
    let r = match r {
        Ok(()) => of_a_restore(ctx, &big, sec, "restored_4g", ", 4 GiB ceiling").await,
        e => e,
    };
    stop(big).await?;
    r
}

/// Snapshot `src`, restore the bundle (copy-on-write), then measure the
/// restored VM's keep-alive snapshots and forks.
async fn of_a_restore(
    ctx: &Ctx,
    src: &machinen::Vm,
    sec: &mut Section,
    key: &str,
    what: &str,
) -> Result<()> {
    let bundle = ctx.path(&format!("{key}.bundle"));
    src.snapshot(&bundle, true, SNAPSHOT_TIMEOUT)
        .await
        .context("the snapshot to restore")?;
    let vm = ctx.restore(&bundle, &key.replace('_', "-")).await?;
    let r = async {
        sh(&vm, "sync").await?;
        let mut paused = Vec::new();
        let mut last: Option<std::path::PathBuf> = None;
        for i in 0..ctx.cfg.runs {
            let out = ctx.path(&format!("{key}-snap{i}.bundle"));
            let rep = vm
                .snapshot(&out, true, SNAPSHOT_TIMEOUT)
                .await
                .context("snapshot of the restored VM")?;
            paused.push(rep.paused_ms as f64);
            if let Some(prev) = last.replace(out) {
                let _ = std::fs::remove_dir_all(prev);
            }
        }
        sec.add(
            &format!("{key}_snapshot_paused_ms"),
            &format!("snapshot (keep-alive) of a restored VM: paused{what}"),
            "ms",
            paused,
        );
        measure(ctx, &vm, sec, &format!("{key}_fork|{what}|restored")).await
    }
    .await;
    stop(vm).await?;
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
        // `key|what|restored`: the source is a restored VM.
        let (what, of) = match what.split_once('|') {
            Some((w, _)) => (w, "a restored VM"),
            None => (what, "a fork"),
        };
        sec.add(
            &format!("{key}_to_ready_ms"),
            &format!("fork of {of} to agent-ready{what}"),
            "ms",
            ready,
        );
        sec.add(
            &format!("{key}_paused_ms"),
            &format!("fork of {of}: source paused{what}"),
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
