//! Who may see a VM's files and control it, and what happens when the RAM
//! directory cannot hold every VM's memory. Both tests need root (to act as
//! another user, and to mount a small tmpfs); they say so and pass when not.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use super::{wait_until, Env};

/// The user the tests act as when they play "another local user".
const NOBODY: u32 = 65534;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("stat {}: {e}", p.display()))
        .mode()
        & 0o7777
}

/// Every entry under `dir` (and `dir` itself) gives nothing to group or
/// others: directories 0700, files 0600, sockets owner-only.
fn assert_private_tree(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    for e in std::fs::read_dir(dir).expect("ls").flatten() {
        let p = e.path();
        let ft = e.file_type().expect("type");
        if ft.is_dir() {
            assert_private_tree(&p);
        } else if ft.is_file() {
            assert_eq!(mode(&p), 0o600, "{}", p.display());
        } else {
            assert_eq!(
                mode(&p) & 0o077,
                0,
                "{} is reachable by others",
                p.display()
            );
        }
    }
}

/// Run `machinen` as [`NOBODY`] with these registry and home directories.
fn machinen_as_nobody(registry: &Path, home: &Path, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_machinen"))
        .args(args)
        .env("MACHINEN_REGISTRY_DIR", registry)
        .env("MACHINEN_HOME", home)
        .env_remove("MACHINEN_LOG")
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::null())
        .output()
        .expect("run machinen as another user");
    eprintln!(
        "$ (uid {NOBODY}) machinen {}\n  -> {:?}\n  stderr: {}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    out
}

/// Whether [`NOBODY`] can read the first byte of `path`.
fn nobody_can_read(path: &Path) -> bool {
    Command::new("head")
        .args(["-c", "1"])
        .arg(path)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run head as another user")
        .success()
}

fn ram_file(vm_dir: &Path) -> Option<PathBuf> {
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(vm_dir.join("spec.json")).expect("spec"))
            .expect("spec json");
    spec["ram_file"].as_str().map(PathBuf::from)
}

