//! The containerd shim: `ctr run --rm IMAGE true` with machinen's shim next
//! to runc (containerd's default runtime) and next to `machinen boot IMAGE
//! -- true`, interleaved run by run on one containerd of the bench's own
//! (its own socket and state directories). The image is one static busybox
//! (made with umoci and skopeo, imported with `ctr images import`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};

use crate::ctx::Ctx;
use crate::stats::{ms, Section};

const IMAGE: &str = "localhost/bench-bb:latest";

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

struct Containerd {
    dir: PathBuf,
    child: Child,
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

impl Containerd {
    fn ctr(&self) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.dir.join("ctd.sock"));
        c.stdin(Stdio::null());
        c
    }
}

fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("the bench's own path")?;
    Ok(exe.parent().context("bin dir")?.to_path_buf())
}

fn image(dir: &Path) -> Result<PathBuf> {
    let root = dir.join("root");
    std::fs::create_dir_all(root.join("bin"))?;
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).context("busybox (busybox-static)")?;
    for a in ["sh", "true"] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(a))?;
    }
    let layer = dir.join("layer.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .arg("bin"))?;
    let lay = dir.join("layout");
    let image = format!("{}:latest", lay.display());
    run(Command::new("umoci").arg("init").arg("--layout").arg(&lay))?;
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["raw", "add-layer", "--image", &image])
        .arg(&layer))?;
    run(Command::new("umoci").args(["config", "--image", &image, "--config.env", "PATH=/bin"]))?;
    let archive = dir.join("image.tar");
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{image}"),
        &format!(
            "docker-archive:{}:localhost/bench-bb:latest",
            archive.display()
        ),
    ]))?;
    Ok(archive)
}

fn start(dir: &Path) -> Result<Containerd> {
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
             disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
             [grpc]\n  address = \"{d}/ctd.sock\"\n[ttrpc]\n  address = \"{d}/ctd.sock.ttrpc\"\n",
            d = dir.display()
        ),
    )?;
    let path = format!(
        "{}:{}",
        bin_dir()?.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let log = std::fs::File::create(dir.join("containerd.log"))?;
    let child = Command::new("containerd")
        .arg("--config")
        .arg(&config)
        .env("PATH", path)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting containerd (Debian's containerd package)")?;
    let c = Containerd {
        dir: dir.to_path_buf(),
        child,
    };
    let t0 = Instant::now();
    while !dir.join("ctd.sock").exists() {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("containerd did not start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(c)
}

/// Milliseconds `cmd` took; an error when it failed.
fn timed(cmd: &mut Command) -> Result<f64> {
    let t0 = Instant::now();
    run(cmd)?;
    Ok(ms(t0))
}

pub async fn run_section(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("ctd-")
        .tempdir_in("/tmp")
        .context("a short scratch dir (socket paths are limited)")?;
    let dir = dir.path().to_path_buf();
    let cfg_runs = ctx.cfg.runs;
    let bin = bin_dir()?;
    // All of it is blocking process work.
    tokio::task::spawn_blocking(move || -> Result<Vec<(String, Vec<f64>)>> {
        if !bin.join("containerd-shim-machinen-v2").is_file() {
            bail!("containerd-shim-machinen-v2 is not built next to the bench: run scripts/build");
        }
        let archive = image(&dir)?;
        let ctd = start(&dir)?;
        run(ctd.ctr().args(["images", "import"]).arg(&archive))?;
        let cli = bin.join("machinen");
        let boot_arg = format!("docker-archive:{}", archive.display());
        let shim = |i: &str| -> Result<f64> {
            timed(ctd.ctr().args([
                "run",
                "--rm",
                "--runtime",
                "io.containerd.machinen.v2",
                IMAGE,
                i,
                "true",
            ]))
        };
        let runc = |i: &str| -> Result<f64> {
            timed(ctd.ctr().args([
                "run",
                "--rm",
                "--runtime",
                "io.containerd.runc.v2",
                IMAGE,
                i,
                "true",
            ]))
        };
        let boot = || -> Result<f64> {
            timed(
                Command::new(&cli)
                    .args(["boot", &boot_arg, "--", "true"])
                    .stdin(Stdio::null()),
            )
        };
        // Warm-up: the image's unpacking and machinen's image caches.
        shim("warm-m")?;
        runc("warm-r")?;
        boot()?;
        let (mut s, mut r, mut b) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..cfg_runs.max(3) {
            s.push(shim(&format!("m{i}"))?);
            r.push(runc(&format!("r{i}"))?);
            b.push(boot()?);
        }
        drop(ctd);
        let _ = std::fs::remove_dir_all(&dir);
        Ok(vec![
            ("shim".into(), s),
            ("runc".into(), r),
            ("boot".into(), b),
        ])
    })
    .await
    .context("the containerd runs")??
    .into_iter()
    .for_each(|(k, v)| match k.as_str() {
        "shim" => sec.add(
            "shim_run_ms",
            "ctr run --rm IMAGE true, machinen shim",
            "ms",
            v,
        ),
        "runc" => sec.add("runc_run_ms", "ctr run --rm IMAGE true, runc", "ms", v),
        _ => sec.add(
            "boot_cli_ms",
            "machinen boot IMAGE -- true (same image)",
            "ms",
            v,
        ),
    });
    Ok(())
}
