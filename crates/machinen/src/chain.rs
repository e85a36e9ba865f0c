//! Checkpoint chains: bundles that hold only what changed since a parent.
//!
//! A keep-alive checkpoint of a VM that already has one (and a snapshot of
//! a VM restored from a bundle) is a *delta*: its `meta.json` names the
//! parent by a path relative to the bundle and by the BLAKE3 digest of the
//! parent's `manifest.json` (which pins every file of the parent). It holds:
//!
//! - `rootdisk.qcow2`: the disk clusters written since the parent. The
//!   supervisor starts a new qcow2 layer at every checkpoint, so this is
//!   just the layer the VM wrote since.
//! - `ram.img` + `ram.pages` when `ram_delta`: the 4 KiB RAM pages written
//!   since the parent (the kernel's soft-dirty bits on the VM's RAM file),
//!   at their offsets, and the list of them. Otherwise the RAM is whole
//!   (`ram.img`, or in `state.vmstate`), as in a full bundle.
//! - `state.vmstate`: the whole device state (it is small).
//!
//! A restore walks the parents up to a full bundle, checks each against the
//! digest its child recorded ([`resolve`]; a missing or altered parent is
//! `RESTORE_BUNDLE_INVALID` naming it), flattens the disk layers into the
//! layer ([`materialize_disk`], with `qemu-img commit`) and the RAM
//! ([`materialize_ram`]) once, into `<cache>/chains/<tip manifest
//! digest>.{qcow2,ram}`: the restored VM's disk sits on that layer
//! (read-only) and its RAM maps that file copy-on-write, like a full
//! bundle's `ram.img`, so later restores and forks of the same tip start as
//! fast as from a full bundle and share those pages. Those files are built
//! only after every parent was verified; a restore that finds them reads no
//! parent's large files again. [`flatten_bundle`]
//! writes a self-contained bundle from a chain's tip.
//!
//! Bundles stay immutable once written; several chains may share a parent.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::assets::tool;
use crate::bundle::{self, BundleError, BundleMeta, Manifest, ParentLink};
use crate::error::{Coded, ErrorCode};
use crate::paths::Paths;

/// Most links one chain may have (a bound on what a bundle makes us read).
pub const MAX_CHAIN: usize = 1024;
/// The page size of `ram.pages`.
pub const PAGE: u64 = 4096;
/// Where [`materialize_ram`] and [`materialize_disk`] keep what they
/// build, under the cache, named after the tip's manifest digest.
pub const CHAINS_DIR: &str = "chains";

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("bundle {child} is a delta over {parent}, which is missing")]
    ParentMissing { child: PathBuf, parent: PathBuf },
    #[error(
        "bundle {child} is a delta over {parent}, which has changed since (its manifest no longer has the digest {child} recorded)"
    )]
    ParentAltered { child: PathBuf, parent: PathBuf },
    #[error("parent {parent} of bundle {child} is damaged")]
    ParentDamaged {
        child: PathBuf,
        parent: PathBuf,
        #[source]
        source: Box<BundleError>,
    },
    #[error("bundle {path} has a chain of more than {MAX_CHAIN} checkpoints")]
    TooLong { path: PathBuf },
    #[error("bundle file {file} is invalid: {detail}")]
    Invalid { file: PathBuf, detail: String },
    #[error(transparent)]
    Bundle(#[from] Box<BundleError>),
    #[error("flattening disk layers into {out}")]
    Disk {
        out: PathBuf,
        #[source]
        source: Box<tool::ToolError>,
    },
    #[error("qemu-img (package qemu-utils) is not installed")]
    NoQemuImg,
    #[error("{action} {path}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl From<BundleError> for ChainError {
    fn from(e: BundleError) -> ChainError {
        ChainError::Bundle(Box::new(e))
    }
}

