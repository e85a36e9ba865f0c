//! Phase timings: where the time of a boot, restore, fork, snapshot or
//! provision went (image, initramfs, engine start, state load, agent
//! ready, …). The supervisor measures its phases and sends them with its
//! ready line or snapshot answer; the library adds its own around them and
//! hands each to the caller as it ends (`on_phase`), and the CLI prints
//! them with `--timings` and in `--json` output.

use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One phase that ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Phase {
    /// What ran, e.g. `engine-start`, `agent-ready` (kebab-case, stable).
    pub name: String,
    /// When it ended, in ms since the operation began.
    pub at_ms: u64,
    /// How long it took, in ms.
    pub ms: u64,
}

/// Measures consecutive phases: each [`PhaseClock::mark`] ends the phase
/// that began at the previous mark (or at the start).
#[derive(Debug)]
pub struct PhaseClock {
    start: Instant,
    last: Instant,
    phases: Vec<Phase>,
}

impl Default for PhaseClock {
    fn default() -> PhaseClock {
        PhaseClock::new()
    }
}

impl PhaseClock {
    pub fn new() -> PhaseClock {
        PhaseClock::starting_at(Instant::now())
    }

    /// A clock whose operation began at `start`.
    pub fn starting_at(start: Instant) -> PhaseClock {
        PhaseClock {
            start,
            last: start,
            phases: Vec::new(),
        }
    }

    /// End the current phase as `name`; returns it.
    pub fn mark(&mut self, name: &str) -> &Phase {
        let now = Instant::now();
        // Merged phases end at estimates (another process's clock): never
        // end a later phase before them.
        let after = self.phases.last().map_or(0, |p| p.at_ms);
        self.phases.push(Phase {
            name: name.to_string(),
            at_ms: (now.duration_since(self.start).as_millis() as u64).max(after),
            ms: now.saturating_duration_since(self.last).as_millis() as u64,
        });
        self.last = now;
        self.phases.last().expect("just pushed")
    }

    /// Add phases measured elsewhere (a supervisor), whose operation began
    /// `offset_ms` after ours; the next mark's phase begins at the last of
    /// them. Returns the phases as added.
    pub fn merge(&mut self, offset_ms: u64, theirs: &[Phase]) -> &[Phase] {
        let from = self.phases.len();
        for p in theirs {
            self.phases.push(Phase {
                name: p.name.clone(),
                at_ms: offset_ms + p.at_ms,
                ms: p.ms,
            });
        }
        if let Some(end) = theirs.last() {
            let at = self.start + std::time::Duration::from_millis(offset_ms + end.at_ms);
            self.last = self.last.max(at.min(Instant::now()));
        }
        &self.phases[from..]
    }

    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    pub fn into_phases(self) -> Vec<Phase> {
        self.phases
    }

    /// Ms since the operation began.
    pub fn elapsed_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn phases_follow_each_other_and_merge_at_an_offset() {
        let mut c = PhaseClock::new();
        std::thread::sleep(Duration::from_millis(20));
        let first = c.mark("image").clone();
        assert_eq!(first.name, "image");
        assert!(first.ms >= 20 && first.at_ms >= 20, "{first:?}");
        let theirs = [
            Phase {
                name: "engine-start".into(),
                at_ms: 5,
                ms: 5,
            },
            Phase {
                name: "agent-ready".into(),
                at_ms: 9,
                ms: 4,
            },
        ];
        let offset = c.elapsed_ms();
        let merged = c.merge(offset, &theirs).to_vec();
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].at_ms, offset + 5);
        assert_eq!(merged[1].at_ms, offset + 9);
        assert_eq!(merged[1].ms, 4);
        let names: Vec<_> = c.phases().iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["image", "engine-start", "agent-ready"]);
        let json = serde_json::to_string(&c.phases()[0]).expect("json");
        let back: Phase = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, c.phases()[0]);
    }
}
