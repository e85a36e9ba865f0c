//! Serving the host: one yamux session (agent = server) over a transport,
//! one protocol operation per inbound stream.
//!
//! Everything here is generic over the transport (`AsyncRead + AsyncWrite`)
//! so that it runs the same over the virtio-serial port in the guest, a unix
//! socket in host test mode, and an in-memory pipe in the tests.

use machinen_proto::timeouts;
use std::future::Future;
use std::sync::Arc;

use futures::future::poll_fn;
use machinen_proto::{
    read_frame, send, Frame, Hello, HelloAck, Request, Response, WireError, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use crate::exec;
use crate::log::{debug, error, info};

/// Error codes of the dispatcher (exec's own are in [`exec::code`]).
pub mod code {
    pub const PROTOCOL_VERSION_MISMATCH: &str =
        machinen_proto::ErrorCode::ProtocolVersionMismatch.as_str();
    pub const PROTOCOL_ERROR: &str = machinen_proto::ErrorCode::ProtocolError.as_str();
}

/// What the host is told about this guest, and how to power it off.
pub struct Ctx {
    pub hostname: String,
    pub kernel: String,
    pub boot_id: String,
    /// Called (on a blocking thread) after `Response::Stopping` went out.
    pub poweroff: Box<dyn Fn() + Send + Sync>,
    /// The VM's main command, shared by every session (see [`crate::service`]).
    pub main: Arc<crate::service::MainSlot>,
}

impl Ctx {
    pub fn hello_ack(&self) -> HelloAck {
        HelloAck {
            version: PROTOCOL_VERSION,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            kernel: self.kernel.clone(),
            boot_id: self.boot_id.clone(),
        }
    }
}

/// Concurrent streams per session (the host's client allows as many).
pub const MAX_STREAMS: usize = 1024;

/// The yamux configuration of the agent's sessions. The receive window cap
/// is the smallest yamux allows for its stream limit (256 KiB a stream), to
/// bound what a host can make a small guest buffer.
pub fn yamux_config() -> yamux::Config {
    let mut cfg = yamux::Config::default();
    cfg.set_max_connection_receive_window(Some(MAX_STREAMS * 256 * 1024));
    cfg.set_max_num_streams(MAX_STREAMS);
    cfg
}

fn protocol_error(message: impl Into<String>) -> Frame {
    Frame::Error(WireError {
        code: code::PROTOCOL_ERROR.to_owned(),
        message: message.into(),
    })
}

/// Serve one stream: read its first frame and dispatch.
pub async fn handle_stream<S>(stream: S, ctx: Arc<Ctx>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut s = stream;
    let first = match read_frame(&mut s).await {
        Ok(Some(f)) => f,
        Ok(None) => return,
        Err(e) => {
            debug!("stream: bad first frame: {e}");
            let _ = send(&mut s, &protocol_error(format!("bad first frame: {e}"))).await;
            let _ = s.shutdown().await;
            return;
        }
    };
    match first {
        Frame::Hello(Hello { version, role }) => {
            debug!("hello from {role:?}, protocol {version}");
            let reply = if version == PROTOCOL_VERSION {
                Frame::HelloAck(ctx.hello_ack())
            } else {
                Frame::Error(WireError {
                    code: code::PROTOCOL_VERSION_MISMATCH.to_owned(),
                    message: format!(
                        "the agent speaks protocol version {PROTOCOL_VERSION}, the host sent version {version}"
                    ),
                })
            };
            let _ = send(&mut s, &reply).await;
            let _ = s.shutdown().await;
        }
        Frame::Request(Request::Ping) => {
            let _ = send(&mut s, &Frame::Response(Response::Pong)).await;
            let _ = s.shutdown().await;
        }
        Frame::Request(Request::Exec(req)) => exec::run(s, req, &ctx.hostname).await,
        Frame::Request(Request::WriteFile(req)) => crate::files::write_file(s, req).await,
        Frame::Request(Request::ReadFile { path }) => crate::files::read_file(s, path).await,
        Frame::Request(Request::PushDir(req)) => crate::dirs::push_dir(s, req).await,
        Frame::Request(Request::PullDir(req)) => crate::dirs::pull_dir(s, req).await,
        Frame::Request(Request::Secrets { secrets }) => {
            crate::secrets::serve_install(&mut s, secrets).await;
            // A main command waiting for them starts now.
            ctx.main.secrets_installed();
        }
        Frame::Request(Request::WipeSecrets) => crate::secrets::serve_wipe(&mut s).await,
        Frame::Request(Request::Connect { port }) => crate::forward::serve(s, port).await,
        Frame::Request(Request::EgressSetup(setup)) => crate::egress::serve_setup(s, setup).await,
        Frame::Request(Request::EgressAccept) => crate::egress::serve_accept(s).await,
        Frame::Request(Request::Quiesce) => crate::fixup::serve_quiesce(s).await,
        Frame::Request(Request::Fixup(req)) => crate::fixup::serve_fixup(s, req).await,
        Frame::Request(Request::StartMain(req)) => {
            crate::service::start(s, ctx.main.clone(), req, &ctx.hostname).await
        }
        Frame::Request(Request::AttachMain { from_seq }) => {
            crate::service::attach(s, ctx.main.clone(), from_seq).await
        }
        Frame::Request(Request::MainStdin) => crate::service::stdin(s, ctx.main.clone()).await,
        Frame::Request(Request::SignalMain { signal, group }) => {
            crate::service::signal(s, ctx.main.clone(), signal, group).await
        }
        Frame::Request(Request::CriuDump(req)) => {
            crate::checkpoint::serve_dump(s, ctx.main.clone(), req).await
        }
        Frame::Request(Request::CriuRestore(req)) => {
            crate::checkpoint::serve_restore(s, ctx.main.clone(), req).await
        }
        Frame::Request(Request::Poweroff) => {
            debug!("poweroff requested");
            let _ = send(&mut s, &Frame::Response(Response::Stopping)).await;
            let _ = s.shutdown().await;
            // Give the session a moment to put the answer on the wire.
            tokio::time::sleep(timeouts::POWEROFF_ANSWER_FLUSH).await;
            let ctx2 = ctx.clone();
            if let Err(e) = tokio::task::spawn_blocking(move || (ctx2.poweroff)()).await {
                error!("poweroff: {e}");
            }
        }
        Frame::Request(other) => {
            let _ = send(
                &mut s,
                &protocol_error(format!(
                    "request {other:?} is not served by the guest agent"
                )),
            )
            .await;
            let _ = s.shutdown().await;
        }
        other => {
            let _ = send(
                &mut s,
                &protocol_error(format!(
                    "a stream must start with Hello or Request, not {}",
                    exec::frame_name(&other)
                )),
            )
            .await;
            let _ = s.shutdown().await;
        }
    }
}

/// Whether the kernel's random number generator is initialised, i.e.
/// `getrandom(2)` would not block.
pub fn crng_ready() -> bool {
    let mut b = [0u8; 1];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`, a live
    // local buffer.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    n >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN)
}

/// yamux draws random numbers (connection ids, ping nonces) through
/// `getrandom(2)`, which blocks the whole runtime until the kernel's RNG is
/// initialised. A guest without an entropy source (TCG's default CPU has no
/// RDRAND, no virtio-rng) may take minutes or forever, so wait here without
/// blocking, and say why.
async fn wait_for_crng() {
    let start = std::time::Instant::now();
    let mut warned = false;
    while !crng_ready() {
        if !warned && start.elapsed() > timeouts::CRNG_WARN {
            error!(
                "waiting for the kernel's random number generator to be initialised (the session needs it); \
                 give the VM an entropy source: a CPU with RDRAND (QEMU -cpu max / host) or a virtio-rng device"
            );
            warned = true;
        }
        tokio::time::sleep(timeouts::SLOW_POLL).await;
    }
    if warned {
        info!(
            "the kernel's random number generator is ready after {:.1} s",
            start.elapsed().as_secs_f64()
        );
    }
}

/// Skip input until a session preamble line (`machinen_proto::preamble`)
/// and answer it. Whatever an earlier session left in flight is discarded.
async fn await_preamble<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T) -> std::io::Result<()> {
    use machinen_proto::preamble;
    use tokio::io::AsyncReadExt;
    let mut lines = preamble::LineTail::default();
    let mut byte = [0u8; 1];
    loop {
        if io.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if let Some(line) = lines.push(byte[0]) {
            if let Some(nonce) = preamble::hello_at_end(&line) {
                io.write_all(preamble::ready(nonce).as_bytes()).await?;
                io.flush().await?;
                return Ok(());
            }
        }
    }
}

/// Run one yamux session over `io` until the transport ends or fails.
/// Inbound streams are served concurrently; when the session ends they see
/// their stream fail and stop (commands keep running).
pub async fn serve_session<T>(io: T, ctx: Arc<Ctx>) -> Result<(), yamux::ConnectionError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut io = io;
    await_preamble(&mut io)
        .await
        .map_err(yamux::ConnectionError::Io)?;
    wait_for_crng().await;
    let mut conn = yamux::Connection::new(io.compat(), yamux_config(), yamux::Mode::Server);
    loop {
        match poll_fn(|cx| conn.poll_next_inbound(cx)).await {
            Some(Ok(stream)) => {
                tokio::spawn(handle_stream(stream.compat(), ctx.clone()));
            }
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
    }
}

/// Serve one session after another, one transport at a time, for as long as
/// `next` yields transports. Each session runs in its own task, so a panic
/// in one ends that session only.
pub async fn serve_sessions<T, F, Fut>(mut next: F, ctx: Arc<Ctx>)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    while let Some(io) = next().await {
        debug!("session starts");
        match tokio::spawn(serve_session(io, ctx.clone())).await {
            Ok(Ok(())) => debug!("session ended: the host went away"),
            Ok(Err(e)) => debug!("session ended: {e}"),
            Err(e) => error!("session task failed: {e}"),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
