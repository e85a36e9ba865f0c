//! Reading the image config out of a rootfs tarball (plain or gzip) with
//! arbitrary bytes: no panic, no hang, every error BOOT_IMAGE_INVALID.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use machinen::provision::read_from_tarball;
use machinen::ErrorCode;

fn path() -> &'static std::path::Path {
    static DIR: OnceLock<(tempfile::TempDir, std::path::PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tmp");
        let p = tmp.path().join("image.tar");
        (tmp, p)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(path(), data).expect("write");
    match read_from_tarball(path()) {
        Ok(Some(c)) => assert!(c.validate().is_ok()),
        Ok(None) => {}
        Err(e) => assert_eq!(e.code(), ErrorCode::BootImageInvalid, "{e}"),
    }
});
