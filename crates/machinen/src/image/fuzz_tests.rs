//! Property tests of the one tar parsing our own code does: the first
//! header block that tells a rootfs tarball from anything else, before the
//! `tar` tool sees the file. An image is untrusted input; whatever its
//! first bytes, the check must not panic and must refuse with
//! `BOOT_IMAGE_INVALID`.
//!
//! `PROPTEST_CASES=N cargo test -p machinen --lib fuzz_tarball` runs longer.

use std::io::Write;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::*;
use crate::fuzzing::{byte_edit, bytes, config, mutate};

/// A valid first header block (ustar, or old v7 without the magic).
fn header(v7: bool, name: &str, size: u64) -> Vec<u8> {
    let mut h = if v7 {
        tar::Header::new_old()
    } else {
        tar::Header::new_ustar()
    };
    let _ = h.set_path(name);
    h.set_size(size);
    h.set_mode(0o644);
    h.set_cksum();
    h.as_bytes().to_vec()
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(b);
    e.finish().unwrap_or_default()
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_tarball_first_block_never_panics(
        v7 in any::<bool>(),
        name in "[a-z./]{1,40}",
        size in any::<u64>(),
        edits in prop::collection::vec(byte_edit(), 0..6),
        junk in prop::option::of(bytes(1100)),
        prefix in prop::sample::select(vec![&b""[..], b"\x1f\x8b", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd", b"BZh"]),
        gz in any::<bool>(),
    ) {
        let mut b = junk.unwrap_or_else(|| header(v7, &name, size % (1 << 33)));
        for e in &edits {
            mutate(&mut b, e);
        }
        if gz {
            b = gzip(&b);
        }
        b.splice(0..0, prefix.iter().copied());
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let path = dir.path().join("image.tar");
        fs::write(&path, &b).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match validate_tarball(&path) {
            Ok(kind) => {
                prop_assert!(b.len() >= 2);
                prop_assert_eq!(kind == TarKind::Gzip, b.starts_with(&[0x1f, 0x8b]));
            }
            Err(e) => prop_assert_eq!(e.code(), ErrorCode::BootImageInvalid, "{}", e),
        }
    }

    /// The v7 checksum check on any block: no panic, and a block whose
    /// checksum field was set by the tar crate passes.
    #[test]
    fn fuzz_tarball_checksum_never_panics(block in prop::collection::vec(any::<u8>(), 512), name in "[a-z]{1,20}") {
        let arr: [u8; 512] = block.try_into().map_err(|_| TestCaseError::fail("size"))?;
        let _ = tar_checksum_ok(&arr);
        let h: [u8; 512] = header(true, &name, 7).try_into().map_err(|_| TestCaseError::fail("size"))?;
        prop_assert!(tar_checksum_ok(&h));
    }
}
