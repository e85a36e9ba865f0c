use std::collections::BTreeMap;
use std::io::Write;

use super::config::{is_config_member, read_from_tarball, tar_member};
use super::*;

fn sample() -> ImageConfig {
    ImageConfig {
        version: 1,
        cmd: Some(vec!["/app/hello".into(), "--loud".into()]),
        env: BTreeMap::from([
            ("MODE".to_string(), "prod".to_string()),
            ("GREETING".into(), "hi".into()),
        ]),
        cwd: Some("/app".into()),
        entrypoint: None,
        user: None,
        exposed_ports: vec!["8080/tcp".into()],
        labels: BTreeMap::from([("team".to_string(), "a".to_string())]),
    }
}

#[test]
fn config_json_round_trip_and_validation() {
    let c = sample();
    let json = c.to_json();
    let text = String::from_utf8(json.clone()).expect("utf8");
    assert!(
        text.contains("\"version\": 1") && text.contains("\"cwd\": \"/app\""),
        "{text}"
    );
    assert_eq!(ImageConfig::from_json(&json).expect("parse"), c);

    // Only the version is required; unknown fields are ignored.
    let minimal = ImageConfig::from_json(br#"{"version":1,"future":true}"#).expect("minimal");
    assert_eq!(minimal, ImageConfig::default());

    let newer = ImageConfig::from_json(br#"{"version":2}"#).expect_err("newer");
    assert_eq!(newer.code, ErrorCode::BootImageInvalid);
    assert!(ImageConfig::from_json(br#"{"version":1,"cmd":[]}"#).is_err());
    assert!(ImageConfig::from_json(br#"{"version":1,"cwd":"rel"}"#).is_err());
    assert!(ImageConfig::from_json(br#"{"version":1,"env":{"1BAD":"x"}}"#).is_err());
    assert!(ImageConfig::from_json(b"not json").is_err());
}

#[test]
fn merging_overrides_keys_cwd_and_cmd() {
    let c = sample();
    let m = c.merged(
        None,
        &[("MODE".into(), "dev".into()), ("NEW".into(), "1".into())],
        None,
    );
    assert_eq!(m.env["MODE"], "dev");
    assert_eq!(m.env["GREETING"], "hi");
    assert_eq!(m.env["NEW"], "1");
    assert_eq!(m.cwd.as_deref(), Some("/app"));
    assert_eq!(m.cmd, c.cmd);
    let m = c.merged(Some(vec!["true".into()]), &[], Some("/tmp".into()));
    assert_eq!(
        (m.cmd, m.cwd),
        (Some(vec!["true".to_string()]), Some("/tmp".to_string()))
    );

    // exec options: the baked command unless one is given.
    let o = c
        .exec_options(None, &[("MODE".into(), "x".into())], None)
        .expect("baked");
    assert_eq!(o.argv, vec!["/app/hello", "--loud"]);
    assert!(
        o.env.contains(&("MODE".into(), "x".into()))
            && o.env.contains(&("GREETING".into(), "hi".into()))
    );
    assert_eq!(o.cwd.as_deref(), Some("/app"));
    let o = c
        .exec_options(Some(vec!["id".into()]), &[], Some("/".into()))
        .expect("given");
    assert_eq!(
        (o.argv, o.cwd.as_deref()),
        (vec!["id".to_string()], Some("/"))
    );
    let e = ImageConfig::default()
        .exec_options(None, &[], None)
        .expect_err("nothing to run");
    assert_eq!(e.code, ErrorCode::BootArgsInvalid);
    assert!(e.hint.unwrap_or_default().contains("--"));
}

#[test]
fn member_names() {
    for n in [
        "./etc/machinen/image.json",
        "etc/machinen/image.json",
        "/etc/machinen/image.json",
    ] {
        assert!(is_config_member(n.as_bytes()), "{n}");
    }
    assert!(!is_config_member(b"./etc/machinen/image.json.bak"));
    assert!(!is_config_member(b"./x/etc/machinen/image.json"));
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).expect("gz");
    e.finish().expect("gz")
}

/// A small rootfs-like tar (with the end-of-archive blocks).
fn rootfs_tar(extra: Option<&ImageConfig>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o755);
    h.set_size(0);
    b.append_data(&mut h, "./etc/", std::io::empty())
        .expect("dir");
    let mut h = tar::Header::new_ustar();
    h.set_mode(0o644);
    h.set_size(3);
    b.append_data(&mut h, "./etc/hostname", &b"vm\n"[..])
        .expect("file");
    if let Some(c) = extra {
        let data = c.to_json();
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        b.append_data(&mut h, "./etc/machinen/image.json", data.as_slice())
            .expect("cfg");
    }
    b.into_inner().expect("tar")
}

#[test]
fn config_member_goes_in_front_of_a_tar_stream() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = sample();
    let mut bytes = tar_member(&c, 1_700_000_000).expect("member");
    assert_eq!(bytes.len() % 512, 0);
    bytes.extend(rootfs_tar(None));
    let p = dir.path().join("img.tar.gz");
    std::fs::write(&p, gz(&bytes)).expect("write");
    assert_eq!(read_from_tarball(&p).expect("read"), Some(c.clone()));

    // The archive stays valid for ordinary readers: config first, then the rest.
    let mut a = tar::Archive::new(flate2::read::GzDecoder::new(
        std::fs::File::open(&p).expect("open"),
    ));
    let names: Vec<String> = a
        .entries()
        .expect("e")
        .map(|e| {
            e.expect("e")
                .path()
                .expect("p")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    assert_eq!(
        names,
        vec!["etc/machinen/image.json", "etc/", "etc/hostname"]
    );
}

#[test]
fn config_anywhere_in_a_plain_tar_or_none() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = sample();
    let p = dir.path().join("img.tar");
    std::fs::write(&p, rootfs_tar(Some(&c))).expect("write");
    assert_eq!(read_from_tarball(&p).expect("read"), Some(c));
    std::fs::write(&p, gz(&rootfs_tar(None))).expect("write");
    assert_eq!(read_from_tarball(&p).expect("read"), None);
    let bad = ImageConfig {
        version: 9,
        ..Default::default()
    };
    std::fs::write(&p, rootfs_tar(Some(&bad))).expect("write");
    assert_eq!(
        read_from_tarball(&p).expect_err("newer").code(),
        ErrorCode::BootImageInvalid
    );
}

#[test]
fn export_script_excludes_runtime_junk() {
    let s = export::export_script();
    for e in EXCLUDES {
        assert!(s.contains(&format!("--exclude='{e}'")), "{e}");
    }
    assert!(s.contains("--xattrs") && s.contains("--numeric-owner") && s.contains("--anchored"));
    assert!(s.contains("mount --bind / "));
}

#[test]
fn steps_display_and_errors_carry_codes() {
    assert_eq!(Step::Run("make".into()).to_string(), "run: make");
    let e: crate::Error = ProvisionError::StepFailed {
        step: "run: false".into(),
        status: ExitStatus {
            code: Some(3),
            signal: None,
        },
    }
    .into();
    assert_eq!(e.code(), ErrorCode::ProvisionStepFailed);
    assert!(e.to_string().contains("exit code 3"), "{e}");
    let e: crate::Error = ProvisionError::InvalidArgs {
        message: "x".into(),
        hint: "y".into(),
    }
    .into();
    assert_eq!(e.code(), ErrorCode::ProvisionArgsInvalid);
    assert_eq!(e.code().exit_code(), 2);
}

#[test]
fn output_path_checks() {
    let dir = tempfile::tempdir().expect("tmp");
    assert!(check_out(&dir.path().join("a.tar.gz")).is_ok());
    assert!(check_out(dir.path()).is_err());
    assert!(check_out(&dir.path().join("missing/a.tar.gz")).is_err());
    assert!(check_out(Path::new("")).is_err());
}
