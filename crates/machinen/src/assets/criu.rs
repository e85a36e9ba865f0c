//! CRIU for the guest (`machinen install --criu`): Debian's `criu` package
//! and the libraries it links, fetched through the host's apt (`apt-get
//! download`, `dpkg-deb -x`, no root needed), plus the kernel modules CRIU
//! probes for that the guest does not load at boot (nf_tables, and the
//! socket-diag modules for unix, netlink, packet and UDP sockets: without
//! them `criu check` and every dump stop at kernel-feature detection).
//!
//! ```text
//! <assets>/criu/
//!   root/usr/sbin/criu            the binary
//!   root/{usr/,}lib/<triplet>/    the libraries it links (libc6 aside: the guest's own)
//!   modules/NN-<name>.ko          the modules, decompressed, in load order
//!   modules.load                  their names, load order
//!   criu.json                     the marker, written last (version, packages)
//! ```
//!
//! The guest's libc is the same Debian release's (the base rootfs is built
//! from the host's suite), so the libraries are the ones the binary was
//! built against; the guest runs it with `LD_LIBRARY_PATH` on these.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{fsutil, io_err, need, tool, Assets, InstallError};
use crate::progress::ProgressMode;

/// The directory under the assets.
pub const CRIU_DIR: &str = "criu";
/// The marker, written last.
pub(crate) const MARKER: &str = "criu.json";
/// Kernel modules CRIU needs beyond what the guest loads at boot.
pub(crate) const MODULES: &[&str] = &[
    "nf_tables",
    "unix_diag",
    "netlink_diag",
    "af_packet_diag",
    "udp_diag",
    "inet_diag",
    "tcp_diag",
];
/// Libraries the guest has of its own (the loader must match them).
const GUEST_OWN: &[&str] = &["libc6", "libgcc-s1"];

/// What `install --criu` left in the assets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CriuInstall {
    /// Where it is (`<assets>/criu`).
    pub dir: PathBuf,
    /// The `criu` package's version.
    pub version: String,
    /// Every package unpacked (criu and its libraries).
    pub packages: Vec<String>,
    /// Modules, in load order.
    pub modules: Vec<String>,
    /// The kernel the modules are for.
    pub kernel_version: String,
}

/// The installed CRIU, if `install --criu` ran for these assets' kernel.
pub fn installed(assets_dir: &Path, assets: &Assets) -> Option<CriuInstall> {
    let dir = assets_dir.join(CRIU_DIR);
    let text = fs::read(dir.join(MARKER)).ok()?;
    let c: CriuInstall = serde_json::from_slice(&text).ok()?;
    (c.kernel_version == assets.kernel_version && dir.join("root/usr/sbin/criu").is_file())
        .then_some(CriuInstall { dir, ..c })
}

/// The package names a `apt-cache depends` listing depends on (first of
/// each alternative; virtual packages, shown `<name>`, skipped).
pub(crate) fn depends_of(listing: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut alternative = false;
    for line in listing.lines() {
        let t = line.trim_start();
        let (is_alt, rest) = match t.strip_prefix('|') {
            Some(r) => (true, r),
            None => (false, t),
        };
        let dep = rest
            .strip_prefix("Depends: ")
            .or_else(|| rest.strip_prefix("PreDepends: "));
        let Some(dep) = dep else {
            continue;
        };
        // The line after an alternative's `|` line is its other choice.
        let take = !alternative;
        alternative = is_alt;
        let name = dep.trim();
        if !take || name.starts_with('<') {
            continue;
        }
        out.insert(name.split(':').next().unwrap_or(name).to_string());
    }
    out
}

/// `criu` and the library packages it needs, recursively through
/// libraries only (its Python tools' dependencies are not wanted).
fn closure() -> Result<BTreeSet<String>, InstallError> {
    let apt_cache = need(tool::APT_CACHE)?;
    let mut all: BTreeSet<String> = BTreeSet::from(["criu".to_string()]);
    let mut round: Vec<String> = vec!["criu".into()];
    while !round.is_empty() {
        let out = tool::run(
            tool::command(&apt_cache)
                .args(["depends", "--no-recommends", "--no-suggests"])
                .args(&round),
        )
        .map_err(|source| match &source {
            tool::ToolError::Failed { stderr_tail, .. }
                if super::apt::looks_like_missing_lists(stderr_tail) =>
            {
                InstallError::PackageUnavailable {
                    package: "criu".into(),
                }
            }
            _ => InstallError::FetchFailed {
                what: "ask apt what criu depends on".into(),
                source,
            },
        })?;
        let deps = depends_of(&String::from_utf8_lossy(&out.stdout));
        round = deps
            .into_iter()
            .filter(|d| d.starts_with("lib") && !GUEST_OWN.contains(&d.as_str()))
            .filter(|d| all.insert(d.clone()))
            .collect();
    }
    Ok(all)
}

