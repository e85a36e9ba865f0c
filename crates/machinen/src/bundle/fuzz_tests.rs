//! Property tests of bundle parsing and verification: a bundle comes from
//! anywhere (copied between hosts), so `meta.json` and `manifest.json` are
//! untrusted input. Whatever they hold, reading and verifying them must not
//! panic, must fail only with `RESTORE_BUNDLE_INVALID`, and must accept
//! only what describes the files actually there.
//!
//! `PROPTEST_CASES=N cargo test -p machinen --lib fuzz_bundle` runs longer.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};

use super::*;
use crate::fuzzing::{config, derived_document};

const META_WORDS: &[&str] = &[
    "format",
    "version",
    "engine",
    "source_name",
    "image",
    "path",
    "sha256",
    "snapped_at_ms",
    "guest_arch",
    "accel",
    "cpu_model",
    "memory_mib",
    "cpus",
    "kernel",
    "disk_format",
    "chain_id",
    "chain_seq",
    "chain_parent",
    FORMAT_NAME,
    "qemu",
    "amd64",
    "tcg",
    "max",
    "qcow2",
];

const MANIFEST_WORDS: &[&str] = &[
    "format",
    "version",
    "files",
    "name",
    "size",
    "hash",
    "sha256",
    "digest",
    META,
    STATE,
    DISK,
    RAM,
    MANIFEST,
    "../meta.json",
    "/etc/passwd",
    FORMAT_NAME,
    "blake3",
    "blake3-nonzero-64k",
    "sha256-nonzero-64k",
];

/// The unit tests' sample meta: one fixture for both.
fn sample_meta() -> BundleMeta {
    super::tests::meta()
}

/// A small complete bundle under `dir`, with `ram.img` when `ram`.
fn template(dir: &Path, ram: bool) -> PathBuf {
    let b = Builder::new(&dir.join(if ram { "ram.snap" } else { "plain.snap" })).expect("builder");
    fs::write(b.path(STATE), vec![7u8; 3000]).expect("state");
    fs::write(b.path(DISK), b"disk layer").expect("disk");
    if ram {
        let f = fs::File::create(b.path(RAM)).expect("ram");
        f.set_len(256 << 10).expect("len");
        f.write_all_at(b"heap", 100 << 10).expect("write");
    }
    b.finish(&sample_meta()).expect("finish")
}

fn manifest_of(dir: &Path) -> Manifest {
    serde_json::from_slice(&fs::read(dir.join(MANIFEST)).expect("read")).expect("manifest")
}

/// An entry's identity, with the digest scheme spelled out (absent means
/// SHA-256).
fn key(e: &FileEntry) -> (String, u64, String, Option<&'static str>) {
    (
        e.name.clone(),
        e.size,
        e.hash.clone(),
        Digest::parse(e.digest.as_deref()).map(Digest::name),
    )
}

fn run<S: Strategy>(cases: u32, strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    // No regression file: a runner outside `proptest!` knows no source
    // file to put it beside; the failure message carries the input.
    let mut runner = TestRunner::new(proptest::test_runner::Config {
        failure_persistence: None,
        ..config(cases)
    });
    if let Err(e) = runner.run(&strategy, test) {
        panic!("{e}");
    }
}

fn check_invalid(err: &BundleError) -> Result<(), TestCaseError> {
    prop_assert_eq!(err.code(), ErrorCode::RestoreBundleInvalid, "{}", err);
    prop_assert!(err.hint().is_some(), "{err}");
    Ok(())
}

fn check_meta(meta: &BundleMeta) -> Result<(), TestCaseError> {
    prop_assert_eq!(&meta.format, FORMAT_NAME);
    prop_assert!(
        (MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&meta.version),
        "version {}",
        meta.version
    );
    let again: BundleMeta = serde_json::from_slice(
        &serde_json::to_vec(meta).map_err(|e| TestCaseError::fail(e.to_string()))?,
    )
    .map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&again, meta);
    Ok(())
}

/// `meta.json` alone, as `read_meta` sees it (a scratch bundle).
#[test]
fn fuzz_bundle_meta_json_never_panics() {
    let tmp = tempfile::tempdir().expect("tmp");
    let valid = serde_json::to_vec_pretty(&sample_meta()).expect("json");
    run(256, derived_document(valid, META_WORDS), |doc| {
        fs::write(tmp.path().join(META), &doc).expect("write");
        match read_meta(tmp.path()) {
            Ok(meta) => check_meta(&meta),
            Err(e) => check_invalid(&e),
        }
    });
}

