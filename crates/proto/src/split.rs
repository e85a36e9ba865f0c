//! Split a stream into halves that two tasks may drive, without lost
//! wake-ups.
//!
//! `tokio::io::split` passes each half's own waker to the stream. A yamux
//! stream keeps one waker for its command channel, and its reads register
//! there too (a read may owe the peer a window update): a reading task
//! polling while a writing task waits for room in that channel overwrites
//! the writer's waker, and the writer then sleeps forever with the peer
//! waiting for its data. (An exec whose output stopped after some MiB, its
//! command blocked on a full pipe, was this.) These halves hand the stream
//! a waker that wakes *both* halves' tasks: at worst a spurious wake-up.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The latest waker of each half.
#[derive(Default)]
struct Wakers {
    read: Mutex<Option<Waker>>,
    write: Mutex<Option<Waker>>,
}

impl Wake for Wakers {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        for slot in [&self.read, &self.write] {
            let w = slot.lock().unwrap_or_else(PoisonError::into_inner).clone();
            if let Some(w) = w {
                w.wake();
            }
        }
    }
}

struct Shared<S> {
    stream: Mutex<S>,
    wakers: Arc<Wakers>,
}

impl<S> Shared<S> {
    /// Poll the stream on behalf of one half: remember that half's waker,
    /// give the stream one that wakes both.
    fn poll<T>(
        &self,
        slot: &Mutex<Option<Waker>>,
        cx: &mut Context<'_>,
        f: impl FnOnce(Pin<&mut S>, &mut Context<'_>) -> Poll<T>,
    ) -> Poll<T>
    where
        S: Unpin,
    {
        {
            let mut mine = slot.lock().unwrap_or_else(PoisonError::into_inner);
            if !mine.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *mine = Some(cx.waker().clone());
            }
        }
        let both = Waker::from(self.wakers.clone());
        let mut both_cx = Context::from_waker(&both);
        let mut s = self.stream.lock().unwrap_or_else(PoisonError::into_inner);
        f(Pin::new(&mut *s), &mut both_cx)
    }
}

/// The reading half of [`split`].
pub struct ReadHalf<S> {
    shared: Arc<Shared<S>>,
}

/// The writing half of [`split`].
pub struct WriteHalf<S> {
    shared: Arc<Shared<S>>,
}

/// Split `stream` into halves that may live in different tasks.
pub fn split<S: AsyncRead + AsyncWrite + Unpin>(stream: S) -> (ReadHalf<S>, WriteHalf<S>) {
    let shared = Arc::new(Shared {
        stream: Mutex::new(stream),
        wakers: Arc::new(Wakers::default()),
    });
    (
        ReadHalf {
            shared: shared.clone(),
        },
        WriteHalf { shared },
    )
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadHalf<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        shared.poll(&shared.wakers.read, cx, |s, cx| s.poll_read(cx, buf))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteHalf<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let shared = &self.shared;
        shared.poll(&shared.wakers.write, cx, |s, cx| s.poll_write(cx, buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        shared.poll(&shared.wakers.write, cx, |s, cx| s.poll_flush(cx))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let shared = &self.shared;
        shared.poll(&shared.wakers.write, cx, |s, cx| s.poll_shutdown(cx))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    /// A stream with a single waker slot for reads and writes, like a yamux
    /// stream's command channel: whoever polls last is the one woken.
    struct OneSlot {
        waker: Arc<Mutex<Option<Waker>>>,
        writable: Arc<AtomicBool>,
    }

    impl AsyncRead for OneSlot {
        fn poll_read(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            _buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            *self.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    impl AsyncWrite for OneSlot {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            if self.writable.load(Ordering::SeqCst) {
                return Poll::Ready(Ok(buf.len()));
            }
            *self.waker.lock().expect("lock") = Some(cx.waker().clone());
            Poll::Pending
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// The writer blocks, the reader polls after it (taking the only
    /// slot), the stream becomes writable and wakes the slot: the writer
    /// must still finish.
    #[tokio::test]
    async fn a_reader_polling_last_does_not_strand_the_writer() {
        let waker = Arc::new(Mutex::new(None::<Waker>));
        let writable = Arc::new(AtomicBool::new(false));
        let (mut rd, mut wr) = split(OneSlot {
            waker: waker.clone(),
            writable: writable.clone(),
        });
        let writer = tokio::spawn(async move { wr.write_all(b"data").await });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let reader = tokio::spawn(async move {
            let mut b = [0u8; 1];
            let _ = rd.read(&mut b).await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        writable.store(true, Ordering::SeqCst);
        let w = waker.lock().expect("lock").take();
        w.expect("a waker").wake();
        tokio::time::timeout(std::time::Duration::from_secs(5), writer)
            .await
            .expect("the writer was woken")
            .expect("join")
            .expect("write");
        reader.abort();
    }
}
