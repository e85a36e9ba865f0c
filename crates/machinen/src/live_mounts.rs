//! Live mounts: host directories shared with a running VM
//! (`boot --mount-live HOST_DIR:GUEST_PATH[:ro|rw]`).
//!
//! Each live mount is a virtio-fs device served by its own `virtiofsd`,
//! which the VM's supervisor starts before QEMU on a listening socket it
//! made itself, and which exits with its QEMU:
//!
//! ```text
//! <vm>/live<i>.sock   the vhost-user socket QEMU's `vhost-user-fs-device` uses
//! <vm>/live<i>.log    virtiofsd's log
//! ```
//!
//! The guest mounts tag [`tag`]`(i)` at the guest path (the kernel command
//! line names it: `machinen.live=i:rw:/work`). Host and guest see each
//! other's changes: the guest's writes reach the host file at once, the
//! host's are seen by the guest within virtiofsd's one-second cache
//! timeout (`--cache auto`).
//!
//! **Confinement.** virtiofsd resolves every guest path inside its own
//! mount namespace, whose root is HOST_DIR (`--sandbox namespace`), so no
//! symlink, `..` or rename race reaches outside HOST_DIR. It acts on the
//! share with one identity, [`Identity`]: the user running machinen, or,
//! when that is root, the owner of HOST_DIR (an unprivileged virtiofsd
//! runs in a user namespace of its own). Every guest uid and gid is
//! squashed onto that identity, so whatever the guest creates is owned by
//! it, and a setuid bit can only make a file run as it. Device nodes are
//! refused (`--modcaps=-mknod`). Sharing a root-owned directory while
//! running machinen as root gives the guest root's rights *inside* that
//! directory (docs/mounts.md).
//!
//! **Snapshots.** The device's state (the guest's open files, by path
//! inside the share) travels in the migration stream (QEMU 8.2+ with a
//! virtiofsd that offers it). A restore starts a fresh virtiofsd on the
//! recorded or remapped host directory, with `--migration-on-error
//! guest-error`: a file that vanished from the share meanwhile reads as an
//! error in the guest instead of failing the restore. vhost-user needs the
//! guest's RAM in a shared file, so a VM with live mounts always has RAM of
//! its own (restores and forks of it copy the bundle's RAM).

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{fail, ErrorCode, Failure};

/// Live mounts per VM: one virtio-mmio slot and one virtiofsd each.
pub const MAX_LIVE_MOUNTS: usize = 8;
/// The virtio-fs tag of live mount `i` (at most 36 bytes).
pub fn tag(i: usize) -> String {
    format!("{}{i}", machinen_proto::LIVE_MOUNT_TAG_PREFIX)
}
/// vhost-user socket of live mount `i` in the VM's registry directory.
pub fn socket_name(i: usize) -> String {
    format!("live{i}.sock")
}
/// virtiofsd's log of live mount `i` in the VM's registry directory.
pub fn log_name(i: usize) -> String {
    format!("live{i}.log")
}

/// One live mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveMount {
    /// The host directory (absolute).
    pub host: PathBuf,
    /// Where the guest sees it.
    pub guest: String,
    /// Guest writes fail with `EROFS`.
    #[serde(default)]
    pub readonly: bool,
}

/// The live mounts of a VM as its supervisor sees them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveShares {
    /// The virtiofsd program (found by the library, so a missing one fails
    /// before anything starts).
    pub virtiofsd: PathBuf,
    /// Mount `i` is device `i`, tag [`tag`]`(i)`.
    pub mounts: Vec<LiveMount>,
}

/// A live mount as given (`HOST_DIR:GUEST_PATH[:ro|rw]`): on a restore the
/// mode may be left out (the recorded one stays).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveMountArg {
    pub host: PathBuf,
    pub guest: String,
    /// `None`: read-write on a boot, as recorded on a restore.
    #[serde(default)]
    pub readonly: Option<bool>,
}

