//! Keeping the agent session up while the VM runs.
//!
//! A session can fail under a running guest: bytes that are not yamux on the
//! channel (a program that is root in the guest can write to the agent's
//! port) end it at once; an agent that stops answering leaves it hanging.
//! The keeper notices (the session's driver ends, or liveness probes go
//! unanswered), marks the VM `recovering`, and starts a fresh session on a
//! new connection to the agent socket with the preamble a restore uses
//! (`machinen_proto::preamble`): the agent drops its stale session and
//! answers. Attempts back off; after five failures ([`Pace`]) the VM is
//! `unhealthy`, with the reason, in `ls` and `status`, and the keeper tries
//! again every 30 s. Commands the lost session ran keep running.

use machinen_proto::timeouts;
use machinen_proto::VmState;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machinen_proto::{Request, Response};
use tokio::net::UnixStream;
use tokio::sync::oneshot;

use crate::agent::{self, AgentSession};
use crate::control::Shared;

/// The keeper's timings.
#[derive(Debug, Clone, Copy)]
pub struct Pace {
    /// How often an idle session is probed.
    pub probe_every: Duration,
    /// How long one probe may take (a loaded TCG guest can be slow).
    pub probe_timeout: Duration,
    /// Consecutive unanswered probes after which a session counts as failed.
    pub probe_misses: u32,
    /// Failed attempts after which the VM is reported `unhealthy`.
    pub quick_attempts: u32,
    /// The first delay; each next one is three times longer.
    pub first_delay: Duration,
    /// Delay between attempts once the VM is `unhealthy`.
    pub slow_retry: Duration,
    /// A session that lived this long resets the backoff when it fails; one
    /// that failed sooner counts as a failed attempt.
    pub stable: Duration,
    /// Bound on one attempt's connection, preamble and hello, each.
    pub attempt_step: Duration,
}

impl Default for Pace {
    fn default() -> Self {
        Pace {
            probe_every: timeouts::KEEPER_PROBE_EVERY,
            probe_timeout: timeouts::KEEPER_PROBE_TIMEOUT,
            probe_misses: 3,
            quick_attempts: 5,
            first_delay: timeouts::KEEPER_FIRST_DELAY,
            slow_retry: timeouts::KEEPER_SLOW_RETRY,
            stable: timeouts::KEEPER_STABLE,
            attempt_step: timeouts::KEEPER_ATTEMPT_STEP,
        }
    }
}

impl Pace {
    /// Delay before attempt number `failures + 1`.
    pub fn backoff(&self, failures: u32) -> Duration {
        if failures >= self.quick_attempts {
            return self.slow_retry;
        }
        self.first_delay * 3u32.pow(failures)
    }
}

/// What the keeper needs.
pub struct Keeper {
    pub shared: Arc<Shared>,
    /// The QEMU chardev socket of the agent port.
    pub agent_path: PathBuf,
    pub pace: Pace,
}

/// Keep the session whose end `done` reports up, until the VM stops.
pub async fn run(k: Keeper, mut done: oneshot::Receiver<()>) {
    let mut failures = 0u32;
    let mut since = Instant::now();
    loop {
        let Some(why) = watch(&k, &mut done).await else {
            return;
        };
        if stopping(&k).await {
            return;
        }
        tracing::warn!("agent session failed: {why}; re-establishing it");
        // A session that failed soon after it started counts as a failed
        // attempt: a guest that keeps breaking its sessions ends up
        // `unhealthy` instead of being reconnected at full speed forever.
        if since.elapsed() >= k.pace.stable {
            failures = 0;
        } else {
            failures += 1;
        }
        if failures >= k.pace.quick_attempts {
            set_state(
                &k,
                VmState::Unhealthy,
                Some(unhealthy_reason(
                    &k.pace,
                    &why,
                    failures,
                    "its sessions keep failing soon after they start",
                )),
            )
            .await;
        } else {
            set_state(
                &k,
                VmState::Recovering,
                Some(format!(
                    "re-establishing the guest agent session, which failed: {why}"
                )),
            )
            .await;
        }
        loop {
            tokio::time::sleep(k.pace.backoff(failures)).await;
            if stopping(&k).await {
                return;
            }
            match reconnect(&k.agent_path, k.pace.attempt_step).await {
                Ok((session, d)) => {
                    let mut slot = k.shared.agent.lock().await;
                    if stopping(&k).await {
                        session.close();
                        return;
                    }
                    *slot = Some(session);
                    drop(slot);
                    set_state(&k, VmState::Running, None).await;
                    tracing::info!("agent session re-established after {failures} failed attempts");
                    done = d;
                    since = Instant::now();
                    break;
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(
                        "re-establishing the agent session failed (attempt {failures}): {e}"
                    );
                    if failures >= k.pace.quick_attempts {
                        set_state(
                            &k,
                            VmState::Unhealthy,
                            Some(unhealthy_reason(&k.pace, &why, failures, &e)),
                        )
                        .await;
                    }
                }
            }
        }
    }
}

