//! `machinen images push IMAGE REF`: a baked image (or any image machinen
//! boots) into a registry as an ordinary container image, so `docker
//! pull`, `podman run` and Kubernetes take it as they take any other.
//!
//! The image is first exported to an OCI layout in the cache (one layer,
//! its baked settings as the config: see [`super::export`]), then its
//! blobs are uploaded unless the registry has them already (a re-push of
//! an unchanged image uploads only the manifest) and the manifest is put
//! under the reference's tag. The layer is streamed from its file, never
//! held in memory whole.

use std::path::Path;

use futures::StreamExt;
use oci_client::{Reference, RegistryOperation};
use serde::Serialize;

use super::export::{export, Target};
use super::registry::{client_for, qualify, Blocking};
use crate::error::{fail, ErrorCode, Failure};
use crate::paths::Paths;
use crate::progress::ProgressMode;

/// What [`push`] did.
#[derive(Debug, Clone, Serialize)]
pub struct Pushed {
    /// The reference with its registry.
    pub reference: String,
    /// `sha256:…` of the manifest: `REPO@DIGEST` pulls exactly this.
    pub digest: String,
    /// Blobs (config and layer) the registry lacked and got, and their bytes.
    pub uploaded_blobs: usize,
    pub uploaded_bytes: u64,
}

fn failed(what: String, e: impl std::error::Error + Send + Sync + 'static) -> Failure {
    fail(ErrorCode::ImagePushFailed, what)
        .source(e)
        .hint("check the reference, the registry's address and your credentials for pushing (MACHINEN_REGISTRY_AUTH or the Docker config); --insecure-registry HOST:PORT for a registry without TLS")
}

/// Push `image` (a rootfs tarball or an image reference machinen boots) to
/// the registry `reference` (`HOST[:PORT]/REPO[:TAG]`; short names through
/// `MACHINEN_DEFAULT_REGISTRY`).
pub fn push(
    paths: &Paths,
    image: &Path,
    reference: &str,
    progress: ProgressMode,
) -> Result<Pushed, Failure> {
    let qualified = qualify(reference).map_err(|f| {
        fail(ErrorCode::ImagePushFailed, f.message).hint(
            "name the destination as HOST[:PORT]/REPO[:TAG], e.g. registry.example:5000/team/app:1",
        )
    })?;
    let target: Reference = qualified
        .parse()
        .map_err(|e| failed(format!("{qualified} is not a registry reference"), e))?;
    if target.digest().is_some() {
        return Err(fail(
            ErrorCode::ImagePushFailed,
            format!("{reference} names a digest; a push needs a tag"),
        )
        .hint("push to REPO:TAG; the digest is printed after the push"));
    }
    let tarball = super::resolve(paths, image, progress)?;
    crate::assets::fsutil::create_private_dir_all(&paths.cache)
        .map_err(|e| fail(ErrorCode::Io, "cannot create the cache").source(e))?;
    let staging = tempfile::Builder::new()
        .prefix(".push-")
        .tempdir_in(&paths.cache)
        .map_err(|e| fail(ErrorCode::Io, "cannot create a staging directory").source(e))?;
    let layout = staging.path().join("layout");
    let step = progress.step(format!("Preparing {}", image.display()));
    let exported = export(
        &tarball,
        &Target::Layout {
            dir: layout.clone(),
            tag: "push".into(),
        },
    )?;
    step.done(format!("Prepared {}", image.display()));

    let (client, auth) = client_for(&target);
    let rt = Blocking::new()?;
    let registry = target.resolve_registry().to_string();
    rt.block_on(client.auth(&target, &auth, RegistryOperation::Push))
        .map_err(|e| failed(format!("cannot push to {registry}"), e))?;
    let mut pushed = Pushed {
        reference: qualified.clone(),
        digest: exported.manifest_digest.clone(),
        uploaded_blobs: 0,
        uploaded_bytes: 0,
    };
    let step = progress.step(format!("Pushing {qualified}"));
    for digest in [&exported.layer_digest, &exported.config_digest] {
        let have = rt
            .block_on(client.blob_exists(&target, digest))
            .map_err(|e| failed(format!("asking {registry} for {digest}"), e))?;
        if have {
            continue;
        }
        let path = layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"));
        let size = std::fs::metadata(&path)
            .map_err(|e| fail(ErrorCode::Io, format!("cannot read {}", path.display())).source(e))?
            .len();
        let (client, target, path, digest_owned) =
            (&client, &target, path.clone(), digest.to_string());
        rt.block_on(async move {
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|e| failed(format!("cannot read {}", path.display()), e))?;
            // Chunks of a few MiB: the registry gets a few PATCHes per
            // layer, memory holds one chunk.
            let stream = tokio_util::io::ReaderStream::with_capacity(file, 4 << 20).map(|r| {
                r.map_err(|e| {
                    oci_client::errors::OciDistributionError::GenericError(Some(e.to_string()))
                })
            });
            client
                .push_blob_stream(target, stream, &digest_owned, Some(size))
                .await
                .map_err(|e| failed(format!("uploading {digest_owned}"), e))
        })?;
        pushed.uploaded_blobs += 1;
        pushed.uploaded_bytes += size;
    }
    let manifest_path = layout
        .join("blobs/sha256")
        .join(exported.manifest_digest.trim_start_matches("sha256:"));
    let manifest = std::fs::read(&manifest_path).map_err(|e| {
        fail(
            ErrorCode::Io,
            format!("cannot read {}", manifest_path.display()),
        )
        .source(e)
    })?;
    let ct = http::HeaderValue::from_static(super::export::MEDIA_MANIFEST);
    rt.block_on(client.push_manifest_raw(&target, manifest, ct))
        .map_err(|e| failed(format!("uploading the manifest of {qualified}"), e))?;
    step.done(format!(
        "Pushed {qualified} ({} MiB uploaded)",
        pushed.uploaded_bytes >> 20
    ));
    Ok(pushed)
}
