//! Reading, validating and checking images: a well-formed sample, each
//! refusal the restore subset makes, malformed documents, and fuzzing of
//! every parser and the validator with arbitrary and mutated input.

use std::path::Path;

use proptest::prelude::*;
use serde_json::{json, Value};

use super::*;

fn amd64_regs(rip: &str, rsp: &str) -> Value {
    let mut r = json!({"arch": "amd64", "rip": rip, "rsp": rsp, "rflags": "0x246",
        "fsBase": "0x7f0000001740", "gsBase": "0x0"});
    for n in [
        "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13",
        "r14", "r15",
    ] {
        r[n] = json!("0x0");
    }
    r
}

/// A `sleep`-like process: text from its file, data and stack captured,
/// vdso left to the kernel, stdio only, blocked in clock_nanosleep.
fn sample() -> [Value; 5] {
    let refusals = json!({"vocabularyVersion": 1, "refusals": []});
    let manifest = json!({
        "formatVersion": 1, "kind": "machinen.native-process-image",
        "capture": {"method": "external-ptrace-procfs", "sourceArch": "amd64", "pid": 412, "capturedAt": "2026-12-05T08:00:00Z"},
        "target": {"mode": "native-cross-isa", "arch": "amd64", "abi": "linux-user"},
        "process": {"exe": "/usr/bin/sleeper", "argv": ["sleeper", "30"], "env": {"PATH": "/usr/bin"}, "cwd": "/"},
        "refusals": refusals,
    });
    let perm = |r: bool, w: bool, x: bool| json!({"read": r, "write": w, "execute": x, "private": true, "shared": false});
    let mappings = json!({
        "formatVersion": 1,
        "mappings": [
            {"id": "m0", "kind": "text", "sourceStart": "0x400000", "sourceEnd": "0x401000", "sizeBytes": 4096,
             "permissions": perm(true, false, true),
             "file": {"path": "/usr/bin/sleeper", "offset": 0},
             "target": {"materialization": "recreate"}},
            {"id": "m1", "kind": "data", "sourceStart": "0x402000", "sourceEnd": "0x404000", "sizeBytes": 8192,
             "permissions": perm(true, true, false),
             "captured": {"file": "native-memory.bin", "offset": 0, "sizeBytes": 8192},
             "target": {"materialization": "translate"}},
            {"id": "m2", "kind": "stack", "sourceStart": "0x7ffd0000", "sourceEnd": "0x7ffd2000", "sizeBytes": 8192,
             "permissions": perm(true, true, false),
             "captured": {"file": "native-memory.bin", "offset": 8192, "sizeBytes": 8192},
             "target": {"materialization": "translate"}},
            {"id": "m3", "kind": "vdso", "sourceStart": "0x7fff0000", "sourceEnd": "0x7fff2000", "sizeBytes": 8192,
             "permissions": perm(true, false, true),
             "target": {"materialization": "omit", "reason": "the target kernel's"}},
        ],
        "refusals": refusals,
    });
    let threads = json!({
        "formatVersion": 1,
        "threads": [{
            "id": "t0", "lwpid": 412, "state": "stopped", "stopReason": "ptrace-stop", "stackMapping": "m2",
            "sourceRegisters": amd64_regs("0x400123", "0x7ffd1f00"),
            "syscall": {"state": "inside-syscall", "number": 230, "name": "clock_nanosleep",
                        "arguments": ["0x1", "0x0", "0x7ffd1f80", "0x7ffd1f90"]},
            "signal": {"blocked": [], "pending": [], "activeFrame": false, "altStack": {"state": "disabled"}},
            "tls": {"threadPointer": "0x7f0000001740", "rseq": {"state": "captured"}},
        }],
        "refusals": refusals,
    });
    let resources = json!({
        "formatVersion": 1,
        "resources": [
            {"id": "r0", "kind": "pipe", "state": "recipe", "fd": 0},
            {"id": "r1", "kind": "pipe", "state": "recipe", "fd": 1},
            {"id": "r2", "kind": "pty", "state": "recipe", "fd": 2, "path": "/dev/pts/0"},
            {"id": "r3", "kind": "cwd", "state": "captured", "path": "/"},
        ],
        "refusals": refusals,
    });
    let translation = json!({
        "formatVersion": 1, "mode": "native-cross-isa", "sourceArch": "amd64", "targetArch": "amd64",
        "codeLocations": [{"id": "c0", "sourceMapping": "m0", "sourceAddress": "0x400123", "state": "pending"}],
        "threads": [{"sourceThreadId": "t0", "state": "pending"}],
        "memoryRelocations": [],
        "refusals": refusals,
    });
    [manifest, mappings, threads, resources, translation]
}

