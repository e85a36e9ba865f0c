//! Bundles through an OCI registry (Debian's `docker-registry`, started
//! here on a free loopback port): push and pull throughput, what a second
//! checkpoint uploads next to the first, and a pull onto a host that has
//! the parent next to a cold one. Skipped without `docker-registry`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use machinen::paths::Paths;
use machinen::progress::ProgressMode;

use crate::ctx::{free_port, sh, stop, Ctx, SNAPSHOT_TIMEOUT};
use crate::stats::{mib, ms, Section};

pub(crate) struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn start(dir: &Path) -> Result<(Server, String)> {
    let addr = format!("127.0.0.1:{}", free_port()?);
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
            dir.join("data").display()
        ),
    )?;
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("docker-registry (Debian package docker-registry)")?;
    let server = Server(child);
    let t = Instant::now();
    while std::net::TcpStream::connect(&addr).is_err() {
        if t.elapsed() > Duration::from_secs(20) {
            bail!("the registry did not listen on {addr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok((server, addr))
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    if Command::new("docker-registry")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("  skipped: docker-registry is not installed");
        return Ok(());
    }
    let dir = ctx.path("registry");
    std::fs::create_dir_all(&dir)?;
    let (_server, addr) = start(&dir)?;
    std::env::set_var(machinen_proto::env::INSECURE_REGISTRIES, &addr);
    let n = ctx.cfg.touched_mib;
    let mut opts = ctx.boot_options("xfer");
    opts.memory_mib = Some(ctx.cfg.memory_mib.max(n * 2 + 256));
    let vm = machinen::boot(opts).await.context("booting the VM")?;
    let (c1, c2) = (ctx.path("xfer-c1"), ctx.path("xfer-c2"));
    let r = async {
        sh(
            &vm,
            &format!("head -c {n}M /dev/urandom > /dev/shm/blob && sync"),
        )
        .await?;
        vm.snapshot(&c1, true, SNAPSHOT_TIMEOUT).await?;
        sh(&vm, "head -c 1M /dev/urandom > /dev/shm/step && sync").await?;
        vm.snapshot(&c2, true, SNAPSHOT_TIMEOUT).await?;
        anyhow::Ok(())
    }
    .await;
    stop(vm).await?;
    r?;
    let reference = |tag: &str| format!("{addr}/bench/ckpt:{tag}");
    let push = |b: std::path::PathBuf, r: String| {
        tokio::task::spawn_blocking(move || {
            let t = Instant::now();
            machinen::transport::push(&b, &r, ProgressMode::Quiet).map(|rep| (rep, ms(t)))
        })
    };
    let (p1, t1) = push(c1.clone(), reference("c1")).await??;
    let (p2, t2) = push(c2.clone(), reference("c2")).await??;
    sec.one(
        "push_first_mib_s",
        &format!("push checkpoint 1 ({n} MiB touched): MiB uploaded per second"),
        "MiB/s",
        mib(p1.uploaded_bytes) / (t1 / 1000.0),
    );
    sec.one(
        "push_first_mib",
        "push checkpoint 1: uploaded",
        "MiB",
        mib(p1.uploaded_bytes),
    );
    sec.one(
        "push_second_mib",
        "push checkpoint 2 (~1 MiB changed, a delta): uploaded",
        "MiB",
        mib(p2.uploaded_bytes),
    );
    sec.one("push_second_ms", "push checkpoint 2: time", "ms", t2);
    // Pulls: cold (a fresh cache and directory), then onto a "host" that
    // has checkpoint 1 where checkpoint 2 expects it.
    let paths = Paths::from_env()?;
    let mut cold = Vec::new();
    let mut warm = Vec::new();
    for i in 0..ctx.cfg.runs.min(3) {
        let cache = ctx.path(&format!("pull-cache-{i}"));
        let p = Paths {
            cache: cache.clone(),
            ..paths.clone()
        };
        let place = ctx.path(&format!("pulled-{i}"));
        std::fs::create_dir_all(&place)?;
        let (p2, r2, dest) = (p.clone(), reference("c2"), place.join("c2"));
        let t = Instant::now();
        let rep = tokio::task::spawn_blocking(move || {
            machinen::transport::pull(&p2, &r2, &dest, ProgressMode::Quiet)
        })
        .await??;
        cold.push((ms(t), rep.downloaded_bytes));
        // The tip again, beside the parent it already has.
        std::fs::remove_dir_all(place.join("c2"))?;
        let (r2, dest) = (reference("c2"), place.join("c2"));
        let t = Instant::now();
        tokio::task::spawn_blocking(move || {
            machinen::transport::pull(&p, &r2, &dest, ProgressMode::Quiet)
        })
        .await??;
        warm.push(ms(t));
        let _ = std::fs::remove_dir_all(&place);
        let _ = std::fs::remove_dir_all(&cache);
    }
    let mib_s: Vec<f64> = cold.iter().map(|(t, b)| mib(*b) / (t / 1000.0)).collect();
    sec.add(
        "pull_cold_mib_s",
        "pull checkpoint 2 and its parent, cold: MiB downloaded per second",
        "MiB/s",
        mib_s,
    );
    sec.add(
        "pull_cold_ms",
        "pull checkpoint 2 and its parent, cold",
        "ms",
        cold.iter().map(|(t, _)| *t).collect(),
    );
    sec.add(
        "pull_with_parent_ms",
        "pull checkpoint 2 onto a host that has checkpoint 1",
        "ms",
        warm,
    );
    // `restore REF` to agent-ready: onto a host that has restored
    // checkpoint 1 from the registry before (it fetches only checkpoint
    // 2), and cold. Each "host" is a fresh cache sharing the real one's
    // converted images, so only the bundles differ.
    let (mut cold_restore, mut warm_restore) = (Vec::new(), Vec::new());
    let saved = std::env::var_os(machinen_proto::env::CACHE_DIR);
    let r = async {
        for i in 0..ctx.cfg.runs.min(3) {
            for warm in [false, true] {
                let cache = ctx.path(&format!("host-{i}-{warm}"));
                std::fs::create_dir_all(&cache)?;
                std::os::unix::fs::symlink(paths.cache.join("images"), cache.join("images"))?;
                std::env::set_var(machinen_proto::env::CACHE_DIR, &cache);
                if warm {
                    let vm = ctx
                        .restore(Path::new(&reference("c1")), &format!("x1-{i}"))
                        .await
                        .context("restoring checkpoint 1 from the registry")?;
                    stop(vm).await?;
                }
                let t = Instant::now();
                let vm = ctx
                    .restore(Path::new(&reference("c2")), &format!("x2-{i}-{warm}"))
                    .await
                    .context("restoring checkpoint 2 from the registry")?;
                let took = ms(t);
                let r = sh(&vm, "true").await;
                stop(vm).await?;
                r?;
                if warm {
                    warm_restore.push(took);
                } else {
                    cold_restore.push(took);
                }
                let _ = std::fs::remove_dir_all(&cache);
            }
        }
        anyhow::Ok(())
    }
    .await;
    match saved {
        Some(v) => std::env::set_var(machinen_proto::env::CACHE_DIR, v),
        None => std::env::remove_var(machinen_proto::env::CACHE_DIR),
    }
    r?;
    sec.add(
        "restore_ref_cold_ms",
        "restore REF (checkpoint 2) to agent-ready, cold: its chain fetched",
        "ms",
        cold_restore,
    );
    sec.add(
        "restore_ref_with_parent_ms",
        "restore REF (checkpoint 2) to agent-ready on a host that restored checkpoint 1",
        "ms",
        warm_restore,
    );
    let _ = std::fs::remove_dir_all(&c1);
    let _ = std::fs::remove_dir_all(&c2);
    Ok(())
}
