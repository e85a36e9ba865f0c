//! A machinen image written as a container image, for Docker, Podman,
//! containerd or a registry: `oci:DIR[:TAG]` (an OCI image layout, created,
//! or given one more tag) or `docker-archive:FILE[:REPO[:TAG]]` (what
//! `docker load` reads).
//!
//! One layer: the image's rootfs tarball (a `provision` output, a converted
//! image, any rootfs tarball), gzip-compressed as `provision` writes it or
//! plain; its baked config (`/etc/machinen/image.json`) becomes the OCI
//! config — `cmd` (with `entrypoint` split off as Docker keeps them), `env`,
//! `cwd` as `WorkingDir`, `user`. The config file itself stays in the layer
//! (machinen reads it back; other runtimes ignore it). Nothing is written
//! half: blobs are complete before `index.json` names them (temp file,
//! fsync, rename), and an archive is renamed into place once synced.

use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use machinen_proto::DEFAULT_PATH;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::assets::fsutil;
use crate::error::{fail, ErrorCode, Failure};
use crate::provision::ImageConfig;

pub(crate) const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where an export goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An OCI image layout directory and the tag the image gets in it.
    Layout { dir: PathBuf, tag: String },
    /// A `docker save` archive and the reference it names (`repo:tag`).
    DockerArchive { file: PathBuf, reference: String },
}

impl Target {
    /// `oci:DIR[:TAG]` (tag `latest` by default) or
    /// `docker-archive:FILE[:REPO[:TAG]]` (`machinen:latest` by default);
    /// `None` for anything else (a plain output path).
    pub fn parse(s: &str) -> Option<Target> {
        if let Some(rest) = s.strip_prefix("oci:") {
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, t),
                _ => (rest, "latest"),
            };
            return Some(Target::Layout {
                dir: PathBuf::from(dir),
                tag: tag.to_string(),
            });
        }
        let rest = s.strip_prefix("docker-archive:")?;
        let (file, reference) = match rest.split_once(':') {
            Some((f, r)) if !r.is_empty() => {
                let r = if r.rsplit('/').next().is_some_and(|last| last.contains(':')) {
                    r.to_string()
                } else {
                    format!("{r}:latest")
                };
                (f, r)
            }
            _ => (rest, "machinen:latest".to_string()),
        };
        Some(Target::DockerArchive {
            file: PathBuf::from(file),
            reference,
        })
    }

    fn check(&self) -> Result<(), Failure> {
        let bad = |msg: String| {
            Err(fail(ErrorCode::ProvisionArgsInvalid, msg)
                .hint("oci:DIR[:TAG] or docker-archive:FILE[:REPO[:TAG]]"))
        };
        match self {
            Target::Layout { dir, tag } => {
                if dir.as_os_str().is_empty() {
                    return bad("no layout directory".into());
                }
                // OCI's ref.name grammar, kept to what every tool accepts.
                let ok = !tag.is_empty()
                    && tag.len() <= 128
                    && tag
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
                if !ok {
                    return bad(format!(
                        "{tag:?} is not a tag (letters, digits, '.', '_', '-')"
                    ));
                }
            }
            Target::DockerArchive { file, reference } => {
                if file.as_os_str().is_empty() {
                    return bad("no archive file".into());
                }
                let ok = reference
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/:".contains(&b))
                    && !reference.starts_with(['/', ':']);
                if !ok {
                    return bad(format!("{reference:?} is not a repository:tag"));
                }
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Layout { dir, tag } => write!(f, "oci:{}:{tag}", dir.display()),
            Target::DockerArchive { file, reference } => {
                write!(f, "docker-archive:{}:{reference}", file.display())
            }
        }
    }
}

/// What [`export`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Exported {
    pub target: String,
    /// `sha256:…` of the image manifest (the image's digest).
    pub manifest_digest: String,
    pub config_digest: String,
    pub layer_digest: String,
    /// Bytes of the layer blob.
    pub layer_size: u64,
}

