//! OCI and Docker images as machinen images: `oci:DIR[:TAG]` (an OCI image
//! layout directory) and `docker-archive:FILE` (`docker save` output)
//! wherever a rootfs tarball is taken (`boot`, `provision --base`,
//! `restore --image`).
//!
//! An image becomes one flattened rootfs tarball in the cache:
//!
//! ```text
//! <cache>/oci/<key>.f1.tar  the layers applied in order (OCI whiteouts and
//!                         opaque directories honoured), the image's
//!                         config baked in front as /etc/machinen/image.json
//! ```
//!
//! keyed by the manifest digest (an OCI layout) or the config digest (a
//! Docker archive, whose manifest has none), so the same image converts
//! once; from there it is an ordinary tarball: the ext4 cache, bundles and
//! restores all work on it. The flattening is deterministic, so another
//! host converting the same image gets the same tarball and sha256.
//!
//! Images come from other people, so everything is checked before it is
//! used, and nothing partial reaches the cache (temp file, then rename):
//! every blob against its digest and size, media types against the known
//! ones, the platform against the host's, and each layer entry: no
//! absolute path, no `..`, nothing below a symlink or a non-directory (an
//! earlier layer's included), hard links only to files already in the
//! image, and the uncompressed size of all layers within a bound
//! ([`MAX_BYTES`], `MACHINEN_IMAGE_MAX_BYTES`).

pub mod cache;
pub mod export;
mod flatten;
pub mod push;
pub mod registry;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::{fail, ErrorCode, Failure};
use crate::paths::Paths;
use crate::progress::ProgressMode;
use crate::provision::ImageConfig;

/// Default bound on the uncompressed size of an image's layers together.
pub const MAX_BYTES: u64 = 64 << 30;
/// Version of the flattening, in the cache file's name: a machinen that
/// flattens differently does not take an older result for its own.
pub(crate) const FLATTEN_FORMAT: &str = "f2";
/// Bound on a manifest, index or config blob (they are small JSON).
const MAX_JSON: u64 = 4 << 20;

/// An image reference machinen converts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// `oci:DIR[:TAG]`.
    Layout { dir: PathBuf, tag: Option<String> },
    /// `docker-archive:FILE`.
    DockerArchive { file: PathBuf },
}

impl Source {
    /// The reference in `image`, or `None` for a plain tarball path.
    pub fn parse(image: &Path) -> Option<Source> {
        let s = image.to_str()?;
        if let Some(rest) = s.strip_prefix("oci:") {
            // DIR may hold colons; a TAG may not hold `/`.
            return Some(match rest.rsplit_once(':') {
                Some((dir, tag)) if !tag.contains('/') && !dir.is_empty() => Source::Layout {
                    dir: dir.into(),
                    tag: Some(tag.to_string()),
                },
                _ => Source::Layout {
                    dir: rest.into(),
                    tag: None,
                },
            });
        }
        s.strip_prefix("docker-archive:")
            .map(|f| Source::DockerArchive { file: f.into() })
    }
}

