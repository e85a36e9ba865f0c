//! Directory trees in and out of a running guest as one streamed tar:
//! [`Vm::push_dir`] and [`Vm::pull_dir`], beside the single-file
//! functions of [`crate::files`].
//!
//! Each transfer is one control connection carrying `Request(PushDir)` or
//! `Request(PullDir)` (see `machinen_proto`); the side that packs walks the
//! tree without following symlinks ([`machinen_proto::tree`]) and leaves
//! out what the exclude patterns match ([`machinen_proto::exclude`]).
//! Modes, mtimes and symlinks travel; owners do not.
//!
//! A pull is bounded and confined like a file read
//! ([`crate::hostfile`]): at most `max_bytes` (file data plus
//! [`unpack::ENTRY_COST`] an entry), a free-space reserve kept on the host
//! filesystem, and nothing outside the destination written (see
//! [`unpack`]). It unpacks into a hidden directory beside the destination
//! and renames it into place when complete, so the destination appears
//! whole or not at all.

pub mod unpack;

use std::io::Write;
use std::path::{Path, PathBuf};

use machinen_proto::chan::{ChanReader, ChanWriter};
use machinen_proto::exclude::Excludes;
use machinen_proto::tree::{self, Kind};
use machinen_proto::{
    self as proto, DirInfo, Frame, PullDirRequest, PushDirRequest, Request, Response,
};

use crate::error::{fail, ErrorCode, Result};
use crate::files::IDLE_TIMEOUT;
use crate::hostfile::{self, DiskReserve};
use crate::vm::{protocol_error, wire_error, Vm};

/// Options for [`Vm::push_dir`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PushDirOptions {
    /// Glob patterns on paths relative to the source ([`machinen_proto::exclude`]).
    pub exclude: Vec<String>,
}

/// Options for [`Vm::pull_dir`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullDirOptions {
    /// Glob patterns on paths relative to the guest directory.
    pub exclude: Vec<String>,
    /// The transfer fails with `FILES_TOO_LARGE` beyond this many bytes
    /// (file data plus [`unpack::ENTRY_COST`] an entry).
    pub max_bytes: u64,
    /// Free space the destination filesystem keeps (`FILES_HOST_DISK_RESERVE`).
    pub reserve: DiskReserve,
}

impl Default for PullDirOptions {
    fn default() -> Self {
        PullDirOptions {
            exclude: Vec::new(),
            max_bytes: hostfile::DEFAULT_MAX_BYTES,
            reserve: DiskReserve::Default,
        }
    }
}

/// What a directory transfer moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct DirReport {
    /// Entries (directories, files, symlinks, hard links).
    pub entries: u64,
    /// Regular-file bytes.
    pub bytes: u64,
}

/// Prefix of the hidden directory a pull unpacks into.
pub const TEMP_PREFIX: &str = ".machinen-cp-";

fn excludes(patterns: &[String]) -> Result<Excludes> {
    Excludes::new(patterns).map_err(|m| {
        fail(ErrorCode::BootArgsInvalid, m)
            .hint("e.g. --exclude '*.o' --exclude node_modules --exclude 'build/**'")
            .into()
    })
}

fn check_guest_dir(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(fail(
            ErrorCode::FilesPathInvalid,
            format!("guest path {path:?} must be an absolute directory"),
        )
        .hint("e.g. /srv/app")
        .into());
    }
    Ok(())
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(ErrorCode::Io, "a directory task failed").source(e))?
}

fn host_io(path: &Path, what: &str, e: std::io::Error) -> crate::Error {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::FilesNotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::FilesPermissionDenied,
        _ if e.raw_os_error() == Some(libc::ENOTDIR) => ErrorCode::FilesNotADirectory,
        _ => ErrorCode::FilesIo,
    };
    fail(code, format!("{}: {what}", path.display()))
        .source(e)
        .into()
}

fn closed(what: &str) -> crate::Error {
    fail(
        ErrorCode::ExecVsockUnavailable,
        format!("the connection to the VM closed while {what}"),
    )
    .hint("the VM may have stopped; `machinen ls` lists live VMs")
    .into()
}

fn unexpected(what: &str, f: &Frame) -> crate::Error {
    fail(
        ErrorCode::ProtocolError,
        format!("unexpected frame while {what}: {f:?}"),
    )
    .into()
}

async fn next_frame<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    what: &str,
) -> Result<Option<Frame>> {
    match tokio::time::timeout(IDLE_TIMEOUT, proto::read_frame(rd)).await {
        Ok(r) => r.map_err(|e| protocol_error(what, e)),
        Err(_) => Err(fail(
            ErrorCode::FilesIo,
            format!("no progress for {} s while {what}", IDLE_TIMEOUT.as_secs()),
        )
        .into()),
    }
}

