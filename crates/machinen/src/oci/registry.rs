//! Pulling images from an OCI distribution registry (`HOST[:PORT]/REPO[:TAG|@DIGEST]`).
//!
//! Pulled content goes into one OCI image layout in the cache,
//! `<cache>/oci/store`, shared by every pull: blobs by digest (an image
//! sharing a base with another downloads only its own layers), and
//! `index.json` naming each pulled reference. A boot then reads the image
//! from that layout like any `oci:` one (same checks, same flattening), so
//! a reference that was pulled once boots without the network; `machinen
//! pull` fetches it again.
//!
//! Credentials: `MACHINEN_REGISTRY_AUTH` (`USER:PASSWORD`), else what the
//! Docker config (`$DOCKER_CONFIG/config.json` or `~/.docker/config.json`)
//! gives for the registry, as Docker reads it: its credential helper
//! (`credHelpers.HOST`, else `credsStore`: `docker-credential-NAME get`, the
//! registry on stdin, bounded by [`HELPER_TIMEOUT`]), else `auths.HOST.auth`;
//! else anonymous. They are never logged. HTTPS, except for the registries named in
//! `MACHINEN_INSECURE_REGISTRIES` (`--insecure-registry HOST[:PORT]`).

use std::fs;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{invalid, INDEX_TYPES, MANIFEST_TYPES};
use crate::error::{fail, ErrorCode, Failure};
use crate::progress::ProgressMode;

/// The reference in `image` when it names a registry image: `docker://REF`,
/// or a name that is not a file here and does not look like one (`/…`,
/// `./…`, `*.tar`, `*.tar.gz`, `*.tgz`).
pub fn reference_in(image: &Path) -> Option<String> {
    let s = image.to_str()?;
    if let Some(r) = s.strip_prefix("docker://") {
        return Some(r.to_string());
    }
    let pathlike = s.starts_with('/')
        || s.starts_with("./")
        || s.starts_with("../")
        || [".tar", ".tar.gz", ".tgz"].iter().any(|e| s.ends_with(e));
    if s.is_empty() || pathlike || image.exists() || s.chars().any(char::is_whitespace) {
        return None;
    }
    Some(s.to_string())
}

/// `reference` with its registry: a short name (no host in its first
/// component) goes to `MACHINEN_DEFAULT_REGISTRY`.
pub fn qualify(reference: &str) -> Result<String, Failure> {
    let first = reference.split('/').next().unwrap_or_default();
    let has_host = reference.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_host {
        reference.to_string()
    } else {
        let default = std::env::var(machinen_proto::env::DEFAULT_REGISTRY)
            .ok()
            .filter(|d| !d.is_empty())
            .ok_or_else(|| {
                fail(
                    ErrorCode::ImagePullFailed,
                    format!("{reference:?} is not a file here, and as an image reference it names no registry"),
                )
                .hint(format!(
                    "give a tarball path, HOST[:PORT]/REPO[:TAG], or set {} to the registry short names come from",
                    machinen_proto::env::DEFAULT_REGISTRY
                ))
            })?;
        format!("{}/{reference}", default.trim_end_matches('/'))
    };
    // Validated by the parser the client uses.
    let r: Reference = full.parse().map_err(|e| {
        fail(
            ErrorCode::ImagePullFailed,
            format!("{reference:?} is not an image reference"),
        )
        .source(e)
        .hint("e.g. registry.example:5000/team/app:1.2 or …/app@sha256:…")
    })?;
    Ok(r.whole())
}

