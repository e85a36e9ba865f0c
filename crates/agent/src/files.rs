//! `Request::WriteFile` and `Request::ReadFile`: file transfers over one
//! protocol stream.
//!
//! ```text
//! -> Request(WriteFile { path, mode, append })   (read by the dispatcher)
//! -> Data* Eof
//! <- Response(Written { bytes })  | Error { code: FILES_*, message }
//!
//! -> Request(ReadFile { path })
//! <- Response(FileInfo { mode, size }) Data* Eof  | Error
//! ```
//!
//! A replacing write goes to a temporary file next to the target and is
//! renamed over it once complete, so readers never see half a file and a
//! transfer cut short leaves the old file alone. Missing parent directories
//! are created. Only regular files are read or appended to: a FIFO or device
//! would block or never end.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use machinen_proto::{
    read_frame, send, FileInfo, Frame, Response, WireError, WriteFileRequest, MAX_CHUNK,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::log::debug;

/// Error codes sent in `Frame::Error` by file transfers.
pub mod code {
    pub const PATH_INVALID: &str = machinen_proto::ErrorCode::FilesPathInvalid.as_str();
    pub const NOT_FOUND: &str = machinen_proto::ErrorCode::FilesNotFound.as_str();
    pub const PERMISSION_DENIED: &str = machinen_proto::ErrorCode::FilesPermissionDenied.as_str();
    pub const IS_DIRECTORY: &str = machinen_proto::ErrorCode::FilesIsDirectory.as_str();
    pub const NOT_A_DIRECTORY: &str = machinen_proto::ErrorCode::FilesNotADirectory.as_str();
    pub const NOT_REGULAR: &str = machinen_proto::ErrorCode::FilesNotRegular.as_str();
    pub const NO_SPACE: &str = machinen_proto::ErrorCode::FilesNoSpace.as_str();
    pub const IO: &str = machinen_proto::ErrorCode::FilesIo.as_str();
}

pub(crate) fn err(code: &str, message: impl Into<String>) -> WireError {
    WireError {
        code: code.to_owned(),
        message: message.into(),
    }
}

/// Map an OS error on `path` while doing `what` to a coded wire error.
pub fn io_error(path: &Path, what: &str, e: &io::Error) -> WireError {
    let c = match (e.kind(), e.raw_os_error()) {
        (io::ErrorKind::NotFound, _) => code::NOT_FOUND,
        (io::ErrorKind::PermissionDenied, _) => code::PERMISSION_DENIED,
        (_, Some(libc::EISDIR)) => code::IS_DIRECTORY,
        (_, Some(libc::ENOTDIR)) => code::NOT_A_DIRECTORY,
        (_, Some(libc::ENOSPC)) | (_, Some(libc::EDQUOT)) => code::NO_SPACE,
        (_, Some(libc::EROFS)) => code::PERMISSION_DENIED,
        _ => code::IO,
    };
    err(c, format!("{}: {what}: {e}", path.display()))
}

/// Check a guest path from the host: absolute, no NUL, names a file.
pub fn check_path(path: &str) -> Result<PathBuf, WireError> {
    if !path.starts_with('/') {
        return Err(err(
            code::PATH_INVALID,
            format!("{path:?}: the guest path must be absolute"),
        ));
    }
    if path.contains('\0') {
        return Err(err(
            code::PATH_INVALID,
            format!("{path:?}: the guest path contains a NUL byte"),
        ));
    }
    let p = PathBuf::from(path);
    if p.file_name().is_none() || path.ends_with('/') {
        return Err(err(
            code::PATH_INVALID,
            format!("{path:?}: the guest path names a directory, not a file"),
        ));
    }
    Ok(p)
}

static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// Where a replacing write of `target` goes first.
fn temp_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.machinen-{}-{seq}.tmp", std::process::id()))
}

/// An open write: the file being written and, for a replacement, where it
/// goes when complete.
struct Writer {
    file: File,
    /// `(temp, target)` for a replacing write.
    rename: Option<(PathBuf, PathBuf)>,
    mode: Option<u32>,
    path: PathBuf,
    bytes: u64,
}