impl Coded for ChainError {
    fn code(&self) -> ErrorCode {
        match self {
            ChainError::ParentMissing { .. }
            | ChainError::ParentAltered { .. }
            | ChainError::ParentDamaged { .. }
            | ChainError::TooLong { .. }
            | ChainError::Invalid { .. } => ErrorCode::RestoreBundleInvalid,
            ChainError::Bundle(e) => e.code(),
            ChainError::NoQemuImg => ErrorCode::BootArgsInvalid,
            ChainError::Disk { .. } | ChainError::Io { .. } => ErrorCode::Io,
        }
    }
    fn hint(&self) -> Option<String> {
        Some(match self {
            ChainError::ParentMissing { .. } | ChainError::ParentAltered { .. } | ChainError::ParentDamaged { .. } => {
                "a delta checkpoint needs every bundle of its chain, unchanged and where it was relative to it: move chains together, or write self-contained bundles with `machinen bundle flatten` or `snapshot --full`".into()
            }
            ChainError::NoQemuImg => "install qemu-utils (scripts/install-deps does it)".into(),
            ChainError::Bundle(e) => return e.hint(),
            _ => return None,
        })
    }
}

fn io<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> ChainError + 'a {
    move |source| ChainError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// One bundle of a chain.
#[derive(Debug, Clone)]
pub struct Link {
    pub dir: PathBuf,
    pub meta: BundleMeta,
    pub manifest: Manifest,
}

/// BLAKE3 of a bundle's `manifest.json` (what a child records of its parent).
pub fn manifest_digest(dir: &Path) -> Result<String, BundleError> {
    let p = dir.join(bundle::MANIFEST);
    let (_, h) = bundle::Digest::Blake3.of_file(&p)?;
    Ok(h)
}

/// The parent directory a link names, relative to the child's directory.
pub fn parent_dir(child: &Path, link: &ParentLink) -> PathBuf {
    child.join(&link.path)
}

/// The chain ending at `tip`, root (a full bundle) first. Each parent's
/// manifest must have the digest its child recorded, and its structure
/// must be sound; the large files are checked by [`verify_links`].
pub fn resolve(tip: &Path) -> Result<Vec<Link>, ChainError> {
    let mut links = Vec::new();
    let mut dir = tip.to_path_buf();
    let mut expect: Option<(PathBuf, String)> = None;
    loop {
        if links.len() >= MAX_CHAIN {
            return Err(ChainError::TooLong {
                path: tip.to_path_buf(),
            });
        }
        let manifest = match &expect {
            None => bundle::read_manifest(&dir)?,
            Some((child, digest)) => {
                let missing = || ChainError::ParentMissing {
                    child: child.clone(),
                    parent: dir.clone(),
                };
                if !dir.join(bundle::MANIFEST).is_file() {
                    return Err(missing());
                }
                let found = manifest_digest(&dir).map_err(|_| missing())?;
                if &found != digest {
                    return Err(ChainError::ParentAltered {
                        child: child.clone(),
                        parent: dir.clone(),
                    });
                }
                bundle::read_manifest(&dir).map_err(|source| ChainError::ParentDamaged {
                    child: child.clone(),
                    parent: dir.clone(),
                    source: Box::new(source),
                })?
            }
        };
        let damaged = |source| match &expect {
            Some((child, _)) => ChainError::ParentDamaged {
                child: child.clone(),
                parent: dir.clone(),
                source: Box::new(source),
            },
            None => ChainError::Bundle(Box::new(source)),
        };
        bundle::check_file_kinds(&dir, &manifest).map_err(damaged)?;
        bundle::verify_files(&dir, &manifest, &[bundle::META]).map_err(damaged)?;
        let meta = bundle::read_meta(&dir).map_err(damaged)?;
        let has = |n: &str| manifest.files.iter().any(|f| f.name == n);
        if meta.ram_delta != has(bundle::RAM_PAGES) || (meta.ram_delta && !has(bundle::RAM)) {
            return Err(ChainError::Invalid {
                file: dir.join(bundle::META),
                detail: "ram_delta does not match the bundle's ram.img/ram.pages".into(),
            });
        }
        if let Some((child, _)) = &expect {
            let child_meta = &links.last().map(|l: &Link| &l.meta);
            if let Some(cm) = child_meta {
                if cm.memory_mib != meta.memory_mib || cm.image.sha256 != meta.image.sha256 {
                    return Err(ChainError::Invalid {
                        file: child.join(bundle::META),
                        detail: format!(
                            "its parent {} has another memory size or image",
                            dir.display()
                        ),
                    });
                }
            }
        }
        let next = meta.parent.clone();
        links.push(Link {
            dir: dir.clone(),
            meta,
            manifest,
        });
        match next {
            None => break,
            Some(p) => {
                let child = dir.clone();
                dir = parent_dir(&child, &p);
                // Normalise `..` so messages name the parent plainly.
                if let Ok(c) = fs::canonicalize(&dir) {
                    dir = c;
                }
                expect = Some((child, p.manifest_blake3));
            }
        }
    }
    links.reverse();
    Ok(links)
}

