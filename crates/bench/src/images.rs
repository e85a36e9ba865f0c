//! Container images from a registry (Debian's `docker-registry`, started
//! here): the first boot of an image of about 200 MiB (pull, unpack into
//! the cached root image, boot to ready, run `true`) next to what the same
//! bytes cost with standard tools — `skopeo copy` of the image into a local
//! directory plus a boot of the base — and a second, cached boot next to a
//! base boot. Each first boot gets a cache of its own (the guest kernel's
//! initramfs linked in from the warm cache, so only the image is cold).
//! Skipped without `docker-registry`, `skopeo` or `umoci`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use machinen::paths::Paths;

use crate::ctx::Ctx;
use crate::stats::{mib, ms, Section};

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn timed(cmd: &mut Command) -> Result<f64> {
    let t0 = Instant::now();
    run(cmd)?;
    Ok(ms(t0))
}

/// An OCI layout holding `app`: the base rootfs as one layer and
/// `extra_mib` of random data as a second; its size in bytes.
fn make_image(dir: &Path, base: &Path, extra_mib: u32) -> Result<(String, u64)> {
    let base_tar = dir.join("base.tar");
    run(Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" > \"$2\"")
        .arg("sh")
        .arg(base)
        .arg(&base_tar))?;
    let extra = dir.join("extra");
    std::fs::create_dir_all(extra.join("opt"))?;
    run(Command::new("head")
        .args([
            "-c",
            &format!("{}", u64::from(extra_mib) << 20),
            "/dev/urandom",
        ])
        .stdout(std::fs::File::create(extra.join("opt/payload.bin"))?))?;
    let extra_tar = dir.join("extra.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&extra)
        .arg("-cf")
        .arg(&extra_tar)
        .arg("opt"))?;
    let lay = dir.join("layout");
    let image = format!("{}:app", lay.display());
    run(Command::new("umoci").arg("init").arg("--layout").arg(&lay))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    for layer in [&base_tar, &extra_tar] {
        run(Command::new("umoci")
            .args(["raw", "add-layer", "--image", &image])
            .arg(layer))?;
    }
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    ]))?;
    let size = std::fs::metadata(&base_tar)?.len() + std::fs::metadata(&extra_tar)?.len();
    let _ = std::fs::remove_file(&base_tar);
    let _ = std::fs::remove_file(&extra_tar);
    Ok((image, size))
}

/// A cache directory of its own with the warm cache's initramfs linked in.
fn cold_cache(warm: &Path, at: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(at)?;
    run(Command::new("cp")
        .arg("-al")
        .arg(warm.join("initramfs"))
        .arg(at.join("initramfs")))?;
    Ok(at.to_path_buf())
}

pub async fn run_section(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    for tool in ["docker-registry", "skopeo", "umoci"] {
        if Command::new(tool).arg("--version").output().is_err() {
            eprintln!("  skipped: {tool} is not installed");
            return Ok(());
        }
    }
    let dir = ctx.path("images");
    std::fs::create_dir_all(&dir)?;
    let paths = Paths::from_env()?;
    let base = machinen::assets::resolve(&paths)?.rootfs;
    let extra_mib = if ctx.cfg.quick { 8 } else { 64 };
    let runs = ctx.cfg.runs.max(if ctx.cfg.quick { 1 } else { 3 });
    let cli = std::env::current_exe()?
        .parent()
        .context("bin dir")?
        .join("machinen");
    let rows = tokio::task::spawn_blocking(move || -> Result<Vec<(&'static str, Vec<f64>)>> {
        let (image, size) = make_image(&dir, &base, extra_mib)?;
        let (_server, addr) = crate::transport::start(&dir)?;
        let reference = format!("{addr}/bench/app:1");
        run(Command::new("skopeo").args([
            "copy",
            "--dest-tls-verify=false",
            &format!("oci:{image}"),
            &format!("docker://{reference}"),
        ]))?;
        let boot = |cache: Option<&Path>, image: Option<&str>| -> Result<f64> {
            let mut c = Command::new(&cli);
            c.args(["boot", "--insecure-registry", &addr]);
            if let Some(i) = image {
                c.arg(i);
            }
            c.args(["--", "true"]);
            if let Some(cache) = cache {
                c.env(machinen_proto::env::CACHE_DIR, cache);
            }
            timed(&mut c)
        };
        // Warm-up: the base's root image and the initramfs in the warm cache.
        boot(None, None)?;
        let (mut first, mut skopeo, mut base_boot, mut cached, mut tools) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for i in 0..runs {
            let cache = cold_cache(&paths.cache, &dir.join(format!("cache-{i}")))?;
            first.push(boot(Some(&cache), Some(&reference))?);
            let copy_to = dir.join(format!("copy-{i}"));
            let s = timed(Command::new("skopeo").args([
                "copy",
                "--src-tls-verify=false",
                &format!("docker://{reference}"),
                &format!("oci:{}:app", copy_to.display()),
            ]))?;
            let b = boot(None, None)?;
            skopeo.push(s);
            base_boot.push(b);
            tools.push(s + b);
            cached.push(boot(Some(&cache), Some(&reference))?);
            let _ = std::fs::remove_dir_all(&cache);
            let _ = std::fs::remove_dir_all(&copy_to);
        }
        Ok(vec![
            ("first", first),
            ("skopeo", skopeo),
            ("base", base_boot),
            ("tools", tools),
            ("cached", cached),
            ("size", vec![mib(size)]),
        ])
    })
    .await
    .context("the image runs")??;
    for (k, v) in rows {
        match k {
            "first" => sec.add(
                "first_boot_ms",
                "boot REF -- true, image not cached: pull + unpack + boot",
                "ms",
                v,
            ),
            "skopeo" => sec.add(
                "skopeo_copy_ms",
                "skopeo copy docker://REF oci:DIR",
                "ms",
                v,
            ),
            "base" => sec.add("base_boot_ms", "boot -- true (the base, cached)", "ms", v),
            "tools" => sec.add(
                "skopeo_plus_base_ms",
                "skopeo copy + base boot, same run",
                "ms",
                v,
            ),
            "cached" => sec.add("cached_boot_ms", "boot REF -- true, image cached", "ms", v),
            _ => sec.one(
                "image_mib",
                "image size (layers, uncompressed)",
                "MiB",
                v[0],
            ),
        }
    }
    Ok(())
}
