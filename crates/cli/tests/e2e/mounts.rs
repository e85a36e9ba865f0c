//! Copy-once mounts (`boot --mount HOST_DIR:GUEST_PATH`) on real VMs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{sha256_hex, Env};

fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.run_ok(&["exec", vm, "--", "sh", "-c", script])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Where machinen caches the mounts' lowers (as the library resolves it).
fn lower_cache() -> PathBuf {
    super::cache_dir().join("mounts")
}

/// The cached lowers: (name, inode).
fn lowers() -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = std::fs::read_dir(lower_cache())
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".ext4"))
                .map(|e| {
                    let ino = e.metadata().map(|m| m.ino()).unwrap_or(0);
                    (e.file_name().to_string_lossy().into_owned(), ino)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn bad_mounts_are_refused_with_their_codes_before_anything_starts() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let d = s(dir.path());
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").expect("file");
    for (spec, code, exit) in [
        ("nocolon".to_string(), "BOOT_MOUNT_INVALID", 2),
        (format!("{d}/missing:/x"), "BOOT_MOUNT_HOST_NOT_FOUND", 125),
        (format!("{}:/x", s(&file)), "BOOT_MOUNT_INVALID", 2),
        (format!("{d}:relative"), "MOUNT_PATH_INVALID", 2),
        (format!("{d}:/proc/x"), "MOUNT_PATH_INVALID", 2),
        (format!("{d}:/etc"), "MOUNT_PATH_INVALID", 2),
        (format!("{d}:/a/../b"), "MOUNT_PATH_INVALID", 2),
    ] {
        let out = env.run(&["boot", "--mount", &spec, "--", "true"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(code), "{spec}: {err}");
        assert_eq!(out.status.code(), Some(exit), "{spec}: {err}");
    }
    let out = env.run(&[
        "boot",
        "--mount",
        &format!("{d}:/x"),
        "--mount",
        &format!("{d}:/x/y"),
        "--",
        "true",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("overlap"));
    assert!(env.vm_dirs().is_empty(), "nothing was started");
}

/// One long scenario on one source VM: what the guest sees, isolation both
/// ways, the bound on the guest's writes, the cache, and snapshot, restore
/// and fork keeping the guest's copy (a fork's writes its own), and the
/// bundle's verification covering the mounts' files.
#[test]
fn copy_once_mounts_isolate_both_ways_and_survive_snapshot_restore_and_fork() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let src = dir.path().join("src");
    let data = dir.path().join("data");
    std::fs::create_dir_all(src.join("sub")).expect("src");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::write(src.join("a.txt"), "alpha\n").expect("a");
    std::fs::write(src.join("sub/b.txt"), "beta\n").expect("b");
    std::fs::write(src.join("with space.txt"), "spaced\n").expect("space");
    std::fs::write(src.join("run.sh"), "#!/bin/sh\necho ran\n").expect("run");
    std::fs::set_permissions(src.join("run.sh"), std::fs::Permissions::from_mode(0o755))
        .expect("chmod");
    // A symlink out of the tree is copied as a link, never followed.
    std::os::unix::fs::symlink("/etc/hostname", src.join("out")).expect("symlink");
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(data.join("d.bin"), &blob).expect("blob");
    let blob_sha = sha256_hex(&blob);

    env.run_ok(&[
        "boot",
        "--name",
        "m1",
        "--detached",
        "--mount",
        &format!("{}:/work/src", s(&src)),
        "--mount",
        &format!("{}:/data", s(&data)),
        "--mount-upper-size",
        "64M",
    ]);

    let ls = env.json(&["ls", "--json"]);
    let m1 = &ls.as_array().expect("ls")[0];
    assert_eq!(m1["mounts"][0]["guest"], "/work/src");
    assert_eq!(m1["mounts"][1]["host"], s(&data));

    // What the guest sees: contents, modes, root ownership, the link as a link.
    let seen = sh(
        &env,
        "m1",
        "cat /work/src/a.txt /work/src/sub/b.txt '/work/src/with space.txt'; /work/src/run.sh; \
         readlink /work/src/out; stat -c '%u:%g %a' /work/src/run.sh /work/src; \
         sha256sum /data/d.bin | cut -d' ' -f1",
    );
    let host_mode = std::fs::metadata(&src).expect("meta").mode() & 0o7777;
    assert_eq!(
        seen,
        format!(
            "alpha\nbeta\nspaced\nran\n/etc/hostname\n0:0 755\n0:0 {host_mode:o}\n{blob_sha}\n"
        )
    );

    // Guest → host: changes stay in the VM.
    sh(
        &env,
        "m1",
        "echo changed > /work/src/a.txt && echo new > /work/src/new.txt && rm /work/src/sub/b.txt && sync",
    );
    assert_eq!(
        std::fs::read_to_string(src.join("a.txt")).expect("a"),
        "alpha\n"
    );
    assert!(!src.join("new.txt").exists());
    assert!(src.join("sub/b.txt").exists());
    // Host → guest: later changes never reach the VM.
    std::fs::write(src.join("a.txt"), "host-later\n").expect("a");
    std::fs::write(src.join("later.txt"), "later\n").expect("later");
    assert_eq!(
        sh(
            &env,
            "m1",
            "cat /work/src/a.txt; test -e /work/src/later.txt && echo later-seen; ls /work/src/sub | wc -l"
        ),
        "changed\n0\n"
    );

    // The guest's room: about the upper size, and no more.
    let avail: u64 = sh(&env, "m1", "df -k --output=avail /work/src | tail -1")
        .trim()
        .parse()
        .expect("df");
    assert!(
        (40 * 1024..200 * 1024).contains(&avail),
        "{avail} KiB free with --mount-upper-size 64M"
    );
    let full = env.run(&[
        "exec",
        "m1",
        "--",
        "sh",
        "-c",
        "dd if=/dev/zero of=/work/src/big bs=1M count=256 2>&1",
    ]);
    assert!(
        !full.status.success(),
        "256 MiB must not fit in 64M of room"
    );
    assert!(
        String::from_utf8_lossy(&full.stdout).contains("No space left"),
        "{}",
        String::from_utf8_lossy(&full.stdout)
    );
    sh(&env, "m1", "rm /work/src/big && sync");

    // The same trees again: the cached lower is used, not rebuilt.
    let before = lowers();
    let out = env.run_ok(&[
        "boot",
        "--mount",
        &format!("{}:/data", s(&data)),
        "--",
        "sh",
        "-c",
        "sha256sum /data/d.bin | cut -d' ' -f1",
    ]);
    assert_eq!(out.trim(), blob_sha);
    let once = lowers();
    assert_eq!(once.len(), before.len() + 1, "one new lower: {once:?}");
    env.run_ok(&[
        "boot",
        "--mount",
        &format!("{}:/elsewhere", s(&data)),
        "--",
        "true",
    ]);
    assert_eq!(lowers(), once, "same tree: same lower, same file");

    // Snapshot (keep-alive), restore: the guest's copy as it left it.
    let snap = dir.path().join("m1.snap");
    env.run_ok(&["snapshot", "m1", s(&snap), "--keep-alive"]);
    for f in ["mounts.qcow2", "mounts-lower.ext4"] {
        assert!(snap.join(f).is_file(), "the bundle has {f}");
    }
    env.run_ok(&["restore", s(&snap), "--name", "r1", "--detached"]);
    let restored =
        "cat /work/src/a.txt /work/src/new.txt; test -e /work/src/sub/b.txt || echo b-gone; \
                    sha256sum /data/d.bin | cut -d' ' -f1";
    let want = format!("changed\nnew\nb-gone\n{blob_sha}\n");
    assert_eq!(sh(&env, "r1", restored), want);

    // Fork: each side's later writes are its own.
    env.run_ok(&["fork", "m1", "--new-name", "f1", "--detach"]);
    assert_eq!(sh(&env, "f1", restored), want);
    sh(&env, "f1", "echo fork > /work/src/fork-only && sync");
    sh(&env, "m1", "echo source > /work/src/source-only && sync");
    let probe = "ls /work/src | grep -- -only || true";
    assert_eq!(sh(&env, "f1", probe), "fork-only\n");
    assert_eq!(sh(&env, "m1", probe), "source-only\n");
    assert_eq!(sh(&env, "r1", probe), "");
    for vm in ["f1", "r1", "m1"] {
        env.run_ok(&["stop", "--force", vm]);
    }

    // Verification covers the mounts' layer and lower. The bundle's lower
    // may be a hard link to the cache: it is replaced by a damaged copy,
    // never written in place.
    for f in ["mounts.qcow2", "mounts-lower.ext4"] {
        let p = snap.join(f);
        let good = std::fs::read(&p).expect("read");
        let mut bad = good.clone();
        let at = bad.len() / 2;
        bad[at] ^= 0x40;
        std::fs::remove_file(&p).expect("unlink");
        std::fs::write(&p, &bad).expect("damage");
        let out = env.run(&["restore", s(&snap), "--dry-run"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{f}: {err}");
        assert!(
            err.contains("RESTORE_BUNDLE_INVALID") && err.contains(f),
            "{f}: {err}"
        );
        std::fs::remove_file(&p).expect("unlink");
        std::fs::write(&p, &good).expect("repair");
    }
    env.run_ok(&["restore", s(&snap), "--dry-run"]);
}