fn io_err(what: &str, path: &Path) -> impl FnOnce(io::Error) -> Failure {
    let msg = format!("{what} {}", path.display());
    move |e| fail(ErrorCode::ProvisionOutputFailed, msg).source(e)
}

/// The layer: its bytes' digest and size, the digest and size of its
/// uncompressed tar (the `diff_id`), and whether it is gzip.
struct Layer {
    digest: String,
    size: u64,
    diff_id: String,
    raw_size: u64,
    gzip: bool,
}

fn hex(h: Sha256) -> String {
    format!("sha256:{:x}", h.finalize())
}

fn open_tar(path: &Path, gzip: bool) -> io::Result<Box<dyn Read>> {
    let f = io::BufReader::new(fs::File::open(path)?);
    Ok(if gzip {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    })
}

fn hash_layer(image: &Path) -> Result<Layer, Failure> {
    let read_err = io_err("cannot read", image);
    let mut f = fs::File::open(image).map_err(read_err)?;
    let mut magic = [0u8; 2];
    let gzip = f
        .read(&mut magic)
        .map(|n| n == 2 && magic == [0x1f, 0x8b])
        .unwrap_or(false);
    // The blob as it is.
    let mut h = Sha256::new();
    let mut f = fs::File::open(image).map_err(io_err("cannot read", image))?;
    let size = io::copy(&mut f, &mut HashSink(&mut h)).map_err(io_err("cannot read", image))?;
    let digest = hex(h);
    // Its tar, uncompressed.
    let (diff_id, raw_size) = if gzip {
        let mut h = Sha256::new();
        let mut r = open_tar(image, true).map_err(io_err("cannot read", image))?;
        let n = io::copy(&mut r, &mut HashSink(&mut h)).map_err(|e| {
            fail(
                ErrorCode::BootImageInvalid,
                format!("{} is not a valid gzip tarball", image.display()),
            )
            .source(e)
        })?;
        (hex(h), n)
    } else {
        (digest.clone(), size)
    };
    Ok(Layer {
        digest,
        size,
        diff_id,
        raw_size,
        gzip,
    })
}

struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The OCI image config for `config` over one layer.
fn oci_config(config: &ImageConfig, diff_id: &str) -> serde_json::Value {
    // Other runtimes take PATH from the image alone (machinen's agent has a
    // default): give it Docker's when the image sets none.
    let mut env: Vec<String> = config.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if !config.env.contains_key("PATH") {
        env.insert(0, format!("PATH={DEFAULT_PATH}"));
    }
    let mut run = serde_json::Map::new();
    if !env.is_empty() {
        run.insert("Env".into(), json!(env));
    }
    // Docker keeps the two apart: `cmd` starts with the entrypoint.
    match (&config.entrypoint, &config.cmd) {
        (Some(ep), cmd) => {
            run.insert("Entrypoint".into(), json!(ep));
            let args: Vec<String> = match cmd {
                Some(c) if c.starts_with(ep) => c[ep.len()..].to_vec(),
                Some(c) => c.clone(),
                None => Vec::new(),
            };
            if !args.is_empty() {
                run.insert("Cmd".into(), json!(args));
            }
        }
        (None, Some(cmd)) => {
            run.insert("Cmd".into(), json!(cmd));
        }
        (None, None) => {}
    }
    if let Some(cwd) = &config.cwd {
        run.insert("WorkingDir".into(), json!(cwd));
    }
    if let Some(user) = &config.user {
        run.insert("User".into(), json!(user));
    }
    if !config.exposed_ports.is_empty() {
        let ports: serde_json::Map<String, serde_json::Value> = config
            .exposed_ports
            .iter()
            .map(|p| (p.clone(), json!({})))
            .collect();
        run.insert("ExposedPorts".into(), ports.into());
    }
    if !config.labels.is_empty() {
        run.insert("Labels".into(), json!(config.labels));
    }
    json!({
        "architecture": super::host_arch(),
        "os": "linux",
        "config": run,
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        "history": [{ "created_by": "machinen provision" }],
    })
}

