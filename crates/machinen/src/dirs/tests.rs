//! The host-side unpack of a guest's tar stream: hostile streams are
//! refused and never write outside the destination.
//! `PROPTEST_CASES=N cargo test -p machinen --lib fuzz_hostile_dir` runs longer.

use super::unpack::{confine, unpack_confined, ENTRY_COST};
use crate::error::ErrorCode;
use proptest::prelude::*;
use std::path::Path;

/// One raw tar entry, built without the `tar` crate's own path checks (a
/// hostile guest is not polite either).
#[derive(Debug, Clone)]
enum Raw {
    Dir(String),
    File(String, Vec<u8>),
    Symlink(String, String),
    Hardlink(String, String),
    Fifo(String),
}

fn header(name: &str, kind: tar::EntryType, size: u64, link: Option<&str>) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    // Bypass set_path's validation: write the name bytes as they are.
    {
        let gnu = h.as_gnu_mut().expect("gnu");
        let b = name.as_bytes();
        gnu.name[..b.len()].copy_from_slice(b);
        if let Some(l) = link {
            let lb = l.as_bytes();
            gnu.linkname[..lb.len()].copy_from_slice(lb);
        }
    }
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

fn stream(entries: &[Raw]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let (h, data): (tar::Header, &[u8]) = match e {
            Raw::Dir(n) => (header(n, tar::EntryType::Directory, 0, None), &[]),
            Raw::File(n, d) => (header(n, tar::EntryType::Regular, d.len() as u64, None), d),
            Raw::Symlink(n, t) => (header(n, tar::EntryType::Symlink, 0, Some(t)), &[]),
            Raw::Hardlink(n, t) => (header(n, tar::EntryType::Link, 0, Some(t)), &[]),
            Raw::Fifo(n) => (header(n, tar::EntryType::Fifo, 0, None), &[]),
        };
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn unpack(
    entries: &[Raw],
) -> (
    tempfile::TempDir,
    Result<super::unpack::Unpacked, crate::Failure>,
) {
    let outer = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(outer.path().join("dest")).expect("mkdir");
    let r = unpack_confined(&stream(entries)[..], &outer.path().join("dest"), u64::MAX);
    (outer, r)
}

/// Everything under `outer` other than `dest`: must stay empty.
fn outside(outer: &Path) -> Vec<String> {
    std::fs::read_dir(outer)
        .expect("ls")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n != "dest")
        .collect()
}

#[test]
fn a_plain_tree_unpacks() {
    let (outer, r) = unpack(&[
        Raw::Dir("a".into()),
        Raw::File("a/f".into(), b"hello".to_vec()),
        Raw::Symlink("a/l".into(), "/etc/passwd".into()),
        Raw::Hardlink("h".into(), "a/f".into()),
        Raw::Fifo("p".into()),
        Raw::File("./b/deep/g".into(), b"x".to_vec()),
    ]);
    let done = r.expect("unpack");
    assert_eq!((done.entries, done.bytes, done.skipped), (5, 6, 1));
    let d = outer.path().join("dest");
    assert_eq!(std::fs::read(d.join("a/f")).expect("f"), b"hello");
    assert_eq!(std::fs::read(d.join("h")).expect("h"), b"hello");
    assert_eq!(
        std::fs::read_link(d.join("a/l")).expect("l"),
        Path::new("/etc/passwd")
    );
    assert!(!d.join("p").exists());
}

#[test]
fn escapes_are_refused() {
    let cases: Vec<Vec<Raw>> = vec![
        vec![Raw::File("../evil".into(), b"x".to_vec())],
        vec![Raw::File("a/../../evil".into(), b"x".to_vec())],
        vec![Raw::File("/abs/evil".into(), b"x".to_vec())],
        // A symlink to outside, then a write through it.
        vec![
            Raw::Symlink("l".into(), "..".into()),
            Raw::File("l/evil".into(), b"x".to_vec()),
        ],
        vec![
            Raw::Symlink("l".into(), "/tmp".into()),
            Raw::Dir("l/sub".into()),
        ],
        // Hard links to outside, to a symlink, to nothing.
        vec![Raw::Hardlink("h".into(), "../outside-file".into())],
        vec![Raw::Hardlink("h".into(), "/etc/passwd".into())],
        vec![
            Raw::Symlink("s".into(), "/etc/passwd".into()),
            Raw::Hardlink("h".into(), "s".into()),
        ],
        vec![Raw::Hardlink("h".into(), "missing".into())],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (outer, r) = unpack(case);
        std::fs::write(outer.path().join("outside-file"), b"keep").ok();
        let err = r.expect_err(&format!("case {i} must be refused: {case:?}"));
        assert_eq!(err.code, ErrorCode::FilesPathEscape, "case {i}: {err}");
        assert_eq!(
            outside(outer.path()),
            vec!["outside-file".to_string()],
            "case {i}"
        );
    }
}

