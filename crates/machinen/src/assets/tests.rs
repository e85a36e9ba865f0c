use super::*;

fn fake_install(dir: &Path, layout: u32) -> Marker {
    let ver = "6.1.0-99-cloud-amd64";
    let mdir = dir.join(MODULES).join("lib/modules").join(ver);
    fs::create_dir_all(&mdir).expect("mkdir");
    fs::write(mdir.join("modules.dep"), "").expect("dep");
    fs::write(dir.join(KERNEL), b"kernel").expect("kernel");
    fs::write(dir.join(ROOTFS), b"rootfs").expect("rootfs");
    let marker = Marker {
        layout,
        arch: debian_arch().into(),
        suite: "bookworm".into(),
        kernel_version: ver.into(),
        kernel_package: format!("linux-image-{ver}"),
        kernel_package_version: "6.1.999-1".into(),
        kernel_size: 6,
        rootfs_sha256: "ab".repeat(32),
        rootfs_size: 6,
        created_at: 1,
    };
    write_json(&dir.join(MARKER), &marker).expect("marker");
    marker
}

#[test]
fn resolve_says_what_is_missing() {
    let root = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(root.path());
    let err = resolve(&paths).expect_err("nothing installed");
    assert!(matches!(err, InstallError::KernelNotFound { .. }));
    assert_eq!(err.code(), ErrorCode::ProvisionKernelNotFound);
    assert!(err.hint().is_some_and(|h| h.contains("machinen install")));

    fs::create_dir_all(&paths.assets).expect("mkdir");
    fs::write(paths.assets.join(KERNEL), b"k").expect("kernel");
    let err = resolve(&paths).expect_err("no rootfs");
    assert!(matches!(err, InstallError::BaseNotFound { .. }));
    assert_eq!(err.code(), ErrorCode::ProvisionBaseNotFound);
    assert!(err.hint().is_some_and(|h| h.contains("machinen install")));

    // Files without a marker: an interrupted install.
    fs::write(paths.assets.join(ROOTFS), b"r").expect("rootfs");
    assert!(matches!(
        resolve(&paths),
        Err(InstallError::KernelNotFound { .. })
    ));
}

#[test]
fn resolve_and_install_use_the_marker() {
    let root = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(root.path());
    let marker = fake_install(&paths.assets, ASSETS_LAYOUT);
    let a = resolve(&paths).expect("installed");
    assert_eq!(a.kernel, paths.assets.join("vmlinuz"));
    assert_eq!(a.kernel_version, marker.kernel_version);
    assert_eq!(a.modules_root, paths.assets.join("modules"));
    assert_eq!(a.rootfs, paths.assets.join("rootfs.tar.gz"));

    let r = install(
        &paths,
        &InstallOptions {
            force: false,
            progress: ProgressMode::Quiet,
        },
    )
    .expect("no-op install");
    assert!(r.already_installed);
    assert_eq!(r.rootfs_sha256, marker.rootfs_sha256);
    assert_eq!(r.kernel_package, marker.kernel_package);
    assert!(r.elapsed_ms < 1000);
    let json = serde_json::to_value(&r).expect("json");
    assert_eq!(json["already_installed"], true);
    assert_eq!(
        json["assets"]["kernel_version"],
        marker.kernel_version.as_str()
    );

    // A module tree gone missing makes the install incomplete.
    fs::remove_file(
        a.modules_root
            .join("lib/modules")
            .join(&a.kernel_version)
            .join("modules.dep"),
    )
    .expect("rm");
    assert!(resolve(&paths).is_err());
}

#[test]
fn other_layouts_and_broken_markers() {
    let root = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(root.path());
    fake_install(&paths.assets, ASSETS_LAYOUT + 1);
    assert!(matches!(
        resolve(&paths),
        Err(InstallError::KernelNotFound { .. })
    ));

    fs::write(paths.assets.join(MARKER), b"{\"layout\": ").expect("write");
    let err = resolve(&paths).expect_err("broken marker");
    assert!(matches!(err, InstallError::MarkerInvalid { .. }));
    assert_eq!(err.code(), ErrorCode::ProvisionAssetsDirInvalid);
    assert!(err.hint().is_some_and(|h| h.contains("--force")));
    // install is not stopped by it: it is what install replaces.
    assert!(matches!(installed_for_install(&paths.assets), Ok(None)));
}

