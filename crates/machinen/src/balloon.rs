//! The balloon: how much of its memory ceiling a guest may use.
//!
//! Every booted VM (and every restore with its own RAM) has a balloon with
//! free page reporting, so what the guest frees goes back to the host by
//! itself. [`Vm::set_balloon`] also shrinks what the guest may use at all:
//! the guest gives pages up (its `MemTotal` drops) until it keeps the
//! target, and they cost the host nothing (holes in the RAM file, none in a
//! snapshot). Setting the ceiling again gives them back.

use std::time::{Duration, Instant};

use machinen_proto::{self as proto, timeouts};
use serde::Serialize;

pub use machinen_proto::BalloonReport;

use crate::error::{fail, Failure};
use crate::vm::{Vm, MIN_MEMORY_MIB};
use crate::{ErrorCode, Result};

/// [`Vm::set_balloon`]'s outcome.
#[derive(Debug, Clone, Serialize)]
pub struct BalloonOutcome {
    pub name: String,
    #[serde(flatten)]
    pub report: BalloonReport,
    /// Whether the guest reached the target within the wait (a guest that
    /// cannot free enough memory stops short; it keeps trying).
    pub settled: bool,
    /// How long it took (or was waited).
    pub elapsed_ms: u64,
}

/// Within this of its target, a balloon has settled: the guest gives pages
/// in batches and the kernel keeps a few for itself.
const SETTLED_WITHIN: u64 = 2 << 20;

/// A size for `machinen balloon`: a number with a K/M/G/T suffix (powers
/// of 1024, fractions allowed, [`crate::hostfile::unit_shift`]'s units; a
/// plain number is MiB, like `--memory`), or `max`/`full` for the ceiling
/// (no limit).
pub fn parse_size(s: &str, ceiling: u64) -> Result<u64> {
    let t = s.trim();
    let bad = || {
        fail(
            ErrorCode::BalloonTargetInvalid,
            format!("{s:?} is not a memory size"),
        )
        .hint("give MiB (512), a size with a unit (512M, 1.5G), or `max` for the whole ceiling")
    };
    if t.eq_ignore_ascii_case("max") || t.eq_ignore_ascii_case("full") {
        return Ok(ceiling);
    }
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let shift = if unit.trim().is_empty() {
        20
    } else {
        crate::hostfile::unit_shift(unit).ok_or_else(bad)?
    };
    let bytes = n * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad().into());
    }
    Ok(bytes as u64)
}

/// Whether `target_bytes` is a balloon target a VM of `memory_mib` can
/// take: at least [`MIN_MEMORY_MIB`], at most its ceiling. Checked by the
/// library before asking and by the supervisor before acting.
pub fn check_target(target_bytes: u64, memory_mib: u32) -> Result<(), Failure> {
    let ceiling = u64::from(memory_mib) << 20;
    let floor = u64::from(MIN_MEMORY_MIB) << 20;
    if (floor..=ceiling).contains(&target_bytes) {
        return Ok(());
    }
    Err(fail(
        ErrorCode::BalloonTargetInvalid,
        format!(
            "a balloon target of {} MiB is outside {MIN_MEMORY_MIB} MiB to the VM's ceiling of {memory_mib} MiB",
            target_bytes >> 20,
        ),
    )
    .hint("a VM's ceiling is its --memory; `machinen balloon NAME max` gives it all back"))
}

impl Vm {
    /// The balloon as it is: the ceiling, the last target set, what the
    /// guest has now. `BALLOON_UNAVAILABLE` for a VM without one (a restore
    /// mapping its bundle's RAM privately: restore it with its own RAM).
    pub async fn balloon(&self) -> Result<BalloonReport> {
        self.balloon_request(None).await
    }

    /// Let the guest use `target_bytes` of its ceiling (the ceiling itself:
    /// no limit), and wait up to `wait` for it to get there (`None`: do not
    /// wait). The target must lie between [`MIN_MEMORY_MIB`] and the ceiling
    /// (`BALLOON_TARGET_INVALID`).
    pub async fn set_balloon(
        &self,
        target_bytes: u64,
        wait: Option<Duration>,
    ) -> Result<BalloonOutcome> {
        check_target(target_bytes, self.info().memory_mib)?;
        let t0 = Instant::now();
        let mut report = self.balloon_request(Some(target_bytes)).await?;
        let settled = |r: &BalloonReport| r.actual_bytes.abs_diff(target_bytes) <= SETTLED_WITHIN;
        if let Some(wait) = wait {
            let deadline = t0 + wait;
            while !settled(&report) && Instant::now() < deadline {
                tokio::time::sleep(timeouts::BALLOON_POLL).await;
                report = self.balloon_request(None).await?;
            }
        }
        Ok(BalloonOutcome {
            name: self.name().to_string(),
            settled: settled(&report),
            report,
            elapsed_ms: t0.elapsed().as_millis() as u64,
        })
    }

    async fn balloon_request(&self, target_bytes: Option<u64>) -> Result<BalloonReport> {
        self.call(
            proto::exchange::Balloon { target_bytes },
            timeouts::CONTROL_ANSWER,
            ErrorCode::BalloonUnavailable,
        )
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units_and_max() {
        let c = 4u64 << 30;
        assert_eq!(parse_size("512", c).expect("mib"), 512 << 20);
        assert_eq!(parse_size("512M", c).expect("m"), 512 << 20);
        assert_eq!(parse_size("1.5G", c).expect("g"), 3 << 29);
        assert_eq!(parse_size("2gib", c).expect("gib"), 2 << 30);
        assert_eq!(parse_size("max", c).expect("max"), c);
        assert_eq!(parse_size("FULL", c).expect("full"), c);
        for bad in ["", "x", "12Q", "-1", "1e9999", "..", "5 M M"] {
            let e = parse_size(bad, c).expect_err(bad);
            assert_eq!(e.code(), ErrorCode::BalloonTargetInvalid, "{bad}");
        }
    }
}
