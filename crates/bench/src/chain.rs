//! Checkpoint chains: a VM with N MiB touched takes keep-alive checkpoints
//! with ~1 MiB changed between them, as a chain of deltas and as full
//! (`--full`) bundles, side by side: on-disk size, time and pause of each,
//! and restore to ready from the chain's tip against a full bundle. The
//! chain is taken on up to three fresh VMs, so that checkpoint 1 (one per
//! chain) has a median; the full bundles and the restores use the last.

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
    // Checkpoint 1 is one sample per chain, and it varies most (a copy of
    // the touched RAM into a page cache that is clean or still writing
    // back): several chains, each on a fresh VM, give it a median.
    let chains = if ctx.cfg.quick {
        1
    } else {
        ctx.cfg.runs.clamp(1, CHAINS)
    };
    let mut s = Samples::default();
    let mut kept = None;
    for c in 0..chains {
        let mut opts = ctx.boot_options(&format!("chain-{c}"));
        opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
        let vm = machinen::boot(opts).await.context("booting the chain VM")?;
        let last = c + 1 == chains;
        let r = series(ctx, &vm, &mut s, n, c, last).await;
        stop(vm).await?;
        let chain = r?;
        // Only the last chain is restored: the others' bundles go.
        for d in kept.replace(chain).unwrap_or_default() {
            let _ = std::fs::remove_dir_all(d);
        }
    }
    let full = s.last_full.take();
    s.report(sec, n);
    let tip = kept
        .and_then(|c| c.last().cloned())
        .context("no checkpoint")?;
    let full = full.context("no full checkpoint")?;
    restores(ctx, sec, &tip, &full).await
}

/// Chains at most (with enough runs).
const CHAINS: usize = 3;

/// The series' samples across chains.
#[derive(Default)]
struct Samples {
    first_elapsed: Vec<f64>,
    first_paused: Vec<f64>,
    first_disk: Vec<f64>,
    delta_elapsed: Vec<f64>,
    delta_paused: Vec<f64>,
    full_elapsed: Vec<f64>,
    full_paused: Vec<f64>,
    chain_disk: Option<(usize, f64)>,
    full_disk: Option<f64>,
    last_full: Option<PathBuf>,
}

impl Samples {
    /// The rows, each over every chain's samples.
    fn report(self, sec: &mut Section, n: u32) {
        let rows = [
            (
                "first_elapsed_ms",
                format!("checkpoint 1 (full), {n} MiB touched: request to bundle"),
                "ms",
                self.first_elapsed,
            ),
            (
                "first_paused_ms",
                "checkpoint 1 (full): guest paused".into(),
                "ms",
                self.first_paused,
            ),
            (
                "first_disk_mib",
                "checkpoint 1 (full): on disk".into(),
                "MiB",
                self.first_disk,
            ),
            (
                "delta_elapsed_ms",
                "checkpoints 2.. (deltas, ~1 MiB changed): request to bundle".into(),
                "ms",
                self.delta_elapsed,
            ),
            (
                "delta_paused_ms",
                "checkpoints 2.. (deltas): guest paused".into(),
                "ms",
                self.delta_paused,
            ),
            (
                "full_elapsed_ms",
                "checkpoints with --full (~1 MiB changed): request to bundle".into(),
                "ms",
                self.full_elapsed,
            ),
            (
                "full_paused_ms",
                "checkpoints with --full: guest paused".into(),
                "ms",
                self.full_paused,
            ),
        ];
        for (key, label, unit, samples) in rows {
            sec.add(key, &label, unit, samples);
        }
        if let Some((count, v)) = self.chain_disk {
            let label = |what: &str| format!("{count} checkpoints as {what}: on disk");
            sec.one("chain_disk_mib", &label("a chain"), "MiB", v);
            if let Some(v) = self.full_disk {
                sec.one("full_disk_mib", &label("full bundles"), "MiB", v);
            }
        }
    }
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

/// Chain `c`; on the `last`, the full bundles too. Returns the chain's
/// bundles, the tip last.
async fn series(
    ctx: &Ctx,
    vm: &Vm,
    s: &mut Samples,
    n: u32,
    c: usize,
    last: bool,
) -> Result<Vec<PathBuf>> {
    sh(vm, &format!("head -c {n}M /dev/urandom > /dev/shm/blob")).await?;
    let count = if ctx.cfg.quick { 3 } else { CHECKPOINTS };
    let mut chain = Vec::new();
    for i in 0..count {
        let (e, p, out) = checkpoint(vm, ctx.path(&format!("chain{c}-{i}")), false).await?;
        if i == 0 {
            s.first_elapsed.push(e);
            s.first_paused.push(p);
            s.first_disk.push(mib(on_disk(&out)));
        } else {
            s.delta_elapsed.push(e);
            s.delta_paused.push(p);
        }
        chain.push(out);
    }
    let total = |l: &[PathBuf]| mib(l.iter().map(|d| on_disk(d)).sum());
    s.chain_disk = Some((count, total(&chain)));
    if last {
        let mut fulls = Vec::new();
        for i in 0..count {
            let (e, p, out) = checkpoint(vm, ctx.path(&format!("full-{i}")), true).await?;
            s.full_elapsed.push(e);
            s.full_paused.push(p);
            fulls.push(out);
        }
        s.full_disk = Some(total(&fulls));
        // Keep the last full bundle for the restores.
        for d in &fulls[..fulls.len() - 1] {
            let _ = std::fs::remove_dir_all(d);
        }
        s.last_full = fulls.last().cloned();
    }
    Ok(chain)
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
