//! Image cache tests: real `tar`, `mkfs.ext4`, `debugfs` and `qemu-img`
//! (e2fsprogs and qemu-utils are installed wherever the tests run).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::process::Command;

use super::*;

/// A tiny rootfs tarball: a directory, a file owned by uid 1000, a
/// symlink, a fifo and an executable.
fn tiny_rootfs_tar_gz(path: &Path) {
    let f = fs::File::create(path).expect("create");
    let gz = flate2::write::GzEncoder::new(f, flate2::Compression::fast());
    let mut b = tar::Builder::new(gz);
    let mut add =
        |name: &str, kind: tar::EntryType, mode: u32, uid: u64, data: &[u8], link: Option<&str>| {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_uid(uid);
            h.set_gid(uid);
            h.set_mtime(1_700_000_000);
            h.set_size(data.len() as u64);
            if let Some(l) = link {
                h.set_link_name(l).expect("link name");
            }
            h.set_path(name).expect("path");
            h.set_cksum();
            b.append(&h, data).expect("append");
        };
    add("./", tar::EntryType::Directory, 0o755, 0, b"", None);
    add("./etc/", tar::EntryType::Directory, 0o755, 0, b"", None);
    add(
        "./etc/hostname",
        tar::EntryType::Regular,
        0o644,
        0,
        b"tiny\n",
        None,
    );
    add("./home/", tar::EntryType::Directory, 0o755, 0, b"", None);
    add(
        "./home/user/",
        tar::EntryType::Directory,
        0o700,
        1000,
        b"",
        None,
    );
    add(
        "./home/user/notes.txt",
        tar::EntryType::Regular,
        0o600,
        1000,
        b"owned by 1000\n",
        None,
    );
    add("./bin/", tar::EntryType::Directory, 0o755, 0, b"", None);
    add(
        "./bin/hello",
        tar::EntryType::Regular,
        0o755,
        0,
        b"#!/bin/sh\necho hello\n",
        None,
    );
    add(
        "./bin/hi",
        tar::EntryType::Symlink,
        0o777,
        0,
        b"",
        Some("hello"),
    );
    add("./proc/", tar::EntryType::Directory, 0o555, 0, b"", None);
    b.into_inner().expect("tar").finish().expect("gz");
}

/// `debugfs -R <request> <image>`'s output.
fn debugfs(image: &Path, request: &str) -> String {
    let debugfs = Tool {
        name: "debugfs",
        package: "e2fsprogs",
    }
    .find()
    .expect("debugfs (e2fsprogs) is installed");
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn tarball_becomes_cached_ext4_image_and_overlay() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(dir.path());
    let tarball = dir.path().join("tiny.tar.gz");
    tiny_rootfs_tar_gz(&tarball);

    let img = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("build image");
    assert!(img.built);
    assert_eq!(
        img.path,
        paths
            .cache
            .join("images")
            .join(format!("{}.ext4", img.sha256))
    );
    assert_eq!(img.size, 2 * GIB);
    let meta = fs::metadata(&img.path).expect("stat image");
    assert_eq!(meta.permissions().mode() & 0o777, 0o400);
    assert!(
        meta.blocks() * 512 < 64 * MIB,
        "image should be sparse, uses {} bytes",
        meta.blocks() * 512
    );

    let notes = debugfs(&img.path, "stat /home/user/notes.txt");
    assert!(notes.contains("User:  1000"), "{notes}");
    assert!(notes.contains("Mode:  0600"), "{notes}");
    let link = debugfs(&img.path, "stat /bin/hi");
    assert!(link.contains("Type: symlink"), "{link}");
    assert!(link.contains("Fast link dest: \"hello\""), "{link}");
    let root = debugfs(&img.path, "stat /");
    assert!(
        root.contains("User:     0") && root.contains("Mode:  0755"),
        "{root}"
    );
    let stats = debugfs(&img.path, "stats");
    assert!(
        stats.contains(&format!("Filesystem volume name:   {ROOT_LABEL}")),
        "{stats}"
    );
    assert!(stats.contains("Reserved block count:     0"), "{stats}");

    // Second boot: same image, not rebuilt (the same file; its mtime now
    // says when it was last used).
    let ino = meta.ino();
    let again = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("cached image");
    assert!(!again.built);
    assert_eq!(again.path, img.path);
    assert_eq!(fs::metadata(&img.path).expect("stat").ino(), ino);

    // No scratch left behind next to the cache.
    let leftovers: Vec<_> = fs::read_dir(paths.cache.join("images"))
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // Overlay backed by the cached image.
    let overlay = dir.path().join("vm").join("disk.qcow2");
    fs::create_dir_all(overlay.parent().expect("parent")).expect("mkdir");
    create_overlay(&img.path, &overlay).expect("overlay");
    let qemu_img = tool::QEMU_IMG
        .find()
        .expect("qemu-img (qemu-utils) is installed");
    let out = Command::new(qemu_img)
        .args(["info", "--output=json"])
        .arg(&overlay)
        .output()
        .expect("qemu-img info");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(info["format"], "qcow2");
    assert_eq!(
        info["backing-filename"],
        img.path.to_string_lossy().as_ref()
    );
    assert_eq!(info["backing-filename-format"], "raw");
    assert_eq!(info["virtual-size"], 2 * GIB);
}

