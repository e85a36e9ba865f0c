//! `machinen feedback`: notes from users about machinen, kept locally in
//! `~/.machinen/feedback.jsonl` (`$MACHINEN_HOME`), one JSON object a line
//! with the time and the machinen version. Nothing is sent anywhere: there
//! is no endpoint (machinen has no HTTP client); users share the file
//! themselves if they want to.
//!
//! Each note is appended as one `write` of one line under an exclusive
//! `flock`, so concurrent `feedback` calls never interleave or tear lines.

use std::fs::OpenOptions;
use std::io::{BufRead, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::error::{fail, ErrorCode, Result};

/// File name under the machinen home.
pub const FILE: &str = "feedback.jsonl";

/// Longest note accepted, in bytes.
pub const MAX_TEXT: usize = 64 * 1024;

/// One note.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    /// UTC time, RFC 3339 (`2026-12-02T14:50:01Z`).
    pub time: String,
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The machinen version that recorded it.
    pub version: String,
    pub text: String,
}

/// Where notes are kept.
pub fn path() -> Result<PathBuf> {
    Ok(crate::Paths::from_env()?.home.join(FILE))
}

fn io(path: &Path, what: &str, e: std::io::Error) -> crate::Error {
    fail(ErrorCode::Io, format!("{}: {what}", path.display()))
        .source(e)
        .into()
}

/// Append a note to `file` (created 0600 with its directory).
pub fn record_to(file: &Path, text: &str) -> Result<Feedback> {
    let text = text.trim();
    if text.is_empty() || text.len() > MAX_TEXT {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("feedback must be 1 to {MAX_TEXT} bytes of text"),
        )
        .hint("e.g. machinen feedback \"boot was slow on my laptop\"")
        .into());
    }
    let time_ms = crate::registry::now_ms();
    let note = Feedback {
        time: machinen_proto::rfc3339::format(time_ms / 1000),
        time_ms,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        text: text.to_owned(),
    };
    let mut line = serde_json::to_vec(&note)
        .map_err(|e| fail(ErrorCode::Io, "cannot encode the note").source(e))?;
    line.push(b'\n');
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, "cannot create the directory", e))?;
    }
    let f = OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| io(file, "cannot open", e))?;
    let mut locked = Flock::lock(f, FlockArg::LockExclusive)
        .map_err(|(_, errno)| io(file, "cannot lock", errno.into()))?;
    locked
        .write_all(&line)
        .and_then(|()| locked.sync_data())
        .map_err(|e| io(file, "cannot append", e))?;
    Ok(note)
}

/// Append a note to the user's feedback file.
pub fn record(text: &str) -> Result<Feedback> {
    record_to(&path()?, text)
}

/// The notes in `file`, oldest first (none when it does not exist); lines
/// that are not notes (a hand edit) are skipped.
pub fn list_from(file: &Path) -> Result<Vec<Feedback>> {
    let f = match std::fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(file, "cannot open", e)),
    };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| io(file, "cannot read", e))?;
        if let Ok(n) = serde_json::from_str::<Feedback>(&line) {
            out.push(n);
        }
    }
    Ok(out)
}

/// The user's notes, oldest first.
pub fn list() -> Result<Vec<Feedback>> {
    list_from(&path()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_append_and_list_concurrently() {
        let dir = tempfile::tempdir().expect("tmp");
        let file = dir.path().join("sub").join(FILE);
        assert!(list_from(&file).expect("none").is_empty());
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let file = file.clone();
                std::thread::spawn(move || {
                    record_to(&file, &format!("note {i} {}", "x".repeat(10_000))).expect("record")
                })
            })
            .collect();
        for t in threads {
            t.join().expect("join");
        }
        let notes = list_from(&file).expect("list");
        assert_eq!(notes.len(), 8);
        assert!(notes.iter().all(|n| n.version == env!("CARGO_PKG_VERSION")));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            record_to(&file, "  ").expect_err("empty").code(),
            ErrorCode::BootArgsInvalid
        );
    }
}
