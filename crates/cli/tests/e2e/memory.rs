//! Guest memory going back to the host: the free-page-reporting balloon.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{sha256_hex, Env};

/// The RAM file of the VM with registry id `id` (in MACHINEN_RAM_DIR or
/// /dev/shm).
fn ram_file(id: &str) -> PathBuf {
    let dir = std::env::var_os("MACHINEN_RAM_DIR")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm"));
    dir.join(format!("machinen-{id}.ram"))
}

/// MiB of a file that are really allocated (not holes).
fn allocated_mib(p: &Path) -> u64 {
    (std::fs::metadata(p).expect("RAM file").blocks() * 512) >> 20
}

fn id_of(env: &Env, name: &str) -> String {
    let ls = env.json(&["ls", "--json"]);
    ls.as_array()
        .expect("ls")
        .iter()
        .find(|v| v["name"] == name)
        .and_then(|v| v["id"].as_str())
        .expect("id")
        .to_string()
}

/// Allocate `mib` MiB in a guest tmpfs, then free it.
fn churn(env: &Env, vm: &str, mib: u32) {
    env.run_ok(&[
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!(
            "dd if=/dev/zero of=/dev/shm/churn bs=1M count={mib} 2>/dev/null && rm /dev/shm/churn"
        ),
    ]);
}

