//! Port forwards, snapshot, restore and fork on real VMs.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::{pid_alive, sha256_hex, wait_until, Env};

const COUNTER: &str = include_str!("../../../../examples/counter/counter.pl");

/// A free host port (bound and released; good enough on a test machine).
use super::free_port;

/// GET / on a forwarded port; the counter's answer as a number.
fn count(port: u16) -> u64 {
    count_at("127.0.0.1", port)
}

/// GET / on `addr:port`; the counter's answer as a number.
fn count_at(addr: &str, port: u16) -> u64 {
    let mut last = String::new();
    // The forward may race the guest server's first accept right after a
    // start; retry briefly.
    for _ in 0..50 {
        if let Ok(mut s) = TcpStream::connect((addr, port)) {
            s.set_read_timeout(Some(Duration::from_secs(20)))
                .expect("timeout");
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
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
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("no count from port {port}: {last:?}");
}

/// Write a guest file through exec's stdin.
fn put(env: &Env, vm: &str, path: &str, content: &str) {
    let mut c = env
        .cmd(&["exec", vm, "--", "sh", "-c", &format!("cat > {path}")])
        .stdin(Stdio::piped())
        .spawn()
        .expect("spawn");
    c.stdin
        .take()
        .expect("stdin")
        .write_all(content.as_bytes())
        .expect("write");
    assert!(c.wait().expect("wait").success());
}

/// Boot a small detached VM running the counter on guest port 8080.
fn counter_vm(env: &Env, name: &str, host_port: u16) -> serde_json::Value {
    let info = env.json(&[
        "boot",
        "--name",
        name,
        "--memory",
        "512",
        "--detached",
        "--json",
        "-p",
        &format!("{host_port}:8080"),
    ]);
    put(env, name, "/root/counter.pl", COUNTER);
    env.run_ok(&[
        "exec",
        name,
        "--",
        "sh",
        "-c",
        "nohup perl /root/counter.pl 8080 >/dev/null 2>&1 &",
    ]);
    info
}

/// `v["phases"]` names `want` in that order, each ending no earlier than
/// the one before.
fn phases_in_order(v: &serde_json::Value, want: &[&str]) {
    let phases = v["phases"]
        .as_array()
        .unwrap_or_else(|| panic!("no phases in {v}"));
    let names: Vec<&str> = phases
        .iter()
        .map(|p| p["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, want, "{v}");
    let ends: Vec<u64> = phases
        .iter()
        .map(|p| p["at_ms"].as_u64().expect("at_ms"))
        .collect();
    assert!(
        ends.windows(2).all(|w| w[0] <= w[1]),
        "phases out of order: {v}"
    );
    assert!(
        phases.iter().all(|p| p["ms"].as_u64().is_some()),
        "a phase without a duration: {v}"
    );
}

fn bundle(env: &Env, name: &str) -> PathBuf {
    env.registry.path().join(format!("{name}.snap"))
}

#[test]
fn counter_survives_handoff_and_forks_diverge() {
    let env = Env::new();
    let (p1, p2) = (free_port(), free_port());
    let info = counter_vm(&env, "web", p1);
    assert_eq!((count(p1), count(p1)), (1, 2));
    let ls = env.run_ok(&["ls"]);
    assert!(ls.contains(&format!("127.0.0.1:{p1}->8080")), "{ls}");

    // Destructive snapshot: the source stops once the bundle is complete.
    let snap = bundle(&env, "web");
    let rep = env.json(&["snapshot", "web", snap.to_str().expect("path"), "--json"]);
    assert!(rep["bytes"].as_u64().expect("bytes") > 0);
    assert!(
        rep["disk_bytes"].as_u64().expect("disk") <= rep["bytes"].as_u64().expect("bytes") + 65536,
        "bundle stays sparse"
    );
    wait_until("source to stop", Duration::from_secs(20), || {
        !pid_alive(info["pid"].as_u64().expect("pid"))
    });
    assert_eq!(env.json(&["ls", "--json"]), serde_json::json!([]));

    // Restore: the in-memory count continues.
    let r = env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "-p",
        &format!("{p1}:8080"),
        "--detached",
        "--json",
    ]);
    let name = r["name"].as_str().expect("name").to_string();
    assert!(
        name.starts_with("web/"),
        "anonymous restores are <source>/<pid>: {name}"
    );
    assert_eq!(
        r["forked_from"].as_str(),
        Some(snap.to_str().expect("path"))
    );
    assert_eq!(count(p1), 3);

    // Fork: both continue from the same value, independently; port forwards
    // are not inherited (the fork gets its own).
    let f = env.json(&[
        "fork",
        &name,
        "--new-name",
        "web-b",
        "--detach",
        "-p",
        &format!("{p2}:8080"),
        "--json",
    ]);
    assert_eq!(f["forked_from"].as_str(), Some(name.as_str()));
    assert_eq!(f["ports"].as_array().map(Vec::len), Some(1));
    assert_eq!(count(p2), 4, "the fork starts from the source's memory");
    assert_eq!(count(p2), 5);
    assert_eq!(
        count(p1),
        4,
        "the source is unaffected by the fork's requests"
    );
    // Guest memory diverges: a file in tmpfs written in one is absent in the other.
    env.run_ok(&[
        "exec",
        "web-b",
        "--",
        "sh",
        "-c",
        "echo fork-only > /dev/shm/mark",
    ]);
    let out = env.run(&["exec", &name, "--", "cat", "/dev/shm/mark"]);
    assert!(
        !out.status.success(),
        "the source must not see the fork's writes"
    );
    env.run_ok(&["stop", "--force", "web-b"]);
    env.run_ok(&["stop", "--force", &name]);
}

#[test]
fn three_snapshot_restore_cycles_keep_exec_and_ports_working() {
    let env = Env::new();
    let p = free_port();
    let booted = counter_vm(&env, "cyc", p);
    // Where the boot's time went: the library's phases around the
    // supervisor's, in order.
    phases_in_order(
        &booted,
        &[
            "image",
            "initramfs",
            "claim",
            "disk",
            "engine-start",
            "guest-boot",
            "agent-ready",
            "ready",
        ],
    );
    assert_eq!(count(p), 1);
    env.run_ok(&["exec", "cyc", "--", "sh", "-c", "echo 0 > /root/n"]);
    let mut target = "cyc".to_string();
    for cycle in 1..=3u64 {
        let snap = bundle(&env, &format!("cyc{cycle}"));
        let report = env.json(&["snapshot", &target, snap.to_str().expect("path"), "--json"]);
        // A booted VM is paused, then its state written; a restored one
        // (copy-on-write RAM) writes its state while it runs, and QEMU
        // pauses it only at the end of that.
        let want: &[&str] = if cycle == 1 {
            &[
                "wipe-secrets",
                "flush",
                "pause",
                "state",
                "copies",
                "finish",
            ]
        } else {
            &["wipe-secrets", "flush", "state", "copies", "finish"]
        };
        phases_in_order(&report, want);
        let mut restore = env.cmd(&[
            "restore",
            snap.to_str().expect("path"),
            "--name",
            &format!("cyc-{cycle}"),
            "-p",
            &format!("{p}:8080"),
            "--detached",
            "--json",
            "--timings",
        ]);
        let out = restore.output().expect("run restore");
        assert!(
            out.status.success(),
            "restore: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("restore json");
        // Snapshots of a restored VM are deltas over its bundle: their
        // restores resolve the chain first.
        let chain: &[&str] = if cycle == 1 { &[] } else { &["chain"] };
        let restored: Vec<&str> = ["bundle-meta", "image"]
            .into_iter()
            .chain(chain.iter().copied())
            .chain([
                "claim",
                "copies",
                "engine-start",
                "state-load",
                "bundle-verify",
                "agent-reconnect",
                "agent-ready",
                "guest-repair",
                "ready",
            ])
            .collect();
        phases_in_order(&r, &restored);
        // --timings prints the same phases on stderr as they end.
        let stderr = String::from_utf8_lossy(&out.stderr);
        for name in restored {
            assert!(
                stderr
                    .lines()
                    .any(|l| l.starts_with(&format!("phase {name} "))),
                "no {name} line in: {stderr}"
            );
        }
        target = r["name"].as_str().expect("name").to_string();
        assert_eq!(count(p), cycle + 1, "cycle {cycle}: count continues");
        let n = env.run_ok(&[
            "exec",
            &target,
            "--",
            "sh",
            "-c",
            "n=$(($(cat /root/n) + 1)); echo $n > /root/n; cat /root/n",
        ]);
        assert_eq!(
            n.trim(),
            cycle.to_string(),
            "cycle {cycle}: disk state carried over"
        );
    }
    env.run_ok(&["stop", &target]);
}

#[test]
fn restores_reseed_randomness_fix_the_clock_and_never_touch_the_bundle() {
    let env = Env::new();
    env.json(&[
        "boot",
        "--name",
        "rng",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    // Put the guest clock ten minutes behind: as if the bundle were old.
    env.run_ok(&[
        "exec",
        "rng",
        "--",
        "sh",
        "-c",
        "date -s @$(( $(date +%s) - 600 )) >/dev/null",
    ]);
    let snap = bundle(&env, "rng");
    env.run_ok(&["snapshot", "rng", snap.to_str().expect("path")]);
    let manifest = std::fs::read(snap.join("manifest.json")).expect("manifest");
    let state_sum = sha256_hex(&std::fs::read(snap.join("state.vmstate")).expect("state"));

    let mut draws = Vec::new();
    for name in ["r1", "r2"] {
        env.json(&[
            "restore",
            snap.to_str().expect("path"),
            "--name",
            name,
            "--detached",
            "--json",
        ]);
        let bytes = env.run_ok(&[
            "exec",
            name,
            "--",
            "sh",
            "-c",
            "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'",
        ]);
        draws.push(bytes.trim().to_string());
        let guest: i64 = env
            .run_ok(&["exec", name, "--", "date", "+%s"])
            .trim()
            .parse()
            .expect("date");
        let host = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("now")
            .as_secs() as i64;
        assert!(
            (guest - host).abs() <= 5,
            "{name}: guest clock {guest} vs host {host}"
        );
    }
    assert_eq!(draws[0].len(), 64);
    assert_ne!(
        draws[0], draws[1],
        "two restores of one bundle must not share random streams"
    );
    assert_eq!(
        std::fs::read(snap.join("manifest.json")).expect("manifest"),
        manifest
    );
    assert_eq!(
        sha256_hex(&std::fs::read(snap.join("state.vmstate")).expect("state")),
        state_sum,
        "the bundle is never written"
    );
    env.run_ok(&["restore", snap.to_str().expect("path"), "--dry-run"]);

    // The image may live elsewhere on the restoring host (--image), but it
    // must be the same image.
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    let image = PathBuf::from(meta["image"]["path"].as_str().expect("image path"));
    let moved = env.registry.path().join("moved-rootfs.tar.gz");
    std::fs::copy(&image, &moved).expect("copy image");
    let out = env.run(&[
        "restore",
        snap.to_str().expect("path"),
        "--image",
        "/nonexistent.tar.gz",
        "--detached",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("RESTORE_IMAGE_MISMATCH"));
    let other = env.registry.path().join("other.tar.gz");
    std::fs::write(&other, b"not the image").expect("write");
    let out = env.run(&[
        "restore",
        snap.to_str().expect("path"),
        "--image",
        other.to_str().expect("path"),
        "--detached",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("RESTORE_IMAGE_MISMATCH") || err.contains("BOOT_IMAGE_INVALID"),
        "{err}"
    );
    let v = env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "--image",
        moved.to_str().expect("path"),
        "--name",
        "r3",
        "--detached",
        "--json",
    ]);
    assert_eq!(v["image"].as_str(), moved.to_str());
    env.run_ok(&["exec", "r3", "--", "true"]);
    env.run_ok(&["stop", "--force", "r3"]);
    env.run_ok(&["stop", "--force", "r1"]);
    env.run_ok(&["stop", "--force", "r2"]);
}

fn flip_byte(path: &Path, at_fraction: f64) {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open");
    let len = f.metadata().expect("meta").len();
    let at = ((len as f64 * at_fraction) as u64).min(len - 1);
    use std::io::Seek;
    let mut b = [0u8; 1];
    f.seek(std::io::SeekFrom::Start(at)).expect("seek");
    f.read_exact(&mut b).expect("read");
    b[0] ^= 0x40;
    f.seek(std::io::SeekFrom::Start(at)).expect("seek");
    f.write_all(&b).expect("write");
}

#[test]
fn damaged_bundles_and_interrupted_snapshots_are_refused() {
    let env = Env::new();
    let info = env.json(&[
        "boot",
        "--name",
        "dmg",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    let snap = bundle(&env, "dmg");
    env.run_ok(&[
        "snapshot",
        "dmg",
        snap.to_str().expect("path"),
        "--keep-alive",
    ]);
    assert!(
        pid_alive(info["pid"].as_u64().expect("pid")),
        "--keep-alive keeps the source"
    );
    env.run_ok(&["exec", "dmg", "--", "true"]);

    assert!(snap.join("ram.img").exists());
    for file in [
        "state.vmstate",
        "rootdisk.qcow2",
        "ram.img",
        "meta.json",
        "manifest.json",
    ] {
        flip_byte(&snap.join(file), 0.5);
        let out = env.run(&["restore", snap.to_str().expect("path"), "--detached"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{file}: {err}");
        assert!(
            err.contains("RESTORE_BUNDLE_INVALID") && err.contains(file),
            "{file}: {err}"
        );
        flip_byte(&snap.join(file), 0.5); // flip back
    }
    env.run_ok(&["restore", snap.to_str().expect("path"), "--dry-run"]);
    assert_eq!(
        env.json(&["ls", "--json"]).as_array().map(Vec::len),
        Some(1),
        "no refused restore left a VM behind"
    );
    // QEMU loads the state while the big files are verified, the guest
    // paused; a refusal must not leave that QEMU running.
    let ram_arg = format!("mem-path={}", snap.join("ram.img").display());
    wait_until(
        "refused restores' QEMU to exit",
        Duration::from_secs(10),
        || {
            !std::process::Command::new("pgrep")
                .args(["-f", &ram_arg])
                .status()
                .expect("pgrep")
                .success()
        },
    );

    // Kill the supervisor while it writes a snapshot: no bundle appears, the
    // half-written one is hidden and gc removes it.
    let out = bundle(&env, "interrupted");
    let mut snapper = env
        .cmd(&["snapshot", "dmg", out.to_str().expect("path")])
        .stderr(Stdio::null())
        .spawn()
        .expect("snapshot");
    let parent = out.parent().expect("parent").to_path_buf();
    let partial = || {
        std::fs::read_dir(&parent)
            .map(|rd| {
                rd.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .starts_with(".interrupted.snap.partial-")
                })
            })
            .unwrap_or(false)
    };
    wait_until("the snapshot to start", Duration::from_secs(30), partial);
    let pid = info["pid"].as_u64().expect("pid");
    std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let _ = snapper.wait();
    // The snapshot client sees the connection drop while the supervisor is
    // still exiting; gc only cleans up after a dead one.
    wait_until(
        "the killed supervisor to be gone",
        Duration::from_secs(10),
        || !pid_alive(pid),
    );
    assert!(!out.exists(), "no bundle under the requested name");
    let err = env.run(&["restore", out.to_str().expect("path"), "--detached"]);
    assert_eq!(err.status.code(), Some(125));
    env.json(&["gc", "--json"]);
    assert!(!partial(), "gc removed the half-written bundle");
}

#[test]
fn port_forward_conflicts_refused_ports_and_heavy_traffic() {
    let env = Env::new();
    let (p1, p2) = (free_port(), free_port());
    let out = env.run(&[
        "boot",
        "--detached",
        "-p",
        &format!("{p1}:80"),
        "-p",
        &format!("{p1}:81"),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_PORT_FORWARD_CONFLICT"));

    // The counter VM also listens on IPv6 loopback.
    let p6 = free_port();
    env.json(&[
        "boot",
        "--name",
        "fw",
        "--memory",
        "512",
        "--detached",
        "--json",
        "-p",
        &format!("{p1}:8080"),
        "-p",
        &format!("[::1]:{p6}:8080"),
    ]);
    put(&env, "fw", "/root/counter.pl", COUNTER);
    env.run_ok(&[
        "exec",
        "fw",
        "--",
        "sh",
        "-c",
        "nohup perl /root/counter.pl 8080 >/dev/null 2>&1 &",
    ]);
    let first = count(p1);
    assert_eq!(
        count_at("::1", p6),
        first + 1,
        "the IPv6 forward reaches the same server"
    );
    let ls = env.run_ok(&["ls"]);
    assert!(ls.contains(&format!("[::1]:{p6}->8080")), "{ls}");
    let out = env.run(&[
        "boot",
        "--name",
        "other",
        "--detached",
        "-p",
        &format!("{p1}:8080"),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BOOT_PORT_FORWARD_IN_USE") && err.contains("\"fw\""),
        "{err}"
    );
    // A port held by some other program.
    let holder = std::net::TcpListener::bind(("127.0.0.1", p2)).expect("hold");
    let out = env.run(&[
        "boot",
        "--name",
        "other",
        "--detached",
        "-p",
        &format!("{p2}:8080"),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("BOOT_PORT_FORWARD_IN_USE"));
    drop(holder);

    // 40 concurrent requests: every one answered, each with its own count.
    let threads: Vec<_> = (0..40)
        .map(|_| std::thread::spawn(move || count(p1)))
        .collect();
    let mut got: Vec<u64> = threads
        .into_iter()
        .map(|t| t.join().expect("join"))
        .collect();
    got.sort_unstable();
    assert_eq!(got, (first + 2..=first + 41).collect::<Vec<u64>>());

    // A large transfer both ways through a guest echo server.
    let echo = "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalPort => 9000, Listen => 5, ReuseAddr => 1) or die; \
                while (my $c = $s->accept) { my $b; while (sysread($c, $b, 65536)) { syswrite($c, $b) } close $c }";
    env.run_ok(&["stop", "fw"]);
    let p4 = free_port();
    let info = env.json(&[
        "boot",
        "--name",
        "echo",
        "--memory",
        "512",
        "--detached",
        "--json",
        "-p",
        &format!("{p4}:9000"),
        "-p",
        &format!("{}:9999", free_port()),
    ]);
    assert_eq!(info["ports"].as_array().map(Vec::len), Some(2));
    env.run_ok(&[
        "exec",
        "echo",
        "--",
        "sh",
        "-c",
        &format!("nohup perl -e '{echo}' >/dev/null 2>&1 &"),
    ]);
    // Wait until it listens (port 9000 is 0x2328 in /proc/net/tcp).
    env.run_ok(&["exec", "echo", "--", "sh", "-c", "for i in $(seq 100); do grep -q ':2328 00000000:0000 0A' /proc/net/tcp && exit 0; sleep 0.1; done; exit 1"]);
    let payload: Vec<u8> = (0..16 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let mut conn = None;
    for _ in 0..50 {
        if let Ok(c) = TcpStream::connect(("127.0.0.1", p4)) {
            conn = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let conn = conn.expect("connect");
    let mut reader = conn.try_clone().expect("clone");
    let send = payload.clone();
    let writer = std::thread::spawn(move || {
        let mut w = conn;
        w.write_all(&send).expect("send");
        w.shutdown(std::net::Shutdown::Write).expect("shutdown");
    });
    let mut back = Vec::new();
    reader
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    reader.read_to_end(&mut back).expect("read back");
    writer.join().expect("writer");
    assert_eq!(back.len(), payload.len());
    assert_eq!(sha256_hex(&back), sha256_hex(&payload));

    // Nobody listens on guest port 9999: the host connection closes cleanly.
    let closed_port = info["ports"][1]["host_port"].as_u64().expect("port") as u16;
    let mut c = TcpStream::connect(("127.0.0.1", closed_port)).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut buf = [0u8; 16];
    let n = c.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without data");
    env.run_ok(&["stop", "--force", "echo"]);
}

/// A guest TCP connection held open by two guest processes; after a fork
/// it is reset in the fork (unless --tcp-keep) and untouched in the source.
#[test]
fn forks_reset_inherited_tcp_connections_unless_kept() {
    let env = Env::new();
    env.json(&[
        "boot",
        "--name",
        "tcp",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    let server = "use IO::Socket::INET; my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => 9100, Listen => 5, ReuseAddr => 1) or die; \
                  my @held; while (my $c = $s->accept) { push @held, $c }";
    let client = "use IO::Socket::INET; my $c; for (1..100) { $c = IO::Socket::INET->new('127.0.0.1:9100') and last; select(undef,undef,undef,0.1) } \
                  die 'no server' unless $c; open(my $f, '>', '/tmp/conn'); print $f \"open\\n\"; close $f; \
                  my $b; my $n = sysread($c, $b, 1); open($f, '>', '/tmp/conn'); print $f (defined $n ? \"eof\\n\" : \"error: $!\\n\"); close $f;";
    for (file, code) in [("/root/server.pl", server), ("/root/client.pl", client)] {
        put(&env, "tcp", file, code);
    }
    env.run_ok(&[
        "exec",
        "tcp",
        "--",
        "sh",
        "-c",
        "nohup perl /root/server.pl >/dev/null 2>&1 &",
    ]);
    env.run_ok(&[
        "exec",
        "tcp",
        "--",
        "sh",
        "-c",
        "nohup perl /root/client.pl >/dev/null 2>&1 &",
    ]);
    let state = |vm: &str| {
        env.run_ok(&[
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "cat /tmp/conn 2>/dev/null || true",
        ])
        .trim()
        .to_string()
    };
    wait_until("the connection to open", Duration::from_secs(30), || {
        state("tcp") == "open"
    });

    env.json(&[
        "fork",
        "tcp",
        "--new-name",
        "tcp-reset",
        "--detach",
        "--json",
    ]);
    env.json(&[
        "fork",
        "tcp",
        "--new-name",
        "tcp-kept",
        "--tcp-keep",
        "--detach",
        "--json",
    ]);
    wait_until(
        "the fork's connection to be reset",
        Duration::from_secs(30),
        || state("tcp-reset") != "open",
    );
    let reset = state("tcp-reset");
    assert!(
        reset.starts_with("error") || reset == "eof",
        "fork: {reset}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state("tcp"), "open", "the source keeps its connection");
    assert_eq!(state("tcp-kept"), "open", "--tcp-keep keeps it in the fork");
    for vm in ["tcp-reset", "tcp-kept", "tcp"] {
        env.run_ok(&["stop", "--force", vm]);
    }
}

/// Guest RAM lives in a shared file on tmpfs; a snapshot copies it into the
/// bundle as `ram.img`, and restores map it privately (copy-on-write). The
/// copies must not see each other's writes, and the bundle must not change.
#[test]
fn copy_on_write_ram_keeps_restores_and_forks_apart() {
    let env = Env::new();
    env.json(&[
        "boot",
        "--name",
        "cow",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    // Memory contents: a tmpfs file and a process holding data in its heap.
    env.run_ok(&["exec", "cow", "--", "sh", "-c", "echo base > /dev/shm/who"]);
    let snap = bundle(&env, "cow");
    env.run_ok(&[
        "snapshot",
        "cow",
        snap.to_str().expect("path"),
        "--keep-alive",
    ]);
    assert!(
        snap.join("ram.img").exists(),
        "a VM with file-backed RAM writes ram.img"
    );
    let ram_sum = sha256_hex(&std::fs::read(snap.join("ram.img")).expect("ram"));
    let state_len = std::fs::metadata(snap.join("state.vmstate"))
        .expect("state")
        .len();
    assert!(
        state_len < 32 << 20,
        "RAM is not serialised into the state ({state_len} bytes)"
    );

    env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "cow-a",
        "--detached",
        "--json",
    ]);
    env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "cow-b",
        "--detached",
        "--json",
    ]);
    for vm in ["cow-a", "cow-b", "cow"] {
        assert_eq!(
            env.run_ok(&["exec", vm, "--", "cat", "/dev/shm/who"])
                .trim(),
            "base",
            "{vm} starts from the snapshot"
        );
    }
    // Each writes its own value, also into a lot of memory, then all read back.
    for vm in ["cow-a", "cow-b", "cow"] {
        env.run_ok(&[
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            &format!("echo {vm} > /dev/shm/who; head -c 33554432 /dev/urandom > /dev/shm/blob"),
        ]);
    }
    for vm in ["cow-a", "cow-b", "cow"] {
        assert_eq!(
            env.run_ok(&["exec", vm, "--", "cat", "/dev/shm/who"])
                .trim(),
            vm,
            "{vm} sees only its own writes"
        );
    }
    // A fork of a restored VM (private RAM) works too. Its RAM is copied
    // while the guest runs, here with a writer dirtying memory all along:
    // what the fork finds is one consistent moment, the still data intact.
    let blob_sum = env.run_ok(&[
        "exec",
        "cow-a",
        "--",
        "sh",
        "-c",
        "sha256sum < /dev/shm/blob",
    ]);
    env.run_ok(&[
        "exec",
        "cow-a",
        "--",
        "sh",
        "-c",
        "nohup sh -c 'i=0; while true; do i=$((i+1)); head -c 4194304 /dev/urandom > /dev/shm/churn; echo $i > /dev/shm/n; done' >/dev/null 2>&1 &",
    ]);
    env.json(&[
        "fork",
        "cow-a",
        "--new-name",
        "cow-a2",
        "--detach",
        "--json",
    ]);
    assert_eq!(
        env.run_ok(&["exec", "cow-a2", "--", "cat", "/dev/shm/who"])
            .trim(),
        "cow-a"
    );
    assert_eq!(
        env.run_ok(&[
            "exec",
            "cow-a2",
            "--",
            "sh",
            "-c",
            "sha256sum < /dev/shm/blob"
        ]),
        blob_sum
    );
    // The writer goes on in the fork.
    let n = |vm: &str| -> u64 {
        env.run_ok(&["exec", vm, "--", "cat", "/dev/shm/n"])
            .trim()
            .parse()
            .expect("a count")
    };
    let first = n("cow-a2");
    super::wait_until(
        "the fork's writer",
        std::time::Duration::from_secs(30),
        || n("cow-a2") > first,
    );
    assert_eq!(
        sha256_hex(&std::fs::read(snap.join("ram.img")).expect("ram")),
        ram_sum,
        "the bundle's RAM file is never written"
    );
    env.run_ok(&["restore", snap.to_str().expect("path"), "--dry-run"]);
    for vm in ["cow-a2", "cow-a", "cow-b", "cow"] {
        env.run_ok(&["stop", "--force", vm]);
    }
}

/// `restore --own-ram`: the VM gets a shared RAM file of its own (a copy of
/// the bundle's), so its snapshots leave RAM out of the migration stream and
/// copy the file, like a booted VM's, instead of carrying the whole ceiling
/// in the state as a copy-on-write restore's do.
#[test]
fn own_ram_restores_snapshot_like_booted_vms() {
    let env = Env::new();
    env.json(&[
        "boot",
        "--name",
        "own",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    env.run_ok(&["exec", "own", "--", "sh", "-c", "echo base > /dev/shm/who"]);
    let snap = bundle(&env, "own");
    env.run_ok(&["snapshot", "own", snap.to_str().expect("path")]);
    let ram_sum = sha256_hex(&std::fs::read(snap.join("ram.img")).expect("ram"));

    let own = env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "own-1",
        "--own-ram",
        "--detached",
        "--json",
    ]);
    let cow = env.json(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "cow-1",
        "--detached",
        "--json",
    ]);
    let maps = |v: &serde_json::Value| {
        std::fs::read_to_string(format!(
            "/proc/{}/maps",
            v["qemu_pid"].as_u64().expect("qemu_pid")
        ))
        .expect("maps")
    };
    let own_maps = maps(&own);
    let ram_line = own_maps
        .lines()
        .find(|l| l.contains("machinen-") && l.ends_with(".ram"))
        .unwrap_or_else(|| panic!("own RAM file mapped:\n{own_maps}"));
    assert!(
        ram_line
            .split_whitespace()
            .nth(1)
            .is_some_and(|p| p.ends_with('s')),
        "shared mapping: {ram_line}"
    );
    assert!(
        !own_maps.contains("/ram.img"),
        "the bundle's RAM file is not mapped"
    );
    assert!(
        maps(&cow).contains("/ram.img"),
        "the default restore maps the bundle copy-on-write"
    );

    for vm in ["own-1", "cow-1"] {
        assert_eq!(
            env.run_ok(&["exec", vm, "--", "cat", "/dev/shm/who"])
                .trim(),
            "base",
            "{vm} starts from the snapshot"
        );
        env.run_ok(&[
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            &format!("echo {vm} > /dev/shm/who"),
        ]);
    }
    assert_eq!(
        env.run_ok(&["exec", "own-1", "--", "cat", "/dev/shm/who"])
            .trim(),
        "own-1"
    );
    assert_eq!(
        env.run_ok(&["exec", "cow-1", "--", "cat", "/dev/shm/who"])
            .trim(),
        "cow-1"
    );
    assert_eq!(
        sha256_hex(&std::fs::read(snap.join("ram.img")).expect("ram")),
        ram_sum,
        "the bundle's RAM file is never written"
    );

    // Snapshots: the own-RAM VM writes ram.img and a small state; the
    // copy-on-write one carries its RAM in the state.
    let (s_own, s_cow) = (bundle(&env, "own-again"), bundle(&env, "cow-again"));
    env.run_ok(&[
        "snapshot",
        "own-1",
        s_own.to_str().expect("path"),
        "--keep-alive",
    ]);
    env.run_ok(&[
        "snapshot",
        "cow-1",
        s_cow.to_str().expect("path"),
        "--keep-alive",
    ]);
    let state = |b: &std::path::Path| {
        std::fs::metadata(b.join("state.vmstate"))
            .expect("state")
            .len()
    };
    assert!(
        s_own.join("ram.img").exists() && state(&s_own) < 32 << 20,
        "own RAM: RAM file, small state ({} bytes)",
        state(&s_own)
    );
    assert!(
        !s_cow.join("ram.img").exists() && state(&s_cow) > 32 << 20,
        "copy-on-write: RAM in the state ({} bytes)",
        state(&s_cow)
    );
    env.json(&[
        "restore",
        s_own.to_str().expect("path"),
        "--name",
        "own-2",
        "--detached",
        "--json",
    ]);
    assert_eq!(
        env.run_ok(&["exec", "own-2", "--", "cat", "/dev/shm/who"])
            .trim(),
        "own-1",
        "the own-RAM VM's snapshot carries its writes"
    );

    // Forks likewise: `fork --own-ram` makes a fork that forks quickly in turn.
    env.run_ok(&[
        "fork",
        "own-1",
        "--own-ram",
        "--new-name",
        "own-f",
        "--detach",
    ]);
    let again = bundle(&env, "own-f-fork");
    env.run_ok(&[
        "fork",
        "own-f",
        "--out-dir",
        again.to_str().expect("path"),
        "--new-name",
        "own-ff",
        "--detach",
    ]);
    assert!(
        again.join("ram.img").exists() && state(&again) < 32 << 20,
        "a fork of an own-RAM fork takes the fast path"
    );
    assert_eq!(
        env.run_ok(&["exec", "own-ff", "--", "cat", "/dev/shm/who"])
            .trim(),
        "own-1"
    );
    // A bundle with RAM inside the state cannot give a VM its own RAM file.
    let out = env.run(&[
        "restore",
        s_cow.to_str().expect("path"),
        "--own-ram",
        "--detached",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("BOOT_ARGS_INVALID") && err.contains("ram.img"),
        "{err}"
    );

    let ram_file = format!("/{}", ram_line.split_once(" /").expect("path").1);
    env.run_ok(&["stop", "own-1"]);
    assert!(
        !std::path::Path::new(&ram_file).exists(),
        "stopping removes the VM's own RAM file {ram_file}"
    );
    for vm in ["own-ff", "own-f", "own-2", "cow-1"] {
        env.run_ok(&["stop", "--force", vm]);
    }
}

/// The RAM file a QEMU maps: (device, inode) of every `ram.img` mapping in
/// `/proc/<pid>/maps` (the temp bundle is gone by now: `… ram.img (deleted)`).
fn ram_file_mappings(qemu_pid: u64) -> Vec<(String, String)> {
    let maps = std::fs::read_to_string(format!("/proc/{qemu_pid}/maps")).expect("maps");
    maps.lines()
        .filter(|l| l.contains("/ram.img"))
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f[3].to_string(), f[4].to_string())
        })
        .collect()
}

/// `fork --count N`: N siblings restored from ONE snapshot. Each starts from
/// the source's memory, their writes stay apart, and their QEMUs map the
/// same RAM file, so what none of them changed is one set of host pages.
#[test]
fn sibling_forks_share_one_ram_file_and_keep_apart() {
    let env = Env::new();
    env.json(&[
        "boot",
        "--name",
        "sib",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    env.run_ok(&[
        "exec",
        "sib",
        "--",
        "sh",
        "-c",
        "echo from-source > /dev/shm/base",
    ]);

    let forks = env.json(&[
        "fork",
        "sib",
        "--count",
        "3",
        "--new-name",
        "x",
        "--detach",
        "--json",
    ]);
    let forks = forks
        .as_array()
        .expect("--count with --json prints an array");
    let names: Vec<String> = forks
        .iter()
        .map(|f| f["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, ["x-1", "x-2", "x-3"]);
    for f in forks {
        assert_eq!(f["forked_from"].as_str(), Some("sib"), "{f}");
        assert!(
            f["ready_ms"].as_u64().is_some(),
            "same object as a single fork: {f}"
        );
        assert!(pid_alive(f["pid"].as_u64().expect("pid")));
    }
    let ls = env.json(&["ls", "--json"]);
    let mut live: Vec<String> = ls
        .as_array()
        .expect("ls")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect();
    live.sort();
    assert_eq!(live, ["sib", "x-1", "x-2", "x-3"]);

    // Same past, separate futures.
    for n in &names {
        assert_eq!(
            env.run_ok(&["exec", n, "--", "cat", "/dev/shm/base"])
                .trim(),
            "from-source",
            "{n} starts from the source's memory"
        );
        env.run_ok(&[
            "exec",
            n,
            "--",
            "sh",
            "-c",
            &format!("echo {n} > /dev/shm/mark-{n}"),
        ]);
    }
    for n in names.iter().map(String::as_str).chain(["sib"]) {
        let marks = env.run_ok(&[
            "exec",
            n,
            "--",
            "sh",
            "-c",
            "cd /dev/shm && ls mark-* 2>/dev/null || true",
        ]);
        let expected = if n == "sib" {
            String::new()
        } else {
            format!("mark-{n}")
        };
        assert_eq!(marks.trim(), expected, "{n} sees only its own writes");
    }

    // One bundle for all three: their QEMUs map the same RAM file (same
    // device and inode), where separate forks would each have their own.
    let mut files = std::collections::BTreeSet::new();
    for f in forks {
        let maps = ram_file_mappings(f["qemu_pid"].as_u64().expect("qemu_pid"));
        assert!(!maps.is_empty(), "{}: QEMU maps no ram.img", f["name"]);
        files.extend(maps);
    }
    assert_eq!(files.len(), 1, "the siblings map one RAM file: {files:?}");

    // Text output and anonymous names: one line per fork.
    let out = env.run_ok(&["fork", "sib", "--count", "2", "--detach"]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    for l in &lines {
        assert!(
            l.starts_with("sib/") && l.contains(" (pid ") && l.contains(" forked in "),
            "{l}"
        );
    }

    // Refused before anything starts: a host port cannot go to several forks,
    // and the count is 1..=64.
    for (args, what) in [
        (&["--count", "2", "-p", "8080:80"][..], "port forwards"),
        (&["--count", "0"][..], "between 1 and 64"),
        (&["--count", "65"][..], "between 1 and 64"),
    ] {
        let mut full = vec!["fork", "sib", "--detach"];
        full.extend_from_slice(args);
        let out = env.run(&full);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("BOOT_ARGS_INVALID") && err.contains(what),
            "{args:?}: {err}"
        );
    }
    let out = env.run(&["fork", "sib", "--count", "2", "--", "true"]);
    assert_eq!(out.status.code(), Some(2), "--count 2 with a command");
    assert_eq!(
        env.json(&["ls", "--json"]).as_array().map(Vec::len),
        Some(6),
        "no refused fork left a VM behind"
    );

    // A temporary fork bundle is a scratch one (no digests, no fsync); one
    // kept with --out-dir is a full bundle that verifies and restores.
    let kept = bundle(&env, "kept-fork");
    env.run_ok(&[
        "fork",
        "sib",
        "--out-dir",
        kept.to_str().expect("path"),
        "--new-name",
        "k",
        "--detach",
    ]);
    assert!(
        kept.join("manifest.json").exists(),
        "a kept fork bundle has its manifest"
    );
    env.run_ok(&["restore", kept.to_str().expect("path"), "--dry-run"]);
    env.run_ok(&[
        "restore",
        kept.to_str().expect("path"),
        "--name",
        "k2",
        "--detached",
    ]);
    assert_eq!(
        env.run_ok(&["exec", "k2", "--", "cat", "/dev/shm/base"])
            .trim(),
        "from-source"
    );

    for vm in ls_names(&env) {
        env.run_ok(&["stop", "--force", &vm]);
    }
}

fn ls_names(env: &Env) -> Vec<String> {
    env.json(&["ls", "--json"])
        .as_array()
        .expect("ls")
        .iter()
        .map(|v| v["name"].as_str().expect("name").to_string())
        .collect()
}
