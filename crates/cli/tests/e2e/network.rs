//! What a guest reaches on the network. Runs the VMs in a network
//! namespace of the test's own (with a stand-in "outside" host address and
//! a loopback server of its own), so no packet leaves this machine.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{wait_until, Env};

/// A network namespace with loopback, and a veth pair whose one end holds
/// [`OUTSIDE`] and the default route: what the guest reaches "outside".
pub(super) struct Netns {
    pub(super) name: String,
    servers: Vec<Child>,
}

/// An address of the namespace's own veth interface (TEST-NET-1).
const OUTSIDE: &str = "192.0.2.1";

impl Netns {
    pub(super) fn new() -> Option<Netns> {
        // Tests run in parallel in one process: a name each.
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("mn-e2e-{}-{n}", std::process::id());
        let ok = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(&["netns", "add", &name]) {
            return None;
        }
        let ns = Netns {
            name,
            servers: Vec::new(),
        };
        let addr = format!("{OUTSIDE}/24");
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            vec!["addr", "add", &addr, "dev", "v0"],
            vec!["link", "set", "v0", "up"],
            vec!["link", "set", "v1", "up"],
            vec!["route", "add", "default", "dev", "v0"],
        ] {
            let mut a = vec!["-n", ns.name.as_str()];
            a.extend(args);
            assert!(ok(&a), "ip {a:?}");
        }
        Some(ns)
    }

    /// A TCP server in the namespace that answers every connection with
    /// `BANNER <addr>:<port>` and closes it.
    pub(super) fn serve(&mut self, addr: &str, port: u16) {
        let server = r#"$s=IO::Socket::INET->new(LocalAddr=>$ARGV[0],LocalPort=>$ARGV[1],Listen=>16,ReuseAddr=>1) or die "listen: $!"; while($c=$s->accept){print $c "BANNER $ARGV[0]:$ARGV[1]\n"; close $c}"#;
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.name,
                "perl",
                "-MIO::Socket::INET",
                "-e",
                server,
                addr,
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .spawn()
            .expect("server");
        self.servers.push(child);
        self.wait_listening(addr, port);
    }

    /// Wait until something in the namespace listens on `addr:port`.
    pub(super) fn wait_listening(&self, addr: &str, port: u16) {
        let probe =
            r#"exit(IO::Socket::INET->new(PeerAddr=>$ARGV[0],PeerPort=>$ARGV[1],Timeout=>1)?0:1)"#;
        wait_until(
            "the namespace's server to listen",
            Duration::from_secs(10),
            || {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        &self.name,
                        "perl",
                        "-MIO::Socket::INET",
                        "-e",
                        probe,
                        addr,
                        &port.to_string(),
                    ])
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
    }

    /// `machinen ARGS` inside the namespace (its supervisor, QEMU and passt
    /// stay there; control sockets are files, so the rest of the test
    /// reaches the VMs from outside).
    pub(super) fn machinen(&self, env: &Env, args: &[&str]) -> String {
        let out = self.machinen_output(env, args);
        assert!(
            out.status.success(),
            "machinen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A process of the test's own in the namespace, stopped with it.
    pub(super) fn spawn(&mut self, argv: &[&str]) {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn in the namespace");
        self.servers.push(child);
    }

    /// Give the namespace's outside interface another address (CIDR).
    pub(super) fn add_addr(&self, cidr: &str) {
        let ok = Command::new("ip")
            .args(["-n", &self.name, "addr", "add", cidr, "dev", "v0"])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip addr add {cidr}");
    }

    /// A nameserver at `addr` in the namespace (dnsmasq) that knows only
    /// `records` (name, IPv4 address), and the namespace's resolv.conf
    /// naming it (`ip netns exec` mounts /etc/netns/NAME/resolv.conf over
    /// /etc/resolv.conf for what it runs: the supervisors' resolvers).
    pub(super) fn dns(&mut self, addr: &str, records: &[(&str, &str)]) {
        let dir = std::path::PathBuf::from("/etc/netns").join(&self.name);
        std::fs::create_dir_all(&dir).expect("/etc/netns");
        std::fs::write(dir.join("resolv.conf"), format!("nameserver {addr}\n")).expect("resolv");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, "dnsmasq"]).args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--user=root",
            "--pid-file=",
            &format!("--listen-address={addr}"),
        ]);
        for (name, ip) in records {
            c.arg(format!("--host-record={name},{ip}"));
        }
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        self.servers.push(child);
        let first = records[0].0;
        wait_until(
            "the namespace's nameserver",
            Duration::from_secs(10),
            || {
                Command::new("ip")
                    .args(["netns", "exec", &self.name, "getent", "hosts", first])
                    .output()
                    .is_ok_and(|o| o.status.success())
            },
        );
    }

    pub(super) fn machinen_output(&self, env: &Env, args: &[&str]) -> std::process::Output {
        self.machinen_output_with(env, &[], args)
    }

    /// `machinen ARGS` in the namespace with more environment variables.
    pub(super) fn machinen_output_with(
        &self,
        env: &Env,
        vars: &[(&str, &str)],
        args: &[&str],
    ) -> std::process::Output {
        let mut c = env.cmd(&[]);
        let bin = c.get_program().to_owned();
        let envs: Vec<_> = c
            .get_envs()
            .map(|(k, v)| (k.to_owned(), v.map(|v| v.to_owned())))
            .collect();
        c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(bin).args(args);
        for (k, v) in envs {
            match v {
                Some(v) => c.env(k, v),
                None => c.env_remove(k),
            };
        }
        c.envs(vars.iter().copied());
        c.stdin(Stdio::null()).output().expect("machinen")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(std::path::PathBuf::from("/etc/netns").join(&self.name));
    }
}

