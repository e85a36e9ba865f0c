//! Kernel modules for the initramfs: which files to carry, in which order to
//! load them, and how to read them.
//!
//! Debian's kernel packages do not ship `modules.dep` (their postinst runs
//! `depmod`), and `depmod` (kmod) is not on every host, so install writes one
//! itself from each module's `.modinfo` `depends=` field, which is what
//! modpost recorded and what depmod's answer agrees with.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

/// The modules the guest needs: virtio transport over MMIO (how the kernel
/// finds devices under `microvm,acpi=on`), the disk, the agent's serial
/// port, the network, the root filesystem, the RNG and the balloon (free
/// page reporting), virtio-fs (live mounts; it pulls in `fuse`).
/// `inet_diag`/`tcp_diag` let the agent find and reset inherited TCP
/// connections after a fork (the guest has no modprobe to load them on demand).
pub(crate) const WANTED: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "virtio_net",
    "ext4",
    "virtio_rng",
    "virtio_balloon",
    "virtiofs",
    "inet_diag",
    "tcp_diag",
];

/// Without these the guest cannot reach its disk or talk to the host.
pub(crate) const REQUIRED: &[&str] = &["virtio_mmio", "virtio_blk", "virtio_console", "ext4"];

/// Module names treat `-` and `_` alike (the kernel does too).
pub(crate) fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// How a module file is compressed, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Xz,
    Zstd,
    Gzip,
}

/// Split a module file name into (module name, compression), or `None` when
/// it is no module: `virtio_blk.ko.xz` → (`virtio_blk`, Xz).
pub(crate) fn module_file(file_name: &str) -> Option<(String, Compression)> {
    for (suffix, c) in [
        (".ko", Compression::None),
        (".ko.xz", Compression::Xz),
        (".ko.zst", Compression::Zstd),
        (".ko.gz", Compression::Gzip),
    ] {
        if let Some(stem) = file_name.strip_suffix(suffix) {
            if !stem.is_empty() {
                return Some((normalize(stem), c));
            }
        }
    }
    None
}

/// A module path relative to the modules directory with any compression
/// suffix removed: where it goes in the initramfs.
pub(crate) fn uncompressed_rel(rel: &str) -> &str {
    for s in [".xz", ".zst", ".gz"] {
        if let Some(r) = rel.strip_suffix(s) {
            if r.ends_with(".ko") {
                return r;
            }
        }
    }
    rel
}

/// Read a module file, decompressing it if needed.
pub(crate) fn read_module(path: &Path) -> io::Result<Vec<u8>> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let compression = module_file(name)
        .map(|(_, c)| c)
        .unwrap_or(Compression::None);
    let raw = fs::read(path)?;
    let bad = |what: &str, e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidData, format!("{what}: {e}"))
    };
    match compression {
        Compression::None => Ok(raw),
        Compression::Gzip => {
            let mut out = Vec::new();
            flate2::read::GzDecoder::new(raw.as_slice()).read_to_end(&mut out)?;
            Ok(out)
        }
        Compression::Xz => {
            let mut out = Vec::new();
            lzma_rs::xz_decompress(&mut raw.as_slice(), &mut out)
                .map_err(|e| bad("bad xz data", &e))?;
            Ok(out)
        }
        Compression::Zstd => {
            let mut out = Vec::new();
            let mut d = ruzstd::decoding::StreamingDecoder::new(raw.as_slice())
                .map_err(|e| bad("bad zstd data", &e))?;
            d.read_to_end(&mut out)?;
            Ok(out)
        }
    }
}

