//! Writing data that comes from a guest into a host file, bounded and
//! without leftovers: [`Vm::read_file_to_path`](crate::Vm::read_file_to_path)
//! and `machinen cp VM:/path HOST`.
//!
//! A guest decides what it sends (a sparse file can claim a terabyte of
//! zeros), so the transfer is bounded twice: by a size limit
//! ([`ReadFileOptions::max_bytes`], [`DEFAULT_MAX_BYTES`]) and by a reserve
//! of free space that the destination filesystem keeps ([`DiskReserve`]).
//! Both are checked before the first byte is written (against the size the
//! guest announced) and while writing (against what actually arrives).
//!
//! The data goes to an unnamed file (`O_TMPFILE`) in the destination's
//! directory, which is given a name only when complete: an error, a dropped
//! future or even `SIGKILL` leaves nothing behind. Where the filesystem has
//! no `O_TMPFILE`, a hidden `.machinen-cp-*` file is used instead and
//! removed on every exit path this process lives through.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::error::{fail, ErrorCode, Failure, Result};

/// Default bound on one guest-to-host file transfer (4 GiB).
pub const DEFAULT_MAX_BYTES: u64 = 4 << 30;

/// Environment variable overriding the free-space reserve.
pub const RESERVE_ENV: &str = machinen_proto::env::DISK_RESERVE;

/// Prefix of the named temporary file used without `O_TMPFILE`.
pub const TEMP_PREFIX: &str = ".machinen-cp-";

/// Parse a size: bytes, or a number with a binary suffix `K`, `M`, `G`, `T`
/// (optionally followed by `i`, `B` or `iB`; `10M` = 10 MiB).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return None;
    }
    let n: u64 = t[..digits].parse().ok()?;
    n.checked_mul(1u64 << unit_shift(&t[digits..])?)
}

/// The power of two a size suffix stands for: none or `B` 0, `K` 10, `M`
/// 20, `G` 30, `T` 40 (each optionally followed by `i`, `B` or `iB`; any
/// case).
pub fn unit_shift(suffix: &str) -> Option<u32> {
    Some(match suffix.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "ki" | "kib" => 10,
        "m" | "mb" | "mi" | "mib" => 20,
        "g" | "gb" | "gi" | "gib" => 30,
        "t" | "tb" | "ti" | "tib" => 40,
        _ => return None,
    })
}

/// A `--max-size` value: a size, or `unlimited`.
pub fn parse_max_size(s: &str) -> Result<u64, Failure> {
    if s.eq_ignore_ascii_case("unlimited") {
        return Ok(u64::MAX);
    }
    match parse_size(s) {
        Some(n) if n > 0 => Ok(n),
        _ => Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("--max-size {s:?} is not a size"),
        )
        .hint("e.g. --max-size 500M, 20G or unlimited")),
    }
}

/// How much free space a destination filesystem keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskReserve {
    /// The smaller of 1 GiB and 5 % of the filesystem (the default).
    Default,
    /// A fixed number of bytes (`0` disables the check).
    Bytes(u64),
    /// A share of the filesystem's size, in percent.
    Percent(u8),
}

impl DiskReserve {
    /// From [`RESERVE_ENV`] (`2G`, `5%`, `0`), else the default.
    pub fn from_env() -> Result<DiskReserve, Failure> {
        match std::env::var(RESERVE_ENV) {
            Ok(v) if !v.trim().is_empty() => DiskReserve::parse(&v),
            _ => Ok(DiskReserve::Default),
        }
    }

    pub fn parse(s: &str) -> Result<DiskReserve, Failure> {
        let bad = || {
            fail(
                ErrorCode::BootArgsInvalid,
                format!("{RESERVE_ENV}={s:?} is neither a size nor a percentage"),
            )
            .hint("e.g. 1G, 512M, 5% or 0 (no reserve)")
        };
        if let Some(p) = s.trim().strip_suffix('%') {
            return match p.trim().parse::<u8>() {
                Ok(p) if p <= 100 => Ok(DiskReserve::Percent(p)),
                _ => Err(bad()),
            };
        }
        parse_size(s).map(DiskReserve::Bytes).ok_or_else(bad)
    }

    /// The reserve in bytes on a filesystem of `total` bytes.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            DiskReserve::Default => (1u64 << 30).min(total / 20),
            DiskReserve::Bytes(b) => b,
            DiskReserve::Percent(p) => total / 100 * u64::from(p),
        }
    }
}

/// Options for [`Vm::read_file_to_path`](crate::Vm::read_file_to_path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadFileOptions {
    /// The transfer fails with `FILES_TOO_LARGE` beyond this many bytes.
    pub max_bytes: u64,
    /// Free space the destination filesystem keeps (`FILES_HOST_DISK_RESERVE`).
    pub reserve: DiskReserve,
    /// Permission bits of the new file; `None` takes the guest file's.
    pub mode: Option<u32>,
}

