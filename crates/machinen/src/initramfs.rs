//! The initramfs: the guest agent as `/init` plus the kernel modules it loads.
//!
//! Layout of the archive (newc cpio, uncompressed):
//!
//! ```text
//! /init                                   the agent (0755)
//! /dev/console  /dev/null                 character devices (5,1) and (1,3)
//! /proc /sys /newroot                     mount points for the agent
//! /lib/modules/<ver>/kernel/…/*.ko        the modules, decompressed
//! /etc/machinen/modules.load              their absolute paths, load order
//! ```
//!
//! Cached as `<cache>/initramfs/<key>.cpio`, the key being a sha256 over the
//! format version, the agent's bytes, the kernel version and the module list,
//! so a rebuilt agent or a new kernel gets a new archive and nothing stale is
//! ever booted.
//!
//! Uncompressed on purpose: under TCG the guest kernel's gunzip runs
//! emulated, which costs more than QEMU reading a few more MiB from the host.

mod cpio;
pub(crate) mod modules;

pub(crate) use modules::generate_modules_dep;

use std::fs;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::assets::{fsutil, Assets};
use crate::image::ImageError;
use crate::paths::Paths;
use cpio::CpioWriter;

/// Bumped whenever the archive's layout changes, so old caches are not used.
const FORMAT_VERSION: u32 = 1;

/// Where the module load list lives inside the initramfs.
pub const MODULES_LOAD_PATH: &str = "/etc/machinen/modules.load";

/// Build (or reuse from the cache) the initramfs for `assets` with
/// `agent` as `/init`. Returns the cpio path.
pub fn ensure_initramfs(
    paths: &Paths,
    assets: &Assets,
    agent: &Path,
) -> Result<PathBuf, ImageError> {
    let agent_bytes = fs::read(agent).map_err(|source| ImageError::AgentUnreadable {
        path: agent.to_path_buf(),
        source,
    })?;
    let modules_dir = assets
        .modules_root
        .join("lib/modules")
        .join(&assets.kernel_version);
    let mods = wanted_modules(&modules_dir, &assets.kernel_version)?;

    let mut h = Sha256::new();
    h.update(FORMAT_VERSION.to_le_bytes());
    h.update((agent_bytes.len() as u64).to_le_bytes());
    h.update(&agent_bytes);
    h.update(assets.kernel_version.as_bytes());
    h.update([0]);
    for m in &mods {
        let p = modules_dir.join(&m.rel);
        let len = fs::metadata(&p)
            .map_err(|source| modules_unreadable(assets, &p, source))?
            .len();
        h.update(m.rel.as_bytes());
        h.update([0]);
        h.update(len.to_le_bytes());
    }
    let key = hex::encode(h.finalize());

    let dir = paths.cache.join("initramfs");
    let dest = dir.join(format!("{key}.cpio"));
    if dest.is_file() {
        return Ok(dest);
    }
    let io_err = |action: &'static str, path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::InitramfsIo {
            action,
            path,
            source,
        }
    };
    fs::create_dir_all(&dir).map_err(io_err("create", &dir))?;
    let lock_path = dir.join(format!("{key}.lock"));
    let _lock = fsutil::lock_exclusive(&lock_path).map_err(io_err("lock", &lock_path))?;
    if dest.is_file() {
        return Ok(dest);
    }

    // Modules are read (and decompressed) before the file is opened so that
    // a bad module is reported as such, not as a failed write.
    let mut contents = Vec::with_capacity(mods.len());
    for m in &mods {
        let p = modules_dir.join(&m.rel);
        let data =
            modules::read_module(&p).map_err(|source| modules_unreadable(assets, &p, source))?;
        contents.push((modules::uncompressed_rel(&m.rel).to_string(), data));
    }
    fsutil::write_atomic_with(&dest, |f| {
        let w = write_archive(
            BufWriter::new(f),
            &agent_bytes,
            &assets.kernel_version,
            &contents,
        )?;
        w.into_inner().map_err(|e| e.into_error())?;
        Ok(())
    })
    .map_err(io_err("write", &dest))?;
    tracing::info!(path = %dest.display(), modules = mods.len(), "built initramfs");
    Ok(dest)
}