pub(crate) fn invalid(message: impl Into<String>) -> Failure {
    fail(ErrorCode::ImageInvalid, message)
        .hint("the image is damaged or not an image machinen can run; rebuild or re-export it")
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> Failure {
    let what = what.to_string();
    let path = path.to_path_buf();
    move |e| {
        if e.kind() == io::ErrorKind::NotFound {
            fail(
                ErrorCode::BootImageInvalid,
                format!("{what} {} not found", path.display()),
            )
        } else {
            fail(
                ErrorCode::Io,
                format!("cannot read {what} {}", path.display()),
            )
            .source(e)
        }
    }
}

/// `image` as a tarball path: itself, or for an image reference the cached
/// flattened tarball (converted now when it is not cached yet).
pub fn resolve(paths: &Paths, image: &Path, progress: ProgressMode) -> Result<PathBuf, Failure> {
    let source = match Source::parse(image) {
        Some(s) => s,
        None => match registry::reference_in(image) {
            // A registry image: pulled into the store once, then read
            // from there like a layout.
            Some(r) => {
                let qualified = registry::qualify(&r)?;
                let store = registry::store(paths);
                if !registry::pulled(&store, &qualified) {
                    // Two boots of one new image: the second waits for the
                    // first one's pull and then finds it.
                    let _lock = registry::lock_reference(&store, &qualified)?;
                    if !registry::pulled(&store, &qualified) {
                        registry::pull(&store, &qualified, progress)?;
                    }
                }
                Source::Layout {
                    dir: store,
                    tag: Some(qualified),
                }
            }
            None => return Ok(image.to_path_buf()),
        },
    };
    flattened(paths, &source, progress)
}

/// The container image `image` names, as a bundle records it (`None` for a
/// plain tarball): the reference as given for `oci:` and `docker-archive:`
/// (made absolute), a registry reference with its registry.
pub fn source_of(image: &Path) -> Result<Option<String>, Failure> {
    let absolute = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    Ok(match Source::parse(image) {
        Some(Source::Layout { dir, tag }) => Some(format!(
            "oci:{}{}",
            absolute(&dir).display(),
            tag.map(|t| format!(":{t}")).unwrap_or_default()
        )),
        Some(Source::DockerArchive { file }) => {
            Some(format!("docker-archive:{}", absolute(&file).display()))
        }
        None => match registry::reference_in(image) {
            Some(r) => Some(registry::qualify(&r)?),
            None => None,
        },
    })
}

/// What `images inspect` shows of an image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspected {
    /// As named.
    pub image: String,
    /// The container image it came from (`None` for a rootfs tarball).
    pub source: Option<String>,
    /// The rootfs tarball it boots from.
    pub tarball: PathBuf,
    /// Bytes of that tarball.
    pub size_bytes: u64,
    /// Its settings: command, entrypoint, env, working directory, user,
    /// exposed ports, labels (all empty for an image without any).
    pub config: ImageConfig,
}

/// The settings and origin of `image` (a tarball or a reference, pulled and
/// converted now if it is not in the cache).
pub fn inspect(paths: &Paths, image: &Path, progress: ProgressMode) -> crate::Result<Inspected> {
    let source = source_of(image)?;
    let tarball = resolve(paths, image, progress)?;
    let size_bytes = match fs::metadata(&tarball) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(crate::image::ImageError::NotFound { path: tarball }.into())
        }
        Err(e) => {
            return Err(
                fail(ErrorCode::Io, format!("cannot read {}", tarball.display()))
                    .source(e)
                    .into(),
            )
        }
    };
    let config = crate::provision::config_of(paths, &tarball, progress)?.unwrap_or_default();
    Ok(Inspected {
        image: image.display().to_string(),
        source,
        tarball,
        size_bytes,
        config,
    })
}

/// What [`pull`] fetched.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Pulled {
    /// The reference with its registry.
    pub reference: String,
    /// The flattened rootfs tarball it boots from.
    pub tarball: PathBuf,
}

/// Fetch a registry image again (even when it was pulled before) and
/// convert it (`machinen pull REF`).
pub fn pull(paths: &Paths, image: &str, progress: ProgressMode) -> Result<Pulled, Failure> {
    let r = registry::reference_in(Path::new(image)).ok_or_else(|| {
        fail(
            ErrorCode::ImagePullFailed,
            format!("{image:?} is not a registry image reference"),
        )
        .hint("e.g. HOST[:PORT]/REPO[:TAG]; files and oci: layouts need no pull")
    })?;
    let qualified = registry::qualify(&r)?;
    let store = registry::store(paths);
    registry::pull(&store, &qualified, progress)?;
    let tarball = flattened(
        paths,
        &Source::Layout {
            dir: store,
            tag: Some(qualified.clone()),
        },
        progress,
    )?;
    Ok(Pulled {
        reference: qualified,
        tarball,
    })
}

