//! End-to-end tests: the real `machinen` binary boots real VMs under QEMU
//! (TCG on CI) and the assertions are about what happened in the guest.
//!
//! Needs the installed assets (`machinen install`), the supervisor and the
//! static agent built (`scripts/build --debug`); `scripts/test` does all that.
//! Every test uses its own registry directory, so tests never see each
//! other's VMs and can run in parallel.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

/// An isolated registry for one test, and helpers to run the CLI in it.
struct Env {
    registry: tempfile::TempDir,
    /// A machinen home of this Env's own (another "host": its own cache
    /// and everything else, with the installed assets shared).
    home: Option<PathBuf>,
    _watchdog: watchdog::Watchdog,
}

impl Env {
    fn new() -> Env {
        // Short path: unix socket paths are limited to 107 bytes.
        let registry = tempfile::Builder::new()
            .prefix("mn-")
            .tempdir_in("/tmp")
            .expect("tmp registry");
        let _watchdog = watchdog::Watchdog::arm(registry.path());
        Env {
            registry,
            home: None,
            _watchdog,
        }
    }

    /// An Env with a machinen home of its own: to machinen, another host
    /// (the installed kernel and base image are shared, read-only).
    fn with_home(home: &Path) -> Env {
        let mut env = Env::new();
        env.home = Some(home.to_path_buf());
        env
    }

    /// The cache directory this Env's commands use.
    fn cache(&self) -> PathBuf {
        match &self.home {
            Some(h) => h.join(env!("CARGO_PKG_VERSION")).join("cache"),
            None => cache_dir(),
        }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_machinen"));
        c.args(args)
            .env("MACHINEN_REGISTRY_DIR", self.registry.path())
            .env_remove("MACHINEN_LOG");
        if let Some(home) = &self.home {
            c.env("MACHINEN_HOME", home)
                .env("MACHINEN_ASSETS_DIR", assets_dir())
                .env_remove("MACHINEN_CACHE_DIR");
        }
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self
            .cmd(args)
            .stdin(Stdio::null())
            .output()
            .expect("run machinen");
        eprintln!(
            "$ machinen {}\n  -> {:?}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "machinen {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stdout).expect("utf8 stdout")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let s = self.run_ok(args);
        serde_json::from_str(s.trim())
            .unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {s}"))
    }

    fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.registry.path())
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave VMs behind, whatever the test did.
        for v in self
            .json_quiet(&["ls", "--json"])
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if let Some(name) = v["name"].as_str() {
                let _ = self.cmd(&["stop", "--force", name]).output();
            }
        }
        // What crashed or was killed: its RAM file must not outlive the
        // registry, which goes with this Env.
        let _ = self.cmd(&["gc"]).output();
    }
}

impl Env {
    fn json_quiet(&self, args: &[&str]) -> serde_json::Value {
        self.cmd(args)
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice(&o.stdout).ok())
            .unwrap_or_default()
    }
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| !s.contains(") Z "))
            .unwrap_or(false)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A loopback port free at the time of asking.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// machinen's home (as the library resolves it: `MACHINEN_HOME`, else
/// `~/.machinen`).
fn machinen_home() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    var("MACHINEN_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(var("HOME").expect("HOME")).join(".machinen"))
}

/// The installed assets (`MACHINEN_ASSETS_DIR`, else under the home).
fn assets_dir() -> PathBuf {
    std::env::var_os("MACHINEN_ASSETS_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let arch = match std::env::consts::ARCH {
                "x86_64" => "amd64",
                "aarch64" => "arm64",
                a => a,
            };
            machinen_home()
                .join(env!("CARGO_PKG_VERSION"))
                .join("bases")
                .join(format!("debian-{arch}"))
        })
}

/// machinen's cache directory (`MACHINEN_CACHE_DIR`, else under the home).
fn cache_dir() -> PathBuf {
    std::env::var_os("MACHINEN_CACHE_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            machinen_home()
                .join(env!("CARGO_PKG_VERSION"))
                .join("cache")
        })
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn adhoc_boot_runs_the_command_and_passes_exit_codes() {
    let env = Env::new();
    let out = env.run(&[
        "boot",
        "--",
        "sh",
        "-c",
        "uname -s; cat /etc/os-release | grep ^ID=; echo to-stderr >&2",
    ]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Linux\n"), "{stdout}");
    assert!(stdout.contains("ID=debian"), "{stdout}");
    assert!(
        !stdout.contains("to-stderr"),
        "stderr must not leak into stdout"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));

    assert_eq!(
        env.run(&["boot", "--", "sh", "-c", "exit 3"]).status.code(),
        Some(3)
    );
    assert_eq!(
        env.run(&["boot", "--", "sh", "-c", "kill -9 $$"])
            .status
            .code(),
        Some(137),
        "killed by SIGKILL → 128+9"
    );
    // Nothing is left behind by foreground VMs.
    wait_until(
        "foreground VMs to clean up",
        Duration::from_secs(10),
        || env.vm_dirs().is_empty(),
    );
}