impl Writer {
    fn open(req: &WriteFileRequest) -> Result<Writer, WireError> {
        let path = check_path(&req.path)?;
        if let Some(m) = req.mode {
            if m > 0o7777 {
                return Err(err(
                    code::PATH_INVALID,
                    format!("{}: mode {m:o} is not a permission mode", path.display()),
                ));
            }
        }
        if let Some(parent) = path.parent() {
            if !parent.as_os_str().is_empty() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| io_error(parent, "cannot create the parent directory", &e))?;
            }
        }
        let existing = std::fs::metadata(&path).ok();
        if let Some(m) = &existing {
            if m.is_dir() {
                return Err(err(
                    code::IS_DIRECTORY,
                    format!("{}: is a directory", path.display()),
                ));
            }
        }
        if req.append {
            if let Some(m) = &existing {
                if !m.is_file() {
                    return Err(err(
                        code::NOT_REGULAR,
                        format!(
                            "{}: not a regular file; cannot append to it",
                            path.display()
                        ),
                    ));
                }
            }
            let file = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(req.mode.unwrap_or(0o644))
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&path)
                .map_err(|e| io_error(&path, "cannot open for appending", &e))?;
            return Ok(Writer {
                file,
                rename: None,
                mode: req.mode,
                path,
                bytes: 0,
            });
        }
        let mode = req
            .mode
            .or_else(|| {
                existing
                    .as_ref()
                    .filter(|m| m.is_file())
                    .map(|m| m.mode() & 0o7777)
            })
            .unwrap_or(0o644);
        let tmp = temp_path(&path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_CLOEXEC)
            .open(&tmp)
            .map_err(|e| io_error(&path, "cannot create a temporary file next to it", &e))?;
        Ok(Writer {
            file,
            rename: Some((tmp, path.clone())),
            mode: Some(mode),
            path,
            bytes: 0,
        })
    }

    fn write(&mut self, data: &[u8]) -> Result<(), WireError> {
        self.file
            .write_all(data)
            .map_err(|e| io_error(&self.path, "write failed", &e))?;
        self.bytes += data.len() as u64;
        Ok(())
    }

    fn finish(mut self) -> Result<u64, WireError> {
        let path = self.path.clone();
        if let Some(mode) = self.mode {
            self.file
                .set_permissions(std::fs::Permissions::from_mode(mode))
                .map_err(|e| io_error(&path, "cannot set the mode", &e))?;
        }
        self.file
            .sync_data()
            .map_err(|e| io_error(&path, "cannot flush to disk", &e))?;
        if let Some((tmp, target)) = self.rename.take() {
            std::fs::rename(&tmp, &target).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                io_error(&target, "cannot move the new file into place", &e)
            })?;
        }
        Ok(self.bytes)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // An unfinished replacement leaves the target untouched.
        if let Some((tmp, _)) = self.rename.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

pub(crate) async fn fail<W: AsyncWrite + Unpin>(wr: &mut W, e: WireError) {
    debug!("files: {}: {}", e.code, e.message);
    let _ = send(wr, &Frame::Error(e)).await;
    let _ = wr.shutdown().await;
}

/// Run blocking file work on the blocking pool: the agent's runtime has one
/// thread, and a write, read or flush there would hold every exec and port
/// forward of the VM until it returned.
pub(crate) async fn blocking<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> Result<T, WireError> + Send + 'static,
) -> Result<T, WireError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(err(
            code::IO,
            format!("{}: the file worker failed: {e}", path.display()),
        ))
    })
}

/// The nice value of a file worker: a copy shares the guest's vCPUs with
/// execs and port forwards, and a user waiting on those should not queue
/// behind a bulk transfer's writes and flushes.
const WORKER_NICE: i32 = 10;

/// The calling thread runs at `WORKER_NICE` while this lives; the blocking
/// pool reuses threads, so the default comes back on drop.
pub(crate) struct Background;

impl Background {
    pub(crate) fn enter() -> Background {
        set_thread_nice(WORKER_NICE);
        Background
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        set_thread_nice(0);
    }
}

fn set_thread_nice(nice: i32) {
    let tid = nix::unistd::gettid().as_raw();
    // SAFETY: setpriority(2) takes integers only and touches no memory; with
    // PRIO_PROCESS and a thread id it changes that one thread on Linux.
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) };
    if rc != 0 {
        debug!(
            "files: cannot set the worker's nice value to {nice}: {}",
            io::Error::last_os_error()
        );
    }
}

/// Chunks in flight between the stream and the file worker: enough to keep
/// both busy, few enough that a slow disk holds back the host, not memory.
pub(crate) const QUEUE: usize = 4;

/// What the stream hands the write worker.
enum WriteOp {
    Data(Vec<u8>),
    /// The host sent `Eof`: flush and move the file into place.
    Finish,
}