/// A client for `reference`'s registry (plain HTTP only when it is named
/// insecure) and the credentials for it.
pub(crate) fn client_for(reference: &Reference) -> (Client, RegistryAuth) {
    let registry = reference.resolve_registry().to_string();
    let client = Client::new(ClientConfig {
        protocol: if insecure(&registry) {
            ClientProtocol::HttpsExcept(vec![registry.clone()])
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    (client, credentials(&registry))
}

fn insecure(registry: &str) -> bool {
    std::env::var(machinen_proto::env::INSECURE_REGISTRIES)
        .unwrap_or_default()
        .split(',')
        .any(|r| r.trim() == registry)
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: std::collections::BTreeMap<String, DockerAuth>,
    /// Registry → credential helper name (`docker-credential-NAME`).
    #[serde(default)]
    cred_helpers: std::collections::BTreeMap<String, String>,
    /// The helper for every other registry.
    #[serde(default)]
    creds_store: Option<String>,
}

/// How long a credential helper may take (some ask a keyring or a user).
pub const HELPER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// A config key (`https://HOST/v1/`, `HOST`) names `registry`.
fn names(key: &str, registry: &str) -> bool {
    let k = key
        .trim_start_matches("https://")
        .trim_start_matches("http://");
    k.split('/').next() == Some(registry)
}

impl DockerConfig {
    /// The credential helper Docker would ask for `registry`.
    fn helper(&self, registry: &str) -> Option<&str> {
        self.cred_helpers
            .iter()
            .find(|(k, _)| names(k, registry))
            .map(|(_, h)| h.as_str())
            .or(self.creds_store.as_deref())
            .filter(|h| {
                !h.is_empty()
                    && h.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            })
    }
}

/// `PROGRAM get` with `server` on stdin, as the Docker credential helper
/// protocol has it: `{"ServerURL", "Username", "Secret"}` on stdout.
/// `None` when it fails, times out, knows nothing of `server`, or answers
/// with an identity token (`Username` `<token>`: an OAuth refresh token,
/// which this client cannot exchange).
fn helper_credentials(program: &Path, server: &str) -> Option<RegistryAuth> {
    use std::io::{Read, Write};
    use std::process::{Command, Stdio};
    #[derive(Deserialize)]
    struct Answer {
        #[serde(rename = "Username")]
        username: String,
        #[serde(rename = "Secret")]
        secret: String,
    }
    let mut child = Command::new(program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| tracing::info!("credential helper {}: {e}", program.display()))
        .ok()?;
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(server.as_bytes());
    }
    let stdout = child.stdout.take()?;
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.take(1 << 20).read_to_end(&mut out);
        out
    });
    let deadline = std::time::Instant::now() + HELPER_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Some(st),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            _ => {
                tracing::info!(
                    "credential helper {} did not answer in time",
                    program.display()
                );
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let out = reader.join().ok()?;
    if !status?.success() {
        return None;
    }
    let a: Answer = serde_json::from_slice(&out).ok()?;
    (a.username != "<token>" && !a.username.is_empty())
        .then_some(RegistryAuth::Basic(a.username, a.secret))
}

#[derive(Deserialize, Default)]
struct DockerAuth {
    #[serde(default)]
    auth: Option<String>,
}

fn credentials(registry: &str) -> RegistryAuth {
    if let Ok(v) = std::env::var(machinen_proto::env::REGISTRY_AUTH) {
        if let Some((u, p)) = v.split_once(':') {
            return RegistryAuth::Basic(u.to_string(), p.to_string());
        }
    }
    let dir = std::env::var_os("DOCKER_CONFIG")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".docker")));
    let config: DockerConfig = dir
        .and_then(|d| fs::read(d.join("config.json")).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();
    from_config(&config, registry, |helper| {
        helper_credentials(Path::new(&format!("docker-credential-{helper}")), registry)
    })
}

/// Docker's order: the registry's helper, then its `auths` entry.
fn from_config(
    config: &DockerConfig,
    registry: &str,
    ask: impl FnOnce(&str) -> Option<RegistryAuth>,
) -> RegistryAuth {
    if let Some(auth) = config.helper(registry).and_then(ask) {
        return auth;
    }
    config
        .auths
        .iter()
        .find(|(k, _)| names(k, registry))
        .and_then(|(_, a)| a.auth.as_deref())
        .and_then(|a| base64::engine::general_purpose::STANDARD.decode(a).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            s.split_once(':')
                .map(|(u, p)| RegistryAuth::Basic(u.to_string(), p.to_string()))
        })
        .unwrap_or(RegistryAuth::Anonymous)
}

fn pull_failed(reference: &str, e: impl std::error::Error + Send + Sync + 'static) -> Failure {
    fail(ErrorCode::ImagePullFailed, format!("cannot pull {reference}"))
        .source(e)
        .hint("check the reference, the registry's address and your credentials (MACHINEN_REGISTRY_AUTH or the Docker config); --insecure-registry HOST:PORT for a registry without TLS")
}

