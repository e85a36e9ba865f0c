//! Bundles in an OCI distribution registry: `machinen push BUNDLE REF`,
//! `machinen pull REF DIR`, `machinen restore REF`.
//!
//! A bundle is one OCI artifact: an image manifest of artifact type
//! [`ARTIFACT_TYPE`] whose config is the bundle's `meta.json` and whose
//! layers are the bundle's files cut into [`CHUNK`]-byte chunks, each a
//! blob named by its SHA-256 (annotations say which file and offset). All-zero
//! chunks are not pushed: holes stay holes. The manifest's annotations list
//! the files and their sizes.
//!
//! ```text
//! manifest  artifactType application/vnd.machinen.bundle.v1
//!           config   meta.json                     (CONFIG_TYPE)
//!           layers   [file, offset] chunk blobs    (CHUNK_TYPE)
//!           annotations  org.machinen.files        [{"name","size"}…]
//!                        org.machinen.parent       the parent's manifest digest (deltas)
//!                        org.machinen.parent.path  where the delta expects it (`../NAME`)
//! ```
//!
//! A delta checkpoint is pushed with its parents (each its own artifact,
//! tagged `chain-<its manifest's BLAKE3, 16 hex>`), so a registry holds
//! chains the way a disk does; a chunk the registry has is not uploaded
//! again, so pushing checkpoint 2 uploads what changed since checkpoint 1.
//! A pull fetches the parents a host lacks (a bundle at the parent's place
//! with the same manifest is kept) into their places beside the tip.
//!
//! Pulled chunks are kept under `<cache>/chunks` until the bundle is
//! complete, checked against their digests, so an interrupted pull resumes
//! where it stopped; the bundle is assembled in a hidden directory, checked
//! against its own manifest and renamed into place: a pull that fails
//! leaves nothing `restore` accepts.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path, PathBuf};

use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bundle;
use crate::error::{fail, ErrorCode, Failure};
use crate::oci::registry::{client_for, Blocking};
use crate::paths::Paths;
use crate::progress::ProgressMode;

pub const ARTIFACT_TYPE: &str = "application/vnd.machinen.bundle.v1";
const CONFIG_TYPE: &str = "application/vnd.machinen.bundle.meta.v1+json";
const CHUNK_TYPE: &str = "application/vnd.machinen.bundle.chunk.v1";
const MANIFEST_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
const FILES: &str = "org.machinen.files";
const PARENT: &str = "org.machinen.parent";
const PARENT_PATH: &str = "org.machinen.parent.path";
const FILE: &str = "org.machinen.file";
const OFFSET: &str = "org.machinen.offset";
/// On a chunk of a delta's `ram.img`: its offset is in the pages
/// `ram.pages` lists, packed end to end, not in the file.
const PACKED: &str = "org.machinen.packed";
/// Chunk size: large enough that a bundle is a few hundred blobs, small
/// enough that a change re-uploads little.
pub const CHUNK: u64 = 4 << 20;
/// The files a bundle may hold (anything else in an artifact is refused).
const NAMES: &[&str] = &[
    bundle::MANIFEST,
    bundle::META,
    bundle::STATE,
    bundle::DISK,
    bundle::RAM,
    bundle::RAM_PAGES,
    bundle::MAIN_LOG,
    bundle::MOUNTS_LAYER,
    bundle::MOUNTS_LOWER,
];
/// The largest file an artifact may declare (a bound on what a registry
/// makes us write).
const MAX_FILE: u64 = 1 << 40;
/// The most links a pulled chain may have.
const MAX_PARENTS: usize = 256;