/// Write `bytes` to `path` whole (see [`fsutil::write_atomic`]).
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    fsutil::write_atomic(path, bytes).map_err(io_err("cannot write", path))
}

/// Export the rootfs tarball `image` (its baked config included) to `target`.
pub fn export(image: &Path, target: &Target) -> Result<Exported, Failure> {
    target.check()?;
    let config = crate::provision::read_from_tarball(image)
        .map_err(|e| fail(e.code(), e.to_string()))?
        .unwrap_or_default();
    let layer = hash_layer(image)?;
    let config_json = serde_json::to_vec(&oci_config(&config, &layer.diff_id))
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the image config").source(e))?;
    let config_digest = format!("sha256:{:x}", Sha256::digest(&config_json));
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": { "mediaType": MEDIA_CONFIG, "digest": config_digest, "size": config_json.len() },
        "layers": [{
            "mediaType": if layer.gzip { MEDIA_LAYER_GZIP } else { MEDIA_LAYER_TAR },
            "digest": layer.digest,
            "size": layer.size,
        }],
    });
    let manifest_json = serde_json::to_vec(&manifest)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the manifest").source(e))?;
    let manifest_digest = format!("sha256:{:x}", Sha256::digest(&manifest_json));
    match target {
        Target::Layout { dir, tag } => write_layout(
            dir,
            tag,
            image,
            &layer,
            (&config_digest, &config_json),
            (&manifest_digest, &manifest_json),
        )?,
        Target::DockerArchive { file, reference } => write_archive(
            file,
            reference,
            image,
            &layer,
            (&config_digest, &config_json),
        )?,
    }
    Ok(Exported {
        target: target.to_string(),
        manifest_digest,
        config_digest,
        layer_digest: layer.digest,
        layer_size: layer.size,
    })
}