/// The write worker: writes chunks until `Finish` (then `Some(bytes)`) or
/// until the stream side goes away (then `None`, and dropping the writer
/// removes a temporary file).
fn write_worker(
    mut w: Writer,
    mut rx: tokio::sync::mpsc::Receiver<WriteOp>,
) -> Result<Option<u64>, WireError> {
    let _nice = Background::enter();
    while let Some(op) = rx.blocking_recv() {
        match op {
            WriteOp::Data(b) => w.write(&b)?,
            WriteOp::Finish => return w.finish().map(Some),
        }
    }
    Ok(None)
}

/// Serve one `WriteFile`.
pub async fn write_file<S>(stream: S, req: WriteFileRequest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let path = PathBuf::from(&req.path);
    let req_path = req.path.clone();
    let w = match blocking(&path, move || Writer::open(&req)).await {
        Ok(w) => w,
        Err(e) => return fail(&mut wr, e).await,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let worker = tokio::task::spawn_blocking(move || write_worker(w, rx));
    loop {
        match read_frame(&mut rd).await {
            Ok(Some(Frame::Data(b))) => {
                // A closed channel means the worker stopped on an error;
                // its result says which.
                if tx.send(WriteOp::Data(b)).await.is_err() {
                    break;
                }
            }
            Ok(Some(Frame::Eof)) => {
                let _ = tx.send(WriteOp::Finish).await;
                break;
            }
            Ok(Some(other)) => {
                drop(tx);
                let _ = worker.await;
                let e = err(
                    machinen_proto::ErrorCode::ProtocolError.as_str(),
                    format!(
                        "expected Data or Eof during a file write, got {}",
                        crate::exec::frame_name(&other)
                    ),
                );
                return fail(&mut wr, e).await;
            }
            Ok(None) | Err(_) => {
                drop(tx);
                let _ = worker.await;
                debug!("files: {req_path}: the host went away mid-transfer; nothing written");
                return;
            }
        }
    }
    drop(tx);
    let res = worker.await.unwrap_or_else(|e| {
        Err(err(
            code::IO,
            format!("{}: the file worker failed: {e}", path.display()),
        ))
    });
    match res {
        Ok(Some(bytes)) => {
            let _ = send(&mut wr, &Frame::Response(Response::Written { bytes })).await;
            let _ = wr.shutdown().await;
        }
        Ok(None) => debug!("files: {req_path}: the write ended before Eof"),
        Err(e) => fail(&mut wr, e).await,
    }
}

fn open_for_read(path: &str) -> Result<(File, FileInfo), WireError> {
    let p = check_path(path)?;
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
        .open(&p)
        .map_err(|e| io_error(&p, "cannot open", &e))?;
    let m = file
        .metadata()
        .map_err(|e| io_error(&p, "cannot stat", &e))?;
    if m.is_dir() {
        return Err(err(
            code::IS_DIRECTORY,
            format!("{}: is a directory", p.display()),
        ));
    }
    if !m.is_file() {
        return Err(err(
            code::NOT_REGULAR,
            format!("{}: not a regular file", p.display()),
        ));
    }
    Ok((
        file,
        FileInfo {
            mode: m.mode() & 0o7777,
            size: m.len(),
        },
    ))
}

/// The read worker: sends chunks until end of file, an error, or the
/// stream side going away. An empty chunk is never sent: the end of the
/// channel is the end of the file.
fn read_worker(
    mut file: File,
    path: PathBuf,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, WireError>>,
) {
    let _nice = Background::enter();
    loop {
        let mut buf = vec![0u8; MAX_CHUNK];
        let item = match file.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                buf.truncate(n);
                Ok(buf)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(io_error(&path, "read failed", &e)),
        };
        let last = item.is_err();
        if tx.blocking_send(item).is_err() || last {
            return;
        }
    }
}