fn failed(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Failure {
    fail(ErrorCode::BundleTransferFailed, what)
        .source(e)
        .hint("check the reference, the registry's address and your credentials (MACHINEN_REGISTRY_AUTH or the Docker config); --insecure-registry HOST:PORT for a registry without TLS; a rerun resumes")
}

fn invalid(what: String) -> Failure {
    fail(ErrorCode::RestoreBundleInvalid, what)
        .hint("the registry holds something other than a machinen bundle, or it was altered; push the bundle again")
}

fn io_err(what: &str, path: &Path, e: std::io::Error) -> Failure {
    fail(ErrorCode::Io, format!("{what} {}", path.display())).source(e)
}

/// A registry client for `reference`, authenticated for `op`.
struct Session {
    client: Client,
    auth: RegistryAuth,
    reference: Reference,
    rt: Blocking,
}

impl Session {
    fn new(reference: &str, op: RegistryOperation) -> crate::Result<Session> {
        let reference: Reference = reference
            .parse()
            .map_err(|e| failed(format!("{reference} is not a registry reference"), e))?;
        let registry = reference.resolve_registry().to_string();
        let (client, auth) = client_for(&reference);
        let rt = Blocking::new()?;
        rt.block_on(client.auth(&reference, &auth, op))
            .map_err(|e| failed(format!("cannot reach {registry}"), e))?;
        Ok(Session {
            client,
            auth,
            reference,
            rt,
        })
    }

    fn tagged(&self, tag: &str) -> Reference {
        Reference::with_tag(
            self.reference.registry().to_string(),
            self.reference.repository().to_string(),
            tag.to_string(),
        )
    }
}

/// A file of an artifact.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct FileSize {
    name: String,
    size: u64,
}

/// What `push` did.
#[derive(Debug, Clone, Serialize)]
pub struct PushReport {
    pub reference: String,
    /// The tip's manifest digest (`REPO@DIGEST` pulls exactly this).
    pub digest: String,
    /// Bundles pushed: the tip and the parents of its chain.
    pub bundles: usize,
    /// Chunks in all of them (holes are not chunks), and how many the
    /// registry lacked and got.
    pub chunks: usize,
    pub uploaded_chunks: usize,
    pub uploaded_bytes: u64,
    /// Bytes of the bundles' files (apparent).
    pub bytes: u64,
}

/// The tag a chain's parent is pushed under.
fn chain_tag(dir: &Path) -> crate::Result<String> {
    let d = crate::chain::manifest_digest(dir)?;
    Ok(format!("chain-{}", &d[..16]))
}

/// Push the bundle at `dir` (and the parents of its chain) as `reference`.
pub fn push(dir: &Path, reference: &str, progress: ProgressMode) -> crate::Result<PushReport> {
    let dir = fs::canonicalize(dir).map_err(|e| io_err("cannot open", dir, e))?;
    let links = crate::chain::resolve(&dir)?;
    crate::chain::verify_links(&links)?;
    let tip = links
        .last()
        .ok_or_else(|| invalid(format!("{} is empty", dir.display())))?;
    bundle::verify_files(&tip.dir, &tip.manifest, bundle::LARGE_FILES)?;
    let session = Session::new(reference, RegistryOperation::Push)?;
    let step = progress.step(format!("Pushing {}", dir.display()));
    let mut report = PushReport {
        reference: reference.to_string(),
        digest: String::new(),
        bundles: links.len(),
        chunks: 0,
        uploaded_chunks: 0,
        uploaded_bytes: 0,
        bytes: 0,
    };
    let mut parent: Option<String> = None;
    for (i, l) in links.iter().enumerate() {
        let tag = if i + 1 == links.len() {
            session.reference.tag().unwrap_or("latest").to_string()
        } else {
            chain_tag(&l.dir)?
        };
        let parent_path = l.meta.parent.as_ref().map(|p| p.path.clone());
        let digest = push_one(
            &session,
            &l.dir,
            &tag,
            parent.as_deref().zip(parent_path.as_deref()),
            &mut report,
        )?;
        parent = Some(digest);
    }
    report.digest = parent.unwrap_or_default();
    step.done(format!(
        "Pushed {reference}: {} of {} chunks uploaded ({} MiB)",
        report.uploaded_chunks,
        report.chunks,
        report.uploaded_bytes >> 20
    ));
    Ok(report)
}

