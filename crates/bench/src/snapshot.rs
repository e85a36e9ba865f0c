//! Snapshot (keep-alive) of an idle VM and of one that has touched N MiB of
//! memory: time, pause, bundle size; then restore-to-ready from both.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result};
use machinen::Vm;

use crate::ctx::{sh, stop, Ctx, SNAPSHOT_TIMEOUT};
use crate::stats::{mib, ms, Section};

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let idle = ctx.boot("idle").await?;
    let r = snapshots(ctx, &idle, sec, "idle", "idle VM").await;
    stop(idle).await?;
    let idle_bundle = r?;
    restores(ctx, &idle_bundle, sec, "idle", "idle VM").await?;
    let _ = std::fs::remove_dir_all(&idle_bundle);

    let n = ctx.cfg.touched_mib;
    let mut opts = ctx.boot_options("touched");
    // tmpfs may use half of RAM; leave the guest room besides.
    opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
    let vm = machinen::boot(opts)
        .await
        .context("booting the touched-memory VM")?;
    let r = async {
        let t = Instant::now();
        sh(&vm, &format!("head -c {n}M /dev/urandom > /dev/shm/blob")).await?;
        sec.one(
            "touch_fill_ms",
            &format!("guest writes {n} MiB of random data to /dev/shm"),
            "ms",
            ms(t),
        );
        snapshots(
            ctx,
            &vm,
            sec,
            "touched",
            &format!("VM with {n} MiB touched"),
        )
        .await
    }
    .await;
    stop(vm).await?;
    let touched_bundle = r?;
    restores(
        ctx,
        &touched_bundle,
        sec,
        "touched",
        &format!("VM with {n} MiB touched"),
    )
    .await?;
    let _ = std::fs::remove_dir_all(&touched_bundle);
    Ok(())
}

/// `runs` keep-alive snapshots; returns the last bundle (the others are removed).
async fn snapshots(
    ctx: &Ctx,
    vm: &Vm,
    sec: &mut Section,
    key: &str,
    what: &str,
) -> Result<std::path::PathBuf> {
    // Let the guest settle after boot (or after filling memory).
    sh(vm, "sync").await?;
    let (mut elapsed, mut paused, mut bytes, mut disk) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut last = None;
    for i in 0..ctx.cfg.runs {
        let out = ctx.path(&format!("{key}-{i}.bundle"));
        let t = Instant::now();
        let rep = vm
            .snapshot(&out, true, SNAPSHOT_TIMEOUT)
            .await
            .with_context(|| format!("snapshot of the {what}"))?;
        elapsed.push(ms(t));
        paused.push(rep.paused_ms as f64);
        bytes.push(mib(rep.bytes));
        disk.push(mib(rep.disk_bytes));
        if let Some(prev) = last.replace(out) {
            let _ = std::fs::remove_dir_all(prev);
        }
    }
    sec.add(
        &format!("{key}_elapsed_ms"),
        &format!("snapshot (keep-alive), {what}: request to bundle"),
        "ms",
        elapsed,
    );
    sec.add(
        &format!("{key}_paused_ms"),
        &format!("snapshot, {what}: guest paused"),
        "ms",
        paused,
    );
    sec.add(
        &format!("{key}_bundle_mib"),
        &format!("bundle size, {what}: apparent"),
        "MiB",
        bytes,
    );
    sec.add(
        &format!("{key}_bundle_disk_mib"),
        &format!("bundle size, {what}: on disk"),
        "MiB",
        disk,
    );
    last.context("no snapshot taken")
}

async fn restores(
    ctx: &Ctx,
    bundle: &Path,
    sec: &mut Section,
    key: &str,
    what: &str,
) -> Result<()> {
    let mut samples = Vec::new();
    for i in 0..ctx.cfg.runs {
        let t = Instant::now();
        let vm = ctx
            .restore(bundle, &format!("r-{key}-{i}"))
            .await
            .with_context(|| format!("restoring the {what}"))?;
        samples.push(ms(t));
        // Ready means the agent answers: prove it.
        let r = sh(&vm, "true").await;
        stop(vm).await?;
        r?;
    }
    sec.add(
        &format!("restore_{key}_ms"),
        &format!("restore to agent-ready, {what}"),
        "ms",
        samples,
    );
    Ok(())
}
