//! The control socket: many clients at once, one operation per connection.
//!
//! An exec (or any other agent-bound request: files, secrets) is forwarded
//! by opening a fresh agent stream, sending the same `Request` frame, and
//! splicing the two byte streams: the rest of the conversation (stdin,
//! output, exit; file data) passes through untouched.

use machinen_proto::timeouts;
use std::sync::Arc;
use std::time::Duration;

use machinen_proto::{self as proto, ErrorCode, Frame, Request, Response, WireError};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};

use tokio::io::AsyncWriteExt;

use crate::agent::{AgentSession, AgentStream};

/// What the control server needs to know and do.
pub struct Shared {
    pub status: Mutex<proto::VmStatus>,
    pub agent: Mutex<Option<AgentSession>>,
    pub stop_tx: mpsc::Sender<bool>,
    /// Snapshots run in the supervisor's main loop, which owns the machine.
    pub snap_tx: mpsc::Sender<SnapshotCmd>,
    /// So do balloon requests.
    pub balloon_tx: mpsc::Sender<BalloonCmd>,
    /// The last balloon target set through this supervisor.
    pub balloon_target: Mutex<Option<u64>>,
    /// A snapshot is in progress (the guest may be paused: it cannot
    /// answer liveness probes).
    pub pausing: std::sync::atomic::AtomicBool,
    /// Where the VM's registry entry is (its registry and id), for
    /// [`Shared::transition`]; `None` in tests that have no registry.
    pub registry: Option<(machinen::registry::Registry, String)>,
    /// The egress filter (`--network nat`; `None` for other modes).
    pub net: Option<Arc<crate::netfilter::Net>>,
    /// The egress proxy (a VM with egress secrets).
    pub egress: Option<Arc<crate::egress::Egress>>,
}

/// A snapshot request handed to the main loop, with where to answer.
pub struct SnapshotCmd {
    pub req: proto::SnapshotRequest,
    pub reply: tokio::sync::oneshot::Sender<Frame>,
}

/// A balloon request handed to the main loop, with where to answer.
pub struct BalloonCmd {
    pub target_bytes: Option<u64>,
    pub reply: tokio::sync::oneshot::Sender<Frame>,
}

/// How long a client may take to send its first frame.
const FIRST_FRAME_TIMEOUT: Duration = timeouts::CONTROL_FIRST_FRAME;

pub async fn serve(listener: UnixListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = handle(conn, shared).await {
                        tracing::warn!("control connection: {e:#}");
                    }
                });
            }
            Err(e) => {
                tracing::error!("control socket accept: {e}");
                tokio::time::sleep(timeouts::ACCEPT_RETRY).await;
            }
        }
    }
}

fn error(code: ErrorCode, message: impl Into<String>) -> Frame {
    Frame::Error(WireError {
        code: code.as_str().into(),
        message: message.into(),
    })
}

/// Whether a process of `uid` may control this VM: its owner (the user the
/// supervisor runs as) and root. The socket's directory is private too;
/// this holds even if someone opened it up.
fn peer_allowed(uid: u32) -> bool {
    uid == nix::unistd::geteuid().as_raw() || uid == 0
}

