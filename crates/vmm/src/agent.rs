//! Host side of the agent session: a yamux client over the virtio-serial
//! chardev socket, with a driver task that owns the connection.
//!
//! yamux needs its `Connection` polled continuously (inbound frames, window
//! updates), so one task owns it and serves "open a stream" requests sent
//! over a channel.

use machinen_proto::timeouts;
use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use machinen_proto::{self as proto, Frame, Hello, HelloAck};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// A stream to the agent, usable with tokio's I/O traits.
pub type AgentStream = tokio_util::compat::Compat<yamux::Stream>;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the agent session is closed")]
    Closed,
    #[error("could not open a stream to the agent")]
    Open(#[source] yamux::ConnectionError),
    #[error("agent handshake failed")]
    Handshake(#[source] proto::FrameError),
    #[error("agent answered the handshake with {0}")]
    Unexpected(String),
    #[error("session preamble failed")]
    Preamble(#[source] std::io::Error),
    #[error("the agent did not answer the session preamble")]
    NoAnswer,
}

/// How much stale output from an earlier session we skip while looking
/// for the agent's answer to the preamble.
const MAX_SKIP: usize = 64 << 20;

/// Start a session on a fresh byte stream: send `MACHINEN-HELLO <nonce>`
/// and wait for `MACHINEN-READY <nonce>` (see `machinen_proto::preamble`),
/// skipping whatever an earlier session left in flight. `resume` means the
/// agent may still be inside an old session; then each attempt first breaks
/// it and attempts are retried every `attempt` until `budget` runs out.
pub async fn preamble(
    sock: &mut UnixStream,
    budget: Duration,
    resume: bool,
) -> Result<(), AgentError> {
    let deadline = tokio::time::Instant::now() + budget;
    // A resumed agent usually drops its stale session and answers within a
    // few tens of milliseconds; a stale session in the middle of a frame
    // body takes the break and hello as payload, though: retry soon (a new
    // break completes the body or fails the next header), then back off.
    let mut attempt = if resume {
        timeouts::PREAMBLE_RETRY_FIRST
    } else {
        budget
    };
    let mut skipped = 0usize;
    loop {
        let nonce = format!("{:016x}", rand_u64());
        let mut out = Vec::new();
        if resume {
            // Break the stale session; the hello right behind it is left
            // for the agent's preamble scan (see `preamble::BREAK`).
            out.extend_from_slice(proto::preamble::BREAK);
        }
        out.extend_from_slice(proto::preamble::hello(&nonce).as_bytes());
        sock.write_all(&out).await.map_err(AgentError::Preamble)?;
        let until = (tokio::time::Instant::now() + attempt).min(deadline);
        let mut lines = proto::preamble::LineTail::default();
        let found = tokio::time::timeout_at(until, async {
            let mut byte = [0u8; 1];
            loop {
                if sock.read(&mut byte).await? == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "agent socket closed",
                    ));
                }
                skipped += 1;
                if skipped > MAX_SKIP {
                    return Err(std::io::Error::other("no session answer from the agent"));
                }
                // The answer may follow the stale session's last frame on the
                // same "line": match its end.
                if lines
                    .push(byte[0])
                    .is_some_and(|line| proto::preamble::is_ready_for(&line, &nonce))
                {
                    return Ok(());
                }
            }
        })
        .await;
        match found {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) => return Err(AgentError::Preamble(e)),
            Err(_) if tokio::time::Instant::now() >= deadline => return Err(AgentError::NoAnswer),
            Err(_) => {
                tracing::debug!("no answer to session preamble {nonce}; retrying");
                attempt = (attempt * 2).min(timeouts::PREAMBLE_RETRY_MAX);
            }
        }
    }
}