/// The cached flattened tarball of `source`, made now if missing.
fn flattened(paths: &Paths, source: &Source, progress: ProgressMode) -> Result<PathBuf, Failure> {
    let image = match source {
        Source::Layout { dir, tag } => from_layout(dir, tag.as_deref())?,
        Source::DockerArchive { file } => from_docker_archive(file)?,
    };
    let dir = paths.cache.join("oci");
    crate::assets::fsutil::create_private_dir_all(&dir)
        .map_err(|e| fail(ErrorCode::Io, format!("cannot create {}", dir.display())).source(e))?;
    let dest = dir.join(format!("{}.{FLATTEN_FORMAT}.tar", image.key));
    if dest.is_file() {
        return Ok(dest);
    }
    let lock_path = dir.join(format!("{}.lock", image.key));
    let _lock = crate::assets::fsutil::lock_exclusive(&lock_path).map_err(|e| {
        fail(
            ErrorCode::Io,
            format!("cannot lock {}", lock_path.display()),
        )
        .source(e)
    })?;
    if dest.is_file() {
        return Ok(dest);
    }
    let step = progress.step(format!("Converting image {}", image.name));
    flatten::write(&image, &dest, max_bytes())?;
    step.done(format!("Converted image {}", image.name));
    Ok(dest)
}

fn max_bytes() -> u64 {
    std::env::var(machinen_proto::env::IMAGE_MAX_BYTES)
        .ok()
        .and_then(|v| crate::hostfile::parse_size(&v))
        .unwrap_or(MAX_BYTES)
}

/// A layer: where its blob is, how it is compressed, and what its digest
/// (of the stored bytes) and uncompressed digest (`diff_id`) must be.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    pub path: PathBuf,
    pub compression: Compression,
    /// `sha256:<hex>` of the blob as stored, and its size (OCI layouts).
    pub digest: Option<(String, u64)>,
    /// `sha256:<hex>` of the uncompressed tar (Docker archives, whose
    /// layers are named, not addressed).
    pub diff_id: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compression {
    None,
    Gzip,
    Zstd,
    /// Decided by the data's magic bytes (Docker archives name no type).
    Sniff,
}

/// An image ready to flatten.
#[derive(Debug, Clone)]
pub(crate) struct Image {
    /// What the user named (for messages).
    pub name: String,
    /// The cache key (hex).
    pub key: String,
    pub layers: Vec<Layer>,
    pub config: ImageConfig,
    /// Kept for the docker-archive's staging directory lifetime.
    pub _staging: Option<std::sync::Arc<tempfile::TempDir>>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Platform {
    architecture: String,
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

/// The parts of an image config machinen uses.
#[derive(Deserialize, Default)]
struct OciConfig {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    exposed_ports: Option<BTreeMap<String, serde_json::Value>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

const INDEX_TYPES: &[&str] = &[
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
const MANIFEST_TYPES: &[&str] = &[
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
];

/// The host's platform in OCI spelling.
pub(crate) fn host_arch() -> &'static str {
    crate::paths::debian_arch()
}

/// `sha256:<hex>` → `<hex>`, refusing other algorithms and malformed hex
/// (the hex names a file).
fn sha256_hex(digest: &str) -> Result<&str, Failure> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| invalid(format!("digest {digest:?} is not sha256")))?;
    if hex.len() != 64
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid(format!("digest {digest:?} is malformed")));
    }
    Ok(hex)
}

/// A small JSON blob of the layout, checked against its descriptor.
fn read_json_blob<T: serde::de::DeserializeOwned>(
    dir: &Path,
    d: &Descriptor,
) -> Result<T, Failure> {
    let hex = sha256_hex(&d.digest)?;
    if d.size > MAX_JSON {
        return Err(invalid(format!(
            "{} is {} bytes, too large for JSON",
            d.digest, d.size
        )));
    }
    let path = dir.join("blobs/sha256").join(hex);
    let bytes = fs::read(&path).map_err(io_err("blob", &path))?;
    if bytes.len() as u64 != d.size || hex::encode(Sha256::digest(&bytes)) != hex {
        return Err(invalid(format!(
            "blob {} does not match its digest or size",
            d.digest
        )));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("blob {} is not valid JSON", d.digest)).source(e))
}