/// Pack `tree` (walked from a host directory) into `out`.
fn pack_host(tree: tree::Tree, out: ChanWriter, root: &Path) -> Result<()> {
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    for e in &tree.entries {
        let r = match e.kind {
            Kind::Dir | Kind::Symlink => b.append_path_with_name(&e.full, &e.rel),
            Kind::File => append_file(&mut b, &e.full, &e.rel),
        };
        match r {
            Ok(()) => {}
            // Gone since the walk: left out, as `cp -r` of a changing tree.
            Err(x) if x.kind() == std::io::ErrorKind::NotFound => {}
            Err(x) if x.kind() == std::io::ErrorKind::BrokenPipe => {
                return Err(closed("sending the directory"))
            }
            Err(x) => return Err(host_io(&e.full, "cannot read", x)),
        }
    }
    let mut out = b
        .into_inner()
        .map_err(|x| host_io(root, "cannot finish the tar stream", x))?;
    out.flush().map_err(|_| closed("sending the directory"))?;
    Ok(())
}

/// A regular file with exactly the size its header announces, even if it
/// changes while being read (the stream must stay well-formed).
fn append_file<W: Write>(b: &mut tar::Builder<W>, full: &Path, rel: &Path) -> std::io::Result<()> {
    use std::io::Read;
    let file = std::fs::File::open(full)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::from(std::io::ErrorKind::NotFound));
    }
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    let size = meta.len();
    let data = file.take(size).chain(std::io::repeat(0).take(size));
    b.append_data(&mut h, rel, data.take(size))
}

impl Vm {
    /// Copy the host directory `src` into the guest directory `dest`
    /// (absolute; created with its parents when missing, merged into when
    /// it exists) as one tar stream.
    pub async fn push_dir(
        &self,
        src: &Path,
        dest: &str,
        opts: PushDirOptions,
    ) -> Result<DirReport> {
        check_guest_dir(dest)?;
        let ex = excludes(&opts.exclude)?;
        let root = src.to_path_buf();
        let tree = blocking(move || {
            tree::walk(&root, &ex).map_err(|e| host_io(&root, "cannot read the directory", e))
        })
        .await?;
        let conn = self.connect().await?;
        let (mut rd, mut wr) = conn.into_split();
        let what = format!("copying {} to {dest}", src.display());
        let req = PushDirRequest {
            path: dest.to_owned(),
            mode: Some(tree.root_mode),
        };
        proto::send(&mut wr, &Frame::Request(Request::PushDir(req)))
            .await
            .map_err(|e| protocol_error(&what, e))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let root = src.to_path_buf();
        let packer = tokio::task::spawn_blocking(move || {
            pack_host(tree, ChanWriter::new(tx, proto::MAX_CHUNK), &root)
        });
        let pump = async {
            while let Some(chunk) = rx.recv().await {
                proto::write_frame(&mut wr, &Frame::Data(chunk))
                    .await
                    .map_err(|e| protocol_error(&what, e))?;
            }
            packer
                .await
                .map_err(|e| fail(ErrorCode::Io, "the directory packer failed").source(e))??;
            proto::send(&mut wr, &Frame::Eof)
                .await
                .map_err(|e| protocol_error(&what, e))?;
            Ok::<_, crate::Error>(wr)
        };
        tokio::pin!(pump);
        // The answer may come early: an error before all data went out.
        let answer = tokio::select! {
            r = &mut pump => {
                let _wr = r?;
                next_frame(&mut rd, &what).await?
            }
            r = proto::read_frame(&mut rd) => r.map_err(|e| protocol_error(&what, e))?,
        };
        match answer {
            Some(Frame::Response(Response::DirWritten { entries, bytes })) => {
                Ok(DirReport { entries, bytes })
            }
            Some(Frame::Error(e)) => Err(wire_error(e)),
            Some(other) => Err(unexpected(&what, &other)),
            None => Err(closed(&what)),
        }
    }

