//! Memory: PSS (proportional set size) of one VM's processes (supervisor +
//! QEMU) after it has touched N MiB, then of that VM plus N sibling forks
//! made from one snapshot (`Vm::fork_many`: they share its RAM file), and
//! side by side the same number of forks made one `fork` call each (a
//! bundle per fork, nothing shared).

use anyhow::{Context as _, Result};
use machinen::{ForkOptions, Vm};

use crate::ctx::{sh, stop, vm_pss_kib, Ctx};
use crate::stats::Section;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let n = ctx.cfg.touched_mib;
    let mut opts = ctx.boot_options("mem");
    // tmpfs may use half of RAM; leave the guest room besides (as the
    // snapshot section's touched VM).
    opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
    let src = machinen::boot(opts)
        .await
        .context("booting the memory VM")?;
    let mut forks = Vec::new();
    let r = measure(ctx, &src, &mut forks, sec).await;
    for f in forks {
        stop(f).await?;
    }
    stop(src).await?;
    r
}

/// PSS of the source plus `forks`, KiB, after an exec in each and a settle;
/// and each fork's own, MiB.
async fn total_pss(src: &Vm, forks: &[Vm]) -> Result<(u64, Vec<f64>)> {
    for f in forks {
        sh(f, "true").await?;
    }
    tokio::time::sleep(crate::ctx::SETTLE).await;
    let (s, q) = vm_pss_kib(src)?;
    let mut total = s + q;
    let mut per_fork = Vec::new();
    for f in forks {
        let (s, q) = vm_pss_kib(f)?;
        total += s + q;
        per_fork.push((s + q) as f64 / 1024.0);
    }
    Ok((total, per_fork))
}

async fn measure(ctx: &Ctx, src: &Vm, forks: &mut Vec<Vm>, sec: &mut Section) -> Result<()> {
    let (n, count) = (ctx.cfg.touched_mib, ctx.cfg.forks);
    if n > 0 {
        sh(src, &format!("head -c {n}M /dev/urandom > /dev/shm/touch")).await?;
    }
    sh(src, "true").await?;
    tokio::time::sleep(crate::ctx::SETTLE).await;
    let (sup, qemu) = vm_pss_kib(src)?;
    let what = format!("one VM with {n} MiB touched");
    sec.one(
        "pss_supervisor_mib",
        &format!("PSS of {what}: supervisor"),
        "MiB",
        sup as f64 / 1024.0,
    );
    sec.one(
        "pss_qemu_mib",
        &format!("PSS of {what}: QEMU"),
        "MiB",
        qemu as f64 / 1024.0,
    );
    sec.one(
        "pss_one_vm_mib",
        &format!("PSS of {what} (supervisor + QEMU)"),
        "MiB",
        (sup + qemu) as f64 / 1024.0,
    );

    // Siblings: one snapshot, restored `count` times.
    let opts = ForkOptions {
        new_name: Some("memfork".into()),
        ..Default::default()
    };
    let (siblings, _) = src
        .fork_many(opts, count)
        .await
        .context("forking siblings")?;
    forks.extend(siblings);
    let (total, per_fork) = total_pss(src, forks).await?;
    sec.one(
        "pss_vm_plus_forks_mib",
        &format!("PSS of one VM + {count} sibling forks (one snapshot), all processes"),
        "MiB",
        total as f64 / 1024.0,
    );
    sec.add(
        "pss_per_vm_with_forks_mib",
        "PSS of each sibling fork (supervisor + QEMU)",
        "MiB",
        per_fork,
    );
    for f in forks.drain(..) {
        stop(f).await?;
    }

    // The old way: one `fork` (one snapshot, one bundle) per fork.
    for i in 0..count {
        let (f, _) = src
            .fork(ForkOptions {
                new_name: Some(format!("memsep{i}")),
                ..Default::default()
            })
            .await
            .context("forking")?;
        forks.push(f);
    }
    let (total, per_fork) = total_pss(src, forks).await?;
    sec.one(
        "pss_vm_plus_separate_forks_mib",
        &format!("PSS of one VM + {count} separate forks (a snapshot each), all processes"),
        "MiB",
        total as f64 / 1024.0,
    );
    sec.add(
        "pss_per_separate_fork_mib",
        "PSS of each separate fork (supervisor + QEMU)",
        "MiB",
        per_fork,
    );
    Ok(())
}
