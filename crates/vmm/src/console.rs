//! A bound on the console log.
//!
//! QEMU appends everything the guest writes to its serial console to
//! `console.log` on the host, and a guest decides how much that is (`yes >
//! /dev/console` as root). So the supervisor watches the file and, when it
//! grows past its limit, drops its oldest part, keeping the newest half: the
//! part `attach --tail` shows. QEMU opens the file with `O_APPEND`
//! (`append=on`), so its writes always land at the current end, whatever
//! was removed in front of them.

use machinen_proto::timeouts;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default limit of a console log (16 MiB).
pub const DEFAULT_MAX: u64 = 16 << 20;
/// Smallest accepted limit.
const MIN_MAX: u64 = 64 << 10;
/// Environment variable overriding the limit (`8M`, `1G`).
pub const MAX_ENV: &str = machinen_proto::env::CONSOLE_LOG_MAX;
/// How often the size is checked; what a guest writes in this time is the
/// most the file can exceed its limit by.
const CHECK_EVERY: Duration = timeouts::CONSOLE_CHECK;

/// The limit: [`MAX_ENV`] when set to a size, else [`DEFAULT_MAX`].
pub fn max_from_env() -> u64 {
    match std::env::var(MAX_ENV) {
        Ok(v) => match machinen::hostfile::parse_size(&v) {
            Some(n) => n.max(MIN_MAX),
            None => {
                tracing::warn!(
                    "{MAX_ENV}={v:?} is not a size (e.g. 16M); using {} bytes",
                    DEFAULT_MAX
                );
                DEFAULT_MAX
            }
        },
        Err(_) => DEFAULT_MAX,
    }
}

/// Keep `path` under `max` bytes for as long as the VM runs.
pub async fn cap(path: PathBuf, max: u64) {
    let mut tick = tokio::time::interval(CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let p = path.clone();
        match tokio::task::spawn_blocking(move || shrink_if_over(&p, max)).await {
            Ok(Ok(Some(dropped))) => {
                tracing::info!("console log over {max} bytes: dropped its oldest {dropped} bytes")
            }
            Ok(Ok(None)) => {}
            Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => {}
            Ok(Err(e)) => tracing::warn!("cannot bound the console log {}: {e}", path.display()),
            Err(e) => tracing::warn!("console log task failed: {e}"),
        }
    }
}

/// When `path` is over `max`, drop its head so that about half of `max`
/// remains. Returns the bytes dropped.
pub fn shrink_if_over(path: &Path, max: u64) -> io::Result<Option<u64>> {
    let len = std::fs::metadata(path)?.len();
    if len <= max {
        return Ok(None);
    }
    let file = OpenOptions::new().read(true).append(true).open(path)?;
    let keep = max / 2;
    if let Some(dropped) = collapse_head(&file, len, keep)? {
        return Ok(Some(dropped));
    }
    rewrite_tail(file, keep).map(Some)
}

/// Remove the head in place (ext4, xfs): atomic with respect to QEMU's
/// appends. `None` when the filesystem cannot.
#[cfg(target_os = "linux")]
fn collapse_head(file: &File, len: u64, keep: u64) -> io::Result<Option<u64>> {
    use std::os::unix::fs::MetadataExt;
    let block = file.metadata()?.blksize().max(512);
    let drop = (len - keep) / block * block;
    if drop == 0 {
        return Ok(None);
    }
    // SAFETY: fallocate on an open descriptor we own, with a range inside
    // the file; it touches no memory of ours.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_COLLAPSE_RANGE,
            0,
            drop as libc::off_t,
        )
    };
    if rc == 0 {
        return Ok(Some(drop));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn collapse_head(_file: &File, _len: u64, _keep: u64) -> io::Result<Option<u64>> {
    Ok(None)
}

/// Elsewhere: save the tail, empty the file, append the tail again. Lines
/// QEMU appends in between land before the saved tail.
fn rewrite_tail(mut file: File, keep: u64) -> io::Result<u64> {
    let len = file.metadata()?.len();
    let start = len.saturating_sub(keep);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity(keep as usize);
    Read::by_ref(&mut file).take(keep).read_to_end(&mut tail)?;
    file.set_len(0)?;
    file.write_all(&tail)?;
    Ok(start)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_appended_log_stays_bounded_and_keeps_its_newest_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("console.log");
        let max = 256 << 10;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .expect("open");
        let mut shrunk = 0;
        for i in 0..20_000u32 {
            writeln!(log, "line {i:08} of a chatty guest").expect("write");
            if i % 1000 == 999 && shrink_if_over(&path, max).expect("shrink").is_some() {
                shrunk += 1;
            }
        }
        assert!(shrunk > 0, "the log went over its limit");
        shrink_if_over(&path, max).expect("shrink");
        let text = std::fs::read(&path).expect("read");
        assert!(text.len() as u64 <= max, "{} bytes", text.len());
        assert!(String::from_utf8_lossy(&text).ends_with("line 00019999 of a chatty guest\n"));
        // The fallback keeps the tail too.
        let dropped = rewrite_tail(
            OpenOptions::new()
                .read(true)
                .append(true)
                .open(&path)
                .expect("open"),
            1000,
        )
        .expect("rewrite");
        assert!(dropped > 0);
        let text = std::fs::read_to_string(&path).expect("read");
        assert_eq!(text.len(), 1000);
        assert!(text.ends_with("line 00019999 of a chatty guest\n"));
    }
}
