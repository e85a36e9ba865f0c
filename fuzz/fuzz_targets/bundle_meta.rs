//! `meta.json` of a bundle, as `read_meta` reads it: no panic, every error
//! RESTORE_BUNDLE_INVALID, an accepted meta of our format and version.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use machinen::bundle::{read_meta, FORMAT_NAME, FORMAT_VERSION, META, MIN_FORMAT_VERSION};
use machinen::error::{Coded, ErrorCode};

fn dir() -> &'static std::path::Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("tmp")).path()
}

fuzz_target!(|data: &[u8]| {
    std::fs::write(dir().join(META), data).expect("write");
    match read_meta(dir()) {
        Ok(meta) => {
            assert_eq!(meta.format, FORMAT_NAME);
            assert!((MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&meta.version));
        }
        Err(e) => assert_eq!(e.code(), ErrorCode::RestoreBundleInvalid, "{e}"),
    }
});
