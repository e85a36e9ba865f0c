//! What a VM's memory costs: the guest's own view and the host's.
//!
//! The guest's numbers come from its `/proc/meminfo` (read through the
//! agent); the host's from `/proc/<pid>/smaps_rollup` of the VM's QEMU and
//! supervisor (PSS counts a page shared by N processes as 1/N, so the PSS
//! of sibling forks adds up to what they really cost together) and from the
//! allocated size of the VM's RAM file (pages the guest touched and has not
//! given back).

use std::path::PathBuf;

use serde::Serialize;

use crate::vm::{ExecOptions, Vm};
use crate::Result;

/// [`Vm::memory_stats`].
#[derive(Debug, Clone, Serialize)]
pub struct MemoryStats {
    pub name: String,
    /// The guest's RAM ceiling.
    pub ceiling_bytes: u64,
    /// The guest's view; `None` when its agent did not answer.
    pub guest: Option<GuestMemory>,
    pub host: HostCost,
    /// The balloon; `None` for a VM without one (a restore mapping its
    /// bundle's RAM privately).
    pub balloon: Option<crate::balloon::BalloonReport>,
    /// The guest's network traffic and refused attempts (see
    /// [`Vm::network`]); `None` without a filtered network (`--network
    /// none` or `nat-host`).
    pub network: Option<machinen_proto::netpolicy::NetCounters>,
}

/// The guest's `/proc/meminfo`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct GuestMemory {
    /// `MemTotal`: the ceiling less what the kernel reserved.
    pub total_bytes: u64,
    /// `MemAvailable`: what programs could still get.
    pub available_bytes: u64,
    /// `total - available`.
    pub used_bytes: u64,
    /// `Cached` (page cache, tmpfs included).
    pub cached_bytes: u64,
    /// `MemFree`.
    pub free_bytes: u64,
}

/// What the VM costs the host.
#[derive(Debug, Clone, Default, Serialize)]
pub struct HostCost {
    /// Resident and proportional set size of the VM's QEMU.
    pub qemu_rss_bytes: Option<u64>,
    pub qemu_pss_bytes: Option<u64>,
    /// Proportional set size of its supervisor.
    pub supervisor_pss_bytes: Option<u64>,
    /// The VM's RAM file (booted VMs, and restores with their own RAM),
    /// and how much of it is allocated.
    pub ram_file: Option<PathBuf>,
    pub ram_file_bytes: Option<u64>,
    /// A restore's copy-on-write mapping of its bundle's RAM (`None` for
    /// VMs with a RAM file of their own).
    pub bundle_ram: Option<BundleRam>,
}

/// How a copy-on-write restore's guest RAM is held: pages still read from
/// the bundle (lazily, as the guest touches them; shared with the host's
/// page cache and with sibling forks of the same bundle) and pages the VM
/// wrote and so owns.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BundleRam {
    pub path: PathBuf,
    /// Resident pages still backed by the bundle's file.
    pub file_backed_bytes: u64,
    /// Of those, pages other processes (sibling forks) map too.
    pub shared_bytes: u64,
    /// Pages the VM has written: its own copies.
    pub private_bytes: u64,
}

/// The `ram.img` mapping in `/proc/<pid>/smaps` text, summed.
pub fn bundle_ram_of(smaps: &str) -> Option<BundleRam> {
    let mut found: Option<BundleRam> = None;
    let mut in_ram = false;
    for line in smaps.lines() {
        // A mapping header: "start-end perms offset dev inode [path]".
        let first = line.split_whitespace().next().unwrap_or("");
        if first.contains('-') && first.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
            let path = line.split_whitespace().nth(5);
            in_ram = path.is_some_and(|p| p.ends_with("/ram.img"));
            if let (true, Some(p), None) = (in_ram, path, &found) {
                found = Some(BundleRam {
                    path: PathBuf::from(p),
                    ..Default::default()
                });
            }
            continue;
        }
        let (Some(b), true) = (found.as_mut(), in_ram) else {
            continue;
        };
        let kib = |k: &str| kib_field(line, k).unwrap_or(0);
        b.shared_bytes += kib("Shared_Clean");
        b.file_backed_bytes += kib("Shared_Clean") + kib("Private_Clean");
        b.private_bytes += kib("Private_Dirty") + kib("Shared_Dirty");
    }
    found
}

/// `/proc/meminfo`-style `Key: N kB` lines (also `smaps_rollup`): the value
/// of `key` in bytes.
pub(crate) fn kib_field(text: &str, key: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))?;
    let kib: u64 = line
        .split(':')
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// Parse the guest's `/proc/meminfo`.
pub fn parse_meminfo(text: &str) -> Option<GuestMemory> {
    let total = kib_field(text, "MemTotal")?;
    let available = kib_field(text, "MemAvailable")?;
    Some(GuestMemory {
        total_bytes: total,
        available_bytes: available,
        used_bytes: total.saturating_sub(available),
        cached_bytes: kib_field(text, "Cached").unwrap_or(0),
        free_bytes: kib_field(text, "MemFree").unwrap_or(0),
    })
}

