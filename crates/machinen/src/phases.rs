//! Phase events: where the time of a boot, restore, fork or provision went.
//! The library marks its own phases (image, initramfs, claim, disk,
//! supervisor spawn, …), merges the supervisor's (engine start, state
//! load, guest boot, agent ready, …) from its ready line, and hands each to
//! the caller's [`OnPhase`] as it is known; [`crate::Vm::phases`] keeps them
//! all. Snapshots report theirs in `SnapshotReport::phases`.

use std::sync::Arc;
use std::time::Instant;

pub use machinen_proto::{Phase, PhaseClock};

/// Called with each phase as it ends (from the task doing the work: keep
/// it quick).
#[derive(Clone, Default)]
pub struct OnPhase(Option<Arc<PhaseFn>>);

type PhaseFn = dyn Fn(&Phase) + Send + Sync;

impl OnPhase {
    pub fn new(f: impl Fn(&Phase) + Send + Sync + 'static) -> OnPhase {
        OnPhase(Some(Arc::new(f)))
    }

    /// Hand `p` to the callback, if any.
    pub fn emit(&self, p: &Phase) {
        if let Some(f) = &self.0 {
            f(p);
        }
    }
}

impl std::fmt::Debug for OnPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "OnPhase(set)"
        } else {
            "OnPhase(none)"
        })
    }
}

/// A [`PhaseClock`] that reports each phase to an [`OnPhase`].
#[derive(Debug)]
pub struct Timeline {
    clock: PhaseClock,
    on: OnPhase,
}

impl Timeline {
    pub fn new(start: Instant, on: OnPhase) -> Timeline {
        Timeline {
            clock: PhaseClock::starting_at(start),
            on,
        }
    }

    /// End the current phase as `name`.
    pub fn mark(&mut self, name: &str) {
        let p = self.clock.mark(name);
        tracing::debug!("phase {} took {} ms", p.name, p.ms);
        self.on.emit(p);
    }

    /// Add a supervisor's phases; it started `offset_ms` into ours.
    pub fn merge(&mut self, offset_ms: u64, theirs: &[Phase]) {
        for p in self.clock.merge(offset_ms, theirs) {
            self.on.emit(p);
        }
    }

    pub fn elapsed_ms(&self) -> u64 {
        self.clock.elapsed_ms()
    }

    pub fn on(&self) -> &OnPhase {
        &self.on
    }

    pub fn into_phases(self) -> Vec<Phase> {
        self.clock.into_phases()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn each_phase_reaches_the_callback_once_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut t = Timeline::new(
            Instant::now(),
            OnPhase::new(move |p| s.lock().expect("lock").push(p.name.clone())),
        );
        t.mark("image");
        let sup = [Phase {
            name: "engine-start".into(),
            at_ms: 1,
            ms: 1,
        }];
        let at = t.elapsed_ms();
        t.merge(at, &sup);
        t.mark("ready");
        let phases = t.into_phases();
        assert_eq!(
            *seen.lock().expect("lock"),
            ["image", "engine-start", "ready"]
        );
        assert_eq!(phases.len(), 3);
        assert!(phases.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }
}
