//! Files in and out of a running guest: [`Vm::write_file`] and friends.
//!
//! Each transfer is one control connection carrying `Request(WriteFile)` or
//! `Request(ReadFile)`, forwarded by the supervisor to a fresh agent stream
//! (see `machinen_proto`). Data is streamed in chunks of at most
//! [`proto::MAX_CHUNK`], never held whole in memory, with the agent link's
//! flow control slowing a fast sender down.

use machinen_proto::timeouts;
use std::path::Path;
use std::time::Duration;

use machinen_proto::{self as proto, FileInfo, Frame, Request, Response, WriteFileRequest};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{fail, ErrorCode, Result};
use crate::hostfile::{self, ReadFileOptions};
use crate::vm::{protocol_error, wire_error, Vm};

pub use machinen_proto::FileInfo as GuestFileInfo;

/// How long a transfer may go without any progress before it fails.
pub const IDLE_TIMEOUT: Duration = timeouts::FILE_IDLE;

/// Default bound on what [`Vm::read_file`] collects into memory.
pub const READ_FILE_MAX: u64 = 1 << 30;

/// Options for [`Vm::write_file`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriteFileOptions {
    /// Permission bits (e.g. `0o755`); `None` keeps an existing file's mode,
    /// else 0644.
    pub mode: Option<u32>,
    /// Append instead of replacing. A replacement is atomic: the guest sees
    /// the old file or the whole new one.
    pub append: bool,
}

/// Check a guest path on the host side (the agent checks again).
pub fn validate_guest_path(path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\0') || path.ends_with('/') {
        return Err(fail(
            ErrorCode::FilesPathInvalid,
            format!("guest path {path:?} must be absolute and name a file"),
        )
        .hint("e.g. /root/data.bin")
        .into());
    }
    Ok(())
}

fn file_hint(e: crate::Error, path: &str) -> crate::Error {
    let hint = match e.code() {
        ErrorCode::FilesNotFound => Some(format!(
            "check the guest path {path}; `machinen exec VM -- ls -la DIR` shows what is there"
        )),
        ErrorCode::FilesNoSpace => {
            Some("the guest disk is full; remove files or boot a larger image".to_string())
        }
        ErrorCode::FilesIsDirectory => Some("name a file, not a directory".to_string()),
        _ => None,
    };
    match (hint, e) {
        (Some(h), crate::Error::Failure(f)) => crate::Error::Failure(f.hint(h)),
        (_, e) => e,
    }
}

async fn next_frame<R: AsyncRead + Unpin>(rd: &mut R, what: &str) -> Result<Option<Frame>> {
    match tokio::time::timeout(IDLE_TIMEOUT, proto::read_frame(rd)).await {
        Ok(r) => r.map_err(|e| protocol_error(what, e)),
        Err(_) => Err(fail(
            ErrorCode::FilesIo,
            format!("no progress for {} s while {what}", IDLE_TIMEOUT.as_secs()),
        )
        .into()),
    }
}

fn closed(what: &str) -> crate::Error {
    fail(
        ErrorCode::ExecVsockUnavailable,
        format!("the connection to the VM closed while {what}"),
    )
    .hint("the VM may have stopped; `machinen ls` lists live VMs")
    .into()
}

impl Vm {
    /// Write `contents` to the guest file `path` (absolute), creating
    /// missing parent directories. Returns the bytes written.
    pub async fn write_file(
        &self,
        path: &str,
        contents: impl AsRef<[u8]>,
        opts: WriteFileOptions,
    ) -> Result<u64> {
        self.write_file_from(path, contents.as_ref(), opts).await
    }

