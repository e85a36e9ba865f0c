//! Remembered tarball hashes, so that booting the same 100+ MiB tarball
//! again does not hash it again.
//!
//! One small JSON file per tarball path under `<cache>/images/hashes/`,
//! named by the sha256 of the canonical path, holding the file's identity
//! (device, inode, size, mtime and ctime in ns) and its content sha256. An
//! entry is only a hint: it is used when every identity field still
//! matches, and the content hash stays the cache key. ctime is included
//! because it cannot be set back by `touch`, so an in-place edit that
//! restores the mtime is still noticed. One file per path means concurrent
//! boots of different tarballs never race on a shared index.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ImageError;
use crate::assets::fsutil;
use crate::progress::ProgressMode;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Identity {
    path: String,
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
}

#[derive(Debug, Serialize, Deserialize)]
struct IndexEntry {
    id: Identity,
    sha256: String,
}

fn identity(canonical: &Path, m: &fs::Metadata) -> Identity {
    Identity {
        path: canonical.to_string_lossy().into_owned(),
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        // i64 nanoseconds last until 2262.
        mtime_ns: m
            .mtime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.mtime_nsec()),
        ctime_ns: m
            .ctime()
            .saturating_mul(1_000_000_000)
            .saturating_add(m.ctime_nsec()),
    }
}

/// The sha256 of `tarball`'s content, from the index when its identity is
/// unchanged, else by hashing it (and then remembering the answer).
pub(super) fn content_sha256(
    index_dir: &Path,
    tarball: &Path,
    progress: ProgressMode,
) -> Result<String, ImageError> {
    let unreadable = |source| ImageError::Unreadable {
        path: tarball.to_path_buf(),
        source,
    };
    let canonical = fs::canonicalize(tarball).map_err(unreadable)?;
    let before = identity(&canonical, &fs::metadata(&canonical).map_err(unreadable)?);
    let entry_path = index_dir.join(format!(
        "{}.json",
        hex::encode(Sha256::digest(before.path.as_bytes()))
    ));

    if let Ok(bytes) = fs::read(&entry_path) {
        match serde_json::from_slice::<IndexEntry>(&bytes) {
            Ok(e) if e.id == before && e.sha256.len() == 64 => return Ok(e.sha256),
            Ok(_) => {}
            Err(e) => {
                tracing::debug!(path = %entry_path.display(), error = %e, "ignoring unreadable hash index entry")
            }
        }
    }

    let step = progress.step(format!("Hashing {}", tarball.display()));
    let (sha256, _) = fsutil::sha256_file(&canonical).map_err(unreadable)?;
    step.done(format!("Hashed {}", tarball.display()));

    // Remember it only if the file did not change while being read; a
    // failure to remember costs a re-hash next time, nothing more.
    let after = fs::metadata(&canonical).map(|m| identity(&canonical, &m));
    if after.as_ref().ok() == Some(&before) {
        let entry = IndexEntry {
            id: before,
            sha256: sha256.clone(),
        };
        let saved = fs::create_dir_all(index_dir).and_then(|()| {
            let json = serde_json::to_vec_pretty(&entry).map_err(std::io::Error::other)?;
            fsutil::write_atomic(&entry_path, &json)
        });
        if let Err(e) = saved {
            tracing::warn!(path = %entry_path.display(), error = %e, "could not remember the tarball's hash");
        }
    }
    Ok(sha256)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_and_notices_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let index = dir.path().join("hashes");
        let f = dir.path().join("a.tar");
        fs::write(&f, b"abc").expect("write");
        let h1 = content_sha256(&index, &f, ProgressMode::Quiet).expect("hash");
        assert_eq!(
            h1,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(fs::read_dir(&index).expect("ls").count(), 1);

        // A stale-looking but matching entry is trusted: prove it by
        // planting a different hash for the same identity.
        let entry = fs::read_dir(&index)
            .expect("ls")
            .next()
            .expect("one")
            .expect("entry")
            .path();
        let mut e: IndexEntry =
            serde_json::from_slice(&fs::read(&entry).expect("read")).expect("json");
        e.sha256 = "0".repeat(64);
        fs::write(&entry, serde_json::to_vec(&e).expect("json")).expect("write");
        assert_eq!(
            content_sha256(&index, &f, ProgressMode::Quiet).expect("hash"),
            "0".repeat(64)
        );

        // Any change of the file's identity means hashing again.
        fs::write(&f, b"abd").expect("rewrite");
        let h2 = content_sha256(&index, &f, ProgressMode::Quiet).expect("hash");
        assert_ne!(h2, h1);
        assert_ne!(h2, "0".repeat(64));

        // Garbage in the index is ignored, not an error.
        fs::write(&entry, b"{not json").expect("write");
        assert_eq!(
            content_sha256(&index, &f, ProgressMode::Quiet).expect("hash"),
            h2
        );
    }
}