async fn handle(mut conn: UnixStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    let first = match tokio::time::timeout(FIRST_FRAME_TIMEOUT, proto::read_frame(&mut conn)).await
    {
        Ok(r) => r?,
        Err(_) => return Ok(()),
    };
    let Some(first) = first else { return Ok(()) };
    // Checked before the request is acted on, answered after it is read, so
    // that the client gets the refusal instead of a broken pipe.
    let uid = conn.peer_cred().map(|c| c.uid()).ok();
    if !uid.is_some_and(peer_allowed) {
        tracing::warn!("refused a control connection from uid {uid:?}");
        let who = uid.map_or_else(|| "an unknown user".to_string(), |u| format!("uid {u}"));
        let _ = proto::send(
            &mut conn,
            &error(
                ErrorCode::ControlPermissionDenied,
                format!("this VM belongs to another user; {who} may not control it"),
            ),
        )
        .await;
        return Ok(());
    }
    match first {
        Frame::Request(Request::Ping) => {
            proto::send(&mut conn, &Frame::Response(Response::Pong)).await?
        }
        Frame::Request(Request::Status) => {
            let st = shared.status.lock().await.clone();
            proto::send(&mut conn, &Frame::Response(Response::Status(st))).await?;
        }
        Frame::Request(Request::Stop { force }) => {
            // Refused only when already stopping (or gone): the stop
            // request is passed on either way.
            let _ = shared
                .transition(proto::VmState::Stopping, None, |_| {})
                .await;
            let _ = shared.stop_tx.send(force).await;
            proto::send(&mut conn, &Frame::Response(Response::Stopping)).await?;
        }
        Frame::Request(Request::Snapshot(req)) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let answer = if shared
                .snap_tx
                .send(SnapshotCmd { req, reply: tx })
                .await
                .is_err()
            {
                error(ErrorCode::SnapshotStateInvalid, "the VM is shutting down")
            } else {
                // The loop that owns the machine answers every snapshot it
                // takes; a dropped one never started.
                rx.await.unwrap_or_else(|_| {
                    error(
                        ErrorCode::SnapshotStateInvalid,
                        "the VM stopped before the snapshot could start",
                    )
                })
            };
            proto::send(&mut conn, &answer).await?;
        }
        Frame::Request(Request::Balloon { target_bytes }) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let gone = || {
                error(
                    ErrorCode::BalloonUnavailable,
                    "the VM is shutting down".to_string(),
                )
            };
            let answer = if shared
                .balloon_tx
                .send(BalloonCmd {
                    target_bytes,
                    reply: tx,
                })
                .await
                .is_err()
            {
                gone()
            } else {
                rx.await.unwrap_or_else(|_| gone())
            };
            proto::send(&mut conn, &answer).await?;
        }
        Frame::Request(Request::Network { change }) => {
            let answer = network(&shared, change).await;
            proto::send(&mut conn, &answer).await?;
        }
        Frame::Request(Request::EgressSecrets { secrets }) => {
            let answer = match &shared.egress {
                None => error(
                    ErrorCode::SecretsInvalid,
                    "this VM has no egress secrets (they are named at boot: --egress-secret NAME@HOST)",
                ),
                Some(e) => match e.set_values(secrets) {
                    Ok(count) => Frame::Response(Response::EgressSecretsSet { count }),
                    Err(msg) => error(ErrorCode::SecretsInvalid, msg),
                },
            };
            proto::send(&mut conn, &answer).await?;
        }
        // Everything the guest agent serves is forwarded the same way: the
        // first frame goes to a fresh agent stream, then the bytes are spliced.
        Frame::Request(
            req @ (Request::Exec(_)
            | Request::WriteFile(_)
            | Request::ReadFile { .. }
            | Request::PushDir(_)
            | Request::PullDir(_)
            | Request::Secrets { .. }
            | Request::SignalMain { .. }
            | Request::MainStdin
            | Request::CriuDump(_)
            | Request::CriuRestore(_)
            | Request::WipeSecrets),
        ) => {
            let agent = shared.agent.lock().await.clone();
            let Some(agent) = agent else {
                let st = shared.status.lock().await.clone();
                let why = st.reason.map(|r| format!(": {r}")).unwrap_or_default();
                proto::send(
                    &mut conn,
                    &error(
                        ErrorCode::ExecVsockUnavailable,
                        format!("the guest agent is not connected (VM is {}{why})", st.state),
                    ),
                )
                .await?;
                return Ok(());
            };
            let mut stream = match agent.open().await {
                Ok(s) => s,
                Err(e) => {
                    proto::send(
                        &mut conn,
                        &error(
                            ErrorCode::ExecVsockUnavailable,
                            format!("cannot reach the guest agent: {e}"),
                        ),
                    )
                    .await?;
                    return Ok(());
                }
            };
            let is_exec = matches!(req, Request::Exec(_));
            proto::send(&mut stream, &Frame::Request(req)).await?;
            if is_exec {
                splice_exec(conn, stream).await;
            } else if let Err(e) = tokio::io::copy_bidirectional(&mut conn, &mut stream).await {
                // Either side closing ends the splice; errors here are
                // ordinary disconnects and not worth more than a log.
                tracing::debug!("splice ended: {e}");
            }
        }
        other => {
            proto::send(
                &mut conn,
                &error(
                    ErrorCode::ProtocolError,
                    format!("unexpected first frame {other:?}"),
                ),
            )
            .await?;
        }
    }
    Ok(())
}

