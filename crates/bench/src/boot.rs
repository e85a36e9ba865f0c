//! Cold boot to agent-ready: the installed base (what an ad-hoc
//! `machinen boot -- CMD` boots) and a provisioned image; plus the one-off
//! costs of a new image (bake, ext4 conversion) and a whole ad-hoc run
//! through the CLI.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use machinen::progress::ProgressMode;
use machinen::{ExecOptions, Paths, ProvisionOptions};

use crate::ctx::{stop, Ctx};
use crate::stats::{mib, ms, Section};

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    // One unmeasured boot warms the caches (image hash index, page cache).
    stop(ctx.boot("warm").await?).await?;
    let image = bake(ctx, sec).await?;
    let r = boots(ctx, sec, &image.tarball).await;
    image.remove();
    r
}

/// Base and image boots alternate, so a change in host load hits both.
async fn boots(ctx: &Ctx, sec: &mut Section, image: &Path) -> Result<()> {
    let (mut base, mut img) = (Vec::new(), Vec::new());
    for i in 0..ctx.cfg.runs {
        let t = Instant::now();
        let vm = ctx.boot(&format!("base{i}")).await?;
        base.push(ms(t));
        stop(vm).await?;

        let mut opts = ctx.boot_options(&format!("img{i}"));
        opts.image = Some(image.to_path_buf());
        let t = Instant::now();
        let vm = machinen::boot(opts).await.context("booting the image")?;
        img.push(ms(t));
        stop(vm).await?;
    }
    sec.add(
        "cold_base_ms",
        "cold boot to agent-ready, base rootfs",
        "ms",
        base,
    );
    sec.add(
        "cold_image_ms",
        "cold boot to agent-ready, provisioned image",
        "ms",
        img,
    );

    // An ad-hoc run end to end, as a user types it: boot, run, power off.
    if let Some(cli) = cli_binary() {
        let mut adhoc = Vec::new();
        for _ in 0..ctx.cfg.runs {
            let t = Instant::now();
            let out = tokio::process::Command::new(&cli)
                .args([
                    "boot",
                    "--memory",
                    &ctx.cfg.memory_mib.to_string(),
                    "--",
                    "true",
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .await
                .context("running machinen boot -- true")?;
            if !out.status.success() {
                bail!(
                    "machinen boot -- true failed: {}",
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            adhoc.push(ms(t));
        }
        sec.add(
            "adhoc_cli_ms",
            "CLI `machinen boot -- true`, start to exit",
            "ms",
            adhoc,
        );
    }
    Ok(())
}

/// The CLI next to this program (for the ad-hoc row), if built.
pub fn cli_binary() -> Option<std::path::PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir = exe.parent()?;
    [dir.join("machinen"), dir.parent()?.join("machinen")]
        .into_iter()
        .find(|p| p.is_file())
}

/// The provisioned image and the cache entries it created.
struct BakedImage {
    tarball: PathBuf,
    created: Vec<PathBuf>,
}

impl BakedImage {
    /// The image's cache entries are ours: remove what we created.
    fn remove(&self) {
        for p in &self.created {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(&self.tarball);
    }
}

/// Bake a one-step image and convert it (both timed once).
async fn bake(ctx: &Ctx, sec: &mut Section) -> Result<BakedImage> {
    let out = ctx.path("image.tar.gz");
    let t = Instant::now();
    let res = machinen::provision(ProvisionOptions {
        out: out.clone(),
        install: Some(Box::new(|vm, _cfg| {
            Box::pin(async move {
                let argv = vec![
                    "sh".into(),
                    "-c".into(),
                    "echo bench > /etc/machinen-bench".into(),
                ];
                let o = vm
                    .exec(ExecOptions {
                        argv,
                        ..Default::default()
                    })
                    .await?;
                if o.status.code != Some(0) {
                    return Err(machinen::error::fail(
                        machinen::ErrorCode::ProvisionStepFailed,
                        "install step failed",
                    )
                    .into());
                }
                Ok(())
            })
        })),
        cmd: Some(vec!["true".into()]),
        memory_mib: Some(ctx.cfg.memory_mib),
        progress: ProgressMode::Quiet,
        boot_timeout: crate::ctx::BOOT_TIMEOUT,
        ..Default::default()
    })
    .await
    .context("provisioning the benchmark image")?;
    sec.one(
        "image_bake_ms",
        "provision a one-step image (boot, step, export)",
        "ms",
        ms(t),
    );
    sec.one(
        "image_size_mib",
        "provisioned image .tar.gz",
        "MiB",
        mib(res.size),
    );

    // The first boot of a new image converts it to ext4; time that alone.
    let paths = Paths::from_env()?;
    let images = paths.cache.join("images");
    let entries =
        |sha: &str| ["ext4", "lock", "config.json"].map(|e| images.join(format!("{sha}.{e}")));
    let existed: Vec<PathBuf> = entries(&res.sha256)
        .into_iter()
        .filter(|p| p.exists())
        .collect();
    let t = Instant::now();
    let (p, o) = (paths.clone(), out.clone());
    let converted = tokio::task::spawn_blocking(move || {
        machinen::image::ensure_rootfs_image(&p, &o, ProgressMode::Quiet)
    })
    .await?;
    let mut created: Vec<PathBuf> = entries(&res.sha256)
        .into_iter()
        .filter(|p| !existed.contains(p))
        .collect();
    let img = match converted {
        Ok(img) => img,
        Err(e) => {
            BakedImage {
                tarball: out,
                created,
            }
            .remove();
            return Err(e.into());
        }
    };
    sec.one(
        "image_convert_ms",
        "first use of a new image: .tar.gz to cached ext4",
        "ms",
        ms(t),
    );
    if img.sha256 != res.sha256 {
        created.extend(
            entries(&img.sha256)
                .into_iter()
                .filter(|p| !existed.contains(p)),
        );
    }
    Ok(BakedImage {
        tarball: out,
        created,
    })
}