impl Default for ReadFileOptions {
    fn default() -> Self {
        ReadFileOptions {
            max_bytes: DEFAULT_MAX_BYTES,
            reserve: DiskReserve::Default,
            mode: None,
        }
    }
}

pub(crate) fn too_large(guest: &str, max: u64, what: &str) -> crate::Error {
    fail(ErrorCode::FilesTooLarge, format!("{guest} {what} the limit of {} ({max} bytes)", human(max)))
        .hint("raise the limit: `machinen cp --max-size 20G …` or `--max-size unlimited` (library: ReadFileOptions::max_bytes)")
        .into()
}

fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn host_io(path: &Path, what: &str, e: std::io::Error) -> crate::Error {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::FilesNotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::FilesPermissionDenied,
        _ if e.raw_os_error() == Some(libc::ENOSPC) => ErrorCode::FilesHostDiskReserve,
        _ => ErrorCode::FilesIo,
    };
    fail(code, format!("{}: {what}", path.display()))
        .source(e)
        .into()
}

/// Free and total bytes of the filesystem holding `dir`.
fn space(dir: &Path) -> Result<(u64, u64)> {
    let st = nix::sys::statvfs::statvfs(dir)
        .map_err(|e| host_io(dir, "cannot read the free space", e.into()))?;
    let frsize = st.fragment_size() as u64;
    Ok((
        st.blocks_available() as u64 * frsize,
        st.blocks() as u64 * frsize,
    ))
}

/// Fail unless `dir`'s filesystem keeps its reserve after `more` bytes.
pub(crate) fn check_room(dir: &Path, more: u64, reserve: DiskReserve) -> Result<()> {
    if reserve == DiskReserve::Bytes(0) {
        return Ok(());
    }
    let (avail, total) = space(dir)?;
    let keep = reserve.bytes(total);
    if avail.saturating_sub(more) < keep {
        return Err(fail(
            ErrorCode::FilesHostDiskReserve,
            format!(
                "{}: writing {} more would leave {} free on the host filesystem, below its reserve of {}",
                dir.display(),
                human(more),
                human(avail.saturating_sub(more)),
                human(keep)
            ),
        )
        .hint(format!("free space there or copy elsewhere; {RESERVE_ENV} sets the reserve (e.g. 512M, 2%, 0 for none)"))
        .into());
    }
    Ok(())
}

/// A file being written beside its destination, named only when complete.
pub(crate) struct PendingFile {
    file: File,
    dir: PathBuf,
    /// `None` for an unnamed (`O_TMPFILE`) file.
    named: Option<tempfile::TempPath>,
}

impl PendingFile {
    /// Create it in `dir` (which must exist).
    pub(crate) fn create(dir: &Path) -> Result<PendingFile> {
        PendingFile::create_as(dir, true)
    }

    /// `unnamed`: try `O_TMPFILE` first (the tests also take the other way).
    fn create_as(dir: &Path, unnamed: bool) -> Result<PendingFile> {
        #[cfg(target_os = "linux")]
        if unnamed {
            use std::os::unix::fs::OpenOptionsExt;
            match std::fs::OpenOptions::new()
                .write(true)
                .mode(0o600)
                .custom_flags(libc::O_TMPFILE)
                .open(dir)
            {
                Ok(file) => {
                    return Ok(PendingFile {
                        file,
                        dir: dir.to_path_buf(),
                        named: None,
                    })
                }
                // Filesystems without O_TMPFILE say so in several ways.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EOPNOTSUPP)
                            | Some(libc::EISDIR)
                            | Some(libc::EINVAL)
                            | Some(libc::ENOENT)
                    ) && dir.is_dir() =>
                {
                    tracing::debug!(
                        "{}: no O_TMPFILE ({e}); using a named temporary file",
                        dir.display()
                    );
                }
                Err(e) => return Err(host_io(dir, "cannot create a file there", e)),
            }
        }
        let tmp = tempfile::Builder::new()
            .prefix(TEMP_PREFIX)
            .tempfile_in(dir)
            .map_err(|e| host_io(dir, "cannot create a temporary file", e))?;
        let (file, path) = tmp.into_parts();
        Ok(PendingFile {
            file,
            dir: dir.to_path_buf(),
            named: Some(path),
        })
    }

    /// A second handle for writing (async code writes, this keeps the name).
    pub(crate) fn handle(&self) -> Result<File> {
        self.file
            .try_clone()
            .map_err(|e| host_io(&self.dir, "cannot reopen the file being written", e))
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// Flush to disk, set `mode` and give the file the name `dest`,
    /// replacing what was there.
    pub(crate) fn persist(self, dest: &Path, mode: u32) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(|e| host_io(dest, "cannot set the mode", e))?;
        self.file
            .sync_all()
            .map_err(|e| host_io(dest, "write failed", e))?;
        match self.named {
            Some(path) => path
                .persist(dest)
                .map_err(|e| host_io(dest, "cannot move the file into place", e.error))?,
            None => link_unnamed(&self.file, &self.dir, dest)?,
        }
        Ok(())
    }
}