impl std::str::FromStr for LiveMountArg {
    type Err = Failure;

    /// `HOST_DIR:GUEST_PATH[:ro|rw]`; the host path may hold colons.
    fn from_str(s: &str) -> Result<LiveMountArg, Failure> {
        let bad = || {
            fail(
                ErrorCode::BootMountInvalid,
                format!("live mount {s:?} is not HOST_DIR:GUEST_PATH[:ro|rw]"),
            )
            .hint("e.g. --mount-live ./src:/work/src or --mount-live /data:/data:ro")
        };
        let (rest, readonly) = match s.rsplit_once(':') {
            Some((rest, "ro")) => (rest, Some(true)),
            Some((rest, "rw")) => (rest, Some(false)),
            _ => (s, None),
        };
        let (host, guest) = rest.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || guest.is_empty() {
            return Err(bad());
        }
        Ok(LiveMountArg {
            host: PathBuf::from(host),
            guest: guest.to_string(),
            readonly,
        })
    }
}

impl std::fmt::Display for LiveMount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = if self.readonly { "ro" } else { "rw" };
        write!(f, "{}:{}:{mode}", self.host.display(), self.guest)
    }
}

/// An existing host directory, made absolute; a missing one is
/// `BOOT_MOUNT_HOST_NOT_FOUND` naming it (and the guest path it serves).
fn host_dir(host: &Path, guest: &str) -> Result<PathBuf, Failure> {
    crate::mounts::host_dir(host, "live mount source", &format!(" (for {guest})")).map_err(|e| {
        if e.code == ErrorCode::BootMountHostNotFound {
            e.hint("give an existing host directory (relative paths are from the current directory); a restore can point the guest path elsewhere with --mount-live NEW_HOST_DIR:GUEST_PATH")
        } else {
            e
        }
    })
}

/// Check the live mounts of a boot: at most [`MAX_LIVE_MOUNTS`], valid guest
/// paths none of which is another's (copy-once mounts included) or below
/// it, existing host directories.
pub fn check(live: &[LiveMountArg], copy_once: &[String]) -> Result<Vec<LiveMount>, Failure> {
    if live.len() > MAX_LIVE_MOUNTS {
        return Err(fail(
            ErrorCode::BootMountInvalid,
            format!(
                "{} live mounts asked for; a VM has at most {MAX_LIVE_MOUNTS}",
                live.len()
            ),
        )
        .hint("share a common parent directory instead"));
    }
    let mut guests: Vec<String> = copy_once.to_vec();
    let mut out = Vec::with_capacity(live.len());
    for m in live {
        crate::mounts::validate_guest_path(&m.guest)?;
        if let Some(other) = guests
            .iter()
            .find(|g| crate::mounts::nested(g, &m.guest) || crate::mounts::nested(&m.guest, g))
        {
            return Err(fail(
                ErrorCode::BootMountInvalid,
                format!("guest mount paths {other} and {} overlap", m.guest),
            )
            .hint("give each mount a guest path of its own, none inside another"));
        }
        guests.push(m.guest.clone());
        out.push(LiveMount {
            host: host_dir(&m.host, &m.guest)?,
            guest: m.guest.clone(),
            readonly: m.readonly.unwrap_or(false),
        });
    }
    Ok(out)
}

/// The live mounts of a boot, checked, guarded and with their server
/// found (`None` when there are none).
pub fn for_boot(
    live: &[LiveMountArg],
    copy_once: &[crate::mounts::Mount],
    paths: &crate::paths::Paths,
) -> Result<Option<LiveShares>, Failure> {
    if live.is_empty() {
        return Ok(None);
    }
    let guests: Vec<String> = copy_once.iter().map(|m| m.guest.clone()).collect();
    let mounts = check(live, &guests)?;
    guard(&mounts, paths)?;
    Ok(Some(LiveShares {
        virtiofsd: find_virtiofsd()?,
        mounts,
    }))
}