/// What the guest gets from `addr:port`: the banner, or "" when the
/// connection fails.
pub(super) fn guest_fetch(env: &Env, vm: &str, addr: &str, port: u16) -> String {
    let script =
        format!("timeout 10 bash -c 'exec 3<>/dev/tcp/{addr}/{port} && cat <&3' 2>/dev/null; true");
    env.run_ok(&["exec", vm, "--", "sh", "-c", &script])
        .trim()
        .to_string()
}

#[test]
fn guests_reach_outside_but_not_the_host_loopback_unless_asked() {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let env = Env::new();
    let Some(mut ns) = Netns::new() else {
        panic!("cannot create a network namespace (ip netns add) as root");
    };
    let (outside_port, loopback_port, forward_port) = (18001, 18002, 18003);
    ns.serve(OUTSIDE, outside_port);
    ns.serve("127.0.0.1", loopback_port);

    // `nat-host` is the explicit opt-in: its guest reaches the host's
    // loopback, which shows that the checks below can see a leak.
    ns.machinen(
        &env,
        &[
            "boot",
            "--name",
            "open",
            "--memory",
            "256",
            "--detached",
            "--network",
            "nat-host",
            "-p",
            &format!("{forward_port}:8080"),
        ],
    );
    env.run_ok(&["exec", "open", "--", "sh", "-c", "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalPort=>8080,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){print $c \"BANNER forward\\n\"; close $c}' >/dev/null 2>&1 &"]);
    wait_until("the forwarded server", Duration::from_secs(20), || {
        guest_fetch(&env, "open", "127.0.0.1", 8080) == "BANNER forward"
    });
    assert_eq!(
        guest_fetch(&env, "open", OUTSIDE, outside_port),
        format!("BANNER {OUTSIDE}:{outside_port}")
    );
    assert_eq!(
        guest_fetch(&env, "open", "10.0.2.2", loopback_port),
        format!("BANNER 127.0.0.1:{loopback_port}"),
        "nat-host maps the gateway to the host's loopback"
    );
    assert_eq!(
        guest_fetch(&env, "open", "10.0.2.2", forward_port),
        "BANNER forward",
        "and so to published ports"
    );

    // The default: outside yes, the host's loopback and other VMs'
    // published ports no.
    ns.machinen(
        &env,
        &["boot", "--name", "iso", "--memory", "256", "--detached"],
    );
    assert_eq!(
        guest_fetch(&env, "iso", OUTSIDE, outside_port),
        format!("BANNER {OUTSIDE}:{outside_port}"),
        "outbound works"
    );
    assert_eq!(
        guest_fetch(&env, "iso", "10.0.2.2", loopback_port),
        "",
        "the host's loopback is out of reach"
    );
    assert_eq!(
        guest_fetch(&env, "iso", "10.0.2.2", forward_port),
        "",
        "another VM's published port is out of reach"
    );

    // A restore and a fork keep the isolation (and the network).
    let bundles = tempfile::Builder::new()
        .prefix("mn-net-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let snap = bundles.path().join("iso.snap");
    env.run_ok(&["snapshot", "iso", snap.to_str().expect("path")]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    assert_eq!(meta["network"], "nat", "the bundle records the mode");
    ns.machinen(
        &env,
        &[
            "restore",
            snap.to_str().expect("path"),
            "--name",
            "iso2",
            "--detached",
        ],
    );
    assert_eq!(
        guest_fetch(&env, "iso2", OUTSIDE, outside_port),
        format!("BANNER {OUTSIDE}:{outside_port}")
    );
    assert_eq!(guest_fetch(&env, "iso2", "10.0.2.2", loopback_port), "");
    // The passt of a stopped VM goes with it.
    let sup = env
        .json(&["ls", "--json"])
        .as_array()
        .expect("ls")
        .iter()
        .find(|v| v["name"] == "iso2")
        .and_then(|v| v["pid"].as_u64())
        .expect("iso2 pid");
    let passt = children_named(sup, "passt");
    assert_eq!(passt.len(), 1, "one passt per VM");
    env.run_ok(&["stop", "iso2"]);
    wait_until(
        "the stopped VM's passt to exit",
        Duration::from_secs(10),
        || !super::pid_alive(passt[0]),
    );
}

/// Pids of the processes whose name starts with `comm` and whose parent is `parent`.
fn children_named(parent: u64, comm: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").expect("proc").flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u64>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 2..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<u64>().ok());
        // Debian's passt execs a CPU-specific build (`passt.avx2`).
        if stat[open + 1..close].starts_with(comm) && ppid == Some(parent) {
            out.push(pid);
        }
    }
    out
}

pub(super) fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// The banner a TCP server on the host's `127.0.0.1:port` sends, if any.
fn host_fetch(port: u16) -> String {
    use std::io::Read;
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.trim().to_string()
}

#[test]
fn network_none_leaves_only_loopback_while_exec_files_and_port_forwards_work() {
    let env = Env::new();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    env.run_ok(&[
        "boot",
        "--name",
        "cut",
        "--memory",
        "256",
        "--detached",
        "--network",
        "none",
        "-p",
        &format!("{port}:8080"),
    ]);
    let links = |vm: &str| env.run_ok(&["exec", vm, "--", "ls", "/sys/class/net"]);
    assert_eq!(links("cut").trim(), "lo", "no network device");
    assert_eq!(env.json(&["ls", "--json"])[0]["network"], "none");
    // No route anywhere, and it says so at once (not a timeout): even the
    // gateway the other modes have.
    let try_out = "bash -c 'exec 3<>/dev/tcp/10.0.2.2/80' 2>&1; \
                   ip route 2>/dev/null; cat /proc/net/route";
    let out = env.run_ok(&["exec", "cut", "--", "sh", "-c", try_out]);
    assert!(out.contains("Network is unreachable"), "{out}");
    // The guest's own loopback serves, and a port forward reaches it.
    env.run_ok(&["exec", "cut", "--", "sh", "-c", "nohup perl -MIO::Socket::INET -e '$s=IO::Socket::INET->new(LocalAddr=>\"127.0.0.1\",LocalPort=>8080,Listen=>5,ReuseAddr=>1) or die; while($c=$s->accept){print $c \"BANNER none\\n\"; close $c}' >/dev/null 2>&1 &"]);
    wait_until("the forwarded server", Duration::from_secs(30), || {
        host_fetch(port) == "BANNER none"
    });
    // Files both ways.
    env.run_ok(&["exec", "cut", "--", "sh", "-c", "echo inside > /tmp/f"]);
    let dir = tempfile::tempdir().expect("tmp");
    let local = dir.path().join("f");
    env.run_ok(&["cp", "cut:/tmp/f", local.to_str().expect("path")]);
    assert_eq!(std::fs::read_to_string(&local).expect("read"), "inside\n");

    // A restore keeps the mode.
    let snap = dir.path().join("cut.snap");
    env.run_ok(&["snapshot", "cut", snap.to_str().expect("path")]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    assert_eq!(meta["network"], "none");
    env.run_ok(&[
        "restore",
        snap.to_str().expect("path"),
        "--name",
        "cut2",
        "--detached",
    ]);
    assert_eq!(links("cut2").trim(), "lo");
    env.run_ok(&["stop", "cut2"]);
}