/// Push one bundle under `tag`; its manifest digest.
fn push_one(
    s: &Session,
    dir: &Path,
    tag: &str,
    parent: Option<(&str, &str)>,
    report: &mut PushReport,
) -> crate::Result<String> {
    let manifest = bundle::read_manifest(dir)?;
    let mut names: Vec<String> = vec![bundle::MANIFEST.into()];
    names.extend(manifest.files.iter().map(|f| f.name.clone()));
    let mut files = Vec::new();
    let mut layers = Vec::new();
    let mut buf = vec![0u8; CHUNK as usize];
    for name in &names {
        let path = dir.join(name);
        let f = bundle::open_regular(&path)?;
        let size = f.metadata().map_err(|e| io_err("reading", &path, e))?.len();
        report.bytes += size;
        files.push(FileSize {
            name: name.clone(),
            size,
        });
        // A delta's RAM: only the pages ram.pages lists, packed end to end.
        if name == bundle::RAM && names.iter().any(|n| n == bundle::RAM_PAGES) {
            let ranges = crate::chain::read_pages(&dir.join(bundle::RAM_PAGES), size)?;
            let mut fill = 0usize;
            let mut packed_off = 0u64;
            let mut send = |data: &[u8], at: u64, report: &mut PushReport| -> crate::Result<()> {
                let layer = upload(s, data, name, at, report)?;
                let mut layer = layer;
                layer["annotations"][PACKED] = bundle::RAM_PAGES.into();
                layers.push(layer);
                Ok(())
            };
            for (first, count) in ranges {
                let (mut at, end) = (
                    first * crate::chain::PAGE,
                    (first + count) * crate::chain::PAGE,
                );
                while at < end {
                    let n = ((end - at) as usize).min(buf.len() - fill);
                    f.read_exact_at(&mut buf[fill..fill + n], at)
                        .map_err(|e| io_err("reading", &path, e))?;
                    fill += n;
                    at += n as u64;
                    if fill == buf.len() {
                        send(&buf, packed_off, report)?;
                        packed_off += fill as u64;
                        fill = 0;
                    }
                }
            }
            if fill > 0 {
                send(&buf[..fill], packed_off, report)?;
            }
            continue;
        }
        // Windows of CHUNK bytes, aligned whatever the extents; in each,
        // the runs of non-zero pages (gaps of up to GAP merged) are the
        // chunks, so a sparse delta's scattered pages cost their size.
        let mut window = u64::MAX;
        for (start, end) in bundle::data_extents(&f, size) {
            let mut off = (start / CHUNK * CHUNK).max(if window == u64::MAX {
                0
            } else {
                window + CHUNK
            });
            while off < end {
                window = off;
                let n = (size - off).min(CHUNK) as usize;
                f.read_exact_at(&mut buf[..n], off)
                    .map_err(|e| io_err("reading", &path, e))?;
                off += CHUNK;
                for (a, b) in runs(&buf[..n]) {
                    layers.push(upload(s, &buf[a..b], name, window + a as u64, report)?);
                }
            }
        }
    }
    let meta = fs::read(dir.join(bundle::META)).map_err(|e| io_err("reading", dir, e))?;
    let meta_digest = format!("sha256:{}", hex::encode(Sha256::digest(&meta)));
    let have =
        s.rt.block_on(s.client.blob_exists(&s.reference, &meta_digest))
            .map_err(|e| failed("asking the registry for the bundle's meta".into(), e))?;
    if !have {
        s.rt.block_on(s.client.push_blob(&s.reference, meta.clone(), &meta_digest))
            .map_err(|e| failed("uploading the bundle's meta".into(), e))?;
    }
    let mut annotations = serde_json::json!({
        FILES: serde_json::to_string(&files).unwrap_or_default(),
        "org.opencontainers.image.title": dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
    });
    if let Some((digest, path)) = parent {
        annotations[PARENT] = digest.into();
        annotations[PARENT_PATH] = path.into();
    }
    let body = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "artifactType": ARTIFACT_TYPE,
        "config": { "mediaType": CONFIG_TYPE, "digest": meta_digest, "size": meta.len() },
        "layers": layers,
        "annotations": annotations,
    }))
    .map_err(|e| fail(ErrorCode::Io, "encoding the manifest").source(e))?;
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
    let ct = http::HeaderValue::from_static(MANIFEST_TYPE);
    s.rt.block_on(s.client.push_manifest_raw(&s.tagged(tag), body, ct))
        .map_err(|e| failed(format!("uploading the manifest of {}", dir.display()), e))?;
    Ok(digest)
}

/// Upload one chunk unless the registry has it; its layer descriptor.
fn upload(
    s: &Session,
    data: &[u8],
    name: &str,
    at: u64,
    report: &mut PushReport,
) -> crate::Result<serde_json::Value> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
    report.chunks += 1;
    let have =
        s.rt.block_on(s.client.blob_exists(&s.reference, &digest))
            .map_err(|e| failed(format!("asking the registry for {digest}"), e))?;
    if !have {
        s.rt.block_on(s.client.push_blob(&s.reference, data.to_vec(), &digest))
            .map_err(|e| failed(format!("uploading {name} at {at}"), e))?;
        report.uploaded_chunks += 1;
        report.uploaded_bytes += data.len() as u64;
    }
    Ok(serde_json::json!({
        "mediaType": CHUNK_TYPE,
        "digest": digest,
        "size": data.len(),
        "annotations": { FILE: name, OFFSET: at.to_string() },
    }))
}

