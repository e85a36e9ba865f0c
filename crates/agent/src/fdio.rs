//! Async I/O on a raw nonblocking file descriptor (the virtio-serial port, a
//! pty master) through [`AsyncFd`].

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Put `fd` into nonblocking mode (on its open file description).
pub fn set_nonblocking(fd: &impl AsFd) -> io::Result<()> {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let raw = fd.as_fd().as_raw_fd();
    let flags = fcntl(raw, FcntlArg::F_GETFL)?;
    let flags = OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK;
    fcntl(raw, FcntlArg::F_SETFL(flags))?;
    Ok(())
}

/// A nonblocking fd registered with the reactor. Clones share the
/// registration (a pty master is read by one task and written by another).
///
/// A hangup (`POLLHUP`) is final for the reactor: once seen, the descriptor
/// stays "ready" forever. So reads that would block after a hangup return end
/// of file and writes fail, instead of spinning; a descriptor that can come
/// back from a hangup (the virtio port when the host reconnects) must be
/// registered afresh (a `dup`) for each use.
#[derive(Clone)]
pub struct FdIo {
    fd: Arc<AsyncFd<OwnedFd>>,
    /// Reading `EIO` means end of file (a pty master whose slave side is
    /// closed everywhere).
    eio_is_eof: bool,
}

impl FdIo {
    /// Register `fd` (made nonblocking here) with the current runtime.
    pub fn new(fd: OwnedFd) -> io::Result<Self> {
        set_nonblocking(&fd)?;
        // SAFETY: an OwnedFd keeps its descriptor open, and `as_raw_fd`
        // returns that same descriptor, for as long as the AsyncFd owns it.
        let fd = unsafe { AsyncFd::register(fd) }?;
        Ok(FdIo {
            fd: Arc::new(fd),
            eio_is_eof: false,
        })
    }

    /// Like [`FdIo::new`] for a pty master.
    pub fn pty_master(fd: OwnedFd) -> io::Result<Self> {
        let mut io = FdIo::new(fd)?;
        io.eio_is_eof = true;
        Ok(io)
    }

    pub fn raw_fd(&self) -> i32 {
        self.fd.get_ref().as_raw_fd()
    }
}

impl AsFd for FdIo {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.fd.get_ref().as_fd()
    }
}

impl AsyncRead for FdIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let res = guard.try_io(|inner| {
                nix::unistd::read(inner.get_ref().as_raw_fd(), unfilled).map_err(io::Error::from)
            });
            match res {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if self.eio_is_eof && e.raw_os_error() == Some(libc::EIO) => {
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // Would block after a hangup: the reactor keeps reporting
                // the hangup (a final state), so waiting again would spin.
                // The peer is gone: end of file.
                Err(_would_block) if guard.ready().is_read_closed() => return Poll::Ready(Ok(())),
                // Would block: readiness was cleared, poll again.
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard
                .try_io(|inner| nix::unistd::write(inner.get_ref(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Poll::Ready(Ok(n)),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                // See poll_read: no spinning on a hangup.
                Err(_would_block) if guard.ready().is_write_closed() => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::BrokenPipe,
                        "peer hung up",
                    )));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn reads_and_writes_through_a_socketpair() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let mut a = FdIo::new(OwnedFd::from(a)).expect("a");
        let mut b = FdIo::new(OwnedFd::from(b)).expect("b");
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let expect = data.clone();
        let w = tokio::spawn(async move {
            a.write_all(&data).await.expect("write");
            drop(a);
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        w.await.expect("join");
        assert_eq!(got, expect);
    }
}
