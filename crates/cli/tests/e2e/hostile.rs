//! Bundles made or altered by someone else: refused with a clear code,
//! never hanging, and never handing the guest a host file.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{wait_child, wait_until, Env};

fn path(p: &Path) -> &str {
    p.to_str().expect("utf8 path")
}

/// Put `file`'s new size and BLAKE3 digest into the manifest, as a bundle's
/// author can: the digests only protect against accidents.
fn rehash(bundle: &Path, file: &str) {
    let bytes = std::fs::read(bundle.join(file)).expect("read");
    let mpath = bundle.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&mpath).expect("manifest")).expect("json");
    for e in m["files"].as_array_mut().expect("files") {
        if e["name"] == file {
            e["size"] = bytes.len().into();
            e["hash"] = blake3::hash(&bytes).to_hex().to_string().into();
            e["digest"] = "blake3".into();
        }
    }
    std::fs::write(&mpath, serde_json::to_vec_pretty(&m).expect("json")).expect("write manifest");
}

fn copy_bundle(from: &Path, to: &Path) {
    assert!(Command::new("cp")
        .args(["-a", "--sparse=always", path(from), path(to)])
        .status()
        .expect("cp")
        .success());
}

fn qemu_img(args: &[&str]) -> String {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img");
    assert!(
        out.status.success(),
        "qemu-img {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `restore BUNDLE --detached` must fail within a bound with
/// RESTORE_BUNDLE_INVALID and a message containing `needle`, leaving no
/// process that has the bundle open.
fn refused(env: &Env, bundle: &Path, needle: &str) {
    let mut c = env
        .cmd(&["restore", path(bundle), "--detached"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_child(&mut c, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut c.stderr.take().expect("stderr"), &mut err).expect("stderr");
    assert_eq!(status.code(), Some(125), "{}: {err}", bundle.display());
    assert!(
        err.contains("RESTORE_BUNDLE_INVALID") && err.contains(needle),
        "{}: expected {needle:?} in {err}",
        bundle.display()
    );
    wait_until(
        "no process to use the refused bundle",
        Duration::from_secs(10),
        || {
            !Command::new("pgrep")
                .args(["-f", path(bundle)])
                .stdout(Stdio::null())
                .status()
                .expect("pgrep")
                .success()
        },
    );
}

#[test]
fn hostile_bundles_are_refused_without_hanging_or_reaching_host_files() {
    let env = Env::new();
    // Bundles live outside the registry, as users keep them.
    let tmp = tempfile::Builder::new()
        .prefix("mn-bundles-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let dir = tmp.path();
    env.json(&[
        "boot",
        "--name",
        "src",
        "--memory",
        "256",
        "--detached",
        "--json",
    ]);
    let good = dir.join("good.snap");
    env.run_ok(&["snapshot", "src", path(&good)]);

    // A layer whose data lives in a host file ("data_file_raw"): the guest
    // would read and write that file as its disk.
    let host_file = dir.join("host-secret.img");
    let evil = dir.join("data-file.snap");
    copy_bundle(&good, &evil);
    let info: serde_json::Value = serde_json::from_str(&qemu_img(&[
        "info",
        "--output=json",
        path(&good.join("rootdisk.qcow2")),
    ]))
    .expect("json");
    let size = info["virtual-size"]
        .as_u64()
        .expect("virtual size")
        .to_string();
    std::fs::remove_file(evil.join("rootdisk.qcow2")).expect("rm layer");
    let opt = format!("data_file={},data_file_raw=on", path(&host_file));
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        &opt,
        path(&evil.join("rootdisk.qcow2")),
        &size,
    ]);
    let secret = b"HOST-SECRET ".repeat(1 << 16);
    std::fs::write(&host_file, &secret).expect("host file");
    rehash(&evil, "rootdisk.qcow2");
    refused(&env, &evil, "external data file");
    let dry = env.run(&["restore", path(&evil), "--dry-run"]);
    assert_eq!(dry.status.code(), Some(125), "--dry-run refuses it too");
    assert_eq!(
        std::fs::read(&host_file).expect("host file"),
        secret,
        "the host file was not touched"
    );

    // Special files where regular ones belong: refused at once, no hang.
    type Make<'a> = &'a dyn Fn(&Path);
    let special: [(&str, Make); 5] = [
        ("meta.json", &|p| {
            assert!(Command::new("mkfifo")
                .arg(p)
                .status()
                .expect("mkfifo")
                .success())
        }),
        ("manifest.json", &|p| {
            assert!(Command::new("mkfifo")
                .arg(p)
                .status()
                .expect("mkfifo")
                .success())
        }),
        ("state.vmstate", &|p| {
            assert!(Command::new("mkfifo")
                .arg(p)
                .status()
                .expect("mkfifo")
                .success())
        }),
        ("state.vmstate", &|p| {
            std::os::unix::fs::symlink("/dev/zero", p).expect("symlink")
        }),
        ("ram.img", &|p| {
            std::os::unix::fs::symlink(&host_file, p).expect("symlink")
        }),
    ];
    for (i, (file, make)) in special.iter().enumerate() {
        let b = dir.join(format!("special-{i}.snap"));
        copy_bundle(&good, &b);
        std::fs::remove_file(b.join(file)).expect("rm");
        make(&b.join(file));
        // The manifest itself cannot be named when it is the broken one.
        refused(
            &env,
            &b,
            if *file == "manifest.json" {
                "manifest.json"
            } else {
                file
            },
        );
    }
    let b = dir.join("no-disk.snap");
    copy_bundle(&good, &b);
    std::fs::remove_file(b.join("rootdisk.qcow2")).expect("rm");
    refused(&env, &b, "rootdisk.qcow2");

    // A backing-file name in the layer's header is never opened: the VM
    // runs on its image, and its copy of the layer names no host path.
    let b = dir.join("backing.snap");
    copy_bundle(&good, &b);
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        path(&host_file),
        "-F",
        "raw",
        path(&b.join("rootdisk.qcow2")),
    ]);
    rehash(&b, "rootdisk.qcow2");
    env.run_ok(&["restore", path(&b), "--name", "backed", "--detached"]);
    assert!(
        !env.run_ok(&["exec", "backed", "--", "cat", "/etc/debian_version"])
            .trim()
            .is_empty(),
        "the guest reads its own image"
    );
    let layer = env
        .json(&["ls", "--json"])
        .as_array()
        .expect("ls")
        .iter()
        .find(|v| v["name"] == "backed")
        .map(|v| v["id"].as_str().expect("id").to_string())
        .expect("backed listed");
    let info = qemu_img(&[
        "info",
        "-U",
        "--output=json",
        path(&env.registry.path().join(layer).join("disk.qcow2")),
    ]);
    assert!(
        !info.contains("host-secret"),
        "the VM's layer names no host file: {info}"
    );
    env.run_ok(&["stop", "backed"]);

    // The untouched bundle still restores.
    env.run_ok(&["restore", path(&good), "--name", "again", "--detached"]);
    env.run_ok(&["exec", "again", "--", "true"]);
}
