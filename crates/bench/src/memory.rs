//! Memory: PSS (proportional set size) of one VM's processes (supervisor +
//! QEMU), and of one VM plus its forks.

use std::time::Duration;

use anyhow::{Context as _, Result};
use machinen::ForkOptions;

use crate::ctx::{sh, stop, vm_pss_kib, Ctx};
use crate::stats::Section;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let src = ctx.boot("mem").await?;
    let mut forks = Vec::new();
    let r = measure(ctx, &src, &mut forks, sec).await;
    for f in forks {
        stop(f).await?;
    }
    stop(src).await?;
    r
}

async fn measure(ctx: &Ctx, src: &machinen::Vm, forks: &mut Vec<machinen::Vm>, sec: &mut Section) -> Result<()> {
    sh(src, "true").await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (sup, qemu) = vm_pss_kib(src)?;
    sec.one("pss_supervisor_mib", "PSS of one VM: supervisor", "MiB", sup as f64 / 1024.0);
    sec.one("pss_qemu_mib", "PSS of one VM: QEMU", "MiB", qemu as f64 / 1024.0);
    sec.one("pss_one_vm_mib", "PSS of one VM (supervisor + QEMU)", "MiB", (sup + qemu) as f64 / 1024.0);
    for i in 0..ctx.cfg.forks {
        let (f, _) = src.fork(ForkOptions { new_name: Some(format!("memfork{i}")), ..Default::default() }).await.context("forking")?;
        forks.push(f);
    }
    for f in forks.iter() {
        sh(f, "true").await?;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (s, q) = vm_pss_kib(src)?;
    let mut total = s + q;
    let mut per_fork = Vec::new();
    for f in forks.iter() {
        let (s, q) = vm_pss_kib(f)?;
        total += s + q;
        per_fork.push((s + q) as f64 / 1024.0);
    }
    let n = ctx.cfg.forks;
    sec.one("pss_vm_plus_forks_mib", &format!("PSS of one VM + {n} forks, all processes"), "MiB", total as f64 / 1024.0);
    sec.add("pss_per_vm_with_forks_mib", "PSS of each fork (supervisor + QEMU)", "MiB", per_fork);
    Ok(())
}
