//! Writing the baked rootfs: `tar` runs *in the guest* on a non-recursive
//! bind mount of `/` (so it sees the root disk itself: the device nodes under
//! `/dev`, empty `/proc` and `/sys`, none of the runtime mounts) and streams
//! the archive over one exec's stdout; the host puts the image config in
//! front, gzips, hashes and writes a temp file beside OUT, fsyncs it and
//! renames it into place. Ownership is numeric, modes, hard links, symlinks,
//! device nodes, sparse files and extended attributes (including
//! `security.capability`) are kept by the guest's GNU tar.

use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::config::{self, ImageConfig};
use super::ProvisionError;
use crate::assets::fsutil;
use crate::error::Result;
use crate::progress::ProgressMode;
use crate::vm::{ExecOptions, Vm};

/// Where the guest bind-mounts its root disk for the export (on /run, a tmpfs).
const EXPORT_MOUNT: &str = "/run/machinen-export";

/// Members left out of the image: the old image config (a fresh one goes
/// first), runtime scratch space, the ext4 `lost+found`, and apt's download
/// and package-list caches (an `apt-get update` brings the lists back).
pub const EXCLUDES: &[&str] = &[
    "./etc/machinen/image.json",
    "./tmp/*",
    "./run/*",
    "./lost+found",
    "./var/cache/apt/archives/*.deb",
    "./var/cache/apt/archives/partial/*",
    "./var/cache/apt/*.bin",
    "./var/lib/apt/lists/*_*",
    "./var/lib/apt/lists/partial/*",
];

/// The guest side: flush, bind-mount the root disk, stream a tar of it.
/// `/etc/resolv.conf` is left out when it is exactly what the agent writes
/// at every boot (it is the agent's, not the image's).
pub(crate) fn export_script() -> String {
    let excludes: Vec<String> = EXCLUDES
        .iter()
        .map(|e| format!("--exclude='{e}'"))
        .collect();
    format!(
        r#"set -e
mkdir -p /etc/machinen
sync
mkdir -p {m}
mount --bind / {m}
cd {m}
set --
if [ "$(cat etc/resolv.conf 2>/dev/null)" = "nameserver 10.0.2.3" ]; then set -- --exclude=./etc/resolv.conf; fi
exec tar --create --file=- --numeric-owner --xattrs --xattrs-include='*' --sparse --one-file-system --anchored {ex} "$@" .
"#,
        m = EXPORT_MOUNT,
        ex = excludes.join(" ")
    )
}

/// Bytes written: the output's sha256 and size.
pub(crate) struct Written {
    pub sha256: String,
    pub size: u64,
    /// Uncompressed tar bytes.
    pub raw: u64,
}

struct HashWriter<W> {
    inner: W,
    hash: Sha256,
    n: u64,
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.hash.update(&buf[..k]);
        self.n += k as u64;
        Ok(k)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The process umask, read without changing it (`/proc/self/status`).
fn umask() -> u32 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("Umask:")
                    .and_then(|v| u32::from_str_radix(v.trim(), 8).ok())
            })
        })
        .unwrap_or(0o022)
}

