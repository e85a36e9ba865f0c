//! A deadline for each end-to-end test.
//!
//! A hung test would otherwise hold the whole run until CI's own limit ends
//! it without a word. Every [`super::Env`] arms a watchdog; when the test
//! outlives [`deadline`], the watchdog prints what each of the test's
//! processes is waiting on and the tail of each VM's logs, then kills every
//! process started for the test (each carries the test's registry directory
//! in its environment). Whatever the test was waiting on then fails, so the
//! run goes on and the failure comes with its evidence.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

/// The default limit: three times what the longest test takes on a loaded
/// two-core machine.
const DEFAULT_DEADLINE: Duration = Duration::from_secs(15 * 60);

/// `MACHINEN_TEST_DEADLINE_SECS` overrides the default.
fn deadline() -> Duration {
    std::env::var("MACHINEN_TEST_DEADLINE_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_DEADLINE)
}

/// Disarmed when dropped.
pub struct Watchdog {
    disarm: Option<mpsc::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    pub fn arm(registry: &Path) -> Watchdog {
        let (tx, rx) = mpsc::channel::<()>();
        let registry = registry.to_path_buf();
        let test = std::thread::current()
            .name()
            .unwrap_or("a test")
            .to_string();
        let limit = deadline();
        let thread = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                fire(&test, &registry, limit);
            }
        });
        Watchdog {
            disarm: Some(tx),
            thread: Some(thread),
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.disarm.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fire(test: &str, registry: &Path, limit: Duration) {
    eprintln!(
        "\n=== watchdog: {test} ran past {} s; what it was waiting on:",
        limit.as_secs()
    );
    let pids = processes_of(registry);
    for &pid in &pids {
        eprintln!("{}", describe(pid));
    }
    for vm in std::fs::read_dir(registry)
        .map(|rd| rd.flatten().map(|e| e.path()).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        for log in ["vmm.log", "console.log", "qemu.log", "main.log"] {
            print_tail(&vm.join(log), 30);
        }
        if let Some(id) = vm
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|_| vm.is_dir())
        {
            probe_guest(registry, id);
        }
    }
    for &pid in &pids {
        // SIGKILL: what hangs may ignore anything gentler.
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    eprintln!("=== watchdog: killed {} processes of {test}\n", pids.len());
    // Their RAM files and entries: gone with gc, as after any crash.
    let _ = std::process::Command::new(env!("CARGO_BIN_EXE_machinen"))
        .arg("gc")
        .env("MACHINEN_REGISTRY_DIR", registry)
        .output();
}

/// Every process whose environment names `registry` as its registry: the
/// CLI processes the test ran, their supervisors, QEMU and helpers.
fn processes_of(registry: &Path) -> Vec<u32> {
    let needle = format!("MACHINEN_REGISTRY_DIR={}", registry.display());
    let me = std::process::id();
    let mut pids: Vec<u32> = std::fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.retain(|&pid| {
        pid != me
            && std::fs::read(format!("/proc/{pid}/environ"))
                .map(|env| env.split(|&b| b == 0).any(|v| v == needle.as_bytes()))
                .unwrap_or(false)
    });
    pids.sort_unstable();
    pids
}

/// The command line, and for each thread its state and kernel wait channel.
fn describe(pid: u32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .unwrap_or_default();
    let mut out = format!(
        "pid {pid}: {}",
        cmdline.chars().take(200).collect::<String>()
    );
    let tasks: Vec<PathBuf> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    for task in tasks {
        let comm = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let wchan = std::fs::read_to_string(task.join("wchan")).unwrap_or_default();
        let state = std::fs::read_to_string(task.join("stat"))
            .ok()
            .and_then(|s| {
                s.rsplit_once(") ")
                    .map(|(_, r)| r.chars().next().unwrap_or('?'))
            })
            .unwrap_or('?');
        out.push_str(&format!(
            "\n    thread {} {}: {state} {wchan}",
            task.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            comm.trim()
        ));
    }
    out
}

/// Whether the guest still answers a new command, and what its processes
/// wait on: tells a stuck guest from a stuck connection.
fn probe_guest(registry: &Path, id: &str) {
    let spawned = std::process::Command::new(env!("CARGO_BIN_EXE_machinen"))
        .args([
            "exec",
            "--timeout",
            "30",
            id,
            "--",
            "sh",
            "-c",
            // The image has no ps: read /proc.
            "cat /proc/loadavg; for p in /proc/[0-9]*; do \
             echo \"${p#/proc/} $(cut -d' ' -f3 $p/stat) $(cat $p/wchan) $(tr '\\0' ' ' < $p/cmdline)\"; \
             done 2>/dev/null; dmesg 2>/dev/null | tail -20",
        ])
        .env("MACHINEN_REGISTRY_DIR", registry)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return eprintln!("--- guest {id}: cannot run exec: {e}"),
    };
    // The probe itself may hang on what hangs the test: bound it.
    let deadline = std::time::Instant::now() + Duration::from_secs(45);
    while matches!(child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    match child.wait_with_output() {
        Ok(out) => eprintln!(
            "--- guest {id} processes (exec {:?}):\n{}{}",
            out.status.code(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => eprintln!("--- guest {id}: exec failed: {e}"),
    }
}

fn print_tail(path: &Path, lines: usize) {
    let Ok(text) = std::fs::read(path) else {
        return;
    };
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    eprintln!("--- {} (last {lines} lines)", path.display());
    for l in &all[all.len().saturating_sub(lines)..] {
        eprintln!("{}", l.chars().take(400).collect::<String>());
    }
}