/// Serve one `ReadFile`.
pub async fn read_file<S>(stream: S, path: String)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut s = stream;
    let p = PathBuf::from(&path);
    let open_path = path.clone();
    let (file, info) = match blocking(&p, move || open_for_read(&open_path)).await {
        Ok(x) => x,
        Err(e) => return fail(&mut s, e).await,
    };
    if send(&mut s, &Frame::Response(Response::FileInfo(info)))
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel(QUEUE);
    // Dropping the receiver (the host went away) ends the worker at its
    // next chunk.
    tokio::task::spawn_blocking(move || read_worker(file, p, tx));
    while let Some(item) = rx.recv().await {
        match item {
            Ok(b) => {
                if send(&mut s, &Frame::Data(b)).await.is_err() {
                    debug!("files: {path}: the host went away mid-transfer");
                    return;
                }
            }
            Err(e) => return fail(&mut s, e).await,
        }
    }
    let _ = send(&mut s, &Frame::Eof).await;
    let _ = s.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert_eq!(
            check_path("rel").expect_err("relative").code,
            code::PATH_INVALID
        );
        assert_eq!(check_path("/a/").expect_err("dir").code, code::PATH_INVALID);
        assert_eq!(check_path("/").expect_err("root").code, code::PATH_INVALID);
        assert_eq!(
            check_path("/a\0b").expect_err("nul").code,
            code::PATH_INVALID
        );
        assert_eq!(check_path("/a/b").expect("ok"), PathBuf::from("/a/b"));
    }

    #[tokio::test]
    async fn write_then_read_round_trips_with_mode_and_parents() {
        let dir = tempdir();
        let target = dir.join("x/y/z.bin");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let req = WriteFileRequest {
            path: target.to_string_lossy().into_owned(),
            mode: Some(0o751),
            append: false,
        };
        let (client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(write_file(server, req));
        let (mut crd, mut cwr) = tokio::io::split(client);
        for c in data.chunks(MAX_CHUNK) {
            send(&mut cwr, &Frame::Data(c.to_vec()))
                .await
                .expect("send");
        }
        send(&mut cwr, &Frame::Eof).await.expect("eof");
        let f = read_frame(&mut crd).await.expect("read").expect("frame");
        assert_eq!(
            f,
            Frame::Response(Response::Written {
                bytes: data.len() as u64
            })
        );
        srv.await.expect("join");
        assert_eq!(std::fs::read(&target).expect("read back"), data);
        assert_eq!(
            std::fs::metadata(&target).expect("meta").mode() & 0o7777,
            0o751
        );

        // Append keeps the mode and adds.
        let req = WriteFileRequest {
            path: target.to_string_lossy().into_owned(),
            mode: None,
            append: true,
        };
        let (client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(write_file(server, req));
        let (mut crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, &Frame::Data(b"tail".to_vec()))
            .await
            .expect("send");
        send(&mut cwr, &Frame::Eof).await.expect("eof");
        assert!(matches!(
            read_frame(&mut crd).await,
            Ok(Some(Frame::Response(Response::Written { bytes: 4 })))
        ));
        srv.await.expect("join");

        // Read it back.
        let (client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(read_file(server, target.to_string_lossy().into_owned()));
        let mut c = client;
        let Ok(Some(Frame::Response(Response::FileInfo(info)))) = read_frame(&mut c).await else {
            panic!("no info")
        };
        assert_eq!((info.mode, info.size), (0o751, data.len() as u64 + 4));
        let mut got = Vec::new();
        loop {
            match read_frame(&mut c).await.expect("frame") {
                Some(Frame::Data(b)) => got.extend_from_slice(&b),
                Some(Frame::Eof) => break,
                other => panic!("unexpected {other:?}"),
            }
        }
        srv.await.expect("join");
        assert_eq!(&got[..data.len()], &data[..]);
        assert_eq!(&got[data.len()..], b"tail");
        // No temporary files left behind.
        assert_eq!(
            std::fs::read_dir(target.parent().expect("parent"))
                .expect("ls")
                .count(),
            1
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn errors_name_the_path_and_reason() {
        let dir = tempdir();
        let (mut c, server) = tokio::io::duplex(1 << 16);
        let missing = dir.join("missing");
        tokio::spawn(read_file(server, missing.to_string_lossy().into_owned()));
        let Ok(Some(Frame::Error(e))) = read_frame(&mut c).await else {
            panic!("no error")
        };
        assert_eq!(e.code, code::NOT_FOUND);
        assert!(e.message.contains("missing"), "{}", e.message);

        let (mut c, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(read_file(server, dir.to_string_lossy().into_owned()));
        let Ok(Some(Frame::Error(e))) = read_frame(&mut c).await else {
            panic!("no error")
        };
        assert_eq!(e.code, code::IS_DIRECTORY);

        // A write cut short leaves nothing behind.
        let target = dir.join("cut");
        let (client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(write_file(
            server,
            WriteFileRequest {
                path: target.to_string_lossy().into_owned(),
                mode: None,
                append: false,
            },
        ));
        let (_crd, mut cwr) = tokio::io::split(client);
        send(&mut cwr, &Frame::Data(b"partial".to_vec()))
            .await
            .expect("send");
        drop(cwr);
        drop(_crd);
        srv.await.expect("join");
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(&dir).expect("ls").count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let seq = TMP_SEQ.fetch_add(1, Ordering::Relaxed);
        let d =
            std::env::temp_dir().join(format!("machinen-agent-files-{}-{seq}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}