fn modules_unreadable(assets: &Assets, path: &Path, source: io::Error) -> ImageError {
    ImageError::ModulesUnreadable {
        kernel_version: assets.kernel_version.clone(),
        path: path.to_path_buf(),
        source,
    }
}

/// The modules the guest loads, from the installed tree's `modules.dep`
/// and `modules.builtin`.
fn wanted_modules(
    modules_dir: &Path,
    kernel_version: &str,
) -> Result<Vec<modules::Module>, ImageError> {
    let (dep, builtin) = modules::read_tables(modules_dir).map_err(|(path, source)| {
        ImageError::ModulesUnreadable {
            kernel_version: kernel_version.to_string(),
            path,
            source,
        }
    })?;
    modules::resolve(&dep, &builtin, modules::WANTED, modules::REQUIRED).map_err(
        |modules::ResolveError::RequiredMissing(module)| ImageError::RequiredModuleMissing {
            kernel_version: kernel_version.to_string(),
            module,
        },
    )
}

/// Write the whole archive: directories first (each before its children),
/// device nodes, `/init`, the modules and their load list.
fn write_archive<W: Write>(
    w: W,
    agent: &[u8],
    kernel_version: &str,
    modules: &[(String, Vec<u8>)],
) -> io::Result<W> {
    let mut a = CpioWriter::new(w);
    let base = format!("lib/modules/{kernel_version}");
    let mut dirs: Vec<String> = [
        "dev",
        "proc",
        "sys",
        "newroot",
        "etc",
        "etc/machinen",
        "lib",
        "lib/modules",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    dirs.push(base.clone());
    for (rel, _) in modules {
        let mut parent = Path::new(rel).parent();
        let mut chain = Vec::new();
        while let Some(p) = parent.filter(|p| !p.as_os_str().is_empty()) {
            chain.push(format!("{base}/{}", p.display()));
            parent = p.parent();
        }
        for d in chain.into_iter().rev() {
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
    for d in &dirs {
        let mode = if d == "proc" || d == "sys" {
            0o555
        } else {
            0o755
        };
        a.dir(d, mode)?;
    }
    a.char_dev("dev/console", 0o600, 5, 1)?;
    a.char_dev("dev/null", 0o666, 1, 3)?;
    a.file("init", 0o755, agent)?;
    let mut load = String::new();
    for (rel, data) in modules {
        a.file(&format!("{base}/{rel}"), 0o644, data)?;
        load.push_str(&format!("/{base}/{rel}\n"));
    }
    a.file(
        MODULES_LOAD_PATH.trim_start_matches('/'),
        0o644,
        load.as_bytes(),
    )?;
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::cpio::{parse, S_IFCHR, S_IFDIR, S_IFREG};
    use super::modules::tests_support::{self, fake_module};
    use super::*;
    use crate::error::{Coded, ErrorCode};

    const VER: &str = "6.1.0-99-cloud-amd64";

    /// A fake installed kernel tree with the modules the guest wants.
    fn fake_assets(root: &Path, with_console: bool) -> Assets {
        let mdir = root.join("modules/lib/modules").join(VER);
        let put = |rel: &str, data: &[u8]| tests_support::put(&mdir, rel, data);
        tests_support::put_virtio_core(&mdir, "virtio,virtio_ring");
        if with_console {
            put(
                "kernel/drivers/char/virtio_console.ko",
                &fake_module("virtio_console", "virtio,virtio_ring"),
            );
        }
        put(
            "kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko",
            &fake_module("vmw_vsock_virtio_transport", "virtio"),
        );
        put(
            "modules.builtin",
            b"kernel/fs/ext4/ext4.ko\nkernel/fs/jbd2/jbd2.ko\n",
        );
        let dep = generate_modules_dep(&mdir).expect("depmod");
        put("modules.dep", dep.as_bytes());
        Assets {
            kernel: root.join("vmlinuz"),
            kernel_version: VER.into(),
            modules_root: root.join("modules"),
            rootfs: root.join("rootfs.tar.gz"),
        }
    }

    #[test]
    fn builds_parses_and_caches() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::rooted(dir.path());
        let assets = fake_assets(&dir.path().join("assets"), true);
        let agent = dir.path().join("agent");
        fs::write(&agent, b"\x7fELF pretend agent").expect("agent");

        let p = ensure_initramfs(&paths, &assets, &agent).expect("initramfs");
        assert!(
            p.starts_with(paths.cache.join("initramfs"))
                && p.extension().is_some_and(|e| e == "cpio")
        );
        let entries = parse(&fs::read(&p).expect("read")).expect("parse");
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.name == n)
                .unwrap_or_else(|| panic!("no {n}"))
        };
        assert_eq!(get("init").mode, S_IFREG | 0o755);
        assert_eq!(get("init").data, b"\x7fELF pretend agent");
        assert_eq!(
            (get("dev/console").mode, get("dev/console").rdev),
            (S_IFCHR | 0o600, (5, 1))
        );
        assert_eq!(get("dev/null").rdev, (1, 3));
        for d in [
            "dev",
            "proc",
            "sys",
            "newroot",
            "etc/machinen",
            &format!("lib/modules/{VER}"),
        ] {
            assert_eq!(get(d).mode & S_IFDIR, S_IFDIR, "{d}");
        }
        // Every entry's parent comes before it.
        for (i, e) in entries.iter().enumerate() {
            if let Some(parent) = Path::new(&e.name)
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
            {
                let pi = entries
                    .iter()
                    .position(|x| Path::new(&x.name) == parent)
                    .expect("parent listed");
                assert!(pi < i, "{} before its parent", e.name);
            }
        }
        let blk = get(&format!(
            "lib/modules/{VER}/kernel/drivers/block/virtio_blk.ko"
        ));
        assert_eq!(
            blk.data,
            fake_module("virtio_blk", "virtio,virtio_ring"),
            "decompressed"
        );
        let load = String::from_utf8(get("etc/machinen/modules.load").data.clone()).expect("utf8");
        let load: Vec<&str> = load.lines().collect();
        let m = |rel: &str| format!("/lib/modules/{VER}/kernel/drivers/{rel}");
        assert_eq!(
            load,
            [
                m("virtio/virtio.ko"),
                m("virtio/virtio_ring.ko"),
                m("virtio/virtio_mmio.ko"),
                m("block/virtio_blk.ko"),
                m("char/virtio_console.ko")
            ]
        );
        for l in &load {
            assert!(
                entries.iter().any(|e| format!("/{}", e.name) == *l),
                "{l} in archive"
            );
        }
        assert!(!entries.iter().any(|e| e.name.contains("vsock")));

        // Same inputs: same file, untouched. Another agent: another file.
        let mtime = fs::metadata(&p).expect("stat").modified().expect("mtime");
        assert_eq!(ensure_initramfs(&paths, &assets, &agent).expect("again"), p);
        assert_eq!(
            fs::metadata(&p).expect("stat").modified().expect("mtime"),
            mtime
        );
        fs::write(&agent, b"\x7fELF newer agent").expect("agent");
        let p2 = ensure_initramfs(&paths, &assets, &agent).expect("rebuilt");
        assert_ne!(p2, p);
    }

    #[test]
    fn missing_required_module_or_agent_fails_with_codes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let paths = Paths::rooted(dir.path());
        let assets = fake_assets(&dir.path().join("assets"), false);
        let agent = dir.path().join("agent");
        fs::write(&agent, b"x").expect("agent");
        let err = ensure_initramfs(&paths, &assets, &agent).expect_err("no virtio_console");
        assert!(
            matches!(&err, ImageError::RequiredModuleMissing { module, .. } if module == "virtio_console")
        );
        assert_eq!(err.code(), ErrorCode::CacheInitramfsBuildFailed);

        let err =
            ensure_initramfs(&paths, &assets, &dir.path().join("no-agent")).expect_err("no agent");
        assert!(matches!(err, ImageError::AgentUnreadable { .. }));
        assert_eq!(err.code(), ErrorCode::CacheInitramfsBuildFailed);

        let mut gone = assets.clone();
        gone.kernel_version = "0.0.0-none".into();
        let err = ensure_initramfs(&paths, &gone, &agent).expect_err("no modules");
        assert!(matches!(err, ImageError::ModulesUnreadable { .. }));
    }
}
