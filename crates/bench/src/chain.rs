//! Checkpoint chains: a VM with N MiB touched takes keep-alive checkpoints
//! with ~1 MiB changed between them, as a chain of deltas and as full
//! (`--full`) bundles, side by side: on-disk size, time and pause of each,
//! and restore to ready from the chain's tip against a full bundle.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context as _, Result};
use machinen::Vm;

use crate::ctx::{sh, stop, Ctx, SNAPSHOT_TIMEOUT};
use crate::stats::{mib, ms, Section};

/// Checkpoints per series (3 with --quick).
const CHECKPOINTS: usize = 10;

/// Bytes a directory's files take on disk.
fn on_disk(dir: &std::path::Path) -> u64 {
    machinen::bundle::dir_usage(dir).1
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let n = ctx.cfg.touched_mib;
    let mut opts = ctx.boot_options("chain");
    opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
    let vm = machinen::boot(opts).await.context("booting the chain VM")?;
    let r = series(ctx, &vm, sec, n).await;
    stop(vm).await?;
    let (tip, full) = r?;
    restores(ctx, sec, &tip, &full).await
}

/// One checkpoint after ~1 MiB of change: (elapsed ms, paused ms, bundle).
async fn checkpoint(vm: &Vm, out: PathBuf, full: bool) -> Result<(f64, f64, PathBuf)> {
    sh(vm, "head -c 1M /dev/urandom > /dev/shm/step && sync").await?;
    let t = Instant::now();
    let rep = vm
        .snapshot_full(&out, true, SNAPSHOT_TIMEOUT, full)
        .await
        .context("checkpoint")?;
    Ok((ms(t), rep.paused_ms as f64, out))
}

/// The chain, then the full bundles; returns the chain's tip and the last
/// full bundle.
async fn series(ctx: &Ctx, vm: &Vm, sec: &mut Section, n: u32) -> Result<(PathBuf, PathBuf)> {
    sh(vm, &format!("head -c {n}M /dev/urandom > /dev/shm/blob")).await?;
    let count = if ctx.cfg.quick { 3 } else { CHECKPOINTS };
    let (mut next_elapsed, mut next_paused, mut chain) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        let (e, p, out) = checkpoint(vm, ctx.path(&format!("chain-{i}")), false).await?;
        if i == 0 {
            sec.one(
                "first_elapsed_ms",
                &format!("checkpoint 1 (full), {n} MiB touched: request to bundle"),
                "ms",
                e,
            );
            sec.one(
                "first_paused_ms",
                "checkpoint 1 (full): guest paused",
                "ms",
                p,
            );
            sec.one(
                "first_disk_mib",
                "checkpoint 1 (full): on disk",
                "MiB",
                mib(on_disk(&out)),
            );
        } else {
            next_elapsed.push(e);
            next_paused.push(p);
        }
        chain.push(out);
    }
    sec.add(
        "delta_elapsed_ms",
        "checkpoints 2.. (deltas, ~1 MiB changed): request to bundle",
        "ms",
        next_elapsed,
    );
    sec.add(
        "delta_paused_ms",
        "checkpoints 2.. (deltas): guest paused",
        "ms",
        next_paused,
    );
    let (mut full_elapsed, mut full_paused, mut fulls) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..count {
        let (e, p, out) = checkpoint(vm, ctx.path(&format!("full-{i}")), true).await?;
        full_elapsed.push(e);
        full_paused.push(p);
        fulls.push(out);
    }
    sec.add(
        "full_elapsed_ms",
        "checkpoints with --full (~1 MiB changed): request to bundle",
        "ms",
        full_elapsed,
    );
    sec.add(
        "full_paused_ms",
        "checkpoints with --full: guest paused",
        "ms",
        full_paused,
    );
    let total = |l: &[PathBuf]| mib(l.iter().map(|d| on_disk(d)).sum());
    sec.one(
        "chain_disk_mib",
        &format!("{count} checkpoints as a chain: on disk"),
        "MiB",
        total(&chain),
    );
    sec.one(
        "full_disk_mib",
        &format!("{count} checkpoints as full bundles: on disk"),
        "MiB",
        total(&fulls),
    );
    // Keep the tip's chain and the last full bundle for the restores.
    for d in &fulls[..fulls.len() - 1] {
        let _ = std::fs::remove_dir_all(d);
    }
    let tip = chain.last().context("no checkpoint")?.clone();
    let full = fulls.last().context("no full checkpoint")?.clone();
    Ok((tip, full))
}

async fn restores(ctx: &Ctx, sec: &mut Section, tip: &PathBuf, full: &PathBuf) -> Result<()> {
    let mut samples = (Vec::new(), Vec::new());
    for i in 0..ctx.cfg.runs.max(2) {
        for (bundle, out, key) in [(tip, &mut samples.0, "tip"), (full, &mut samples.1, "full")] {
            let t = Instant::now();
            let vm = ctx
                .restore(bundle, &format!("r-{key}-{i}"))
                .await
                .with_context(|| format!("restoring the {key} bundle"))?;
            let took = ms(t);
            let r = sh(&vm, "true").await;
            stop(vm).await?;
            r?;
            // The first restore of a tip builds its RAM once (kept for the
            // next ones): reported on its own.
            if key == "tip" && i == 0 {
                sec.one(
                    "restore_tip_first_ms",
                    "restore to ready from the chain's tip, first (builds its RAM)",
                    "ms",
                    took,
                );
            } else {
                out.push(took);
            }
        }
    }
    sec.add(
        "restore_tip_ms",
        "restore to ready from the chain's tip (RAM built)",
        "ms",
        samples.0,
    );
    sec.add(
        "restore_full_ms",
        "restore to ready from a full bundle of the same VM",
        "ms",
        samples.1,
    );
    Ok(())
}
