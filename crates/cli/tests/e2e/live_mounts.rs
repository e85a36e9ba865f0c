//! Live mounts (`--mount-live HOST_DIR:GUEST_PATH[:ro|rw]`, virtio-fs) on
//! real VMs.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::time::Duration;

use super::{wait_until, Env};

fn sh(env: &Env, vm: &str, script: &str) -> String {
    env.run_ok(&["exec", vm, "--", "sh", "-c", script])
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// The uid a root-run test gives the shared directory: the guest must act
/// as it, never as root.
const OWNER: u32 = 4242;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// A temporary directory any user may traverse (a virtiofsd that runs as
/// the share's owner must reach the share).
fn open_tempdir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    d
}

fn chown(p: &Path, uid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(uid)).expect("chown");
}

#[test]
fn bad_live_mounts_are_refused_with_their_codes_before_anything_starts() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let d = s(dir.path());
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").expect("file");
    let registry = env.registry.path().to_str().expect("utf8").to_string();
    for (args, code, exit) in [
        (vec!["--mount-live", "nocolon"], "BOOT_MOUNT_INVALID", 2),
        (
            vec!["--mount-live", &format!("{d}/missing:/x")],
            "BOOT_MOUNT_HOST_NOT_FOUND",
            125,
        ),
        (
            vec!["--mount-live", &format!("{}:/x", s(&file))],
            "BOOT_MOUNT_INVALID",
            2,
        ),
        (
            vec!["--mount-live", &format!("{d}:relative")],
            "MOUNT_PATH_INVALID",
            2,
        ),
        (
            vec!["--mount-live", &format!("{d}:/etc:ro")],
            "MOUNT_PATH_INVALID",
            2,
        ),
        (
            vec![
                "--mount-live",
                &format!("{d}:/x"),
                "--mount",
                &format!("{d}:/x/y"),
            ],
            "BOOT_MOUNT_INVALID",
            2,
        ),
        // What would hand the guest machinen's own state (or everything).
        (vec!["--mount-live", "/:/host"], "MOUNT_PATH_ESCAPE", 2),
        (
            vec!["--mount-live", &format!("{registry}:/reg")],
            "MOUNT_PATH_ESCAPE",
            2,
        ),
        (vec!["--mount-live", "/tmp:/t"], "MOUNT_PATH_ESCAPE", 2),
    ] {
        let mut a = vec!["boot"];
        a.extend(args.iter().copied());
        a.extend(["--", "true"]);
        let out = env.run(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(code), "{args:?}: {err}");
        assert_eq!(out.status.code(), Some(exit), "{args:?}: {err}");
    }
    let nine: Vec<String> = (0..9)
        .flat_map(|i| ["--mount-live".to_string(), format!("{d}:/m{i}")])
        .collect();
    let mut a = vec!["boot"];
    a.extend(nine.iter().map(|s| s.as_str()));
    a.extend(["--", "true"]);
    let out = env.run(&a);
    assert!(String::from_utf8_lossy(&out.stderr).contains("at most 8"));
    assert!(env.vm_dirs().is_empty(), "nothing was started");
}

