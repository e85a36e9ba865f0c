//! Secrets: values handed to a running guest as files in a tmpfs
//! (`/run/machinen/secrets/NAME`, mode 0400).
//!
//! The rule:
//!
//! * Secrets travel over the agent channel after boot. They are never on
//!   the kernel command line, the guest disk, the VM's `spec.json` or
//!   `meta.json`, `ls` output or the logs (their `Debug` form is redacted).
//! * Before any snapshot the caller (the snapshot code) calls
//!   [`Vm::wipe_secrets`]: the agent zeroes the files in place, removes them
//!   and unmounts the tmpfs; a VM booted with secrets runs its kernel with `init_on_free=1` and
//!   the agent's heap is zeroed on free, so the bundle carries no secret
//!   unless a guest program copied one into its own memory or onto disk.
//! * After a restore or fork the caller supplies the secrets again
//!   (`--secret` on `restore`/`fork`, or [`Vm::set_secrets`]).

use machinen_proto::timeouts;
use std::path::Path;
use std::time::Duration;

use machinen_proto::exchange::{SetSecrets, WipeSecrets};
pub use machinen_proto::{Secret, SecretValue};

use crate::error::{fail, ErrorCode, Result};
use crate::vm::Vm;

/// Where the guest keeps secrets.
pub const GUEST_DIR: &str = "/run/machinen/secrets";

/// Largest total size accepted (the agent enforces the same).
pub const MAX_TOTAL: usize = 512 * 1024;

const TIMEOUT: Duration = timeouts::SECRETS;

/// A secret name is a file name: letters, digits, `_`, `-`, `.`, 1 to 128
/// bytes, not starting with a dot.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if !ok {
        return Err(fail(
            ErrorCode::SecretsInvalid,
            format!("secret name {name:?} is not valid"),
        )
        .hint("use letters, digits, '_', '-' and '.', e.g. --secret API_TOKEN=...")
        .into());
    }
    Ok(())
}

/// Check a set of secrets: valid, unique names, bounded total size.
pub fn validate(secrets: &[Secret]) -> Result<()> {
    let mut seen = std::collections::HashSet::new();
    let mut total = 0;
    for s in secrets {
        validate_name(&s.name)?;
        if !seen.insert(s.name.as_str()) {
            return Err(fail(
                ErrorCode::SecretsInvalid,
                format!("secret {:?} is given twice", s.name),
            )
            .into());
        }
        total += s.value.0.len();
    }
    if total > MAX_TOTAL {
        return Err(fail(
            ErrorCode::SecretsInvalid,
            format!("secrets total {total} bytes; at most {MAX_TOTAL} are accepted"),
        )
        .into());
    }
    Ok(())
}

/// Parse `NAME=VALUE` (`--secret`). The error never echoes the value.
pub fn parse_secret_arg(s: &str) -> Result<Secret> {
    let Some((name, value)) = s.split_once('=') else {
        return Err(fail(ErrorCode::SecretsInvalid, "--secret takes NAME=VALUE").into());
    };
    validate_name(name)?;
    Ok(Secret {
        name: name.to_owned(),
        value: SecretValue(value.as_bytes().to_vec()),
    })
}

/// Parse `NAME=PATH` (`--secret-file`) and read the file.
pub fn parse_secret_file_arg(s: &str) -> Result<Secret> {
    let Some((name, path)) = s.split_once('=') else {
        return Err(fail(ErrorCode::SecretsInvalid, "--secret-file takes NAME=PATH").into());
    };
    validate_name(name)?;
    let value = std::fs::read(Path::new(path)).map_err(|e| {
        fail(
            ErrorCode::SecretsInvalid,
            format!("cannot read the secret file {path} for {name}"),
        )
        .source(e)
    })?;
    Ok(Secret {
        name: name.to_owned(),
        value: SecretValue(value),
    })
}

/// What [`Vm::set_secrets`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SecretsReport {
    pub count: u32,
    /// The guest directory holding them.
    pub dir: String,
}

impl Vm {
    /// Install (or replace) secrets in the running guest.
    pub async fn set_secrets(&self, secrets: &[Secret]) -> Result<SecretsReport> {
        validate(secrets)?;
        let set = SetSecrets {
            secrets: secrets.to_vec(),
        };
        let (count, dir) = self.call(set, TIMEOUT, ErrorCode::SecretsFailed).await?;
        Ok(SecretsReport { count, dir })
    }

    /// Zero, remove and unmount every secret in the guest (call before a
    /// snapshot). Returns how many were removed.
    pub async fn wipe_secrets(&self) -> Result<u32> {
        self.call(WipeSecrets, TIMEOUT, ErrorCode::SecretsFailed)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parsing_and_validation() {
        let s = parse_secret_arg("API_TOKEN=a=b").expect("parse");
        assert_eq!(
            (s.name.as_str(), &s.value.0[..]),
            ("API_TOKEN", &b"a=b"[..])
        );
        let e = parse_secret_arg("bad/name=hunter2").expect_err("bad name");
        assert_eq!(e.code(), ErrorCode::SecretsInvalid);
        assert!(!e.to_string().contains("hunter2"));
        assert!(parse_secret_arg("novalue").is_err());
        assert!(validate(&[s.clone(), s]).is_err(), "duplicates");
        let e = parse_secret_file_arg("X=/nonexistent/file").expect_err("missing file");
        assert!(e.causes().iter().any(|c| c.contains("No such file")));
        assert!(!format!("{:?}", parse_secret_arg("A=hunter2").expect("ok")).contains("hunter2"));
    }
}