fn from_layout(dir: &Path, tag: Option<&str>) -> Result<Image, Failure> {
    let layout_file = dir.join("oci-layout");
    let layout = fs::read(&layout_file).map_err(io_err("OCI layout", dir))?;
    let v: serde_json::Value = serde_json::from_slice(&layout)
        .map_err(|e| invalid(format!("{} is not valid JSON", layout_file.display())).source(e))?;
    if v["imageLayoutVersion"]
        .as_str()
        .is_none_or(|s| !s.starts_with("1."))
    {
        return Err(invalid(format!(
            "{} is not an OCI image layout of version 1",
            dir.display()
        )));
    }
    let index_path = dir.join("index.json");
    let bytes = fs::read(&index_path).map_err(io_err("OCI index", &index_path))?;
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| invalid(format!("{} is not a valid index", index_path.display())).source(e))?;
    let names: Vec<&str> = index
        .manifests
        .iter()
        .filter_map(|m| {
            m.annotations
                .get("org.opencontainers.image.ref.name")
                .map(String::as_str)
        })
        .collect();
    let chosen = match tag {
        Some(t) => index.manifests.iter().find(|m| {
            m.annotations
                .get("org.opencontainers.image.ref.name")
                .is_some_and(|n| {
                    n == t
                        || (!t.contains('/') && n.rsplit_once(':').is_some_and(|(_, tag)| tag == t))
                })
        }),
        None if index.manifests.len() == 1 => index.manifests.first(),
        None => None,
    };
    let Some(mut desc) = chosen else {
        return Err(fail(
            ErrorCode::BootImageInvalid,
            match tag {
                Some(t) => format!("{} has no image tagged {t:?}", dir.display()),
                None => format!(
                    "{} holds {} images; say which",
                    dir.display(),
                    index.manifests.len()
                ),
            },
        )
        .hint(format!(
            "its tags: {}; e.g. oci:{}:TAG",
            names.join(", "),
            dir.display()
        )));
    };
    // An index (multi-platform image) selects the host's platform.
    let picked;
    if INDEX_TYPES.contains(&desc.media_type.as_str()) {
        let inner: Index = read_json_blob(dir, desc)?;
        let arch = host_arch();
        picked = inner.manifests.into_iter().find(|m| {
            m.platform.as_ref().is_some_and(|p| {
                p.os == "linux"
                    && p.architecture == arch
                    && p.variant
                        .as_deref()
                        .is_none_or(|v| v == "v8" || arch != "arm64")
            })
        });
        desc = match &picked {
            Some(d) => d,
            None => {
                return Err(fail(
                    ErrorCode::ImagePlatformMismatch,
                    format!("{} has no image for linux/{arch}", dir.display()),
                )
                .hint("use an image built for this host's architecture"))
            }
        };
    }
    if !MANIFEST_TYPES.contains(&desc.media_type.as_str()) {
        return Err(invalid(format!(
            "unknown manifest media type {:?}",
            desc.media_type
        )));
    }
    let manifest: Manifest = read_json_blob(dir, desc)?;
    if !manifest.media_type.is_empty() && !MANIFEST_TYPES.contains(&manifest.media_type.as_str()) {
        return Err(invalid(format!(
            "unknown manifest media type {:?}",
            manifest.media_type
        )));
    }
    let config: OciConfig = read_json_blob(dir, &manifest.config)?;
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for l in &manifest.layers {
        let compression = match l.media_type.as_str() {
            "application/vnd.oci.image.layer.v1.tar"
            | "application/vnd.docker.image.rootfs.diff.tar" => Compression::None,
            "application/vnd.oci.image.layer.v1.tar+gzip"
            | "application/vnd.docker.image.rootfs.diff.tar.gzip" => Compression::Gzip,
            "application/vnd.oci.image.layer.v1.tar+zstd" => Compression::Zstd,
            other => return Err(invalid(format!("unknown layer media type {other:?}"))),
        };
        let hex = sha256_hex(&l.digest)?;
        layers.push(Layer {
            path: dir.join("blobs/sha256").join(hex),
            compression,
            digest: Some((l.digest.clone(), l.size)),
            diff_id: None,
        });
    }
    let key = sha256_hex(&desc.digest)?.to_string();
    let name = format!(
        "oci:{}{}",
        dir.display(),
        tag.map(|t| format!(":{t}")).unwrap_or_default()
    );
    Ok(Image {
        config: run_config(&config, &name)?,
        name,
        key,
        layers,
        _staging: None,
    })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct ArchiveEntry {
    config: String,
    #[serde(default)]
    layers: Vec<String>,
}

