//! What clients and guests can do to a running VM's operations: a killed
//! exec client, garbage on the agent channel, files too large for the host.

use std::io::{BufRead, Write};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use super::{wait_until, Env};

/// Command lines of the guest's processes, one per line.
fn guest_cmdlines(env: &Env, vm: &str) -> String {
    let scan = r#"for p in /proc/[0-9]*; do tr '\0' ' ' < $p/cmdline 2>/dev/null; echo; done"#;
    env.run_ok(&["exec", vm, "--", "sh", "-c", scan])
}

fn runs(cmdlines: &str, prefix: &str) -> bool {
    cmdlines.lines().any(|l| l.trim_end() == prefix)
}

fn err_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A guest program (root, as any exec) takes a copy of the agent's port
/// descriptor from PID 1 with pidfd_getfd(2) (the port itself is busy: a
/// second open fails) and writes bytes that are not the protocol, once or
/// for a while.
const INJECT: &str = r#"
opendir(D, "/proc/1/fd") or die "opendir: $!";
my $n;
for (readdir D) { my $l = readlink("/proc/1/fd/$_"); if (defined $l && $l =~ m{^/dev/vport}) { $n = $_; last } }
die "no port descriptor in PID 1" unless defined $n;
my $pidfd = syscall(434, 1, 0); die "pidfd_open: $!" if $pidfd < 0;
my $fd = syscall(438, $pidfd, $n + 0, 0); die "pidfd_getfd: $!" if $fd < 0;
open(my $port, ">&=", $fd) or die "fdopen: $!";
my ($delay, $secs) = @ARGV;
sleep($delay);
my $end = time + $secs;
do { syswrite($port, "\xff" x 64); select(undef, undef, undef, 0.05) } while (time < $end);
open(my $done, ">", "/tmp/inject.done") or die "done: $!";
"#;

/// Whether process `pid` has a file in `dir` open (the copy being
/// written: unnamed, so no directory listing shows it).
fn writes_in(pid: u32, dir: &Path) -> bool {
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|t| t.starts_with(dir)))
}

fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .expect("ls")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn killed_exec_clients_hang_up_garbage_on_the_agent_channel_is_survived_and_host_writes_of_guest_data_are_bounded(
) {
    let env = Env::new();
    let boot = env
        .cmd(&["boot", "--name", "ops", "--detached"])
        .env("MACHINEN_CONSOLE_LOG_MAX", "256K")
        .output()
        .expect("boot");
    assert!(boot.status.success(), "{}", err_text(&boot));

    // 0. The guest's console output is bounded on the host: 600 kB written
    // to the serial console leave a log under its limit (plus what arrives
    // between two checks, a second apart), ending with the newest bytes.
    env.run_ok(&[
        "exec",
        "ops",
        "--",
        "sh",
        "-c",
        "head -c 600000 /dev/zero | tr '\\0' x > /dev/ttyS0; echo console-end > /dev/ttyS0",
    ]);
    let console = env.vm_dirs()[0].join("console.log");
    let vmm_log = env.vm_dirs()[0].join("vmm.log");
    let logged = |what: &str| std::fs::read_to_string(&vmm_log).is_ok_and(|l| l.contains(what));
    wait_until("the console log to be cut", Duration::from_secs(10), || {
        logged("console log over")
    });
    std::thread::sleep(Duration::from_millis(1500));
    let text = std::fs::read(&console).expect("console.log");
    assert!(
        text.len() < 400 << 10,
        "console.log has {} bytes",
        text.len()
    );
    assert!(
        String::from_utf8_lossy(&text).contains("console-end"),
        "the newest output is kept"
    );

    // 1. Killing an exec client hangs its command up. Its stdin is empty
    // (EOF at once), which must not count as a hang-up; the nohup'd
    // background job ignores SIGHUP and stays, as after a terminal hang-up.
    let mut client = env
        .cmd(&[
            "exec",
            "ops",
            "--",
            "sh",
            "-c",
            "nohup sleep 3002 >/dev/null 2>&1 & echo $$ > /tmp/hup.pid; exec sleep 3001",
        ])
        .stdin(Stdio::null())
        .spawn()
        .expect("exec client");
    wait_until(
        "the command to run in the guest",
        Duration::from_secs(60),
        || {
            let ps = guest_cmdlines(&env, "ops");
            runs(&ps, "sleep 3001") && runs(&ps, "sleep 3002")
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        runs(&guest_cmdlines(&env, "ops"), "sleep 3001"),
        "stdin EOF is not a hang-up"
    );
    // A watcher in the guest reports how long the command still ran.
    let watch = "p=$(cat /tmp/hup.pid); t0=$(date +%s%N); i=0; echo watching; \
        while [ -d /proc/$p ] && [ $i -lt 1500 ]; do i=$((i+1)); sleep 0.02; done; \
        if [ -d /proc/$p ]; then echo still running; else echo $(( ($(date +%s%N) - t0) / 1000000 )); fi";
    let mut watcher = env
        .cmd(&["exec", "ops", "--", "sh", "-c", watch])
        .stdout(Stdio::piped())
        .spawn()
        .expect("watcher");
    let mut lines = std::io::BufReader::new(watcher.stdout.take().expect("stdout")).lines();
    assert_eq!(lines.next().expect("a line").expect("read"), "watching");
    client.kill().expect("kill -9 the client");
    let _ = client.wait();
    let result = lines.next().expect("a line").expect("read");
    let _ = watcher.wait();
    let ms: u64 = result
        .parse()
        .unwrap_or_else(|_| panic!("the hung-up command did not end: {result}"));
    eprintln!("the guest command ended {ms} ms after the watcher started (the client was killed right after)");
    assert!(
        runs(&guest_cmdlines(&env, "ops"), "sleep 3002"),
        "a nohup'd job survives the hang-up"
    );
    // Piped stdin still reaches its end (StdinEof), and the command exits.
    let mut c = env
        .cmd(&["exec", "ops", "--", "sha256sum"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("sha256sum");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(b"abc")
        .expect("write");
    let out = c.wait_with_output().expect("wait");
    assert!(String::from_utf8_lossy(&out.stdout)
        .starts_with("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"));

    // 2. Garbage on the agent channel: the session fails, the supervisor
    // starts a new one, exec works again.
    let mut c = env
        .cmd(&["cp", "-", "ops:/root/inject.pl"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("cp");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(INJECT.as_bytes())
        .expect("write");
    assert!(c.wait().expect("cp").success());
    let out = env.run(&["exec", "ops", "--", "perl", "/root/inject.pl", "0", "0"]);
    assert_eq!(
        out.status.code(),
        Some(125),
        "the injecting exec loses its session: {}",
        err_text(&out)
    );
    wait_until(
        "the supervisor to see the session fail",
        Duration::from_secs(10),
        || logged("agent session failed"),
    );
    wait_until("exec to work again", Duration::from_secs(60), || {
        env.cmd(&["exec", "ops", "--", "true"])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    assert_eq!(env.json(&["ls", "--json"])[0]["state"], "running");
    assert!(logged("agent session re-established"));

    // A guest that keeps breaking its sessions (for 40 s) is reported
    // unhealthy, with the reason; once it stops, the VM recovers.
    env.run_ok(&[
        "exec",
        "ops",
        "--",
        "sh",
        "-c",
        "rm -f /tmp/inject.done; nohup perl /root/inject.pl 1 40 >/dev/null 2>&1 &",
    ]);
    let spewing = Instant::now();
    wait_until(
        "ls to report the VM unhealthy",
        Duration::from_secs(90),
        || env.json_quiet(&["ls", "--json"])[0]["state"] == "unhealthy",
    );
    eprintln!(
        "unhealthy after {} ms of garbage",
        spewing.elapsed().as_millis()
    );
    let ls = env.json(&["ls", "--json"]);
    assert!(
        ls[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("agent session")),
        "{ls}"
    );
    let table = env.run_ok(&["ls"]);
    assert!(
        table.contains("unhealthy") && table.contains("ops is unhealthy: "),
        "{table}"
    );
    let out = env.run(&["exec", "ops", "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err_text(&out).contains("EXEC_VSOCK_UNAVAILABLE") && err_text(&out).contains("unhealthy"),
        "{}",
        err_text(&out)
    );
    // The injector's 40 s are the guest's (slow under TCG): a session made
    // while it still writes may fail again, so recovery counts from the
    // first exec that sees it finished.
    wait_until(
        "the VM to recover once the garbage stopped",
        Duration::from_secs(150),
        || {
            env.cmd(&["exec", "ops", "--", "test", "-e", "/tmp/inject.done"])
                .output()
                .is_ok_and(|o| o.status.success())
        },
    );
    eprintln!(
        "running again {} ms after the garbage started",
        spewing.elapsed().as_millis()
    );
    // The session is in place a moment before the state says so.
    wait_until(
        "ls to report the VM running",
        Duration::from_secs(10),
        || env.json_quiet(&["ls", "--json"])[0]["state"] == "running",
    );
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls[0]["state"], "running");
    assert!(ls[0].get("reason").is_none(), "{ls}");

    // 3. Copies out of the VM are bounded, and leave nothing behind.
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    let to = |name: &str| d.join(name).to_string_lossy().into_owned();
    env.run_ok(&[
        "exec",
        "ops",
        "--",
        "sh",
        "-c",
        "truncate -s 1T /tmp/huge && truncate -s 512M /tmp/half",
    ]);
    // Announced as 1 TiB (sparse): refused before any byte is written.
    let out = env.run(&["cp", "ops:/tmp/huge", &to("huge")]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err_text(&out).contains("FILES_TOO_LARGE") && err_text(&out).contains("4.0 GiB"),
        "{}",
        err_text(&out)
    );
    // Announced as 0 bytes (a /proc file) and then more: refused on the way.
    let out = env.run(&["cp", "--max-size", "1M", "ops:/proc/kallsyms", &to("k")]);
    assert!(
        err_text(&out).contains("FILES_TOO_LARGE") && err_text(&out).contains("sent more than"),
        "{}",
        err_text(&out)
    );
    let out = env.run(&["cp", "--max-size", "1M", "ops:/proc/kallsyms", "-"]);
    assert!(
        err_text(&out).contains("FILES_TOO_LARGE"),
        "{}",
        err_text(&out)
    );
    // The host filesystem keeps its reserve.
    let out = env
        .cmd(&["cp", "ops:/etc/hostname", &to("h")])
        .env("MACHINEN_DISK_RESERVE", "100%")
        .output()
        .expect("cp");
    assert!(
        err_text(&out).contains("FILES_HOST_DISK_RESERVE"),
        "{}",
        err_text(&out)
    );
    assert!(
        entries(d).is_empty(),
        "refused copies leave nothing: {:?}",
        entries(d)
    );
    // Interrupted (SIGINT, then SIGKILL) in the middle: nothing left.
    for (sig, code) in [(libc::SIGINT, Some(130)), (libc::SIGKILL, None)] {
        let c = env
            .cmd(&["cp", "ops:/tmp/half", &to("half")])
            .stderr(Stdio::piped())
            .spawn()
            .expect("cp");
        let pid = c.id();
        wait_until("the copy to be under way", Duration::from_secs(60), || {
            writes_in(pid, d)
        });
        // SAFETY: kill(2) on the pid of our own child, which we have not
        // waited for, so it cannot have been reused.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
        let out = c.wait_with_output().expect("wait");
        assert_eq!(out.status.code(), code, "{}", err_text(&out));
        if sig == libc::SIGINT {
            assert!(err_text(&out).contains("INTERRUPTED"), "{}", err_text(&out));
        }
        assert!(entries(d).is_empty(), "signal {sig} left {:?}", entries(d));
    }
    // And a copy that fits still lands, whole.
    env.run_ok(&[
        "cp",
        "--max-size",
        "10M",
        "ops:/etc/hostname",
        &to("hostname"),
    ]);
    assert_eq!(entries(d), vec!["hostname".to_string()]);
}
