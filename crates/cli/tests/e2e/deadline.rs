//! The snapshot deadline covers the whole operation: a snapshot that runs
//! past it leaves no bundle (not even a hidden temp directory), answers
//! SNAPSHOT_TIMEOUT, and the source runs on. And the QEMU command line a
//! VM runs is the library's, which the benchmark builds its baselines from.

use std::path::Path;
use std::time::Instant;

use super::Env;

/// Entries of `dir`, hidden ones included.
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_snapshot_past_its_deadline_leaves_no_bundle_and_the_source_running() {
    let env = Env::new();
    let info = env.json(&[
        "boot",
        "--name",
        "big",
        "--memory",
        "3072",
        "--detached",
        "--json",
    ]);
    let vm_dir = Path::new(info["control_socket"].as_str().expect("control socket"))
        .parent()
        .expect("vm dir")
        .to_path_buf();
    // 900 MiB of non-zero guest RAM (tmpfs pages): the sparse copy, digest
    // and sync of the RAM file after the migration take well over a second
    // (400 MiB once made it in under one on a quiet machine).
    env.run_ok(&[
        "exec",
        "big",
        "--",
        "sh",
        "-c",
        "head -c 1048576 /dev/urandom > /tmp/mib && \
         for i in $(seq 900); do cat /tmp/mib; done > /dev/shm/fill && \
         wc -c < /dev/shm/fill",
    ]);

    let out_dir = tempfile::tempdir().expect("tmp");
    let out = out_dir.path().join("late.snap");
    let t0 = Instant::now();
    let r = env.run(&[
        "snapshot",
        "big",
        out.to_str().expect("path"),
        "--timeout",
        "1",
    ]);
    let took = t0.elapsed();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "the snapshot cannot finish in 1 s");
    assert!(
        stderr.contains("SNAPSHOT_TIMEOUT"),
        "a late snapshot answers SNAPSHOT_TIMEOUT: {stderr}"
    );
    // The supervisor answered at its deadline (plus cleanup), not the client
    // at its own, later one.
    assert!(
        took.as_secs() < 25,
        "the answer came after {took:?}, the client's margin"
    );
    assert!(!out.exists(), "no bundle past the deadline");
    assert_eq!(
        entries(out_dir.path()),
        Vec::<String>::new(),
        "no hidden temp bundle"
    );
    assert!(
        !vm_dir.join("snapshot.partial").exists(),
        "the partial-bundle marker is gone"
    );

    // The source runs on: listed as running, and its guest answers.
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls[0]["name"], "big");
    assert_eq!(ls[0]["state"], "running", "{ls}");
    let out_s = env.run_ok(&["exec", "big", "--", "sh", "-c", "wc -c < /dev/shm/fill"]);
    assert_eq!(out_s.trim(), (900u64 << 20).to_string());

    // With time enough, the same VM snapshots (so the failure above was the
    // deadline, not the VM), and the source stops with a complete bundle.
    let good = out_dir.path().join("good.snap");
    let rep = env.json(&["snapshot", "big", good.to_str().expect("path"), "--json"]);
    eprintln!("snapshot with the default deadline: {rep}");
    assert!(good.join("manifest.json").exists(), "a complete bundle");
    assert_eq!(entries(out_dir.path()), vec!["good.snap".to_string()]);
    assert_eq!(env.json(&["ls", "--json"]), serde_json::json!([]));
}

/// The command line a live VM's QEMU runs is the library's `qemu_args` of
/// its spec: what the benchmark's baselines rely on instead of reading it
/// from `/proc`.
#[test]
fn a_running_qemu_has_the_library_command_line() {
    let env = Env::new();
    let info = env.json(&["boot", "--name", "argv", "--detached", "--json"]);
    let vm_dir = Path::new(info["control_socket"].as_str().expect("control socket"))
        .parent()
        .expect("vm dir")
        .to_path_buf();
    let ls = env.json(&["ls", "--json"]);
    let pid = ls[0]["qemu_pid"].as_u64().expect("qemu pid");
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline");
    let live: Vec<String> = raw
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .skip(1)
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    let spec =
        machinen::spec::VmSpec::load(&vm_dir.join(machinen::spec::files::SPEC)).expect("spec");
    let accel = machinen::accel::probe(spec.accel.as_deref()).expect("accel");
    let host = machinen::qemu_args::QemuHost::probe(accel);
    assert_eq!(live, machinen::qemu_args::qemu_args(&spec, &host));
    env.run_ok(&["stop", "--force", "argv"]);
}