/// Zero pages between two runs that are merged into one chunk rather
/// than cut into two.
const GAP: usize = 16 * PAGE;
const PAGE: usize = 4096;

/// The runs of non-zero pages in `w` (byte ranges; the last may end in a
/// partial page), with gaps of up to [`GAP`] zero bytes merged.
fn runs(w: &[u8]) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < w.len() {
        let end = (at + PAGE).min(w.len());
        if !bundle::is_zero(&w[at..end]) {
            match out.last_mut() {
                Some((_, b)) if at - *b <= GAP => *b = end,
                _ => out.push((at, end)),
            }
        }
        at = end;
    }
    out
}

/// What `pull` did.
#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub reference: String,
    pub dir: PathBuf,
    pub digest: String,
    /// Bundles written (the tip and the parents this host lacked).
    pub bundles: usize,
    pub chunks: usize,
    /// Chunks downloaded (the others were in the chunk cache from an
    /// interrupted pull).
    pub downloaded_chunks: usize,
    pub downloaded_bytes: u64,
}

/// One chunk of a pulled artifact.
struct Chunk {
    file: String,
    offset: u64,
    digest: String,
    size: u64,
    /// The offset is in the packed pages of a delta's RAM.
    packed: bool,
}

/// A pulled manifest, checked.
struct Artifact {
    digest: String,
    files: Vec<FileSize>,
    chunks: Vec<Chunk>,
    parent: Option<(String, String)>,
}

fn parse(reference: &str, bytes: &[u8], digest: &str) -> crate::Result<Artifact> {
    let bad = |why: &str| invalid(format!("{reference}: {why}"));
    if format!("sha256:{}", hex::encode(Sha256::digest(bytes))) != digest {
        return Err(crate::Error::from(bad(
            "the manifest does not match its digest",
        )));
    }
    let m: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|_| bad("the manifest is not JSON"))?;
    if m["artifactType"] != ARTIFACT_TYPE {
        return Err(crate::Error::from(bad(
            "not a machinen bundle (artifact type)",
        )));
    }
    let files: Vec<FileSize> = m["annotations"][FILES]
        .as_str()
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| bad("no file list"))?;
    let mut seen = std::collections::BTreeSet::new();
    for f in &files {
        if !NAMES.contains(&f.name.as_str()) || !seen.insert(f.name.clone()) || f.size > MAX_FILE {
            return Err(crate::Error::from(bad(&format!(
                "file {:?} is not one a bundle holds",
                f.name
            ))));
        }
    }
    if !seen.contains(bundle::MANIFEST) || !seen.contains(bundle::META) {
        return Err(crate::Error::from(bad("no manifest.json or meta.json")));
    }
    let mut chunks = Vec::new();
    for l in m["layers"].as_array().into_iter().flatten() {
        let file = l["annotations"][FILE].as_str().unwrap_or_default();
        let offset: u64 = l["annotations"][OFFSET]
            .as_str()
            .and_then(|o| o.parse().ok())
            .ok_or_else(|| bad("a chunk without an offset"))?;
        let size = l["size"].as_u64().unwrap_or(u64::MAX);
        let digest = l["digest"].as_str().unwrap_or_default().to_string();
        let fsize = files
            .iter()
            .find(|f| f.name == file)
            .map(|f| f.size)
            .ok_or_else(|| bad("a chunk of an unlisted file"))?;
        let hex_ok = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        let packed = l["annotations"][PACKED] == bundle::RAM_PAGES;
        // Inside one CHUNK window of the file, page-aligned; packed RAM
        // pages in whole CHUNKs (checked against ram.pages on assembly).
        let fits = if packed {
            file == bundle::RAM
                && offset.is_multiple_of(CHUNK)
                && size > 0
                && size <= CHUNK
                && size % PAGE as u64 == 0
                && offset < fsize
        } else {
            offset.is_multiple_of(PAGE as u64)
                && size > 0
                && offset
                    .checked_add(size)
                    .is_some_and(|e| e <= fsize && (e - 1) / CHUNK == offset / CHUNK)
        };
        if !fits || !hex_ok {
            return Err(crate::Error::from(bad(&format!(
                "chunk {file}@{offset} is out of place"
            ))));
        }
        chunks.push(Chunk {
            file: file.to_string(),
            offset,
            digest,
            size,
            packed,
        });
    }
    let parent = match (
        m["annotations"][PARENT].as_str(),
        m["annotations"][PARENT_PATH].as_str(),
    ) {
        (Some(d), Some(p)) => Some((d.to_string(), p.to_string())),
        (None, None) => None,
        _ => return Err(crate::Error::from(bad("half a parent"))),
    };
    Ok(Artifact {
        digest: digest.to_string(),
        files,
        chunks,
        parent,
    })
}

