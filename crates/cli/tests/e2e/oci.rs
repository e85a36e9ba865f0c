//! OCI and Docker images (`oci:DIR:TAG`, `docker-archive:FILE`) booted on
//! real VMs. The images are made by independent tools: Debian's `umoci`
//! (layouts, layers, configs) and `skopeo` (the Docker archive), with GNU
//! tar writing the whiteout layer.

use std::io::{Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::Env;

pub(super) fn run(cmd: &mut Command) {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn umoci(args: &[&str]) {
    run(Command::new("umoci").args(args));
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// The installed Debian base rootfs (as the library resolves it).
fn base_rootfs() -> PathBuf {
    super::assets_dir().join("rootfs.tar.gz")
}

/// The body of `GET /` on the forwarded port (`None` until the guest's
/// server answers).
fn try_get(port: u16) -> Option<String> {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

fn http_get(port: u16) -> String {
    try_get(port).expect("an answer")
}

/// A `scratch` image at `image` (`LAYOUT:TAG`, the layout exists) of one
/// layer: a static busybox as /bin/busybox. Its config is left to the caller.
fn scratch_image(dir: &Path, image: &str) {
    let sdir = dir.join("scratch");
    std::fs::create_dir_all(sdir.join("bin")).expect("scratch");
    std::fs::copy("/bin/busybox", sdir.join("bin/busybox")).expect("busybox (busybox-static)");
    let layer = dir.join("scratch.tar");
    run(Command::new("tar")
        .arg("-C")
        .arg(&sdir)
        .arg("-cf")
        .arg(&layer)
        .arg("bin"));
    umoci(&["new", "--image", image]);
    umoci(&["raw", "add-layer", "--image", image, s(&layer)]);
}

use super::free_port;

/// The cached flattened tarballs: name → (inode, mtime).
fn converted() -> Vec<(String, u64, i64)> {
    let mut v: Vec<_> = std::fs::read_dir(super::cache_dir().join("oci"))
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".tar"))
                .map(|e| {
                    let m = e.metadata().expect("md");
                    (
                        e.file_name().to_string_lossy().into_owned(),
                        m.ino(),
                        m.mtime(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// One scenario over images made once: a Debian-based service image whose
/// entrypoint serves HTTP through `-p`, its config (entrypoint + args, env,
/// working directory) honoured; an image whose later layer deletes a file
/// and replaces a directory through an opaque whiteout, as a layout and as
/// a Docker archive; a `scratch` image of one static binary; another
/// platform refused; a second boot converts nothing again.
#[test]
fn oci_layouts_and_docker_archives_boot_with_their_config_and_layers() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let l = dir.path().join("layout");
    let lay = |tag: &str| format!("{}:{tag}", s(&l));
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let rootless: &[&str] = if root { &[] } else { &["--rootless"] };

    // app: the Debian base plus the counter, perl as its entrypoint.
    umoci(&["init", "--layout", s(&l)]);
    umoci(&["new", "--image", &lay("app")]);
    let bundle = dir.path().join("bundle");
    let app = lay("app");
    let mut a = vec!["unpack"];
    a.extend(rootless);
    a.extend(["--image", &app, s(&bundle)]);
    umoci(&a);
    run(Command::new("tar")
        .args(["-xzf", s(&base_rootfs()), "-C"])
        .arg(bundle.join("rootfs")));
    let counter = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/counter/counter.pl");
    std::fs::copy(&counter, bundle.join("rootfs/srv/counter.pl")).expect("counter");
    let mut a = vec!["repack"];
    a.extend(rootless);
    a.extend(["--image", &app, s(&bundle)]);
    umoci(&a);
    umoci(&[
        "config",
        "--image",
        &lay("app"),
        "--config.entrypoint",
        "perl",
        "--config.cmd",
        "/srv/counter.pl",
        "--config.cmd",
        "8080",
        "--config.env",
        "GREETING=hi",
        "--config.workingdir",
        "/srv",
        "--config.exposedports",
        "8080/tcp",
    ]);

    let port = free_port();
    env.run_ok(&[
        "boot",
        &format!("oci:{}", lay("app")),
        "--name",
        "web",
        "--detached",
        "-p",
        &format!("{port}:8080"),
    ]);
    super::wait_until(
        "the image's server",
        std::time::Duration::from_secs(60),
        || try_get(port).is_some_and(|b| b.trim().parse::<u64>().is_ok()),
    );
    let n: u64 = http_get(port).trim().parse().expect("a count");
    assert_eq!(http_get(port).trim(), (n + 1).to_string());
    env.run_ok(&["stop", "web"]);
    // The image's converted tarball, named by its manifest digest.
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(l.join("index.json")).expect("index")).expect("json");
    let digest = index["manifests"]
        .as_array()
        .expect("manifests")
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "app")
        .and_then(|m| m["digest"].as_str())
        .expect("app's digest")
        .trim_start_matches("sha256:")
        .to_string();
    let mine = |all: Vec<(String, u64, i64)>| all.into_iter().find(|c| c.0.starts_with(&digest));
    let first = mine(converted()).expect("app converted into the cache");

    // Arguments after `--` go to the entrypoint; env and cwd apply.
    let out = env.run_ok(&[
        "boot",
        &format!("oci:{}", lay("app")),
        "--",
        "-e",
        "print qq($ENV{GREETING} from ), `pwd`",
    ]);
    assert_eq!(out, "hi from /srv\n");
    // --entrypoint replaces the image's (and its command).
    let out = env.run_ok(&[
        "boot",
        &format!("oci:{}", lay("app")),
        "--entrypoint",
        "/bin/sh",
        "--",
        "-c",
        "echo $GREETING in $(pwd)",
    ]);
    assert_eq!(out, "hi in /srv\n");
    assert_eq!(
        mine(converted()),
        Some(first),
        "the second boot converted nothing"
    );

    // The image's User, and --user over it.
    umoci(&[
        "config",
        "--image",
        &lay("app"),
        "--tag",
        "user",
        "--config.user",
        "nobody",
        "--config.entrypoint",
        "",
        "--config.cmd",
        "",
    ]);
    let r = format!("oci:{}", lay("user"));
    assert_eq!(
        env.run_ok(&[
            "boot",
            &r,
            "--",
            "sh",
            "-c",
            "id -u; id -g; echo $HOME $USER"
        ]),
        "65534\n65534\n/nonexistent nobody\n"
    );
    assert_eq!(
        env.run_ok(&["boot", &r, "--user", "0", "--", "id", "-u"]),
        "0\n"
    );
    let out = env.run(&["boot", &r, "--user", "ghost", "--", "true"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not in the guest's /etc/passwd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // wh: a layer adds /opt/d/{a,b} and /opt/gone, the next deletes
    // /opt/gone and makes /opt/d opaque with only c in it.
    let l2 = dir.path().join("l2");
    let l3 = dir.path().join("l3");
    std::fs::create_dir_all(l2.join("opt/d")).expect("l2");
    std::fs::create_dir_all(l3.join("opt/d")).expect("l3");
    for (p, c) in [("opt/d/a", "a"), ("opt/d/b", "b"), ("opt/gone", "x")] {
        std::fs::write(l2.join(p), c).expect("l2 file");
    }
    for (p, c) in [
        ("opt/d/.wh..wh..opq", ""),
        ("opt/.wh.gone", ""),
        ("opt/d/c", "c"),
    ] {
        std::fs::write(l3.join(p), c).expect("l3 file");
    }
    for (d, t) in [(&l2, "l2.tar"), (&l3, "l3.tar")] {
        run(Command::new("tar")
            .arg("-C")
            .arg(d)
            .args(["-cf"])
            .arg(dir.path().join(t))
            .arg("opt"));
    }
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &lay("app"),
        "--tag",
        "wh",
        s(&dir.path().join("l2.tar")),
    ]);
    umoci(&[
        "raw",
        "add-layer",
        "--image",
        &lay("wh"),
        s(&dir.path().join("l3.tar")),
    ]);
    umoci(&[
        "config",
        "--image",
        &lay("wh"),
        "--config.entrypoint",
        "",
        "--config.cmd",
        "",
    ]);
    let want = "d\nc\n";
    let look = ["--", "sh", "-c", "ls -A /opt; ls -A /opt/d"];
    let mut a = vec!["boot"];
    let r = format!("oci:{}", lay("wh"));
    a.push(&r);
    a.extend(look);
    assert_eq!(env.run_ok(&a), want);
    let archive = dir.path().join("wh.tar");
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{}", lay("wh")),
        &format!("docker-archive:{}:local/wh:latest", s(&archive)),
    ]));
    let r = format!("docker-archive:{}", s(&archive));
    let mut a = vec!["boot", r.as_str()];
    a.extend(look);
    assert_eq!(env.run_ok(&a), want);

    // scratch: one static binary, nothing else in the image.
    scratch_image(dir.path(), &lay("scratch"));
    umoci(&[
        "config",
        "--image",
        &lay("scratch"),
        "--config.entrypoint",
        "/bin/busybox",
        "--config.entrypoint",
        "echo",
        "--config.cmd",
        "static ok",
    ]);
    assert_eq!(
        env.run_ok(&["boot", &format!("oci:{}", lay("scratch"))]),
        "static ok\n"
    );
    // A VM of an image snapshots and restores like any other.
    env.run_ok(&[
        "boot",
        &format!("oci:{}", lay("scratch")),
        "--name",
        "sv",
        "--detached",
        "--",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let snap = dir.path().join("snap");
    env.run_ok(&["snapshot", "sv", s(&snap)]);
    assert_eq!(
        env.run_ok(&[
            "restore",
            s(&snap),
            "--",
            "/bin/busybox",
            "echo",
            "restored"
        ]),
        "restored\n"
    );

    // Another platform's image.
    umoci(&[
        "config",
        "--image",
        &lay("scratch"),
        "--tag",
        "other",
        "--architecture",
        if std::env::consts::ARCH == "x86_64" {
            "arm64"
        } else {
            "amd64"
        },
    ]);
    let out = env.run(&["boot", &format!("oci:{}", lay("other")), "--", "true"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("IMAGE_PLATFORM_MISMATCH"), "{err}");
    // A tag that is not there.
    let out = env.run(&["boot", &format!("oci:{}", lay("nope")), "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image tagged"));
}

/// A registry server (Debian's `docker-registry`) on a free loopback port,
/// with its storage in `dir`; killed on drop.
pub(super) struct Registry {
    child: std::process::Child,
    pub(super) addr: String,
}

impl Registry {
    pub(super) fn start(dir: &Path) -> Registry {
        let port = free_port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.join("registry.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {addr}\n",
                s(&dir.join("data"))
            ),
        )
        .expect("config");
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("docker-registry (Debian package docker-registry)");
        super::wait_until("the registry", std::time::Duration::from_secs(20), || {
            std::net::TcpStream::connect(&addr).is_ok()
        });
        Registry { child, addr }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An image pushed to a local registry by skopeo: `pull` fetches and
/// converts it, `boot REF` runs it, a short name goes to
/// MACHINEN_DEFAULT_REGISTRY, a reference that was pulled boots with the
/// registry gone (no second pull), and a missing image or a registry
/// spoken to in the wrong protocol are IMAGE_PULL_FAILED.
#[test]
fn registry_images_pull_once_and_boot_without_the_network_after() {
    let env = Env::new();
    let dir = tempfile::tempdir().expect("tmp");
    let l = dir.path().join("layout");
    let lay = |tag: &str| format!("{}:{tag}", s(&l));
    umoci(&["init", "--layout", s(&l)]);
    scratch_image(dir.path(), &lay("s"));
    umoci(&[
        "config",
        "--image",
        &lay("s"),
        "--config.entrypoint",
        "/bin/busybox",
        "--config.cmd",
        "echo",
        "--config.cmd",
        "from the registry",
    ]);
    let reg = Registry::start(dir.path());
    let reference = format!("{}/team/tool:1", reg.addr);
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}", lay("s")),
        &format!("docker://{reference}"),
    ]));

    // Over HTTPS (the default) this registry does not answer.
    let out = env.run(&["pull", &reference]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("IMAGE_PULL_FAILED"));
    let pulled = env.json(&[
        "pull",
        &reference,
        "--insecure-registry",
        &reg.addr,
        "--json",
    ]);
    assert_eq!(pulled["reference"], reference.as_str());
    assert!(Path::new(pulled["tarball"].as_str().expect("tarball")).is_file());
    assert_eq!(env.run_ok(&["boot", &reference]), "from the registry\n");
    // Two boots of a new reference at once: both run.
    let second = format!("{}/team/tool:2", reg.addr);
    umoci(&[
        "config",
        "--image",
        &lay("s"),
        "--tag",
        "s2",
        "--config.cmd",
        "echo",
        "--config.cmd",
        "second",
    ]);
    run(Command::new("skopeo").args([
        "copy",
        "--dest-tls-verify=false",
        &format!("oci:{}", lay("s2")),
        &format!("docker://{second}"),
    ]));
    let boots: Vec<_> = (0..2)
        .map(|_| {
            env.cmd(&["boot", "--insecure-registry", &reg.addr, &second])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("boot")
        })
        .collect();
    for b in boots {
        let out = b.wait_with_output().expect("wait");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "second\n",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // (That they pulled and converted it once is the locks' doing; the
    // cache is shared with other tests, so counting files here would race.)
    // A short name through the default registry.
    let out = env
        .cmd(&["boot", "--insecure-registry", &reg.addr, "team/tool:1"])
        .env("MACHINEN_DEFAULT_REGISTRY", &reg.addr)
        .output()
        .expect("boot");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from the registry\n");
    let out = env.run(&[
        "pull",
        &format!("{}/team/missing:1", reg.addr),
        "--insecure-registry",
        &reg.addr,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("IMAGE_PULL_FAILED") && err.contains("manifest unknown"),
        "{err}"
    );
    // The registry gone, the pulled reference still boots.
    drop(reg);
    assert_eq!(env.run_ok(&["boot", &reference]), "from the registry\n");
    // A bundle records the image: with the converted tarball gone, a
    // restore converts it again from the pulled image.
    env.run_ok(&[
        "boot",
        &reference,
        "--name",
        "rv",
        "--detached",
        "--",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let snap = dir.path().join("rsnap");
    env.run_ok(&["snapshot", "rv", s(&snap)]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    assert_eq!(meta["image"]["source"], reference.as_str());
    let tar = PathBuf::from(meta["image"]["path"].as_str().expect("path"));
    std::fs::remove_file(&tar).expect("remove the converted tarball");
    assert_eq!(
        env.run_ok(&["restore", s(&snap), "--", "/bin/busybox", "echo", "back"]),
        "back\n"
    );
    assert!(tar.is_file(), "converted again");
    // The cache lists it; rm forgets it (a boot would pull again).
    let listed = env.json(&["images", "--json"]);
    let has = |l: &serde_json::Value| {
        l["pulled"]
            .as_array()
            .expect("pulled")
            .iter()
            .any(|p| p["reference"] == reference.as_str())
    };
    assert!(has(&listed), "{listed}");
    env.run_ok(&["images", "rm", &reference]);
    assert!(!has(&env.json(&["images", "--json"])));
    let out = env.run(&["boot", &reference, "--", "true"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("IMAGE_PULL_FAILED"));
    env.run_ok(&["images", "prune"]);
}