/// Check every large file of every parent against its manifest (the tip's
/// own files are left to the caller, who checks them while QEMU loads).
pub fn verify_links(links: &[Link]) -> Result<(), ChainError> {
    for (i, l) in links.iter().enumerate().rev().skip(1) {
        bundle::verify_files(&l.dir, &l.manifest, bundle::LARGE_FILES).map_err(|source| {
            ChainError::ParentDamaged {
                child: links[i + 1].dir.clone(),
                parent: l.dir.clone(),
                source: Box::new(source),
            }
        })?;
    }
    Ok(())
}

/// `ram.pages`: (first page, page count) pairs, little-endian u64, sorted,
/// not overlapping, within a RAM of `ram_bytes`.
pub fn read_pages(path: &Path, ram_bytes: u64) -> Result<Vec<(u64, u64)>, ChainError> {
    let pages = ram_bytes / PAGE;
    let invalid = |detail: String| ChainError::Invalid {
        file: path.to_path_buf(),
        detail,
    };
    let f = bundle::open_regular(path)?;
    let len = f.metadata().map_err(io("reading", path))?.len();
    // At most one range per two pages (ranges never touch).
    if len % 16 != 0 || len / 16 > pages / 2 + 1 {
        return Err(invalid(format!("size {len} bytes")));
    }
    let mut bytes = vec![0u8; len as usize];
    f.read_exact_at(&mut bytes, 0)
        .map_err(io("reading", path))?;
    let mut out = Vec::with_capacity(bytes.len() / 16);
    let mut end = 0u64;
    for pair in bytes.chunks_exact(16) {
        let first = u64::from_le_bytes(pair[..8].try_into().unwrap_or_default());
        let count = u64::from_le_bytes(pair[8..].try_into().unwrap_or_default());
        let stop = first.checked_add(count).filter(|&s| s <= pages);
        match stop {
            Some(stop) if count > 0 && (out.is_empty() || first > end) => {
                out.push((first, count));
                end = stop;
            }
            _ => {
                return Err(invalid(format!(
                    "range {first}+{count} is empty, out of order or beyond the RAM's {pages} pages"
                )))
            }
        }
    }
    Ok(out)
}

/// Write `ram.pages` (see [`read_pages`]).
pub fn write_pages(path: &Path, ranges: &[(u64, u64)]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(ranges.len() * 16);
    for (first, count) in ranges {
        bytes.extend_from_slice(&first.to_le_bytes());
        bytes.extend_from_slice(&count.to_le_bytes());
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(&bytes)
}

/// Copy the pages `ranges` names from `src` to the same offsets of `dst`
/// (whose other bytes stay as they are).
pub fn copy_pages(src: &fs::File, dst: &fs::File, ranges: &[(u64, u64)]) -> std::io::Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for &(first, count) in ranges {
        let (mut off, end) = (first * PAGE, (first + count) * PAGE);
        while off < end {
            let n = ((end - off) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], off)?;
            dst.write_all_at(&buf[..n], off)?;
            off += n as u64;
            copied += n as u64;
        }
    }
    Ok(copied)
}

/// Where the cache keeps what a restore of `tip` builds (`ext`: `ram` or
/// `qcow2`).
fn cached(paths: &Paths, tip: &Link, ext: &str) -> Result<PathBuf, ChainError> {
    let key = manifest_digest(&tip.dir)?;
    Ok(paths.cache.join(CHAINS_DIR).join(format!("{key}.{ext}")))
}

/// `path` exists; its time is set to now so `gc` spares it for a while (a
/// restore is about to use it).
fn fresh(path: &Path) -> bool {
    path.is_file()
        && fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(std::time::SystemTime::now()))
            .is_ok()
}

