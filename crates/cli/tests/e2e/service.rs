//! Service VMs on real VMs: a detached VM's main command, its logs across
//! a snapshot and restore, `wait` and the exit status.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;

use super::provision::Forget;
use super::{pid_alive, wait_until, Env};

/// A small HTTP server: logs each request line to stdout (its start to
/// stderr), answers with the request's number (kept in memory), and exits
/// with status 7 after answering `GET /quit`.
const SERVER: &str = r#"
use IO::Socket::INET;
$| = 1;
my $s = IO::Socket::INET->new(LocalAddr => "0.0.0.0", LocalPort => 8080, Listen => 16, ReuseAddr => 1)
  or die "listen: $!\n";
print STDERR "listening on 8080\n";
my $n = 0;
while (my $c = $s->accept) {
    my $req = <$c> // "";
    while (my $l = <$c>) { last if $l =~ /^\r?\n$/ }
    $req =~ s/\r?\n$//;
    $n++;
    print "request $n: $req\n";
    print $c "HTTP/1.0 200 OK\r\n\r\n$n\n";
    close $c;
    exit 7 if $req =~ m{^GET /quit};
}
"#;

use super::free_port;

/// GET `path` on a forwarded port: the server's answer (the request's
/// number). Retried while the guest server is not listening yet.
fn get(port: u16, path: &str) -> u64 {
    let mut last = String::new();
    for _ in 0..100 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let _ = s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes());
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if let Some(n) = body
                .split("\r\n\r\n")
                .nth(1)
                .and_then(|b| b.trim().parse().ok())
            {
                return n;
            }
            last = body;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    panic!("no answer from port {port}{path}: {last:?}");
}

