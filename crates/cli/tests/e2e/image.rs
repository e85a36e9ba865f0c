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
