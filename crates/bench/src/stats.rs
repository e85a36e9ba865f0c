//! Samples, summary statistics, the report and its table.

use serde::Serialize;

/// Summary of a set of samples.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Summary {
    pub n: usize,
    pub median: f64,
    /// Nearest-rank 90th percentile.
    pub p90: f64,
    pub min: f64,
    pub max: f64,
    pub mean: f64,
    /// Sample standard deviation (0 for one sample).
    pub stdev: f64,
}

impl Summary {
    pub fn of(samples: &[f64]) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        let mut s: Vec<f64> = samples.to_vec();
        s.sort_by(|a, b| a.total_cmp(b));
        let n = s.len();
        let median = if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        };
        let rank = ((0.9 * n as f64).ceil() as usize).clamp(1, n);
        let mean = s.iter().sum::<f64>() / n as f64;
        let stdev = if n > 1 {
            (s.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Summary {
            n,
            median,
            p90: s[rank - 1],
            min: s[0],
            max: s[n - 1],
            mean,
            stdev,
        })
    }
}

/// One measured quantity.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub section: String,
    /// Stable key, e.g. `boot.cold_base_ms`.
    pub key: String,
    pub label: String,
    pub unit: String,
    #[serde(flatten)]
    pub summary: Summary,
    pub samples: Vec<f64>,
}

/// A ratio of two medians.
#[derive(Debug, Clone, Serialize)]
pub struct Ratio {
    pub key: String,
    pub label: String,
    pub numerator: String,
    pub denominator: String,
    pub value: f64,
}

/// Collects the rows of one section.
#[derive(Debug, Default)]
pub struct Section {
    pub name: String,
    pub rows: Vec<Row>,
}

impl Section {
    pub fn new(name: &str) -> Section {
        Section {
            name: name.into(),
            rows: Vec::new(),
        }
    }

    /// Record samples under `section.key`. Empty sample sets are skipped.
    pub fn add(&mut self, key: &str, label: &str, unit: &str, samples: Vec<f64>) {
        let Some(summary) = Summary::of(&samples) else {
            return;
        };
        let key = format!("{}.{key}", self.name);
        // Print as we go, so a long run shows progress.
        eprintln!(
            "  {key}: median {} {unit} (n={})",
            fmt_num(summary.median),
            summary.n
        );
        self.rows.push(Row {
            section: self.name.clone(),
            key,
            label: label.into(),
            unit: unit.into(),
            summary,
            samples,
        });
    }

    pub fn one(&mut self, key: &str, label: &str, unit: &str, value: f64) {
        self.add(key, label, unit, vec![value]);
    }
}

