//! `machinen provision` and booting what it bakes, on real VMs.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{sha256_hex, Env};

/// Drop the cached ext4 image and config of a baked tarball, so test runs do
/// not pile up images in the shared cache.
pub(super) struct Forget(pub(super) Vec<PathBuf>);

impl Drop for Forget {
    fn drop(&mut self) {
        let cache = std::env::var_os("MACHINEN_CACHE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                std::env::var_os("MACHINEN_HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| {
                        PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".machinen")
                    })
                    .join(env!("CARGO_PKG_VERSION"))
                    .join("cache")
            });
        for img in &self.0 {
            let Ok(bytes) = std::fs::read(img) else {
                continue;
            };
            let sha = sha256_hex(&bytes);
            for suffix in ["ext4", "config.json", "lock"] {
                let _ = std::fs::remove_file(cache.join("images").join(format!("{sha}.{suffix}")));
            }
        }
    }
}

fn write_exec(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).expect("write");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

/// `tar -tv` lines of a gzip tarball.
fn listing(tarball: &Path) -> Vec<String> {
    let out = Command::new("tar")
        .arg("-tvzf")
        .arg(tarball)
        .arg("--numeric-owner")
        .output()
        .expect("tar");
    assert!(
        out.status.success(),
        "tar -t failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn provision_bakes_files_steps_and_a_default_command_that_boot_runs() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let d = dir.path();
    std::fs::write(d.join("greeting.txt"), "hello from the host\n").expect("write");
    // A tiny program: reports its arguments, where it runs and its env.
    write_exec(
        &d.join("hello"),
        "#!/bin/sh\necho \"args=$*\"\necho \"cwd=$(pwd)\"\necho \"mode=$MODE greeting=$GREETING\"\ncat greeting.txt\n",
        0o755,
    );
    std::fs::create_dir_all(d.join("site/sub")).expect("mkdir");
    std::fs::write(d.join("site/sub/index.html"), "<h1>hi</h1>\n").expect("write");
    write_exec(&d.join("site/secret"), "s3cret\n", 0o600);
    std::os::unix::fs::symlink("sub/index.html", d.join("site/index")).expect("symlink");
    std::fs::create_dir(d.join("out")).expect("mkdir");
    let out = d.join("out/app.tar.gz");
    let _forget = Forget(vec![out.clone()]);

    let t0 = std::time::Instant::now();
    let result = env.json(&[
        "provision",
        "--run",
        "echo one >> /order",
        "--copy",
        &format!("{}:/app/greeting.txt", d.join("greeting.txt").display()),
        "--copy",
        &format!("{}:/usr/local/bin/hello", d.join("hello").display()),
        // Runs after the copies above: it sees them.
        "--run",
        "test -x /usr/local/bin/hello && test -f greeting.txt && echo two >> /order",
        "--copy",
        &format!("{}:/srv/site", d.join("site").display()),
        "--run",
        "mkdir -p /tmp/junk && echo x > /tmp/junk/file && echo three >> /order",
        "--env",
        "MODE=prod",
        "--env",
        "GREETING=hi there",
        "--cwd",
        "/app",
        "--cmd",
        "hello --loud",
        "-o",
        out.to_str().expect("utf8"),
        "--json",
    ]);
    eprintln!("baked in {:.1} s: {result}", t0.elapsed().as_secs_f64());

    // The result describes the file written.
    let bytes = std::fs::read(&out).expect("image written");
    assert_eq!(result["sha256"].as_str(), Some(sha256_hex(&bytes).as_str()));
    assert_eq!(result["size"].as_u64(), Some(bytes.len() as u64));
    assert_eq!(
        result["config"]["cmd"],
        serde_json::json!(["sh", "-c", "hello --loud"])
    );
    assert_eq!(result["config"]["env"]["MODE"], "prod");
    assert_eq!(result["config"]["cwd"], "/app");
    let leftovers: Vec<_> = std::fs::read_dir(d.join("out"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(
        leftovers.len(),
        1,
        "only the image, no temp files: {leftovers:?}"
    );

    // A complete rootfs: config first, ownership and modes, device nodes,
    // symlinks, empty mount points, no runtime junk.
    let list = listing(&out);
    assert!(
        list[0].ends_with("etc/machinen/image.json"),
        "config is the first member: {}",
        list[0]
    );
    let find = |suffix: &str| list.iter().find(|l| l.ends_with(suffix)).cloned();
    let hello = find(" ./usr/local/bin/hello").expect("hello in the image");
    assert!(hello.starts_with("-rwxr-xr-x 0/0 "), "{hello}");
    let secret = find(" ./srv/site/secret").expect("secret in the image");
    assert!(secret.starts_with("-rw------- 0/0 "), "{secret}");
    assert!(
        find(" ./srv/site/index -> sub/index.html").is_some(),
        "symlink kept"
    );
    let null = find(" ./dev/null").expect("/dev/null in the image");
    assert!(null.starts_with('c'), "a character device: {null}");
    assert!(find(" ./proc/").is_some() && find(" ./sys/").is_some());
    for junk in [
        "./proc/self",
        "./sys/kernel",
        "./tmp/junk",
        "./lost+found",
        "./run/machinen-export",
        "./dev/pts/ptmx",
        "/policy-rc.d",
    ] {
        assert!(
            !list.iter().any(|l| l.contains(junk)),
            "{junk} must not be in the image"
        );
    }
    assert_eq!(
        list.iter()
            .filter(|l| l.ends_with("etc/machinen/image.json"))
            .count(),
        1
    );

    // Boot without a command: the baked one runs, in the baked cwd, with the baked env.
    let run = env.run_ok(&["boot", out.to_str().expect("utf8")]);
    assert_eq!(
        run,
        "args=--loud\ncwd=/app\nmode=prod greeting=hi there\nhello from the host\n"
    );

    // Override the command, one env key and the cwd.
    let run = env.run_ok(&[
        "boot", "--env", "MODE=dev", "--cwd", "/srv/site", out.to_str().expect("utf8"), "--", "sh", "-c",
        "echo \"$MODE|$GREETING|$(pwd)\"; cat /order; cat index; stat -c '%a %U' secret sub/index.html",
    ]);
    assert_eq!(
        run,
        "dev|hi there|/srv/site\none\ntwo\nthree\n<h1>hi</h1>\n600 root\n644 root\n"
    );
    assert!(
        env.vm_dirs().is_empty(),
        "install and foreground VMs are gone"
    );
}

#[test]
fn a_failing_step_fails_the_bake_with_its_exit_code_and_writes_nothing() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("x.tar.gz");
    std::fs::write(&out, "previous image").expect("write");
    let o = env.run(&[
        "provision",
        "--run",
        "echo before",
        "--run",
        "echo oops >&2; exit 7",
        "--run",
        "echo never",
        "--cmd",
        "true",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(7), "the step's exit code");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(
        stdout.contains("before") && !stdout.contains("never"),
        "{stdout}"
    );
    assert!(
        stderr.contains("oops")
            && stderr.contains("PROVISION_STEP_FAILED")
            && stderr.contains("exit code 7"),
        "{stderr}"
    );
    assert_eq!(
        std::fs::read_to_string(&out).expect("read"),
        "previous image",
        "OUT untouched"
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).expect("ls").count(),
        1,
        "no temp file left"
    );
    assert!(env.vm_dirs().is_empty(), "install VM gone");

    // Bad arguments are refused before anything boots.
    let o = env.run(&[
        "provision",
        "--copy",
        "somefile:relative/path",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("PROVISION_ARGS_INVALID"));
    let o = env.run(&[
        "provision",
        "--cwd",
        "rel",
        "-o",
        out.to_str().expect("utf8"),
    ]);
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn provisioning_from_a_provisioned_image_keeps_both_layers() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let a = dir.path().join("a.tar.gz");
    let b = dir.path().join("b.tar.gz");
    let _forget = Forget(vec![a.clone(), b.clone()]);
    env.run_ok(&[
        "provision",
        "--run",
        "echo layer-a > /layer-a",
        "--env",
        "A=1",
        "--env",
        "SHARED=from-a",
        "-o",
        a.to_str().expect("utf8"),
    ]);

    // No baked command and none given: a clear error.
    let o = env.run(&["boot", a.to_str().expect("utf8")]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("BOOT_ARGS_INVALID") && err.contains("no baked command"),
        "{err}"
    );

    // The second layer sees the first, inherits its env and adds its own.
    let o = env.run_ok(&[
        "provision",
        "--base",
        a.to_str().expect("utf8"),
        "--run",
        "cat /layer-a; echo \"A=$A\"; echo layer-b > /layer-b",
        "--env",
        "SHARED=from-b",
        "-o",
        b.to_str().expect("utf8"),
        "--",
        "sh",
        "-c",
        "cat /layer-a /layer-b; echo \"$A $SHARED\"",
    ]);
    assert!(
        o.starts_with("layer-a\nA=1\n"),
        "step output, then the summary: {o}"
    );
    assert!(o.contains("baked "), "{o}");
    let run = env.run_ok(&["boot", b.to_str().expect("utf8")]);
    assert_eq!(run, "layer-a\nlayer-b\n1 from-b\n");
    assert!(env.vm_dirs().is_empty());
}