/// Whether the cache holds what a restore of the chain's tip needs, built
/// from verified parents: then its parents' large files are not read.
pub fn is_materialized(paths: &Paths, links: &[Link]) -> bool {
    let Some(tip) = links.last() else {
        return false;
    };
    let disk = cached(paths, tip, "qcow2").is_ok_and(|p| p.is_file());
    let ram = !tip.meta.ram_delta || cached(paths, tip, "ram").is_ok_and(|p| p.is_file());
    disk && ram
}

/// The chain's disk layers merged into one read-only layer (see
/// [`flatten_disk`]), built once per tip into the cache.
pub fn materialize_disk(paths: &Paths, links: &[Link]) -> Result<PathBuf, ChainError> {
    let tip = links.last().ok_or_else(|| ChainError::Invalid {
        file: PathBuf::new(),
        detail: "empty chain".into(),
    })?;
    let dest = cached(paths, tip, "qcow2")?;
    if fresh(&dest) {
        return Ok(dest);
    }
    let dir = paths.cache.join(CHAINS_DIR);
    crate::assets::fsutil::create_private_dir_all(&dir).map_err(io("creating", &dir))?;
    let tmp = crate::assets::fsutil::temp_sibling(&dest, "tmp");
    let layers: Vec<PathBuf> = links.iter().map(|l| l.dir.join(bundle::DISK)).collect();
    let built = flatten_disk(&layers, &tmp).and_then(|()| {
        fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &dest).map_err(io("storing", &dest))
    });
    if let Err(e) = built {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(dest)
}

/// The guest RAM a restore of the chain's tip maps: the tip's `ram.img`
/// when it is whole, else the RAM built from the last whole one and the
/// deltas above it, kept in the cache (built once per tip; restores and
/// forks of it share the file's pages). `None`: the RAM is in the tip's
/// machine state.
pub fn materialize_ram(paths: &Paths, links: &[Link]) -> Result<Option<PathBuf>, ChainError> {
    let Some(tip) = links.last() else {
        return Ok(None);
    };
    if !tip.meta.ram_delta {
        return Ok(Some(tip.dir.join(bundle::RAM)).filter(|p| p.exists()));
    }
    let root = links
        .iter()
        .rposition(|l| !l.meta.ram_delta)
        .filter(|&r| links[r].dir.join(bundle::RAM).is_file())
        .ok_or_else(|| ChainError::Invalid {
            file: tip.dir.join(bundle::META),
            detail: "no checkpoint of its chain holds the whole RAM as ram.img".into(),
        })?;
    let dest = cached(paths, tip, "ram")?;
    if fresh(&dest) {
        return Ok(Some(dest));
    }
    let dir = paths.cache.join(CHAINS_DIR);
    crate::assets::fsutil::create_private_dir_all(&dir).map_err(io("creating", &dir))?;
    let tmp = crate::assets::fsutil::temp_sibling(&dest, "tmp");
    let built = (|| {
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io("creating", &tmp))?;
        bundle::sparse_copy_into(&links[root].dir.join(bundle::RAM), &tmp)?;
        let out = fs::OpenOptions::new()
            .write(true)
            .open(&tmp)
            .map_err(io("opening", &tmp))?;
        let ram_bytes = u64::from(tip.meta.memory_mib) << 20;
        out.set_len(ram_bytes).map_err(io("sizing", &tmp))?;
        for l in &links[root + 1..] {
            let ranges = read_pages(&l.dir.join(bundle::RAM_PAGES), ram_bytes)?;
            let src_path = l.dir.join(bundle::RAM);
            let src = bundle::open_regular(&src_path)?;
            copy_pages(&src, &out, &ranges).map_err(io("applying", &src_path))?;
        }
        out.sync_all().map_err(io("syncing", &tmp))?;
        fs::rename(&tmp, &dest).map_err(io("storing", &dest))
    })();
    if let Err(e) = built {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(Some(dest))
}

/// The files [`materialize_ram`] and [`materialize_disk`] built that none
/// of `mapped` names and that are older than `grace` (a restore may be about to map
/// one it just built): (path, bytes on disk).
pub fn unused(
    paths: &Paths,
    mapped: &[PathBuf],
    grace: std::time::Duration,
) -> Vec<(PathBuf, u64)> {
    use std::os::unix::fs::MetadataExt;
    let dir = paths.cache.join(CHAINS_DIR);
    let now = std::time::SystemTime::now();
    fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let p = e.path();
            let m = fs::symlink_metadata(&p).ok()?;
            let old = m
                .modified()
                .ok()
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age >= grace);
            (m.is_file() && old && !mapped.contains(&p)).then(|| (p, m.blocks() * 512))
        })
        .collect()
}

