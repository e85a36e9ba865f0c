//! Fetching Debian's cloud kernel through the host's apt: resolve the meta
//! package to the real `linux-image-<ver>-cloud-<arch>`, `apt-get download`
//! it (no root needed), unpack it with `dpkg-deb -x`, keep `vmlinuz` and the
//! module tree, and index the modules (`modules.dep`).

use std::fs;
use std::path::{Path, PathBuf};

use super::{apt, fsutil, io_err, need, tool, InstallError, KERNEL, MODULES};
use crate::assets::tool::ToolError;
use crate::progress::ProgressMode;

pub(super) struct FetchedKernel {
    pub version: String,
    pub package: String,
    pub package_version: String,
}

/// Fetch the kernel into `dir` (`vmlinuz`, `modules/`), replacing what was
/// there. `apt_updated` is set when apt's lists had to be refreshed.
pub(super) fn fetch(
    dir: &Path,
    arch: &str,
    progress: ProgressMode,
    apt_updated: &mut bool,
) -> Result<FetchedKernel, InstallError> {
    let meta = apt::kernel_meta_package(arch);
    let step = progress.step(format!("Fetching Debian's cloud kernel ({meta})"));
    let work = tempfile::Builder::new()
        .prefix(".kernel-")
        .tempdir_in(dir)
        .map_err(io_err("create a scratch directory in", dir))?;

    let mut package = resolve_package(arch, progress, apt_updated)?;
    step.message(format!("Downloading {package}"));
    if let Err(e) = download(&package, work.path()) {
        // Lists older than the archive name a version that is gone (404).
        // As root, refresh them once and try again.
        if !tool::is_root() || *apt_updated {
            return Err(e);
        }
        tracing::warn!(error = %e, "kernel download failed; refreshing apt's package lists and retrying");
        apt_update(progress)?;
        *apt_updated = true;
        package = resolve_package(arch, progress, apt_updated)?;
        download(&package, work.path())?;
    }
    let deb = find_deb(work.path(), &package)?;

    let dpkg_deb = need(tool::DPKG_DEB)?;
    let fields = tool::run(
        tool::command(&dpkg_deb)
            .args(["--field"])
            .arg(&deb)
            .arg("Version"),
    )
    .map_err(|source| InstallError::FetchFailed {
        what: format!("read the version of {package}"),
        source,
    })?;
    let package_version = String::from_utf8_lossy(&fields.stdout).trim().to_string();

    step.message(format!("Unpacking {package}"));
    let root = work.path().join("root");
    tool::run(tool::command(&dpkg_deb).arg("-x").arg(&deb).arg(&root)).map_err(|source| {
        InstallError::FetchFailed {
            what: format!("unpack {package}"),
            source,
        }
    })?;
    let _ = fs::remove_file(&deb);

    let (version, modules_dir) = locate_modules(&root, &package)?;
    let vmlinuz = root.join("boot").join(format!("vmlinuz-{version}"));
    if !vmlinuz.is_file() {
        return Err(invalid(&package, format!("no boot/vmlinuz-{version}")));
    }

    // Debian's packages leave modules.dep to depmod in their postinst.
    let dep_path = modules_dir.join("modules.dep");
    if !dep_path.is_file() {
        step.message(format!("Indexing the modules of {version}"));
        let dep = crate::initramfs::generate_modules_dep(&modules_dir)
            .map_err(io_err("index", &modules_dir))?;
        fs::write(&dep_path, dep).map_err(io_err("write", &dep_path))?;
    }

    let staged = work.path().join(MODULES);
    let staged_parent = staged.join("lib/modules");
    fs::create_dir_all(&staged_parent).map_err(io_err("create", &staged_parent))?;
    fs::rename(&modules_dir, staged_parent.join(&version)).map_err(io_err("move", &modules_dir))?;
    // One flush for the thousand module files, then the renames.
    fsutil::syncfs(work.path()).map_err(io_err("flush", work.path()))?;
    let dest_modules = dir.join(MODULES);
    fsutil::replace_dir(&staged, &dest_modules).map_err(io_err("replace", &dest_modules))?;
    let dest_kernel = dir.join(KERNEL);
    fsutil::persist(&vmlinuz, &dest_kernel).map_err(io_err("store", &dest_kernel))?;
    drop(work);

    step.done(format!(
        "Fetched kernel {version} ({package} {package_version})"
    ));
    Ok(FetchedKernel {
        version,
        package,
        package_version,
    })
}

fn invalid(package: &str, reason: impl Into<String>) -> InstallError {
    InstallError::KernelPackageInvalid {
        package: package.to_string(),
        reason: reason.into(),
    }
}

