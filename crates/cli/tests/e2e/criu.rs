//! The `criu` snapshot engine on real VMs: a service's process tree and
//! disk go into a bundle, and a fresh VM of another CPU model, memory size
//! and CPU count resumes it.

use std::time::Duration;

/// The counter service's log lines `n=K`, in order.
fn counts(log: &str) -> Vec<u64> {
    log.lines()
        .filter_map(|l| l.trim().strip_prefix("n="))
        .filter_map(|n| n.parse().ok())
        .collect()
}

#[test]
fn criu_engine_moves_the_counter_service_to_another_cpu_model_and_memory_and_it_counts_on() {
    let env = super::Env::new();
    env.run_ok(&["install", "--criu"]);
    let tmp = tempfile::tempdir().expect("tmp");
    // The service: a shell counting in its own memory, logging each count
    // and writing it to its disk, with a long-lived child in its tree.
    env.run_ok(&[
        "boot",
        "--name",
        "svc",
        "--detached",
        "--memory",
        "512",
        "--cpu-model",
        "Nehalem",
        "--",
        "sh",
        "-c",
        "sleep 100000 & i=0; while true; do i=$((i+1)); echo n=$i; echo $i > /root/count; sleep 0.2; done",
    ]);
    let model = env.run_ok(&[
        "exec",
        "svc",
        "--",
        "grep",
        "-m1",
        "model name",
        "/proc/cpuinfo",
    ]);
    assert!(model.contains("Nehalem"), "{model}");
    super::wait_until("the count to reach 15", Duration::from_secs(60), || {
        counts(&env.run_ok(&["logs", "svc"])).len() >= 15
    });

    // What CRIU refuses comes back naming the process and CRIU's reason,
    // and the service runs on untouched.
    let sleeper = env.run_ok(&[
        "exec",
        "svc",
        "--",
        "sh",
        "-c",
        "for p in /proc/[0-9]*; do grep -qx sleep $p/comm 2>/dev/null && grep -q 100000 $p/cmdline && echo ${p#/proc/}; done; true",
    ]);
    let sleeper = sleeper.trim();
    assert!(!sleeper.is_empty(), "no sleeper found");
    let refused_out = tmp.path().join("refused");
    let snapshot_of = |pid: &str| {
        let out = refused_out.to_str().expect("utf-8");
        env.run(&["snapshot", "svc", out, "--engine", "criu", "--pid", pid])
    };
    let refused = snapshot_of(sleeper);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("SNAPSHOT_DUMP_FAILED")
            && err.contains(&format!("process {sleeper} (sleep)"))
            && err.contains("session leader"),
        "{refused:?}"
    );
    assert!(!refused_out.exists());
    for bad in ["1", "999999"] {
        let o = snapshot_of(bad);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("SNAPSHOT_DUMP_FAILED"),
            "{o:?}"
        );
    }
    let before = counts(&env.run_ok(&["logs", "svc"])).len();
    super::wait_until("the service to go on", Duration::from_secs(30), || {
        counts(&env.run_ok(&["logs", "svc"])).len() > before + 2
    });

    // A keep-alive CRIU checkpoint: the tree is restored in place, its log
    // goes on without a gap.
    let ck = tmp.path().join("ck");
    let ck_s = ck.to_str().expect("utf-8");
    env.run_ok(&["snapshot", "svc", ck_s, "--engine", "criu", "--keep-alive"]);
    let at = counts(&env.run_ok(&["logs", "svc"])).len();
    super::wait_until(
        "the service to go on after its checkpoint",
        Duration::from_secs(30),
        || counts(&env.run_ok(&["logs", "svc"])).len() > at + 3,
    );

    // The move: dump (the source stops), then a VM with another CPU model,
    // twice the memory and two CPUs resumes it.
    let bundle = tmp.path().join("moved");
    let b = bundle.to_str().expect("utf-8");
    let snap = env.json(&["snapshot", "svc", b, "--engine", "criu", "--json"]);
    assert_eq!(snap["engine"], "criu", "{snap}");
    // Above the pids a fresh VM of another shape uses for its own boot.
    assert!(snap["pid"].as_u64() > Some(10_000), "{snap}");
    assert!(bundle.join("img").join("inventory.img").is_file());
    assert!(bundle.join("rootdisk.qcow2").is_file());
    let ls = env.run_ok(&["ls"]);
    assert!(!ls.contains("svc "), "the source still runs: {ls}");
    // The log's records (JSON lines), as `logs` prints them.
    let logged: String = std::fs::read_to_string(bundle.join("main.log"))
        .expect("main.log")
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|r| r["data"].as_str().map(str::to_string))
        .collect();
    let logged = counts(&logged);
    let last = *logged.last().expect("counts in the bundle's log");
    let dry = env.run_ok(&["restore", b, "--dry-run"]);
    assert!(dry.contains("valid CRIU bundle"), "{dry}");
    // A whole-VM option on a CRIU bundle's sibling engine is refused.
    let o = env.run(&["snapshot", "nosuchvm", b, "--engine", "criu", "--full"]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--full"),
        "{o:?}"
    );

    env.run_ok(&[
        "restore",
        b,
        "--name",
        "moved",
        "--detached",
        "--memory",
        "1024",
        "--cpus",
        "2",
        "--cpu-model",
        "max",
    ]);
    let inside = env.run_ok(&[
        "exec",
        "moved",
        "--",
        "sh",
        "-c",
        "grep -m1 'model name' /proc/cpuinfo; nproc; grep MemTotal /proc/meminfo",
    ]);
    assert!(
        !inside.contains("Nehalem") && inside.contains("\n2\n"),
        "{inside}"
    );
    let mem_kb: u64 = inside
        .split_whitespace()
        .skip_while(|w| *w != "MemTotal:")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .expect("MemTotal");
    assert!(mem_kb > 700 * 1024, "{inside}");
    // The log carries the source's counts, then the restored process's,
    // one after the other: a counter started afresh would log n=1 again.
    super::wait_until(
        "the moved service to count on",
        Duration::from_secs(60),
        || counts(&env.run_ok(&["logs", "moved"])).len() > logged.len() + 5,
    );
    let all = counts(&env.run_ok(&["logs", "moved"]));
    assert_eq!(
        all[..logged.len()],
        logged[..],
        "the bundle's log comes first"
    );
    let expected: Vec<u64> = (1..=all.len() as u64).collect();
    assert_eq!(
        all, expected,
        "counts after {last} are not the restored counter's"
    );
    let on_disk: u64 = env
        .run_ok(&["exec", "moved", "--", "cat", "/root/count"])
        .trim()
        .parse()
        .expect("count");
    assert!(on_disk > last, "disk count {on_disk}, dumped at {last}");
    // The restored tree is the VM's main command: a signal ends it and the
    // VM with it, with the status a shell reports.
    env.run_ok(&["kill", "moved"]);
    let waited = env.run(&["wait", "moved"]);
    assert_eq!(waited.status.code(), Some(143), "{waited:?}");
}
