//! Our own QEMU command lines for the baselines, built like the supervisor's
//! (`crates/vmm/src/engine/qemu.rs`, `QemuEngine::args`): same machine type,
//! accelerator, CPU model, memory, kernel, initramfs, kernel flags and
//! virtio devices.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use machinen::accel::Accel;
use machinen::progress::ProgressMode;
use machinen::Paths;

use crate::ctx::host_tsc_khz;

/// The guest a default `machinen boot` gets.
pub struct Guest {
    pub accel: Accel,
    pub kernel: PathBuf,
    /// The cached initramfs (agent as `/init` plus modules).
    pub initrd: PathBuf,
    /// The cached raw ext4 image of the base rootfs.
    pub base_image: PathBuf,
}

impl Guest {
    pub async fn resolve() -> Result<Guest> {
        tokio::task::spawn_blocking(|| -> Result<Guest> {
            let paths = Paths::from_env()?;
            let assets = machinen::assets::resolve(&paths)?;
            let agent = machinen::binaries::agent()?;
            let initrd = machinen::initramfs::ensure_initramfs(&paths, &assets, &agent)?;
            let img = machinen::image::ensure_rootfs_image(&paths, &assets.rootfs, ProgressMode::Quiet)?;
            let accel = machinen::accel::probe(None).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(Guest { accel, kernel: assets.kernel, initrd, base_image: img.path })
        })
        .await?
    }

    /// The kernel command line the supervisor uses, plus `extra`.
    pub fn cmdline(&self, extra: &[&str]) -> String {
        let mut c: Vec<String> =
            ["console=ttyS0", "quiet", "panic=-1", "init_on_free=1", "machinen.net=1", "machinen.hostname=bench"].iter().map(|s| s.to_string()).collect();
        if self.accel == Accel::Tcg {
            if let Some(khz) = host_tsc_khz() {
                c.push(format!("tsc_early_khz={khz}"));
                c.push("tsc=reliable".into());
            }
        }
        c.extend(extra.iter().map(|s| s.to_string()));
        c.join(" ")
    }

    /// Machine, accelerator, CPU, memory, kernel: everything but devices.
    pub fn machine_args(&self, memory_mib: u32, initrd: &Path, append: &str) -> Vec<String> {
        [
            "-M",
            "microvm,acpi=on",
            "-accel",
            self.accel.as_str(),
            "-cpu",
            self.accel.cpu_model(),
            "-m",
            &format!("{memory_mib}M"),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
            "-kernel",
            &self.kernel.display().to_string(),
            "-initrd",
            &initrd.display().to_string(),
            "-append",
            append,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The virtio devices of a machinen VM; `root` is the qcow2 overlay, or
    /// `None` to attach the base image read-only; `agent` the agent
    /// chardev spec (e.g. `null,id=agent`).
    pub fn device_args(&self, root: Option<&Path>, agent: &str) -> Vec<String> {
        let base = serde_json::json!({
            "driver": "raw", "node-name": if root.is_some() { "base" } else { "root" }, "read-only": true,
            "file": {"driver": "file", "filename": self.base_image, "read-only": true}
        });
        let mut a = vec!["-blockdev".to_string(), base.to_string()];
        if let Some(root) = root {
            a.push("-blockdev".into());
            a.push(
                serde_json::json!({
                    "driver": "qcow2", "node-name": "root", "backing": "base", "discard": "unmap",
                    "file": {"driver": "file", "filename": root}
                })
                .to_string(),
            );
        }
        a.extend(
            [
                "-device",
                "virtio-blk-device,drive=root",
                "-netdev",
                "user,id=net0",
                "-device",
                "virtio-net-device,netdev=net0",
                "-device",
                "virtio-rng-device",
                "-device",
                "virtio-serial-device",
                "-chardev",
                agent,
                "-device",
                &format!("virtserialport,chardev=agent,name={}", machinen_proto::AGENT_PORT_NAME),
            ]
            .iter()
            .map(|s| s.to_string()),
        );
        a
    }
}

/// `qemu-system-<arch> --version`, first line.
pub fn version() -> String {
    std::process::Command::new(crate::ctx::qemu_binary())
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_else(|| "unknown".into())
}

/// Wait for a unix socket to accept a connection.
pub async fn connect_retry(path: &Path, timeout: Duration, child: &mut tokio::process::Child) -> Result<tokio::net::UnixStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(st) = child.try_wait()? {
                    anyhow::bail!("QEMU exited ({st}) before {} appeared", path.display());
                }
                if std::time::Instant::now() > deadline {
                    return Err(e).with_context(|| format!("connecting {}", path.display()));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}
