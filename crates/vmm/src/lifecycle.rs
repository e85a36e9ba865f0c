//! The one writer of a VM's state.
//!
//! The supervisor's status (what `status` answers) and the registry entry
//! (what `ls` reads) change together, only here, and only along
//! [`VmState::valid_transition`]: the status lock is held while the entry
//! is written, so the two never disagree for longer than that write, and a
//! move the lifecycle does not allow (a late `Running` after a `stop`
//! during start-up, a snapshot of a VM that is stopping) is refused for
//! the caller to act on instead of overwriting what happened first.

use machinen::registry::RegistryEntry;
use machinen_proto::VmState;

use crate::control::Shared;

/// A state change the lifecycle does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the VM is {from}; it cannot become {to}")]
pub struct Refused {
    pub from: VmState,
    pub to: VmState,
}

impl Shared {
    /// The current state.
    pub async fn state(&self) -> VmState {
        self.status.lock().await.state
    }

    /// Move to `to` (with `reason` for `recovering`/`unhealthy`), writing
    /// the registry entry as well; `edit` adds fields that change with
    /// the state (pids on `running`, the cause on `crashed`). Staying in
    /// the same state rewrites the reason and runs `edit`. Returns the
    /// state left.
    pub async fn transition(
        &self,
        to: VmState,
        reason: Option<String>,
        edit: impl FnOnce(&mut RegistryEntry) + Send + 'static,
    ) -> Result<VmState, Refused> {
        let mut st = self.status.lock().await;
        let from = st.state;
        if from != to && !from.valid_transition(to) {
            return Err(Refused { from, to });
        }
        st.state = to;
        st.reason.clone_from(&reason);
        let Some((reg, id)) = self.registry.clone() else {
            return Ok(from);
        };
        // Registry writes take a file lock and do file I/O: off the
        // supervisor's only runtime thread.
        let write = tokio::task::spawn_blocking(move || {
            crate::supervisor::update_entry(&reg, &id, |e| {
                e.state = to;
                e.reason = reason;
                edit(e);
            })
        });
        if let Err(e) = write.await {
            tracing::warn!("registry update task failed: {e}");
        }
        Ok(from)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    use machinen::registry::Registry;
    use machinen_proto::{VmState, VmStatus};
    use tokio::sync::{mpsc, Mutex};

    use super::*;

    fn shared(reg: Option<(Registry, String)>) -> Arc<Shared> {
        let (stop_tx, _) = mpsc::channel(1);
        let (snap_tx, _) = mpsc::channel(1);
        let (balloon_tx, _) = mpsc::channel(1);
        Arc::new(Shared {
            status: Mutex::new(VmStatus {
                state: VmState::Starting,
                reason: None,
                supervisor_pid: 1,
                qemu_pid: None,
                agent: None,
            }),
            agent: Mutex::new(None),
            stop_tx,
            snap_tx,
            balloon_tx,
            balloon_target: Mutex::new(None),
            pausing: AtomicBool::new(false),
            registry: reg,
            net: None,
            egress: None,
        })
    }

    /// A stop that arrives while the VM starts wins: the start-up's late
    /// `running` is refused instead of overwriting it.
    #[tokio::test]
    async fn stop_during_start_is_not_overwritten() {
        let s = shared(None);
        assert_eq!(
            s.transition(VmState::Stopping, None, |_| {}).await,
            Ok(VmState::Starting)
        );
        let e = s.transition(VmState::Running, None, |_| {}).await;
        assert_eq!(
            e,
            Err(Refused {
                from: VmState::Stopping,
                to: VmState::Running
            })
        );
        assert_eq!(s.state().await, VmState::Stopping);
    }

    /// A snapshot cannot start on a VM that is stopping, nor on one that is
    /// recovering its agent session; a stop during a snapshot wins over the
    /// snapshot's return to `running`.
    #[tokio::test]
    async fn snapshots_follow_the_lifecycle() {
        let s = shared(None);
        s.transition(VmState::Running, None, |_| {})
            .await
            .expect("up");
        s.transition(VmState::Snapshotting, None, |_| {})
            .await
            .expect("snapshot");
        s.transition(VmState::Stopping, None, |_| {})
            .await
            .expect("a stop during the snapshot");
        assert!(s.transition(VmState::Running, None, |_| {}).await.is_err());
        assert!(s
            .transition(VmState::Snapshotting, None, |_| {})
            .await
            .is_err());
        let r = shared(None);
        r.transition(VmState::Running, None, |_| {})
            .await
            .expect("up");
        r.transition(VmState::Recovering, Some("lost".into()), |_| {})
            .await
            .expect("recovering");
        assert!(r
            .transition(VmState::Snapshotting, None, |_| {})
            .await
            .is_err());
        assert_eq!(r.status.lock().await.reason.as_deref(), Some("lost"));
    }

    /// Status and registry entry change together.
    #[tokio::test]
    async fn the_registry_entry_follows_the_status() {
        let dir = tempfile::tempdir().expect("tmp");
        let reg = Registry::new(dir.path());
        let id = {
            let lock = reg.lock().expect("lock");
            reg.claim(&lock, "vm").expect("claim").id
        };
        let mut entry: RegistryEntry = serde_json::from_value(serde_json::json!({
            "id": id, "name": "vm", "state": "starting", "supervisor_pid": 1,
            "supervisor_start": 0, "control_socket": "/x", "memory_mib": 512,
            "cpus": 1, "accel": "tcg", "detached": true, "created_at_ms": 0
        }))
        .expect("entry");
        entry.id.clone_from(&id);
        reg.write(&entry).expect("write");
        let s = shared(Some((reg.clone(), id.clone())));
        let read = |reg: &Registry| {
            reg.entries()
                .expect("entries")
                .into_iter()
                .find(|e| e.id == id)
                .expect("entry")
        };
        s.transition(VmState::Running, None, |e| e.qemu_pid = Some(42))
            .await
            .expect("running");
        let e = read(&reg);
        assert_eq!((e.state, e.qemu_pid), (VmState::Running, Some(42)));
        s.transition(VmState::Starting, None, |_| {})
            .await
            .expect_err("running -> starting");
        s.transition(VmState::Recovering, Some("session lost".into()), |_| {})
            .await
            .expect("recovering");
        let e = read(&reg);
        assert_eq!(e.state, VmState::Recovering);
        assert_eq!(e.reason.as_deref(), Some("session lost"));
        assert_eq!(s.state().await, e.state);
    }
}
