//! A process moved into another VM two ways, side by side: CRIU (dump the
//! process in VM A, its images through the host into VM B, restore there)
//! and the whole-VM route (a keep-alive snapshot of A, restored as a new
//! VM). The workload is one perl process holding N MiB (64 with --quick).
//! CRIU moves only the process and needs a VM of the same image on the
//! other side; the whole-VM route moves everything, to ready.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use machinen::Vm;

use crate::ctx::{sh, stop, Ctx, SNAPSHOT_TIMEOUT};
use crate::stats::{mib, ms, Section};

async fn criu(vm: &Vm, args: &[&str]) -> Result<()> {
    let paths = machinen::Paths::from_env()?;
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let o = machinen::criu::output(vm, &paths, &args)
        .await
        .context("criu")?;
    if o.exit_code != 0 {
        bail!("criu {args:?} exited {}: {}", o.exit_code, o.stderr);
    }
    Ok(())
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let n = if ctx.cfg.quick {
        64
    } else {
        ctx.cfg.touched_mib.min(256)
    };
    let mut opts = ctx.boot_options("criu-a");
    opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
    let a = machinen::boot(opts.clone()).await.context("booting VM A")?;
    opts.name = Some(format!("{}-b", opts.name.clone().unwrap_or_default()));
    let b = match machinen::boot(opts).await.context("booting VM B") {
        Ok(b) => b,
        Err(e) => {
            stop(a).await?;
            return Err(e);
        }
    };
    let r = series(ctx, sec, &a, &b, n).await;
    stop(a).await?;
    stop(b).await?;
    r
}

async fn series(ctx: &Ctx, sec: &mut Section, a: &Vm, b: &Vm, n: u32) -> Result<()> {
    let pid = sh(
        a,
        &format!(
            "setsid perl -e '$x = \"x\" x ({n} * 1048576); sleep 1 while 1' </dev/null >/dev/null 2>&1 & echo $!"
        ),
    )
    .await?
    .trim()
    .to_string();
    // Until the string is built (its RSS holds the N MiB).
    let wait = format!(
        "for i in $(seq 600); do r=$(awk '/VmRSS/ {{print $2}}' /proc/{pid}/status); [ \"${{r:-0}}\" -ge {} ] && exit 0; sleep 0.1; done; exit 1",
        n * 1024
    );
    sh(a, &wait)
        .await
        .context("the workload to fill its memory")?;
    criu(a, &["check"]).await?;
    let (mut moves, mut dumps, mut vmstate) = (Vec::new(), Vec::new(), Vec::new());
    let (mut img_mib, mut bundle_mib) = (0.0, 0.0);
    for i in 0..ctx.cfg.runs.max(1) {
        let dir = format!("/var/tmp/bench-ck-{i}");
        sh(a, &format!("rm -rf {dir} && mkdir -p {dir}")).await?;
        let host = ctx.path(&format!("criu-img-{i}"));
        let t = Instant::now();
        criu(a, &["dump", "-t", &pid, "-D", &dir, "--leave-running"]).await?;
        dumps.push(ms(t));
        a.pull_dir(&dir, &host, machinen::dirs::PullDirOptions::default())
            .await
            .context("copying the images out")?;
        b.push_dir(&host, &dir, machinen::dirs::PushDirOptions::default())
            .await
            .context("copying the images in")?;
        criu(b, &["restore", "-D", &dir, "-d"]).await?;
        moves.push(ms(t));
        sh(b, &format!("kill -0 {pid} && kill -9 {pid}; rm -rf {dir}")).await?;
        sh(a, &format!("rm -rf {dir}")).await?;
        img_mib = mib(machinen::bundle::dir_usage(&host).1);
        let _ = std::fs::remove_dir_all(&host);

        let out = ctx.path(&format!("criu-vmstate-{i}"));
        let t = Instant::now();
        a.snapshot_full(&out, true, SNAPSHOT_TIMEOUT, true)
            .await
            .context("snapshot")?;
        let vm = ctx.restore(&out, &format!("criu-vm-{i}")).await?;
        let ready = sh(&vm, &format!("kill -0 {pid}")).await;
        vmstate.push(ms(t));
        stop(vm).await?;
        ready.context("the workload in the restored VM")?;
        bundle_mib = mib(machinen::bundle::dir_usage(&out).1);
        let _ = std::fs::remove_dir_all(&out);
    }
    sec.add(
        "move_criu_ms",
        &format!("CRIU: a {n} MiB process dumped in A, images through the host, restored in B"),
        "ms",
        moves,
    );
    sec.add(
        "dump_criu_ms",
        "CRIU: of which the dump (the process frozen, --leave-running)",
        "ms",
        dumps,
    );
    sec.add(
        "move_vmstate_ms",
        "whole VM: snapshot --keep-alive --full of A, restored to ready",
        "ms",
        vmstate,
    );
    sec.one("images_criu_mib", "CRIU: images on disk", "MiB", img_mib);
    sec.one(
        "bundle_vmstate_mib",
        "whole VM: full bundle on disk",
        "MiB",
        bundle_mib,
    );
    Ok(())
}