/// The `.modinfo` section's `key=value` strings of an ELF module.
pub(crate) fn modinfo(elf: &[u8]) -> Option<Vec<(String, String)>> {
    let sec = elf_section(elf, ".modinfo")?;
    Some(
        sec.split(|b| *b == 0)
            .filter_map(|s| std::str::from_utf8(s).ok())
            .filter_map(|s| s.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    )
}

/// The bytes of the named section of an ELF file (32/64-bit, either byte
/// order), or `None` if the file is not ELF or lacks the section.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.len() < 0x34 || &elf[..4] != b"\x7fELF" {
        return None;
    }
    let is64 = match elf[4] {
        1 => false,
        2 => true,
        _ => return None,
    };
    let le = match elf[5] {
        1 => true,
        2 => false,
        _ => return None,
    };
    let rd = |off: usize, n: usize| -> Option<u64> {
        let b = elf.get(off..off.checked_add(n)?)?;
        let mut v = 0u64;
        for i in 0..n {
            let byte = if le { b[n - 1 - i] } else { b[i] };
            v = (v << 8) | u64::from(byte);
        }
        Some(v)
    };
    let (shoff, shentsize, shnum, shstrndx) = if is64 {
        (rd(0x28, 8)?, rd(0x3a, 2)?, rd(0x3c, 2)?, rd(0x3e, 2)?)
    } else {
        (rd(0x20, 4)?, rd(0x2e, 2)?, rd(0x30, 2)?, rd(0x32, 2)?)
    };
    let section = |i: u64| -> Option<(u64, &'a [u8])> {
        let h = usize::try_from(shoff.checked_add(i.checked_mul(shentsize)?)?).ok()?;
        let (name, off, size) = if is64 {
            (rd(h, 4)?, rd(h + 0x18, 8)?, rd(h + 0x20, 8)?)
        } else {
            (rd(h, 4)?, rd(h + 0x10, 4)?, rd(h + 0x14, 4)?)
        };
        let start = usize::try_from(off).ok()?;
        let end = start.checked_add(usize::try_from(size).ok()?)?;
        Some((name, elf.get(start..end)?))
    };
    let (_, strtab) = section(shstrndx)?;
    (0..shnum).find_map(|i| {
        let (name_off, data) = section(i)?;
        let name = strtab.get(usize::try_from(name_off).ok()?..)?;
        let name = &name[..name.iter().position(|b| *b == 0)?];
        (name == wanted.as_bytes()).then_some(data)
    })
}

