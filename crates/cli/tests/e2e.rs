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
}

impl Env {
    fn new() -> Env {
        // Short path: unix socket paths are limited to 107 bytes.
        let registry = tempfile::Builder::new().prefix("mn-").tempdir_in("/tmp").expect("tmp registry");
        Env { registry }
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_machinen"));
        c.args(args).env("MACHINEN_REGISTRY_DIR", self.registry.path()).env_remove("MACHINEN_LOG");
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.cmd(args).stdin(Stdio::null()).output().expect("run machinen");
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
        assert!(out.status.success(), "machinen {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8 stdout")
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let s = self.run_ok(args);
        serde_json::from_str(s.trim()).unwrap_or_else(|e| panic!("bad JSON from {args:?}: {e}: {s}"))
    }

    fn vm_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.registry.path())
            .map(|rd| rd.flatten().filter(|e| e.path().is_dir()).map(|e| e.path()).collect())
            .unwrap_or_default()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Never leave VMs behind, whatever the test did.
        for v in self.json_quiet(&["ls", "--json"]).as_array().cloned().unwrap_or_default() {
            if let Some(name) = v["name"].as_str() {
                let _ = self.cmd(&["stop", "--force", name]).output();
            }
        }
    }
}

impl Env {
    fn json_quiet(&self, args: &[&str]) -> serde_json::Value {
        self.cmd(args).output().ok().and_then(|o| serde_json::from_slice(&o.stdout).ok()).unwrap_or_default()
    }
}

fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat")).map(|s| !s.contains(") Z ")).unwrap_or(false)
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

#[test]
fn adhoc_boot_runs_the_command_and_passes_exit_codes() {
    let env = Env::new();
    let out = env.run(&["boot", "--", "sh", "-c", "uname -s; cat /etc/os-release | grep ^ID=; echo to-stderr >&2"]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("Linux\n"), "{stdout}");
    assert!(stdout.contains("ID=debian"), "{stdout}");
    assert!(!stdout.contains("to-stderr"), "stderr must not leak into stdout");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"));

    assert_eq!(env.run(&["boot", "--", "sh", "-c", "exit 3"]).status.code(), Some(3));
    assert_eq!(env.run(&["boot", "--", "sh", "-c", "kill -9 $$"]).status.code(), Some(137), "killed by SIGKILL → 128+9");
    // Nothing is left behind by foreground VMs.
    wait_until("foreground VMs to clean up", Duration::from_secs(10), || env.vm_dirs().is_empty());
}

#[test]
fn env_and_cwd_reach_the_command() {
    let env = Env::new();
    let out = env.run_ok(&[
        "boot", "--env", "GREETING=hello world", "--env", "EMPTY=", "--cwd", "/usr/share", "--", "sh", "-c",
        "echo \"$GREETING|${EMPTY-unset}|$(pwd)|$HOME\"",
    ]);
    assert_eq!(out.trim(), "hello world||/usr/share|/root");
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

    let out = env.run(&["boot", "--memory", "16", "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_MEMORY_INVALID"));

    let out = env.run(&["exec", "no-such-vm", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("REGISTRY_NOT_FOUND") && err.contains("no-such-vm"), "{err}");

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
    assert!(table.starts_with("PID") && table.contains("team/web"), "{table}");

    // The name is taken while it runs.
    let out = env.run(&["boot", "--name", "team/web", "--detached"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("REGISTRY_NAME_IN_USE"));

    // Two execs from separate processes at the same time: each records when
    // it ran (guest clock); their intervals must overlap.
    let script = "date +%s.%N; sleep 2; date +%s.%N";
    let a = env.cmd(&["exec", "team/web", "--", "sh", "-c", script]).stdout(Stdio::piped()).spawn().expect("a");
    let b = env.cmd(&["exec", &pid.to_string(), "--", "sh", "-c", script]).stdout(Stdio::piped()).spawn().expect("b");
    let (a, b) = (a.wait_with_output().expect("a"), b.wait_with_output().expect("b"));
    assert!(a.status.success() && b.status.success());
    let times = |o: &Output| -> (f64, f64) {
        let s = String::from_utf8_lossy(&o.stdout);
        let v: Vec<f64> = s.lines().map(|l| l.trim().parse().expect("time")).collect();
        (v[0], v[1])
    };
    let ((a0, a1), (b0, b1)) = (times(&a), times(&b));
    assert!(a0 < b1 && b0 < a1, "execs did not run concurrently: a={a0}..{a1} b={b0}..{b1}");

    // Large binary output streams intact (30 MiB of random bytes).
    let sum = env.run_ok(&["exec", "team/web", "--", "sh", "-c", "head -c 31457280 /dev/urandom > /tmp/big && sha256sum /tmp/big"]);
    let want = sum.split_whitespace().next().expect("sum").to_string();
    let out = env.cmd(&["exec", "team/web", "--", "cat", "/tmp/big"]).stdin(Stdio::null()).output().expect("cat");
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 31457280);
    assert_eq!(sha256_hex(&out.stdout), want);

    // Stdin is forwarded, binary-safe, until EOF.
    let input: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
    let mut child = env.cmd(&["exec", "team/web", "--", "sha256sum"]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("spawn");
    let mut stdin = child.stdin.take().expect("stdin");
    let feed = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&feed));
    let out = child.wait_with_output().expect("sha256sum");
    writer.join().expect("join").expect("write");
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).split_whitespace().next(), Some(sha256_hex(&input).as_str()));

    // --json exec captures everything.
    let out = env.run(&["exec", "team/web", "--json", "--", "sh", "-c", "echo out; echo err >&2; exit 4"]);
    assert_eq!(out.status.code(), Some(4), "--json keeps the exit code");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("exec json");
    assert_eq!((v["exit_code"].as_i64(), v["stdout"].as_str(), v["stderr"].as_str()), (Some(4), Some("out\n"), Some("err\n")));

    // The guest reaches the outside through user networking config.
    let net = env.run_ok(&["exec", "team/web", "--", "sh", "-c", "cat /sys/class/net/eth0/operstate; cat /etc/resolv.conf"]);
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
fn gc_cleans_up_after_a_killed_supervisor() {
    let env = Env::new();
    let info = env.json(&["boot", "--name", "victim", "--detached", "--json"]);
    let pid = info["pid"].as_u64().expect("pid");
    let qemu_pid = info["qemu_pid"].as_u64().expect("qemu pid");
    assert_eq!(env.vm_dirs().len(), 1);
    Command::new("kill").args(["-9", &pid.to_string()]).status().expect("kill");
    // QEMU dies with its supervisor.
    wait_until("QEMU to exit", Duration::from_secs(10), || !pid_alive(qemu_pid));
    assert_eq!(env.json(&["ls", "--json"]), serde_json::json!([]), "a dead VM is not listed");
    assert_eq!(env.vm_dirs().len(), 1, "its files are still there before gc");

    let dry = env.json(&["gc", "--dry-run", "--json"]);
    assert_eq!(dry["removed"].as_array().map(Vec::len), Some(1));
    assert_eq!(env.vm_dirs().len(), 1, "dry run removes nothing");

    let gc = env.json(&["gc", "--json"]);
    assert_eq!(gc["removed"][0]["name"], "victim");
    assert!(env.vm_dirs().is_empty());
    // The name is free again.
    let again = env.json(&["boot", "--name", "victim", "--detached", "--json"]);
    assert_eq!(again["name"], "victim");
    env.run_ok(&["stop", "--force", "victim"]);
}
