//! The baked image configuration: `/etc/machinen/image.json` inside a
//! rootfs tarball (format documented in `docs/images.md`).
//!
//! ```json
//! { "version": 1, "cmd": ["/app/hello", "--loud"], "env": { "MODE": "prod" }, "cwd": "/app" }
//! ```
//!
//! `machinen provision` writes it as the tarball's **first** member, so a
//! reader finds it without decompressing the rest; for other tarballs the
//! whole archive is scanned once. Either way the answer is cached by the
//! tarball's sha256 next to the ext4 image cache
//! (`<cache>/images/<sha256>.config.json`), so boots never re-read it.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::assets::fsutil;
use crate::error::{fail, ErrorCode, Failure, Result};
use crate::paths::Paths;
use crate::progress::ProgressMode;
use crate::vm::{validate_exec, ExecOptions};

/// Path of the config inside the guest / the tarball.
pub const IMAGE_CONFIG_PATH: &str = "/etc/machinen/image.json";
/// The format version this machinen writes and reads.
pub const IMAGE_CONFIG_VERSION: u32 = 1;
/// Upper bound on the config's size; anything larger is not ours.
const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// What `boot IMAGE` runs when no command is given, and how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Format version (currently 1). Readers refuse a newer one.
    pub version: u32,
    /// Default command (argv, no shell involved); `None`: none baked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// Environment of the default command (and of `boot IMAGE -- CMD`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (absolute guest path).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// The program a command given at boot runs under (an OCI image's
    /// Entrypoint): `boot IMAGE -- ARGS` runs it with ARGS. `cmd` already
    /// starts with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// Who the command runs as (an OCI image's `User`): `NAME`, `UID`,
    /// `NAME:GROUP` or `UID:GID`; root when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ports the image's service listens on (an OCI image's
    /// `ExposedPorts`, a Dockerfile's `EXPOSE`), as `PORT/PROTO`: shown by
    /// `images inspect`, carried into exported images; publishing one is
    /// still `-p`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exposed_ports: Vec<String>,
    /// Free-form metadata (an OCI image's `Labels`, a Dockerfile's `LABEL`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig {
            version: IMAGE_CONFIG_VERSION,
            cmd: None,
            env: BTreeMap::new(),
            cwd: None,
            entrypoint: None,
            user: None,
            exposed_ports: Vec::new(),
            labels: BTreeMap::new(),
        }
    }
}

impl ImageConfig {
    /// Check the fields (command not empty, env names, absolute cwd).
    pub fn validate(&self) -> Result<(), Failure> {
        if self.version > IMAGE_CONFIG_VERSION {
            return Err(fail(
                ErrorCode::BootImageInvalid,
                format!("image config version {} is newer than this machinen understands ({IMAGE_CONFIG_VERSION})", self.version),
            )
            .hint("upgrade machinen"));
        }
        if matches!(&self.cmd, Some(c) if c.is_empty()) {
            return Err(fail(
                ErrorCode::BootImageInvalid,
                "the baked command is empty",
            ));
        }
        for p in &self.exposed_ports {
            if normalize_port(p).as_deref() != Some(p.as_str()) {
                return Err(fail(
                    ErrorCode::BootImageInvalid,
                    format!("exposed port {p:?} is not PORT/tcp, PORT/udp or PORT/sctp"),
                ));
            }
        }
        let probe = ExecOptions {
            rlimits: Vec::new(),
            argv: vec!["true".into()],
            env: self
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            cwd: self.cwd.clone(),
            user: self.user.clone(),
        };
        validate_exec(&probe)
    }

    /// This config with `env` merged in (later keys win), and `cwd`/`cmd`
    /// replaced when given: how a layered bake and `boot IMAGE` combine a
    /// baked config with new settings.
    pub fn merged(
        &self,
        cmd: Option<Vec<String>>,
        env: &[(String, String)],
        cwd: Option<String>,
    ) -> ImageConfig {
        let mut out = self.clone();
        out.version = IMAGE_CONFIG_VERSION;
        for (k, v) in env {
            out.env.insert(k.clone(), v.clone());
        }
        if cwd.is_some() {
            out.cwd = cwd;
        }
        if cmd.is_some() {
            out.cmd = cmd;
        }
        out
    }