#[test]
fn errors_name_packages_and_keep_causes() {
    let e = InstallError::ToolMissing {
        tool: "mkfs.ext4",
        package: "e2fsprogs",
    };
    assert_eq!(e.code(), ErrorCode::InstallToolMissing);
    assert_eq!(
        e.hint().as_deref(),
        Some("install it: `apt-get install e2fsprogs`")
    );
    let e = InstallError::AptListsMissing {
        package: "linux-image-cloud-amd64".into(),
    };
    assert_eq!(e.code(), ErrorCode::InstallFetchFailed);
    assert!(e.hint().is_some_and(|h| h.contains("apt-get update")));
    let lib: crate::Error = e.into();
    assert!(lib.retryable());
}

/// Really install on this machine, into the default location
/// (`Paths::from_env()`), then build an initramfs with a stand-in agent.
/// Run with `cargo test -p machinen --lib -- --ignored real_install --nocapture`.
/// `MACHINEN_FORCE_INSTALL=1` rebuilds; `MACHINEN_TEST_AGENT` picks the
/// stand-in (default: the statically linked `/sbin/ldconfig`).
#[test]
#[ignore = "fetches a kernel and builds a rootfs through apt (minutes, network)"]
fn real_install() {
    let paths = Paths::from_env().expect("paths");
    let force = std::env::var_os(machinen_proto::env::FORCE_INSTALL).is_some();
    let r = install(
        &paths,
        &InstallOptions {
            force,
            progress: ProgressMode::Auto,
        },
    )
    .unwrap_or_else(|e| {
        let e: crate::Error = e.into();
        panic!("{}", e.to_json())
    });
    println!("{}", serde_json::to_string_pretty(&r).expect("json"));
    let assets = resolve(&paths).expect("resolve after install");
    assert!(assets.kernel.is_file() && assets.rootfs.is_file());

    let t = Instant::now();
    let again = install(&paths, &InstallOptions::default()).expect("second install");
    assert!(again.already_installed);
    println!("second install: {} ms", t.elapsed().as_millis());

    for what in ["first", "second"] {
        let t = Instant::now();
        let img = crate::image::ensure_rootfs_image(&paths, &assets.rootfs, ProgressMode::Auto)
            .expect("image");
        let used = {
            use std::os::unix::fs::MetadataExt;
            fs::metadata(&img.path).expect("stat").blocks() * 512
        };
        println!(
            "{what} image conversion: {} ms (built: {}), {} ({} bytes apparent, {used} bytes used)",
            t.elapsed().as_millis(),
            img.built,
            img.path.display(),
            img.size
        );
    }

    let agent = std::env::var_os(machinen_proto::env::TEST_AGENT)
        .map(PathBuf::from)
        .unwrap_or_else(|| "/sbin/ldconfig".into());
    let t = Instant::now();
    let cpio = crate::initramfs::ensure_initramfs(&paths, &assets, &agent).expect("initramfs");
    println!(
        "initramfs {} ({} bytes) in {} ms",
        cpio.display(),
        fs::metadata(&cpio).expect("stat").len(),
        t.elapsed().as_millis()
    );
    if let Some(cpio_tool) = (Tool {
        name: "cpio",
        package: "cpio",
    })
    .find()
    {
        let out = std::process::Command::new(cpio_tool)
            .args(["-itv", "--quiet", "-F"])
            .arg(&cpio)
            .output()
            .expect("cpio");
        let listing = String::from_utf8_lossy(&out.stdout);
        println!("{listing}");
        assert!(listing
            .lines()
            .any(|l| l.starts_with("-rwxr-xr-x") && l.ends_with(" init")));
        assert!(listing
            .lines()
            .any(|l| l.ends_with("etc/machinen/modules.load")));
    }
}