#[test]
fn env_and_cwd_reach_the_command() {
    let env = Env::new();
    let out = env.run_ok(&[
        "boot",
        "--env",
        "GREETING=hello world",
        "--env",
        "EMPTY=",
        "--cwd",
        "/usr/share",
        "--hostname",
        "api-1.internal",
        "--",
        "sh",
        "-c",
        "echo \"$GREETING|${EMPTY-unset}|$(pwd)|$HOME|$(hostname)\"",
    ]);
    assert_eq!(out.trim(), "hello world||/usr/share|/root|api-1.internal");
}

#[test]
fn command_not_found_and_bad_arguments_have_codes() {
    let env = Env::new();
    let out = env.run(&["boot", "--", "definitely-not-a-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EXEC_COMMAND_NOT_FOUND"));

    let out = env.run(&["boot", "--cwd", "relative", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_ARGS_INVALID"));

    let out = env.run(&["boot", "--hostname", "no spaces", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_ARGS_INVALID"));

    let out = env.run(&["boot", "--memory", "16", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_MEMORY_INVALID"));

    let out = env.run(&["exec", "no-such-vm", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("REGISTRY_NOT_FOUND") && err.contains("no-such-vm"),
        "{err}"
    );

    let out = env.run(&["exec", "--json", "no-such-vm", "--", "true"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json error");
    assert_eq!(v["error"]["code"], "REGISTRY_NOT_FOUND");
    assert_eq!(v["error"]["retryable"], false);
}

#[test]
fn detached_vm_serves_concurrent_execs_large_output_and_stdin_then_stops() {
    let env = Env::new();
    let info = env.json(&["boot", "--name", "team/web", "--detached", "--json"]);
    assert_eq!(info["name"], "team/web");
    let pid = info["pid"].as_u64().expect("pid");
    let qemu_pid = info["qemu_pid"].as_u64().expect("qemu pid");
    assert!(pid_alive(pid) && pid_alive(qemu_pid));

    // ls shows it, by name and pid.
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls.as_array().expect("array").len(), 1);
    assert_eq!(ls[0]["name"], "team/web");
    let table = env.run_ok(&["ps"]);
    assert!(
        table.starts_with("PID") && table.contains("team/web"),
        "{table}"
    );

    // The name is taken while it runs.
    let out = env.run(&["boot", "--name", "team/web", "--detached"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REGISTRY_NAME_IN_USE"));

    // Two execs from separate processes at the same time: each records when
    // it ran (guest clock); their intervals must overlap.
    let script = "date +%s.%N; sleep 2; date +%s.%N";
    let a = env
        .cmd(&["exec", "team/web", "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("a");
    let b = env
        .cmd(&["exec", &pid.to_string(), "--", "sh", "-c", script])
        .stdout(Stdio::piped())
        .spawn()
        .expect("b");
    let (a, b) = (
        a.wait_with_output().expect("a"),
        b.wait_with_output().expect("b"),
    );
    assert!(a.status.success() && b.status.success());
    let times = |o: &Output| -> (f64, f64) {
        let s = String::from_utf8_lossy(&o.stdout);
        let v: Vec<f64> = s.lines().map(|l| l.trim().parse().expect("time")).collect();
        (v[0], v[1])
    };
    let ((a0, a1), (b0, b1)) = (times(&a), times(&b));
    assert!(
        a0 < b1 && b0 < a1,
        "execs did not run concurrently: a={a0}..{a1} b={b0}..{b1}"
    );

    // Large binary output streams intact (30 MiB of random bytes).
    let sum = env.run_ok(&[
        "exec",
        "team/web",
        "--",
        "sh",
        "-c",
        "head -c 31457280 /dev/urandom > /tmp/big && sha256sum /tmp/big",
    ]);
    let want = sum.split_whitespace().next().expect("sum").to_string();
    let out = env
        .cmd(&["exec", "team/web", "--", "cat", "/tmp/big"])
        .stdin(Stdio::null())
        .output()
        .expect("cat");
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 31457280);
    assert_eq!(sha256_hex(&out.stdout), want);

    // Stdin is forwarded, binary-safe, until EOF.
    let input: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let mut child = env
        .cmd(&["exec", "team/web", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&feed));
    let out = child.wait_with_output().expect("sha256sum");
    writer.join().expect("join").expect("write");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        Some(sha256_hex(&input).as_str())
    );

    // --json exec captures everything.
    let out = env.run(&[
        "exec",
        "team/web",
        "--json",
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4), "--json keeps the exit code");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("exec json");
    assert_eq!(
        (
            v["exit_code"].as_i64(),
            v["stdout"].as_str(),
            v["stderr"].as_str()
        ),
        (Some(4), Some("out\n"), Some("err\n"))
    );

    // The guest reaches the outside through user networking config.
    let net = env.run_ok(&[
        "exec",
        "team/web",
        "--",
        "sh",
        "-c",
        "cat /sys/class/net/eth0/operstate; cat /etc/resolv.conf",
    ]);
    assert!(net.contains("up") && net.contains("nameserver"), "{net}");

    // Stop: graceful, everything gone.
    let stop = env.json(&["stop", "team/web", "--json"]);
    assert_eq!(stop["killed"], false);
    assert!(!pid_alive(pid) && !pid_alive(qemu_pid));
    assert!(env.vm_dirs().is_empty(), "registry entry removed");
    assert_eq!(env.json(&["ls", "--json"]), serde_json::json!([]));
    let out = env.run(&["exec", "team/web", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("REGISTRY_NOT_FOUND"));
}

#[test]
fn crashed_vms_keep_their_logs_and_cause_until_gc() {
    let env = Env::new();
    // One VM's QEMU is killed: its supervisor records why.
    let crasher = env.json(&[
        "boot",
        "--name",
        "crasher",
        "--memory",
        "256",
        "--detached",
        "--json",
    ]);
    let crasher_dir = env
        .registry
        .path()
        .join(crasher["id"].as_str().expect("id"));
    let crasher_ram = Path::new("/dev/shm").join(format!(
        "machinen-{}.ram",
        crasher["id"].as_str().expect("id")
    ));
    Command::new("kill")
        .args([
            "-9",
            &crasher["qemu_pid"].as_u64().expect("qemu pid").to_string(),
        ])
        .status()
        .expect("kill");
    wait_until(
        "the supervisor to record the crash and exit",
        Duration::from_secs(10),
        || !pid_alive(crasher["pid"].as_u64().expect("pid")),
    );
    // One guest kernel panics: QEMU exits 0 as on a reboot, the console says why.
    env.json(&[
        "boot",
        "--name",
        "panicker",
        "--memory",
        "256",
        "--detached",
        "--json",
    ]);
    let out = env.run(&[
        "exec",
        "panicker",
        "--",
        "sh",
        "-c",
        "echo c > /proc/sysrq-trigger",
    ]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the VM crashed: the guest kernel panicked"),
        "the exec says why"
    );
    // Another VM's supervisor is killed: QEMU dies with it, nobody records why.
    let info = env.json(&["boot", "--name", "victim", "--detached", "--json"]);
    let pid = info["pid"].as_u64().expect("pid");
    let qemu_pid = info["qemu_pid"].as_u64().expect("qemu pid");
    // Its RAM file on tmpfs (when /dev/shm had room) must not outlive it either.
    let ram =
        Path::new("/dev/shm").join(format!("machinen-{}.ram", info["id"].as_str().expect("id")));
    let had_ram_file = ram.exists();
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    // QEMU dies with its supervisor.
    wait_until("QEMU to exit", Duration::from_secs(10), || {
        !pid_alive(qemu_pid)
    });

    // Both are listed as crashed, each with what is known.
    let ls = env.json(&["ls", "--json"]);
    let by_name = |n: &str| {
        ls.as_array()
            .expect("array")
            .iter()
            .find(|v| v["name"] == n)
            .cloned()
            .unwrap_or_else(|| panic!("{n} listed: {ls}"))
    };
    let c = by_name("crasher");
    assert_eq!(c["state"], "crashed");
    assert_eq!(c["cause"], "QEMU killed by signal 9 (SIGKILL)");
    let p = by_name("panicker");
    assert_eq!(p["state"], "crashed");
    assert!(
        p["cause"]
            .as_str()
            .is_some_and(|c| c.contains("Kernel panic - not syncing: sysrq triggered crash")),
        "{p}"
    );
    let v = by_name("victim");
    assert_eq!(v["state"], "crashed");
    assert!(
        v["cause"]
            .as_str()
            .is_some_and(|c| c.contains(&format!("supervisor (pid {pid}) died"))),
        "{v}"
    );
    assert!(
        env.run_ok(&["ls"]).contains("SIGKILL"),
        "the table shows the cause"
    );
    assert!(
        crasher_dir.join("console.log").exists() && crasher_dir.join("qemu.log").exists(),
        "logs kept"
    );
    assert!(
        !crasher_dir.join("control.sock").exists(),
        "no socket of a dead supervisor left"
    );
    assert!(
        !crasher_ram.exists(),
        "the crashed VM's RAM file is freed at once"
    );
    let logs = env.run(&["logs", "crasher", "--tail", "5"]);
    assert!(logs.status.success() && String::from_utf8_lossy(&logs.stderr).contains("SIGKILL"));
    assert!(env
        .run_ok(&["logs", "crasher", "--vmm"])
        .contains("the VM crashed"));
    let stop = env.run(&["stop", "crasher"]);
    assert!(
        String::from_utf8_lossy(&stop.stderr).contains("REGISTRY_NOT_FOUND"),
        "a crashed VM is not running"
    );
    assert_eq!(
        env.vm_dirs().len(),
        3,
        "their files are still there before gc"
    );

    // Entries of this registry (orphaned RAM files of other runs on the
    // machine, which gc also removes, have no name).
    let named = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["removed"]
            .as_array()
            .expect("removed")
            .iter()
            .filter(|i| !i["name"].is_null())
            .cloned()
            .collect()
    };
    let dry = env.json(&["gc", "--dry-run", "--json"]);
    let items = named(&dry);
    assert_eq!(items.len(), 3, "{dry}");
    let crash_item = items
        .iter()
        .find(|i| i["name"] == "crasher")
        .expect("crasher in gc");
    assert_eq!(
        (crash_item["reason"].as_str(), crash_item["cause"].as_str()),
        (Some("crashed"), Some("QEMU killed by signal 9 (SIGKILL)"))
    );
    assert!(env.run_ok(&["gc", "--dry-run"]).contains("crasher"));
    assert_eq!(env.vm_dirs().len(), 3, "dry run removes nothing");

    let gc = env.json(&["gc", "--json"]);
    assert_eq!(named(&gc).len(), 3, "{gc}");
    assert!(env.vm_dirs().is_empty());
    assert_eq!(env.json(&["ls", "--json"]), serde_json::json!([]));
    assert!(
        !ram.exists(),
        "gc removed the RAM file (it existed: {had_ram_file})"
    );
    // The name is free again.
    let again = env.json(&["boot", "--name", "victim", "--detached", "--json"]);
    assert_eq!(again["name"], "victim");
    env.run_ok(&["stop", "--force", "victim"]);
}

#[path = "e2e/blocking.rs"]
mod blocking;
#[path = "e2e/build.rs"]
mod build;
#[path = "e2e/chain.rs"]
mod chain;
#[path = "e2e/containerd.rs"]
mod containerd;
#[path = "e2e/criu.rs"]
mod criu;
#[path = "e2e/deadline.rs"]
mod deadline;
#[path = "e2e/dirs.rs"]
mod dirs;
#[path = "e2e/hostile.rs"]
mod hostile;
#[path = "e2e/image.rs"]
mod image;
#[path = "e2e/isolation.rs"]
mod isolation;
#[path = "e2e/live_mounts.rs"]
mod live_mounts;
#[path = "e2e/memory.rs"]
mod memory;
#[path = "e2e/mounts.rs"]
mod mounts;
#[path = "e2e/netpolicy.rs"]
mod netpolicy;
#[path = "e2e/network.rs"]
mod network;
#[path = "e2e/oci.rs"]
mod oci;
#[path = "e2e/ops.rs"]
mod ops;
#[path = "e2e/parity.rs"]
mod parity;
#[path = "e2e/provision.rs"]
mod provision;
#[path = "e2e/service.rs"]
mod service;
#[path = "e2e/snapshot.rs"]
mod snapshot;
#[path = "e2e/transport.rs"]
mod transport;
#[path = "e2e/watchdog.rs"]
mod watchdog;

// ---------------------------------------------------------------------------
// Interactive terminals, files, secrets, agent-facing commands.

/// A pseudo-terminal the test drives like a user: the CLI runs with the
/// slave as its controlling terminal and stdio; the test writes keys to the
/// master and reads the screen from it.
struct Pty {
    master: std::fs::File,
    slave: std::fs::File,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Pty {
    fn new(rows: u16, cols: u16) -> Pty {
        use std::os::fd::FromRawFd;
        let (mut m, mut s) = (0, 0);
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: openpty writes two descriptors into the locals; the name
        // and termios pointers may be null; `ws` is a live local.
        let rc =
            unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
        assert_eq!(rc, 0, "openpty");
        // SAFETY: openpty just returned these descriptors; we own them.
        let (master, slave) =
            unsafe { (std::fs::File::from_raw_fd(m), std::fs::File::from_raw_fd(s)) };
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (mut rd, sc) = (master.try_clone().expect("clone master"), screen.clone());
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = rd.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sc.lock().expect("screen").extend_from_slice(&buf[..n]);
            }
        });
        Pty {
            master,
            slave,
            screen,
        }
    }

    /// Start `machinen ARGS` on this terminal (its own session, the slave as
    /// its controlling terminal).
    fn spawn(&self, env: &Env, args: &[&str]) -> std::process::Child {
        use std::os::unix::process::CommandExt;
        let mut c = env.cmd(args);
        c.stdin(self.slave.try_clone().expect("slave"))
            .stdout(self.slave.try_clone().expect("slave"))
            .stderr(self.slave.try_clone().expect("slave"));
        // SAFETY: setsid and ioctl are async-signal-safe; nothing is allocated.
        unsafe {
            c.pre_exec(|| {
                if libc::setsid() == -1 || libc::ioctl(0, libc::TIOCSCTTY, 0) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        c.spawn().expect("spawn on pty")
    }

    fn keys(&self, bytes: &[u8]) {
        (&self.master).write_all(bytes).expect("write keys");
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().expect("screen")).into_owned()
    }

    /// Wait until the screen shows `pat` `n` times in all.
    fn wait_for_n(&self, pat: &str, n: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.screen().matches(pat).count() < n {
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {pat:?} x{n}; screen:\n{}",
                self.screen()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_for(&self, pat: &str, timeout: Duration) {
        self.wait_for_n(pat, 1, timeout)
    }

    fn resize(&self, rows: u16, cols: u16) {
        use std::os::fd::AsRawFd;
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live local.
        let rc = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
        assert_eq!(rc, 0, "resize");
    }

    /// The slave's local flags (to see raw mode come and go).
    fn lflags(&self) -> libc::tcflag_t {
        use std::os::fd::AsRawFd;
        // SAFETY: tcgetattr fills a zeroed termios, a plain C struct.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            assert_eq!(libc::tcgetattr(self.slave.as_raw_fd(), &mut t), 0);
            t.c_lflag
        }
    }
}

fn wait_child(child: &mut std::process::Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("child did not exit in time");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn tty_exec_resizes_interrupts_and_exits_then_mux_attaches_detaches_and_replays() {
    let env = Env::new();
    env.json(&["boot", "--name", "tty", "--detached", "--json"]);

    // exec --tty: the size at start, a resize, Ctrl-C, the exit code.
    let pty = Pty::new(30, 100);
    let cooked = pty.lflags();
    assert!(cooked & libc::ICANON != 0 && cooked & libc::ECHO != 0);
    // Short sleeps: a Ctrl-C that lands between READY2 and the fork of a
    // sleep leaves the trap pending until that sleep ends.
    let script = "stty size; echo READY1; read x; stty size; trap 'echo INTERRUPTED; exit 42' INT; echo READY2; i=0; while [ $i -lt 60 ]; do sleep 1; i=$((i+1)); done; echo NOT-INTERRUPTED";
    let mut child = pty.spawn(&env, &["exec", "--tty", "tty", "--", "sh", "-c", script]);
    pty.wait_for("READY1", Duration::from_secs(60));
    assert!(
        pty.screen().contains("30 100"),
        "initial size: {}",
        pty.screen()
    );
    assert_eq!(
        pty.lflags() & (libc::ICANON | libc::ECHO),
        0,
        "the host terminal is raw while the session runs"
    );
    pty.resize(50, 132);
    std::thread::sleep(Duration::from_millis(500));
    pty.keys(b"go\r");
    pty.wait_for("READY2", Duration::from_secs(30));
    assert!(
        pty.screen().contains("50 132"),
        "size after resize: {}",
        pty.screen()
    );
    pty.keys(b"\x03");
    pty.wait_for("INTERRUPTED", Duration::from_secs(30));
    let st = wait_child(&mut child, Duration::from_secs(30));
    assert_eq!(
        st.code(),
        Some(42),
        "exit code of the guest command; screen:\n{}",
        pty.screen()
    );
    assert!(!pty.screen().contains("NOT-INTERRUPTED"));
    assert_eq!(pty.lflags(), cooked, "terminal settings restored");

    // The multiplexer: list, attach, run something, detach, re-attach with replay.
    let pty = Pty::new(24, 80);
    let mut mux = pty.spawn(&env, &["mux"]);
    pty.wait_for("mux> ", Duration::from_secs(10));
    pty.keys(b"/ls\n");
    pty.wait_for_n("mux> ", 2, Duration::from_secs(10));
    assert!(pty.screen().contains(" tty"), "{}", pty.screen());
    pty.keys(b"/attach tty\n");
    pty.wait_for("attached to tty", Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(2));
    pty.keys(b"echo $((6*7))MARK\r");
    pty.wait_for("42MARK", Duration::from_secs(30));
    pty.keys(b"\x1d\x1d");
    pty.wait_for("detached from tty", Duration::from_secs(10));
    assert!(
        pty.lflags() & libc::ICANON != 0,
        "cooked again after detaching"
    );
    pty.keys(b"/ls\n");
    pty.wait_for("* ", Duration::from_secs(10));
    let before = pty.screen().len();
    pty.keys(b"/attach tty\n");
    pty.wait_for_n("attached to tty", 2, Duration::from_secs(30));
    pty.wait_for_n("42MARK", 2, Duration::from_secs(10));
    assert!(
        pty.screen()[before..].contains("42MARK"),
        "scrollback replayed on re-attach"
    );
    pty.keys(b"exit\r");
    pty.wait_for("shell exited with 0", Duration::from_secs(30));
    pty.keys(b"/quit\n");
    let st = wait_child(&mut mux, Duration::from_secs(20));
    assert_eq!(st.code(), Some(0));
    // Detaching never stopped the VM.
    assert_eq!(
        env.run_ok(&["exec", "tty", "--", "echo", "alive"]).trim(),
        "alive"
    );
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

#[test]
fn cp_round_trips_50_mib_both_ways_and_repl_and_attach_tail_work() {
    use std::os::unix::fs::PermissionsExt;
    let env = Env::new();
    env.json(&["boot", "--name", "files", "--detached", "--json"]);
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("big.bin");
    let data = pseudo_random(
        50 * 1024 * 1024,
        0x1234_5678_9abc_def1 ^ std::process::id() as u64,
    );
    std::fs::write(&src, &data).expect("write");
    std::fs::set_permissions(&src, std::fs::Permissions::from_mode(0o750)).expect("chmod");
    let want = sha256_hex(&data);

    // In: parents created, mode kept, contents intact.
    let v = env.json(&[
        "cp",
        "--json",
        src.to_str().expect("utf8"),
        "files:/data/new/dir/big.bin",
    ]);
    assert_eq!(v["bytes"], 50 * 1024 * 1024);
    let guest = env.run_ok(&[
        "exec",
        "files",
        "--",
        "sh",
        "-c",
        "sha256sum /data/new/dir/big.bin; stat -c %a /data/new/dir/big.bin",
    ]);
    assert!(guest.contains(&want), "guest sha256: {guest}");
    assert!(
        guest.lines().any(|l| l.trim() == "750"),
        "mode kept: {guest}"
    );

    // Out: into a new host directory (parents created), mode kept.
    let back = dir.path().join("out/sub/big.bin");
    env.run_ok(&[
        "cp",
        "files:/data/new/dir/big.bin",
        back.to_str().expect("utf8"),
    ]);
    let got = std::fs::read(&back).expect("read back");
    assert_eq!(got.len(), data.len());
    assert_eq!(sha256_hex(&got), want);
    assert_eq!(
        std::fs::metadata(&back).expect("meta").permissions().mode() & 0o7777,
        0o750
    );

    // stdin/stdout and append.
    let mut c = env
        .cmd(&["cp", "-", "files:/tmp/greeting"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("cp -");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(b"hello ")
        .expect("write");
    assert!(c.wait().expect("wait").success());
    let mut c = env
        .cmd(&["cp", "--append", "-", "files:/tmp/greeting"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("cp -");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(b"world")
        .expect("write");
    assert!(c.wait().expect("wait").success());
    assert_eq!(
        env.run_ok(&["cp", "files:/tmp/greeting", "-"]),
        "hello world"
    );

    // Errors name the path and the reason.
    let out = env.run(&[
        "cp",
        "files:/no/such/file",
        dir.path().join("x").to_str().expect("utf8"),
    ]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("FILES_NOT_FOUND") && err.contains("/no/such/file"),
        "{err}"
    );
    let out = env.run(&["cp", src.to_str().expect("utf8"), "files:/data"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("FILES_IS_DIRECTORY"));
    assert!(!dir.path().join("x").exists());

    // repl: one command per line, state does not carry over, piped input.
    let mut c = env
        .cmd(&["repl", "files"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("repl");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(b"cd /tmp && pwd\npwd\necho $((1+2))\nexit 3\n")
        .expect("write");
    let out = c.wait_with_output().expect("repl");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "/tmp\n/\n3\n");
    assert_eq!(out.status.code(), Some(3), "the last line's exit code");

    // attach with --tail and --shell, without a terminal.
    let out = env.run(&[
        "attach",
        "files",
        "--tail",
        "3",
        "--shell",
        "echo hi-from-attach; exit 5",
    ]);
    assert_eq!(out.status.code(), Some(5));
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(s.contains("hi-from-attach"), "{s}");
}

#[test]
fn secrets_reach_the_guest_only() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let value = format!("s3cr3t-{:x}-{nanos:x}", std::process::id());
    let file_value = format!("file-{value}");
    let f = dir.path().join("token");
    std::fs::write(&f, &file_value).expect("write");
    let token = format!("API_TOKEN={value}");
    let from_file = format!("FROM_FILE={}", f.display());
    let info = env.json(&[
        "boot",
        "--name",
        "sec",
        "--detached",
        "--json",
        "--secret",
        &token,
        "--secret-file",
        &from_file,
    ]);
    assert!(!info.to_string().contains(&value));

    let out = env.run_ok(&["exec", "sec", "--", "sh", "-c", "cat /run/machinen/secrets/API_TOKEN; echo; cat /run/machinen/secrets/FROM_FILE; echo; stat -c %a /run/machinen/secrets/API_TOKEN; grep ' /run/machinen/secrets ' /proc/mounts; sync"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], value);
    assert_eq!(lines[1], file_value);
    assert_eq!(lines[2], "400");
    assert!(lines[3].contains("tmpfs"), "{out}");
    // A transient program reads it.
    env.run_ok(&[
        "exec",
        "sec",
        "--",
        "sh",
        "-c",
        "cat /run/machinen/secrets/API_TOKEN > /dev/null",
    ]);

    // Nowhere on the host side: ls, registry files (meta, spec, logs), the disk.
    let ls = env.run_ok(&["ls", "--json"]);
    assert!(!ls.contains(&value));
    for d in env.vm_dirs() {
        for e in std::fs::read_dir(&d).expect("ls dir").flatten() {
            let p = e.path();
            if !p.is_file() {
                continue;
            }
            let bytes = std::fs::read(&p).unwrap_or_default();
            let hay = bytes.windows(value.len()).any(|w| w == value.as_bytes());
            assert!(!hay, "the secret is in {}", p.display());
        }
    }
    // Bad names are refused before booting; the value is never echoed.
    let out = env.run(&["boot", "--secret", "../x=hunter2", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("SECRETS_INVALID") && !err.contains("hunter2"),
        "{err}"
    );

    // A bundle taken after the read carries no secret (when snapshots exist).
    let snap_help = env.run(&["snapshot", "--help"]);
    if snap_help.status.success()
        && String::from_utf8_lossy(&snap_help.stdout).contains("--keep-alive")
    {
        let bundle = dir.path().join("sec.snap");
        let out = env.run(&[
            "snapshot",
            "sec",
            bundle.to_str().expect("utf8"),
            "--keep-alive",
        ]);
        if out.status.success() {
            let mut stack = vec![bundle.clone()];
            while let Some(p) = stack.pop() {
                if p.is_dir() {
                    stack.extend(
                        std::fs::read_dir(&p)
                            .expect("ls")
                            .flatten()
                            .map(|e| e.path()),
                    );
                    continue;
                }
                let bytes = std::fs::read(&p).unwrap_or_default();
                assert!(
                    !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                    "the secret is in {}",
                    p.display()
                );
            }
            let gone = env.run(&[
                "exec",
                "sec",
                "--",
                "test",
                "-e",
                "/run/machinen/secrets/API_TOKEN",
            ]);
            assert_eq!(
                gone.status.code(),
                Some(1),
                "secrets are wiped before a snapshot"
            );
        }
    }
}

#[test]
fn agent_context_parses_and_matches_help() {
    let env = Env::new();
    let v = env.json(&["agent-context"]);
    assert_eq!(v["schema"], "machinen.agent-context");
    assert_eq!(v["schema_version"], 1);
    let cmds = v["commands"].as_array().expect("commands");
    let top = env.run_ok(&["--help"]);
    for name in [
        "boot",
        "exec",
        "ls",
        "stop",
        "gc",
        "install",
        "cp",
        "attach",
        "repl",
        "mux",
        "agent-context",
        "completion",
    ] {
        assert!(
            cmds.iter().any(|c| c["name"] == name),
            "{name} missing from agent-context"
        );
    }
    for c in cmds {
        let name = c["name"].as_str().expect("name");
        assert!(top.contains(name), "{name} not in --help");
        let help = env.run_ok(&[name, "--help"]);
        for a in c["args"].as_array().expect("args") {
            if let Some(long) = a["long"].as_str() {
                assert!(
                    help.contains(long),
                    "{name}: {long} in agent-context but not in --help"
                );
            }
        }
    }
    assert!(v["exit_codes"]["codes"]
        .as_array()
        .expect("codes")
        .iter()
        .any(|c| c["code"] == "REGISTRY_NOT_FOUND" && c["exit_code"] == 125));
    // The environment list of the binary's agent-context is its --help's.
    let vars = v["environment"].as_array().expect("environment");
    assert!(vars.iter().any(|e| e["name"] == "MACHINEN_KERNEL_ARGS"));
    for e in vars {
        let name = e["name"].as_str().expect("name");
        assert!(
            top.contains(name),
            "{name} in agent-context but not in --help"
        );
        assert!(e["default"].is_string() && e["meaning"].is_string());
    }
    let bash = env.run_ok(&["completion", "bash"]);
    assert!(bash.contains("__vm-names") && bash.contains("complete -F"));
}

#[test]
fn foreground_boot_uses_a_pty_on_a_terminal() {
    let env = Env::new();
    let pty = Pty::new(24, 80);
    let cooked = pty.lflags();
    let mut child = pty.spawn(&env, &["boot", "--", "sh", "-c", "tty; stty size; exit 7"]);
    let st = wait_child(&mut child, Duration::from_secs(180));
    assert_eq!(st.code(), Some(7), "screen:\n{}", pty.screen());
    pty.wait_for("/dev/pts/", Duration::from_secs(5));
    pty.wait_for("24 80", Duration::from_secs(5));
    assert_eq!(pty.lflags(), cooked, "terminal settings restored");
}

/// A RAM file whose VM was killed along with its supervisor, from a
/// registry that is gone too, is gc's once no process uses it.
#[test]
fn gc_removes_orphaned_ram_files_and_nothing_in_use() {
    let env = Env::new();
    let ram_dir = tempfile::tempdir().expect("tmp");
    let orphan = ram_dir.path().join("machinen-0123456789ab.ram");
    let held = ram_dir.path().join("machinen-ba9876543210.ram");
    let young = ram_dir.path().join("machinen-aaaaaaaaaaaa.ram");
    let old = std::time::SystemTime::now() - Duration::from_secs(3600);
    for p in [&orphan, &held, &young] {
        std::fs::write(p, vec![7u8; 1 << 20]).expect("write");
    }
    for p in [&orphan, &held] {
        std::fs::File::options()
            .write(true)
            .open(p)
            .and_then(|f| f.set_modified(old))
            .expect("age");
    }
    let _in_use = std::fs::File::open(&held).expect("open");
    let gc = |dry: bool| {
        let mut args = vec!["gc", "--json"];
        if dry {
            args.push("--dry-run");
        }
        let out = env
            .cmd(&args)
            .env("MACHINEN_RAM_DIR", ram_dir.path())
            .output()
            .expect("gc");
        assert!(out.status.success());
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    let dry = gc(true);
    assert_eq!(dry["removed"].as_array().map(Vec::len), Some(1), "{dry}");
    assert_eq!(dry["removed"][0]["id"], "0123456789ab");
    assert!(orphan.exists(), "a dry run removes nothing");
    let done = gc(false);
    assert_eq!(
        done["removed"][0]["bytes"].as_u64().map(|b| b >= 1 << 20),
        Some(true)
    );
    assert!(!orphan.exists(), "the orphan is gone");
    assert!(
        held.exists() && young.exists(),
        "a file in use or new stays"
    );
}

/// `--memory 2048` boots whole: QEMU 10.0 damages the initramfs at exactly
/// 2 GiB, so the guest gets 2049 MiB (vm::bootable_memory_mib).
#[test]
fn a_two_gib_guest_boots_with_every_module() {
    let env = Env::new();
    let v = env.json(&[
        "boot",
        "--name",
        "two",
        "--memory",
        "2048",
        "--detached",
        "--json",
    ]);
    assert_eq!(v["memory_mib"], 2049);
    let console =
        std::fs::read_to_string(v["console_log"].as_str().expect("console")).expect("read");
    assert!(
        !console.contains("machinen-agent: error"),
        "the agent reported an error at boot:\n{console}"
    );
    let total = env.run_ok(&["exec", "two", "--", "grep", "MemTotal", "/proc/meminfo"]);
    let kib: u64 = total
        .split_whitespace()
        .nth(1)
        .and_then(|k| k.parse().ok())
        .expect("kB");
    assert!(kib > 1900 << 10, "{total}");
    env.run_ok(&["stop", "two"]);
}
