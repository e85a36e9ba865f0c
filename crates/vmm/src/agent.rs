//! Host side of the agent session: a yamux client over the virtio-serial
//! chardev socket, with a driver task that owns the connection.
//!
//! yamux needs its `Connection` polled continuously (inbound frames, window
//! updates), so one task owns it and serves "open a stream" requests sent
//! over a channel.

use std::future::poll_fn;
use std::task::Poll;
use std::time::Duration;

use machinen_proto::{self as proto, Frame, Hello, HelloAck};
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
}

type OpenReply = oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>;

/// Handle to a running agent session; cheap to clone.
#[derive(Clone)]
pub struct AgentSession {
    open_tx: mpsc::Sender<OpenReply>,
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
        tokio::spawn(async move {
            let mut pending: Vec<OpenReply> = Vec::new();
            let mut requests_open = true;
            let result = poll_fn(|cx| {
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
            })
            .await;
            if let Err(e) = result {
                tracing::warn!("agent session ended: {e}");
            } else {
                tracing::info!("agent session closed");
            }
            let _ = done_tx.send(());
        });
        (AgentSession { open_tx }, done_rx)
    }

    /// Open a new stream to the agent.
    pub async fn open(&self) -> Result<AgentStream, AgentError> {
        let (tx, rx) = oneshot::channel();
        self.open_tx.send(tx).await.map_err(|_| AgentError::Closed)?;
        match rx.await {
            Ok(Ok(s)) => Ok(s.compat()),
            Ok(Err(e)) => Err(AgentError::Open(e)),
            Err(_) => Err(AgentError::Closed),
        }
    }

    /// Say hello and read the agent's identity.
    pub async fn handshake(&self) -> Result<HelloAck, AgentError> {
        let mut s = self.open().await?;
        proto::send(&mut s, &Frame::Hello(Hello { version: proto::PROTOCOL_VERSION, role: "machinen-vmm".into() }))
            .await
            .map_err(AgentError::Handshake)?;
        match proto::read_frame(&mut s).await.map_err(AgentError::Handshake)? {
            Some(Frame::HelloAck(ack)) => Ok(ack),
            Some(Frame::Error(e)) => Err(AgentError::Unexpected(format!("{}: {}", e.code, e.message))),
            Some(other) => Err(AgentError::Unexpected(format!("{other:?}"))),
            None => Err(AgentError::Closed),
        }
    }

    /// Ask the guest to sync and power off; true if the agent acknowledged.
    pub async fn poweroff(&self, timeout: Duration) -> bool {
        let fut = async {
            let mut s = self.open().await.ok()?;
            proto::send(&mut s, &Frame::Request(proto::Request::Poweroff)).await.ok()?;
            proto::read_frame(&mut s).await.ok()?
        };
        matches!(tokio::time::timeout(timeout, fut).await, Ok(Some(Frame::Response(_))))
    }
}