/// The real kernel package behind the meta package, refreshing apt's lists
/// once (root only) when apt has none.
fn resolve_package(
    arch: &str,
    progress: ProgressMode,
    apt_updated: &mut bool,
) -> Result<String, InstallError> {
    let apt_cache = need(tool::APT_CACHE)?;
    let meta = apt::kernel_meta_package(arch);
    loop {
        match tool::run(tool::command(&apt_cache).arg("depends").arg(&meta)) {
            Ok(out) => {
                let text = String::from_utf8_lossy(&out.stdout);
                return apt::kernel_package_from_depends(&text, arch).ok_or_else(|| {
                    invalid(
                        &meta,
                        format!("it depends on no linux-image-*-cloud-{arch} package"),
                    )
                });
            }
            Err(ToolError::Failed {
                ref stderr_tail, ..
            }) if apt::looks_like_missing_lists(stderr_tail) => {
                if lists_present() {
                    return Err(InstallError::PackageUnavailable { package: meta });
                }
                if !tool::is_root() || *apt_updated {
                    return Err(InstallError::AptListsMissing { package: meta });
                }
                tracing::warn!("apt has no package lists; running `apt-get update` once");
                apt_update(progress)?;
                *apt_updated = true;
            }
            Err(source) => {
                return Err(InstallError::FetchFailed {
                    what: format!("ask apt about {meta}"),
                    source,
                })
            }
        }
    }
}

/// Whether apt has any package index at all (its lists directory holds a
/// `*_Packages*` file).
fn lists_present() -> bool {
    let dir = tool::APT_CONFIG
        .find()
        .and_then(|c| tool::run(tool::command(c).args(["shell", "D", "Dir::State::lists/d"])).ok())
        .and_then(|o| {
            let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
            s.strip_prefix("D='")
                .and_then(|r| r.strip_suffix('\''))
                .map(PathBuf::from)
        })
        .unwrap_or_else(|| PathBuf::from("/var/lib/apt/lists"));
    fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
        })
        .unwrap_or(false)
}

fn apt_update(progress: ProgressMode) -> Result<(), InstallError> {
    let apt_get = need(tool::APT_GET)?;
    let step = progress.step("Updating apt's package lists (`apt-get update`)");
    tool::run(tool::command(apt_get).args(["-q", "update"])).map_err(|source| {
        InstallError::FetchFailed {
            what: "update apt's package lists".into(),
            source,
        }
    })?;
    step.done("Updated apt's package lists");
    Ok(())
}

fn download(package: &str, into: &Path) -> Result<(), InstallError> {
    download_all(&[package], into)
}

/// `apt-get download` the packages into `into` (no root needed).
pub(super) fn download_all(packages: &[&str], into: &Path) -> Result<(), InstallError> {
    let apt_get = need(tool::APT_GET)?;
    let mut cmd = tool::command(apt_get);
    cmd.current_dir(into).args(["-q", "download"]);
    if tool::is_root() {
        // The scratch directory is private to us, so apt's unprivileged
        // download user could not write there; apt would fall back to root
        // anyway, with a warning. Say so up front instead.
        cmd.args(["-o", "APT::Sandbox::User=root"]);
    }
    cmd.args(packages);
    tool::run(&mut cmd).map_err(|source| InstallError::FetchFailed {
        what: format!("download {}", packages.join(" ")),
        source,
    })?;
    Ok(())
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, InstallError> {
    let debs: Vec<PathBuf> = fs::read_dir(dir)
        .map_err(io_err("read", dir))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "deb"))
        .collect();
    match debs.as_slice() {
        [one] => Ok(one.clone()),
        _ => Err(invalid(
            package,
            format!("apt-get download left {} .deb files", debs.len()),
        )),
    }
}

/// The kernel release and its module directory inside an unpacked package
/// (`lib/modules/<ver>`, or `usr/lib/modules/<ver>` on merged-/usr layouts).
fn locate_modules(root: &Path, package: &str) -> Result<(String, PathBuf), InstallError> {
    let expected = apt::kernel_release_from_package(package);
    let mut found = Vec::new();
    for base in ["lib/modules", "usr/lib/modules"] {
        let Ok(rd) = fs::read_dir(root.join(base)) else {
            continue;
        };
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                found.push((e.file_name().to_string_lossy().into_owned(), e.path()));
            }
        }
    }
    if let Some(exp) = expected {
        if let Some(hit) = found.iter().find(|(v, _)| v == exp) {
            return Ok(hit.clone());
        }
    }
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(invalid(package, "no lib/modules/<version> directory")),
        _ => Err(invalid(
            package,
            "more than one lib/modules/<version> directory",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_modules_in_either_layout() {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("usr/lib/modules/6.12.1-cloud-amd64/kernel"))
            .expect("mkdir");
        let (v, p) = locate_modules(dir.path(), "linux-image-6.12.1-cloud-amd64").expect("found");
        assert_eq!(v, "6.12.1-cloud-amd64");
        assert!(p.ends_with("usr/lib/modules/6.12.1-cloud-amd64"));

        fs::create_dir_all(dir.path().join("lib/modules/other")).expect("mkdir");
        let (v, _) = locate_modules(dir.path(), "linux-image-6.12.1-cloud-amd64").expect("found");
        assert_eq!(v, "6.12.1-cloud-amd64", "the package's own release wins");
        assert!(matches!(
            locate_modules(dir.path(), "linux-image-9-cloud-amd64"),
            Err(InstallError::KernelPackageInvalid { .. })
        ));
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(locate_modules(empty.path(), "linux-image-9-cloud-amd64").is_err());
    }
}