fn rand_u64() -> u64 {
    let mut b = [0u8; 8];
    if getrandom_fill(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        return (t as u64) ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(b)
}

fn getrandom_fill(b: &mut [u8]) -> std::io::Result<()> {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(b)
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// See [`AgentSession::token`].
pub type SessionToken = std::sync::Weak<tokio::sync::Notify>;

/// Handle to a running agent session; cheap to clone.
#[derive(Clone)]
pub struct AgentSession {
    open_tx: mpsc::Sender<OpenReply>,
    /// Ends the session from our side (a session that stopped answering).
    close: std::sync::Arc<tokio::sync::Notify>,
}

impl AgentSession {
    /// Start a yamux client over `sock`. The returned receiver fires when
    /// the session ends (the guest or QEMU went away).
    pub fn start(sock: UnixStream) -> (AgentSession, oneshot::Receiver<()>) {
        let mut cfg = yamux::Config::default();
        cfg.set_max_num_streams(1024);
        let mut conn = yamux::Connection::new(sock.compat(), cfg, yamux::Mode::Client);
        let (open_tx, mut open_rx) = mpsc::channel::<OpenReply>(64);
        let (done_tx, done_rx) = oneshot::channel();
        let close = std::sync::Arc::new(tokio::sync::Notify::new());
        let closed = close.clone();
        tokio::spawn(async move {
            let mut pending: Vec<OpenReply> = Vec::new();
            let mut requests_open = true;
            let driven = poll_fn(|cx| {
                while requests_open {
                    match open_rx.poll_recv(cx) {
                        Poll::Ready(Some(r)) => pending.push(r),
                        Poll::Ready(None) => requests_open = false,
                        Poll::Pending => break,
                    }
                }
                while !pending.is_empty() {
                    match conn.poll_new_outbound(cx) {
                        Poll::Ready(res) => {
                            let reply = pending.remove(0);
                            let _ = reply.send(res);
                        }
                        Poll::Pending => break,
                    }
                }
                // Drive the connection; the agent never opens streams to us.
                loop {
                    match conn.poll_next_inbound(cx) {
                        Poll::Ready(Some(Ok(_stream))) => continue,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
                        Poll::Ready(None) => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
            });
            // Dropping the connection (when this task ends) closes the
            // socket, so a new session starts on a fresh connection.
            let result = tokio::select! {
                r = driven => r,
                _ = closed.notified() => Err(yamux::ConnectionError::Closed),
            };
            if let Err(e) = result {
                tracing::warn!("agent session ended: {e}");
            } else {
                tracing::info!("agent session closed");
            }
            let _ = done_tx.send(());
        });
        (AgentSession { open_tx, close }, done_rx)
    }

    /// A token of this session that keeps nothing of it alive: equal (by
    /// [`std::sync::Weak::ptr_eq`]) for every handle of the session, never
    /// for another one.
    pub fn token(&self) -> SessionToken {
        std::sync::Arc::downgrade(&self.close)
    }

    /// End the session (its streams fail, the socket is closed).
    pub fn close(&self) {
        self.close.notify_one();
    }

    /// Open a new stream to the agent.
    pub async fn open(&self) -> Result<AgentStream, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx
            .send(tx)
            .await
            .map_err(|_| AgentError::Closed)?;
        match rx.await {
            Ok(Ok(s)) => Ok(s.compat()),
            Ok(Err(e)) => Err(AgentError::Open(e)),
            Err(_) => Err(AgentError::Closed),
        }
    }

    /// Say hello and read the agent's identity.
    pub async fn handshake(&self) -> Result<HelloAck, AgentError> {
        let mut s = self.open().await?;
        proto::send(
            &mut s,
            &Frame::Hello(Hello {
                version: proto::PROTOCOL_VERSION,
                role: "machinen-vmm".into(),
            }),
        )
        .await
        .map_err(AgentError::Handshake)?;
        match proto::read_frame(&mut s)
            .await
            .map_err(AgentError::Handshake)?
        {
            Some(Frame::HelloAck(ack)) => Ok(ack),
            Some(Frame::Error(e)) => {
                Err(AgentError::Unexpected(format!("{}: {}", e.code, e.message)))
            }
            Some(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            None => Err(AgentError::Closed),
        }
    }

    /// One request on a fresh stream and its single answer, bounded in time.
    /// An `Error` frame becomes `Err("CODE: message")`.
    pub async fn request(
        &self,
        req: proto::Request,
        timeout: Duration,
    ) -> Result<proto::Response, String> {
        let fut = async {
            let mut s = self.open().await.map_err(|e| e.to_string())?;
            proto::send(&mut s, &Frame::Request(req))
                .await
                .map_err(|e| e.to_string())?;
            match proto::read_frame(&mut s).await.map_err(|e| e.to_string())? {
                Some(Frame::Response(r)) => Ok(r),
                Some(Frame::Error(e)) => Err(format!("{}: {}", e.code, e.message)),
                other => Err(format!("unexpected answer {other:?}")),
            }
        };
        tokio::time::timeout(timeout, fut)
            .await
            .map_err(|_| "the guest agent did not answer in time".to_string())?
    }

    /// Ask the guest to sync and power off; true if the agent acknowledged.
    pub async fn poweroff(&self, timeout: Duration) -> bool {
        self.request(proto::Request::Poweroff, timeout)
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod fuzz_tests;