/// Merge qcow2 disk layers (bottom first, each holding what was written
/// over the one below) into one new layer `out`: a copy of the bottom one
/// with each higher layer committed into it by `qemu-img commit`. Costs
/// the layers' allocated size, never the disk's.
pub fn flatten_disk(layers: &[PathBuf], out: &Path) -> Result<(), ChainError> {
    let Some((bottom, above)) = layers.split_first() else {
        return Err(ChainError::Invalid {
            file: out.to_path_buf(),
            detail: "no disk layer to flatten".into(),
        });
    };
    let unsafe_disk = |file: &Path| {
        let file = file.to_path_buf();
        move |source| BundleError::UnsafeDisk { file, source }
    };
    bundle::sparse_copy(bottom, out)?;
    crate::qcow2::sanitize_copy(out).map_err(unsafe_disk(bottom))?;
    if above.is_empty() {
        return Ok(());
    }
    let qemu_img = tool::QEMU_IMG.find().ok_or(ChainError::NoQemuImg)?;
    let out_abs = fs::canonicalize(out).map_err(io("opening", out))?;
    for (i, layer) in above.iter().enumerate() {
        let tmp = out.with_extension(format!("link{i}"));
        let _ = fs::remove_file(&tmp);
        let merged = (|| {
            bundle::sparse_copy(layer, &tmp)?;
            crate::qcow2::sanitize_copy(&tmp).map_err(unsafe_disk(layer))?;
            let mut rebase = tool::command(&qemu_img);
            rebase
                .args(["rebase", "-q", "-u", "-f", "qcow2", "-F", "qcow2", "-b"])
                .arg(&out_abs)
                .arg(&tmp);
            tool::run(&mut rebase).map_err(|source| ChainError::Disk {
                out: out.to_path_buf(),
                source: Box::new(source),
            })?;
            let mut commit = tool::command(&qemu_img);
            commit.args(["commit", "-q", "-d", "-f", "qcow2"]).arg(&tmp);
            tool::run(&mut commit).map_err(|source| ChainError::Disk {
                out: out.to_path_buf(),
                source: Box::new(source),
            })?;
            Ok::<(), ChainError>(())
        })();
        let _ = fs::remove_file(&tmp);
        merged?;
    }
    Ok(())
}

/// `to` relative to the directory `from` (both absolute): what a child
/// bundle at `from` records to find its parent at `to`.
pub fn relative(from: &Path, to: &Path) -> PathBuf {
    let f: Vec<Component> = from.components().collect();
    let t: Vec<Component> = to.components().collect();
    let common = f.iter().zip(&t).take_while(|(a, b)| a == b).count();
    let mut out = PathBuf::new();
    for _ in common..f.len() {
        out.push("..");
    }
    for c in &t[common..] {
        out.push(c.as_os_str());
    }
    out
}

/// A self-contained bundle at `out` with the guest state of the chain's
/// tip: the disk layers merged, the RAM whole, no parent.
pub fn flatten_bundle(paths: &Paths, tip: &Path, out: &Path) -> Result<PathBuf, ChainError> {
    let links = resolve(tip)?;
    verify_links(&links)?;
    let tipl = links.last().ok_or_else(|| ChainError::Invalid {
        file: tip.to_path_buf(),
        detail: "empty chain".into(),
    })?;
    bundle::verify_files(&tipl.dir, &tipl.manifest, bundle::LARGE_FILES)?;
    let builder = bundle::Builder::new(out)?;
    let layers: Vec<PathBuf> = links.iter().map(|l| l.dir.join(bundle::DISK)).collect();
    flatten_disk(&layers, &builder.path(bundle::DISK))?;
    if let Some(ram) = materialize_ram(paths, &links)? {
        bundle::sparse_copy(&ram, &builder.path(bundle::RAM))?;
    }
    for name in [
        bundle::STATE,
        bundle::MAIN_LOG,
        bundle::MOUNTS_LAYER,
        bundle::MOUNTS_LOWER,
    ] {
        let src = tipl.dir.join(name);
        if src.is_file() {
            bundle::sparse_copy(&src, &builder.path(name))?;
        }
    }
    let mut meta = tipl.meta.clone();
    meta.version = bundle::FORMAT_VERSION;
    meta.parent = None;
    meta.ram_delta = false;
    meta.chain_parent = None;
    Ok(builder.finish(&meta)?)
}