/// The live mounts of a restore of a bundle that recorded `recorded`
/// (see [`remap`]).
pub fn for_restore(
    recorded: &[LiveMount],
    overrides: &[LiveMountArg],
    paths: &crate::paths::Paths,
) -> Result<Option<LiveShares>, Failure> {
    let mounts = remap(recorded, overrides)?;
    if mounts.is_empty() {
        return Ok(None);
    }
    guard(&mounts, paths)?;
    Ok(Some(LiveShares {
        virtiofsd: find_virtiofsd()?,
        mounts,
    }))
}

/// Refuse a share that would hand the guest machinen's own state: the
/// root directory, or a directory that is or holds (or lies inside) the
/// VM registry, the cache and images, or the RAM directory. Through any of
/// them a guest could rewrite other VMs' disks, RAM or bundles.
pub fn guard(mounts: &[LiveMount], paths: &crate::paths::Paths) -> Result<(), Failure> {
    let own: Vec<PathBuf> = [
        Some(paths.home.clone()),
        Some(paths.assets.clone()),
        Some(paths.cache.clone()),
        Some(paths.registry.clone()),
        crate::ramdir::ram_dir(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|p| fs::canonicalize(p).ok())
    .collect();
    for m in mounts {
        let hit = own
            .iter()
            .find(|p| m.host.starts_with(p) || p.starts_with(&m.host));
        if m.host == Path::new("/") || hit.is_some() {
            let what = hit.map_or_else(|| "/".to_string(), |p| p.display().to_string());
            return Err(fail(
                ErrorCode::MountPathEscape,
                format!(
                    "live mount source {} would give the guest machinen's own files ({what})",
                    m.host.display()
                ),
            )
            .hint("share a directory that neither holds nor lies inside machinen's home, cache, registry or RAM directory"));
        }
    }
    Ok(())
}

/// The live mounts of a restore: the bundle's, with `overrides` pointing
/// guest paths at other host directories (and, if they say so, another
/// mode). An override for a guest path the bundle has no live mount at is
/// `BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN`; every host directory must exist.
pub fn remap(
    recorded: &[LiveMount],
    overrides: &[LiveMountArg],
) -> Result<Vec<LiveMount>, Failure> {
    for o in overrides {
        if !recorded.iter().any(|r| r.guest == o.guest) {
            let known: Vec<&str> = recorded.iter().map(|r| r.guest.as_str()).collect();
            return Err(fail(
                ErrorCode::BootLiveMountOverrideUnknown,
                format!("the snapshot has no live mount at {}", o.guest),
            )
            .hint(if known.is_empty() {
                "the snapshot's VM had no live mounts; leave --mount-live out".to_string()
            } else {
                format!("its live mounts are at {}", known.join(", "))
            }));
        }
    }
    recorded
        .iter()
        .map(|r| {
            let o = overrides.iter().rev().find(|o| o.guest == r.guest);
            let host = o.map_or(&r.host, |o| &o.host);
            Ok(LiveMount {
                host: host_dir(host, &r.guest)?,
                guest: r.guest.clone(),
                readonly: o.and_then(|o| o.readonly).unwrap_or(r.readonly),
            })
        })
        .collect()
}

/// The kernel command line's words naming the live mounts:
/// `machinen.live=I:ro|rw:PATH`.
pub fn cmdline_words(mounts: &[LiveMount]) -> Vec<String> {
    mounts
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let mode = if m.readonly { "ro" } else { "rw" };
            format!("machinen.live={i}:{mode}:{}", m.guest)
        })
        .collect()
}

/// Who virtiofsd acts as on the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
}

/// The identity for sharing `host`: the caller's, or, when the caller is
/// root, the directory's owner (root only for a root-owned directory).
pub fn identity(host: &Path) -> std::io::Result<Identity> {
    use std::os::unix::fs::MetadataExt;
    let (uid, gid) = (nix::unistd::geteuid(), nix::unistd::getegid());
    if !uid.is_root() {
        return Ok(Identity {
            uid: uid.as_raw(),
            gid: gid.as_raw(),
        });
    }
    let md = fs::metadata(host)?;
    Ok(Identity {
        uid: md.uid(),
        gid: md.gid(),
    })
}

