//! A snapshot's deadline bounds the copy, the digests and the sync: past
//! it, nothing is renamed into place and the temp directory goes.

use std::fs;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use super::*;

fn meta() -> BundleMeta {
    super::tests::meta()
}

/// A 4 MiB file of non-zero bytes (copied and hashed, not skipped).
fn data_file(dir: &Path) -> PathBuf {
    let p = dir.join("src");
    fs::write(&p, vec![0x5au8; 4 << 20]).expect("src");
    p
}

fn past() -> Deadline {
    Some(Instant::now() - Duration::from_millis(1))
}

#[test]
fn a_passed_deadline_stops_the_copy_with_snapshot_timeout() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = data_file(dir.path());
    let e = sparse_copy_until(&src, &dir.path().join("dst"), past()).expect_err("late");
    assert!(matches!(e, BundleError::Deadline { .. }), "{e:?}");
    assert_eq!(Coded::code(&e), ErrorCode::SnapshotTimeout);
    let far = Some(Instant::now() + Duration::from_secs(600));
    assert_eq!(
        sparse_copy_until(&src, &dir.path().join("dst2"), far).expect("in time"),
        4 << 20
    );
}

#[test]
fn a_passed_deadline_stops_both_digests() {
    let dir = tempfile::tempdir().expect("tmp");
    let src = data_file(dir.path());
    for d in [Digest::Blake3, Digest::Blake3Sparse, Digest::Sha256Sparse] {
        let e = d.of_file_until(&src, past()).expect_err("late");
        assert!(matches!(e, BundleError::Deadline { .. }), "{d:?}: {e:?}");
        assert_eq!(
            d.of_file_until(&src, None).expect("unbounded"),
            d.of_file(&src).expect("digest")
        );
    }
}

#[test]
fn a_late_finish_leaves_neither_bundle_nor_temp_dir() {
    let dir = tempfile::tempdir().expect("tmp");
    let dest = dir.path().join("b.snap");
    let b = Builder::new(&dest).expect("builder");
    let tmp = b.tmp.clone();
    fs::write(b.path(STATE), b"state").expect("state");
    let disk = fs::File::create(b.path(DISK)).expect("disk");
    disk.write_all_at(b"disk", 0).expect("write");
    let e = b.finish_until(&meta(), past()).expect_err("late");
    assert_eq!(Coded::code(&e), ErrorCode::SnapshotTimeout);
    assert!(!dest.exists(), "no bundle after the deadline");
    assert!(!tmp.exists(), "the temp directory is removed");

    let b = Builder::new(&dest).expect("builder");
    fs::write(b.path(STATE), b"state").expect("state");
    fs::write(b.path(DISK), b"disk").expect("disk");
    let far = Some(Instant::now() + Duration::from_secs(600));
    let done = b.finish_until(&meta(), far).expect("in time");
    verify(&done).expect("a complete bundle");
}
