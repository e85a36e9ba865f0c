//! Delta checkpoints (`snapshot --keep-alive` chains, `bundle ls|verify|
//! flatten`) on real VMs.

use super::Env;

fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.run_ok(&["exec", vm, "--", "sh", "-c", script])
}

/// What the guest holds: a file on disk and one in RAM (tmpfs).
const STATE: &str = "cat /root/step /dev/shm/step";

#[test]
fn a_checkpoint_chain_restores_at_every_link_refuses_broken_parents_forks_and_flattens() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let b = |n: &str| dir.path().join(n).to_str().expect("utf8").to_string();
    env.run_ok(&["boot", "--name", "src", "--detached"]);
    // 20 MiB of data the guest keeps on disk: a delta must not copy it again.
    sh(
        &env,
        "src",
        "head -c 20000000 /dev/urandom > /root/big && sync",
    );
    for i in 1..=5 {
        sh(
            &env,
            "src",
            &format!("echo disk{i} > /root/step; echo ram{i} > /dev/shm/step"),
        );
        env.run_ok(&["snapshot", "src", &b(&format!("c{i}")), "--keep-alive"]);
    }
    // The chain: c1 full, c2..c5 deltas over the one before.
    let ls = env.json(&["bundle", "ls", dir.path().to_str().expect("utf8"), "--json"]);
    let list = ls.as_array().expect("list");
    assert_eq!(list.len(), 5, "{ls}");
    assert_eq!(list[0]["kind"], "full", "{ls}");
    let disk_of = |i: usize| {
        std::fs::metadata(
            dir.path()
                .join(format!("c{}", i + 1))
                .join("rootdisk.qcow2"),
        )
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
        .expect("disk")
    };
    assert!(
        disk_of(0) > 20_000_000,
        "the first checkpoint holds the data"
    );
    for (i, s) in list.iter().enumerate().skip(1) {
        assert_eq!(s["kind"], "delta", "{ls}");
        assert_eq!(s["chain_seq"], (i + 1) as u64, "{ls}");
        let parent = s["parent"].as_str().expect("parent");
        assert!(parent.ends_with(&format!("c{i}")), "{ls}");
        assert!(
            disk_of(i) < 4 << 20,
            "c{} disk layer {} bytes: not a delta",
            i + 1,
            disk_of(i)
        );
        // The RAM too: only the pages that changed (a few MiB of the
        // guest's own activity), not the ~100 MiB it uses.
        assert_eq!(s["ram_delta"], true, "{ls}");
        assert!(s["disk_bytes"].as_u64().expect("bytes") < 16 << 20, "{ls}");
    }
    // Every link restores with its own state.
    for i in 1..=5 {
        let name = format!("r{i}");
        env.run_ok(&[
            "restore",
            &b(&format!("c{i}")),
            "--name",
            &name,
            "--detached",
        ]);
        assert_eq!(
            sh(&env, &name, STATE),
            format!("disk{i}\nram{i}\n"),
            "restore of c{i}"
        );
        if i != 3 {
            env.run_ok(&["stop", &name]);
        }
    }
    // A fork from the middle of the chain diverges from it: its own
    // checkpoint is a delta over c3, and c4 does not see its writes.
    sh(
        &env,
        "r3",
        "echo branch > /root/step; echo branch > /dev/shm/step",
    );
    env.run_ok(&["snapshot", "r3", &b("branch"), "--keep-alive"]);
    let br = env.json(&["bundle", "ls", &b("branch"), "--json"]);
    assert!(
        br[0]["parent"].as_str().expect("parent").ends_with("c3"),
        "{br}"
    );
    env.run_ok(&["restore", &b("branch"), "--name", "rb", "--detached"]);
    assert_eq!(sh(&env, "rb", STATE), "branch\nbranch\n");
    env.run_ok(&["restore", &b("c4"), "--name", "r4b", "--detached"]);
    assert_eq!(sh(&env, "r4b", STATE), "disk4\nram4\n");
    for n in ["rb", "r4b", "r3"] {
        env.run_ok(&["stop", n]);
    }
    // `verify` checks the whole chain.
    let v = env.json(&["bundle", "verify", &b("c5"), "--json"]);
    assert_eq!(v["chain"].as_array().expect("chain").len(), 5, "{v}");
    // Flatten: a self-contained bundle with the tip's guest state.
    env.run_ok(&["bundle", "flatten", &b("c5"), &b("flat")]);
    let fl = env.json(&["bundle", "ls", &b("flat"), "--json"]);
    assert_eq!(fl[0]["kind"], "full", "{fl}");
    let sum = "sha256sum /root/big | cut -c1-64";
    let want = sh(&env, "src", sum);
    // An altered parent is refused, naming it; so is a missing one.
    let c2_meta = dir.path().join("c2").join("meta.json");
    let saved = std::fs::read(&c2_meta).expect("meta");
    let manifest = dir.path().join("c2").join("manifest.json");
    let m = std::fs::read_to_string(&manifest).expect("manifest");
    std::fs::write(&manifest, m.replacen("\"files\"", "\"files\" ", 1)).expect("alter");
    let out = env.run(&["restore", &b("c5"), "--name", "bad", "--detached"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("RESTORE_BUNDLE_INVALID") && err.contains("c2"),
        "{err}"
    );
    assert!(err.contains("changed"), "{err}");
    std::fs::write(&manifest, m).expect("put back");
    std::fs::write(&c2_meta, &saved).expect("meta back");
    std::fs::rename(dir.path().join("c2"), dir.path().join("moved")).expect("move");
    let out = env.run(&["restore", &b("c5"), "--name", "bad", "--detached"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("RESTORE_BUNDLE_INVALID") && err.contains("c2") && err.contains("missing"),
        "{err}"
    );
    // The flattened bundle needs none of them.
    std::fs::remove_dir_all(dir.path().join("c1")).expect("rm c1");
    env.run_ok(&["restore", &b("flat"), "--name", "rf", "--detached"]);
    assert_eq!(sh(&env, "rf", STATE), "disk5\nram5\n");
    assert_eq!(
        sh(&env, "rf", sum),
        want,
        "the 20 MB file survives flattening"
    );
    // `--full` writes a self-contained bundle of a VM with a chain.
    env.run_ok(&["snapshot", "src", &b("full"), "--keep-alive", "--full"]);
    let full = env.json(&["bundle", "ls", &b("full"), "--json"]);
    assert_eq!(full[0]["kind"], "full", "{full}");
    env.run_ok(&["stop", "src"]);
    env.run_ok(&["restore", &b("full"), "--name", "rfull", "--detached"]);
    assert_eq!(sh(&env, "rfull", STATE), "disk5\nram5\n");
    assert_eq!(sh(&env, "rfull", sum), want);
}