/// Where a parent recorded as `rel` (`../NAME`) goes beside `dir`.
fn parent_place(dir: &Path, rel: &str) -> Option<PathBuf> {
    let comps: Vec<Component> = Path::new(rel).components().collect();
    match comps.as_slice() {
        [Component::ParentDir, Component::Normal(name)] => dir.parent().map(|p| p.join(name)),
        _ => None,
    }
}

/// Pull `reference` into `dir` (which must not exist), with the parents of
/// its chain this host lacks beside it.
pub fn pull(
    paths: &Paths,
    reference: &str,
    dir: &Path,
    progress: ProgressMode,
) -> crate::Result<PullReport> {
    pull_into(paths, reference, dir, None, progress)
}

/// [`pull`]; with `store`, every bundle of the chain lives at
/// `store/<its artifact digest>/tip` and a child finds its parent through
/// a symlink, so chains that share a parent (and restores of later
/// checkpoints) fetch it once.
fn pull_into(
    paths: &Paths,
    reference: &str,
    dir: &Path,
    store: Option<&Path>,
    progress: ProgressMode,
) -> crate::Result<PullReport> {
    let dir = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir()
            .map_err(|e| io_err("cannot resolve", dir, e))?
            .join(dir)
    };
    if dir.exists() {
        return Err(bundle::BundleError::Exists { path: dir }.into());
    }
    let session = Session::new(reference, RegistryOperation::Pull)?;
    let step = progress.step(format!("Pulling {reference}"));
    let mut report = PullReport {
        reference: reference.to_string(),
        dir: dir.clone(),
        digest: String::new(),
        bundles: 0,
        chunks: 0,
        downloaded_chunks: 0,
        downloaded_bytes: 0,
    };
    // Walk up the chain: what is missing, tip first.
    let mut wanted = vec![(session.reference.clone(), dir.clone())];
    let mut todo = Vec::new();
    let mut links: Vec<(PathBuf, PathBuf)> = Vec::new();
    while let Some((r, d)) = wanted.pop() {
        if todo.len() > MAX_PARENTS {
            return Err(crate::Error::from(invalid(format!(
                "{reference}: its chain is too long"
            ))));
        }
        let (bytes, digest) = session
            .rt
            .block_on(
                session
                    .client
                    .pull_manifest_raw(&r, &session.auth, &[MANIFEST_TYPE]),
            )
            .map_err(|e| failed(format!("cannot fetch {r}"), e))?;
        let a = parse(&r.whole(), &bytes, &digest)?;
        if report.digest.is_empty() {
            report.digest = digest.clone();
        }
        if let Some((pd, rel)) = &a.parent {
            let place = parent_place(&d, rel).ok_or_else(|| {
                invalid(format!("{}: parent path {rel:?} is not ../NAME", r.whole()))
            })?;
            if let Some(store) = store {
                let canonical = store.join(pd.trim_start_matches("sha256:")).join("tip");
                let queued = todo
                    .iter()
                    .any(|(_, d, _): &(Reference, PathBuf, Artifact)| d == &canonical)
                    || wanted.iter().any(|(_, d)| d == &canonical);
                if !canonical.join(bundle::MANIFEST).is_file() && !queued {
                    wanted.push((r.clone_with_digest(pd.clone()), canonical.clone()));
                }
                links.push((place, canonical));
            } else if !present(&session, &place, pd)? {
                if place.exists() {
                    return Err(bundle::BundleError::Exists { path: place }.into());
                }
                wanted.push((r.clone_with_digest(pd.clone()), place));
            }
        }
        todo.push((r, d, a));
    }
    // Parents first: the tip is complete only once its chain is.
    for (r, d, a) in todo.into_iter().rev() {
        if let Some(parent) = d.parent() {
            crate::assets::fsutil::create_private_dir_all(parent)
                .map_err(|e| io_err("cannot create", parent, e))?;
        }
        fetch_one(paths, &session, &r, &d, &a, &mut report)?;
        report.bundles += 1;
    }
    for (place, canonical) in links {
        if fs::symlink_metadata(&place).is_err() {
            std::os::unix::fs::symlink(&canonical, &place)
                .map_err(|e| io_err("linking", &place, e))?;
        }
    }
    step.done(format!(
        "Pulled {reference} into {} ({} of {} chunks downloaded)",
        dir.display(),
        report.downloaded_chunks,
        report.chunks
    ));
    Ok(report)
}