const NAMES: [&str; 5] = [
    FILES.manifest,
    FILES.mappings,
    FILES.threads,
    FILES.resources,
    FILES.translation,
];

fn write(dir: &Path, docs: &[Value; 5], memory: usize) {
    for (name, v) in NAMES.iter().zip(docs) {
        std::fs::write(dir.join(name), serde_json::to_vec_pretty(v).expect("json")).expect("write");
    }
    std::fs::write(dir.join(FILES.memory), vec![0xa5u8; memory]).expect("memory");
}

fn read(docs: &[Value; 5], memory: usize) -> Result<Image, Invalid> {
    let dir = tempfile::tempdir().expect("tmp");
    write(dir.path(), docs, memory);
    read_dir(dir.path())
}

fn codes(plan: &Plan) -> Vec<RefusalCode> {
    plan.refusals.iter().map(|r| r.code).collect()
}

fn amd64() -> CheckOptions {
    CheckOptions {
        target_arch: Some(Arch::Amd64),
        ..CheckOptions::default()
    }
}

#[test]
fn a_sleeping_single_threaded_process_is_restorable_on_its_own_arch() {
    let image = read(&sample(), 16384).expect("valid");
    let plan = check(&image, amd64());
    assert!(plan.restorable(), "{:?}", plan.refusals);
    let actions: Vec<&str> = plan
        .steps
        .iter()
        .map(|s| match s {
            PlanStep::MapFile { .. } => "file",
            PlanStep::MapCaptured { .. } => "captured",
            PlanStep::MapZeroed { .. } => "zeroed",
            PlanStep::Omit { .. } => "omit",
            PlanStep::InheritStdio { .. } => "stdio",
            PlanStep::SetRegisters { .. } => "regs",
            PlanStep::Continue { .. } => "continue",
            PlanStep::ResumeWait { .. } => "resume",
        })
        .collect();
    assert_eq!(
        actions,
        ["file", "captured", "captured", "omit", "stdio", "regs", "resume"]
    );
    assert!(plan
        .steps
        .contains(&PlanStep::InheritStdio { fds: vec![0, 1, 2] }));
    // The plan is JSON (what `image check --json` prints) and reads back.
    let back: Plan =
        serde_json::from_value(serde_json::to_value(&plan).expect("json")).expect("parse");
    assert_eq!(back, plan);
}

/// Change the sample with `f`, check it for `target`, return the codes.
fn refused(f: impl FnOnce(&mut [Value; 5]), target: Arch) -> Vec<RefusalCode> {
    let mut d = sample();
    f(&mut d);
    let image = read(&d, 16384).expect("still valid");
    let plan = check(
        &image,
        CheckOptions {
            target_arch: Some(target),
            ..CheckOptions::default()
        },
    );
    assert!(plan.steps.is_empty(), "a refused plan has no steps");
    codes(&plan)
}