/// Milliseconds since `t`.
pub fn ms(t: std::time::Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

pub fn fmt_num(v: f64) -> String {
    if v == 0.0 {
        "0".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// The ratios the report derives from medians, when both sides were measured.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    let median = |k: &str| rows.iter().find(|r| r.key == k).map(|r| r.summary.median);
    let defs: &[(&str, &str, &str, &str)] = &[
        (
            "boot_base_over_plain",
            "cold boot (base) / plain QEMU boot to init",
            "boot.cold_base_ms",
            "plain.qemu_to_init_ms",
        ),
        (
            "boot_image_over_plain",
            "cold boot (image) / plain QEMU boot to init",
            "boot.cold_image_ms",
            "plain.qemu_to_init_ms",
        ),
        (
            "boot_base_over_own_qemu",
            "cold boot (base) / our guest in bare QEMU to agent-ready",
            "boot.cold_base_ms",
            "savevm.boot_to_agent_ms",
        ),
        (
            "outbound_nat_over_nat_host",
            "guest download from outside: nat (passt) / nat-host (QEMU user networking)",
            "net.outbound_nat_mib_s",
            "net.outbound_nat_host_mib_s",
        ),
        (
            "outbound_policy_over_open",
            "guest download: 100-rule egress policy / none (target >= 0.9)",
            "net.outbound_nat_policy_mib_s",
            "net.outbound_nat_mib_s",
        ),
        (
            "connections_policy_over_open",
            "guest connections per second: 100-rule egress policy / none (target >= 0.9)",
            "net.connections_nat_policy_per_s",
            "net.connections_nat_per_s",
        ),
        (
            "ports_nat_over_nat_host",
            "port-forward throughput: nat / nat-host",
            "ports.download_mib_s",
            "ports.download_nat_host_mib_s",
        ),
        (
            "shim_over_runc",
            "ctr run --rm IMAGE true: machinen shim / runc (a VM costs more: how much)",
            "containerd.shim_run_ms",
            "containerd.runc_run_ms",
        ),
        (
            "shim_over_boot",
            "ctr run --rm IMAGE true with the shim / machinen boot IMAGE -- true",
            "containerd.shim_run_ms",
            "containerd.boot_cli_ms",
        ),
        (
            "image_first_boot_over_tools",
            "first boot of a registry image / skopeo copy + base boot",
            "images.first_boot_ms",
            "images.skopeo_plus_base_ms",
        ),
        (
            "image_cached_boot_over_base",
            "cached boot of a registry image / base boot (target <= 1.1)",
            "images.cached_boot_ms",
            "images.base_boot_ms",
        ),
        (
            "chain_disk_over_full_disk",
            "checkpoints on disk: chain / full bundles",
            "chain.chain_disk_mib",
            "chain.full_disk_mib",
        ),
        (
            "delta_paused_over_first",
            "checkpoint pause: delta / first (target <= 0.5)",
            "chain.delta_paused_ms",
            "chain.first_paused_ms",
        ),
        (
            "delta_elapsed_over_first",
            "checkpoint time: delta / first (target <= 0.5)",
            "chain.delta_elapsed_ms",
            "chain.first_elapsed_ms",
        ),
        (
            "delta_paused_over_full",
            "checkpoint pause: delta / --full",
            "chain.delta_paused_ms",
            "chain.full_paused_ms",
        ),
        (
            "delta_elapsed_over_full",
            "checkpoint time: delta / --full",
            "chain.delta_elapsed_ms",
            "chain.full_elapsed_ms",
        ),
        (
            "restore_tip_over_full",
            "restore to ready: chain's tip / full bundle (target <= 1.2)",
            "chain.restore_tip_ms",
            "chain.restore_full_ms",
        ),
        (
            "push_second_over_first",
            "bytes uploaded: checkpoint 2 / checkpoint 1 (target <= 0.1)",
            "transport.push_second_mib",
            "transport.push_first_mib",
        ),
        (
            "pull_with_parent_over_cold",
            "pull of checkpoint 2: host with its parent / cold",
            "transport.pull_with_parent_ms",
            "transport.pull_cold_ms",
        ),
        (
            "restore_ref_with_parent_over_cold",
            "restore REF to ready: host with the parent / cold",
            "transport.restore_ref_with_parent_ms",
            "transport.restore_ref_cold_ms",
        ),
        (
            "restore_over_boot",
            "restore to ready (idle) / cold boot (base)",
            "snapshot.restore_idle_ms",
            "boot.cold_base_ms",
        ),
        (
            "fork_over_boot",
            "fork to ready / cold boot (base)",
            "fork.fork_to_ready_ms",
            "boot.cold_base_ms",
        ),
        (
            "snapshot_over_savevm",
            "snapshot (idle) / QEMU savevm",
            "snapshot.idle_elapsed_ms",
            "savevm.savevm_ms",
        ),
        (
            "restore_over_loadvm",
            "restore to ready (idle) / QEMU loadvm",
            "snapshot.restore_idle_ms",
            "savevm.loadvm_ms",
        ),
        (
            "pss_fork_over_vm",
            "PSS of one sibling fork / PSS of one VM",
            "memory.pss_per_vm_with_forks_mib",
            "memory.pss_one_vm_mib",
        ),
        (
            "pss_total_over_one_vm",
            "one VM + N sibling forks / one VM (PSS; target <= 1.6)",
            "memory.pss_vm_plus_forks_mib",
            "memory.pss_one_vm_mib",
        ),
        (
            "pss_separate_total_over_one_vm",
            "one VM + N separate forks / one VM (PSS)",
            "memory.pss_vm_plus_separate_forks_mib",
            "memory.pss_one_vm_mib",
        ),
        (
            "restore_4g_over_512m",
            "restore to ready: large / small memory ceiling (target < 1.2)",
            "scale.restore_4g_ms",
            "scale.restore_512m_ms",
        ),
        (
            "copy_mount_over_root_stat",
            "stat of a 10,000-file tree: copy-once mount / root disk (target <= 1.5)",
            "mounts.copy_stat_ms",
            "mounts.root_stat_ms",
        ),
        (
            "copy_mount_over_root_create_delete",
            "create and delete 1,000 files: copy-once mount / root disk (target <= 1.5)",
            "mounts.copy_create_delete_ms",
            "mounts.root_create_delete_ms",
        ),
        (
            "copy_mount_over_root_write",
            "sequential write MiB/s: copy-once mount / root disk",
            "mounts.copy_write_mib_s",
            "mounts.root_write_mib_s",
        ),
        (
            "copy_mount_over_root_read",
            "sequential read MiB/s: copy-once mount / root disk",
            "mounts.copy_read_mib_s",
            "mounts.root_read_mib_s",
        ),
        (
            "fork_of_fork_paused_over_fork",
            "source paused: fork of a fork / fork of a booted VM",
            "fork.fork_of_fork_paused_ms",
            "fork.source_paused_ms",
        ),
        (
            "fork_of_fork_4g_paused_over_fork",
            "source paused: fork of a fork at 4 GiB / fork of a booted VM",
            "fork.fork_of_fork_4g_paused_ms",
            "fork.source_paused_ms",
        ),
        (
            "live_mount_over_root_stat",
            "stat of a 10,000-file tree: live mount / root disk (target <= 3)",
            "mounts.live_stat_ms",
            "mounts.root_stat_ms",
        ),
        (
            "live_mount_over_root_create_delete",
            "create and delete 1,000 files: live mount / root disk (target <= 3)",
            "mounts.live_create_delete_ms",
            "mounts.root_create_delete_ms",
        ),
        (
            "live_mount_over_root_write",
            "sequential write MiB/s: live mount / root disk",
            "mounts.live_write_mib_s",
            "mounts.root_write_mib_s",
        ),
        (
            "live_mount_over_root_read",
            "sequential read MiB/s: live mount / root disk",
            "mounts.live_read_mib_s",
            "mounts.root_read_mib_s",
        ),
        (
            "reclaim_rss_after_balloon_over_none",
            "VM RSS 10 s after the guest freed its allocation: balloon / no balloon",
            "reclaim.rss_after_balloon_mib",
            "reclaim.rss_after_no_balloon_mib",
        ),
        (
            "reclaim_bundle_balloon_over_none",
            "snapshot RAM after the guest freed its allocation: balloon / no balloon",
            "reclaim.bundle_ram_balloon_mib",
            "reclaim.bundle_ram_no_balloon_mib",
        ),
    ];
    defs.iter()
        .filter_map(|(key, label, num, den)| {
            let (n, d) = (median(num)?, median(den)?);
            (d > 0.0).then(|| Ratio {
                key: key.to_string(),
                label: label.to_string(),
                numerator: num.to_string(),
                denominator: den.to_string(),
                value: n / d,
            })
        })
        .collect()
}

/// One row's cells, in the column order of both tables.
fn cells(r: &Row) -> [String; 9] {
    let s = &r.summary;
    [
        r.section.to_string(),
        r.label.to_string(),
        r.unit.to_string(),
        s.n.to_string(),
        fmt_num(s.median),
        fmt_num(s.p90),
        fmt_num(s.min),
        fmt_num(s.max),
        fmt_num(s.stdev),
    ]
}

/// The readable table.
pub fn table(rows: &[Row], ratios: &[Ratio]) -> String {
    let mut out = String::new();
    let w = rows
        .iter()
        .map(|r| r.label.len())
        .max()
        .unwrap_or(10)
        .max(10);
    out.push_str(&format!(
        "{:<9} {:<w$} {:>6} {:>3} {:>9} {:>9} {:>9} {:>9} {:>8}\n",
        "section", "metric", "unit", "n", "median", "p90", "min", "max", "stdev"
    ));
    for r in rows {
        let [section, label, unit, n, median, p90, min, max, stdev] = cells(r);
        out.push_str(&format!(
            "{section:<9} {label:<w$} {unit:>6} {n:>3} {median:>9} {p90:>9} {min:>9} {max:>9} {stdev:>8}\n"
        ));
    }
    if !ratios.is_empty() {
        out.push_str("\nratios of medians\n");
        let w = ratios.iter().map(|r| r.label.len()).max().unwrap_or(10);
        for r in ratios {
            out.push_str(&format!(
                "  {:<w$}  {:>6}x\n",
                r.label,
                format!("{:.2}", r.value)
            ));
        }
    }
    out
}

/// Markdown version of the table, for docs/performance.md.
pub fn markdown(rows: &[Row], ratios: &[Ratio]) -> String {
    let mut out = String::from("| section | metric | unit | n | median | p90 | min | max | stdev |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for r in rows {
        out.push_str(&format!("| {} |\n", cells(r).join(" | ")));
    }
    if !ratios.is_empty() {
        out.push_str("\n| ratio of medians | value |\n| --- | ---: |\n");
        for r in ratios {
            out.push_str(&format!("| {} | {:.2}x |\n", r.label, r.value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_samples() {
        let s = Summary::of(&[5.0, 1.0, 3.0, 2.0, 4.0]).expect("some");
        assert_eq!(
            (s.n, s.median, s.min, s.max, s.mean),
            (5, 3.0, 1.0, 5.0, 3.0)
        );
        assert_eq!(s.p90, 5.0);
        assert!((s.stdev - 1.5811).abs() < 1e-3);
        let s = Summary::of(&[1.0, 2.0, 3.0, 4.0]).expect("some");
        assert_eq!(s.median, 2.5);
        let s = Summary::of(&(1..=10).map(f64::from).collect::<Vec<_>>()).expect("some");
        assert_eq!(s.p90, 9.0);
        let s = Summary::of(&[7.0]).expect("one");
        assert_eq!((s.median, s.p90, s.stdev), (7.0, 7.0, 0.0));
        assert!(Summary::of(&[]).is_none());
    }

    #[test]
    fn ratios_need_both_sides() {
        let mut sec = Section::new("boot");
        sec.add("cold_base_ms", "x", "ms", vec![3000.0]);
        let mut plain = Section::new("plain");
        plain.add("qemu_to_init_ms", "y", "ms", vec![1000.0]);
        let rows: Vec<Row> = sec.rows.into_iter().chain(plain.rows).collect();
        let r = ratios(&rows);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].value, 3.0);
        assert!(table(&rows, &r).contains("3.00x"));
        assert!(markdown(&rows, &r).contains("| 3.00x |"));
    }
}