#[test]
fn vm_files_are_private_and_other_users_can_neither_read_nor_control_them() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to act as another user (uid {NOBODY})");
        return;
    }
    let env = Env::new();
    let base = env.registry.path();
    // Others may traverse the test's own directory: from here on, only
    // machinen's modes stand between them and the VM.
    std::fs::set_permissions(base, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A registry an older version created world-readable.
    let root = base.join("vms");
    std::fs::create_dir(&root).expect("mkdir");
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    // A RAM directory of the test's own: RAM files in /dev/shm are admitted
    // only while it has room beside every other VM's, which a busy host
    // may not have.
    let shm = Tmpfs::mount(base.join("shm"), "1g");
    std::fs::set_permissions(&shm.0, std::fs::Permissions::from_mode(0o1777)).expect("chmod");
    let run = |args: &[&str]| -> String {
        let out = env
            .cmd(args)
            .env("MACHINEN_REGISTRY_DIR", &root)
            .env("MACHINEN_RAM_DIR", &shm.0)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert!(
            out.status.success(),
            "machinen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf8")
    };
    let json = |args: &[&str]| -> serde_json::Value {
        serde_json::from_str(run(args).trim()).expect("json")
    };
    // Env's own cleanup looks in its default registry, not in `root`.
    let stop_all = OnDrop(|| {
        for n in ["priv", "priv2"] {
            let _ = env
                .cmd(&["stop", "--force", n])
                .env("MACHINEN_REGISTRY_DIR", &root)
                .output();
        }
    });

    let info = json(&[
        "boot",
        "--name",
        "priv",
        "--memory",
        "256",
        "--detached",
        "--json",
    ]);
    let dir = root.join(info["id"].as_str().expect("id"));
    assert_private_tree(&root);
    for f in [
        "meta.json",
        "spec.json",
        "console.log",
        "vmm.log",
        "qemu.log",
        "disk.qcow2",
        "control.sock",
        "qmp.sock",
        "agent.sock",
    ] {
        assert!(dir.join(f).exists(), "{f} is where the test looks");
    }
    let ram = ram_file(&dir).expect("a booted VM's RAM is a file in the RAM directory");
    assert!(ram.starts_with(&shm.0), "{}", ram.display());
    assert_eq!(mode(&ram), 0o600, "{}", ram.display());
    run(&[
        "exec",
        "priv",
        "--",
        "sh",
        "-c",
        "echo private-data > /root/p && sync",
    ]);

    // A bundle holds RAM and disk: private too.
    let snap = base.join("priv.snap");
    json(&[
        "snapshot",
        "priv",
        snap.to_str().expect("path"),
        "--keep-alive",
        "--json",
    ]);
    assert_private_tree(&snap);
    // A restored VM's own RAM copy.
    let restored = json(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "priv2",
        "--own-ram",
        "--detached",
        "--json",
    ]);
    let dir2 = root.join(restored["id"].as_str().expect("id"));
    assert_private_tree(&dir2);
    let ram2 = ram_file(&dir2).expect("--own-ram gives the VM a RAM file");
    assert_eq!(mode(&ram2), 0o600);

    // Another user reads none of it. Checked first as root, so a failure
    // below means permissions and not a wrong path.
    for p in [
        &ram,
        &ram2,
        &dir.join("disk.qcow2"),
        &dir.join("console.log"),
        &snap.join("ram.img"),
        &snap.join("rootdisk.qcow2"),
    ] {
        assert!(std::fs::File::open(p).is_ok(), "{} exists", p.display());
        assert!(!nobody_can_read(p), "uid {NOBODY} read {}", p.display());
    }
    // ... and sees no VM: ls fails cleanly with a code, naming no VM.
    let home = base.join("nobody-home");
    std::fs::create_dir(&home).expect("mkdir");
    std::os::unix::fs::chown(&home, Some(NOBODY), Some(NOBODY)).expect("chown");
    let ls = machinen_as_nobody(&root, &home, &["ls", "--json"]);
    assert_eq!(ls.status.code(), Some(125));
    let err: serde_json::Value = serde_json::from_slice(&ls.stdout).expect("error json");
    assert_eq!(err["error"]["code"], "REGISTRY_IO");
    assert!(
        !String::from_utf8_lossy(&ls.stdout).contains("\"priv\""),
        "no VM name leaks"
    );

    // The control socket refuses other users even when the files would let
    // them in: a link to it in a public place, opened to everyone, and a
    // registry of their own that points at it.
    let public = base.join("public");
    std::fs::create_dir(&public).expect("mkdir");
    let sock = public.join("c.sock");
    std::fs::hard_link(dir.join("control.sock"), &sock).expect("link the socket");
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).expect("chmod");
    let their_reg = base.join("their-reg");
    let their_dir = their_reg.join(info["id"].as_str().expect("id"));
    std::fs::create_dir_all(&their_dir).expect("mkdir");
    let mut meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("meta.json")).expect("meta")).expect("json");
    meta["control_socket"] = serde_json::json!(sock);
    std::fs::write(
        their_dir.join("meta.json"),
        serde_json::to_vec(&meta).expect("json"),
    )
    .expect("write");
    for p in [&their_reg, &their_dir, &their_dir.join("meta.json")] {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).expect("chown");
    }
    for args in [
        &["exec", "priv", "--", "cat", "/root/p"][..],
        &["stop", "priv"],
    ] {
        let out = machinen_as_nobody(&their_reg, &home, args);
        assert_eq!(out.status.code(), Some(125), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("CONTROL_PERMISSION_DENIED"),
            "{args:?}"
        );
        assert!(!String::from_utf8_lossy(&out.stdout).contains("private-data"));
    }
    // Its owner still can.
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o700)).expect("chmod");
    assert_eq!(
        run(&["exec", "priv", "--", "cat", "/root/p"]),
        "private-data\n"
    );
    drop(stop_all);
    wait_until("both VMs to stop", Duration::from_secs(30), || {
        !dir.exists() && !dir2.exists()
    });
}

/// Runs its closure when dropped, whether the test passed or panicked.
struct OnDrop<F: FnMut()>(F);