#[test]
fn what_the_restore_cannot_do_is_refused_with_the_seeds_codes() {
    use RefusalCode as C;
    assert_eq!(
        refused(|_| {}, Arch::Arm64),
        [C::ArchitecturePairUnsupported]
    );
    // An open socket.
    assert_eq!(
        refused(
            |d| d[3]["resources"]
                .as_array_mut()
                .expect("list")
                .push(json!({"id": "r4", "kind": "socket", "state": "refused", "fd": 3})),
            Arch::Amd64
        ),
        [C::ResourceKindUnsupported]
    );
    // A second thread.
    assert_eq!(
        refused(
            |d| {
                let mut t = d[2]["threads"][0].clone();
                t["id"] = json!("t1");
                t["lwpid"] = json!(413);
                d[2]["threads"].as_array_mut().expect("list").push(t);
            },
            Arch::Amd64
        ),
        [C::ThreadStateUnsupported]
    );
    // A file descriptor past stdio.
    assert_eq!(
        refused(
            |d| d[3]["resources"].as_array_mut().expect("list").push(
                json!({"id": "r4", "kind": "file", "state": "captured", "fd": 7, "path": "/tmp/x"})
            ),
            Arch::Amd64
        ),
        [C::FdKindUnsupported]
    );
    // Blocked reading a descriptor; in an unknown system call; in a restart.
    assert_eq!(
        refused(
            |d| d[2]["threads"][0]["syscall"]["name"] = json!("read"),
            Arch::Amd64
        ),
        [C::BlockingSyscallStateUnsupported]
    );
    assert_eq!(
        refused(
            |d| d[2]["threads"][0]["syscall"]["name"] = json!("mystery"),
            Arch::Amd64
        ),
        [C::ActiveSyscall]
    );
    assert_eq!(
        refused(
            |d| d[2]["threads"][0]["syscall"] = json!({"state": "restart-block"}),
            Arch::Amd64
        ),
        [C::SyscallRestartUnsupported]
    );
    // Signals: a handler running, one pending.
    assert_eq!(
        refused(
            |d| d[2]["threads"][0]["signal"]["activeFrame"] = json!(true),
            Arch::Amd64
        ),
        [C::SignalFrameActive]
    );
    assert_eq!(
        refused(
            |d| d[2]["threads"][0]["signal"]["pending"] = json!(["SIGUSR1"]),
            Arch::Amd64
        ),
        [C::SignalStateUnsupported]
    );
    // A shared mapping; a written mapping that was not captured.
    assert_eq!(
        refused(
            |d| d[1]["mappings"][1]["permissions"]["shared"] = json!(true),
            Arch::Amd64
        ),
        [C::MappingPermissionUnsupported]
    );
    assert_eq!(
        refused(
            |d| {
                let m = d[1]["mappings"][1].as_object_mut().expect("mapping");
                m.remove("captured");
            },
            Arch::Amd64
        ),
        [C::MappingUnreadable]
    );
    // A vDSO to be translated.
    assert_eq!(
        refused(
            |d| d[1]["mappings"][3]["target"]["materialization"] = json!("translate"),
            Arch::Amd64
        ),
        [C::VdsoPolicyUnsupported]
    );
    // A refusal the capture recorded comes through with its code.
    assert_eq!(
        refused(
            |d| d[0]["refusals"]["refusals"] =
                json!([{"code": "futex-state-unsupported", "message": "robust list"}]),
            Arch::Amd64
        ),
        [C::FutexStateUnsupported]
    );
    // A sleep policy of refuse.
    let image = read(&sample(), 16384).expect("valid");
    let plan = check(
        &image,
        CheckOptions {
            sleep_timer_policy: SyscallPolicy::Refuse,
            ..amd64()
        },
    );
    assert_eq!(codes(&plan), [C::ActiveSyscall]);
}

fn invalid(f: impl FnOnce(&mut [Value; 5]), memory: usize) -> String {
    let mut d = sample();
    f(&mut d);
    match read(&d, memory) {
        Ok(_) => panic!("accepted"),
        Err(e) => e.errors.join("\n"),
    }
}

#[test]
fn malformed_or_inconsistent_documents_are_invalid_with_every_reason() {
    assert!(invalid(|d| d[0]["formatVersion"] = json!(2), 16384).contains("native-process.json"));
    assert!(invalid(|d| d[0]["kind"] = json!("other"), 16384).contains("expected"));
    assert!(invalid(|d| d[1]["mappings"][0]["extra"] = json!(1), 16384).contains("unknown field"));
    assert!(
        invalid(|d| d[3]["resources"][0]["kind"] = json!("quantum"), 16384)
            .contains("native-resources.json")
    );
    assert!(invalid(
        |d| d[0]["refusals"]["refusals"] = json!([{"code": "no-such", "message": "x"}]),
        16384
    )
    .contains("unknown variant"));
    // The memory file is shorter than the captured ranges.
    assert!(invalid(|_| {}, 100).contains("outside native-memory.bin"));
    // Overlapping and unaligned mappings, a size that does not add up.
    assert!(invalid(
        |d| d[1]["mappings"][1]["sourceStart"] = json!("0x400000"),
        16384
    )
    .contains("overlaps"));
    assert!(invalid(
        |d| d[1]["mappings"][0]["sourceEnd"] = json!("0x400fff"),
        16384
    )
    .contains("page-aligned"));
    assert!(invalid(|d| d[1]["mappings"][0]["sizeBytes"] = json!(1), 16384).contains("sizeBytes"));
    // References to what is not there; registers of another architecture.
    assert!(
        invalid(|d| d[2]["threads"][0]["stackMapping"] = json!("m9"), 16384)
            .contains("names no mapping")
    );
    assert!(invalid(
        |d| d[4]["threads"][0]["sourceThreadId"] = json!("t9"),
        16384
    )
    .contains("no captured thread"));
    assert!(invalid(|d| d[4]["sourceArch"] = json!("arm64"), 16384).contains("sourceArch"));
    assert!(invalid(
        |d| d[2]["threads"][0]["sourceRegisters"]["rip"] = json!("0xZZ"),
        16384
    )
    .contains("register rip"));
    assert!(invalid(
        |d| d[2]["threads"][0]["sourceRegisters"]["rip"] = json!("0x11112222333344445"),
        16384
    )
    .contains("register rip"));
    let errs = invalid(
        |d| d[4]["codeLocations"][0]["sourceAddress"] = json!("0x500000"),
        16384,
    );
    assert!(errs.contains("outside mapping"), "{errs}");
    // Every problem is reported, not just the first.
    let many = invalid(
        |d| {
            d[2]["threads"][0]["stackMapping"] = json!("m9");
            d[4]["threads"][0]["sourceThreadId"] = json!("t9");
        },
        16384,
    );
    assert_eq!(many.lines().count(), 2, "{many}");
}