/// A bundle at `place` whose manifest.json is the one the artifact
/// `digest` holds.
fn present(s: &Session, place: &Path, digest: &str) -> crate::Result<bool> {
    let Ok(mine) = fs::read(place.join(bundle::MANIFEST)) else {
        return Ok(false);
    };
    let r = s.reference.clone_with_digest(digest.to_string());
    let (bytes, got) =
        s.rt.block_on(s.client.pull_manifest_raw(&r, &s.auth, &[MANIFEST_TYPE]))
            .map_err(|e| failed(format!("cannot fetch {}", r.whole()), e))?;
    let a = parse(&r.whole(), &bytes, &got)?;
    let want: Vec<&Chunk> = a
        .chunks
        .iter()
        .filter(|c| c.file == bundle::MANIFEST)
        .collect();
    let mine_digest = format!("sha256:{}", hex::encode(Sha256::digest(&mine)));
    Ok(want.len() == 1 && want[0].digest == mine_digest)
}

fn chunk_path(paths: &Paths, digest: &str) -> PathBuf {
    paths
        .cache
        .join("chunks")
        .join(digest.trim_start_matches("sha256:"))
}

/// Download (or find in the chunk cache) every chunk of `a`, assemble the
/// bundle beside `dir`, verify it and rename it into place.
fn fetch_one(
    paths: &Paths,
    s: &Session,
    r: &Reference,
    dir: &Path,
    a: &Artifact,
    report: &mut PullReport,
) -> crate::Result<()> {
    let cache = paths.cache.join("chunks");
    crate::assets::fsutil::create_private_dir_all(&cache)
        .map_err(|e| io_err("cannot create", &cache, e))?;
    for c in &a.chunks {
        report.chunks += 1;
        let path = chunk_path(paths, &c.digest);
        if holds(&path, c) {
            continue;
        }
        let tmp = crate::assets::fsutil::temp_sibling(&path, "pull");
        let got = s.rt.block_on(async {
            let f = tokio::fs::File::create(&tmp).await.map_err(|e| {
                oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
            })?;
            s.client.pull_blob(r, c.digest.as_str(), f).await
        });
        if let Err(e) = got {
            let _ = fs::remove_file(&tmp);
            // Content that is not what its digest says was altered: not
            // something a retry mends.
            if matches!(e, oci_client::errors::OciDistributionError::DigestError(_)) {
                return Err(invalid(format!(
                    "{}: chunk {}@{} does not match its digest",
                    r.whole(),
                    c.file,
                    c.offset
                ))
                .source(e)
                .into());
            }
            return Err(failed(format!("downloading {}@{}", c.file, c.offset), e).into());
        }
        if !holds(&tmp, c) {
            let _ = fs::remove_file(&tmp);
            return Err(crate::Error::from(invalid(format!(
                "{}: chunk {}@{} does not match its digest",
                r.whole(),
                c.file,
                c.offset
            ))));
        }
        crate::assets::fsutil::persist(&tmp, &path).map_err(|e| io_err("storing", &path, e))?;
        report.downloaded_chunks += 1;
        report.downloaded_bytes += c.size;
    }
    let builder = bundle::Builder::new(dir)?;
    for f in &a.files {
        let p = builder.path(&f.name);
        let out = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&p)
            .map_err(|e| io_err("creating", &p, e))?;
        out.set_len(f.size).map_err(|e| io_err("sizing", &p, e))?;
        for c in a.chunks.iter().filter(|c| c.file == f.name && !c.packed) {
            let src = chunk_path(paths, &c.digest);
            let bytes = fs::read(&src).map_err(|e| io_err("reading", &src, e))?;
            out.write_all_at(&bytes, c.offset)
                .map_err(|e| io_err("writing", &p, e))?;
        }
    }
    unpack_ram(paths, r, a, &builder)?;
    // The bundle's own manifest is the last word on every file.
    bundle::verify(&builder.tmp)?;
    let done = builder.finish_verbatim()?;
    for c in &a.chunks {
        let _ = fs::remove_file(chunk_path(paths, &c.digest));
    }
    tracing::info!(
        "pulled {} ({}) into {}",
        r.whole(),
        a.digest,
        done.display()
    );
    Ok(())
}