    /// Stream `reader` into the guest file `path` until EOF.
    pub async fn write_file_from<R: AsyncRead + Unpin>(
        &self,
        path: &str,
        reader: R,
        opts: WriteFileOptions,
    ) -> Result<u64> {
        validate_guest_path(path)?;
        if opts.mode.is_some_and(|m| m > 0o7777) {
            return Err(fail(
                ErrorCode::FilesPathInvalid,
                format!("mode {:o} is not a permission mode", opts.mode.unwrap_or(0)),
            )
            .into());
        }
        let conn = self.connect().await?;
        let (mut rd, mut wr) = conn.into_split();
        let req = WriteFileRequest {
            path: path.to_owned(),
            mode: opts.mode,
            append: opts.append,
        };
        proto::send(&mut wr, &Frame::Request(Request::WriteFile(req)))
            .await
            .map_err(|e| protocol_error("starting a file write", e))?;
        let what = format!("writing {path}");
        let pump = async {
            let mut reader = reader;
            let mut buf = vec![0u8; proto::MAX_CHUNK];
            loop {
                let n = match reader.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) => {
                        return Err(fail(
                            ErrorCode::Io,
                            format!("reading the data for {path} failed"),
                        )
                        .source(e)
                        .into())
                    }
                };
                proto::write_frame(&mut wr, &Frame::Data(buf[..n].to_vec()))
                    .await
                    .map_err(|e| protocol_error(&what, e))?;
            }
            proto::send(&mut wr, &Frame::Eof)
                .await
                .map_err(|e| protocol_error(&what, e))?;
            Ok::<_, crate::Error>(wr)
        };
        tokio::pin!(pump);
        // The answer may come early (an error before all data went out).
        let answer = tokio::select! {
            r = &mut pump => {
                let _wr = r?;
                match tokio::time::timeout(IDLE_TIMEOUT, proto::read_frame(&mut rd)).await {
                    Ok(r) => r.map_err(|e| protocol_error(&what, e))?,
                    Err(_) => return Err(fail(ErrorCode::FilesIo, format!("the guest did not confirm the write of {path} within {} s", IDLE_TIMEOUT.as_secs())).into()),
                }
            }
            r = proto::read_frame(&mut rd) => r.map_err(|e| protocol_error(&what, e))?,
        };
        match answer {
            Some(Frame::Response(Response::Written { bytes })) => Ok(bytes),
            Some(Frame::Error(e)) => Err(file_hint(wire_error(e), path)),
            Some(other) => Err(fail(
                ErrorCode::ProtocolError,
                format!("unexpected answer to a file write: {other:?}"),
            )
            .into()),
            None => Err(closed(&what)),
        }
    }

    /// Read the guest file `path` into memory (at most [`READ_FILE_MAX`] bytes).
    pub async fn read_file(&self, path: &str) -> Result<(FileInfo, Vec<u8>)> {
        let mut out = Vec::new();
        let info = self.read_file_to(path, &mut out, READ_FILE_MAX).await?;
        Ok((info, out))
    }

    /// Stream the guest file `path` into `writer`; fails with
    /// `FILES_TOO_LARGE` when the guest announces or sends more than
    /// `max_bytes`. Returns the file's mode and the size it had when the
    /// transfer started.
    pub async fn read_file_to<W: AsyncWrite + Unpin>(
        &self,
        path: &str,
        writer: &mut W,
        max_bytes: u64,
    ) -> Result<FileInfo> {
        let mut rd = self.open_read(path, max_bytes).await?;
        while let Some(b) = rd.next().await? {
            writer.write_all(&b).await.map_err(|e| {
                fail(
                    ErrorCode::Io,
                    format!("writing the contents of {path} failed"),
                )
                .source(e)
            })?;
        }
        writer.flush().await.map_err(|e| {
            fail(
                ErrorCode::Io,
                format!("writing the contents of {path} failed"),
            )
            .source(e)
        })?;
        Ok(rd.info)
    }

    /// Copy the guest file `path` to the host file `dest`, bounded by
    /// `opts.max_bytes` and the destination filesystem's free-space reserve
    /// (see [`crate::hostfile`]). Missing parent directories are created;
    /// `dest` appears complete, with the guest file's mode (or `opts.mode`),
    /// or not at all: a failure or a dropped future leaves no partial file.
    /// Returns the bytes copied and the mode given.
    pub async fn read_file_to_path(
        &self,
        path: &str,
        dest: &Path,
        opts: ReadFileOptions,
    ) -> Result<(u64, u32)> {
        let parent = dest
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .to_path_buf();
        let mut rd = self.open_read(path, opts.max_bytes).await?;
        let (announced, reserve) = (rd.info.size, opts.reserve);
        let pending = blocking(move || {
            std::fs::create_dir_all(&parent)
                .map_err(|e| host_error(&parent, "cannot create the directory", e))?;
            hostfile::check_room(&parent, announced, reserve)?;
            hostfile::PendingFile::create(&parent)
        })
        .await?;
        let mut file = tokio::fs::File::from_std(pending.handle()?);
        let mut got = 0u64;
        let mut unchecked = 0u64;
        while let Some(b) = rd.next().await? {
            file.write_all(&b)
                .await
                .map_err(|e| host_error(dest, "write failed", e))?;
            got += b.len() as u64;
            unchecked += b.len() as u64;
            // The guest may send more than it announced: keep checking.
            if unchecked >= RESERVE_CHECK_EVERY {
                unchecked = 0;
                let (dir, left) = (pending.dir().to_path_buf(), announced.saturating_sub(got));
                blocking(move || hostfile::check_room(&dir, left, reserve)).await?;
            }
        }
        file.flush()
            .await
            .map_err(|e| host_error(dest, "write failed", e))?;
        drop(file);
        if got > announced {
            // More than the guest announced, and maybe less than a check's
            // worth since the last one: the reserve must hold at the end too.
            let dir = pending.dir().to_path_buf();
            blocking(move || hostfile::check_room(&dir, 0, reserve)).await?;
        }
        let mode = opts.mode.unwrap_or(rd.info.mode);
        let dest_owned = dest.to_path_buf();
        blocking(move || pending.persist(&dest_owned, mode)).await?;
        Ok((got, mode))
    }

    /// Start reading `path`: its info, then its data through [`GuestReader::next`].
    async fn open_read(&self, path: &str, max_bytes: u64) -> Result<GuestReader> {
        validate_guest_path(path)?;
        let mut conn = self.connect().await?;
        let what = format!("reading {path}");
        proto::send(
            &mut conn,
            &Frame::Request(Request::ReadFile {
                path: path.to_owned(),
            }),
        )
        .await
        .map_err(|e| protocol_error(&what, e))?;
        let info = match next_frame(&mut conn, &what).await? {
            Some(Frame::Response(Response::FileInfo(i))) => i,
            Some(Frame::Error(e)) => return Err(file_hint(wire_error(e), path)),
            Some(other) => {
                return Err(fail(
                    ErrorCode::ProtocolError,
                    format!("unexpected answer to a file read: {other:?}"),
                )
                .into())
            }
            None => return Err(closed(&what)),
        };
        if info.size > max_bytes {
            return Err(hostfile::too_large(
                path,
                max_bytes,
                &format!("has {} bytes, over", info.size),
            ));
        }
        Ok(GuestReader {
            conn,
            info,
            path: path.to_owned(),
            what,
            got: 0,
            max_bytes,
            done: false,
        })
    }
}

