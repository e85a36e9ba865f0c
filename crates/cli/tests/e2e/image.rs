//! `machinen image check` and `image schema` on the example native process
//! image and on copies changed to be refused or invalid (no VM needed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn machinen(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_machinen"))
        .args(args)
        .output()
        .expect("run machinen")
}

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/process-image/sleeper")
}

fn copy_of_example() -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("tmp");
    for e in std::fs::read_dir(example()).expect("example") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), dir.path().join(e.file_name())).expect("copy");
    }
    dir
}

fn edit(dir: &Path, file: &str, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join(file);
    let mut v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&p).expect("read")).expect("json");
    f(&mut v);
    std::fs::write(&p, serde_json::to_vec(&v).expect("json")).expect("write");
}

#[test]
fn image_check_prints_the_plan_the_refusals_or_what_is_invalid() {
    let dir = example();
    let d = dir.to_str().expect("utf-8");

    let ok = machinen(&["image", "check", d]);
    assert_eq!(ok.status.code(), Some(0), "{ok:?}");
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(text.contains("restorable"), "{text}");
    assert!(text.contains("clock_nanosleep again"), "{text}");

    let plan: serde_json::Value =
        serde_json::from_slice(&machinen(&["image", "check", d, "--json"]).stdout).expect("json");
    assert_eq!(plan["refusals"], serde_json::json!([]));
    assert_eq!(plan["steps"][1]["action"], "map-captured");
    assert_eq!(plan["steps"][1]["memoryOffset"], 0);

    // Another instruction set: refused with the vocabulary's code.
    let arm = machinen(&["image", "check", d, "--target-arch", "arm64", "--json"]);
    assert_eq!(arm.status.code(), Some(125));
    let plan: serde_json::Value = serde_json::from_slice(&arm.stdout).expect("json");
    assert_eq!(plan["refusals"][0]["code"], "architecture-pair-unsupported");
    assert_eq!(plan["steps"], serde_json::json!([]));
    let human = machinen(&["image", "check", d, "--target-arch", "arm64"]);
    let err = String::from_utf8_lossy(&human.stderr);
    assert!(
        err.contains("BOOT_PORTABLE_UNSUPPORTED") && err.contains("architecture-pair-unsupported"),
        "{err}"
    );

    // A sleep policy of refuse: active-syscall.
    let p = machinen(&["image", "check", d, "--sleep-policy", "refuse", "--json"]);
    let plan: serde_json::Value = serde_json::from_slice(&p.stdout).expect("json");
    assert_eq!(plan["refusals"][0]["code"], "active-syscall");

    // An open socket and a second thread.
    let copy = copy_of_example();
    edit(copy.path(), "native-resources.json", |v| {
        v["resources"]
            .as_array_mut()
            .expect("list")
            .push(serde_json::json!({"id": "r9", "kind": "socket", "state": "refused", "fd": 3}));
    });
    edit(copy.path(), "native-threads.json", |v| {
        let mut t = v["threads"][0].clone();
        t["id"] = "t1".into();
        v["threads"].as_array_mut().expect("list").push(t);
    });
    let c = copy.path().to_str().expect("utf-8");
    let p = machinen(&["image", "check", c, "--json"]);
    assert_eq!(p.status.code(), Some(125));
    let plan: serde_json::Value = serde_json::from_slice(&p.stdout).expect("json");
    let codes: Vec<&str> = plan["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .filter_map(|r| r["code"].as_str())
        .collect();
    assert_eq!(
        codes,
        ["resource-kind-unsupported", "thread-state-unsupported"]
    );

    // Invalid documents: exit 2, every problem named.
    edit(copy.path(), "native-threads.json", |v| {
        v["threads"][0]["stackMapping"] = "nope".into()
    });
    edit(copy.path(), "native-process.json", |v| {
        v["formatVersion"] = 7.into()
    });
    let bad = machinen(&["image", "check", c]);
    assert_eq!(bad.status.code(), Some(2));
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(
        err.contains("PORTABLE_IMAGE_INVALID") && err.contains("native-process.json"),
        "{err}"
    );

    // The schemas: one document, or all five.
    let s: serde_json::Value =
        serde_json::from_slice(&machinen(&["image", "schema", "threads"]).stdout).expect("json");
    assert_eq!(
        s["$id"],
        "https://machinen.dev/schemas/native-process-image/threads.schema.json"
    );
    let all: serde_json::Value =
        serde_json::from_slice(&machinen(&["image", "schema"]).stdout).expect("json");
    assert_eq!(all.as_object().expect("map").len(), 5);
}

/// Start `script` in the background in the guest, detached from the exec;
/// returns its pid.
fn spawn_in_guest(env: &super::Env, vm: &str, script: &str) -> String {
    let out = env.run_ok(&[
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!("setsid sh -c '{script}' </dev/null >/dev/null 2>&1 & echo $!"),
    ]);
    out.trim().to_string()
}

/// The pid of the first guest process whose command line starts with
/// `prefix` (the shell above execs it, so usually the same pid).
fn guest_pid(env: &super::Env, vm: &str, prefix: &str) -> String {
    let scan = format!(
        r#"for p in /proc/[0-9]*; do c=$(tr '\0' ' ' < $p/cmdline 2>/dev/null); case "$c" in "{prefix}"*) echo ${{p#/proc/}}; exit 0;; esac; done; exit 1"#
    );
    let mut pid = String::new();
    super::wait_until(
        "the process to start",
        std::time::Duration::from_secs(30),
        || {
            let o = env.run(&["exec", vm, "--", "sh", "-c", &scan]);
            pid = String::from_utf8_lossy(&o.stdout).trim().to_string();
            o.status.success() && !pid.is_empty()
        },
    );
    pid
}

/// Wait until `test` (a shell condition) holds in the guest: a program
/// has finished starting (its modules loaded, its socket or threads made).
fn guest_ready(env: &super::Env, vm: &str, test: &str) {
    super::wait_until(test, std::time::Duration::from_secs(60), || {
        env.run(&["exec", vm, "--", "sh", "-c", test])
            .status
            .success()
    });
}

fn codes_of(plan: &serde_json::Value) -> Vec<String> {
    plan["refusals"]
        .as_array()
        .expect("refusals")
        .iter()
        .filter_map(|r| r["code"].as_str().map(String::from))
        .collect()
}

#[test]
fn processes_are_captured_from_outside_checked_and_refused_with_the_seeds_codes() {
    let env = super::Env::new();
    env.run_ok(&["boot", "--name", "cap", "--detached"]);
    let tmp = tempfile::tempdir().expect("tmp");

    // A sleeping single-threaded process with stdio only: restorable here,
    // and it goes on running after the capture.
    spawn_in_guest(&env, "cap", "exec sleep 600");
    let pid = guest_pid(&env, "cap", "sleep 600");
    let out = tmp.path().join("sleep.img");
    let o = out.to_str().expect("utf-8");
    let r = env.json(&["capture", "cap", &pid, "-o", o, "--json"]);
    assert_eq!(r["threads"], 1, "{r}");
    assert!(r["memory_bytes"].as_u64().expect("bytes") > 4096, "{r}");
    assert_eq!(r["plan"]["refusals"], serde_json::json!([]), "{r}");
    let steps = r["plan"]["steps"].as_array().expect("steps");
    let last = steps.last().expect("a step");
    assert_eq!(last["action"], "resume-wait", "{r}");
    assert_eq!(last["syscall"], "clock_nanosleep", "{r}");
    assert!(steps.iter().any(|s| s["action"] == "map-captured"), "{r}");
    assert!(steps.iter().any(|s| s["action"] == "inherit-stdio"), "{r}");
    // The documents are there and check on their own; the memory file holds
    // exactly what the mappings say.
    let check = machinen(&["image", "check", o, "--json"]);
    assert_eq!(check.status.code(), Some(0), "{check:?}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("native-process.json")).expect("manifest"))
            .expect("json");
    assert_eq!(
        manifest["process"]["argv"],
        serde_json::json!(["sleep", "600"])
    );
    assert_eq!(manifest["capture"]["pid"].to_string(), pid);
    assert_eq!(
        std::fs::metadata(out.join("native-memory.bin"))
            .expect("memory")
            .len(),
        r["memory_bytes"].as_u64().expect("bytes")
    );
    // Still there, still asleep; no scratch left in the guest.
    let state = env.run_ok(&[
        "exec",
        "cap",
        "--",
        "sh",
        "-c",
        &format!("grep State /proc/{pid}/status; ls -a /var/tmp"),
    ]);
    assert!(state.contains("S (sleeping)"), "{state}");
    assert!(!state.contains(".machinen-capture"), "{state}");
    // The destination must be new.
    let again = env.run(&["capture", "cap", &pid, "-o", o]);
    assert!(String::from_utf8_lossy(&again.stderr).contains("FILES_EXISTS"));

    // An open socket.
    spawn_in_guest(
        &env,
        "cap",
        "exec perl -MIO::Socket::INET -e \"my \\$s = IO::Socket::INET->new(Listen => 1, LocalPort => 7777) or die; sleep 600\"",
    );
    let sock = guest_pid(&env, "cap", "perl -MIO::Socket::INET");
    guest_ready(
        &env,
        "cap",
        &format!("ls -l /proc/{sock}/fd | grep -q socket:"),
    );
    let so = tmp.path().join("sock.img");
    let r = env.json(&[
        "capture",
        "cap",
        &sock,
        "-o",
        so.to_str().expect("utf-8"),
        "--json",
    ]);
    assert!(
        codes_of(&r["plan"]).contains(&"resource-kind-unsupported".to_string()),
        "{r}"
    );
    assert_eq!(r["plan"]["steps"], serde_json::json!([]));
    let human = machinen(&["image", "check", so.to_str().expect("utf-8")]);
    assert_eq!(human.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&human.stderr).contains("resource-kind-unsupported"));

    // Three threads.
    spawn_in_guest(
        &env,
        "cap",
        "exec perl -Mthreads -e \"threads->create(sub { sleep 600 }) for 1..2; sleep 600\"",
    );
    let thr = guest_pid(&env, "cap", "perl -Mthreads");
    guest_ready(
        &env,
        "cap",
        &format!("test $(ls /proc/{thr}/task | wc -l) = 3"),
    );
    let to = tmp.path().join("threads.img");
    let r = env.json(&[
        "capture",
        "cap",
        &thr,
        "-o",
        to.to_str().expect("utf-8"),
        "--json",
    ]);
    assert_eq!(r["threads"], 3, "{r}");
    assert!(
        codes_of(&r["plan"]).contains(&"thread-state-unsupported".to_string()),
        "{r}"
    );

    // --kill ends the process once captured.
    let ko = tmp.path().join("killed.img");
    let r = env.json(&[
        "capture",
        "cap",
        &pid,
        "-o",
        ko.to_str().expect("utf-8"),
        "--kill",
        "--json",
    ]);
    assert_eq!(r["killed"], true);
    super::wait_until(
        "the captured process to end",
        std::time::Duration::from_secs(20),
        || {
            env.run(&["exec", "cap", "--", "test", "-e", &format!("/proc/{pid}")])
                .status
                .code()
                == Some(1)
        },
    );

    // Capture, then materialize in another VM: a static C program that
    // counts in memory, says it started, sleeps 6 s, prints the count and
    // exits 5. Captured (and killed) in its sleep, brought back elsewhere,
    // it sleeps again, prints the count it had and exits 5.
    let src = tmp.path().join("counter.c");
    std::fs::write(
        &src,
        "#include <stdio.h>\n#include <time.h>\nstatic volatile long counter;\n\
         int main(void) { for (int i = 0; i < 3; i++) counter += 7; printf(\"started\\n\"); fflush(stdout);\n\
         struct timespec ts = {6, 0}; nanosleep(&ts, NULL); printf(\"counter=%ld\\n\", counter); return 5; }\n",
    )
    .expect("source");
    let bin = tmp.path().join("counter");
    let cc = Command::new("cc")
        .args(["-static", "-O1", "-o"])
        .arg(&bin)
        .arg(&src)
        .output()
        .expect("cc (gcc and the static C library, libc6-dev)");
    assert!(cc.status.success(), "{cc:?}");
    let b = bin.to_str().expect("utf-8");
    env.run_ok(&["cp", b, "cap:/usr/local/bin/counter"]);
    spawn_in_guest(&env, "cap", "exec /usr/local/bin/counter >/tmp/counter.out");
    let cpid = guest_pid(&env, "cap", "/usr/local/bin/counter");
    guest_ready(&env, "cap", "grep -q started /tmp/counter.out");
    let co = tmp.path().join("counter.img");
    let c = co.to_str().expect("utf-8");
    let r = env.json(&["capture", "cap", &cpid, "-o", c, "--kill", "--json"]);
    assert_eq!(r["plan"]["refusals"], serde_json::json!([]), "{r}");
    env.run_ok(&["boot", "--name", "mat", "--detached"]);
    // The process maps its code from its file: the other VM has it too.
    env.run_ok(&["cp", b, "mat:/usr/local/bin/counter"]);
    let t0 = std::time::Instant::now();
    let m = env.run(&["materialize", "mat", c]);
    let took = t0.elapsed();
    assert_eq!(m.status.code(), Some(5), "{m:?}");
    assert_eq!(String::from_utf8_lossy(&m.stdout), "counter=21\n", "{m:?}");
    // It waited again for the time it asked for (6 s, an upper bound).
    assert!(took >= std::time::Duration::from_secs(5), "{took:?}");
    let left = env.run_ok(&["exec", "mat", "--", "ls", "-a", "/var/tmp"]);
    assert!(!left.contains(".machinen-materialize"), "{left}");
    // Another file at the process's path, or none: refused with the
    // vocabulary's codes, nothing runs.
    env.run_ok(&[
        "exec",
        "mat",
        "--",
        "sh",
        "-c",
        "echo >> /usr/local/bin/counter",
    ]);
    let other = env.run(&["materialize", "mat", c]);
    assert_eq!(other.status.code(), Some(125), "{other:?}");
    assert!(
        String::from_utf8_lossy(&other.stderr).contains("target-build-mismatch"),
        "{other:?}"
    );
    env.run_ok(&["exec", "mat", "--", "rm", "/usr/local/bin/counter"]);
    let gone = env.run(&["materialize", "mat", c]);
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("target-module-file-missing"),
        "{gone:?}"
    );
    // A refused image is not even copied.
    let refused = env.run(&["materialize", "mat", to.to_str().expect("utf-8")]);
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("BOOT_PORTABLE_UNSUPPORTED"),
        "{refused:?}"
    );
    env.run_ok(&["stop", "mat"]);

    // What cannot be captured: the agent, a process that is not there.
    for bad in ["1", "999999"] {
        let p = tmp.path().join(format!("bad-{bad}.img"));
        let o = env.run(&["capture", "cap", bad, "-o", p.to_str().expect("utf-8")]);
        assert!(
            String::from_utf8_lossy(&o.stderr).contains("SNAPSHOT_PORTABLE_UNSUPPORTED"),
            "{o:?}"
        );
        assert!(!p.exists());
    }
    env.run_ok(&["stop", "cap"]);
}

