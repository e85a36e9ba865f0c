//! The benchmark must not rot: run it in quick mode (one iteration, small
//! sizes) on real VMs and check that it completes and writes a well-formed
//! report. No timing is asserted.
//!
//! Needs what the end-to-end tests need: the installed assets
//! (`machinen install`), the supervisor and the static agent
//! (`scripts/build --debug`); `scripts/test` does all that.

use std::process::{Command, Stdio};

const SECTIONS: &[&str] = &[
    "plain",
    "boot",
    "exec",
    "ports",
    "net",
    "snapshot",
    "fork",
    "chain",
    "transport",
    "savevm",
    "memory",
    "scale",
    "mounts",
    "reclaim",
    "containerd",
];

#[test]
fn quick_benchmark_completes_and_writes_valid_json() {
    let dir = tempfile::tempdir().expect("tmp");
    let json_path = dir.path().join("bench.json");
    let md_path = dir.path().join("bench.md");
    let out = Command::new(env!("CARGO_BIN_EXE_machinen-bench"))
        .args(["--quick", "--json-out"])
        .arg(&json_path)
        .arg("--markdown-out")
        .arg(&md_path)
        .env_remove("MACHINEN_REGISTRY_DIR")
        .stdin(Stdio::null())
        .output()
        .expect("run machinen-bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        out.status.success(),
        "machinen-bench --quick failed: {:?}",
        out.status
    );

    let text = std::fs::read_to_string(&json_path).expect("JSON report written");
    let v: serde_json::Value = serde_json::from_str(&text).expect("valid JSON");
    assert_eq!(v["schema_version"], 1);
    assert_eq!(v["config"]["quick"], true);
    for k in [
        "accel",
        "host_cores",
        "qemu_version",
        "guest_kernel",
        "git_commit",
        "date",
    ] {
        assert!(!v["host"][k].is_null(), "host.{k} missing: {}", v["host"]);
    }
    let rows = v["rows"].as_array().expect("rows");
    for s in SECTIONS {
        assert_eq!(
            v["sections"][s]["status"], "ok",
            "section {s}: {}",
            v["sections"][s]
        );
        assert!(
            rows.iter().any(|r| r["section"] == *s),
            "no rows for section {s}"
        );
    }
    for r in rows {
        for k in ["median", "p90", "min", "max", "stdev"] {
            assert!(r[k].is_number(), "row {} has no {k}", r["key"]);
        }
        assert!(
            r["samples"].as_array().is_some_and(|a| !a.is_empty()),
            "row {} has no samples",
            r["key"]
        );
    }
    for key in [
        "plain.qemu_to_init_ms",
        "boot.cold_base_ms",
        "exec.latency_ms",
        "ports.request_ms",
        "snapshot.restore_idle_ms",
        "fork.source_paused_ms",
        "savevm.savevm_ms",
        "memory.pss_one_vm_mib",
        "memory.pss_vm_plus_forks_mib",
        "memory.pss_per_vm_with_forks_mib",
        "memory.pss_vm_plus_separate_forks_mib",
        "scale.restore_512m_ms",
        "scale.restore_4g_ms",
        "ports.download_nat_host_mib_s",
        "net.outbound_nat_mib_s",
        "net.outbound_nat_host_mib_s",
        "containerd.shim_run_ms",
        "containerd.runc_run_ms",
    ] {
        assert!(rows.iter().any(|r| r["key"] == key), "row {key} missing");
    }
    let ratios = v["ratios"].as_array().expect("ratios");
    for key in [
        "pss_total_over_one_vm",
        "pss_separate_total_over_one_vm",
        "restore_4g_over_512m",
        "outbound_nat_over_nat_host",
        "ports_nat_over_nat_host",
        "shim_over_runc",
    ] {
        assert!(
            ratios
                .iter()
                .any(|r| r["key"] == key && r["value"].is_number()),
            "ratio {key} missing"
        );
    }
    assert!(stdout.contains("median"), "no table on stdout");
    assert!(std::fs::read_to_string(&md_path)
        .expect("markdown")
        .starts_with("| section |"));
}

#[test]
fn unknown_sections_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_machinen-bench"))
        .args(["--only", "nope"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown section"));
}
