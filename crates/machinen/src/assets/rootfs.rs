//! The base rootfs: Debian minbase of the host's suite, packed as
//! `rootfs.tar.gz`.
//!
//! Built with mmdebstrap straight into a tarball (no root needed where user
//! namespaces work); debootstrap + tar is the fallback for root on hosts
//! without mmdebstrap. Both get the host's own apt sources, so machinen
//! reaches whatever archive (or mirror, or proxy) the host is set up for.
//!
//! Lean on purpose, since every file is paid for at boot under TCG: minbase
//! already has bash and coreutils; no init system (the agent is PID 1);
//! documentation, man pages and translations are left out (dpkg path
//! filters, which also apply to what the guest installs later); apt's lists
//! and caches are dropped (mmdebstrap's default cleanup). ca-certificates is
//! added because HTTPS from the guest is common and it costs ~3 MB packed.

use std::fs;
use std::path::{Path, PathBuf};

use super::{apt, fsutil, io_err, need, tool, InstallError};
use crate::progress::ProgressMode;

/// Packages on top of minbase.
const INCLUDE: &str = "ca-certificates";

/// dpkg path filters: what not to unpack into the guest.
const DPKG_FILTERS: &[&str] = &[
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/lintian/*",
    "path-exclude=/usr/share/linda/*",
];

/// Build `dest` (a `.tar.gz`) for `suite`/`arch`. `dir` is where scratch
/// files go (same filesystem as `dest`).
pub(super) fn build(
    dir: &Path,
    dest: &Path,
    suite: &str,
    arch: &str,
    progress: ProgressMode,
) -> Result<(), InstallError> {
    let sources = apt::host_sources(Path::new("/etc/apt"), suite);
    if sources.is_empty() {
        tracing::warn!(
            suite,
            "the host's apt sources have no entry for this suite; using the bootstrap tool's default"
        );
    }
    if let Some(mm) = tool::MMDEBSTRAP.find() {
        let step = progress.step(format!(
            "Building the Debian {suite} base rootfs (mmdebstrap, minbase)"
        ));
        with_mmdebstrap(&mm, dir, dest, suite, arch, &sources)?;
        step.done(format!("Built the Debian {suite} base rootfs"));
        return Ok(());
    }
    if tool::is_root() && tool::DEBOOTSTRAP.find().is_some() {
        let step = progress.step(format!(
            "Building the Debian {suite} base rootfs (debootstrap, minbase)"
        ));
        with_debootstrap(dir, dest, suite, arch, &sources)?;
        step.done(format!("Built the Debian {suite} base rootfs"));
        return Ok(());
    }
    Err(InstallError::ToolMissing {
        tool: tool::MMDEBSTRAP.name,
        package: tool::MMDEBSTRAP.package,
    })
}

/// A scratch tarball name next to `dest` that still ends in `.tar.gz`
/// (mmdebstrap picks the output format from the extension).
fn scratch_tarball(dir: &Path) -> PathBuf {
    let nonce: u32 = rand::random();
    dir.join(format!(
        ".rootfs-build-{}-{nonce:08x}.tar.gz",
        std::process::id()
    ))
}

/// Removes a scratch file unless it was moved into place.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn with_mmdebstrap(
    mm: &Path,
    dir: &Path,
    dest: &Path,
    suite: &str,
    arch: &str,
    sources: &[apt::Source],
) -> Result<(), InstallError> {
    let tmp = Scratch(scratch_tarball(dir));
    let mut cmd = tool::command(mm);
    cmd.arg("--variant=minbase")
        .arg(format!("--architectures={arch}"))
        .arg(format!("--include={INCLUDE}"));
    for f in DPKG_FILTERS {
        cmd.arg(format!("--dpkgopt={f}"));
    }
    for opt in host_proxy_options() {
        cmd.arg(format!("--aptopt={opt}"));
    }
    cmd.arg(suite).arg(&tmp.0);
    for s in sources {
        cmd.arg(s.one_line());
    }
    tool::run(&mut cmd).map_err(|source| InstallError::RootfsFailed {
        suite: suite.to_string(),
        source,
    })?;
    check_output(&tmp.0)?;
    fsutil::persist(&tmp.0, dest).map_err(io_err("store", dest))?;
    Ok(())
}

/// The host's apt proxy settings, so that mmdebstrap's private apt goes
/// out the same way the host's does.
fn host_proxy_options() -> Vec<String> {
    let Some(apt_config) = tool::APT_CONFIG.find() else {
        return Vec::new();
    };
    match tool::run(tool::command(apt_config).arg("dump")) {
        Ok(out) => apt::proxy_options(&String::from_utf8_lossy(&out.stdout)),
        Err(e) => {
            tracing::debug!(error = %e, "could not read apt's configuration; no proxy passed on");
            Vec::new()
        }
    }
}

fn check_output(tarball: &Path) -> Result<(), InstallError> {
    let len = fs::metadata(tarball)
        .map_err(io_err("read", tarball))?
        .len();
    if len == 0 {
        return Err(InstallError::Io {
            action: "build",
            path: tarball.to_path_buf(),
            source: std::io::Error::other("the bootstrap tool wrote an empty tarball"),
        });
    }
    Ok(())
}

fn with_debootstrap(
    dir: &Path,
    dest: &Path,
    suite: &str,
    arch: &str,
    sources: &[apt::Source],
) -> Result<(), InstallError> {
    let debootstrap = need(tool::DEBOOTSTRAP)?;
    let tar = need(tool::TAR)?;
    let work = tempfile::Builder::new()
        .prefix(".rootfs-")
        .tempdir_in(dir)
        .map_err(io_err("create a scratch directory in", dir))?;
    let root = work.path().join("root");

    let mut cmd = tool::command(debootstrap);
    cmd.arg("--variant=minbase")
        .arg(format!("--arch={arch}"))
        .arg(format!("--include={INCLUDE}"));
    // debootstrap takes one mirror: the host's entry for the suite itself.
    let main = sources.iter().find(|s| s.suite == suite);
    if let Some(keyring) = main.and_then(|s| {
        s.options
            .split_whitespace()
            .find_map(|o| o.strip_prefix("signed-by="))
    }) {
        cmd.arg(format!("--keyring={keyring}"));
    }
    cmd.arg(suite).arg(&root);
    if let Some(s) = main {
        cmd.arg(&s.uri);
    }
    tool::run(&mut cmd).map_err(|source| InstallError::RootfsFailed {
        suite: suite.to_string(),
        source,
    })?;

    // What mmdebstrap's cleanup would have removed.
    for sub in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        if let Ok(rd) = fs::read_dir(root.join(sub)) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_file()) && e.file_name() != "lock" {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    for f in [
        "var/cache/apt/pkgcache.bin",
        "var/cache/apt/srcpkgcache.bin",
    ] {
        let _ = fs::remove_file(root.join(f));
    }

    let tmp = Scratch(scratch_tarball(dir));
    let mut pack = tool::command(tar);
    pack.args([
        "--create",
        "--gzip",
        "--numeric-owner",
        "--xattrs",
        "--xattrs-include=*",
        "--sort=name",
    ])
    .arg("--file")
    .arg(&tmp.0)
    .arg("--directory")
    .arg(&root)
    .arg(".");
    tool::run(&mut pack).map_err(|source| InstallError::RootfsFailed {
        suite: suite.to_string(),
        source,
    })?;
    check_output(&tmp.0)?;
    fsutil::persist(&tmp.0, dest).map_err(io_err("store", dest))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fallback path, which hosts with mmdebstrap never take.
    /// Run with `cargo test -p machinen --lib -- --ignored debootstrap --nocapture` as root.
    #[test]
    #[ignore = "builds a Debian rootfs with debootstrap (a minute, network, root)"]
    fn debootstrap_fallback_builds_a_rootfs() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("rootfs.tar.gz");
        let suite = apt::host_suite();
        let sources = apt::host_sources(Path::new("/etc/apt"), &suite);
        let t = std::time::Instant::now();
        with_debootstrap(
            dir.path(),
            &dest,
            &suite,
            crate::paths::debian_arch(),
            &sources,
        )
        .expect("debootstrap");
        let size = fs::metadata(&dest).expect("stat").len();
        println!(
            "debootstrap rootfs: {size} bytes in {} ms",
            t.elapsed().as_millis()
        );
        let listing = tool::run(tool::command("tar").arg("-tzf").arg(&dest)).expect("list");
        let listing = String::from_utf8_lossy(&listing.stdout);
        assert!(
            listing.lines().any(|l| l == "./usr/bin/bash"),
            "bash in the rootfs"
        );
        assert!(
            listing.lines().any(|l| l.starts_with("./etc/ssl/certs/")),
            "ca-certificates in the rootfs"
        );
        assert!(!listing
            .lines()
            .any(|l| l.starts_with("./var/cache/apt/archives/") && l.ends_with(".deb")));
        let names: Vec<_> = fs::read_dir(dir.path())
            .expect("ls")
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            names,
            vec![std::ffi::OsString::from("rootfs.tar.gz")],
            "no scratch left"
        );
    }
}