/// A member path of a Docker archive, checked: relative, no `..`.
fn archive_member(p: &str) -> Result<PathBuf, Failure> {
    let path = Path::new(p);
    if path.is_absolute()
        || path.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        })
    {
        return Err(invalid(format!(
            "archive member {p:?} is not a plain relative path"
        )));
    }
    Ok(path.to_path_buf())
}

fn from_docker_archive(file: &Path) -> Result<Image, Failure> {
    // The archive's members are unpacked (plain files only) into a private
    // temporary directory, then read like a layout's blobs.
    let f = fs::File::open(file).map_err(io_err("Docker archive", file))?;
    let staging = tempfile::Builder::new()
        .prefix("machinen-docker-archive-")
        .tempdir()
        .map_err(|e| fail(ErrorCode::Io, "cannot create a temporary directory").source(e))?;
    let mut ar = tar::Archive::new(f);
    let entries = ar
        .entries()
        .map_err(|e| invalid(format!("{} is not a tar archive", file.display())).source(e))?;
    let mut total = 0u64;
    let limit = max_bytes();
    for e in entries {
        let mut e = e.map_err(|e| invalid(format!("{} is damaged", file.display())).source(e))?;
        if e.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = e.path_bytes().into_owned();
        let name = String::from_utf8(name)
            .map_err(|_| invalid("an archive member's name is not UTF-8"))?;
        let rel = archive_member(name.trim_start_matches("./"))?;
        total = total.saturating_add(e.size());
        if total > limit {
            return Err(too_large(limit));
        }
        let dest = staging.path().join(&rel);
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| fail(ErrorCode::Io, "cannot unpack the archive").source(e))?;
        }
        let mut out = fs::File::create(&dest)
            .map_err(|e| fail(ErrorCode::Io, "cannot unpack the archive").source(e))?;
        io::copy(&mut e, &mut out)
            .map_err(|e| invalid(format!("{} is damaged", file.display())).source(e))?;
    }
    let manifest_path = staging.path().join("manifest.json");
    let bytes = fs::read(&manifest_path).map_err(|_| {
        invalid(format!(
            "{} has no manifest.json: not `docker save` output",
            file.display()
        ))
    })?;
    let entries: Vec<ArchiveEntry> = serde_json::from_slice(&bytes)
        .map_err(|e| invalid("the archive's manifest.json is not valid").source(e))?;
    let [entry] = &entries[..] else {
        return Err(invalid(format!(
            "{} holds {} images; machinen takes archives of one",
            file.display(),
            entries.len()
        )));
    };
    let config_path = staging.path().join(archive_member(&entry.config)?);
    let config_bytes = fs::read(&config_path)
        .map_err(|_| invalid(format!("the archive lacks its config {}", entry.config)))?;
    let config_hex = hex::encode(Sha256::digest(&config_bytes));
    // The config is named by its digest (`<hex>.json` or `blobs/sha256/<hex>`).
    let named = Path::new(&entry.config)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or_default();
    if named.len() == 64 && named != config_hex {
        return Err(invalid("the archive's config does not match its digest"));
    }
    let config: OciConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid("the archive's image config is not valid").source(e))?;
    let diff_ids = config
        .rootfs
        .as_ref()
        .map(|r| r.diff_ids.clone())
        .unwrap_or_default();
    if diff_ids.len() != entry.layers.len() {
        return Err(invalid(
            "the archive's layers do not match its config's diff_ids",
        ));
    }
    let mut layers = Vec::with_capacity(entry.layers.len());
    for (l, diff_id) in entry.layers.iter().zip(diff_ids) {
        sha256_hex(&diff_id)?;
        layers.push(Layer {
            path: staging.path().join(archive_member(l)?),
            compression: Compression::Sniff,
            digest: None,
            diff_id: Some(diff_id),
        });
    }
    let name = format!("docker-archive:{}", file.display());
    Ok(Image {
        config: run_config(&config, &name)?,
        name,
        key: config_hex,
        layers,
        _staging: Some(std::sync::Arc::new(staging)),
    })
}

