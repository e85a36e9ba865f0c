//! Property tests of the baked image config: `/etc/machinen/image.json`
//! comes from whoever made the image, and is read out of the tarball on
//! the host before the image boots. Whatever it holds, reading it must not
//! panic and must fail only with `BOOT_IMAGE_INVALID`.
//!
//! `PROPTEST_CASES=N cargo test -p machinen --lib fuzz_image_config` runs longer.

use std::io::Write;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;

use super::config::{read_from_tarball, tar_member};
use super::*;
use crate::fuzzing::{byte_edit, bytes, config, derived_document, mutate, text};

const WORDS: &[&str] = &[
    "version", "cmd", "env", "cwd", "/app", "PATH", "1BAD", "A=B", "", "/", "rel/dir",
];

fn sample() -> ImageConfig {
    ImageConfig {
        version: IMAGE_CONFIG_VERSION,
        cmd: Some(vec!["/app/hello".into(), "--loud".into()]),
        env: [("MODE".to_string(), "prod".to_string())].into(),
        cwd: Some("/app".into()),
        entrypoint: None,
        user: None,
        exposed_ports: Vec::new(),
        labels: Default::default(),
    }
}

/// What an accepted config must satisfy, and an error must be.
fn check(
    result: std::result::Result<ImageConfig, Failure>,
) -> std::result::Result<(), TestCaseError> {
    match result {
        Ok(c) => {
            prop_assert!(c.version <= IMAGE_CONFIG_VERSION);
            prop_assert!(c.validate().is_ok());
            prop_assert_eq!(
                ImageConfig::from_json(&c.to_json())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?,
                c.clone()
            );
            // Booting it: the baked command, or a clear "nothing to run".
            match c.exec_options(None, &[], None) {
                Ok(o) => prop_assert_eq!(Some(o.argv), c.cmd),
                Err(e) => prop_assert!(
                    c.cmd.is_none() && e.code == ErrorCode::BootArgsInvalid,
                    "{e}"
                ),
            }
        }
        Err(e) => prop_assert_eq!(e.code, ErrorCode::BootImageInvalid, "{}", e),
    }
    Ok(())
}

/// A tarball holding `members` (name, data), gzipped when `gz`.
fn tarball(first: Option<Vec<u8>>, members: &[(String, Vec<u8>)], gz: bool) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        // Names the tar crate refuses to write are simply left out.
        let _ = b.append_data(&mut h, name, data.as_slice());
    }
    let mut out = first.unwrap_or_default();
    out.extend(b.into_inner().unwrap_or_default());
    if !gz {
        return out;
    }
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let _ = e.write_all(&out);
    e.finish().unwrap_or_default()
}

fn member_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("etc/machinen/image.json".to_string()),
        Just("./etc/machinen/image.json".to_string()),
        Just("etc/hostname".to_string()),
        "[a-z./]{1,20}",
    ]
}

proptest! {
    #![proptest_config(config(256))]

    /// The config's JSON text, generated and mutated.
    #[test]
    fn fuzz_image_config_json_never_panics(doc in derived_document(sample().to_json(), WORDS)) {
        check(ImageConfig::from_json(&doc))?;
    }

    /// The config inside a (plain or gzip) tarball, first or later member,
    /// beside other members, with the archive's bytes mutated.
    #[test]
    fn fuzz_image_config_tarballs_never_panic(
        doc in derived_document(sample().to_json(), WORDS),
        first in any::<bool>(),
        others in prop::collection::vec((member_name(), bytes(64)), 0..3),
        gz in any::<bool>(),
        edits in prop::collection::vec(byte_edit(), 0..4),
        junk in prop::option::of(bytes(1200)),
    ) {
        let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
        let lead = if first {
            let c: ImageConfig = serde_json::from_slice(&doc).unwrap_or_default();
            tar_member(&c, 0).ok()
        } else {
            None
        };
        let mut members = others;
        members.push(("etc/machinen/image.json".into(), doc));
        let mut bytes = junk.unwrap_or_else(|| tarball(lead, &members, gz));
        for e in &edits {
            mutate(&mut bytes, e);
        }
        let path = dir.path().join("image.tar");
        std::fs::write(&path, &bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match read_from_tarball(&path) {
            Ok(Some(c)) => check(Ok(c))?,
            Ok(None) => {}
            Err(e) => prop_assert_eq!(e.code(), ErrorCode::BootImageInvalid, "{}", e),
        }
    }

    /// Merging a valid baked config with arbitrary command-line settings.
    #[test]
    fn fuzz_image_config_merge_never_panics(
        cmd in prop::option::of(prop::collection::vec(text(), 0..3)),
        env in prop::collection::vec((text(), text()), 0..3),
        cwd in prop::option::of(text()),
    ) {
        let c = sample();
        let m = c.merged(cmd.clone(), &env, cwd.clone());
        prop_assert_eq!(m.cmd.as_ref(), cmd.as_ref().or(c.cmd.as_ref()));
        if let Ok(o) = c.exec_options(cmd, &env, cwd) {
            prop_assert!(!o.argv.is_empty());
            prop_assert!(o.cwd.as_deref().is_none_or(|d| d.starts_with('/')));
        }
    }
}

/// What the JSON property found: a bad env name or a relative cwd baked into
/// an image was reported as the caller's mistake (`BOOT_ARGS_INVALID`).
#[test]
fn fuzz_image_config_bad_fields_blame_the_image() {
    for doc in [
        &br#"{"version":1,"cwd":"rel"}"#[..],
        br#"{"version":1,"env":{"1BAD":"x"}}"#,
        br#"{"version":1,"cmd":[]}"#,
        br#"{"version":2}"#,
    ] {
        let e = ImageConfig::from_json(doc).expect_err("invalid");
        assert_eq!(e.code, ErrorCode::BootImageInvalid, "{e}");
        assert!(
            e.message.contains(IMAGE_CONFIG_PATH)
                || e.message.contains("baked")
                || e.message.contains("image config"),
            "{e}"
        );
    }
}