/// (RSS, PSS) of process `pid` from its `smaps_rollup`.
pub fn rss_pss(pid: u32) -> (Option<u64>, Option<u64>) {
    match std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
        Ok(text) => (kib_field(&text, "Rss"), kib_field(&text, "Pss")),
        Err(_) => (None, None),
    }
}

/// What a VM costs the host now (reads `/proc` and its RAM file: blocking).
pub fn host_cost(info: &crate::vm::VmInfo) -> HostCost {
    let (qemu_rss, qemu_pss) = info.qemu_pid.map(rss_pss).unwrap_or((None, None));
    let ram_file = crate::ramdir::ram_file_of(&info.id);
    HostCost {
        qemu_rss_bytes: qemu_rss,
        qemu_pss_bytes: qemu_pss,
        supervisor_pss_bytes: rss_pss(info.pid).1,
        // A VM with a RAM file of its own maps no bundle: spare it a walk
        // of QEMU's whole smaps (`ls --json` does this for every VM).
        bundle_ram: info
            .qemu_pid
            .filter(|_| ram_file.is_none())
            .and_then(|q| std::fs::read_to_string(format!("/proc/{q}/smaps")).ok())
            .and_then(|s| bundle_ram_of(&s)),
        ram_file_bytes: ram_file.as_deref().map(crate::backpressure::allocated),
        ram_file,
    }
}

impl Vm {
    /// The VM's memory: its ceiling, the guest's view and the host's cost.
    /// The guest's part needs its agent (a `cat /proc/meminfo` in the
    /// guest, bounded by [`machinen_proto::timeouts::STATS`]); when that
    /// fails the rest is still reported.
    pub async fn memory_stats(&self) -> Result<MemoryStats> {
        let info = self.info().clone();
        let guest = match self
            .exec_timeout(
                ExecOptions {
                    rlimits: Vec::new(),
                    argv: vec!["cat".into(), "/proc/meminfo".into()],
                    env: Vec::new(),
                    cwd: None,
                    user: None,
                },
                Some(machinen_proto::timeouts::STATS),
            )
            .await
        {
            Ok(out) if out.status.shell_code() == 0 => {
                parse_meminfo(&String::from_utf8_lossy(&out.stdout))
            }
            _ => None,
        };
        let host = crate::vm::blocking(move || Ok(host_cost(&info))).await?;
        Ok(MemoryStats {
            name: self.name().to_string(),
            ceiling_bytes: u64::from(self.info().memory_mib) << 20,
            guest,
            host,
            balloon: self.balloon().await.ok(),
            network: self.network().await.ok().map(|r| r.counters),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restores_bundle_mapping_is_summed() {
        let smaps = "\
7f0000000000-7f0040000000 rw-p 00000000 fd:01 123 /b/x.snap/ram.img
Size:            1048576 kB
Shared_Clean:       2048 kB
Private_Clean:      1024 kB
Shared_Dirty:          0 kB
Private_Dirty:       512 kB
7f0040000000-7f0040001000 rw-p 00000000 00:00 0 
Shared_Clean:       9999 kB
Private_Dirty:      9999 kB
";
        let b = bundle_ram_of(smaps).expect("found");
        assert_eq!(b.path, PathBuf::from("/b/x.snap/ram.img"));
        assert_eq!(b.shared_bytes, 2048 << 10);
        assert_eq!(b.file_backed_bytes, 3072 << 10);
        assert_eq!(b.private_bytes, 512 << 10);
        assert_eq!(
            bundle_ram_of("00400000-00401000 r-xp 0 0:0 1 /bin/x\n"),
            None
        );
    }

    #[test]
    fn meminfo_of_a_guest() {
        let text = "MemTotal:        4021384 kB\nMemFree:         3930220 kB\nMemAvailable:    3950000 kB\nBuffers:             624 kB\nCached:            19568 kB\nSwapCached:            0 kB\n";
        let g = parse_meminfo(text).expect("parse");
        assert_eq!(g.total_bytes, 4_021_384 * 1024);
        assert_eq!(g.used_bytes, (4_021_384 - 3_950_000) * 1024);
        assert_eq!(g.cached_bytes, 19_568 * 1024, "Cached, not SwapCached");
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn smaps_rollup_fields() {
        let text = "55d1-7ffe ---p 00000000 00:00 0   [rollup]\nRss:              492876 kB\nPss:              471352 kB\nPss_Anon:          12 kB\n";
        assert_eq!(kib_field(text, "Rss"), Some(492_876 * 1024));
        assert_eq!(kib_field(text, "Pss"), Some(471_352 * 1024));
    }

    #[test]
    fn our_own_process_has_a_pss() {
        let (rss, pss) = rss_pss(std::process::id());
        assert!(rss.is_some_and(|r| r > 0) && pss.is_some_and(|p| p > 0));
    }
}