pub(crate) fn too_large(limit: u64) -> Failure {
    invalid(format!(
        "the image's layers unpack to more than {} MiB",
        limit >> 20
    ))
    .hint(format!(
        "raise {} if the image is really that large",
        machinen_proto::env::IMAGE_MAX_BYTES
    ))
}

/// The image config as machinen's baked config: the command is Entrypoint
/// followed by Cmd (Docker's rule); `boot IMAGE -- ARGS` runs Entrypoint
/// with ARGS.
fn run_config(c: &OciConfig, name: &str) -> Result<ImageConfig, Failure> {
    if (!c.os.is_empty() && c.os != "linux")
        || (!c.architecture.is_empty() && c.architecture != host_arch())
    {
        return Err(fail(
            ErrorCode::ImagePlatformMismatch,
            format!(
                "{name} is for {}/{}, this host runs linux/{}",
                c.os,
                c.architecture,
                host_arch()
            ),
        )
        .hint("use an image built for this host's architecture"));
    }
    let rc = c.config.as_ref();
    // `[""]` is how tools spell "none" (`--entrypoint ''`).
    let unset = |v: &Vec<String>| v.iter().all(String::is_empty);
    let entrypoint = rc.and_then(|r| r.entrypoint.clone()).filter(|v| !unset(v));
    let cmd = rc
        .and_then(|r| r.cmd.clone())
        .filter(|v| !unset(v))
        .unwrap_or_default();
    let full: Vec<String> = entrypoint.iter().flatten().cloned().chain(cmd).collect();
    let mut env = BTreeMap::new();
    for kv in rc.and_then(|r| r.env.clone()).unwrap_or_default() {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_string(), v.to_string());
        }
    }
    let cwd = rc
        .and_then(|r| r.working_dir.clone())
        .filter(|d| d.starts_with('/'));
    // Who the command runs as; root needs no lookup.
    let user = rc
        .and_then(|r| r.user.clone())
        .filter(|u| !matches!(u.as_str(), "" | "0" | "root" | "0:0" | "root:root"));
    if let Some(u) = &user {
        crate::vm::check_user(u).map_err(|_| {
            invalid(format!(
                "{name} has the user {u:?}, which is not NAME, UID, NAME:GROUP or UID:GID"
            ))
        })?;
    }
    // A port spelled some other way is left out rather than failing the
    // image: it is information, not something the VM acts on.
    let exposed_ports = rc
        .and_then(|r| r.exposed_ports.as_ref())
        .map(|m| {
            m.keys()
                .filter_map(|p| crate::provision::normalize_port(p))
                .collect()
        })
        .unwrap_or_default();
    let labels = rc.and_then(|r| r.labels.clone()).unwrap_or_default();
    let config = ImageConfig {
        cmd: (!full.is_empty()).then_some(full),
        env,
        cwd,
        entrypoint,
        user,
        exposed_ports,
        labels,
        ..ImageConfig::default()
    };
    config.validate()?;
    Ok(config)
}

/// A reader that hashes what passes through and stops past a byte limit.
pub(crate) struct Checked<R> {
    inner: R,
    hash: Sha256,
    pub count: u64,
    limit: u64,
}

impl<R: Read> Checked<R> {
    pub fn new(inner: R, limit: u64) -> Checked<R> {
        Checked {
            inner,
            hash: Sha256::new(),
            count: 0,
            limit,
        }
    }
    pub fn hex(self) -> String {
        hex::encode(self.hash.finalize())
    }
}

impl<R: Read> Read for Checked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        self.count += n as u64;
        if self.count > self.limit {
            return Err(io::Error::other("over the size limit"));
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
