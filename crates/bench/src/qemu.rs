//! Our own QEMU command lines for the baselines. We boot one machinen VM,
//! read its spec, stop it, and build its command line with the function the
//! supervisor starts QEMU with (`machinen::qemu_args`), then move the VM's
//! directory to ours: same machine type, accelerator, CPU, memory, kernel,
//! initramfs, kernel flags and devices, by construction.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _, Result};

use crate::ctx::{stop, Ctx};

/// The QEMU argv of a real machinen VM.
#[derive(Debug, Clone)]
pub struct Guest {
    /// Arguments after the program name.
    pub args: Vec<String>,
    /// The VM directory the arguments refer to (replaced by ours).
    pub vm_dir: String,
    /// The cached raw ext4 image the VM's overlay is backed by.
    pub base_image: PathBuf,
    /// The initramfs the VM booted (agent as `/init` plus modules).
    pub initrd: PathBuf,
}

impl Guest {
    /// Boot a VM with the benchmark's settings and build its QEMU argv.
    pub async fn capture(ctx: &Ctx) -> Result<Guest> {
        let vm = ctx.boot("argv").await?;
        let r = build_argv(&vm);
        stop(vm).await?;
        let (args, vm_dir) = r?;
        let value_of = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let initrd =
            PathBuf::from(value_of("-initrd").context("no -initrd in the VM's QEMU command line")?);
        let base_image = args
            .iter()
            .filter_map(|a| serde_json::from_str::<serde_json::Value>(a).ok())
            .find(|v| v["driver"] == "raw")
            .and_then(|v| v["file"]["filename"].as_str().map(PathBuf::from))
            .context("no raw base image -blockdev in the VM's QEMU command line")?;
        Ok(Guest {
            args,
            vm_dir,
            base_image,
            initrd,
        })
    }

    /// The argv for a QEMU of our own in `dir`: every path inside the VM's
    /// directory moved to `dir` (which must hold `disk.qcow2`, see
    /// [`Guest::prepare`]), `-incoming` dropped, and a RAM file outside it
    /// (`mem-path=`, e.g. in `/dev/shm`) renamed to one of ours in the same
    /// directory. Returns the argv and those RAM files, for the caller to
    /// remove once QEMU has exited.
    pub fn args_in(&self, dir: &Path) -> (Vec<String>, Vec<PathBuf>) {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir_s = dir.display().to_string();
        let mut out = Vec::new();
        let mut ram = Vec::new();
        let mut it = self.args.iter();
        while let Some(a) = it.next() {
            if a == "-incoming" {
                it.next();
                continue;
            }
            let mut a = a.replace(&self.vm_dir, &dir_s);
            if let Some(start) = a.find("mem-path=").map(|i| i + "mem-path=".len()) {
                let end = a[start..].find(',').map_or(a.len(), |e| start + e);
                let old = PathBuf::from(&a[start..end]);
                let new = if old.starts_with(dir) {
                    old
                } else {
                    let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    old.with_file_name(format!("machinen-bench-{}-{n}.ram", std::process::id()))
                };
                a.replace_range(start..end, &new.display().to_string());
                ram.push(new);
            }
            out.push(a);
        }
        (out, ram)
    }

