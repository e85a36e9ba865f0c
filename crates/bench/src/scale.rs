//! Scale: does restore time follow the memory a guest used, or its ceiling?
//! Two VMs, a small and a large memory ceiling, write the same amount of
//! random data to `/dev/shm`, are snapshotted (the VM stops), and each
//! bundle is restored `runs` times (alternating) to agent-ready.

use std::path::PathBuf;

use anyhow::{Context as _, Result};

use crate::ctx::{sh, stop, Ctx, SNAPSHOT_TIMEOUT};
use crate::stats::{mib, Section};

/// (small ceiling, large ceiling, touched), MiB.
fn sizes(quick: bool) -> (u32, u32, u32) {
    if quick {
        (256, 1024, 8)
    } else {
        (512, 4096, 64)
    }
}

fn ceiling(mib: u32) -> String {
    if mib >= 1024 && mib.is_multiple_of(1024) {
        format!("{} GiB", mib / 1024)
    } else {
        format!("{mib} MiB")
    }
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let (small, large, touched) = sizes(ctx.cfg.quick);
    // Stable keys (the defaults' sizes); the labels name the sizes used.
    let cases = [("512m", small), ("4g", large)];
    let mut bundles: Vec<PathBuf> = Vec::new();
    for (key, mem) in cases {
        let what = format!("{} ceiling, {touched} MiB touched", ceiling(mem));
        let (bundle, disk) = bundle_of(ctx, key, mem, touched)
            .await
            .with_context(|| format!("the VM with a {what}"))?;
        sec.one(
            &format!("bundle_{key}_disk_mib"),
            &format!("bundle on disk, {what}"),
            "MiB",
            mib(disk),
        );
        bundles.push(bundle);
    }
    let mut samples = vec![Vec::new(), Vec::new()];
    for i in 0..ctx.cfg.runs {
        // Alternate, so drift on a shared host hits both alike.
        for (j, ((key, mem), bundle)) in cases.iter().zip(&bundles).enumerate() {
            let t = std::time::Instant::now();
            let vm = ctx
                .restore(bundle, &format!("scale-{key}-{i}"))
                .await
                .with_context(|| format!("restoring the {} VM", ceiling(*mem)))?;
            samples[j].push(
                vm.boot_ms()
                    .map(|v| v as f64)
                    .unwrap_or_else(|| crate::stats::ms(t)),
            );
            stop(vm).await?;
        }
    }
    for ((key, mem), s) in cases.iter().zip(samples) {
        sec.add(
            &format!("restore_{key}_ms"),
            &format!(
                "restore to agent-ready, {} ceiling, {touched} MiB touched",
                ceiling(*mem)
            ),
            "ms",
            s,
        );
    }
    for b in bundles {
        let _ = std::fs::remove_dir_all(b);
    }
    Ok(())
}

/// Boot a VM with `mem` MiB, write `touched` MiB to tmpfs, snapshot it
/// (it stops); the bundle's path and its allocated bytes.
async fn bundle_of(ctx: &Ctx, key: &str, mem: u32, touched: u32) -> Result<(PathBuf, u64)> {
    let mut opts = ctx.boot_options(&format!("scale-{key}"));
    opts.memory_mib = Some(mem);
    let vm = machinen::boot(opts).await.context("booting")?;
    let out = ctx.path(&format!("scale-{key}.bundle"));
    let r = async {
        sh(
            &vm,
            &format!("head -c {touched}M /dev/urandom > /dev/shm/blob && sync"),
        )
        .await?;
        let rep = vm
            .snapshot(&out, false, SNAPSHOT_TIMEOUT)
            .await
            .context("snapshot")?;
        anyhow::Ok(rep.disk_bytes)
    }
    .await;
    // Already gone after a successful snapshot; stopped here otherwise.
    stop(vm).await?;
    Ok((out, r?))
}
