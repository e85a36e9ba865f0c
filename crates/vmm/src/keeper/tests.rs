//! The keeper against a scripted peer on a unix socket, in the place of
//! QEMU's agent chardev: sessions that end, stall, or cannot be started.
//! (The e2e tests break real guests' sessions; these cover the timings.)

use std::sync::atomic::AtomicBool;

use machinen_proto::VmStatus;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, Mutex};

use super::*;
use crate::fake_agent::{Fake, Peer};

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
        mpsc::Receiver<crate::control::BalloonCmd>,
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
    let (balloon_tx, balloon_rx) = mpsc::channel(1);
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
        balloon_tx,
        balloon_target: Mutex::new(None),
        pausing: AtomicBool::new(false),
        registry: None,
        net: None,
        egress: None,
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
        _channels: (stop_rx, snap_rx, balloon_rx),
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
