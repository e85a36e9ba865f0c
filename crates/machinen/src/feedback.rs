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
        time: rfc3339(time_ms / 1000),
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

/// `secs` since the epoch as RFC 3339 UTC (days to civil date: Howard
/// Hinnant's algorithm).
fn rfc3339(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_796_222_001), "2026-12-02T14:33:21Z");
    }

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
