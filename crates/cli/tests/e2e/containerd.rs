//! The containerd shim (`containerd-shim-machinen-v2`) under Debian's own
//! containerd, started by the test on its own socket and state directories;
//! images made with umoci and skopeo and imported with `ctr images import`
//! (no registry). Every container runs in a real VM.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::oci::run;
use super::Env;

const RUNTIME: &str = "io.containerd.machinen.v2";

fn s(p: &Path) -> &str {
    p.to_str().expect("utf8")
}

/// A containerd of the test's own, with the shim on its PATH and the
/// test's machinen registry in its environment (the shim inherits both).
struct Containerd {
    dir: PathBuf,
    child: Child,
    /// containerd's PATH (the shim first) and the test's registry.
    path: String,
    registry: PathBuf,
}

impl Containerd {
    fn start(env: &Env, dir: &Path) -> Containerd {
        let bin = Path::new(env!("CARGO_BIN_EXE_machinen"))
            .parent()
            .expect("bin dir")
            .to_path_buf();
        assert!(
            bin.join("containerd-shim-machinen-v2").is_file(),
            "the shim is not built next to machinen: run scripts/build --debug"
        );
        let config = dir.join("config.toml");
        std::fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{d}/root\"\nstate = \"{d}/state\"\n\
                 disabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n\
                 [grpc]\n  address = \"{d}/ctd.sock\"\n[ttrpc]\n  address = \"{d}/ctd.sock.ttrpc\"\n",
                d = dir.display()
            ),
        )
        .expect("config");
        let path = format!(
            "{}:{}",
            bin.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let child = Self::spawn(dir, &path, env.registry.path());
        let c = Containerd {
            dir: dir.to_path_buf(),
            child,
            path,
            registry: env.registry.path().to_path_buf(),
        };
        c.wait_ready();
        c
    }

    fn spawn(dir: &Path, path: &str, registry: &Path) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("containerd.log"))
            .expect("log");
        Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .env("MACHINEN_REGISTRY_DIR", registry)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("containerd (Debian's containerd package)")
    }

    fn wait_ready(&self) {
        let t0 = Instant::now();
        while self
            .ctr(&["version"])
            .output()
            .map(|o| !o.status.success())
            .unwrap_or(true)
        {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "containerd did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stop containerd (its shims and their VMs go on) and start it again.
    fn restart(&mut self) {
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_file(self.dir.join("ctd.sock"));
        self.child = Self::spawn(&self.dir, &self.path, &self.registry);
        self.wait_ready();
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }

    fn ctr(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ctr");
        c.arg("--address").arg(self.dir.join("ctd.sock")).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        let out = self.ctr(args).stdin(Stdio::null()).output().expect("ctr");
        eprintln!(
            "$ ctr {}\n  -> {:?}\n  stdout: {}\n  stderr: {}",
            args.join(" "),
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        out
    }

    fn run_ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "ctr {args:?} failed\n{}", self.log());
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `ctr tasks ls`: task → status.
    fn task_status(&self, id: &str) -> Option<String> {
        let out = self.run_ok(&["tasks", "ls"]);
        out.lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|w| w.first() == Some(&id))
            .and_then(|w| w.get(2).map(|s| s.to_string()))
    }

    fn wait_status(&self, id: &str, want: Option<&str>) {
        let t0 = Instant::now();
        loop {
            let st = self.task_status(id);
            if st.as_deref() == want {
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(90),
                "task {id} is {st:?}, not {want:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// The counter's run (a token it drew at start) and value (`None`
    /// before its first write).
    fn try_count(&self, id: &str, exec: &str) -> Option<(String, u64)> {
        let out = self.run(&["tasks", "exec", "--exec-id", exec, id, "cat", "/tmp/count"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (token, n) = text.trim().split_once(' ')?;
        Some((token.to_string(), n.parse().ok()?))
    }

    fn count(&self, id: &str, exec: &str) -> (String, u64) {
        self.try_count(id, exec)
            .unwrap_or_else(|| panic!("no count from {id}\n{}", self.log()))
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Whatever the test left: its tasks (their VMs), then containerd.
        if let Ok(out) = self.ctr(&["tasks", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["tasks", "kill", "-s", "SIGKILL", id]).output();
                std::thread::sleep(Duration::from_millis(500));
                let _ = self.ctr(&["tasks", "delete", "-f", id]).output();
            }
        }
        if let Ok(out) = self.ctr(&["containers", "ls", "-q"]).output() {
            for id in String::from_utf8_lossy(&out.stdout).lines() {
                let _ = self.ctr(&["containers", "rm", id]).output();
            }
        }
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// A busybox image (`local/NAME:latest` as a Docker archive) with the
/// given umoci config flags; `/srv` exists in it.
fn busybox_image(dir: &Path, name: &str, config: &[&str]) -> PathBuf {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(root.join("bin")).expect("root");
    std::fs::create_dir_all(root.join("srv")).expect("srv");
    std::fs::create_dir_all(root.join("tmp")).expect("tmp");
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox (busybox-static)");
    for applet in [
        "sh", "cat", "echo", "sleep", "httpd", "id", "pwd", "grep", "tty", "head",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).expect("link");
    }
    let layer = dir.join(format!("{name}.layer.tar"));
    run(Command::new("tar")
        .arg("-C")
        .arg(&root)
        .arg("-cf")
        .arg(&layer)
        .args(["bin", "srv", "tmp"]));
    let lay = dir.join(format!("{name}-layout"));
    run(Command::new("umoci").args(["init", "--layout", s(&lay)]));
    let image = format!("{}:latest", s(&lay));
    run(Command::new("umoci").args(["new", "--image", &image]));
    run(Command::new("umoci").args(["raw", "add-layer", "--image", &image, s(&layer)]));
    let mut c = Command::new("umoci");
    c.args([
        "config",
        "--image",
        &image,
        "--config.env",
        "PATH=/bin",
        "--config.cmd",
        "sh",
    ]);
    c.args(config);
    run(&mut c);
    let archive = dir.join(format!("{name}.tar"));
    run(Command::new("skopeo").args([
        "copy",
        &format!("oci:{image}"),
        &format!("docker-archive:{}:localhost/{name}:latest", s(&archive)),
    ]));
    archive
}

/// The body of `GET /` on `port` (`None` until something answers).
fn try_get(port: u16) -> Option<String> {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    c.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    c.write_all(b"GET / HTTP/1.0\r\n\r\n").ok()?;
    let mut s = String::new();
    c.read_to_string(&mut s).ok()?;
    s.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// The shim's Update with a memory limit, through its own socket (as the
/// CRI and nerdctl call it; `ctr` has no command for it).
fn update_memory(ctd: &Containerd, id: &str, limit: u64) {
    use containerd_shim_protos::protobuf::well_known_types::any::Any;
    use containerd_shim_protos::protobuf::MessageField;
    use containerd_shim_protos::shim::shim::UpdateTaskRequest;
    use containerd_shim_protos::ttrpc;
    let task = ctd
        .dir
        .join("state/io.containerd.runtime.v2.task/default")
        .join(id);
    let address = std::fs::read_to_string(task.join("address")).expect("the shim's address");
    let req = UpdateTaskRequest {
        id: id.to_string(),
        resources: MessageField::some(Any {
            type_url: "types.containerd.io/opencontainers/runtime-spec/1/LinuxResources".into(),
            value: format!("{{\"memory\": {{\"limit\": {limit}}}}}").into_bytes(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let client = ttrpc::asynchronous::Client::connect(address.trim())
            .await
            .expect("connect to the shim");
        containerd_shim_protos::shim_async::TaskClient::new(client)
            .update(ttrpc::context::with_timeout(30_000_000_000), &req)
            .await
            .expect("Update")
    });
}

/// The pid of the shim serving container `id` (its command line names it).
fn shim_pid(id: &str) -> Option<i32> {
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with(b"containerd-shim-machinen-v2"));
        let names_id = args
            .windows(2)
            .any(|w| w[0] == b"-id" && w[1] == id.as_bytes());
        (is_shim && names_id).then_some(pid)
    })
}

/// One scenario on one containerd: `ctr run --rm` with output and exit
/// status; the spec's env, cwd and user; the memory limit as the VM's; a
/// detached HTTP server reached through the port annotation, `tasks exec`,
/// a graceful SIGTERM and the exit status; a task with a TTY; a running
/// counter checkpointed, deleted and restored (under its own ID and under
/// another) counting on; a killed shim cleaned up by containerd.
#[test]
fn containerd_runs_tasks_in_vms_and_checkpoints_and_restores_them() {
    let env = Env::new();
    let dir = tempfile::Builder::new()
        .prefix("ctd-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let plain = busybox_image(dir.path(), "bb", &["--config.env", "GREETING=hello"]);
    let user = busybox_image(
        dir.path(),
        "bbuser",
        &[
            "--config.env",
            "GREETING=hello",
            "--config.user",
            "1000:1000",
            "--config.workingdir",
            "/srv",
        ],
    );
    let mut ctd = Containerd::start(&env, dir.path());
    ctd.run_ok(&["images", "import", s(&plain)]);
    ctd.run_ok(&["images", "import", s(&user)]);
    let bb = "localhost/bb:latest";
    let bbuser = "localhost/bbuser:latest";

    // run --rm: stdout and stderr apart, the exit status, the memory limit.
    let out = ctd.run(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "268435456",
        bb,
        "t1",
        "sh",
        "-c",
        "echo to-out; echo to-err >&2; grep MemTotal /proc/meminfo; echo nofile=$(ulimit -Hn); exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7), "{}", ctd.log());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("to-out") && !stdout.contains("to-err"),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-err"));
    let kib: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal");
    assert!(
        (150 * 1024..=256 * 1024).contains(&kib),
        "a 256 MiB limit is the VM's RAM: MemTotal {kib} kB"
    );
    assert_eq!(ctd.task_status("t1"), None, "--rm removed the task");

    // The container's stdin reaches its process (then its end of file).
    let mut child = ctd
        .ctr(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            bb,
            "t0",
            "sh",
            "-c",
            "cat; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("ctr");
    {
        use std::io::Write;
        let mut w = child.stdin.take().expect("stdin");
        w.write_all(b"piped-in\n").expect("write");
    }
    let out = child.wait_with_output().expect("ctr");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "piped-in\ndone\n");
    assert_eq!(out.status.code(), Some(0));

    // The spec's env (image + --env), cwd (image's, then --cwd) and user.
    let out = ctd.run_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--env",
        "EXTRA=more",
        bbuser,
        "t2",
        "sh",
        "-c",
        "echo $GREETING $EXTRA $(pwd) $(id -u):$(id -g)",
    ]);
    assert_eq!(out.trim(), "hello more /srv 1000:1000");
    let out = ctd.run_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--cwd",
        "/tmp",
        bbuser,
        "t3",
        "pwd",
    ]);
    assert_eq!(out.trim(), "/tmp");

    // The CPU quota as vCPUs; a bind mount of a host directory shared both ways.
    let share = dir.path().join("share");
    std::fs::create_dir_all(&share).expect("share");
    std::fs::write(share.join("in.txt"), "from-host\n").expect("in.txt");
    let mount = format!("type=bind,src={},dst=/data,options=rbind:rw", s(&share));
    let out = ctd.run_ok(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--cpus",
        "2",
        "--mount",
        &mount,
        bb,
        "t4",
        "sh",
        "-c",
        "nproc; cat /data/in.txt; echo from-guest > /data/out.txt",
    ]);
    assert_eq!(out, "2\nfrom-host\n");
    assert_eq!(
        std::fs::read_to_string(share.join("out.txt")).expect("the guest's file"),
        "from-guest\n"
    );

    // A detached server: HTTP through the port annotation, an exec, then
    // SIGTERM, which the command traps to exit 3.
    let port = super::free_port();
    let ann = format!("io.machinen.ports={port}:80");
    ctd.run_ok(&[
        "run", "-d", "--runtime", RUNTIME, "--annotation", &ann, bb, "web", "sh", "-c",
        "trap 'exit 3' TERM; echo served-by-vm > /tmp/index.html; httpd -f -p 80 -h /tmp & while :; do sleep 1; done",
    ]);
    let t0 = Instant::now();
    let body = loop {
        if let Some(b) = try_get(port) {
            break b;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no HTTP answer\n{}",
            ctd.log()
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    assert_eq!(body.trim(), "served-by-vm");
    assert_eq!(ctd.task_status("web").as_deref(), Some("RUNNING"));
    let ls = env.run_ok(&["ls"]);
    assert!(ls.contains("containerd/default/web"), "{ls}");
    // The shim's files for it: its rootfs image, kept per containerd.
    let digest = blake3::hash(s(&dir.path().join("ctd.sock")).as_bytes()).to_hex();
    let web_files = super::machinen_home()
        .join("containers")
        .join(&digest.as_str()[..12])
        .join("default/web");
    assert!(
        web_files.join("rootfs.tar").is_file(),
        "{}",
        web_files.display()
    );
    let out = ctd.run(&[
        "tasks",
        "exec",
        "--exec-id",
        "e1",
        "web",
        "sh",
        "-c",
        "echo exec-$GREETING; exit 4",
    ]);
    assert_eq!(out.status.code(), Some(4));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "exec-hello");
    // Its processes, its memory, and a pause that stops the server.
    let ps = ctd.run_ok(&["tasks", "ps", "web"]);
    assert!(ps.lines().count() >= 2, "{ps}");
    let metrics = ctd.run_ok(&["tasks", "metrics", "web"]);
    let usage: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("memory.usage_in_bytes"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no memory usage in {metrics}"));
    assert!(usage > 1 << 20, "{metrics}");
    // containerd restarts; the shim and its VM go on, and it finds them.
    ctd.restart();
    assert_eq!(ctd.task_status("web").as_deref(), Some("RUNNING"));
    let out = ctd.run_ok(&[
        "tasks",
        "exec",
        "--exec-id",
        "e2",
        "web",
        "echo",
        "still-here",
    ]);
    assert_eq!(out.trim(), "still-here");

    // Update: a memory limit below the ceiling becomes the balloon's target.
    update_memory(&ctd, "web", 300 << 20);
    let b = env.json(&["balloon", "containerd/default/web", "--json"]);
    assert_eq!(b["target_bytes"].as_u64(), Some(300 << 20), "{b}");
    ctd.run_ok(&["tasks", "pause", "web"]);
    assert_eq!(ctd.task_status("web").as_deref(), Some("PAUSED"));
    assert_eq!(try_get(port), None, "a paused server answers nothing");
    ctd.run_ok(&["tasks", "resume", "web"]);
    assert_eq!(ctd.task_status("web").as_deref(), Some("RUNNING"));
    assert_eq!(
        try_get(port).as_deref().map(str::trim),
        Some("served-by-vm")
    );
    ctd.run_ok(&["tasks", "kill", "-s", "SIGTERM", "web"]);
    ctd.wait_status("web", Some("STOPPED"));
    let out = ctd.run(&["tasks", "delete", "web"]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exit code 3"),
        "the trap's status reaches containerd"
    );
    ctd.run_ok(&["containers", "rm", "web"]);
    let ls = env.run_ok(&["ls"]);
    assert!(!ls.contains("containerd/default/web"), "{ls}");

    // A task with a terminal (script(1) gives ctr one).
    let cmd = format!(
        "ctr --address {} run -t --rm --runtime {RUNTIME} {bb} tty1 sh -c 'tty; exit 5'",
        s(&dir.path().join("ctd.sock"))
    );
    let out = Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .expect("script (bsdutils)");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("/dev/pts/"));

    // Checkpoint a running counter, delete it, restore it under its own ID
    // and under another: both count on from where it was.
    ctd.run_ok(&[
        "run",
        "-d",
        "--runtime",
        RUNTIME,
        "--memory-limit",
        "268435456",
        bb,
        "ctr1",
        "sh",
        "-c",
        "t=$(cat /proc/sys/kernel/random/uuid); i=0; while :; do i=$((i+1)); echo \"$t $i\" > /tmp/count; sleep 1; done",
    ]);
    let t0 = Instant::now();
    while ctd
        .try_count("ctr1", &format!("c{}", t0.elapsed().as_millis()))
        .map_or(0, |c| c.1)
        < 3
    {
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The checkpoint holds a value at or after this one, of this run.
    let (run, before) = ctd.count("ctr1", "before");
    ctd.run_ok(&[
        "containers",
        "checkpoint",
        "--task",
        "--image",
        "ctr1",
        "cp/ctr1:1",
    ]);
    ctd.run_ok(&["tasks", "kill", "-s", "SIGKILL", "ctr1"]);
    ctd.wait_status("ctr1", Some("STOPPED"));
    ctd.run_ok(&["tasks", "delete", "ctr1"]);
    ctd.run_ok(&["containers", "rm", "ctr1"]);
    ctd.run_ok(&["containers", "restore", "--live", "ctr1", "cp/ctr1:1"]);
    ctd.run_ok(&["containers", "restore", "--live", "ctr2", "cp/ctr1:1"]);
    for id in ["ctr1", "ctr2"] {
        assert_eq!(ctd.task_status(id).as_deref(), Some("RUNNING"));
        // The same run (a new start would draw another token), going on
        // from the checkpoint.
        let (r, first) = ctd.count(id, "r1");
        assert_eq!(r, run, "{id} is the checkpointed run, not a new one");
        assert!(
            first >= before,
            "{id} resumed at {first}, before it was {before}"
        );
        std::thread::sleep(Duration::from_secs(2));
        let (_, later) = ctd.count(id, "r2");
        assert!(later > first, "{id} counts on: {first} then {later}");
    }
    for id in ["ctr1", "ctr2"] {
        ctd.run_ok(&["tasks", "kill", "-s", "SIGKILL", id]);
        ctd.wait_status(id, Some("STOPPED"));
        ctd.run_ok(&["tasks", "delete", id]);
        ctd.run_ok(&["containers", "rm", id]);
    }

    // A shim killed outright: containerd cleans up through the shim's
    // delete action; the VM goes, and nothing is left for gc.
    ctd.run_ok(&["run", "-d", "--runtime", RUNTIME, bb, "k1", "sleep", "1000"]);
    let pid = shim_pid("k1").expect("the shim of k1");
    // SAFETY: kill(2) with a pid read from /proc; no memory is involved.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    ctd.wait_status("k1", None);
    ctd.run_ok(&["containers", "rm", "k1"]);
    let t0 = Instant::now();
    while env.run_ok(&["ls"]).contains("containerd/default/k1") {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the VM of k1 outlived its shim"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let gc = env.json(&["gc", "--dry-run", "--json"]);
    eprintln!("gc: {gc}");
    // Every deleted container's files went with it (the killed shim's
    // too): the shim keeps them per containerd, by its socket address.
    let address = dir.path().join("ctd.sock");
    let digest = blake3::hash(s(&address).as_bytes()).to_hex();
    let mine = super::machinen_home()
        .join("containers")
        .join(&digest.as_str()[..12])
        .join("default");
    for id in [
        "t0", "t1", "t2", "t3", "t4", "web", "tty1", "ctr1", "ctr2", "k1",
    ] {
        assert!(
            !mine.join(id).exists(),
            "{} was left behind",
            mine.join(id).display()
        );
    }
}

/// A baked image written as a container image runs elsewhere: `provision -o
/// oci:DIR:TAG` gives a layout whose config skopeo reads back (env, cwd,
/// command) and which machinen boots; `images export` of it gives a Docker
/// archive that containerd imports and runs with runc — no machinen in the
/// path.
#[test]
fn a_baked_image_exported_as_a_container_image_runs_under_runc() {
    let env = Env::new();
    let dir = tempfile::Builder::new()
        .prefix("exp-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let lay = dir.path().join("layout");
    let oci_ref = format!("oci:{}:v1", s(&lay));
    let out = env.run_ok(&[
        "provision",
        "--run",
        "echo baked > /hello",
        "--env",
        "GREETING=hi",
        "--cwd",
        "/srv",
        "--cmd",
        "cat /hello; echo $GREETING; pwd",
        "-o",
        &oci_ref,
    ]);
    assert!(out.contains("exported to"), "{out}");
    let inspect = Command::new("skopeo")
        .args(["inspect", "--config", &oci_ref])
        .output()
        .expect("skopeo");
    assert!(
        inspect.status.success(),
        "{}",
        String::from_utf8_lossy(&inspect.stderr)
    );
    let cfg: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("config");
    let env_list = cfg["config"]["Env"].as_array().expect("Env");
    assert!(env_list.iter().any(|e| e == "GREETING=hi"), "{cfg}");
    assert_eq!(cfg["config"]["WorkingDir"], "/srv", "{cfg}");
    assert_eq!(
        cfg["config"]["Cmd"],
        serde_json::json!(["sh", "-c", "cat /hello; echo $GREETING; pwd"])
    );
    let want = "baked\nhi\n/srv\n";
    assert_eq!(env.run_ok(&["boot", &oci_ref]), want);

    let archive = dir.path().join("baked.tar");
    let target = format!("docker-archive:{}:localhost/baked:v1", s(&archive));
    let exported = env.json(&["images", "export", &oci_ref, &target, "--json"]);
    assert!(
        exported["manifest_digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{exported}"
    );
    let ctd = Containerd::start(&env, dir.path());
    ctd.run_ok(&["images", "import", s(&archive)]);
    let out = ctd.run_ok(&[
        "run",
        "--rm",
        "--runtime",
        "io.containerd.runc.v2",
        "localhost/baked:v1",
        "b1",
    ]);
    assert_eq!(out, want, "runc runs the exported image with its config");
}