/// Write the guest's root disk (plus `config`) to `out`, atomically.
pub(crate) async fn export(
    vm: &Vm,
    config: &ImageConfig,
    out: &Path,
    progress: ProgressMode,
) -> Result<Written> {
    let output_err = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source: io::Error| -> crate::Error {
            ProvisionError::Output {
                action,
                path,
                source,
            }
            .into()
        }
    };
    let dir = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".partial")
        .tempfile_in(&dir)
        .map_err(output_err("create a temporary file in", &dir))?;
    // The path guard deletes the temp file on every early return and when
    // this future is dropped (Ctrl-C): OUT only ever appears by rename.
    let (file, tmp_path) = tmp.into_parts();
    let member = config::tar_member(config, fsutil::unix_now())
        .map_err(output_err("encode the image config for", out))?;

    let (ours, theirs) =
        std::os::unix::net::UnixStream::pair().map_err(output_err("open a pipe for", out))?;
    theirs
        .set_nonblocking(true)
        .map_err(output_err("open a pipe for", out))?;
    let mut stdout =
        tokio::net::UnixStream::from_std(theirs).map_err(output_err("open a pipe for", out))?;

    let step = progress.step(format!("Writing {}", out.display()));
    let display = out.display().to_string();
    // What the guest streams is the guest's to decide: the host filesystem
    // keeps its free-space reserve whatever arrives.
    let reserve = crate::hostfile::DiskReserve::from_env()?;
    let (out_path, reserve_dir) = (out.to_path_buf(), dir.clone());
    let writer = tokio::task::spawn_blocking(move || -> Result<(Written, std::fs::File)> {
        let write_err = |e: io::Error| -> crate::Error {
            ProvisionError::Output {
                action: "write",
                path: out_path.clone(),
                source: e,
            }
            .into()
        };
        let mut ours = ours;
        let hw = HashWriter {
            inner: BufWriter::with_capacity(1 << 20, file),
            hash: Sha256::new(),
            n: 0,
        };
        let mut gz = flate2::write::GzEncoder::new(hw, flate2::Compression::new(6));
        gz.write_all(&member).map_err(write_err)?;
        let mut buf = vec![0u8; 1 << 20];
        let mut raw = member.len() as u64;
        let mut shown = 0u64;
        loop {
            let n = match ours.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(write_err(e)),
            };
            gz.write_all(&buf[..n]).map_err(write_err)?;
            raw += n as u64;
            if raw - shown >= 8 << 20 {
                shown = raw;
                step.message(format!(
                    "Writing {display} ({} MiB read from the guest)",
                    raw >> 20
                ));
                crate::hostfile::check_room(&reserve_dir, 0, reserve)?;
            }
        }
        let hw = gz.finish().map_err(write_err)?;
        let HashWriter { inner, hash, n } = hw;
        let file = inner.into_inner().map_err(|e| write_err(e.into_error()))?;
        file.sync_all().map_err(write_err)?;
        step.done(format!(
            "Wrote {display} ({} MiB, {} MiB uncompressed)",
            n >> 20,
            raw >> 20
        ));
        Ok((
            Written {
                sha256: hex::encode(hash.finalize()),
                size: n,
                raw,
            },
            file,
        ))
    });

    let mut stderr = Vec::new();
    let argv = vec!["sh".to_string(), "-c".into(), export_script()];
    let status = vm
        .exec_stream(
            ExecOptions {
                argv,
                ..Default::default()
            },
            tokio::io::empty(),
            &mut stdout,
            &mut stderr,
        )
        .await;
    // End of stream for the writer thread.
    drop(stdout);
    let written = writer
        .await
        .map_err(|e| output_err("write", out)(io::Error::other(e)))?;
    let (written, file) = written?;
    let status = status?;
    // GNU tar: 1 means "some files changed while being read" (a daemon left
    // running by an install step, say); the archive is still complete.
    let tail = crate::assets::tool::stderr_tail(&stderr);
    match status.code {
        Some(0) => {}
        Some(1) => tracing::warn!("tar in the guest reported changes while reading: {tail}"),
        _ => {
            return Err(ProvisionError::ExportFailed {
                status,
                stderr: tail,
            }
            .into())
        }
    }
    if written.raw % 512 != 0 || written.raw < 2048 {
        return Err(ProvisionError::ExportFailed {
            status,
            stderr: format!(
                "the guest's tar stream is truncated ({} bytes)",
                written.raw
            ),
        }
        .into());
    }
    // Temp files are created 0600; the image gets what a new file would.
    use std::os::unix::fs::PermissionsExt;
    file.set_permissions(std::fs::Permissions::from_mode(0o666 & !umask()))
        .map_err(output_err("set the mode of", out))?;
    drop(file);
    tmp_path
        .persist(out)
        .map_err(|e| output_err("rename the finished image to", out)(e.error))?;
    fsutil::fsync_dir(&dir).map_err(output_err("flush the directory of", out))?;
    Ok(written)
}