/// Every module file under `dir`, as paths relative to it, sorted.
fn module_files(dir: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        for entry in fs::read_dir(dir.join(&rel))? {
            let entry = entry?;
            let ft = entry.file_type()?;
            let child = rel.join(entry.file_name());
            if ft.is_dir() {
                stack.push(child);
            } else if ft.is_file() && module_file(&entry.file_name().to_string_lossy()).is_some() {
                out.push(child.to_string_lossy().into_owned());
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Build the text of `modules.dep` for the modules under `dir`
/// (`lib/modules/<ver>`), in depmod's format: every module, then all of
/// its dependencies, transitively, the ones to load last first.
pub(crate) fn generate_modules_dep(dir: &Path) -> io::Result<String> {
    let files = module_files(dir)?;
    let mut by_name: HashMap<String, usize> = HashMap::new();
    let mut direct: Vec<Vec<String>> = Vec::with_capacity(files.len());
    for (i, rel) in files.iter().enumerate() {
        let data = read_module(&dir.join(rel))?;
        let info = modinfo(&data).unwrap_or_default();
        let file_name = Path::new(rel)
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = info
            .iter()
            .find(|(k, _)| k == "name")
            .map(|(_, v)| normalize(v))
            .or_else(|| module_file(&file_name).map(|(n, _)| n))
            .unwrap_or_default();
        let deps = info
            .iter()
            .filter(|(k, _)| k == "depends")
            .flat_map(|(_, v)| v.split(','))
            .filter(|d| !d.is_empty())
            .map(normalize)
            .collect();
        by_name.entry(name).or_insert(i);
        direct.push(deps);
    }
    let mut text = String::new();
    for (i, rel) in files.iter().enumerate() {
        // Load order (dependencies first), then reversed as depmod writes it.
        let mut order = Vec::new();
        let mut seen = HashSet::from([i]);
        fn visit(
            i: usize,
            direct: &[Vec<String>],
            by_name: &HashMap<String, usize>,
            seen: &mut HashSet<usize>,
            order: &mut Vec<usize>,
        ) {
            for d in &direct[i] {
                if let Some(&j) = by_name.get(d) {
                    if seen.insert(j) {
                        visit(j, direct, by_name, seen, order);
                        order.push(j);
                    }
                }
            }
        }
        visit(i, &direct, &by_name, &mut seen, &mut order);
        text.push_str(rel);
        text.push(':');
        for j in order.iter().rev() {
            text.push(' ');
            text.push_str(&files[*j]);
        }
        text.push('\n');
    }
    Ok(text)
}

/// A module to put into the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Module {
    pub name: String,
    /// Path relative to `lib/modules/<ver>/`, as named in `modules.dep`
    /// (may end in `.xz`/`.zst`/`.gz`).
    pub rel: String,
}

/// Why the wanted modules could not be resolved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ResolveError {
    RequiredMissing(String),
}

/// The `modules.dep` and `modules.builtin` of a kernel's module directory
/// (a kernel with everything modular has no `modules.builtin`), or the file
/// that could not be read and why.
pub(crate) fn read_tables(dir: &Path) -> Result<(String, String), (PathBuf, io::Error)> {
    let dep_path = dir.join("modules.dep");
    let dep = fs::read_to_string(&dep_path).map_err(|e| (dep_path, e))?;
    let builtin_path = dir.join("modules.builtin");
    let builtin = match fs::read_to_string(&builtin_path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err((builtin_path, e)),
    };
    Ok((dep, builtin))
}

/// The modules to load, dependencies first, from `modules.dep` text and
/// `modules.builtin` text: wanted modules that are built into the kernel are
/// skipped, missing optional ones are skipped with a warning, a missing
/// required one is an error.
pub(crate) fn resolve(
    modules_dep: &str,
    modules_builtin: &str,
    wanted: &[&str],
    required: &[&str],
) -> Result<Vec<Module>, ResolveError> {
    let builtin: HashSet<String> = modules_builtin
        .lines()
        .filter_map(|l| {
            Path::new(l.trim())
                .file_name()
                .and_then(|n| module_file(&n.to_string_lossy()))
        })
        .map(|(n, _)| n)
        .collect();
    let mut deps: HashMap<String, (String, Vec<String>)> = HashMap::new();
    for line in modules_dep.lines() {
        let Some((rel, rest)) = line.split_once(':') else {
            continue;
        };
        let rel = rel.trim();
        let Some((name, _)) = Path::new(rel)
            .file_name()
            .and_then(|n| module_file(&n.to_string_lossy()))
        else {
            continue;
        };
        let ds = rest.split_whitespace().map(str::to_string).collect();
        deps.entry(name).or_insert((rel.to_string(), ds));
    }
    let name_of = |rel: &str| {
        Path::new(rel)
            .file_name()
            .and_then(|n| module_file(&n.to_string_lossy()))
            .map(|(n, _)| n)
    };

    let mut out = Vec::new();
    let mut seen = HashSet::new();
    fn visit(
        name: &str,
        deps: &HashMap<String, (String, Vec<String>)>,
        name_of: &dyn Fn(&str) -> Option<String>,
        seen: &mut HashSet<String>,
        out: &mut Vec<Module>,
    ) {
        if !seen.insert(name.to_string()) {
            return;
        }
        let Some((rel, ds)) = deps.get(name) else {
            return;
        };
        // depmod lists the module to load last first; walking the list
        // backwards and recursing gives dependencies-first either way.
        for d in ds.iter().rev() {
            if let Some(dn) = name_of(d) {
                visit(&dn, deps, name_of, seen, out);
            }
        }
        out.push(Module {
            name: name.to_string(),
            rel: rel.clone(),
        });
    }
    for w in wanted {
        let w = normalize(w);
        if builtin.contains(&w) {
            tracing::debug!(module = %w, "built into the kernel");
            continue;
        }
        if !deps.contains_key(&w) {
            if required.iter().any(|r| normalize(r) == w) {
                return Err(ResolveError::RequiredMissing(w));
            }
            tracing::warn!(module = %w, "kernel module not found and not built in; the guest will run without it");
            continue;
        }
        visit(&w, &deps, &name_of, &mut seen, &mut out);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests_support {
    /// A minimal 64-bit little-endian ELF with a `.modinfo` section.
    /// Write `data` at `dir/rel`, creating parent directories.
    pub(crate) fn put(dir: &std::path::Path, rel: &str, data: &[u8]) {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, data).expect("write");
    }

    /// The virtio core of a fake module tree: virtio, virtio_ring,
    /// virtio_mmio, and a gzip-compressed virtio_blk depending on `blk_deps`.
    pub(crate) fn put_virtio_core(dir: &std::path::Path, blk_deps: &str) {
        use std::io::Write;
        put(
            dir,
            "kernel/drivers/virtio/virtio.ko",
            &fake_module("virtio", ""),
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio_ring.ko",
            &fake_module("virtio_ring", ""),
        );
        put(
            dir,
            "kernel/drivers/virtio/virtio_mmio.ko",
            &fake_module("virtio_mmio", "virtio,virtio_ring"),
        );
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&fake_module("virtio_blk", blk_deps))
            .expect("gz");
        put(
            dir,
            "kernel/drivers/block/virtio_blk.ko.gz",
            &gz.finish().expect("gz"),
        );
    }

    pub(crate) fn fake_module(name: &str, depends: &str) -> Vec<u8> {
        let modinfo = format!("license=GPL\0depends={depends}\0name={name}\0vermagic=6.1.0 SMP\0");
        let shstrtab = b"\0.modinfo\0.shstrtab\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let modinfo_off = elf.len() as u64;
        elf.extend_from_slice(modinfo.as_bytes());
        let shstr_off = elf.len() as u64;
        elf.extend_from_slice(shstrtab);
        elf.resize(elf.len().div_ceil(8) * 8, 0);
        let shoff = elf.len() as u64;
        let sh = |name: u32, off: u64, size: u64| {
            let mut h = vec![0u8; 64];
            h[0..4].copy_from_slice(&name.to_le_bytes());
            h[0x18..0x20].copy_from_slice(&off.to_le_bytes());
            h[0x20..0x28].copy_from_slice(&size.to_le_bytes());
            h
        };
        elf.extend(vec![0u8; 64]);
        elf.extend(sh(1, modinfo_off, modinfo.len() as u64));
        elf.extend(sh(10, shstr_off, shstrtab.len() as u64));
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&2u16.to_le_bytes());
        elf
    }
}