/// One VM with a read-write and a read-only share: changes cross both
/// ways, the read-only one refuses guest writes, and every escape attempt
/// from the guest stays inside the share (symlinks out, `..` chains, a
/// symlink swapped in under a reader, hard links out, device nodes) while
/// the guest acts as the share's owner only (setuid bits confined to it,
/// no chown, no change to a root-owned file).
#[test]
fn live_mounts_share_both_ways_read_only_refuses_and_escapes_stay_inside() {
    let env = Env::new();
    let dir = open_tempdir();
    let rw = dir.path().join("rw");
    let ro = dir.path().join("ro");
    std::fs::create_dir_all(rw.join("sub")).expect("rw");
    std::fs::create_dir_all(&ro).expect("ro");
    std::fs::write(rw.join("host.txt"), "from the host\n").expect("host.txt");
    std::fs::write(ro.join("r.txt"), "read me\n").expect("r.txt");
    // Outside the share: the guest must never read this.
    let marker = dir.path().join("outside-marker");
    std::fs::write(&marker, "HOST-SECRET-7f3a\n").expect("marker");
    std::os::unix::fs::symlink(&marker, rw.join("abs-link")).expect("abs");
    std::os::unix::fs::symlink("../outside-marker", rw.join("rel-link")).expect("rel");
    std::os::unix::fs::symlink("/etc", rw.join("etc-link")).expect("etc");
    let root = is_root();
    if root {
        // Root's file in the user's share: the guest (acting as the owner)
        // may read it but neither change it nor make it setuid.
        std::fs::write(rw.join("roots.txt"), "root's\n").expect("roots");
        std::fs::set_permissions(rw.join("roots.txt"), std::fs::Permissions::from_mode(0o644))
            .expect("chmod");
        for e in walk(&rw) {
            if e != rw.join("roots.txt") {
                let _ = std::os::unix::fs::lchown(&e, Some(OWNER), Some(OWNER));
            }
        }
        chown(&ro, OWNER);
    }
    let owner = if root {
        OWNER
    } else {
        std::fs::metadata(&rw).expect("md").uid()
    };

    env.run_ok(&[
        "boot",
        "--name",
        "lm",
        "--detached",
        "--mount-live",
        &format!("{}:/work", s(&rw)),
        "--mount-live",
        &format!("{}:/ref:ro", s(&ro)),
    ]);
    let ls = env.json(&["ls", "--json"]);
    let live = &ls.as_array().expect("ls")[0]["live_mounts"];
    assert_eq!(live[0]["guest"], "/work");
    assert_eq!(live[1]["readonly"], true);

    // Host to guest and guest to host.
    assert_eq!(
        sh(&env, "lm", "cat /work/host.txt /ref/r.txt"),
        "from the host\nread me\n"
    );
    sh(
        &env,
        "lm",
        "echo from the guest > /work/guest.txt; mkdir -p /work/sub/deep; echo x > /work/sub/deep/f",
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("guest.txt")).expect("guest.txt"),
        "from the guest\n",
        "a guest write is on the host when the command returns"
    );
    assert!(rw.join("sub/deep/f").is_file());
    std::fs::write(rw.join("later.txt"), "later\n").expect("later");
    std::fs::write(rw.join("host.txt"), "changed on the host\n").expect("rewrite");
    wait_until(
        "the host's changes in the guest",
        Duration::from_secs(10),
        || {
            sh(
                &env,
                "lm",
                "cat /work/later.txt /work/host.txt 2>/dev/null; true",
            ) == "later\nchanged on the host\n"
        },
    );
    // The guest sees what its owner has as root's, and what it makes lands
    // as the owner's.
    assert_eq!(sh(&env, "lm", "stat -c %u /work/host.txt"), "0\n");
    assert_eq!(
        std::fs::metadata(rw.join("guest.txt")).expect("md").uid(),
        owner
    );

    // Read-only: EROFS for the guest, the host still writes.
    let out = env.run(&["exec", "lm", "--", "sh", "-c", "echo no > /ref/new.txt"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Read-only file system"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!ro.join("new.txt").exists());
    std::fs::write(ro.join("r2.txt"), "host adds\n").expect("r2");
    wait_until(
        "a host file in the read-only share",
        Duration::from_secs(10),
        || sh(&env, "lm", "cat /ref/r2.txt 2>/dev/null; true") == "host adds\n",
    );

    // Escapes. Symlinks resolve in the guest, never on the host.
    let out = sh(
        &env,
        "lm",
        "cd /work; for p in abs-link rel-link ../outside-marker ../../../../outside-marker sub/../../outside-marker; do cat $p 2>&1; done; cat etc-link/hostname; echo guest: $(cat /etc/hostname); true",
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
    let l: Vec<&str> = out.lines().collect();
    assert_eq!(
        format!("guest: {}", l[l.len() - 2]),
        l[l.len() - 1],
        "etc-link is the guest's /etc: {out}"
    );
    // A symlink to the outside swapped in for a directory while a reader
    // keeps opening a file through it.
    let out = sh(
        &env,
        "lm",
        &format!(
            "cd /work; mkdir -p d; echo inside > d/outside-marker
            ( i=0; while [ $i -lt 300 ]; do mv d d.real; ln -s .. d; rm d; ln -s {dir} d; rm d; mv d.real d; i=$((i+1)); done ) &
            i=0; while [ $i -lt 300 ]; do cat d/outside-marker 2>/dev/null; i=$((i+1)); done; wait; true",
            dir = s(dir.path())
        ),
    );
    assert!(!out.contains("HOST-SECRET"), "{out}");
    assert!(out.contains("inside"), "the reader ran: {out}");
    // Hard links cannot reach out of the share (another filesystem in
    // the guest), and inside it they are hard links on the host too.
    let out = sh(
        &env,
        "lm",
        "cd /work; ln /etc/passwd pw 2>&1; echo rc=$?; ln host.txt hl && echo linked",
    );
    assert!(out.contains("rc=1") && out.contains("linked"), "{out}");
    assert!(!rw.join("pw").exists());
    assert_eq!(
        std::fs::metadata(rw.join("hl")).expect("hl").ino(),
        std::fs::metadata(rw.join("host.txt")).expect("host").ino()
    );
    // Device nodes are refused; FIFOs are plain files to the host.
    let out = sh(
        &env,
        "lm",
        "cd /work; mknod null c 1 3 2>&1; echo rc=$?; mknod disk b 8 0 2>&1; echo rc=$?",
    );
    assert_eq!(out.matches("rc=1").count(), 2, "{out}");
    assert!(!rw.join("null").exists() && !rw.join("disk").exists());
    // Setuid: allowed on the guest's own file, which is the owner's on
    // the host, so it can only ever run as the owner.
    let out = sh(
        &env,
        "lm",
        "cd /work; cp /bin/true su; chmod 4755 su; echo rc=$?; chown 0:0 guest.txt 2>&1; echo chown=$?; chown 1000 guest.txt 2>&1; echo chown2=$?",
    );
    assert!(out.contains("rc=0"), "{out}");
    let md = std::fs::metadata(rw.join("su")).expect("su");
    assert_eq!(
        md.uid(),
        owner,
        "a setuid file of the guest's is the owner's"
    );
    if root {
        // A chown may succeed in the guest, but every guest uid is the
        // owner on the host.
        assert_eq!(
            std::fs::metadata(rw.join("guest.txt")).expect("md").uid(),
            OWNER
        );
        let out = sh(
            &env,
            "lm",
            "cd /work; cat roots.txt; chmod 4755 roots.txt 2>&1; echo chmod=$?; (echo more >> roots.txt) 2>/dev/null && echo write=ok || echo write=refused",
        );
        assert!(
            out.contains("root's") && out.contains("chmod=1") && out.contains("write=refused"),
            "{out}"
        );
        let md = std::fs::metadata(rw.join("roots.txt")).expect("roots");
        assert_eq!((md.mode() & 0o7777, md.uid()), (0o644, 0));
        assert_eq!(
            std::fs::read_to_string(rw.join("roots.txt")).expect("roots"),
            "root's\n"
        );
    }
    // Nothing appeared outside the share.
    let mut outside: Vec<String> = std::fs::read_dir(dir.path())
        .expect("dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    outside.sort();
    assert_eq!(outside, ["outside-marker", "ro", "rw"]);
    env.run_ok(&["stop", "lm"]);
    assert!(
        !std::fs::read_dir(dir.path())
            .expect("dir")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".sock")),
        "no socket left in the share's parent"
    );
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![p.to_path_buf()];
    if p.is_dir() && !p.is_symlink() {
        for e in std::fs::read_dir(p).expect("read_dir").flatten() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p)
        .map(|s| s.lines().count())
        .unwrap_or(0)
}

/// A writer in the guest holds a file open in the share across a
/// keep-alive snapshot, a restore, a fork and a destructive snapshot: it
/// keeps appending, and its lines keep reaching the host. Restores and
/// forks can point the share elsewhere; an unknown guest path and a
/// missing host directory are refused with their codes.
#[test]
fn a_live_mount_keeps_an_open_file_across_snapshot_restore_and_fork_and_remaps() {
    let env = Env::new();
    let dir = open_tempdir();
    let share = dir.path().join("share");
    let other = dir.path().join("other");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::create_dir_all(&other).expect("other");
    std::fs::write(other.join("which"), "other\n").expect("which");
    let log = share.join("held.log");
    env.run_ok(&[
        "boot",
        "--name",
        "src",
        "--detached",
        "--mount-live",
        &format!("{}:/work", s(&share)),
    ]);
    // One shell holds held.log open (fd 3) and appends a line every 100 ms.
    sh(
        &env,
        "src",
        "nohup sh -c 'exec 3>>/work/held.log; i=0; while true; do echo $i >&3; i=$((i+1)); sleep 0.1 3>&-; done' >/dev/null 2>&1 &",
    );
    wait_until("the writer", Duration::from_secs(20), || lines(&log) >= 3);

    let b1 = dir.path().join("b1");
    env.run_ok(&["snapshot", "src", s(&b1), "--keep-alive"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(b1.join("meta.json")).expect("meta")).expect("json");
    assert_eq!(meta["live_mounts"][0]["guest"], "/work");
    env.run_ok(&["stop", "src"]);
    let stopped = lines(&log);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(lines(&log), stopped, "the source's writer is gone");

    // The restore's writer carries on through the same open file.
    env.run_ok(&["restore", s(&b1), "--name", "r1", "--detached"]);
    wait_until("the restored writer", Duration::from_secs(20), || {
        lines(&log) >= stopped + 5
    });
    assert_eq!(
        sh(&env, "r1", "ls -l /proc/*/fd 2>/dev/null | grep -c /work/held.log; grep -c ' /work virtiofs' /proc/mounts"),
        "1\n1\n",
        "one process holds the file, on the share as mounted at boot"
    );
    std::fs::write(share.join("from-host"), "seen\n").expect("from-host");
    wait_until(
        "the host's file in the restore",
        Duration::from_secs(10),
        || sh(&env, "r1", "cat /work/from-host 2>/dev/null; true") == "seen\n",
    );

    // A fork can be pointed elsewhere (its writer's file is not there: an
    // error in that guest only) ...
    let out = env.run_ok(&[
        "fork",
        "r1",
        "--new-name",
        "f0",
        "--mount-live",
        &format!("{}:/work", s(&other)),
        "--",
        "cat",
        "/work/which",
    ]);
    assert_eq!(out, "other\n");
    // ... and by default shares the same directory; its writer goes on too.
    env.run_ok(&["fork", "r1", "--new-name", "f1", "--detach"]);
    env.run_ok(&["stop", "r1"]);
    let before = lines(&log);
    wait_until("the fork's writer", Duration::from_secs(20), || {
        lines(&log) >= before + 5
    });
    // One writer's history, continued: its last lines count up by one.
    let text = std::fs::read_to_string(&log).expect("log");
    let tail: Vec<u64> = text
        .lines()
        .rev()
        .take(3)
        .map(|l| l.parse().expect("a number"))
        .collect();
    assert!(tail[0] == tail[1] + 1 && tail[1] == tail[2] + 1, "{tail:?}");

    // Destructive snapshot of the fork, restored onto another directory.
    let b2 = dir.path().join("b2");
    env.run_ok(&["snapshot", "f1", s(&b2)]);
    let out = env.run(&[
        "restore",
        s(&b2),
        "--mount-live",
        &format!("{}:/nowhere", s(&other)),
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN") && err.contains("/work"),
        "{err}"
    );
    let out = env.run_ok(&[
        "restore",
        s(&b2),
        "--mount-live",
        &format!("{}:/work", s(&other)),
        "--",
        "cat",
        "/work/which",
    ]);
    assert_eq!(out, "other\n");
    // The recorded directory gone: a clear error naming it.
    std::fs::rename(&share, dir.path().join("moved")).expect("move");
    let out = env.run(&["restore", s(&b2), "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("BOOT_MOUNT_HOST_NOT_FOUND") && err.contains(s(&share)),
        "{err}"
    );
    assert!(env
        .json(&["ls", "--json"])
        .as_array()
        .expect("ls")
        .is_empty());
}