    /// Exec options for `argv` (or the baked command when `None`) with the
    /// baked env and cwd, `env` overriding individual keys and `cwd` the
    /// directory. Fails with `BOOT_ARGS_INVALID` when there is nothing to run.
    pub fn exec_options(
        &self,
        argv: Option<Vec<String>>,
        env: &[(String, String)],
        cwd: Option<String>,
    ) -> Result<ExecOptions, Failure> {
        // Docker's rule: a command given at boot goes to the entrypoint.
        let argv = match (argv, &self.entrypoint) {
            (Some(a), Some(ep)) => Some(ep.iter().cloned().chain(a).collect()),
            (a, _) => a,
        };
        let merged = self.merged(argv, env, cwd);
        let Some(argv) = merged.cmd else {
            return Err(fail(ErrorCode::BootArgsInvalid, "nothing to run: the image has no baked command and none was given after `--`")
                .hint("give a command, e.g. `machinen boot IMAGE -- sh -c 'echo hi'`, or bake one with `machinen provision --cmd …`"));
        };
        let opts = ExecOptions {
            rlimits: Vec::new(),
            argv,
            env: merged.env.into_iter().collect(),
            cwd: merged.cwd,
            user: merged.user,
        };
        validate_exec(&opts)?;
        Ok(opts)
    }

    /// The JSON text stored in the image.
    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Parse the stored JSON text (and validate it).
    pub fn from_json(bytes: &[u8]) -> Result<ImageConfig, Failure> {
        let c: ImageConfig = serde_json::from_slice(bytes).map_err(|e| {
            fail(
                ErrorCode::BootImageInvalid,
                format!("{IMAGE_CONFIG_PATH} in the image is not valid"),
            )
            .source(e)
        })?;
        // The image is what is wrong, not the caller's arguments: whatever
        // the check says, the error names the image.
        c.validate().map_err(|e| match e.code {
            ErrorCode::BootImageInvalid => e,
            _ => fail(
                ErrorCode::BootImageInvalid,
                format!(
                    "{IMAGE_CONFIG_PATH} in the image is not valid: {}",
                    e.message
                ),
            )
            .hint("rebuild the image with valid settings (`machinen provision --cmd/--env/--cwd`)"),
        })?;
        Ok(c)
    }
}

/// An exposed port as Docker spells it in an image config: `PORT/PROTO`
/// (`80` → `80/tcp`, `53/UDP` → `53/udp`), or a range `LOW-HIGH/PROTO`;
/// `None` when it is neither.
pub fn normalize_port(p: &str) -> Option<String> {
    let (ports, proto) = match p.split_once('/') {
        Some((a, b)) => (a, b.to_ascii_lowercase()),
        None => (p, "tcp".to_string()),
    };
    if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
        return None;
    }
    let num = |s: &str| -> Option<u16> {
        (!s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse::<u16>().ok())
            .flatten()
            .filter(|n| *n > 0)
    };
    let ports = match ports.split_once('-') {
        Some((lo, hi)) => {
            let (lo, hi) = (num(lo)?, num(hi)?);
            if lo > hi {
                return None;
            }
            format!("{lo}-{hi}")
        }
        None => num(ports)?.to_string(),
    };
    Some(format!("{ports}/{proto}"))
}

/// Whether a tar member name is the config file (`./etc/…`, `etc/…`, `/etc/…`).
pub(crate) fn is_config_member(name: &[u8]) -> bool {
    let s = String::from_utf8_lossy(name);
    let s = s.trim_start_matches("./").trim_start_matches('/');
    s == &IMAGE_CONFIG_PATH[1..]
}

fn read_member(entry: &mut impl Read, size: u64) -> io::Result<Vec<u8>> {
    if size > MAX_CONFIG_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{IMAGE_CONFIG_PATH} is {size} bytes; too large"),
        ));
    }
    let mut buf = Vec::with_capacity(size as usize);
    entry.take(MAX_CONFIG_BYTES).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Read the config out of a (plain or gzip) rootfs tarball: the first member
