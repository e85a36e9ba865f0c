//! Reclaim: what a VM costs the host after its guest allocates and frees
//! memory, with the balloon (free page reporting, the default) and without
//! (`BootOptions::balloon = false`), interleaved round by round: the VM's
//! RSS (QEMU plus supervisor) before, at the peak and 10 s after the free,
//! and the allocated RAM of a snapshot taken then. Then how many idle
//! 4 GiB-ceiling VMs fit in 8 GiB of host memory, booted one by one or
//! forked from one, from their measured PSS.

use std::time::Duration;

use anyhow::{Context as _, Result};
use machinen::{ForkOptions, Vm};

use crate::ctx::{sh, stop, vm_pss_kib, Ctx, SETTLE};
use crate::stats::Section;

/// How long after the free the cost is read (the "10 s after").
const AFTER_FREE: Duration = Duration::from_secs(10);

/// The ceiling and the host budget of the "how many fit" rows.
const FIT_CEILING_MIB: u32 = 4096;
const FIT_BUDGET_MIB: f64 = 8192.0;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let alloc = if ctx.cfg.quick { 64 } else { 1024 };
    let rounds = if ctx.cfg.quick {
        1
    } else {
        ctx.cfg.runs.clamp(1, 3)
    };
    let variants = [("balloon", true), ("no_balloon", false)];
    // [variant][before, peak, after, bundle, after/before]
    let mut samples = vec![vec![Vec::new(); 5]; variants.len()];
    for round in 0..rounds {
        for (i, (tag, balloon)) in variants.iter().enumerate() {
            let mut opts = ctx.boot_options(&format!("reclaim-{tag}-{round}"));
            // Room for the allocation in a tmpfs (half of RAM) and besides.
            opts.memory_mib = Some(alloc * 2 + 512);
            opts.balloon = *balloon;
            let vm = machinen::boot(opts).await.context("booting")?;
            let r = cycle(ctx, &vm, alloc).await;
            stop(vm).await?;
            let (before, peak, after, bundle) = r?;
            for (k, v) in [before, peak, after, bundle, after / before]
                .into_iter()
                .enumerate()
            {
                samples[i][k].push(v);
            }
        }
    }
    for (i, (tag, _)) in variants.iter().enumerate() {
        let with = if i == 0 { "with" } else { "without" };
        let mut s = samples[i].drain(..);
        let mut next = || s.next().unwrap_or_default();
        let what = format!("{alloc} MiB allocated and freed in the guest, {with} the balloon");
        sec.add(
            &format!("rss_before_{tag}_mib"),
            &format!("VM RSS before ({what})"),
            "MiB",
            next(),
        );
        sec.add(
            &format!("rss_peak_{tag}_mib"),
            &format!("VM RSS at the peak ({what})"),
            "MiB",
            next(),
        );
        sec.add(
            &format!("rss_after_{tag}_mib"),
            &format!("VM RSS 10 s after the free ({what})"),
            "MiB",
            next(),
        );
        sec.add(
            &format!("bundle_ram_{tag}_mib"),
            &format!("snapshot RAM allocated after the free ({what})"),
            "MiB",
            next(),
        );
        sec.add(
            &format!("after_over_before_{tag}"),
            &format!("VM RSS 10 s after the free / before ({what}; target with: <= 1.2)"),
            "x",
            next(),
        );
    }
    fit(ctx, sec).await
}

/// Allocate `alloc` MiB in a guest tmpfs and free it; the VM's RSS before,
/// at the peak and after, and the allocated RAM of a snapshot, in MiB.
async fn cycle(ctx: &Ctx, vm: &Vm, alloc: u32) -> Result<(f64, f64, f64, f64)> {
    sh(vm, "true").await?;
    tokio::time::sleep(SETTLE).await;
    let before = rss_mib(vm)?;
    sh(
        vm,
        // Not zeros: a snapshot skips zero pages, and freed pages keep
        // what was written in them.
        &format!("yes machinen | head -c {alloc}M > /dev/shm/big"),
    )
    .await?;
    let peak = rss_mib(vm)?;
    sh(vm, "rm /dev/shm/big").await?;
    tokio::time::sleep(AFTER_FREE).await;
    let after = rss_mib(vm)?;
    let out = ctx.path(&format!("{}.snap", vm.name()));
    vm.snapshot(&out, true, Duration::from_secs(300))
        .await
        .context("snapshot")?;
    let bundle = machinen::backpressure::allocated(&out.join("ram.img")) as f64 / 1048576.0;
    let _ = std::fs::remove_dir_all(&out);
    Ok((before, peak, after, bundle))
}

/// RSS of the VM's QEMU and supervisor, MiB.
fn rss_mib(vm: &Vm) -> Result<f64> {
    let qemu = vm.info().qemu_pid.context("no QEMU pid")?;
    let rss = |pid| machinen::stats::rss_pss(pid).0.context("no smaps_rollup");
    Ok((rss(qemu)? + rss(vm.pid())?) as f64 / 1048576.0)
}

/// Idle 4 GiB-ceiling VMs: each one's PSS, booted and forked, and how many
/// of each fit in 8 GiB at that cost.
async fn fit(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let n = if ctx.cfg.quick { 1 } else { 2 };
    let mut booted = Vec::new();
    let mut forks = Vec::new();
    let r = async {
        for i in 0..n {
            let mut opts = ctx.boot_options(&format!("fit-{i}"));
            opts.memory_mib = Some(FIT_CEILING_MIB);
            booted.push(machinen::boot(opts).await.context("booting")?);
        }
        let (fs, _) = booted[0]
            .fork_many(
                ForkOptions {
                    new_name: Some("fit-fork".into()),
                    ..Default::default()
                },
                n,
            )
            .await
            .context("forking")?;
        forks = fs;
        for vm in booted.iter().chain(forks.iter()) {
            sh(vm, "true").await?;
        }
        tokio::time::sleep(SETTLE * 3).await;
        let pss = |vms: &[Vm]| -> Result<Vec<f64>> {
            vms.iter()
                .map(|vm| vm_pss_kib(vm).map(|(s, q)| (s + q) as f64 / 1024.0))
                .collect()
        };
        Ok::<_, anyhow::Error>((pss(&booted)?, pss(&forks)?))
    }
    .await;
    for vm in forks.into_iter().chain(booted) {
        stop(vm).await?;
    }
    let (booted, forked) = r?;
    let median = |v: &[f64]| crate::stats::Summary::of(v).map_or(0.0, |s| s.median);
    sec.add(
        "idle_4g_booted_pss_mib",
        "PSS of an idle 4 GiB-ceiling VM, booted",
        "MiB",
        booted.clone(),
    );
    sec.add(
        "idle_4g_fork_pss_mib",
        "PSS of an idle 4 GiB-ceiling VM, a sibling fork",
        "MiB",
        forked.clone(),
    );
    sec.one(
        "fit_8g_booted",
        "idle 4 GiB-ceiling VMs that fit in 8 GiB, booted (from their PSS)",
        "VMs",
        (FIT_BUDGET_MIB / median(&booted).max(1.0)).floor(),
    );
    // One source, the rest its forks.
    sec.one(
        "fit_8g_forked",
        "idle 4 GiB-ceiling VMs that fit in 8 GiB, one booted and the rest forked from it",
        "VMs",
        1.0 + ((FIT_BUDGET_MIB - median(&booted)) / median(&forked).max(1.0)).floor(),
    );
    Ok(())
}