/// The virtiofsd program: `MACHINEN_VIRTIOFSD`, `virtiofsd` on `PATH`,
/// Debian's `/usr/libexec/virtiofsd`, or a `cargo install`ed one.
pub fn find_virtiofsd() -> Result<PathBuf, Failure> {
    if let Some(p) = std::env::var_os(machinen_proto::env::VIRTIOFSD) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(fail(
                ErrorCode::BootEngineMissing,
                format!(
                    "{} names {}, which is not a file",
                    machinen_proto::env::VIRTIOFSD,
                    p.display()
                ),
            ))
        };
    }
    let in_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let cargo = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|c| c.join("bin/virtiofsd"));
    in_path
        .into_iter()
        .chain([
            PathBuf::from("/usr/libexec/virtiofsd"),
            PathBuf::from("/usr/lib/qemu/virtiofsd"),
        ])
        .chain(cargo)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            fail(ErrorCode::BootEngineMissing, "virtiofsd not found (live mounts need it)").hint(
                "install it: `apt-get install virtiofsd` (Debian 13), or `apt-get install libcap-ng-dev libseccomp-dev && cargo install --locked virtiofsd` (Debian 12); or set MACHINEN_VIRTIOFSD; `--mount` copies a directory in without it",
            )
        })
}

/// virtiofsd's arguments for live mount `m`, serving the listening socket
/// on descriptor `fd`. `restoring`: the VM resumes a snapshot, and paths
/// the guest held that are gone from the share become guest errors.
pub fn virtiofsd_args(m: &LiveMount, fd: i32, restoring: bool, who: Identity) -> Vec<String> {
    let (uid, gid) = (who.uid, who.gid);
    let mut a = vec![
        format!("--fd={fd}"),
        format!("--shared-dir={}", m.host.display()),
        "--sandbox=namespace".into(),
        // Entries and attributes are trusted for 1 s: the host's changes
        // show in the guest within that.
        "--cache=auto".into(),
        // Every guest identity acts as virtiofsd's own (see the module
        // docs): no guest uid can become another host uid. And what that
        // identity owns on the host the guest sees as root's, so the
        // guest's tools (git's ownership check, say) take it as their own.
        format!("--translate-uid=squash-guest:0:{uid}:4294967295"),
        format!("--translate-gid=squash-guest:0:{gid}:4294967295"),
        format!("--translate-uid=host:{uid}:0:1"),
        format!("--translate-gid=host:{gid}:0:1"),
        "--modcaps=-mknod".into(),
        "--migration-mode=find-paths".into(),
        "--log-level=warn".into(),
    ];
    if restoring {
        a.push("--migration-on-error=guest-error".into());
    }
    if m.readonly {
        a.push("--readonly".into());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mode_and_colons_in_host_paths() {
        let m: LiveMountArg = "/a:b/c:/work:ro".parse().expect("parse");
        assert_eq!(
            m,
            LiveMountArg {
                host: "/a:b/c".into(),
                guest: "/work".into(),
                readonly: Some(true)
            }
        );
        let m: LiveMountArg = "./src:/work/src".parse().expect("parse");
        assert_eq!(m.readonly, None);
        assert_eq!(m.host, PathBuf::from("./src"));
        let m: LiveMountArg = "/x:/y:rw".parse().expect("parse");
        assert_eq!(m.readonly, Some(false));
        for bad in ["", "/a", ":/x", "/a:", "/a:ro", "nocolon", ":ro"] {
            let e = bad.parse::<LiveMountArg>().expect_err(bad);
            assert_eq!(e.code, ErrorCode::BootMountInvalid, "{bad}");
        }
    }

    #[test]
    fn check_refuses_overlaps_missing_dirs_and_too_many() {
        let dir = tempfile::tempdir().expect("tmp");
        let d = dir.path().to_str().expect("utf-8");
        let arg = |s: String| s.parse::<LiveMountArg>().expect("parse");
        let ok = check(&[arg(format!("{d}:/work:ro"))], &[]).expect("check");
        assert!(ok[0].readonly && ok[0].host.is_absolute());
        let e = check(&[arg(format!("{d}:/work/src"))], &["/work".into()]).expect_err("overlap");
        assert_eq!(e.code, ErrorCode::BootMountInvalid);
        let e = check(&[arg(format!("{d}/nope:/work"))], &[]).expect_err("missing");
        assert_eq!(e.code, ErrorCode::BootMountHostNotFound);
        assert!(e.message.contains("nope"), "{}", e.message);
        let e = check(&[arg(format!("{d}:/etc"))], &[]).expect_err("system dir");
        assert_eq!(e.code, ErrorCode::MountPathInvalid);
        let many: Vec<_> = (0..=MAX_LIVE_MOUNTS)
            .map(|i| arg(format!("{d}:/m{i}")))
            .collect();
        assert_eq!(
            check(&many, &[]).expect_err("many").code,
            ErrorCode::BootMountInvalid
        );
    }

    #[test]
    fn remap_points_known_guest_paths_elsewhere_only() {
        let a = tempfile::tempdir().expect("tmp");
        let b = tempfile::tempdir().expect("tmp");
        let recorded = vec![LiveMount {
            host: a.path().to_path_buf(),
            guest: "/work".into(),
            readonly: true,
        }];
        let same = remap(&recorded, &[]).expect("same");
        assert_eq!(same[0].host, fs::canonicalize(a.path()).expect("canon"));
        let o: LiveMountArg = format!("{}:/work", b.path().display())
            .parse()
            .expect("parse");
        let moved = remap(&recorded, &[o]).expect("moved");
        assert_eq!(moved[0].host, fs::canonicalize(b.path()).expect("canon"));
        assert!(moved[0].readonly, "the recorded mode stays");
        let o: LiveMountArg = format!("{}:/other", b.path().display())
            .parse()
            .expect("parse");
        let e = remap(&recorded, &[o]).expect_err("unknown");
        assert_eq!(e.code, ErrorCode::BootLiveMountOverrideUnknown);
        assert!(e.hint.as_deref().unwrap_or("").contains("/work"));
        let gone = vec![LiveMount {
            host: a.path().join("gone"),
            ..recorded[0].clone()
        }];
        let e = remap(&gone, &[]).expect_err("gone");
        assert_eq!(e.code, ErrorCode::BootMountHostNotFound);
        assert!(e.message.contains("gone"), "{}", e.message);
    }

    #[test]
    fn cmdline_and_virtiofsd_arguments() {
        let m = LiveMount {
            host: "/srv/share".into(),
            guest: "/work".into(),
            readonly: true,
        };
        assert_eq!(
            cmdline_words(std::slice::from_ref(&m)),
            ["machinen.live=0:ro:/work"]
        );
        let who = Identity {
            uid: 1000,
            gid: 100,
        };
        let a = virtiofsd_args(&m, 3, true, who);
        for want in [
            "--fd=3",
            "--shared-dir=/srv/share",
            "--sandbox=namespace",
            "--readonly",
            "--modcaps=-mknod",
            "--migration-on-error=guest-error",
            "--translate-uid=squash-guest:0:1000:4294967295",
            "--translate-gid=host:100:0:1",
        ] {
            assert!(a.iter().any(|x| x == want), "{want} in {a:?}");
        }
        let rw = LiveMount {
            readonly: false,
            ..m
        };
        let a = virtiofsd_args(&rw, 3, false, who);
        assert!(!a
            .iter()
            .any(|x| x == "--readonly" || x.starts_with("--migration-on-error")));
        assert!(tag(MAX_LIVE_MOUNTS - 1).len() <= 36);
    }
}