fn unhealthy_reason(pace: &Pace, why: &str, failures: u32, last: &str) -> String {
    format!(
        "the guest agent session failed: {why}; {failures} attempts to re-establish it did not last (last: {last}); retrying every {} s",
        pace.slow_retry.as_secs()
    )
}

/// Wait until the session fails (`Some(why)`) or the VM stops (`None`).
async fn watch(k: &Keeper, done: &mut oneshot::Receiver<()>) -> Option<String> {
    let mut misses = 0u32;
    loop {
        tokio::select! {
            _ = &mut *done => return Some("it ended (the channel carried bytes that are not the protocol, or the agent closed it)".into()),
            _ = tokio::time::sleep(k.pace.probe_every) => {}
        }
        if stopping(k).await {
            return None;
        }
        // A paused guest (a snapshot in progress) cannot answer.
        if k.shared.pausing.load(Ordering::SeqCst) {
            misses = 0;
            continue;
        }
        let Some(session) = k.shared.agent.lock().await.clone() else {
            continue;
        };
        match session.request(Request::Ping, k.pace.probe_timeout).await {
            Ok(Response::Pong) => misses = 0,
            _ if k.shared.pausing.load(Ordering::SeqCst) => misses = 0,
            other => {
                misses += 1;
                tracing::warn!(
                    "agent liveness probe {misses}/{} failed: {other:?}",
                    k.pace.probe_misses
                );
                if misses >= k.pace.probe_misses {
                    session.close();
                    return Some(format!(
                        "the agent did not answer {misses} liveness probes in a row"
                    ));
                }
            }
        }
    }
}

async fn stopping(k: &Keeper) -> bool {
    matches!(
        k.shared.state().await,
        VmState::Stopping | VmState::Stopped | VmState::Crashed
    )
}

/// A fresh connection to the agent socket and a new session on it, each
/// step bounded by `step`.
async fn reconnect(
    path: &std::path::Path,
    step: Duration,
) -> Result<(AgentSession, oneshot::Receiver<()>), String> {
    let mut sock = match tokio::time::timeout(step, UnixStream::connect(path)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("cannot connect to {}: {e}", path.display())),
        Err(_) => {
            return Err(format!(
                "connecting to {} took over {} ms",
                path.display(),
                step.as_millis()
            ))
        }
    };
    // The agent may still be inside the old session: break it (resume).
    agent::preamble(&mut sock, step, true)
        .await
        .map_err(|e| format!("session preamble: {e}"))?;
    let (session, done) = AgentSession::start(sock);
    match tokio::time::timeout(step, session.handshake()).await {
        Ok(Ok(ack)) => {
            tracing::info!("agent {} answers again", ack.agent_version);
            Ok((session, done))
        }
        Ok(Err(e)) => {
            session.close();
            Err(format!("handshake: {e}"))
        }
        Err(_) => {
            session.close();
            Err(format!(
                "no handshake answer within {} ms",
                step.as_millis()
            ))
        }
    }
}

/// Record the VM's state for `status` and `ls` (one writer:
/// [`Shared::transition`]); refused when the VM is stopping. While not
/// running, no agent session is offered.
async fn set_state(k: &Keeper, state: VmState, reason: Option<String>) {
    if k.shared.transition(state, reason, |_| {}).await.is_err() {
        return;
    }
    if state != VmState::Running {
        if let Some(old) = k.shared.agent.lock().await.take() {
            old.close();
        }
    }
}

#[cfg(test)]
mod tests;