#[test]
fn files_must_be_regular_bounded_and_present() {
    let dir = tempfile::tempdir().expect("tmp");
    write(dir.path(), &sample(), 16384);
    assert!(is_image(dir.path()));
    // A symlink in place of a document is not followed.
    let outside = dir.path().join("outside.json");
    std::fs::rename(dir.path().join(FILES.threads), &outside).expect("move");
    std::os::unix::fs::symlink(&outside, dir.path().join(FILES.threads)).expect("symlink");
    let e = read_dir(dir.path()).expect_err("symlink");
    assert!(
        e.errors.iter().any(|x| x.contains("not a regular file")),
        "{e}"
    );
    std::fs::remove_file(dir.path().join(FILES.threads)).expect("rm");
    std::fs::rename(&outside, dir.path().join(FILES.threads)).expect("back");
    // Too big to be read.
    let f = std::fs::File::create(dir.path().join(FILES.resources)).expect("create");
    f.set_len(MAX_DOCUMENT_BYTES + 1).expect("grow");
    let e = read_dir(dir.path()).expect_err("too big");
    assert!(e.errors.iter().any(|x| x.contains("more than")), "{e}");
    // Missing.
    std::fs::remove_file(dir.path().join(FILES.memory)).expect("rm");
    let e = read_dir(dir.path()).expect_err("missing");
    assert_eq!(e.errors.len(), 2, "{e}");
}

/// A JSON value mutated at one random place: a field removed, a value
/// replaced by another JSON value.
fn mutate(v: &mut Value, path: &[usize], replacement: &Value, remove: bool) {
    let Some((&i, rest)) = path.split_first() else {
        *v = replacement.clone();
        return;
    };
    match v {
        Value::Object(o) if !o.is_empty() => {
            let key = o.keys().nth(i % o.len()).cloned().expect("key");
            if rest.is_empty() && remove {
                o.remove(&key);
            } else if let Some(x) = o.get_mut(&key) {
                mutate(x, rest, replacement, remove);
            }
        }
        Value::Array(a) if !a.is_empty() => {
            let n = a.len();
            mutate(&mut a[i % n], rest, replacement, remove);
        }
        _ => *v = replacement.clone(),
    }
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        "[a-z0-9x-]{0,12}".prop_map(Value::from),
        Just(json!("0xffffffffffffffff")),
        Just(json!(u64::MAX)),
    ];
    leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-zA-Z]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes in any document: an error, never a panic.
    #[test]
    fn fuzz_arbitrary_bytes_in_any_document(which in 0usize..5, bytes in prop::collection::vec(any::<u8>(), 0..512), memory in 0usize..20000) {
        let dir = tempfile::tempdir().expect("tmp");
        write(dir.path(), &sample(), memory);
        std::fs::write(dir.path().join(NAMES[which]), &bytes).expect("write");
        if let Ok(image) = read_dir(dir.path()) {
            let _ = check(&image, CheckOptions::default());
        }
    }

    /// A valid image changed at one place: read, validated and checked
    /// without a panic; when still valid, a verdict either way.
    #[test]
    fn fuzz_mutated_documents(which in 0usize..5, path in prop::collection::vec(any::<usize>(), 1..6), replacement in arb_json(), remove in any::<bool>(), memory in 0usize..20000) {
        let mut d = sample();
        mutate(&mut d[which], &path, &replacement, remove);
        if let Ok(image) = read(&d, memory) {
            for target in Arch::ALL {
                let plan = check(&image, CheckOptions { target_arch: Some(target), ..CheckOptions::default() });
                prop_assert!(plan.refusals.is_empty() || plan.steps.is_empty());
            }
        }
    }
}