/// Fetch CRIU into `<assets>/criu`, replacing what was there.
pub fn install(
    assets_dir: &Path,
    assets: &Assets,
    progress: ProgressMode,
) -> Result<CriuInstall, InstallError> {
    let step = progress.step("Fetching CRIU for the guest (Debian's criu package)");
    let packages = closure()?;
    let work = tempfile::Builder::new()
        .prefix(".criu-")
        .tempdir_in(assets_dir)
        .map_err(io_err("create a scratch directory in", assets_dir))?;
    let names: Vec<&str> = packages.iter().map(String::as_str).collect();
    super::kernel::download_all(&names, work.path())?;
    let dpkg_deb = need(tool::DPKG_DEB)?;
    let stage = work.path().join("criu");
    let root = stage.join("root");
    fs::create_dir_all(&root).map_err(io_err("create", &root))?;
    let mut version = String::new();
    for e in fs::read_dir(work.path())
        .map_err(io_err("read", work.path()))?
        .flatten()
    {
        let deb = e.path();
        if deb.extension().is_none_or(|x| x != "deb") {
            continue;
        }
        tool::run(tool::command(&dpkg_deb).arg("-x").arg(&deb).arg(&root)).map_err(|source| {
            InstallError::FetchFailed {
                what: format!("unpack {}", deb.display()),
                source,
            }
        })?;
        if e.file_name().to_string_lossy().starts_with("criu_") {
            let out = tool::run(
                tool::command(&dpkg_deb)
                    .arg("--field")
                    .arg(&deb)
                    .arg("Version"),
            )
            .map_err(|source| InstallError::FetchFailed {
                what: "read criu's version".into(),
                source,
            })?;
            version = String::from_utf8_lossy(&out.stdout).trim().to_string();
        }
    }
    if !root.join("usr/sbin/criu").is_file() {
        return Err(InstallError::KernelPackageInvalid {
            package: "criu".into(),
            reason: "it holds no usr/sbin/criu".into(),
        });
    }
    // Documentation, manuals and the Python tools stay on the host.
    for extra in ["usr/share", "usr/lib/python3", "usr/bin", "etc"] {
        let _ = fs::remove_dir_all(root.join(extra));
    }

    step.message("Adding the kernel modules CRIU probes for");
    let modules = stage_modules(assets, &stage)?;
    fsutil::syncfs(work.path()).map_err(io_err("flush", work.path()))?;
    let marker = CriuInstall {
        dir: assets_dir.join(CRIU_DIR),
        version,
        packages: packages.into_iter().collect(),
        modules,
        kernel_version: assets.kernel_version.clone(),
    };
    let mut json = serde_json::to_vec_pretty(&marker)
        .map_err(|e| io_err("encode", &stage)(std::io::Error::other(e)))?;
    json.push(b'\n');
    let marker_path = stage.join(MARKER);
    fsutil::write_atomic(&marker_path, &json).map_err(io_err("write", &marker_path))?;
    fsutil::replace_dir(&stage, &marker.dir).map_err(io_err("replace", &marker.dir))?;
    step.done(format!("Fetched CRIU {}", marker.version));
    Ok(marker)
}

/// Copy the modules (and what they depend on) decompressed into
/// `stage/modules`, numbered in load order, with `modules.load`.
fn stage_modules(assets: &Assets, stage: &Path) -> Result<Vec<String>, InstallError> {
    use crate::initramfs::modules;
    let mdir = assets
        .modules_root
        .join("lib/modules")
        .join(&assets.kernel_version);
    let (dep, builtin) = modules::read_tables(&mdir).map_err(|(p, e)| io_err("read", &p)(e))?;
    let list = modules::resolve(&dep, &builtin, MODULES, &[]).map_err(
        |modules::ResolveError::RequiredMissing(m)| InstallError::KernelPackageInvalid {
            package: assets.kernel_version.clone(),
            reason: format!("no module {m}"),
        },
    )?;
    let out = stage.join("modules");
    fs::create_dir_all(&out).map_err(io_err("create", &out))?;
    let mut names = Vec::new();
    let mut load = String::new();
    for (i, m) in list.iter().enumerate() {
        let src = mdir.join(&m.rel);
        let data = modules::read_module(&src).map_err(io_err("read", &src))?;
        let file = format!("{i:02}-{}.ko", m.name);
        let dest = out.join(&file);
        fs::write(&dest, data).map_err(io_err("write", &dest))?;
        load.push_str(&format!("modules/{file}\n"));
        names.push(m.name.clone());
    }
    let lp = stage.join("modules.load");
    fs::write(&lp, load).map_err(io_err("write", &lp))?;
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_takes_the_first_alternative_and_skips_virtual_packages() {
        let listing = "criu\n  Depends: python3-protobuf\n  Depends: <python3:any>\n    python3\n  Depends: libbsd0\n |Depends: libnftables1\n  Depends: libnftables0\n  PreDepends: libc6\n  Recommends: iproute2\nlibbsd0\n  Depends: libmd0:amd64\n";
        let d = depends_of(listing);
        assert_eq!(
            d.into_iter().collect::<Vec<_>>(),
            [
                "libbsd0",
                "libc6",
                "libmd0",
                "libnftables1",
                "python3-protobuf"
            ]
        );
    }
}