    /// Remove RAM files of ours that an interrupted baseline left behind.
    pub fn sweep_ram_files(&self) {
        let prefix = format!("machinen-bench-{}-", std::process::id());
        let (_, ram) = self.args_in(Path::new("/nonexistent"));
        for dir in ram.iter().filter_map(|p| p.parent()) {
            for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Create what the VM directory held that QEMU opens: the root disk overlay.
    pub fn prepare(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        machinen::image::create_overlay(&self.base_image, &dir.join(machinen::spec::files::DISK))?;
        Ok(())
    }
}

/// Replace the value after `flag` (e.g. `-initrd`).
pub fn set_flag(args: &mut [String], flag: &str, value: String) -> Result<()> {
    let i = args
        .iter()
        .position(|a| a == flag)
        .with_context(|| format!("no {flag} in the QEMU command line"))?;
    match args.get_mut(i + 1) {
        Some(v) => *v = value,
        None => bail!("{flag} without a value"),
    }
    Ok(())
}

/// Replace the argument starting with `prefix` (e.g. a `-chardev` spec).
pub fn replace_arg(args: &mut [String], prefix: &str, value: String) -> Result<()> {
    let a = args
        .iter_mut()
        .find(|a| a.starts_with(prefix))
        .with_context(|| format!("no argument {prefix}… in the QEMU command line"))?;
    *a = value;
    Ok(())
}

/// The argv the VM's supervisor gave its QEMU, from the VM's spec and this
/// host, except for the network: a VM's passt socket is inherited from its
/// supervisor, so a bare QEMU of ours gets QEMU's built-in user networking.
fn build_argv(vm: &machinen::Vm) -> Result<(Vec<String>, String)> {
    let dir = vm
        .info()
        .control_socket
        .parent()
        .context("control socket without a directory")?
        .to_path_buf();
    let spec_path = dir.join(machinen::spec::files::SPEC);
    let mut spec = machinen::spec::VmSpec::load(&spec_path)
        .with_context(|| format!("reading {}", spec_path.display()))?;
    spec.network = machinen::spec::NetworkMode::NatHost;
    let accel = machinen::accel::probe(spec.accel.as_deref())?;
    let mut host = machinen::qemu_args::QemuHost::probe(accel);
    host.qemu_version =
        machinen::qemu_args::qemu_version(std::path::Path::new(&crate::ctx::qemu_binary()));
    Ok((
        machinen::qemu_args::qemu_args(&spec, &host),
        dir.display().to_string(),
    ))
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
pub async fn connect_retry(
    path: &Path,
    timeout: Duration,
    child: &mut tokio::process::Child,
) -> Result<tokio::net::UnixStream> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        match tokio::net::UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Some(st) = child.try_wait()? {
                    bail!("QEMU exited ({st}) before {} appeared", path.display());
                }
                if std::time::Instant::now() > deadline {
                    return Err(e).with_context(|| format!("connecting {}", path.display()));
                }
                tokio::time::sleep(machinen_proto::timeouts::STATE_POLL).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_move_and_incoming_goes() {
        let g = Guest {
            args: [
                "-initrd",
                "/c/i.cpio",
                "-chardev",
                "file,id=con,path=/r/vm1/console.log",
                "-incoming",
                "defer",
                "-qmp",
                "unix:/r/vm1/qmp.sock,server=on",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            vm_dir: "/r/vm1".into(),
            base_image: "/c/b.ext4".into(),
            initrd: "/c/i.cpio".into(),
        };
        let (mut a, ram) = g.args_in(Path::new("/w/sv"));
        assert!(ram.is_empty());
        assert_eq!(
            a,
            [
                "-initrd",
                "/c/i.cpio",
                "-chardev",
                "file,id=con,path=/w/sv/console.log",
                "-qmp",
                "unix:/w/sv/qmp.sock,server=on"
            ]
        );
        set_flag(&mut a, "-initrd", "/w/x.cpio".into()).expect("flag");
        replace_arg(&mut a, "file,id=con,", "stdio,id=con".into()).expect("arg");
        assert_eq!(a[1], "/w/x.cpio");
        assert_eq!(a[3], "stdio,id=con");
        assert!(set_flag(&mut a, "-kernel", "x".into()).is_err());
    }

    #[test]
    fn ram_files_get_names_of_our_own() {
        let g = Guest {
            args: vec![
                "-object".into(),
                "memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/machinen-abc.ram,share=on"
                    .into(),
            ],
            vm_dir: "/r/vm1".into(),
            base_image: "/c/b.ext4".into(),
            initrd: "/c/i.cpio".into(),
        };
        let (a, ram) = g.args_in(Path::new("/w/sv"));
        assert_eq!(ram.len(), 1);
        assert!(ram[0].starts_with("/dev/shm"));
        assert!(ram[0]
            .file_name()
            .expect("name")
            .to_string_lossy()
            .starts_with("machinen-bench-"));
        assert_eq!(
            a[1],
            format!(
                "memory-backend-file,id=ram,size=512M,mem-path={},share=on",
                ram[0].display()
            )
        );
    }
}