    /// Copy the guest directory `src` to the host path `dest`, which must
    /// not exist (or be an empty directory); its parent is created. The
    /// stream is confined and bounded (see the module docs); `dest`
    /// appears complete or not at all.
    pub async fn pull_dir(
        &self,
        src: &str,
        dest: &Path,
        opts: PullDirOptions,
    ) -> Result<DirReport> {
        check_guest_dir(src)?;
        excludes(&opts.exclude)?;
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let d2 = dest.to_path_buf();
        let p2 = parent.clone();
        blocking(move || {
            match std::fs::symlink_metadata(&d2) {
                Ok(m)
                    if m.is_dir()
                        && std::fs::read_dir(&d2).is_ok_and(|mut r| r.next().is_none()) => {}
                Ok(_) => {
                    return Err(fail(
                        ErrorCode::FilesExists,
                        format!(
                            "{} exists; a directory copy never merges into or replaces one",
                            d2.display()
                        ),
                    )
                    .hint("remove it first, or name a new destination")
                    .into())
                }
                Err(_) => {}
            }
            std::fs::create_dir_all(&p2).map_err(|e| host_io(&p2, "cannot create the directory", e))
        })
        .await?;
        let mut conn = self.connect().await?;
        let what = format!("copying {src} out of the VM");
        let req = PullDirRequest {
            path: src.to_owned(),
            exclude: opts.exclude.clone(),
        };
        proto::send(&mut conn, &Frame::Request(Request::PullDir(req)))
            .await
            .map_err(|e| protocol_error(&what, e))?;
        let info: DirInfo = match next_frame(&mut conn, &what).await? {
            Some(Frame::Response(Response::DirInfo(i))) => i,
            Some(Frame::Error(e)) => return Err(wire_error(e)),
            Some(other) => return Err(unexpected(&what, &other)),
            None => return Err(closed(&what)),
        };
        let announced = info
            .bytes
            .saturating_add(info.entries.saturating_mul(unpack::ENTRY_COST));
        if announced > opts.max_bytes {
            return Err(hostfile::too_large(
                src,
                opts.max_bytes,
                &format!(
                    "holds {} bytes with its {} entries, over",
                    announced, info.entries
                ),
            ));
        }
        let (p2, reserve) = (parent.clone(), opts.reserve);
        let tmp = blocking(move || {
            hostfile::check_room(&p2, announced, reserve)?;
            tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .tempdir_in(&p2)
                .map_err(|e| host_io(&p2, "cannot create a temporary directory", e))
        })
        .await?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        let (root, max) = (tmp.path().to_path_buf(), opts.max_bytes);
        let worker = std::thread::Builder::new()
            .name("machinen-pull-dir".into())
            .spawn(move || unpack::unpack_confined(ChanReader::new(rx), &root, max))
            .map_err(|e| fail(ErrorCode::Io, "cannot start the directory unpacker").source(e))?;
        let mut job = Unpacking {
            tx: Some(tx),
            worker: Some(worker),
            tmp: Some(tmp),
        };
        let mut got = 0u64;
        let mut unchecked = 0u64;
        let stream_result: Result<()> = loop {
            match next_frame(&mut conn, &what).await {
                Ok(Some(Frame::Data(b))) => {
                    got += b.len() as u64;
                    unchecked += b.len() as u64;
                    if unchecked >= RESERVE_CHECK_EVERY {
                        unchecked = 0;
                        let (p, left) = (parent.clone(), announced.saturating_sub(got));
                        if let Err(e) =
                            blocking(move || hostfile::check_room(&p, left, reserve)).await
                        {
                            break Err(e);
                        }
                    }
                    // A closed channel: the unpacker stopped (refused an
                    // entry, or the stream ended); its result says why.
                    let Some(tx) = &job.tx else { break Ok(()) };
                    if tx.send(b).await.is_err() {
                        break Ok(());
                    }
                }
                Ok(Some(Frame::Eof)) => break Ok(()),
                Ok(Some(Frame::Error(e))) => break Err(wire_error(e)),
                Ok(Some(other)) => break Err(unexpected(&what, &other)),
                Ok(None) => break Err(closed(&what)),
                Err(e) => break Err(e),
            }
        };
        // The end of the stream ends the unpacker's input.
        job.tx = None;
        let worker = job.worker.take();
        let unpacked = blocking(move || match worker.map(|w| w.join()) {
            Some(Ok(r)) => Ok(r),
            _ => Err(fail(ErrorCode::Io, "the directory unpacker failed").into()),
        })
        .await?;
        // The unpacker's own refusal (an escape, the size bound) is the
        // better explanation of a stream cut short by it.
        let done = match (unpacked, stream_result) {
            (Err(f), _) => return Err(f.into()),
            (Ok(_), Err(e)) => return Err(e),
            (Ok(d), Ok(())) => d,
        };
        let dest_owned = dest.to_path_buf();
        let mode = done.root_mode.unwrap_or(info.mode) & 0o777;
        let Some(tmp) = job.tmp.take() else {
            return Err(fail(
                ErrorCode::Io,
                "the directory copy lost its temporary directory",
            )
            .into());
        };
        blocking(move || {
            use std::os::unix::fs::PermissionsExt;
            hostfile::check_room(tmp.path(), 0, reserve)?;
            std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
                .map_err(|e| host_io(tmp.path(), "cannot set the mode", e))?;
            let path: PathBuf = tmp.keep();
            std::fs::rename(&path, &dest_owned).map_err(|e| {
                let _ = std::fs::remove_dir_all(&path);
                host_io(
                    &dest_owned,
                    "cannot move the copied directory into place",
                    e,
                )
            })
        })
        .await?;
        Ok(DirReport {
            entries: done.entries,
            bytes: done.bytes,
        })
    }
}

/// A pull in progress. Dropped before it completes (an error, or the
/// future dropped on Ctrl-C), it ends the unpacker's input, waits for the
/// unpacker to stop, and only then removes the temporary directory, so no
/// file is created in it after its removal began. That wait blocks the
/// dropping thread briefly: with its input gone, the unpacker stops at its
/// next read.
struct Unpacking {
    tx: Option<tokio::sync::mpsc::Sender<Vec<u8>>>,
    worker: Option<std::thread::JoinHandle<Result<unpack::Unpacked, crate::Failure>>>,
    tmp: Option<tempfile::TempDir>,
}

impl Drop for Unpacking {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
        // TempDir's own drop removes the directory.
        self.tmp = None;
    }
}

/// How often (in stream bytes) a pull re-checks the host's free space.
const RESERVE_CHECK_EVERY: u64 = 16 << 20;

#[cfg(test)]
mod tests;