fn blob_path(dir: &Path, digest: &str) -> PathBuf {
    dir.join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

fn write_layout(
    dir: &Path,
    tag: &str,
    image: &Path,
    layer: &Layer,
    (config_digest, config_json): (&str, &[u8]),
    (manifest_digest, manifest_json): (&str, &[u8]),
) -> Result<(), Failure> {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).map_err(io_err("cannot create", &blobs))?;
    let layout = dir.join("oci-layout");
    if !layout.exists() {
        write_atomic(&layout, br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    }
    // The layer: a hard link where the filesystem allows, else a copy.
    let lpath = blob_path(dir, &layer.digest);
    if !lpath.exists() {
        let tmp = fsutil::temp_sibling(&lpath, "tmp");
        fs::hard_link(image, &tmp)
            .or_else(|_| fs::copy(image, &tmp).map(|_| ()))
            .and_then(|()| fsutil::persist(&tmp, &lpath))
            .map_err(|e| {
                let _ = fs::remove_file(&tmp);
                io_err("cannot write", &lpath)(e)
            })?;
    }
    write_atomic(&blob_path(dir, config_digest), config_json)?;
    write_atomic(&blob_path(dir, manifest_digest), manifest_json)?;
    // index.json: this tag now names this manifest; other tags stay.
    let index_path = dir.join("index.json");
    let mut index: serde_json::Value = match fs::read(&index_path) {
        Ok(b) => serde_json::from_slice(&b).map_err(|e| {
            fail(
                ErrorCode::ProvisionOutputFailed,
                format!("{} is not an OCI index", index_path.display()),
            )
            .source(e)
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            json!({ "schemaVersion": 2, "manifests": [] })
        }
        Err(e) => return Err(io_err("cannot read", &index_path)(e)),
    };
    let entry = json!({
        "mediaType": MEDIA_MANIFEST,
        "digest": manifest_digest,
        "size": manifest_json.len(),
        "annotations": { REF_NAME: tag },
        "platform": { "architecture": super::host_arch(), "os": "linux" },
    });
    let manifests = index
        .get_mut("manifests")
        .and_then(|m| m.as_array_mut())
        .ok_or_else(|| {
            fail(
                ErrorCode::ProvisionOutputFailed,
                format!("{} has no manifests list", index_path.display()),
            )
        })?;
    manifests.retain(|m| m["annotations"][REF_NAME] != tag);
    manifests.push(entry);
    let bytes = serde_json::to_vec_pretty(&index)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the index").source(e))?;
    write_atomic(&index_path, &bytes)
}

fn write_archive(
    file: &Path,
    reference: &str,
    image: &Path,
    layer: &Layer,
    (config_digest, config_json): (&str, &[u8]),
) -> Result<(), Failure> {
    fsutil::write_atomic_with(file, |out| {
        let mut b = tar::Builder::new(io::BufWriter::new(out));
        let cfg_name = format!("{}.json", config_digest.trim_start_matches("sha256:"));
        let layer_name = format!("{}/layer.tar", layer.diff_id.trim_start_matches("sha256:"));
        let header = |size: u64| {
            let mut h = tar::Header::new_ustar();
            h.set_size(size);
            h.set_mode(0o644);
            h.set_mtime(0);
            h.set_entry_type(tar::EntryType::Regular);
            h
        };
        b.append_data(
            &mut header(config_json.len() as u64),
            &cfg_name,
            config_json,
        )?;
        // Docker's classic layout: each layer uncompressed.
        let mut raw = open_tar(image, layer.gzip)?;
        b.append_data(&mut header(layer.raw_size), &layer_name, &mut raw)?;
        let manifest = serde_json::to_vec(&json!([{
            "Config": cfg_name,
            "RepoTags": [reference],
            "Layers": [layer_name],
        }]))
        .map_err(io::Error::other)?;
        b.append_data(
            &mut header(manifest.len() as u64),
            "manifest.json",
            &manifest[..],
        )?;
        b.into_inner()?.flush()
    })
    .map_err(io_err("cannot write", file))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_their_defaults() {
        assert_eq!(
            Target::parse("oci:/x/lay:v1"),
            Some(Target::Layout {
                dir: "/x/lay".into(),
                tag: "v1".into()
            })
        );
        assert_eq!(
            Target::parse("oci:lay"),
            Some(Target::Layout {
                dir: "lay".into(),
                tag: "latest".into()
            })
        );
        assert_eq!(
            Target::parse("docker-archive:/t/a.tar:local/app:v2"),
            Some(Target::DockerArchive {
                file: "/t/a.tar".into(),
                reference: "local/app:v2".into()
            })
        );
        assert_eq!(
            Target::parse("docker-archive:a.tar:app"),
            Some(Target::DockerArchive {
                file: "a.tar".into(),
                reference: "app:latest".into()
            })
        );
        assert_eq!(
            Target::parse("docker-archive:a.tar"),
            Some(Target::DockerArchive {
                file: "a.tar".into(),
                reference: "machinen:latest".into()
            })
        );
        assert_eq!(Target::parse("out.tar.gz"), None);
        assert!(Target::parse("oci:lay:bad tag").is_some_and(|t| t.check().is_err()));
        assert!(Target::parse("docker-archive:a.tar:UPPER:x").is_some_and(|t| t.check().is_err()));
    }

    #[test]
    fn the_config_splits_entrypoint_and_cmd_as_docker_does() {
        let mut c = ImageConfig {
            cmd: Some(vec!["/srv/app".into(), "--port".into(), "80".into()]),
            entrypoint: Some(vec!["/srv/app".into()]),
            cwd: Some("/srv".into()),
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        c.env.insert("MODE".into(), "prod".into());
        let v = oci_config(&c, "sha256:00");
        assert_eq!(v["config"]["Entrypoint"], json!(["/srv/app"]));
        assert_eq!(v["config"]["Cmd"], json!(["--port", "80"]));
        assert_eq!(
            v["config"]["Env"],
            json!([format!("PATH={DEFAULT_PATH}"), "MODE=prod"])
        );
        c.env.insert("PATH".into(), "/opt/bin".into());
        let v = oci_config(&c, "sha256:00");
        assert_eq!(v["config"]["Env"], json!(["MODE=prod", "PATH=/opt/bin"]));
        assert_eq!(v["config"]["WorkingDir"], "/srv");
        assert_eq!(v["config"]["User"], "1000:1000");
        assert_eq!(v["rootfs"]["diff_ids"], json!(["sha256:00"]));
    }

    /// A tarball exported to a layout and an archive: the blobs match their
    /// digests, the index names the tag, and a second tag keeps the first.
    #[test]
    fn a_tarball_exports_to_a_layout_and_an_archive() {
        let dir = tempfile::tempdir().expect("tmp");
        let tarball = dir.path().join("img.tar.gz");
        {
            let gz = flate2::write::GzEncoder::new(
                fs::File::create(&tarball).expect("create"),
                flate2::Compression::fast(),
            );
            let mut b = tar::Builder::new(gz);
            let cfg = ImageConfig {
                cmd: Some(vec!["cat".into(), "/hello".into()]),
                ..Default::default()
            }
            .to_json();
            let mut h = tar::Header::new_gnu();
            h.set_size(cfg.len() as u64);
            h.set_mode(0o644);
            b.append_data(&mut h, "etc/machinen/image.json", &cfg[..])
                .expect("config");
            let mut h = tar::Header::new_gnu();
            h.set_size(3);
            h.set_mode(0o644);
            b.append_data(&mut h, "hello", &b"hi\n"[..]).expect("file");
            b.into_inner().expect("tar").finish().expect("gz");
        }
        let lay = dir.path().join("lay");
        let t = Target::parse(&format!("oci:{}:v1", lay.display())).expect("target");
        let e = export(&tarball, &t).expect("export");
        for d in [&e.manifest_digest, &e.config_digest, &e.layer_digest] {
            let bytes = fs::read(blob_path(&lay, d)).expect("blob");
            assert_eq!(&format!("sha256:{:x}", Sha256::digest(&bytes)), d);
        }
        let cfg: serde_json::Value =
            serde_json::from_slice(&fs::read(blob_path(&lay, &e.config_digest)).expect("cfg"))
                .expect("json");
        assert_eq!(cfg["config"]["Cmd"], json!(["cat", "/hello"]));
        let t2 = Target::parse(&format!("oci:{}:v2", lay.display())).expect("target");
        export(&tarball, &t2).expect("second tag");
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(lay.join("index.json")).expect("index"))
                .expect("json");
        let tags: Vec<&str> = index["manifests"]
            .as_array()
            .expect("manifests")
            .iter()
            .filter_map(|m| m["annotations"][REF_NAME].as_str())
            .collect();
        assert_eq!(tags, ["v1", "v2"]);
        let archive = dir.path().join("a.tar");
        let t = Target::parse(&format!("docker-archive:{}:local/x:v1", archive.display()))
            .expect("target");
        export(&tarball, &t).expect("archive");
        let mut names = Vec::new();
        let mut manifest = String::new();
        for entry in tar::Archive::new(fs::File::open(&archive).expect("open"))
            .entries()
            .expect("entries")
        {
            let mut entry = entry.expect("entry");
            let name = entry.path().expect("path").to_string_lossy().into_owned();
            if name == "manifest.json" {
                entry.read_to_string(&mut manifest).expect("read");
            }
            names.push(name);
        }
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(
            manifest.contains("\"RepoTags\":[\"local/x:v1\"]"),
            "{manifest}"
        );
    }
}