/// A changed `manifest.json` in front of intact files: refused with the
/// bundle code, or accepted only when it still describes every file there.
#[test]
fn fuzz_bundle_manifest_never_panics() {
    let tmp = tempfile::tempdir().expect("tmp");
    for ram in [false, true] {
        let dir = template(tmp.path(), ram);
        let original: BTreeSet<_> = manifest_of(&dir).files.iter().map(key).collect();
        let valid = fs::read(dir.join(MANIFEST)).expect("read");
        run(128, derived_document(valid, MANIFEST_WORDS), |doc| {
            fs::write(dir.join(MANIFEST), &doc).expect("write");
            match verify(&dir) {
                Ok(meta) => {
                    prop_assert_eq!(meta, sample_meta());
                    let m: Manifest = serde_json::from_slice(&doc)
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                    let listed: BTreeSet<_> = m.files.iter().map(key).collect();
                    prop_assert!(
                        listed.is_subset(&original),
                        "accepted entries not in the original: {listed:?}"
                    );
                    let names: BTreeSet<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
                    for f in [META, STATE, DISK, RAM] {
                        prop_assert!(
                            !dir.join(f).exists() || names.contains(f),
                            "{f} is in the bundle but not verified"
                        );
                    }
                    Ok(())
                }
                Err(e) => check_invalid(&e),
            }
        });
    }
}

/// A changed `meta.json` behind a manifest that matches it (as a careful
/// forger would write): parsing and validation alone decide.
#[test]
fn fuzz_bundle_meta_behind_a_matching_manifest() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = template(tmp.path(), false);
    let manifest = manifest_of(&dir);
    let valid = fs::read(dir.join(META)).expect("read");
    run(128, derived_document(valid, META_WORDS), |doc| {
        fs::write(dir.join(META), &doc).expect("write");
        let (size, hash) = Digest::Blake3.of_file(&dir.join(META)).expect("digest");
        let mut manifest = manifest.clone();
        for e in manifest.files.iter_mut().filter(|e| e.name == META) {
            (e.size, e.hash, e.digest) = (size, hash.clone(), Some(Digest::Blake3.name().into()));
        }
        fs::write(
            dir.join(MANIFEST),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        match verify(&dir) {
            Ok(meta) => check_meta(&meta),
            Err(e) => check_invalid(&e),
        }
    });
}

/// A file larger than any real meta or manifest is refused without being
/// read whole.
#[test]
fn fuzz_bundle_oversized_documents_are_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = template(tmp.path(), false);
    for name in [META, MANIFEST] {
        let p = dir.join(name);
        let orig = fs::read(&p).expect("read");
        let f = fs::OpenOptions::new().write(true).open(&p).expect("open");
        f.set_len(MAX_SMALL_FILE + 1).expect("grow");
        let err = if name == META {
            read_meta(&dir)
        } else {
            verify(&dir)
        }
        .expect_err("oversized");
        assert_eq!(err.code(), ErrorCode::RestoreBundleInvalid, "{name}: {err}");
        assert!(err.to_string().contains(name), "{name}: {err}");
        fs::write(&p, orig).expect("restore");
    }
    verify(&dir).expect("intact again");
}

/// The case the manifest property found: a manifest that leaves out a
/// `ram.img` lying beside it (restore would map that file unverified).
#[test]
fn fuzz_bundle_unlisted_ram_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = template(tmp.path(), true);
    let mut m = manifest_of(&dir);
    m.files.retain(|f| f.name != RAM);
    fs::write(dir.join(MANIFEST), serde_json::to_vec(&m).expect("json")).expect("write");
    let err = verify(&dir).expect_err("unlisted ram.img");
    assert_eq!(err.code(), ErrorCode::RestoreBundleInvalid);
    assert!(
        err.to_string().contains(MANIFEST) && format!("{err:?}").contains(RAM),
        "{err:?}"
    );
    fs::remove_file(dir.join(RAM)).expect("rm");
    verify(&dir).expect("a bundle without ram.img and a manifest without it is fine");
}

/// A bundle file that is not a regular file (a directory, a FIFO, a
/// symlink to an endless device) must be refused promptly, as invalid.
#[test]
fn fuzz_bundle_special_files_are_refused_promptly() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut failures = Vec::new();
    for (i, name) in [META, MANIFEST, STATE, DISK, RAM].into_iter().enumerate() {
        for kind in ["directory", "fifo", "/dev/zero"] {
            let dir = template(
                &tmp.path().join(format!("{i}-{}", kind.replace('/', ""))),
                true,
            );
            let p = dir.join(name);
            fs::remove_file(&p).expect("rm");
            match kind {
                "directory" => fs::create_dir(&p).expect("mkdir"),
                "fifo" => nix::unistd::mkfifo(&p, nix::sys::stat::Mode::from_bits_truncate(0o600))
                    .expect("mkfifo"),
                _ => std::os::unix::fs::symlink(kind, &p).expect("symlink"),
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let d = dir.clone();
            // A hang leaves this thread behind; the test reports it.
            std::thread::spawn(move || {
                let _ = tx.send(
                    verify(&d)
                        .map(|_| ())
                        .map_err(|e| (e.code(), e.to_string())),
                );
            });
            match rx.recv_timeout(std::time::Duration::from_secs(3)) {
                Ok(Err((ErrorCode::RestoreBundleInvalid, _))) => {}
                Ok(other) => failures.push(format!("{name} as {kind}: {other:?}")),
                Err(_) => failures.push(format!("{name} as {kind}: no answer within 3 s")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
