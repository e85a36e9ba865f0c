//! Cold boot to agent-ready: the installed base (what an ad-hoc
//! `machinen boot -- CMD` boots) and a provisioned image; plus the one-off
//! costs of a new image (bake, ext4 conversion) and a whole ad-hoc run
//! through the CLI.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use machinen::progress::ProgressMode;
use machinen::{ExecOptions, Paths, ProvisionOptions};

use crate::ctx::{stop, Ctx};
use crate::stats::{mib, ms, Section};

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    // One unmeasured boot warms the caches (image hash index, page cache).
    stop(ctx.boot("warm").await?).await?;
    let mut base = Vec::new();
    for i in 0..ctx.cfg.runs {
        let t = Instant::now();
        let vm = ctx.boot(&format!("base{i}")).await?;
        base.push(ms(t));
        stop(vm).await?;
    }
    sec.add("cold_base_ms", "cold boot to agent-ready, base rootfs", "ms", base);

    // An ad-hoc run end to end, as a user types it: boot, run, power off.
    if let Some(cli) = cli_binary() {
        let mut adhoc = Vec::new();
        for _ in 0..ctx.cfg.runs {
            let t = Instant::now();
            let out = tokio::process::Command::new(&cli)
                .args(["boot", "--memory", &ctx.cfg.memory_mib.to_string(), "--", "true"])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .context("running machinen boot -- true")?;
            if !out.status.success() {
                bail!("machinen boot -- true failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            adhoc.push(ms(t));
        }
        sec.add("adhoc_cli_ms", "CLI `machinen boot -- true`, start to exit", "ms", adhoc);
    }

    image(ctx, sec).await
}

/// The CLI next to this program (for the ad-hoc row), if built.
fn cli_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("machinen"), dir.parent()?.join("machinen")].into_iter().find(|p| p.is_file())
}

async fn image(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let out = ctx.path("image.tar.gz");
    let t = Instant::now();
    let res = machinen::provision(ProvisionOptions {
        out: out.clone(),
        install: Some(Box::new(|vm, _cfg| {
            Box::pin(async move {
                let argv = vec!["sh".into(), "-c".into(), "echo bench > /etc/machinen-bench".into()];
                let o = vm.exec(ExecOptions { argv, ..Default::default() }).await?;
                if o.status.code != Some(0) {
                    return Err(machinen::error::fail(machinen::ErrorCode::ProvisionStepFailed, "install step failed").into());
                }
                Ok(())
            })
        })),
        cmd: Some(vec!["true".into()]),
        memory_mib: Some(ctx.cfg.memory_mib),
        progress: ProgressMode::Quiet,
        boot_timeout: Duration::from_secs(180),
        ..Default::default()
    })
    .await
    .context("provisioning the benchmark image")?;
    sec.one("image_bake_ms", "provision a one-step image (boot, step, export)", "ms", ms(t));
    sec.one("image_size_mib", "provisioned image .tar.gz", "MiB", mib(res.size));

    // The first boot of a new image converts it to ext4; time that alone.
    let paths = Paths::from_env()?;
    let images = paths.cache.join("images");
    let existed: Vec<_> = ["ext4", "lock", "config.json"].iter().map(|e| images.join(format!("{}.{e}", res.sha256))).filter(|p| p.exists()).collect();
    let t = Instant::now();
    let (p, o) = (paths.clone(), out.clone());
    let img = tokio::task::spawn_blocking(move || machinen::image::ensure_rootfs_image(&p, &o, ProgressMode::Quiet)).await??;
    sec.one("image_convert_ms", "first use of a new image: .tar.gz to cached ext4", "ms", ms(t));

    let result = async {
        let mut samples = Vec::new();
        for i in 0..ctx.cfg.runs {
            let mut opts = ctx.boot_options(&format!("img{i}"));
            opts.image = Some(out.clone());
            let t = Instant::now();
            let vm = machinen::boot(opts).await.context("booting the image")?;
            samples.push(ms(t));
            stop(vm).await?;
        }
        sec.add("cold_image_ms", "cold boot to agent-ready, provisioned image", "ms", samples);
        Ok::<(), anyhow::Error>(())
    }
    .await;
    // The image's cache entries are ours: remove what we created.
    for ext in ["ext4", "lock", "config.json"] {
        let p = images.join(format!("{}.{ext}", img.sha256));
        if !existed.contains(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
    let _ = std::fs::remove_file(&out);
    result
}