/// A delta's RAM pushed packed: put each page `ram.pages` lists back at
/// its offset. The packed chunks must cover exactly those pages, in order.
fn unpack_ram(
    paths: &Paths,
    r: &Reference,
    a: &Artifact,
    builder: &bundle::Builder,
) -> crate::Result<()> {
    let mut packed: Vec<&Chunk> = a.chunks.iter().filter(|c| c.packed).collect();
    if packed.is_empty() {
        return Ok(());
    }
    packed.sort_by_key(|c| c.offset);
    let ram = builder.path(bundle::RAM);
    let size = fs::metadata(&ram)
        .map_err(|e| io_err("reading", &ram, e))?
        .len();
    let ranges = crate::chain::read_pages(&builder.path(bundle::RAM_PAGES), size)?;
    let total: u64 = ranges.iter().map(|(_, n)| n * crate::chain::PAGE).sum();
    let mut expect = 0;
    for c in &packed {
        let last = c.offset + c.size == total;
        if c.offset != expect || (c.size != CHUNK && !last) {
            return Err(
                invalid(format!("{}: the packed RAM pages are not whole", r.whole())).into(),
            );
        }
        expect += c.size;
    }
    if expect != total {
        return Err(invalid(format!(
            "{}: the packed RAM pages do not match ram.pages",
            r.whole()
        ))
        .into());
    }
    let out = fs::OpenOptions::new()
        .write(true)
        .open(&ram)
        .map_err(|e| io_err("opening", &ram, e))?;
    let mut chunks = packed.into_iter();
    let (mut cur, mut at): (Vec<u8>, usize) = (Vec::new(), 0);
    for (first, count) in ranges {
        let (mut off, end) = (
            first * crate::chain::PAGE,
            (first + count) * crate::chain::PAGE,
        );
        while off < end {
            if at == cur.len() {
                let c = chunks
                    .next()
                    .ok_or_else(|| invalid(format!("{}: packed RAM ends early", r.whole())))?;
                let src = chunk_path(paths, &c.digest);
                cur = fs::read(&src).map_err(|e| io_err("reading", &src, e))?;
                at = 0;
            }
            let n = ((end - off) as usize).min(cur.len() - at);
            if !bundle::is_zero(&cur[at..at + n]) {
                out.write_all_at(&cur[at..at + n], off)
                    .map_err(|e| io_err("writing", &ram, e))?;
            }
            at += n;
            off += n as u64;
        }
    }
    Ok(())
}

/// The file at `path` is chunk `c`: its digest and size.
fn holds(path: &Path, c: &Chunk) -> bool {
    crate::assets::fsutil::sha256_file(path)
        .is_ok_and(|(hex, size)| size == c.size && format!("sha256:{hex}") == c.digest)
}

/// Does `s` name a registry reference rather than a directory here?
pub fn is_reference(s: &str) -> bool {
    let p = Path::new(s);
    if p.exists() || s.starts_with('/') || s.starts_with('.') {
        return false;
    }
    let host = s.split('/').next().unwrap_or_default();
    s.contains('/') && (host.contains('.') || host.contains(':') || host == "localhost")
}