/// The counter a test reads in `vm` (0 when not written yet).
fn count_in(env: &super::Env, vm: &str) -> u64 {
    let o = env.run(&[
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        "cat /tmp/count 2>/dev/null || echo 0",
    ]);
    String::from_utf8_lossy(&o.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

#[test]
fn criu_moves_a_process_tree_to_a_vm_of_another_size_and_it_goes_on_counting() {
    let env = super::Env::new();
    // Idempotent: fetches CRIU through apt once, then only checks.
    let inst = env.json(&["install", "--criu", "--json"]);
    assert!(
        inst["criu"]["modules"]
            .as_array()
            .expect("modules")
            .iter()
            .any(|m| m == "nf_tables"),
        "{inst}"
    );
    env.run_ok(&["boot", "--name", "src", "--detached"]);
    env.run_ok(&[
        "boot",
        "--name",
        "dst",
        "--cpus",
        "2",
        "--memory",
        "1024",
        "--detached",
    ]);
    // CRIU's own probe of the guest kernel passes (modules loaded first).
    let check = env.run(&["criu", "src", "--", "check"]);
    assert!(
        check.status.success() && String::from_utf8_lossy(&check.stdout).contains("Looks good"),
        "{check:?}"
    );
    // A shell counting in its own memory, writing the count out.
    let pid = spawn_in_guest(
        &env,
        "src",
        r#"i=0; while true; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done"#,
    );
    // Above the pids the bigger VM's boot takes (more CPUs, more threads).
    assert!(pid.parse::<u32>().is_ok_and(|p| p > 10_000), "pid {pid}");
    super::wait_until(
        "the count to reach 30",
        std::time::Duration::from_secs(60),
        || count_in(&env, "src") >= 30,
    );
    env.run_ok(&["exec", "src", "--", "mkdir", "-p", "/var/tmp/ck"]);
    let dump = env.run(&[
        "criu",
        "src",
        "--",
        "dump",
        "-t",
        &pid,
        "-D",
        "/var/tmp/ck",
        "-o",
        "dump.log",
    ]);
    assert!(dump.status.success(), "{dump:?}");
    // Dumped and ended: the count stands still in the source.
    let at_dump = count_in(&env, "src");
    assert!(at_dump >= 30, "{at_dump}");
    let alive = |vm: &str| {
        env.run(&["exec", vm, "--", "sh", "-c", &format!("kill -0 {pid}")])
            .status
            .code()
    };
    assert_eq!(alive("src"), Some(1), "the dumped process still runs");
    std::thread::sleep(std::time::Duration::from_millis(600));
    assert_eq!(count_in(&env, "src"), at_dump);

    // The images move through the host into a VM with twice the CPUs and
    // memory; the count file there starts at 0.
    let tmp = tempfile::tempdir().expect("tmp");
    let host = tmp.path().join("ck");
    let h = host.to_str().expect("utf-8");
    env.run_ok(&["cp", "-r", "src:/var/tmp/ck", h]);
    assert!(host.join("dump.log").is_file());
    env.run_ok(&["cp", "-r", h, "dst:/var/tmp/ck"]);
    env.run_ok(&["exec", "dst", "--", "sh", "-c", "echo 0 > /tmp/count"]);
    let restore = env.run(&[
        "criu",
        "dst",
        "--",
        "restore",
        "-D",
        "/var/tmp/ck",
        "-d",
        "-o",
        "restore.log",
    ]);
    assert!(restore.status.success(), "{restore:?}");
    // Same pid, and the count goes on from where it stood (a counter
    // started afresh would write 1, 2, …).
    assert_eq!(alive("dst"), Some(0), "no process {pid} after the restore");
    let mut first = 0;
    super::wait_until(
        "the restored counter to write",
        std::time::Duration::from_secs(30),
        || {
            first = count_in(&env, "dst");
            first != 0
        },
    );
    assert!(
        first > at_dump,
        "restored count {first}, dumped at {at_dump}"
    );
    super::wait_until(
        "the restored counter to go on",
        std::time::Duration::from_secs(30),
        || count_in(&env, "dst") > first + 3,
    );
    // CRIU's failures come back as its exit status, its messages on stderr.
    let bad = env.run(&[
        "criu",
        "dst",
        "--",
        "dump",
        "-t",
        "999999",
        "-D",
        "/var/tmp/ck",
    ]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    env.run_ok(&["stop", "src"]);
    env.run_ok(&["stop", "dst"]);
}