#[test]
fn same_content_elsewhere_shares_the_image() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(dir.path());
    let a = dir.path().join("a.tar");
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_size(3);
    h.set_mode(0o644);
    h.set_cksum();
    b.append_data(&mut h, "f", &b"abc"[..]).expect("append");
    fs::write(&a, b.into_inner().expect("tar")).expect("write");
    let copy = dir.path().join("b.tar");
    fs::copy(&a, &copy).expect("copy");
    let one = ensure_rootfs_image(&paths, &a, ProgressMode::Quiet).expect("image a");
    let two = ensure_rootfs_image(&paths, &copy, ProgressMode::Quiet).expect("image b");
    assert!(one.built && !two.built);
    assert_eq!(one.path, two.path);
}

#[test]
fn bad_tarballs_are_invalid_images() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(dir.path());
    let check = |name: &str, content: Option<&[u8]>| {
        let p = dir.path().join(name);
        if let Some(c) = content {
            fs::write(&p, c).expect("write");
        }
        let err = ensure_rootfs_image(&paths, &p, ProgressMode::Quiet).expect_err(name);
        assert_eq!(err.code(), ErrorCode::BootImageInvalid, "{name}: {err}");
        assert!(
            err.to_string().contains(&p.display().to_string()),
            "{name}: {err}"
        );
        assert!(err.hint().is_some());
        err
    };
    assert!(matches!(
        check("missing.tar.gz", None),
        ImageError::NotFound { .. }
    ));
    assert!(matches!(
        check("empty.tar", Some(b"")),
        ImageError::Empty { .. }
    ));
    assert!(matches!(
        check("zeros.tar", Some(&[0u8; 1024])),
        ImageError::Empty { .. }
    ));
    assert!(matches!(
        check(
            "text.tar.gz",
            Some(&b"hello, not a tarball at all\n".repeat(40))
        ),
        ImageError::NotATarball { .. }
    ));
    assert!(matches!(
        check("x.tar.xz", Some(b"\xfd7zXZ\x00rest")),
        ImageError::NotATarball { .. }
    ));

    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&b"just text in a gzip stream\n".repeat(40))
        .expect("gz");
    let gz = gz.finish().expect("gz");
    assert!(matches!(
        check("textgz.tar.gz", Some(&gz)),
        ImageError::NotATarball { .. }
    ));

    let good = dir.path().join("good.tar.gz");
    tiny_rootfs_tar_gz(&good);
    let mut bytes = fs::read(&good).expect("read");
    bytes.truncate(bytes.len() * 2 / 3);
    assert!(matches!(
        check("truncated.tar.gz", Some(&bytes)),
        ImageError::Corrupt { .. }
    ));
    // A failed build leaves no image and no scratch.
    let images = paths.cache.join("images");
    let names: Vec<_> = fs::read_dir(&images)
        .expect("ls")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n.ends_with(".lock") || n == "hashes"),
        "{names:?}"
    );

    let err = create_overlay(&dir.path().join("nope.ext4"), &dir.path().join("o.qcow2"))
        .expect_err("no base");
    assert!(matches!(err, ImageError::NotFound { .. }));
}