/// Runs the client's futures to completion from synchronous code, on a
/// runtime of its own in a thread of its own: callers may be on an async
/// runtime's thread (which must not block on one itself) or not.
pub(crate) struct Blocking {
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Blocking {
    fn drop(&mut self) {
        // A plain drop would block, which an async thread must not.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Blocking {
    pub(crate) fn new() -> Result<Blocking, Failure> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| fail(ErrorCode::Io, "cannot start the registry client").source(e))?;
        Ok(Blocking { rt: Some(rt) })
    }

    pub(crate) fn block_on<F>(&self, f: F) -> F::Output
    where
        F: std::future::Future + Send,
        F::Output: Send,
    {
        std::thread::scope(|s| {
            s.spawn(|| match &self.rt {
                Some(rt) => rt.block_on(f),
                None => unreachable!("the runtime lives until drop"),
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }
}

/// Where pulled images live: an OCI layout.
pub fn store(paths: &crate::paths::Paths) -> PathBuf {
    paths.cache.join("oci").join("store")
}

fn blob_path(store: &Path, digest: &str) -> Result<PathBuf, Failure> {
    Ok(store.join("blobs/sha256").join(super::sha256_hex(digest)?))
}

/// Keep `bytes` as the blob `digest` (checked) in the store.
fn put_blob(store: &Path, digest: &str, bytes: &[u8]) -> Result<(), Failure> {
    let path = blob_path(store, digest)?;
    if format!("sha256:{}", hex::encode(Sha256::digest(bytes))) != digest {
        return Err(invalid(format!(
            "the registry sent content that does not match {digest}"
        )));
    }
    if !path.exists() {
        crate::assets::fsutil::write_atomic(&path, bytes).map_err(|e| {
            fail(ErrorCode::Io, format!("cannot write {}", path.display())).source(e)
        })?;
    }
    Ok(())
}

/// Held while `qualified` is pulled, so concurrent boots pull it once.
pub(crate) fn lock_reference(
    store: &Path,
    qualified: &str,
) -> Result<crate::assets::fsutil::FileLock, Failure> {
    let dir = store.join("locks");
    fs::create_dir_all(&dir)
        .map_err(|e| fail(ErrorCode::Io, format!("cannot create {}", dir.display())).source(e))?;
    let path = dir.join(format!(
        "{}.lock",
        hex::encode(Sha256::digest(qualified.as_bytes()))
    ));
    crate::assets::fsutil::lock_exclusive(&path)
        .map_err(|e| fail(ErrorCode::Io, format!("cannot lock {}", path.display())).source(e))
}

/// Is the reference in the store's index already?
pub fn pulled(store: &Path, qualified: &str) -> bool {
    fs::read(store.join("index.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| {
            v["manifests"].as_array().is_some_and(|m| {
                m.iter().any(|d| {
                    d["annotations"]["org.opencontainers.image.ref.name"].as_str()
                        == Some(qualified)
                })
            })
        })
}

/// Fetch `qualified` into the store (manifests, config and layers that are
/// not there yet) and name it in the store's index.
pub fn pull(store: &Path, qualified: &str, progress: ProgressMode) -> Result<(), Failure> {
    let reference: Reference = qualified.parse().map_err(|e| pull_failed(qualified, e))?;
    let (client, auth) = client_for(&reference);
    fs::create_dir_all(store.join("blobs/sha256"))
        .map_err(|e| fail(ErrorCode::Io, format!("cannot create {}", store.display())).source(e))?;
    let step = progress.step(format!("Pulling {qualified}"));
    let handle = Blocking::new()?;
    let accepted: Vec<&str> = INDEX_TYPES.iter().chain(MANIFEST_TYPES).copied().collect();
    let (top_bytes, top_digest) = handle
        .block_on(client.pull_manifest_raw(&reference, &auth, &accepted))
        .map_err(|e| pull_failed(qualified, e))?;
    put_blob(store, &top_digest, &top_bytes)?;
    let top: serde_json::Value = serde_json::from_slice(&top_bytes)
        .map_err(|e| invalid(format!("{qualified}'s manifest is not valid JSON")).source(e))?;
    let top_type = top["mediaType"].as_str().unwrap_or_default().to_string();
    // An index: fetch the host platform's manifest (others are not needed).
    let manifest_bytes = if INDEX_TYPES.contains(&top_type.as_str()) {
        let arch = super::host_arch();
        let entry = top["manifests"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["platform"]["os"] == "linux" && m["platform"]["architecture"] == arch)
            .ok_or_else(|| {
                fail(
                    ErrorCode::ImagePlatformMismatch,
                    format!("{qualified} has no image for linux/{arch}"),
                )
            })?;
        let digest = entry["digest"].as_str().unwrap_or_default().to_string();
        let by_digest = reference.clone_with_digest(digest.clone());
        let (bytes, got) = handle
            .block_on(client.pull_manifest_raw(&by_digest, &auth, MANIFEST_TYPES))
            .map_err(|e| pull_failed(qualified, e))?;
        if got != digest {
            return Err(invalid(format!(
                "{qualified}: the registry sent {got} for {digest}"
            )));
        }
        put_blob(store, &digest, &bytes)?;
        bytes
    } else {
        top_bytes.clone()
    };
    let manifest: serde_json::Value = serde_json::from_slice(&manifest_bytes)
        .map_err(|e| invalid(format!("{qualified}'s manifest is not valid JSON")).source(e))?;
    let blobs = std::iter::once(&manifest["config"])
        .chain(manifest["layers"].as_array().into_iter().flatten())
        .filter_map(|d| d["digest"].as_str())
        .map(str::to_string)
        .collect::<Vec<_>>();
    for digest in blobs {
        let path = blob_path(store, &digest)?;
        if path.exists() {
            continue;
        }
        let tmp = crate::assets::fsutil::temp_sibling(&path, "pull");
        let r = handle.block_on(async {
            let f = tokio::fs::File::create(&tmp).await?;
            client
                .pull_blob(&reference, digest.as_str(), f)
                .await
                .map_err(std::io::Error::other)
        });
        match r.and_then(|()| crate::assets::fsutil::persist(&tmp, &path)) {
            Ok(()) => {}
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(pull_failed(qualified, e));
            }
        }
    }
    name_in_index(
        store,
        qualified,
        &top_type,
        &top_digest,
        top_bytes.len() as u64,
    )?;
    step.done(format!("Pulled {qualified}"));
    Ok(())
}

/// Held while the store's index is changed or its blobs pruned.
pub(crate) fn lock_store(store: &Path) -> Result<crate::assets::fsutil::FileLock, Failure> {
    fs::create_dir_all(store)
        .map_err(|e| fail(ErrorCode::Io, format!("cannot create {}", store.display())).source(e))?;
    crate::assets::fsutil::lock_exclusive(&store.join("index.lock"))
        .map_err(|e| fail(ErrorCode::Io, "cannot lock the image store").source(e))
}

/// Drop `qualified` from the store's index (its blobs stay until a prune).
pub(crate) fn unname(store: &Path, qualified: &str) -> Result<(), Failure> {
    let _lock = lock_store(store)?;
    let index_path = store.join("index.json");
    let Ok(bytes) = fs::read(&index_path) else {
        return Ok(());
    };
    let mut index: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|e| invalid("the image store's index is damaged").source(e))?;
    if let Some(list) = index["manifests"].as_array_mut() {
        list.retain(|d| {
            d["annotations"]["org.opencontainers.image.ref.name"].as_str() != Some(qualified)
        });
    }
    let bytes = serde_json::to_vec_pretty(&index)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the index").source(e))?;
    crate::assets::fsutil::write_atomic(&index_path, &bytes)
        .map_err(|e| fail(ErrorCode::Io, "cannot update the image store").source(e))
}

/// Point `qualified` at the pulled top-level manifest in the store's index.
fn name_in_index(
    store: &Path,
    qualified: &str,
    media_type: &str,
    digest: &str,
    size: u64,
) -> Result<(), Failure> {
    let io = |e: std::io::Error| fail(ErrorCode::Io, "cannot update the image store").source(e);
    let _lock = lock_store(store)?;
    let index_path = store.join("index.json");
    let mut index: serde_json::Value = fs::read(&index_path)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"schemaVersion": 2, "manifests": []}));
    let key = "org.opencontainers.image.ref.name";
    let list = index["manifests"]
        .as_array_mut()
        .ok_or_else(|| invalid("the image store's index is damaged"))?;
    list.retain(|d| d["annotations"][key].as_str() != Some(qualified));
    let media_type = if media_type.is_empty() {
        MANIFEST_TYPES[0]
    } else {
        media_type
    };
    list.push(serde_json::json!({
        "mediaType": media_type, "digest": digest, "size": size,
        "annotations": {key: qualified}
    }));
    crate::assets::fsutil::write_atomic(
        &store.join("oci-layout"),
        br#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .map_err(io)?;
    let bytes = serde_json::to_vec_pretty(&index)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the index").source(e))?;
    crate::assets::fsutil::write_atomic(&index_path, &bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_and_paths() {
        for (s, want) in [
            ("docker://host:5000/app:1", Some("host:5000/app:1")),
            ("host:5000/app:1", Some("host:5000/app:1")),
            ("python:3.12-slim", Some("python:3.12-slim")),
            ("./app.tar.gz", None),
            ("/abs/app", None),
            ("app.tar.gz", None),
            ("img.tar", None),
            ("", None),
        ] {
            assert_eq!(reference_in(Path::new(s)).as_deref(), want, "{s}");
        }
    }

    #[test]
    fn short_names_need_a_default_registry() {
        assert_eq!(
            qualify("127.0.0.1:5000/team/app:1").expect("full"),
            "127.0.0.1:5000/team/app:1"
        );
        assert_eq!(
            qualify("localhost/app").expect("localhost"),
            "localhost/app:latest"
        );
    }

    /// A real helper process (a script speaking the protocol): asked with
    /// the registry on stdin; an identity token, a failure or a helper
    /// that hangs give nothing.
    #[test]
    fn credential_helpers_answer_in_dockers_order() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let script = |name: &str, body: &str| {
            let p = dir.path().join(name);
            fs::write(&p, format!("#!/bin/sh\n{body}\n")).expect("script");
            fs::set_permissions(&p, fs::Permissions::from_mode(0o755)).expect("chmod");
            p
        };
        let good = script(
            "good",
            r#"read server; [ "$1" = get ] || exit 3; printf '{"ServerURL":"%s","Username":"u-%s","Secret":"s3"}' "$server" "$server""#,
        );
        match helper_credentials(&good, "reg.local:5000") {
            Some(RegistryAuth::Basic(u, p)) => {
                assert_eq!((u.as_str(), p.as_str()), ("u-reg.local:5000", "s3"))
            }
            other => panic!("{other:?}"),
        }
        let token = script(
            "token",
            r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
        );
        assert!(helper_credentials(&token, "r").is_none());
        let failing = script("failing", "echo 'credentials not found' >&2; exit 1");
        assert!(helper_credentials(&failing, "r").is_none());
        assert!(helper_credentials(&dir.path().join("missing"), "r").is_none());

        let config: DockerConfig = serde_json::from_str(
            r#"{"auths": {"https://reg.local:5000/v1/": {"auth": "YTpi"}},
                "credHelpers": {"helped.local": "pass"}, "credsStore": "desktop"}"#,
        )
        .expect("config");
        assert_eq!(config.helper("helped.local"), Some("pass"));
        assert_eq!(config.helper("other.local"), Some("desktop"));
        // The helper knows nothing: the auths entry (a:b) answers.
        match from_config(&config, "reg.local:5000", |_| None) {
            RegistryAuth::Basic(u, p) => assert_eq!((u.as_str(), p.as_str()), ("a", "b")),
            other => panic!("{other:?}"),
        }
        match from_config(&config, "helped.local", |h| {
            Some(RegistryAuth::Basic(h.into(), "x".into()))
        }) {
            RegistryAuth::Basic(u, _) => assert_eq!(u, "pass"),
            other => panic!("{other:?}"),
        }
        let bad: DockerConfig =
            serde_json::from_str(r#"{"credsStore": "../../bin/sh"}"#).expect("config");
        assert_eq!(bad.helper("x"), None, "a helper name is a name, not a path");
    }
}