#[test]
fn a_later_file_replaces_a_symlink_instead_of_following_it() {
    let outer = tempfile::tempdir().expect("tmp");
    let victim = outer.path().join("victim");
    std::fs::write(&victim, b"original").expect("write");
    std::fs::create_dir(outer.path().join("dest")).expect("mkdir");
    let s = stream(&[
        Raw::Symlink("l".into(), victim.to_string_lossy().into_owned()),
        Raw::File("l".into(), b"overwritten?".to_vec()),
    ]);
    unpack_confined(&s[..], &outer.path().join("dest"), u64::MAX).expect("unpack");
    assert_eq!(std::fs::read(&victim).expect("victim"), b"original");
    assert_eq!(
        std::fs::read(outer.path().join("dest/l")).expect("l"),
        b"overwritten?"
    );
}

#[test]
fn the_size_bound_holds() {
    let outer = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(outer.path().join("dest")).expect("mkdir");
    let s = stream(&[Raw::File("big".into(), vec![7; 10_000])]);
    let err = unpack_confined(&s[..], &outer.path().join("dest"), 5_000).expect_err("too big");
    assert_eq!(err.code, ErrorCode::FilesTooLarge);
    // Many empty entries count too.
    let many: Vec<Raw> = (0..100).map(|i| Raw::Dir(format!("d{i}"))).collect();
    let outer = tempfile::tempdir().expect("tmp");
    std::fs::create_dir(outer.path().join("dest")).expect("mkdir");
    let err = unpack_confined(
        &stream(&many)[..],
        &outer.path().join("dest"),
        50 * ENTRY_COST,
    )
    .expect_err("too many");
    assert_eq!(err.code, ErrorCode::FilesTooLarge);
}

#[test]
fn confine_keeps_plain_names_only() {
    assert_eq!(confine(Path::new("./a/./b")).expect("ok"), Path::new("a/b"));
    assert!(confine(Path::new("a/../b")).is_err());
    assert!(confine(Path::new("/a")).is_err());
}

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_string()),
        Just("b".to_string()),
        Just("..".to_string()),
        Just(".".to_string()),
        Just("".to_string()),
        "[a-c]{1,2}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    (any::<bool>(), prop::collection::vec(name(), 1..4)).prop_map(|(abs, parts)| {
        let p = parts.join("/");
        if abs {
            format!("/{p}")
        } else {
            p
        }
    })
}

fn link_target() -> impl Strategy<Value = String> {
    prop_oneof![
        path(),
        Just("..".to_string()),
        Just("/".to_string()),
        Just("../..".to_string()),
    ]
}

fn raw() -> impl Strategy<Value = Raw> {
    prop_oneof![
        path().prop_map(Raw::Dir),
        (path(), prop::collection::vec(any::<u8>(), 0..64)).prop_map(|(p, d)| Raw::File(p, d)),
        (path(), link_target()).prop_map(|(p, t)| Raw::Symlink(p, t)),
        (path(), link_target()).prop_map(|(p, t)| Raw::Hardlink(p, t)),
    ]
}

proptest! {
    #![proptest_config(crate::fuzzing::config(256))]

    /// Whatever a guest sends, nothing appears or changes outside the
    /// destination, and nothing panics.
    #[test]
    fn fuzz_hostile_dir_streams_stay_inside(entries in prop::collection::vec(raw(), 1..12)) {
        let outer = tempfile::tempdir().expect("tmp");
        let sentinel = outer.path().join("sentinel");
        std::fs::write(&sentinel, b"untouched").expect("write");
        let dest = outer.path().join("dest");
        std::fs::create_dir(&dest).expect("mkdir");
        let _ = unpack_confined(&stream(&entries)[..], &dest, 1 << 20);
        let mut names: Vec<String> = std::fs::read_dir(outer.path()).expect("ls")
            .filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        prop_assert_eq!(names, vec!["dest".to_string(), "sentinel".to_string()]);
        prop_assert_eq!(std::fs::read(&sentinel).expect("sentinel"), b"untouched".to_vec());
        // Every regular file with content under dest is a real file below it.
        let mut stack = vec![dest.clone()];
        while let Some(d) = stack.pop() {
            // Directory modes are applied at the end; make them readable.
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
            for e in std::fs::read_dir(&d).expect("ls").flatten() {
                let m = std::fs::symlink_metadata(e.path()).expect("meta");
                if m.is_dir() { stack.push(e.path()); }
            }
        }
    }
}