/// What `bundle ls` shows of one bundle.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Summary {
    pub path: PathBuf,
    pub source_name: String,
    pub chain_id: String,
    pub chain_seq: u32,
    /// `full` or `delta`.
    pub kind: &'static str,
    pub ram_delta: bool,
    /// The parent's directory (deltas).
    pub parent: Option<PathBuf>,
    pub snapped_at_ms: u64,
    /// Bytes the bundle's files take on disk.
    pub disk_bytes: u64,
}

/// Summarise the bundle at `dir` (its own files only; no digests).
pub fn summary(dir: &Path) -> Result<Summary, BundleError> {
    let meta = bundle::read_meta(dir)?;
    let (_, disk_bytes) = bundle::dir_usage(dir);
    Ok(Summary {
        path: dir.to_path_buf(),
        source_name: meta.source_name.clone(),
        chain_id: meta.chain_id.clone(),
        chain_seq: meta.chain_seq,
        kind: if meta.parent.is_some() {
            "delta"
        } else {
            "full"
        },
        ram_delta: meta.ram_delta,
        parent: meta.parent.as_ref().map(|p| {
            let d = parent_dir(dir, p);
            fs::canonicalize(&d).unwrap_or(d)
        }),
        snapped_at_ms: meta.snapped_at_ms,
        disk_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_between_bundles() {
        assert_eq!(
            relative(Path::new("/b/c2"), Path::new("/b/c1")),
            PathBuf::from("../c1")
        );
        assert_eq!(
            relative(Path::new("/b/x/c2"), Path::new("/b/c1")),
            PathBuf::from("../../c1")
        );
        assert_eq!(
            parent_dir(
                Path::new("/b/c2"),
                &ParentLink {
                    path: "../c1".into(),
                    manifest_blake3: String::new(),
                    chain_seq: 1
                }
            ),
            PathBuf::from("/b/c2/../c1")
        );
    }

    #[test]
    fn page_lists_round_trip_and_hostile_ones_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("ok");
        write_pages(&p, &[(0, 2), (5, 1), (100, 28)]).expect("write");
        assert_eq!(
            read_pages(&p, 128 * PAGE).expect("read"),
            vec![(0, 2), (5, 1), (100, 28)]
        );
        for (name, ranges) in [
            ("beyond", vec![(100u64, 29u64)]),
            ("overlap", vec![(0, 4), (3, 1)]),
            ("order", vec![(5, 1), (0, 1)]),
            ("empty", vec![(1, 0)]),
            ("wrap", vec![(u64::MAX, 2)]),
        ] {
            let p = dir.path().join(name);
            write_pages(&p, &ranges).expect("write");
            assert!(read_pages(&p, 128 * PAGE).is_err(), "{name}");
        }
        let odd = dir.path().join("odd");
        fs::write(&odd, [0u8; 15]).expect("write");
        assert!(read_pages(&odd, 128 * PAGE).is_err());
    }

    #[test]
    fn copied_pages_land_at_their_offsets() {
        let dir = tempfile::tempdir().expect("tmp");
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        fs::write(&a, vec![1u8; 8 * PAGE as usize]).expect("a");
        fs::write(&b, vec![2u8; 8 * PAGE as usize]).expect("b");
        let (fa, fb) = (
            fs::File::open(&a).expect("open"),
            fs::OpenOptions::new().write(true).open(&b).expect("open"),
        );
        assert_eq!(
            copy_pages(&fa, &fb, &[(1, 2), (6, 1)]).expect("copy"),
            3 * PAGE
        );
        let got = fs::read(&b).expect("read");
        let page = |i: usize| got[i * PAGE as usize];
        assert_eq!(
            (0..8).map(page).collect::<Vec<_>>(),
            vec![2, 1, 1, 2, 2, 2, 1, 2]
        );
    }
}