impl<F: FnMut()> Drop for OnDrop<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// A tmpfs mounted for one test, unmounted (lazily) however it ends.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&at).expect("mkdir");
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&at)
            .status()
            .expect("mount");
        assert!(ok.success(), "mount a tmpfs at {}", at.display());
        Tmpfs(at)
    }

    fn ram_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(&self.0)
            .expect("ls")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("machinen-") && n.ends_with(".ram"))
            .collect();
        v.sort();
        v
    }

    fn available(&self) -> u64 {
        let out = Command::new("df")
            .args(["-B1", "--output=avail"])
            .arg(&self.0)
            .output()
            .expect("df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .last()
            .and_then(|l| l.trim().parse().ok())
            .expect("df avail")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fill the guest's memory: `mib` MiB more in a guest tmpfs.
const TOUCH: &str = "mountpoint -q /mnt || mount -t tmpfs -o size=420m none /mnt; dd if=/dev/zero of=/mnt/f$1 bs=1M count=$2 2>&1 | tail -1";

#[test]
fn ram_admission_never_overcommits_the_ram_dir_and_a_crash_keeps_its_cause() {
    if !is_root() {
        eprintln!("SKIPPED: needs root to mount a small tmpfs as MACHINEN_RAM_DIR");
        return;
    }
    let env = Env::new();
    let shm = Tmpfs::mount(env.registry.path().join("shm"), "700m");
    let run = |args: &[&str]| -> Output {
        let out = env
            .cmd(args)
            .env("MACHINEN_RAM_DIR", &shm.0)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        eprintln!(
            "$ machinen {}\n  -> {:?}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    };
    let json = |args: &[&str]| -> serde_json::Value {
        let out = run(args);
        assert!(out.status.success(), "machinen {args:?} failed");
        serde_json::from_slice(&out.stdout).expect("json")
    };

    // Two 512 MiB VMs on a 700 MiB tmpfs: the first gets a RAM file, the
    // second would overcommit it and gets anonymous memory instead.
    let one = json(&[
        "boot",
        "--name",
        "one",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    let two = json(&[
        "boot",
        "--name",
        "two",
        "--memory",
        "512",
        "--detached",
        "--json",
    ]);
    let (id1, id2) = (
        one["id"].as_str().expect("id"),
        two["id"].as_str().expect("id"),
    );
    assert_eq!(shm.ram_files(), vec![format!("machinen-{id1}.ram")]);
    assert_eq!(
        ram_file(&env.registry.path().join(id2)),
        None,
        "the second VM's RAM is anonymous"
    );
    // Where a RAM file is required, the same shortage is refused with its
    // code, before anything starts; the source runs on.
    let out = run(&["fork", "one", "--own-ram", "--detach", "--json"]);
    assert_eq!(out.status.code(), Some(125));
    let err: serde_json::Value = serde_json::from_slice(&out.stdout).expect("error json");
    assert_eq!(
        (
            err["error"]["code"].as_str(),
            err["error"]["retryable"].as_bool()
        ),
        (Some("BOOT_RAM_DIR_FULL"), Some(true)),
        "{err}"
    );

    // Both guests use most of their memory: nobody dies.
    for (vm, n) in [("one", "1"), ("two", "1")] {
        let out = run(&["exec", vm, "--", "sh", "-c", TOUCH, "touch", n, "250"]);
        assert!(
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains("copied"),
            "{vm} touched its memory"
        );
    }
    let ls = json(&["ls", "--json"]);
    let states: Vec<&str> = ls
        .as_array()
        .expect("array")
        .iter()
        .map(|v| v["state"].as_str().expect("state"))
        .collect();
    assert_eq!(states, vec!["running", "running"], "{ls}");

    // Another program takes the rest of the tmpfs: the first guest's next
    // new pages cannot be backed and QEMU dies of SIGBUS. The VM's
    // directory, logs and cause stay.
    let filler = shm.0.join("other-program.bin");
    let ok = Command::new("fallocate")
        .args(["-l", &shm.available().to_string()])
        .arg(&filler)
        .status()
        .expect("fallocate");
    assert!(ok.success());
    let out = run(&["exec", "one", "--", "sh", "-c", TOUCH, "touch", "2", "150"]);
    assert_eq!(out.status.code(), Some(125), "the exec ends with its VM");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("the VM crashed: QEMU killed by signal 7 (SIGBUS)"),
        "the exec says why"
    );
    let crashed = || {
        let v = json(&["ls", "--json"]);
        v.as_array()
            .expect("array")
            .iter()
            .find(|v| v["name"] == "one" && v["state"] == "crashed")
            .cloned()
    };
    wait_until(
        "one to be recorded as crashed",
        Duration::from_secs(20),
        || crashed().is_some(),
    );
    let entry = crashed().expect("crashed");
    let cause = entry["cause"].as_str().expect("cause");
    assert!(
        cause.contains("SIGBUS") && cause.contains(&shm.0.display().to_string()),
        "{cause}"
    );
    assert_eq!(
        shm.ram_files(),
        Vec::<String>::new(),
        "the crashed VM's RAM file is freed"
    );
    let vm_dir = env.registry.path().join(id1);
    assert!(
        vm_dir.join("console.log").exists() && vm_dir.join("vmm.log").exists(),
        "logs kept"
    );
    let logs = run(&["logs", "one"]);
    assert!(logs.status.success() && String::from_utf8_lossy(&logs.stderr).contains("SIGBUS"));
    assert!(!logs.stdout.is_empty(), "the console log is printed");
    let vmm = run(&["logs", id1, "--vmm"]);
    assert!(
        String::from_utf8_lossy(&vmm.stdout).contains("the VM crashed"),
        "the supervisor's log says why"
    );
    // The other VM, on anonymous memory, runs on.
    assert!(run(&["exec", "two", "--", "true"]).status.success());

    let dry = json(&["gc", "--dry-run", "--json"]);
    // This test's VMs only: the shared cache may hold other tests' unused
    // chain files, which gc lists too.
    let items: Vec<&serde_json::Value> = dry["removed"]
        .as_array()
        .expect("removed")
        .iter()
        .filter(|i| !i["id"].as_str().unwrap_or("").is_empty())
        .collect();
    assert_eq!(items.len(), 1, "{dry}");
    assert_eq!(
        (items[0]["name"].as_str(), items[0]["reason"].as_str()),
        (Some("one"), Some("crashed"))
    );
    assert!(items[0]["cause"]
        .as_str()
        .is_some_and(|c| c.contains("SIGBUS")));
    assert!(vm_dir.exists(), "dry run removes nothing");
    json(&["gc", "--json"]);
    assert!(!vm_dir.exists());
    assert_eq!(json(&["ls", "--json"]).as_array().map(Vec::len), Some(1));
    assert!(run(&["stop", "--force", "two"]).status.success());
}