/// How often (in bytes written) a host transfer re-checks the free space.
const RESERVE_CHECK_EVERY: u64 = 16 << 20;

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| fail(ErrorCode::Io, "a file task failed").source(e))?
}

fn host_error(path: &Path, what: &str, e: std::io::Error) -> crate::Error {
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

/// The data of one guest file read, chunk by chunk, within its limit.
struct GuestReader {
    conn: tokio::net::UnixStream,
    info: FileInfo,
    path: String,
    what: String,
    got: u64,
    max_bytes: u64,
    done: bool,
}

impl GuestReader {
    /// The next chunk, or `None` at the end of the file.
    async fn next(&mut self) -> Result<Option<Vec<u8>>> {
        if self.done {
            return Ok(None);
        }
        match next_frame(&mut self.conn, &self.what).await? {
            Some(Frame::Data(b)) => {
                self.got += b.len() as u64;
                if self.got > self.max_bytes {
                    return Err(hostfile::too_large(
                        &self.path,
                        self.max_bytes,
                        "sent more than",
                    ));
                }
                Ok(Some(b))
            }
            Some(Frame::Eof) => {
                self.done = true;
                Ok(None)
            }
            Some(Frame::Error(e)) => Err(file_hint(wire_error(e), &self.path)),
            Some(other) => Err(fail(
                ErrorCode::ProtocolError,
                format!("unexpected frame in a file read: {other:?}"),
            )
            .into()),
            None => Err(closed(&self.what)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_paths() {
        assert!(validate_guest_path("/a/b").is_ok());
        for bad in ["a", "/a/", "", "/a\0"] {
            assert_eq!(
                validate_guest_path(bad).expect_err(bad).code(),
                ErrorCode::FilesPathInvalid
            );
        }
    }
}
