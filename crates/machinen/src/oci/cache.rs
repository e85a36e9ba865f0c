//! What the image cache holds (`machinen images`), and removing from it
//! (`machinen images rm`, `machinen images prune`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::registry;
use crate::error::{fail, ErrorCode, Failure};
use crate::paths::Paths;

/// Blobs younger than this are never pruned (a pull may be under way).
pub const PULL_GRACE: std::time::Duration = std::time::Duration::from_secs(600);

/// A registry image that was pulled.
#[derive(Debug, Clone, Serialize)]
pub struct PulledRef {
    pub reference: String,
    /// The manifest (or index) digest the reference pointed at.
    pub digest: String,
}

/// A converted image: the flattened tarball VMs boot from.
#[derive(Debug, Clone, Serialize)]
pub struct Converted {
    /// Its manifest (layout, registry) or config (Docker archive) digest.
    pub digest: String,
    pub path: PathBuf,
    pub size_bytes: u64,
    /// When it was converted (Unix ms).
    pub converted_at_ms: u64,
}

/// The cache's content.
#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub pulled: Vec<PulledRef>,
    pub converted: Vec<Converted>,
    /// Bytes of the pulled blobs (shared between images).
    pub blob_bytes: u64,
}

fn oci_dir(paths: &Paths) -> PathBuf {
    paths.cache.join("oci")
}

fn index(store: &Path) -> serde_json::Value {
    fs::read(store.join("index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}))
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// List the image cache.
pub fn list(paths: &Paths) -> Listing {
    let store = registry::store(paths);
    let pulled = index(&store)["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| {
            Some(PulledRef {
                reference: m["annotations"][REF_NAME].as_str()?.to_string(),
                digest: m["digest"].as_str()?.to_string(),
            })
        })
        .collect();
    let mut converted: Vec<Converted> = fs::read_dir(oci_dir(paths))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = name.strip_suffix(&format!(".{}.tar", super::FLATTEN_FORMAT))?;
            let md = e.metadata().ok()?;
            Some(Converted {
                digest: format!("sha256:{digest}"),
                path: e.path(),
                size_bytes: md.len(),
                converted_at_ms: md
                    .modified()
                    .ok()
                    .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                    .map_or(0, |d| d.as_millis() as u64),
            })
        })
        .collect();
    converted.sort_by_key(|c| std::cmp::Reverse(c.converted_at_ms));
    let blob_bytes = fs::read_dir(store.join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    Listing {
        pulled,
        converted,
        blob_bytes,
    }
}

/// Forget pulled references (their blobs go at the next prune) and remove
/// converted tarballs, each named by a reference or a digest (a unique
/// prefix of its hex will do). Returns what was removed.
pub fn remove(paths: &Paths, names: &[String]) -> Result<Vec<String>, Failure> {
    let listing = list(paths);
    let store = registry::store(paths);
    let mut removed = Vec::new();
    for name in names {
        let qualified = registry::qualify(name).ok();
        let refs: Vec<&PulledRef> = listing
            .pulled
            .iter()
            .filter(|p| Some(&p.reference) == qualified.as_ref() || p.reference == *name)
            .collect();
        let hex = name.trim_start_matches("sha256:");
        let conv: Vec<&Converted> = listing
            .converted
            .iter()
            .filter(|c| hex.len() >= 6 && c.digest.trim_start_matches("sha256:").starts_with(hex))
            .collect();
        if refs.is_empty() && conv.is_empty() {
            return Err(fail(
                ErrorCode::BootImageInvalid,
                format!("no image {name:?} in the cache"),
            )
            .hint("`machinen images` lists what is there"));
        }
        if conv.len() > 1 {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!(
                    "{name:?} matches {} images; give more of the digest",
                    conv.len()
                ),
            ));
        }
        for r in refs {
            registry::unname(&store, &r.reference)?;
            removed.push(r.reference.clone());
        }
        for c in conv {
            fs::remove_file(&c.path).map_err(|e| {
                fail(ErrorCode::Io, format!("cannot remove {}", c.path.display())).source(e)
            })?;
            removed.push(c.digest.clone());
        }
    }
    Ok(removed)
}

/// Remove pulled blobs no pulled reference needs, and converted tarballs
/// (a later boot converts again), except what is younger than
/// [`PULL_GRACE`]: a pull or a boot may be using it. Returns the bytes
/// freed.
pub fn prune(paths: &Paths, grace: std::time::Duration) -> Result<u64, Failure> {
    let store = registry::store(paths);
    let _lock = registry::lock_store(&store)?;
    // What the named references reach: their manifests (an index's
    // entries too), configs and layers.
    let mut keep: BTreeSet<String> = BTreeSet::new();
    let mut todo: Vec<String> = index(&store)["manifests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["digest"].as_str().map(str::to_string))
        .collect();
    while let Some(d) = todo.pop() {
        if !keep.insert(d.clone()) {
            continue;
        }
        let Ok(hex) = super::sha256_hex(&d) else {
            continue;
        };
        let Ok(bytes) = fs::read(store.join("blobs/sha256").join(hex)) else {
            continue;
        };
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&bytes) {
            for list in ["manifests", "layers"] {
                for m in v[list].as_array().into_iter().flatten() {
                    if let Some(d) = m["digest"].as_str() {
                        todo.push(d.to_string());
                    }
                }
            }
            if let Some(d) = v["config"]["digest"].as_str() {
                todo.push(d.to_string());
            }
        }
    }
    let mut freed = 0;
    for e in fs::read_dir(store.join("blobs/sha256"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = e.file_name().to_string_lossy().into_owned();
        // A pull names its reference only once its blobs are all there: a
        // recent blob may belong to one under way.
        let recent = e
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .is_none_or(|age| age < grace);
        if !recent && !keep.contains(&format!("sha256:{name}")) {
            freed += e.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = fs::remove_file(e.path());
        }
    }
    let now = crate::registry::now_ms();
    for c in list(paths).converted {
        if now.saturating_sub(c.converted_at_ms) < grace.as_millis() as u64 {
            continue;
        }
        freed += c.size_bytes;
        let _ = fs::remove_file(&c.path);
    }
    Ok(freed)
}

/// `machinen images prune`: [`prune`], then the cached ext4 images no VM on
/// this host boots from ([`crate::image::prune_unused`]) and the build
/// cache, sparing what was used within `grace` ([`PULL_GRACE`] unless the
/// caller knows no pull, build or boot is under way). Returns the disk
/// space freed.
pub fn prune_all(paths: &Paths, grace: std::time::Duration) -> Result<u64, Failure> {
    let mut freed = prune(paths, grace)?;
    // Every VM directory counts, dead or alive (its disk names the image
    // until `gc` removes it), and so does one whose boot is still writing it.
    let in_use: BTreeSet<PathBuf> = fs::read_dir(&paths.registry)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| crate::spec::VmSpec::load(&e.path().join(crate::spec::files::SPEC)).ok())
        .map(|s| s.base_image)
        .collect();
    freed += crate::image::prune_unused(paths, &in_use, grace);
    freed += crate::build::prune_cache(paths);
    Ok(freed)
}