/// when it is the config (what `provision` writes), else the last copy found
/// in a full scan. `Ok(None)`: the image has no config.
pub fn read_from_tarball(tarball: &Path) -> Result<Option<ImageConfig>> {
    let bad = |e: io::Error| -> crate::Error {
        fail(
            ErrorCode::BootImageInvalid,
            format!("cannot read the image config from {}", tarball.display()),
        )
        .source(e)
        .into()
    };
    let mut f = fs::File::open(tarball).map_err(bad)?;
    let mut magic = [0u8; 2];
    let n = f.read(&mut magic).map_err(bad)?;
    let f = fs::File::open(tarball).map_err(bad)?;
    let reader: Box<dyn Read> = if n == 2 && magic == [0x1f, 0x8b] {
        Box::new(flate2::read::GzDecoder::new(io::BufReader::new(f)))
    } else {
        Box::new(io::BufReader::new(f))
    };
    let mut archive = tar::Archive::new(reader);
    let mut found = None;
    for (i, entry) in archive.entries().map_err(bad)?.enumerate() {
        let mut entry = entry.map_err(bad)?;
        if is_config_member(&entry.path_bytes()) && entry.header().entry_type().is_file() {
            let size = entry.size();
            found = Some(read_member(&mut entry, size).map_err(bad)?);
            if i == 0 {
                break;
            }
        }
    }
    match found {
        None => Ok(None),
        Some(bytes) => Ok(Some(ImageConfig::from_json(&bytes)?)),
    }
}

#[derive(Serialize, Deserialize)]
struct CacheRecord {
    config: Option<ImageConfig>,
}

/// The baked config of `tarball` (`None`: the installed base), cached by
/// the tarball's sha256. `Ok(None)`: the image has no config.
pub fn image_config(tarball: Option<&Path>, progress: ProgressMode) -> Result<Option<ImageConfig>> {
    let paths = Paths::from_env()?;
    let tarball = match tarball {
        Some(t) => crate::oci::resolve(&paths, t, progress)?,
        None => crate::assets::resolve(&paths)?.rootfs,
    };
    image_config_in(&paths, &tarball, progress)
}

pub(crate) fn image_config_in(
    paths: &Paths,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<Option<ImageConfig>> {
    let sha = crate::image::tarball_sha256(paths, tarball, progress)?;
    let images = paths.cache.join("images");
    let record_path = images.join(format!("{sha}.config.json"));
    if let Ok(bytes) = fs::read(&record_path) {
        match serde_json::from_slice::<CacheRecord>(&bytes) {
            Ok(r) => return Ok(r.config),
            Err(e) => {
                tracing::debug!(path = %record_path.display(), error = %e, "ignoring unreadable image config record")
            }
        }
    }
    let config = read_from_tarball(tarball)?;
    let json = serde_json::to_vec_pretty(&CacheRecord {
        config: config.clone(),
    })
    .map_err(|e| fail(ErrorCode::Io, "cannot encode the image config").source(e))?;
    let saved =
        fs::create_dir_all(&images).and_then(|()| fsutil::write_atomic(&record_path, &json));
    if let Err(e) = saved {
        tracing::warn!(path = %record_path.display(), error = %e, "could not cache the image config");
    }
    Ok(config)
}

/// Remember `config` for a tarball with content hash `sha256` (provision
/// knows both, so the first boot of a fresh image need not read it).
pub(crate) fn remember(paths: &Paths, sha256: &str, config: &ImageConfig) {
    let images = paths.cache.join("images");
    let record_path = images.join(format!("{sha256}.config.json"));
    let Ok(json) = serde_json::to_vec_pretty(&CacheRecord {
        config: Some(config.clone()),
    }) else {
        return;
    };
    if let Err(e) =
        fs::create_dir_all(&images).and_then(|()| fsutil::write_atomic(&record_path, &json))
    {
        tracing::debug!(path = %record_path.display(), error = %e, "could not cache the image config");
    }
}

/// The config as one tar member (`./etc/machinen/image.json`, root-owned,
/// 0644) without the end-of-archive blocks, to put in front of a tar stream.
pub(crate) fn tar_member(config: &ImageConfig, mtime: u64) -> io::Result<Vec<u8>> {
    let data = config.to_json();
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_uid(0);
    header.set_gid(0);
    header.set_username("root")?;
    header.set_groupname("root")?;
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    let mut b = tar::Builder::new(Vec::new());
    b.append_data(&mut header, &IMAGE_CONFIG_PATH[1..], data.as_slice())?;
    let mut bytes = b.into_inner()?;
    // `into_inner` ends the archive with two zero blocks; the guest's stream
    // that follows brings its own.
    bytes.truncate(bytes.len().saturating_sub(1024));
    Ok(bytes)
}
