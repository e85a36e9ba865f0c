//! Refusing forks and restores the host has no memory for.
//!
//! Before `fork`, `fork --count N` and `restore` start anything, the host's
//! available memory (`MemAvailable`) is compared with what the new VMs can
//! cost right away; when what would be left falls below a threshold (by
//! default 1 % of the host's RAM, as the reference runtime), the operation
//! is refused with `FORK_MEMORY_BACKPRESSURE` (retryable) instead of
//! letting the kernel's OOM killer pick a victim later. The estimate counts
//! what each VM holds from the start, not its ceiling:
//!
//! - a VM mapping a bundle's RAM copy-on-write shares the unchanged pages
//!   with the bundle's page cache: its own QEMU and supervisor
//!   ([`VM_OVERHEAD`]; measured 50-52 MiB of PSS per sibling fork here);
//! - a VM with its own RAM copy (`--own-ram`) holds the pages the copy
//!   allocates (the RAM file's allocated size), plus the overhead;
//! - a bundle that carries the RAM inside the machine state is loaded into
//!   anonymous memory: the state file's size, plus the overhead.
//!
//! Pages a VM dirties later are its own and are not foreseen here.

use std::path::Path;

use crate::error::{fail, ErrorCode, Failure};

/// What one VM's QEMU and supervisor hold on their own, whatever its RAM.
pub const VM_OVERHEAD: u64 = 64 << 20;

/// How much memory must stay available on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Threshold {
    Bytes(u64),
    /// Of the host's total RAM.
    Percent(f64),
}

/// The reference runtime's default: 1 % of the host's RAM.
pub const DEFAULT_THRESHOLD: Threshold = Threshold::Percent(1.0);

impl Default for Threshold {
    fn default() -> Threshold {
        DEFAULT_THRESHOLD
    }
}

impl std::str::FromStr for Threshold {
    type Err = Failure;

    /// `1%`, `0.5%`, `512M`, `2G`, `0` (the check off).
    fn from_str(s: &str) -> Result<Threshold, Failure> {
        let bad = || {
            fail(
                ErrorCode::BootArgsInvalid,
                format!("free memory threshold {s:?} is neither a percentage nor a size"),
            )
            .hint("e.g. --free-memory-threshold 1% or 512M (0 turns the check off)")
        };
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(0.0..=100.0).contains(&p) {
                return Err(bad());
            }
            return Ok(Threshold::Percent(p));
        }
        crate::hostfile::parse_size(s)
            .map(Threshold::Bytes)
            .ok_or_else(bad)
    }
}

impl Threshold {
    fn bytes(self, total: u64) -> u64 {
        match self {
            Threshold::Bytes(b) => b,
            Threshold::Percent(p) => (total as f64 * p / 100.0) as u64,
        }
    }
}

/// The host's memory as `/proc/meminfo` has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemory {
    pub total: u64,
    pub available: u64,
}

impl HostMemory {
    pub fn read() -> Option<HostMemory> {
        parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
    }
}

fn parse_meminfo(text: &str) -> Option<HostMemory> {
    use crate::stats::kib_field;
    Some(HostMemory {
        total: kib_field(text, "MemTotal")?,
        available: kib_field(text, "MemAvailable")?,
    })
}

/// Bytes of `path` that are really allocated (holes excluded); 0 when it
/// cannot be read.
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Refuse `count` new VMs of `per_vm` bytes each (see the module docs for
/// the estimate) when the host would keep less than `threshold` available.
/// `what` names the operation in the message ("fork", "restore").
pub fn check(
    what: &str,
    count: usize,
    per_vm: u64,
    threshold: Threshold,
    host: HostMemory,
) -> Result<(), Failure> {
    let keep = threshold.bytes(host.total);
    if keep == 0 {
        return Ok(());
    }
    let need = per_vm.saturating_mul(count as u64);
    if host.available.saturating_sub(need) >= keep {
        return Ok(());
    }
    let mib = |b: u64| b >> 20;
    let vms = if count == 1 {
        "the new VM needs".to_string()
    } else {
        format!("{count} new VMs need")
    };
    Err(fail(
        ErrorCode::ForkMemoryBackpressure,
        format!(
            "{what} refused: the host has {} MiB available, {vms} about {} MiB, and {} MiB ({}) must stay free",
            mib(host.available),
            mib(need),
            mib(keep),
            match threshold {
                Threshold::Percent(p) => format!("{p}% of {} MiB", mib(host.total)),
                Threshold::Bytes(_) => "the threshold".into(),
            }
        ),
    )
    .hint("stop VMs you no longer need and try again, or lower --free-memory-threshold (0 turns the check off)"))
}

/// [`check`] against the host's memory now; a host whose `/proc/meminfo`
/// cannot be read is not checked.
pub fn check_now(
    what: &str,
    count: usize,
    per_vm: u64,
    threshold: Threshold,
) -> Result<(), Failure> {
    match HostMemory::read() {
        Some(host) => check(what, count, per_vm, threshold, host),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    #[test]
    fn thresholds_parse() {
        assert_eq!(
            "1%".parse::<Threshold>().expect("1%"),
            Threshold::Percent(1.0)
        );
        assert_eq!(
            "0.5%".parse::<Threshold>().expect("0.5%"),
            Threshold::Percent(0.5)
        );
        assert_eq!(
            "512M".parse::<Threshold>().expect("512M"),
            Threshold::Bytes(512 << 20)
        );
        assert_eq!("0".parse::<Threshold>().expect("0"), Threshold::Bytes(0));
        for bad in ["", "x", "101%", "-1%", "%"] {
            assert_eq!(
                bad.parse::<Threshold>().expect_err(bad).code,
                ErrorCode::BootArgsInvalid,
                "{bad:?}"
            );
        }
    }

    #[test]
    fn meminfo_parses() {
        let m = parse_meminfo(
            "MemTotal:       24000000 kB\nMemFree: 1 kB\nMemAvailable:   12000000 kB\n",
        )
        .expect("parse");
        assert_eq!(m.total, 24_000_000 * 1024);
        assert_eq!(m.available, 12_000_000 * 1024);
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn refuses_only_what_would_cross_the_threshold() {
        let host = HostMemory {
            total: 16 * GIB,
            available: 2 * GIB,
        };
        // 1% of 16 GiB is ~164 MiB: four 64 MiB forks leave plenty.
        check("fork", 4, VM_OVERHEAD, DEFAULT_THRESHOLD, host).expect("fits");
        // Thirty 64 MiB forks need 1.875 GiB of the 2 available.
        let e = check("fork", 30, VM_OVERHEAD, DEFAULT_THRESHOLD, host).expect_err("refused");
        assert_eq!(e.code, ErrorCode::ForkMemoryBackpressure);
        assert!(e.message.contains("2048 MiB available"), "{}", e.message);
        assert!(
            e.message.contains("30 new VMs need about 1920 MiB"),
            "{}",
            e.message
        );
        assert!(e.code.retryable());
        // 100% can never be met; 0 turns the check off.
        assert!(check("restore", 1, 0, Threshold::Percent(100.0), host).is_err());
        check("restore", 64, 100 * GIB, Threshold::Bytes(0), host).expect("off");
    }
}