/// Pull `reference` into the cache for a restore: `<cache>/bundles/<digest>/tip`,
/// each parent at its own digest's place and linked where its child
/// expects it, so a restore of checkpoint 2 on a host that restored
/// checkpoint 1 fetches the delta only. A reference pulled before is
/// fetched again only if it moved.
pub fn pull_for_restore(
    paths: &Paths,
    reference: &str,
    progress: ProgressMode,
) -> crate::Result<PathBuf> {
    let session = Session::new(reference, RegistryOperation::Pull)?;
    let (_, digest) = session
        .rt
        .block_on(session.client.pull_manifest_raw(
            &session.reference,
            &session.auth,
            &[MANIFEST_TYPE],
        ))
        .map_err(|e| failed(format!("cannot fetch {reference}"), e))?;
    let exact = Reference::with_digest(
        session.reference.registry().to_string(),
        session.reference.repository().to_string(),
        digest.clone(),
    )
    .whole();
    drop(session);
    let dir = paths
        .cache
        .join("bundles")
        .join(digest.trim_start_matches("sha256:"))
        .join("tip");
    if dir.join(bundle::MANIFEST).is_file() {
        return Ok(dir);
    }
    let store = paths.cache.join("bundles");
    crate::assets::fsutil::create_private_dir_all(dir.parent().unwrap_or(&dir))
        .map_err(|e| io_err("cannot create", &dir, e))?;
    pull_into(paths, &exact, &dir, Some(&store), progress)?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_paths_are_told_apart() {
        assert!(is_reference("127.0.0.1:5000/ckpt:1"));
        assert!(is_reference("registry.example/team/ckpt@sha256:ab"));
        assert!(is_reference("localhost/ckpt"));
        assert!(!is_reference("./ckpt"));
        assert!(!is_reference("/tmp/ckpt"));
        assert!(!is_reference("ckpt"));
        assert!(!is_reference("some/dir"));
    }

    #[test]
    fn parents_go_beside_the_tip_only() {
        let d = Path::new("/x/pulls/tip");
        assert_eq!(parent_place(d, "../c1"), Some(PathBuf::from("/x/pulls/c1")));
        assert_eq!(parent_place(d, "../../c1"), None);
        assert_eq!(parent_place(d, "/etc"), None);
        assert_eq!(parent_place(d, "c1"), None);
        assert_eq!(parent_place(d, "../a/b"), None);
    }

    fn manifest(layers: serde_json::Value, files: &str) -> (Vec<u8>, String) {
        let body = serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "artifactType": ARTIFACT_TYPE,
            "config": {},
            "layers": layers,
            "annotations": { FILES: files },
        }))
        .expect("json");
        let d = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
        (body, d)
    }

    #[test]
    fn chunks_are_the_non_zero_runs_with_small_gaps_merged() {
        let mut w = vec![0u8; 64 * PAGE];
        for p in [0, 1, 10, 40, 63] {
            w[p * PAGE] = 1;
        }
        // 1→10: a gap of 8 pages, merged; 10→40: 29 pages, cut.
        assert_eq!(
            runs(&w),
            vec![
                (0, 11 * PAGE),
                (40 * PAGE, 41 * PAGE),
                (63 * PAGE, 64 * PAGE)
            ]
        );
        assert!(runs(&vec![0u8; 3 * PAGE]).is_empty());
        assert_eq!(runs(&[1u8; 100]), vec![(0, 100)]);
    }

    #[test]
    fn hostile_manifests_are_refused() {
        let files = r#"[{"name":"manifest.json","size":10},{"name":"meta.json","size":10},{"name":"state.vmstate","size":5000000}]"#;
        let good = serde_json::json!([{
            "digest": format!("sha256:{}", "a".repeat(64)), "size": 4194304,
            "annotations": { FILE: "state.vmstate", OFFSET: "0" }
        }]);
        let (b, d) = manifest(good, files);
        assert!(parse("r", &b, &d).is_ok());
        assert!(parse("r", &b, "sha256:00").is_err(), "digest mismatch");
        for (layer, f) in [
            // Not on a chunk boundary, past the end, wrong size.
            (
                serde_json::json!([{ "digest": format!("sha256:{}", "a".repeat(64)), "size": 4096, "annotations": { FILE: "state.vmstate", OFFSET: "1" }}]),
                files,
            ),
            (
                serde_json::json!([{ "digest": format!("sha256:{}", "a".repeat(64)), "size": 10, "annotations": { FILE: "state.vmstate", OFFSET: "8388608" }}]),
                files,
            ),
            (
                serde_json::json!([{ "digest": format!("sha256:{}", "a".repeat(64)), "size": 8192, "annotations": { FILE: "state.vmstate", OFFSET: "4190208" }}]),
                files,
            ),
            (
                serde_json::json!([{ "digest": format!("sha256:{}", "a".repeat(64)), "size": 0, "annotations": { FILE: "state.vmstate", OFFSET: "0" }}]),
                files,
            ),
            // A file a bundle does not hold, a path.
            (
                serde_json::json!([]),
                r#"[{"name":"manifest.json","size":1},{"name":"meta.json","size":1},{"name":"../x","size":1}]"#,
            ),
            (serde_json::json!([]), r#"[{"name":"meta.json","size":1}]"#),
        ] {
            let (b, d) = manifest(layer, f);
            assert!(parse("r", &b, &d).is_err(), "{f}");
        }
    }
}
