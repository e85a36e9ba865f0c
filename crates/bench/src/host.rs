//! What the numbers were measured on.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct HostInfo {
    pub accel: String,
    pub host_cores: usize,
    pub cpu_model: String,
    pub host_kernel: String,
    pub qemu_version: String,
    pub guest_kernel: String,
    pub git_commit: String,
    pub git_dirty: bool,
    pub machinen_version: String,
    /// UTC, RFC 3339.
    pub date: String,
    /// `/proc/loadavg` when the run started and ended (other work on the
    /// host makes timings noisy).
    pub loadavg_start: String,
    pub loadavg_end: String,
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(env!("CARGO_MANIFEST_DIR"))
        .args(args)
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn collect() -> HostInfo {
    let accel = machinen::accel::probe(None)
        .map(|a| a.as_str().to_string())
        .unwrap_or_else(|e| format!("invalid: {e}"));
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("")
        .trim()
        .to_string();
    let guest_kernel = machinen::Paths::from_env()
        .ok()
        .and_then(|p| machinen::assets::resolve(&p).ok())
        .map(|a| a.kernel_version)
        .unwrap_or_else(|| "unknown".into());
    HostInfo {
        accel,
        host_cores: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        cpu_model,
        host_kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        qemu_version: crate::qemu::version(),
        guest_kernel,
        git_commit: git(&["rev-parse", "HEAD"]).unwrap_or_else(|| "unknown".into()),
        git_dirty: git(&["status", "--porcelain", "--untracked-files=no"])
            .is_some_and(|s| !s.is_empty()),
        machinen_version: env!("CARGO_PKG_VERSION").into(),
        date: utc_now(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

/// Now as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    machinen_proto::rfc3339::format(secs)
}