fn logs_until(env: &Env, vm: &str, want: &str) -> (String, String) {
    let mut got = (String::new(), String::new());
    wait_until(
        &format!("{want:?} in `logs {vm}`"),
        Duration::from_secs(60),
        || {
            let out = env.run(&["logs", vm]);
            got = (
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
            got.0.contains(want)
        },
    );
    got
}

#[test]
fn a_detached_vm_runs_its_main_command_logs_it_across_a_restore_and_ends_with_its_status() {
    let env = Env::new();
    let work = tempfile::tempdir().expect("tmp");
    let (p1, p2) = (free_port(), free_port());
    // The server baked into an image as its command, as a service is
    // shipped; a detached boot of the image runs it as the main command.
    let server = work.path().join("server.pl");
    std::fs::write(&server, SERVER).expect("write");
    let image = work.path().join("app.tar.gz");
    let _forget = Forget(vec![image.clone()]);
    env.run_ok(&[
        "provision",
        "--copy",
        &format!("{}:/srv/server.pl", server.display()),
        "--cmd",
        "perl /srv/server.pl",
        "-o",
        image.to_str().expect("utf8"),
    ]);
    let info = env.json(&[
        "boot",
        image.to_str().expect("utf8"),
        "--name",
        "svc",
        "--memory",
        "512",
        "--detached",
        "--json",
        "-p",
        &format!("{p1}:8080"),
    ]);
    assert_eq!(info["main"]["argv"][2], "perl /srv/server.pl", "{info}");

    // The main command serves; its stdout and stderr are kept apart.
    assert_eq!(get(p1, "/hello"), 1);
    let (out, err) = logs_until(&env, "svc", "request 1: GET /hello HTTP/1.0");
    assert!(err.contains("listening on 8080"), "stderr: {err}");
    assert!(!out.contains("listening"), "stderr went to stdout: {out}");
    let json = env.run_ok(&["logs", "svc", "--json"]);
    let streams: Vec<serde_json::Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).expect("record"))
        .collect();
    assert!(
        streams.iter().any(|r| r["stream"] == "stderr"
            && r["data"].as_str().is_some_and(|d| d.contains("listening")))
            && streams.iter().any(|r| r["stream"] == "stdout"),
        "{json}"
    );

    // Snapshot (the source stops) and restore: the process runs on, with
    // its memory (the count continues), and the log continues too.
    let bundle = work.path().join("svc.snap");
    env.run_ok(&["snapshot", "svc", bundle.to_str().expect("utf8")]);
    env.run_ok(&[
        "restore",
        bundle.to_str().expect("utf8"),
        "--name",
        "svc2",
        "-p",
        &format!("{p2}:8080"),
        "--detached",
    ]);
    let restored = env.run_ok(&["logs", "svc2"]);
    assert!(
        restored.contains("request 1: GET /hello"),
        "history: {restored}"
    );

    // `logs -f` on the restored VM shows the new requests as they come.
    // `--tail 1` first prints the last request from before the snapshot:
    // once it is read the follower is in place, and the next request
    // cannot slip in before it.
    let mut follow = env
        .cmd(&["logs", "-f", "--tail", "1", "svc2"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("logs -f");
    let (tx, rx) = mpsc::channel();
    let stdout = follow.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("`logs -f --tail 1` showed no history within 60 s");
    assert_eq!(line, "request 1: GET /hello HTTP/1.0");
    assert_eq!(get(p2, "/after-restore"), 2, "the count continues");
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("`logs -f` showed no new line within 60 s");
    assert_eq!(line, "request 2: GET /after-restore HTTP/1.0");

    // /quit: the server exits 7; `wait` exits 7, the VM is gone, and
    // `logs -f` ends by itself.
    assert_eq!(get(p2, "/quit"), 3);
    let waited = env.run(&["wait", "svc2"]);
    assert_eq!(waited.status.code(), Some(7), "wait's status");
    let line = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("`logs -f` showed the last request");
    assert_eq!(line, "request 3: GET /quit HTTP/1.0");
    let mut ended = false;
    wait_until(
        "`logs -f` to end with the VM",
        Duration::from_secs(60),
        || {
            ended = follow.try_wait().expect("try_wait").is_some();
            ended
        },
    );
    reader.join().expect("reader");
    let ls = env.json(&["ls", "--json"]);
    let svc2 = ls
        .as_array()
        .expect("array")
        .iter()
        .find(|v| v["name"] == "svc2")
        .cloned()
        .expect("svc2 is listed as exited");
    // `wait` returns once the VM is gone: its entry says how it ended.
    assert_eq!(svc2["state"], "exited", "{svc2}");
    assert_eq!(svc2["main"]["exit"]["code"], 7, "{svc2}");
    let pid = svc2["pid"].as_u64().expect("pid");
    wait_until("svc2's supervisor to exit", Duration::from_secs(30), || {
        !pid_alive(pid)
    });
    // A VM that already ended is answered at once, with the same status.
    let out = env.run(&["wait", "svc2", "--json"]);
    assert_eq!(out.status.code(), Some(7));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("wait --json");
    assert_eq!(json["reason"], "exited", "{json}");
    assert_eq!(json["status"]["code"], 7, "{json}");
    assert_eq!(json["exit_code"], 7, "{json}");

    // With --keep-alive-on-exit the VM stays up and `ls` says how its
    // main command ended. A VM given secrets starts its main command once
    // they are installed (the library sends them after the guest is ready).
    env.run_ok(&[
        "boot",
        "--name",
        "kept",
        "--memory",
        "512",
        "--detached",
        "--keep-alive-on-exit",
        "--secret",
        "TOKEN=s3cr3t",
        "--",
        "sh",
        "-c",
        "cat /run/machinen/secrets/TOKEN; echo; echo bye; exit 7",
    ]);
    let waited = env.run(&["wait", "kept", "--timeout", "120"]);
    assert_eq!(waited.status.code(), Some(7));
    let table = env.run_ok(&["ls"]);
    let row = table
        .lines()
        .find(|l| l.contains("kept"))
        .unwrap_or_else(|| panic!("kept not listed: {table}"));
    assert!(row.contains("exited 7"), "{table}");
    assert_eq!(
        env.run_ok(&["exec", "kept", "--", "echo", "still", "up"]),
        "still up\n"
    );
    assert_eq!(logs_until(&env, "kept", "bye").0, "s3cr3t\nbye\n");
    // `kill` needs a running main command and a real signal.
    let out = env.run(&["kill", "kept"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MAIN_NOT_RUNNING"));
    let out = env.run(&["kill", "-s", "BOGUS", "kept"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("SIGNAL_INVALID"));
    env.run_ok(&["stop", "kept"]);

    // `kill` (SIGTERM) reaches the main command, which traps it and exits 3.
    env.run_ok(&[
        "boot",
        "--name",
        "trapper",
        "--memory",
        "512",
        "--detached",
        "--",
        "sh",
        "-c",
        "trap 'echo got-term; exit 3' TERM; echo ready; while :; do sleep 0.2; done",
    ]);
    logs_until(&env, "trapper", "ready");
    let out = env.json(&["kill", "trapper", "--json"]);
    assert_eq!(out["signal"], 15, "{out}");
    let waited = env.run(&["wait", "trapper", "--timeout", "120"]);
    assert_eq!(waited.status.code(), Some(3));
    assert!(logs_until(&env, "trapper", "got-term")
        .0
        .contains("got-term"));
}