#[cfg(test)]
mod tests {
    use super::tests_support::fake_module;
    use super::*;

    const DEP: &str = "\
kernel/drivers/virtio/virtio_mmio.ko: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/virtio/virtio.ko:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/block/virtio_blk.ko.xz: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/char/virtio_console.ko.zst: kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko kernel/net/core/failover.ko kernel/drivers/virtio/virtio_ring.ko kernel/drivers/virtio/virtio.ko
kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko
kernel/net/core/failover.ko:
kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/fs/mbcache.ko kernel/lib/crc16.ko
kernel/fs/jbd2/jbd2.ko:
kernel/fs/mbcache.ko:
kernel/lib/crc16.ko:
kernel/net/vmw_vsock/vmw_vsock_virtio_transport.ko: kernel/drivers/virtio/virtio.ko
";

    fn names(m: &[Module]) -> Vec<&str> {
        m.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_first_deduplicated() {
        let m = resolve(DEP, "", WANTED, REQUIRED).expect("resolve");
        assert_eq!(
            names(&m),
            [
                "virtio",
                "virtio_ring",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "failover",
                "net_failover",
                "virtio_net",
                "crc16",
                "mbcache",
                "jbd2",
                "ext4"
            ]
        );
        assert!(!names(&m).contains(&"vmw_vsock_virtio_transport"));
        assert_eq!(m[3].rel, "kernel/drivers/block/virtio_blk.ko.xz");
    }

    #[test]
    fn builtins_are_skipped() {
        let m = resolve(
            DEP,
            "kernel/fs/ext4/ext4.ko\nkernel/drivers/virtio/virtio.ko\n",
            WANTED,
            REQUIRED,
        )
        .expect("resolve");
        let n = names(&m);
        assert!(!n.contains(&"ext4") && !n.contains(&"jbd2"), "{n:?}");
        // A builtin that only appears as a dependency is still taken from
        // modules.dep: depmod never lists builtins there, so if it is there
        // the tree and the list disagree and loading it is harmless.
        assert!(n.contains(&"virtio_mmio"));
    }

    #[test]
    fn missing_optional_skipped_required_fails() {
        let no_rng = resolve(DEP, "", &["virtio_rng", "virtio_blk"], REQUIRED).expect("resolve");
        assert_eq!(names(&no_rng), ["virtio", "virtio_ring", "virtio_blk"]);
        let dep = DEP.replace(
            "kernel/drivers/char/virtio_console.ko.zst",
            "kernel/drivers/char/other.ko.zst",
        );
        assert_eq!(
            resolve(&dep, "", WANTED, REQUIRED),
            Err(ResolveError::RequiredMissing("virtio_console".into()))
        );
    }

    #[test]
    fn dashes_and_compression_in_names() {
        assert_eq!(
            module_file("crc32c-intel.ko.zst"),
            Some(("crc32c_intel".into(), Compression::Zstd))
        );
        assert_eq!(
            module_file("x.ko.gz"),
            Some(("x".into(), Compression::Gzip))
        );
        assert_eq!(module_file("modules.dep"), None);
        assert_eq!(module_file(".ko"), None);
        assert_eq!(uncompressed_rel("kernel/a/b.ko.xz"), "kernel/a/b.ko");
        assert_eq!(uncompressed_rel("kernel/a/b.ko"), "kernel/a/b.ko");
        let m =
            resolve("kernel/x/crc32c-intel.ko:\n", "", &["crc32c_intel"], &[]).expect("resolve");
        assert_eq!(names(&m), ["crc32c_intel"]);
    }

    #[test]
    fn modinfo_from_elf() {
        let info = modinfo(&fake_module("virtio_blk", "virtio,virtio_ring")).expect("modinfo");
        assert!(info.contains(&("depends".into(), "virtio,virtio_ring".into())));
        assert!(info.contains(&("name".into(), "virtio_blk".into())));
        assert_eq!(modinfo(b"not an elf"), None);
        let mut truncated = fake_module("x", "");
        truncated.truncate(100);
        assert_eq!(modinfo(&truncated), None);
    }

    #[test]
    fn generated_modules_dep_resolves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let put = |rel: &str, data: &[u8]| tests_support::put(dir.path(), rel, data);
        tests_support::put_virtio_core(dir.path(), "virtio_ring,virtio");
        put(
            "kernel/drivers/char/virtio_console.ko",
            &fake_module("virtio_console", "virtio,virtio_ring"),
        );
        put("kernel/fs/ext4/ext4.ko", &fake_module("ext4", "jbd2"));
        put("kernel/fs/jbd2/jbd2.ko", &fake_module("jbd2", "crc16"));
        put("kernel/lib/crc16.ko", &fake_module("crc16", ""));
        put("modules.order", b"kernel/fs/ext4/ext4.ko\n");

        let dep = generate_modules_dep(dir.path()).expect("depmod");
        assert!(
            dep.contains("kernel/fs/ext4/ext4.ko: kernel/fs/jbd2/jbd2.ko kernel/lib/crc16.ko\n"),
            "{dep}"
        );
        assert!(
            dep.contains("kernel/drivers/block/virtio_blk.ko.gz: "),
            "{dep}"
        );
        assert_eq!(dep.lines().count(), 8);
        let m = resolve(&dep, "", WANTED, REQUIRED).expect("resolve");
        let n = names(&m);
        let pos = |x: &str| n.iter().position(|y| *y == x).unwrap_or(usize::MAX);
        assert!(
            pos("crc16") < pos("jbd2") && pos("jbd2") < pos("ext4"),
            "{n:?}"
        );
        assert!(
            pos("virtio") < pos("virtio_mmio") && pos("virtio_ring") < pos("virtio_blk"),
            "{n:?}"
        );
        assert_eq!(n.len(), 8);
        let blk =
            read_module(&dir.path().join("kernel/drivers/block/virtio_blk.ko.gz")).expect("read");
        assert_eq!(blk, fake_module("virtio_blk", "virtio_ring,virtio"));
    }
}