#[test]
fn sizes_leave_room() {
    assert_eq!(image_size(0), 2 * GIB);
    assert_eq!(image_size(200 * MIB), 2 * GIB);
    assert_eq!(image_size(GIB), 3 * GIB);
    assert_eq!(image_size(GIB + 1) % MIB, 0);
    assert_eq!(image_size(u64::MAX) % MIB, 0);
}

#[test]
fn tar_corruption_messages() {
    assert!(tar_says_corrupt(
        "tar: Unexpected EOF in archive\ntar: Error is not recoverable"
    ));
    assert!(tar_says_corrupt("gzip: stdin: unexpected end of file"));
    assert!(!tar_says_corrupt(
        "tar: ./x: Cannot open: No space left on device"
    ));
}

#[test]
fn scratch_of_an_interrupted_build_is_removed_by_the_next_build() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(dir.path());
    let tarball = dir.path().join("tiny.tar.gz");
    tiny_rootfs_tar_gz(&tarball);
    let img = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("build image");
    // A build of this image killed half-way (read-only directories, as an
    // unprivileged unpack leaves them), and one of another image.
    let images = paths.cache.join("images");
    let stale = images.join(format!("{}abc123", build_prefix(&img.sha256)));
    let locked = stale.join("root").join("usr");
    fs::create_dir_all(&locked).expect("mkdir");
    fs::write(locked.join("f"), "x").expect("write");
    fs::set_permissions(&locked, fs::Permissions::from_mode(0o555)).expect("chmod");
    let other = images.join(format!("{}def456", build_prefix(&"0".repeat(64))));
    fs::create_dir_all(&other).expect("mkdir");
    fs::remove_file(&img.path).expect("forget the image");

    let again = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("rebuild");
    assert!(again.built);
    assert!(!stale.exists(), "the interrupted build's scratch is gone");
    assert!(
        other.exists(),
        "another image's build is not ours to remove"
    );
}

#[test]
fn prune_spares_images_in_use_or_used_lately_and_a_boot_converts_again() {
    let dir = tempfile::tempdir().expect("tempdir");
    let paths = Paths::rooted(dir.path());
    let tarball = dir.path().join("tiny.tar.gz");
    tiny_rootfs_tar_gz(&tarball);
    let img = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("build image");
    let grace = std::time::Duration::from_secs(600);
    let age = |secs: u64| {
        let t = std::time::SystemTime::now() - std::time::Duration::from_secs(secs);
        fs::File::open(&img.path)
            .and_then(|f| f.set_modified(t))
            .expect("set mtime");
    };
    let none = std::collections::BTreeSet::new();
    let using: std::collections::BTreeSet<PathBuf> = [img.path.clone()].into();

    // Just built: within the grace period.
    assert_eq!(prune_unused(&paths, &none, grace), 0);
    assert!(img.path.exists());
    // Old but a VM boots from it.
    age(3600);
    assert_eq!(prune_unused(&paths, &using, grace), 0);
    assert!(img.path.exists());
    // Old, then a boot finds it in the cache: that use makes it recent.
    let again = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("cached");
    assert!(!again.built);
    assert_eq!(prune_unused(&paths, &none, grace), 0);
    // Old and unused: removed; the next boot converts the tarball again.
    age(3600);
    assert!(prune_unused(&paths, &none, grace) > 0);
    assert!(!img.path.exists());
    let rebuilt = ensure_rootfs_image(&paths, &tarball, ProgressMode::Quiet).expect("rebuild");
    assert!(rebuilt.built);
    assert_eq!(rebuilt.path, img.path);
    // The hash index and the baked-config records are not images.
    assert!(paths.cache.join("images").join("hashes").is_dir());
}