/// Wait until the RAM file holds at most `mib` MiB; the last reading.
fn shrinks_to(p: &Path, mib: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let now = allocated_mib(p);
        if now <= mib || Instant::now() > deadline {
            return now;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn freed_guest_memory_returns_to_the_host_and_never_touches_a_bundle() {
    let env = Env::new();
    env.run_ok(&["boot", "--name", "bal", "--detached", "--memory", "1024"]);
    let ram = ram_file(&id_of(&env, "bal"));
    let idle = shrinks_to(&ram, 0, Duration::from_secs(5));

    // `stats`: the guest's view and the host's cost, and how they move
    // while 200 MiB sit in a guest tmpfs.
    let stats = |env: &Env| env.json(&["stats", "bal", "--json"]);
    let before = stats(&env);
    assert_eq!(before["ceiling_bytes"], 1024u64 << 20);
    let g = |v: &serde_json::Value, k: &str| v["guest"][k].as_u64().expect(k);
    let h = |v: &serde_json::Value, k: &str| v["host"][k].as_u64().expect(k);
    assert!(g(&before, "total_bytes") > 900 << 20 && g(&before, "total_bytes") <= 1024 << 20);
    assert!(h(&before, "qemu_pss_bytes") > 0 && h(&before, "supervisor_pss_bytes") > 0);
    env.run_ok(&[
        "exec",
        "bal",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/dev/shm/held bs=1M count=200 2>/dev/null",
    ]);
    let held = stats(&env);
    assert!(
        g(&held, "used_bytes") >= g(&before, "used_bytes") + (150 << 20),
        "guest used {} -> {}",
        g(&before, "used_bytes"),
        g(&held, "used_bytes")
    );
    assert!(h(&held, "ram_file_bytes") >= h(&before, "ram_file_bytes") + (150 << 20));
    env.run_ok(&["exec", "bal", "--", "rm", "/dev/shm/held"]);
    let table = env.run_ok(&["stats"]);
    assert!(
        table.starts_with("NAME") && table.contains("bal "),
        "{table}"
    );
    churn(&env, "bal", 400);
    // The guest reports freed 2 MiB blocks a couple of seconds after the
    // free; the host's copy of them goes.
    let after = shrinks_to(&ram, idle + 100, Duration::from_secs(60));
    eprintln!("booted VM's RAM file: idle {idle} MiB, after 400 MiB came and went {after} MiB");
    assert!(
        after <= idle + 100,
        "RAM file {after} MiB after freeing 400 MiB (idle {idle} MiB)"
    );

    // A restore mapping the bundle's RAM privately: the guest stops
    // reporting (QEMU could not discard from a read-only file) and the
    // bundle never changes.
    let dir = tempfile::tempdir().expect("tmp");
    let snap = dir.path().join("bal.snap");
    let snap_s = snap.to_str().expect("path");
    env.run_ok(&["snapshot", "bal", snap_s, "--keep-alive"]);
    let bundle_ram = std::fs::read(snap.join("ram.img")).expect("ram.img");
    let before = sha256_hex(&bundle_ram);
    drop(bundle_ram);

    // Backpressure: a threshold no host can keep refuses forks and
    // restores before anything starts (the source is not even paused); 0
    // turns the check off.
    for args in [
        vec!["fork", "bal", "--new-name", "no", "--detach"],
        vec!["restore", snap_s, "--name", "no", "--detached"],
    ] {
        let mut args = args.clone();
        args.extend(["--free-memory-threshold", "100%"]);
        let out = env.run(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{err}");
        assert!(
            err.contains("FORK_MEMORY_BACKPRESSURE") && err.contains("MiB available"),
            "{err}"
        );
    }
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(
        ls.as_array().map(Vec::len),
        Some(1),
        "nothing started: {ls}"
    );
    env.run_ok(&[
        "fork",
        "bal",
        "--new-name",
        "zero",
        "--detach",
        "--free-memory-threshold",
        "0",
    ]);
    env.run_ok(&["stop", "--force", "zero"]);

    env.run_ok(&["restore", snap_s, "--name", "priv", "--detached"]);
    let bound = env.run_ok(&[
        "exec",
        "priv",
        "--",
        "sh",
        "-c",
        "ls /sys/bus/virtio/drivers/virtio_balloon | grep -c ^virtio || true",
    ]);
    assert_eq!(
        bound.trim(),
        "0",
        "the balloon is unbound in a private restore"
    );
    churn(&env, "priv", 200);
    std::thread::sleep(Duration::from_secs(4));
    let after = sha256_hex(&std::fs::read(snap.join("ram.img")).expect("ram.img"));
    assert_eq!(after, before, "the bundle's RAM file is never written");

    // With its own RAM, a restored VM gives memory back like a booted one.
    env.run_ok(&[
        "restore",
        snap_s,
        "--name",
        "own",
        "--detached",
        "--own-ram",
    ]);
    let own = ram_file(&id_of(&env, "own"));
    let base = allocated_mib(&own);
    churn(&env, "own", 300);
    let after = shrinks_to(&own, base + 100, Duration::from_secs(60));
    eprintln!("own-RAM restore: {base} MiB at restore, after 300 MiB came and went {after} MiB");
    assert!(
        after <= base + 100,
        "own RAM file {after} MiB after freeing 300 MiB (restored at {base} MiB)"
    );
    for vm in ["own", "priv", "bal"] {
        env.run_ok(&["stop", "--force", vm]);
    }
}

/// MemTotal in MiB, as the guest sees it.
fn guest_total_mib(env: &Env, vm: &str) -> u64 {
    let s = env.run_ok(&["exec", vm, "--", "grep", "MemTotal", "/proc/meminfo"]);
    s.split_whitespace()
        .nth(1)
        .and_then(|k| k.parse::<u64>().ok())
        .expect("MemTotal")
        >> 10
}

#[test]
fn the_balloon_shrinks_and_grows_a_guest_and_reclaimed_vms_snapshot_their_own_data() {
    let env = Env::new();
    env.run_ok(&["boot", "--name", "bl", "--detached", "--memory", "1024"]);
    let ram = ram_file(&id_of(&env, "bl"));
    // Data that must survive the reclaim and a snapshot: on disk, and in
    // guest RAM (a tmpfs), written before any memory came and went.
    env.run_ok(&[
        "exec",
        "bl",
        "--",
        "sh",
        "-c",
        "head -c 4194304 /dev/urandom > /dev/shm/keep && cp /dev/shm/keep /root/keep \
         && sha256sum /dev/shm/keep | cut -d' ' -f1",
    ]);
    let want = env
        .run_ok(&["exec", "bl", "--", "sha256sum", "/root/keep"])
        .split_whitespace()
        .next()
        .expect("sum")
        .to_string();
    let full = guest_total_mib(&env, "bl");
    assert!(full > 900, "MemTotal {full} MiB");

    // Shrink: the guest keeps 300 MiB, sees less, and its RAM file holds
    // no more than that.
    let v = env.json(&["balloon", "bl", "300M", "--json"]);
    assert_eq!(v["settled"], true, "{v}");
    assert_eq!(v["target_bytes"], 300u64 << 20);
    assert!(
        v["actual_bytes"].as_u64().expect("actual") <= 302 << 20,
        "{v}"
    );
    let small = guest_total_mib(&env, "bl");
    assert!(small < 300, "MemTotal {small} MiB with a 300 MiB target");
    assert!(
        allocated_mib(&ram) <= 300,
        "RAM file {} MiB with a 300 MiB target",
        allocated_mib(&ram)
    );
    // The balloon settles within 2 MiB of its target and may still take the
    // last pages after `balloon` returned, so `stats` agrees within that band.
    let stats = env.json(&["stats", "bl", "--json"]);
    let now = stats["balloon"]["actual_bytes"].as_u64().expect("actual");
    assert!(
        (298u64 << 20..=302 << 20).contains(&now),
        "{stats} after {v}"
    );
    // `ls --json` carries each live VM's host cost too.
    let ls = env.json(&["ls", "--json"]);
    let cost = &ls[0]["host_memory"];
    assert!(
        cost["qemu_pss_bytes"].as_u64().is_some_and(|b| b > 0),
        "{ls}"
    );
    assert!(
        cost["ram_file_bytes"]
            .as_u64()
            .is_some_and(|b| b <= 300 << 20),
        "{ls}"
    );
    // Out of range: refused with its code, exit 2, nothing changed.
    for bad in ["64M", "2G", "lots"] {
        let out = env.run(&["balloon", "bl", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("BALLOON_TARGET_INVALID"));
    }

    // Memory comes and goes under the small target; then a snapshot and an
    // own-RAM restore read back what was written before.
    churn(&env, "bl", 100);
    let dir = tempfile::tempdir().expect("tmp");
    let snap = dir.path().join("bl.snap");
    let snap_s = snap.to_str().expect("path");
    env.run_ok(&["snapshot", "bl", snap_s, "--keep-alive"]);
    let bundle_ram = allocated_mib(&snap.join("ram.img"));
    assert!(bundle_ram <= 300, "the bundle's RAM holds {bundle_ram} MiB");
    env.run_ok(&[
        "restore",
        snap_s,
        "--name",
        "own",
        "--own-ram",
        "--detached",
    ]);
    for path in ["/dev/shm/keep", "/root/keep"] {
        let got = env.run_ok(&["exec", "own", "--", "sha256sum", path]);
        assert_eq!(got.split_whitespace().next(), Some(want.as_str()), "{path}");
    }
    // The restore keeps its source's balloon, and can give it back.
    assert!(guest_total_mib(&env, "own") < 300);
    let v = env.json(&["balloon", "own", "max", "--json"]);
    assert_eq!(v["settled"], true, "{v}");
    assert!(guest_total_mib(&env, "own") > 900);
    // A restore mapping the bundle privately has none.
    env.run_ok(&["restore", snap_s, "--name", "priv", "--detached"]);
    let out = env.run(&["balloon", "priv"]);
    assert_eq!(out.status.code(), Some(125));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BALLOON_UNAVAILABLE") && err.contains("--own-ram"),
        "{err}"
    );
    let got = env.run_ok(&["exec", "priv", "--", "sha256sum", "/dev/shm/keep"]);
    assert_eq!(got.split_whitespace().next(), Some(want.as_str()));
    // Its RAM: pages still read from the bundle, and its own written ones.
    let s = env.json(&["stats", "priv", "--json"]);
    let b = &s["host"]["bundle_ram"];
    assert!(
        b["path"].as_str().is_some_and(|p| p.ends_with("ram.img"))
            && b["file_backed_bytes"].as_u64().is_some_and(|n| n > 4 << 20)
            && b["private_bytes"].as_u64().is_some_and(|n| n > 0),
        "{s}"
    );
    assert!(s["balloon"].is_null(), "{s}");

    // Grow the source back: the guest sees its whole ceiling again.
    let v = env.json(&["balloon", "bl", "max", "--json"]);
    assert_eq!(v["settled"], true, "{v}");
    assert_eq!(guest_total_mib(&env, "bl"), full);
    for vm in ["priv", "own", "bl"] {
        env.run_ok(&["stop", "--force", vm]);
    }
}
