//! The VM lifecycle, one vocabulary for supervisor, library, CLI and
//! bindings. The supervisor is the only writer of a VM's state; it moves
//! between states only along [`VmState::valid_transition`]:
//!
//! ```text
//!            ┌──────────────── stop ─────────────────┐
//!            │                                       v
//! Starting ──┴─> Running <──> Snapshotting ──> Stopping ──> Stopped
//!                 │   ^             │              ^
//!   session lost  v   │ session back│ (destructive │
//!               Recovering <──> Unhealthy  snapshot done)
//!
//! any live state ── QEMU died unasked ──> Crashed
//! Stopping ── (the main command exited) ──> Exited
//! ```
//!
//! `Stopped`, `Crashed` and `Exited` are final. A registry entry in
//! `Crashed` stays (with its logs and cause) until `gc`, and so does an
//! `Exited` one (with the main command's exit status and output); a
//! `Stopped` one is removed.

use serde::{Deserialize, Serialize};

/// Where a VM is in its life. Spelled in snake case on the wire and in
/// `meta.json` (`"running"`), as before the states had a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    /// QEMU is starting (or loading a snapshot) and the agent session is
    /// not up yet.
    Starting,
    /// Ready: the agent answers.
    Running,
    /// A snapshot is being taken; the guest is paused for part of it.
    Snapshotting,
    /// The agent session failed and is being re-established.
    Recovering,
    /// The agent session could not be re-established (retried in the
    /// background); QEMU still runs.
    Unhealthy,
    /// Shutting down (asked to, or a destructive snapshot completed).
    Stopping,
    /// Gone, as asked.
    Stopped,
    /// Gone without being asked (QEMU killed, a guest panic, the supervisor
    /// died): the entry keeps the logs and the cause until `gc`.
    Crashed,
    /// Gone because its main command exited (and the VM was not kept
    /// alive): the entry keeps the exit status and the command's output
    /// until `gc`, for `wait` and `logs`.
    Exited,
}

impl VmState {
    pub const ALL: [VmState; 9] = [
        VmState::Starting,
        VmState::Running,
        VmState::Snapshotting,
        VmState::Recovering,
        VmState::Unhealthy,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Crashed,
        VmState::Exited,
    ];

    /// The wire spelling, e.g. `"running"`.
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Snapshotting => "snapshotting",
            VmState::Recovering => "recovering",
            VmState::Unhealthy => "unhealthy",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Crashed => "crashed",
            VmState::Exited => "exited",
        }
    }

    /// Whether a VM may go from `self` to `to`. Staying put is not a
    /// transition (the caller skips it).
    pub fn valid_transition(self, to: VmState) -> bool {
        use VmState::*;
        match (self, to) {
            // Final states go nowhere.
            (Stopped | Crashed | Exited, _) => false,
            // Anything alive can be stopped (asked), end (a guest powering
            // itself off) or crash.
            (_, Stopping | Stopped | Crashed) => true,
            // The main command's end stops the VM (Stopping), which then
            // ends as Exited instead of Stopped.
            (Stopping, Exited) => true,
            (Starting, Running) => true,
            // A session that keeps failing right after it starts goes
            // straight to Unhealthy.
            (Running, Snapshotting | Recovering | Unhealthy) => true,
            // A keep-alive or failed snapshot resumes; a destructive one
            // goes on to Stopping (above).
            (Snapshotting, Running) => true,
            (Recovering, Running | Unhealthy) => true,
            (Unhealthy, Running | Recovering) => true,
            _ => false,
        }
    }

    /// The supervisor runs (whatever the health of the guest).
    pub fn is_live(self) -> bool {
        !matches!(self, VmState::Stopped | VmState::Crashed | VmState::Exited)
    }

    /// Operations on the guest (exec, files, snapshot) may start.
    pub fn accepts_work(self) -> bool {
        self == VmState::Running
    }
}

impl std::fmt::Display for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for VmState {
    type Err = String;
    fn from_str(s: &str) -> Result<VmState, String> {
        VmState::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| format!("unknown VM state {s:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::VmState::{self, *};

    /// The whole matrix, spelled out: a change to the lifecycle must change
    /// this table too.
    #[test]
    fn transition_matrix() {
        let allowed: &[(VmState, &[VmState])] = &[
            (Starting, &[Running, Stopping, Stopped, Crashed]),
            (
                Running,
                &[
                    Snapshotting,
                    Recovering,
                    Unhealthy,
                    Stopping,
                    Stopped,
                    Crashed,
                ],
            ),
            (Snapshotting, &[Running, Stopping, Stopped, Crashed]),
            (
                Recovering,
                &[Running, Unhealthy, Stopping, Stopped, Crashed],
            ),
            (
                Unhealthy,
                &[Running, Recovering, Stopping, Stopped, Crashed],
            ),
            (Stopping, &[Stopped, Crashed, Exited]),
            (Stopped, &[]),
            (Crashed, &[]),
            (Exited, &[]),
        ];
        for (from, tos) in allowed {
            for to in VmState::ALL {
                if to == *from {
                    continue;
                }
                assert_eq!(
                    from.valid_transition(to),
                    tos.contains(&to),
                    "{from} -> {to}"
                );
            }
        }
        assert_eq!(allowed.len(), VmState::ALL.len());
    }

    #[test]
    fn spelling_round_trips_and_matches_serde() {
        for s in VmState::ALL {
            assert_eq!(s.as_str().parse::<VmState>(), Ok(s));
            assert_eq!(
                serde_json::to_value(s).expect("json"),
                serde_json::json!(s.as_str())
            );
        }
        assert!("paused".parse::<VmState>().is_err());
        assert!(Running.accepts_work() && !Recovering.accepts_work());
        assert!(Unhealthy.is_live() && !Crashed.is_live());
    }
}