/// Read, and with `change` alter, the egress policy. A change is written
/// to the registry entry (so `ls` and `inspect` show it) before the answer.
async fn network(shared: &Shared, change: Option<proto::netpolicy::PolicyChange>) -> Frame {
    let Some(net) = shared.net.clone() else {
        return error(
            ErrorCode::NetworkUnavailable,
            "this VM has no filtered network (it was started with --network none or nat-host)",
        );
    };
    if let Some(change) = change.filter(|c| !c.is_empty()) {
        let policy = match net.policy().apply(&change) {
            Ok(p) => p,
            Err(e) => return error(ErrorCode::NetworkPolicyInvalid, e),
        };
        net.set_policy(policy.clone());
        if let Some((reg, id)) = shared.registry.clone() {
            let write = tokio::task::spawn_blocking(move || {
                crate::supervisor::update_entry(&reg, &id, |e| {
                    e.net_policy = (!policy.is_default()).then_some(policy);
                })
            });
            if let Err(e) = write.await {
                tracing::warn!("registry update task failed: {e}");
            }
        }
    }
    Frame::Response(Response::Network(Box::new(net.report())))
}

/// Splice an exec's client connection onto its agent stream. Output is
/// copied as bytes; input is forwarded frame by frame, so that when the
/// client goes away before the command ended (killed, or a dropped library
/// future) a `Hangup` can follow the last whole frame: the agent then hangs
/// the command up as a terminal would. Clients keep their connection open
/// until `Exit` (stdin's end is the `StdinEof` frame, not a half-close).
async fn splice_exec(conn: UnixStream, stream: AgentStream) {
    let (mut crd, mut cwr) = conn.into_split();
    let (mut ard, mut awr) = tokio::io::split(stream);
    let output = async {
        if let Err(e) = tokio::io::copy(&mut ard, &mut cwr).await {
            tracing::debug!("exec output splice ended: {e}");
        }
        let _ = cwr.shutdown().await;
    };
    let input = async {
        loop {
            match proto::read_frame(&mut crd).await {
                Ok(Some(f)) => {
                    if let Err(e) = proto::send(&mut awr, &f).await {
                        tracing::debug!("exec input splice ended: {e}");
                        return false;
                    }
                }
                Ok(None) => return true,
                Err(e) => {
                    tracing::debug!("exec client connection failed: {e}");
                    return true;
                }
            }
        }
    };
    let mut input = Box::pin(input);
    tokio::pin!(output);
    // The agent's side ending (after `Exit`, or with its session) ends the
    // splice: the client then sees the end of its connection.
    let input_ended = tokio::select! {
        _ = &mut output => None,
        gone = &mut input => Some(gone),
    };
    drop(input);
    match input_ended {
        Some(true) => {
            tracing::debug!("exec client went away; hanging the command up");
            let _ = proto::send(&mut awr, &Frame::Hangup).await;
            let _ = awr.shutdown().await;
        }
        // The agent takes no more input (the command ended): its last
        // output, `Exit` included, still goes to the client.
        Some(false) => output.await,
        None => {}
    }
}
