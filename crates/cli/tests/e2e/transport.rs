//! Bundles through an OCI registry: Debian's `docker-registry` started
//! here, and two "hosts" on one machine (each its own MACHINEN_HOME, VM
//! registry and cache; the installed kernel and base image shared): a VM
//! checkpointed on one resumes on the other.

use std::path::{Path, PathBuf};

use super::oci::Registry;
use super::Env;

fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.run_ok(&["exec", vm, "--", "sh", "-c", script])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// The registry's stored blobs, largest first.
fn blobs(root: &Path) -> Vec<PathBuf> {
    let base = root.join("data/docker/registry/v2/blobs/sha256");
    let mut out: Vec<PathBuf> = std::fs::read_dir(&base)
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|d| d.path().join("data"))
        .filter(|p| p.is_file())
        .collect();
    out.sort_by_key(|p| std::cmp::Reverse(std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)));
    out
}

#[test]
fn a_vm_handed_off_through_a_registry_continues_and_its_next_checkpoint_uploads_little() {
    let dir = tempfile::tempdir().expect("tmp");
    let reg = Registry::start(dir.path());
    let a = Env::new();
    let b = Env::with_home(&dir.path().join("home-b"));
    let r = |tag: &str| format!("{}/team/agent:{tag}", reg.addr);
    let ins = ["--insecure-registry", reg.addr.as_str()];
    let local = |n: &str| dir.path().join(n);

    // Host A: state on disk, in RAM, and a process counting in memory (its
    // count renamed into place: a read never meets it half-written).
    a.run_ok(&["boot", "--name", "src", "--detached"]);
    sh(
        &a,
        "src",
        "echo disk1 > /root/step; echo ram1 > /dev/shm/step; \
         head -c 30000000 /dev/urandom > /dev/shm/blob; \
         nohup sh -c 'i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count.new; \
         mv /dev/shm/count.new /dev/shm/count; sleep 0.2; done' \
         >/dev/null 2>&1 &",
    );
    a.run_ok(&["snapshot", "src", s(&local("c1")), "--keep-alive"]);
    // Over HTTPS (the default) this registry does not answer.
    let out = a.run(&["push", s(&local("c1")), &r("c1")]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("BUNDLE_TRANSFER_FAILED"));
    let p1 = a.json(&[&["push", s(&local("c1")), &r("c1"), "--json"][..], &ins].concat());
    assert_eq!(p1["bundles"], 1, "{p1}");
    let first = p1["uploaded_bytes"].as_u64().expect("bytes");
    assert!(first > 30_000_000, "{p1}");
    // Pushing it again uploads nothing.
    let again = a.json(&[&["push", s(&local("c1")), &r("c1"), "--json"][..], &ins].concat());
    assert_eq!(again["uploaded_bytes"], 0, "{again}");

    // Host B restores the reference directly; the guest carries on.
    b.run_ok(
        &[
            &["restore", &r("c1"), "--name", "b1", "--detached"][..],
            &ins,
        ]
        .concat(),
    );
    assert_eq!(
        sh(&b, "b1", "cat /root/step /dev/shm/step"),
        "disk1\nram1\n"
    );
    let count = || -> u64 {
        sh(&b, "b1", "cat /dev/shm/count")
            .trim()
            .parse()
            .expect("count")
    };
    let c0 = count();
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert!(count() > c0, "the counting process runs on host B");
    b.run_ok(&["stop", "b1"]);

    // Host A: a second checkpoint, a delta; its push uploads what changed.
    sh(
        &a,
        "src",
        "echo disk2 > /root/step; echo ram2 > /dev/shm/step; head -c 1000000 /dev/urandom > /dev/shm/chg",
    );
    a.run_ok(&["snapshot", "src", s(&local("c2")), "--keep-alive"]);
    let p2 = a.json(&[&["push", s(&local("c2")), &r("c2"), "--json"][..], &ins].concat());
    assert_eq!(p2["bundles"], 2, "{p2}");
    let second = p2["uploaded_bytes"].as_u64().expect("bytes");
    assert!(
        second * 10 <= first,
        "checkpoint 2 uploaded {second} bytes, checkpoint 1 {first}"
    );

    // Host B restored checkpoint 1 from the registry: restoring checkpoint
    // 2 fetches the delta only, and finds its parent by digest.
    b.run_ok(
        &[
            &["restore", &r("c2"), "--name", "b2r", "--detached"][..],
            &ins,
        ]
        .concat(),
    );
    assert_eq!(
        sh(&b, "b2r", "cat /root/step /dev/shm/step"),
        "disk2\nram2\n"
    );
    b.run_ok(&["stop", "b2r"]);
    let stored = b.cache().join("bundles");
    let digests: Vec<PathBuf> = std::fs::read_dir(&stored)
        .expect("bundles in the cache")
        .flatten()
        .map(|e| e.path())
        .collect();
    assert_eq!(digests.len(), 2, "checkpoint 1 stored once: {digests:?}");
    assert!(
        digests.iter().any(|d| d
            .join("c1")
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())),
        "checkpoint 2 reaches its parent by a link: {digests:?}"
    );

    // Host B pulls it into a directory: the parent comes beside it.
    let pulled = local("b");
    std::fs::create_dir(&pulled).expect("dir");
    let pl = b.json(
        &[
            &["pull", &r("c2"), s(&pulled.join("c2")), "--json"][..],
            &ins,
        ]
        .concat(),
    );
    assert_eq!(pl["bundles"], 2, "{pl}");
    assert!(pulled.join("c1").join("manifest.json").is_file());
    b.run_ok(&[
        "restore",
        s(&pulled.join("c2")),
        "--name",
        "b2",
        "--detached",
    ]);
    assert_eq!(
        sh(&b, "b2", "cat /root/step /dev/shm/step"),
        "disk2\nram2\n"
    );
    b.run_ok(&["stop", "b2"]);
    // A host that has the parent fetches only the tip.
    let other = local("b2");
    std::fs::create_dir(&other).expect("dir");
    std::fs::rename(pulled.join("c1"), other.join("c1")).expect("move the parent");
    let pl2 = b.json(
        &[
            &["pull", &r("c2"), s(&other.join("c2")), "--json"][..],
            &ins,
        ]
        .concat(),
    );
    assert_eq!(pl2["bundles"], 1, "{pl2}");

    // Chunks altered in the registry's storage (every whole 4 MiB one:
    // manifests and small chunks stay as they were): refused, nothing left.
    let chunks: Vec<PathBuf> = blobs(dir.path())
        .into_iter()
        .filter(|b| std::fs::metadata(b).map(|m| m.len()).ok() == Some(4 << 20))
        .collect();
    assert!(!chunks.is_empty(), "no whole chunk in the registry");
    let mut originals = Vec::new();
    for blob in chunks {
        let mut bytes = std::fs::read(&blob).expect("blob");
        originals.push((blob.clone(), bytes.clone()));
        bytes[1000] ^= 0xff;
        std::fs::write(&blob, bytes).expect("tamper");
    }
    let c = Env::with_home(&local("home-c"));
    let out = c.run(&[&["pull", &r("c1"), s(&local("t1")), "--json"][..], &ins].concat());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stdout);
    assert!(err.contains("RESTORE_BUNDLE_INVALID"), "{err}");
    assert!(!local("t1").exists(), "no partial bundle");
    // The registry mended, the same pull resumes: the chunks it had
    // checked are not fetched again.
    for (blob, bytes) in originals {
        std::fs::write(&blob, bytes).expect("mend");
    }
    let resumed = c.json(&[&["pull", &r("c1"), s(&local("t1")), "--json"][..], &ins].concat());
    let (got, all) = (
        resumed["downloaded_chunks"].as_u64().expect("downloaded"),
        resumed["chunks"].as_u64().expect("chunks"),
    );
    assert!(got < all, "a rerun fetches only what it lacks: {resumed}");
    c.run_ok(&["bundle", "verify", s(&local("t1"))]);
    a.run_ok(&["stop", "src"]);
}
