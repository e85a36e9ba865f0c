//! The baked image config (`/etc/machinen/image.json`) on arbitrary bytes:
//! no panic, every error BOOT_IMAGE_INVALID, an accepted config valid and
//! stable through its own encoding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machinen::{ErrorCode, ImageConfig};

fuzz_target!(|data: &[u8]| {
    match ImageConfig::from_json(data) {
        Ok(c) => {
            assert!(c.validate().is_ok());
            assert_eq!(ImageConfig::from_json(&c.to_json()).expect("re-parse"), c);
            if let Err(e) = c.exec_options(None, &[], None) {
                assert!(
                    c.cmd.is_none() && e.code == ErrorCode::BootArgsInvalid,
                    "{e}"
                );
            }
        }
        Err(e) => assert_eq!(e.code, ErrorCode::BootImageInvalid, "{e}"),
    }
});
