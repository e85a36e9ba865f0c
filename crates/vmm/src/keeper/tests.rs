//! The keeper against a scripted peer on a unix socket, in the place of
//! QEMU's agent chardev: sessions that end, stall, or cannot be started.
//! (The e2e tests break real guests' sessions; these cover the timings.)

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8};

use futures::future::poll_fn;
use machinen_proto::{self as proto, preamble, Frame, HelloAck, VmStatus};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Mutex, Notify};
use tokio_util::compat::{FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::*;

/// What the peer does with the next connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Peer {
    /// A working agent.
    Answer = 0,
    /// Answers the hello, then never again (the connection stays open).
    Stall = 1,
    /// Reads everything, answers nothing.
    Silent = 2,
    /// Answers the hello, then closes the connection.
    Close = 3,
}

struct Fake {
    next: Arc<AtomicU8>,
    sessions: Arc<AtomicU32>,
}

impl Fake {
    fn start(listener: UnixListener, first: Peer) -> Fake {
        let next = Arc::new(AtomicU8::new(first as u8));
        let sessions = Arc::new(AtomicU32::new(0));
        let (n, s) = (next.clone(), sessions.clone());
        tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let peer = match n.load(Ordering::SeqCst) {
                    0 => Peer::Answer,
                    1 => Peer::Stall,
                    2 => Peer::Silent,
                    _ => Peer::Close,
                };
                tokio::spawn(serve(conn, peer, s.clone()));
            }
        });
        Fake { next, sessions }
    }

    fn then(&self, peer: Peer) {
        self.next.store(peer as u8, Ordering::SeqCst);
    }
}

async fn serve(mut sock: UnixStream, peer: Peer, sessions: Arc<AtomicU32>) {
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
                Some(Ok(stream)) => { tokio::spawn(answer(stream.compat(), hello.clone())); }
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

async fn answer(mut s: tokio_util::compat::Compat<yamux::Stream>, hello: Arc<Notify>) {
    match proto::read_frame(&mut s).await {
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
            let _ = proto::send(&mut s, &Frame::Response(Response::Pong)).await;
        }
        _ => {}
    }
    let _ = s.shutdown().await;
}

fn fast() -> Pace {
    Pace {
        probe_every: Duration::from_millis(100),
        probe_timeout: Duration::from_millis(300),
        probe_misses: 2,
        quick_attempts: 3,
        first_delay: Duration::from_millis(20),
        slow_retry: Duration::from_millis(300),
        stable: Duration::from_secs(30),
        attempt_step: Duration::from_millis(500),
    }
}

struct Setup {
    shared: Arc<Shared>,
    fake: Fake,
    keeper: tokio::task::JoinHandle<()>,
    _dir: tempfile::TempDir,
    _channels: (
        mpsc::Receiver<bool>,
        mpsc::Receiver<crate::control::SnapshotCmd>,
    ),
}

/// A running VM's state with a first session to a peer acting as `first`.
async fn setup(first: Peer) -> Setup {
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("agent.sock");
    let fake = Fake::start(UnixListener::bind(&path).expect("bind"), first);
    let mut sock = UnixStream::connect(&path).await.expect("connect");
    agent::preamble(&mut sock, Duration::from_secs(5), false)
        .await
        .expect("preamble");
    let (session, done) = AgentSession::start(sock);
    session.handshake().await.expect("hello");
    let (stop_tx, stop_rx) = mpsc::channel(1);
    let (snap_tx, snap_rx) = mpsc::channel(1);
    let shared = Arc::new(Shared {
        status: Mutex::new(VmStatus {
            state: VmState::Running,
            reason: None,
            supervisor_pid: 1,
            qemu_pid: None,
            agent: None,
        }),
        agent: Mutex::new(Some(session)),
        stop_tx,
        snap_tx,
        pausing: AtomicBool::new(false),
        registry: None,
    });
    let k = Keeper {
        shared: shared.clone(),
        agent_path: path,
        pace: fast(),
    };
    let keeper = tokio::spawn(run(k, done));
    Setup {
        shared,
        fake,
        keeper,
        _dir: dir,
        _channels: (stop_rx, snap_rx),
    }
}

async fn state(shared: &Shared) -> (VmState, Option<String>) {
    let st = shared.status.lock().await;
    (st.state, st.reason.clone())
}

async fn wait_for_state(shared: &Shared, want: VmState, within: Duration) -> Option<String> {
    let start = Instant::now();
    loop {
        let (s, reason) = state(shared).await;
        if s == want {
            return reason;
        }
        assert!(
            start.elapsed() < within,
            "still {s:?} ({reason:?}) after {within:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn answers(shared: &Shared) -> bool {
    let Some(session) = shared.agent.lock().await.clone() else {
        return false;
    };
    matches!(
        session.request(Request::Ping, Duration::from_secs(2)).await,
        Ok(Response::Pong)
    )
}

#[tokio::test]
async fn a_stalled_session_is_replaced() {
    let t = setup(Peer::Stall).await;
    t.fake.then(Peer::Answer);
    let start = Instant::now();
    while t.fake.sessions.load(Ordering::SeqCst) < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no new session after the probes went unanswered"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    wait_for_state(&t.shared, VmState::Running, Duration::from_secs(5)).await;
    assert!(answers(&t.shared).await, "the new session works");
    t.keeper.abort();
}

#[tokio::test]
async fn an_unreachable_agent_makes_the_vm_unhealthy_until_it_answers_again() {
    let t = setup(Peer::Close).await;
    t.fake.then(Peer::Silent);
    let reason = wait_for_state(&t.shared, VmState::Unhealthy, Duration::from_secs(20))
        .await
        .expect("a reason");
    assert!(reason.contains("attempts to re-establish it"), "{reason}");
    assert!(
        t.shared.agent.lock().await.is_none(),
        "no session is offered while unhealthy"
    );
    t.fake.then(Peer::Answer);
    let reason = wait_for_state(&t.shared, VmState::Running, Duration::from_secs(10)).await;
    assert_eq!(reason, None);
    assert!(answers(&t.shared).await);

    // A stopping VM is left alone.
    t.shared.status.lock().await.state = VmState::Stopping;
    if let Some(s) = t.shared.agent.lock().await.clone() {
        s.close();
    }
    tokio::time::timeout(Duration::from_secs(5), t.keeper)
        .await
        .expect("the keeper ends")
        .expect("join");
    assert_eq!(state(&t.shared).await.0, VmState::Stopping);
}

#[test]
fn backoff_grows_then_settles() {
    let pace = Pace::default();
    let delays: Vec<Duration> = (0..=pace.quick_attempts + 1)
        .map(|f| pace.backoff(f))
        .collect();
    assert!(delays.windows(2).all(|w| w[0] <= w[1]), "{delays:?}");
    assert_eq!(delays[0], Duration::from_millis(100));
    // The quick attempts take about 12 s in all, then the slow pace.
    let quick: Duration = delays[..pace.quick_attempts as usize].iter().sum();
    assert!(quick < Duration::from_secs(15), "{quick:?}");
    assert_eq!(pace.backoff(pace.quick_attempts), pace.slow_retry);
    assert_eq!(pace.backoff(100), pace.slow_retry);
}
