//! A scripted guest agent on a unix socket, in the place of QEMU's agent
//! chardev, for the unit tests of the keeper and the controller: sessions
//! that answer, end, stall, or cannot be started; the requests a snapshot,
//! a restore and a stop make. (The e2e tests use real guests.)

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::poll_fn;
use machinen_proto::{self as proto, preamble, FixupReport, Frame, HelloAck, Request, Response};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Notify};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

/// What the peer does with the next connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Peer {
    /// A working agent.
    Answer = 0,
    /// Answers the hello, then never again (the connection stays open).
    Stall = 1,
    /// Reads everything, answers nothing.
    Silent = 2,
    /// Answers the hello, then closes the connection.
    Close = 3,
}

/// A scripted agent accepting sessions on a unix socket.
pub struct Fake {
    next: Arc<AtomicU8>,
    /// Sessions that got past the preamble.
    pub sessions: Arc<AtomicU32>,
    /// What the sessions were asked, in order (`Request` variant names).
    pub seen: Arc<std::sync::Mutex<Vec<String>>>,
    /// Becomes true when the guest is asked to power off (a fake machine
    /// watches it to "exit" like a guest that powered off).
    pub powered_off: watch::Receiver<bool>,
    /// How long a `Quiesce` takes to answer, in ms.
    pub quiesce_ms: Arc<AtomicU64>,
}

/// What every session of one fake shares.
#[derive(Clone)]
struct Ctx {
    seen: Arc<std::sync::Mutex<Vec<String>>>,
    powered_off: Arc<watch::Sender<bool>>,
    quiesce_ms: Arc<AtomicU64>,
}

impl Fake {
    pub fn start(listener: UnixListener, first: Peer) -> Fake {
        let next = Arc::new(AtomicU8::new(first as u8));
        let sessions = Arc::new(AtomicU32::new(0));
        let (off_tx, powered_off) = watch::channel(false);
        let ctx = Ctx {
            seen: Arc::default(),
            powered_off: Arc::new(off_tx),
            quiesce_ms: Arc::default(),
        };
        let fake = Fake {
            next: next.clone(),
            sessions: sessions.clone(),
            seen: ctx.seen.clone(),
            powered_off,
            quiesce_ms: ctx.quiesce_ms.clone(),
        };
        let (n, s) = (next, sessions);
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let peer = match n.load(Ordering::SeqCst) {
                    0 => Peer::Answer,
                    1 => Peer::Stall,
                    2 => Peer::Silent,
                    _ => Peer::Close,
                };
                tokio::spawn(serve(conn, peer, s.clone(), ctx.clone()));
            }
        });
        fake
    }

    /// How the next connection is served.
    pub fn then(&self, peer: Peer) {
        self.next.store(peer as u8, Ordering::SeqCst);
    }
}

async fn serve(mut sock: UnixStream, peer: Peer, sessions: Arc<AtomicU32>, ctx: Ctx) {
    let mut byte = [0u8; 1];
    if peer == Peer::Silent {
        while sock.read(&mut byte).await.is_ok_and(|n| n > 0) {}
        return;
    }
    let mut lines = preamble::LineTail::default();
    loop {
        if sock.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        if let Some(nonce) = lines
            .push(byte[0])
            .as_deref()
            .and_then(preamble::hello_at_end)
        {
            if sock
                .write_all(preamble::ready(nonce).as_bytes())
                .await
                .is_err()
            {
                return;
            }
            break;
        }
    }
    sessions.fetch_add(1, Ordering::SeqCst);
    let mut conn =
        yamux::Connection::new(sock.compat(), yamux::Config::default(), yamux::Mode::Server);
    let hello = Arc::new(Notify::new());
    let mut until: Option<tokio::time::Instant> = None;
    loop {
        let deadline = async {
            match until {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            s = poll_fn(|cx| conn.poll_next_inbound(cx)) => match s {
                Some(Ok(stream)) => { tokio::spawn(answer(stream.compat(), hello.clone(), ctx.clone())); }
                _ => return,
            },
            // Time for the hello's answer to leave before stalling or closing.
            _ = hello.notified(), if until.is_none() && peer != Peer::Answer => {
                until = Some(tokio::time::Instant::now() + Duration::from_millis(100));
            }
            _ = deadline => {
                if peer == Peer::Stall {
                    // Holds the connection, polls it no more.
                    std::future::pending::<()>().await;
                }
                return;
            }
        }
    }
}

async fn answer(mut s: tokio_util::compat::Compat<yamux::Stream>, hello: Arc<Notify>, ctx: Ctx) {
    let frame = proto::read_frame(&mut s).await;
    if let Ok(Some(Frame::Request(r))) = &frame {
        let name = format!("{r:?}");
        let name = name.split(['(', ' ', '{']).next().unwrap_or_default();
        ctx.seen.lock().expect("lock").push(name.to_string());
    }
    let reply = |r| Frame::Response(r);
    match frame {
        Ok(Some(Frame::Hello(_))) => {
            let ack = HelloAck {
                version: proto::PROTOCOL_VERSION,
                agent_version: "fake".into(),
                kernel: String::new(),
                boot_id: String::new(),
            };
            let _ = proto::send(&mut s, &Frame::HelloAck(ack)).await;
            hello.notify_one();
        }
        Ok(Some(Frame::Request(Request::Ping))) => {
            let _ = proto::send(&mut s, &reply(Response::Pong)).await;
        }
        Ok(Some(Frame::Request(Request::WipeSecrets))) => {
            let _ = proto::send(&mut s, &reply(Response::SecretsWiped { count: 0 })).await;
        }
        Ok(Some(Frame::Request(Request::Quiesce))) => {
            let ms = ctx.quiesce_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
            let _ = proto::send(&mut s, &reply(Response::Quiesced)).await;
        }
        Ok(Some(Frame::Request(Request::Fixup(_)))) => {
            let report = FixupReport {
                clock_was_ns: 0,
                entropy_bytes: 64,
                tcp_reset: 0,
                balloons_stopped: 0,
            };
            let _ = proto::send(&mut s, &reply(Response::FixedUp(report))).await;
        }
        Ok(Some(Frame::Request(Request::Poweroff))) => {
            let _ = proto::send(&mut s, &reply(Response::Stopping)).await;
            ctx.powered_off.send_replace(true);
        }
        _ => {}
    }
    let _ = s.shutdown().await;
}