/// Name an `O_TMPFILE` file: link it to `dest` when that is free (atomic,
/// no name ever exists for a partial file), else to a fresh hidden name
/// that is renamed over `dest`.
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, dir: &Path, dest: &Path) -> Result<()> {
    use nix::fcntl::AtFlags;
    use std::os::fd::AsRawFd;
    let proc_path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let link = |to: &Path| {
        nix::unistd::linkat(
            None,
            proc_path.as_path(),
            None,
            to,
            AtFlags::AT_SYMLINK_FOLLOW,
        )
    };
    match link(dest) {
        Ok(()) => return Ok(()),
        Err(nix::errno::Errno::EEXIST) => {}
        Err(e) => {
            return Err(host_io(
                dest,
                "cannot give the copied file its name",
                e.into(),
            ))
        }
    }
    for _ in 0..16 {
        let tmp = dir.join(format!("{TEMP_PREFIX}{:016x}", rand::random::<u64>()));
        match link(&tmp) {
            Ok(()) => {
                return std::fs::rename(&tmp, dest).map_err(|e| {
                    let _ = std::fs::remove_file(&tmp);
                    host_io(dest, "cannot move the file into place", e)
                });
            }
            Err(nix::errno::Errno::EEXIST) => continue,
            Err(e) => {
                return Err(host_io(
                    dest,
                    "cannot give the copied file a name",
                    e.into(),
                ))
            }
        }
    }
    Err(fail(
        ErrorCode::FilesIo,
        format!("{}: no free temporary name", dir.display()),
    )
    .into())
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_file: &File, dir: &Path, _dest: &Path) -> Result<()> {
    Err(fail(
        ErrorCode::FilesIo,
        format!("{}: unnamed files are Linux-only", dir.display()),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("10"), Some(10));
        assert_eq!(parse_size("10M"), Some(10 << 20));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("2gib"), Some(2 << 30));
        assert_eq!(parse_size("3k"), Some(3072));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        for bad in ["", "M", "1X", "-1", "1.5G", "99999999999999999999T"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(parse_max_size("unlimited").expect("ok"), u64::MAX);
        assert_eq!(
            parse_max_size("0").expect_err("zero").code,
            ErrorCode::BootArgsInvalid
        );
        assert_eq!(
            DiskReserve::parse("5%").expect("pct"),
            DiskReserve::Percent(5)
        );
        assert_eq!(
            DiskReserve::parse("0").expect("none"),
            DiskReserve::Bytes(0)
        );
        assert!(DiskReserve::parse("101%").is_err() && DiskReserve::parse("lots").is_err());
        assert_eq!(DiskReserve::Default.bytes(100 << 30), 1 << 30);
        assert_eq!(DiskReserve::Default.bytes(10 << 30), 512 << 20);
        assert_eq!(DiskReserve::Percent(10).bytes(1000), 100);
    }

    #[test]
    fn a_pending_file_leaves_nothing_until_persisted() {
        for unnamed in [true, false] {
            pending_file_round_trip(unnamed);
        }
    }

    fn pending_file_round_trip(unnamed: bool) {
        let dir = tempfile::tempdir().expect("tmp");
        let dest = dir.path().join("out.bin");
        let p = PendingFile::create_as(dir.path(), unnamed).expect("create");
        // (A filesystem without O_TMPFILE takes the named way either way.)
        if !unnamed {
            assert!(p.named.as_ref().is_some_and(|n| n
                .file_name()
                .is_some_and(|f| f.to_string_lossy().starts_with(TEMP_PREFIX))));
        }
        p.handle()
            .expect("handle")
            .write_all(b"partial")
            .expect("write");
        drop(p);
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            0,
            "a dropped file leaves no name behind"
        );

        // New name, then replacing an existing file.
        for round in 0..2 {
            let p = PendingFile::create_as(dir.path(), unnamed).expect("create");
            p.handle()
                .expect("handle")
                .write_all(format!("round {round}").as_bytes())
                .expect("write");
            p.persist(&dest, 0o640).expect("persist");
            assert_eq!(
                std::fs::read_to_string(&dest).expect("read"),
                format!("round {round}")
            );
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(
                std::fs::metadata(&dest).expect("meta").permissions().mode() & 0o777,
                0o640
            );
            assert_eq!(
                std::fs::read_dir(dir.path()).expect("ls").count(),
                1,
                "only the destination"
            );
        }
    }

    #[test]
    fn the_reserve_is_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        check_room(dir.path(), 0, DiskReserve::Bytes(0)).expect("no reserve");
        check_room(dir.path(), 1, DiskReserve::Bytes(1)).expect("one byte fits");
        let err = check_room(dir.path(), u64::MAX / 2, DiskReserve::Default).expect_err("too much");
        assert_eq!(err.code(), ErrorCode::FilesHostDiskReserve);
        let err = check_room(dir.path(), 0, DiskReserve::Percent(100)).expect_err("all of it");
        assert_eq!(err.code(), ErrorCode::FilesHostDiskReserve);
    }
}
