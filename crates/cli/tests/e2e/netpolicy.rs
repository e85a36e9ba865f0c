//! Egress policy: what a guest may reach, enforced on the host. The VMs run
//! in a network namespace of the test's own with servers on three
//! addresses and a nameserver with a test zone, so no packet leaves this
//! machine.

use std::time::Instant;

use super::network::{guest_fetch, is_root, Netns};
use super::Env;

/// Allowed by CIDR (and port).
const ALLOWED: &str = "10.77.1.1";
/// Reachable only as the address of an allowed name.
const BY_NAME: &str = "10.77.2.1";
/// Refused (the address of a refused name, and never allowed).
const REFUSED: &str = "10.77.3.1";
const NAMESERVER: &str = "10.77.0.53";
const PORT: u16 = 8080;

/// What connecting from the guest says: `connected`, or bash's error.
fn connect(env: &Env, vm: &str, addr: &str) -> String {
    let script =
        format!("timeout 20 bash -c 'exec 3<>/dev/tcp/{addr}/{PORT} && echo connected' 2>&1; true");
    env.run_ok(&["exec", vm, "--", "sh", "-c", &script])
        .trim()
        .to_string()
}

fn resolve(env: &Env, vm: &str, name: &str) -> String {
    env.run_ok(&[
        "exec",
        vm,
        "--",
        "sh",
        "-c",
        &format!("getent hosts {name}; true"),
    ])
    .split_whitespace()
    .next()
    .unwrap_or("")
    .to_string()
}

/// A raw ICMP echo request from the guest (root): what comes back.
const RAW_PING: &str = r#"
use Socket;
socket(my $s, PF_INET, SOCK_RAW, 1) or die "raw socket: $!";
my $p = pack("C C n n n a*", 8, 0, 0, $$ & 0xffff, 1, "machinen");
my $sum = 0; $sum += $_ for unpack("n*", $p); $sum = ($sum >> 16) + ($sum & 0xffff); $sum += $sum >> 16;
substr($p, 2, 2) = pack("n", ~$sum & 0xffff);
send($s, $p, 0, sockaddr_in(0, inet_aton($ARGV[0]))) or die "send: $!";
my $rin = ''; vec($rin, fileno($s), 1) = 1;
while (select(my $r = $rin, undef, undef, 5)) {
    recv($s, my $buf, 1500, 0);
    my ($type, $code) = unpack("C C", substr($buf, 20, 2));
    if ($type == 0 || $type == 3) { print "icmp $type/$code\n"; exit 0 }
}
print "nothing\n";
"#;

fn err_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn egress_policy_refuses_at_once_resolves_only_allowed_names_holds_against_root_and_survives_snapshots(
) {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    let env = Env::new();
    let mut ns = Netns::new().expect("a network namespace (ip netns add) as root");
    for a in [ALLOWED, BY_NAME, REFUSED, NAMESERVER] {
        ns.add_addr(&format!("{a}/24"));
    }
    for a in [ALLOWED, BY_NAME, REFUSED] {
        ns.serve(a, PORT);
    }
    ns.dns(
        NAMESERVER,
        &[
            ("api.allowed.test", ALLOWED),
            ("other.allowed.test", BY_NAME),
            ("evil.test", REFUSED),
        ],
    );

    // Bad rules and a policy without a filtered network are refused
    // before anything starts.
    let out = env.run(&["boot", "--allow-net", "10.0.0.0/33", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err_text(&out).contains("NETWORK_POLICY_INVALID"),
        "{}",
        err_text(&out)
    );
    let out = env.run(&[
        "boot",
        "--network",
        "none",
        "--egress",
        "deny",
        "--",
        "true",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        err_text(&out).contains("--network nat"),
        "{}",
        err_text(&out)
    );

    ns.machinen(
        &env,
        &[
            "boot",
            "--name",
            "pol",
            "--memory",
            "256",
            "--detached",
            "--egress",
            "deny",
            "--allow-net",
            &format!("10.77.1.0/24:{PORT}"),
            "--allow-net",
            "*.allowed.test",
        ],
    );
    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls[0]["net_policy"]["egress"], "deny", "{ls}");

    // An allowed CIDR is reachable; a refused address fails at once with a
    // reset, not a timeout.
    assert_eq!(
        guest_fetch(&env, "pol", ALLOWED, PORT),
        format!("BANNER {ALLOWED}:{PORT}")
    );
    let t = Instant::now();
    let refused = connect(&env, "pol", REFUSED);
    eprintln!(
        "a refused connect took {} ms (exec included)",
        t.elapsed().as_millis()
    );
    assert!(refused.contains("Connection refused"), "{refused}");

    // Names: the test zone through the runtime's resolver. A refused name
    // does not resolve; an allowed one does, and only then is its address
    // reachable (a literal address cannot pass for a name).
    assert!(connect(&env, "pol", BY_NAME).contains("Connection refused"));
    assert_eq!(resolve(&env, "pol", "evil.test"), "");
    assert_eq!(resolve(&env, "pol", "api.allowed.test"), ALLOWED);
    assert_eq!(resolve(&env, "pol", "other.allowed.test"), BY_NAME);
    assert_eq!(connect(&env, "pol", BY_NAME), "connected");

    // Root in the guest cannot lift the policy: routes, firewall, a new
    // address, a resolver of its own, a raw socket.
    let bypass = format!(
        "ip route add {REFUSED}/32 dev eth0 2>&1; \
         (nft flush ruleset; iptables -F; iptables -P OUTPUT ACCEPT) >/dev/null 2>&1; \
         ip addr add 10.0.2.99/24 dev eth0 2>&1; \
         echo nameserver {NAMESERVER} > /etc/resolv.conf; true"
    );
    env.run_ok(&["exec", "pol", "--", "sh", "-c", &bypass]);
    assert!(connect(&env, "pol", REFUSED).contains("Connection refused"));
    let from_new_addr = format!(
        "perl -MIO::Socket::INET -e 'print IO::Socket::INET->new(PeerAddr=>\"{REFUSED}\",PeerPort=>{PORT},LocalAddr=>\"10.0.2.99\",Timeout=>20) ? \"connected\" : \"refused: $!\"'"
    );
    let out = env.run_ok(&["exec", "pol", "--", "sh", "-c", &from_new_addr]);
    assert!(out.contains("refused"), "{out}");
    assert_eq!(
        resolve(&env, "pol", "evil.test"),
        "",
        "its own resolver setting changes nothing"
    );
    let mut c = env
        .cmd(&["cp", "-", "pol:/root/ping.pl"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("cp");
    use std::io::Write;
    c.stdin
        .take()
        .expect("stdin")
        .write_all(RAW_PING.as_bytes())
        .expect("write");
    assert!(c.wait().expect("cp").success());
    let ping = env.run_ok(&["exec", "pol", "--", "perl", "/root/ping.pl", REFUSED]);
    assert_eq!(
        ping.trim(),
        "icmp 3/13",
        "a raw echo is refused as prohibited"
    );

    // A change on the running VM applies to the next connection.
    let t = Instant::now();
    env.run_ok(&["network", "pol", "--allow", &format!("{REFUSED}:{PORT}")]);
    assert_eq!(connect(&env, "pol", REFUSED), "connected");
    eprintln!(
        "policy change to first allowed connection: {} ms (exec included)",
        t.elapsed().as_millis()
    );
    env.run_ok(&["network", "pol", "--remove", &format!("{REFUSED}:{PORT}")]);
    assert!(connect(&env, "pol", REFUSED).contains("Connection refused"));
    let out = env.run(&["network", "pol", "--remove", "192.0.2.99"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(err_text(&out).contains("NETWORK_POLICY_INVALID"));

    // Accounting: traffic, connections, refusals by destination and rule,
    // and the supervisor's log.
    let report = env.json(&["network", "pol", "--json"]);
    let c = &report["counters"];
    assert!(
        c["bytes_out"].as_u64() > Some(0) && c["bytes_in"].as_u64() > Some(0),
        "{report}"
    );
    assert!(c["connections"].as_u64() >= Some(3), "{report}");
    assert!(c["dns_answered"].as_u64() >= Some(2), "{report}");
    let refused_by = c["refused_by"].as_array().expect("refused_by");
    let kind = |proto: &str, dest: &str| {
        refused_by
            .iter()
            .find(|k| k["proto"] == proto && k["destination"] == dest)
            .cloned()
    };
    let tcp = kind("tcp", &format!("{REFUSED}:{PORT}")).expect("tcp refusals");
    assert_eq!(tcp["rule"], "default deny");
    assert!(tcp["count"].as_u64() >= Some(3), "{report}");
    assert!(kind("dns", "evil.test").is_some(), "{report}");
    assert!(kind("icmp", REFUSED).is_some(), "{report}");
    let log = env.run_ok(&["logs", "pol", "--vmm"]);
    assert!(
        log.contains(&format!(
            "egress refused: tcp {REFUSED}:{PORT} by default deny"
        )),
        "{log}"
    );

    // Snapshot, restore and fork keep the policy; given flags replace it.
    let bundles = tempfile::Builder::new()
        .prefix("mn-np-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let snap = bundles.path().join("pol.snap");
    let snap_s = snap.to_str().expect("path");
    env.run_ok(&["snapshot", "pol", snap_s, "--keep-alive"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    assert_eq!(meta["net_policy"]["egress"], "deny", "{meta}");
    ns.machinen(&env, &["restore", snap_s, "--name", "pol2", "--detached"]);
    assert_eq!(
        env.json(&["network", "pol2", "--json"])["policy"],
        report["policy"]
    );
    assert_eq!(
        guest_fetch(&env, "pol2", ALLOWED, PORT),
        format!("BANNER {ALLOWED}:{PORT}")
    );
    assert!(connect(&env, "pol2", REFUSED).contains("Connection refused"));
    env.run_ok(&["stop", "pol2"]);
    ns.machinen(
        &env,
        &[
            "restore",
            snap_s,
            "--name",
            "pol3",
            "--detached",
            "--egress",
            "allow",
        ],
    );
    assert_eq!(connect(&env, "pol3", REFUSED), "connected");
    env.run_ok(&["stop", "pol3"]);
    ns.machinen(&env, &["fork", "pol", "--new-name", "polf", "--detach"]);
    assert_eq!(
        env.json(&["network", "polf", "--json"])["policy"],
        report["policy"]
    );
    assert!(connect(&env, "polf", REFUSED).contains("Connection refused"));
    // The names the source resolved travel with it: a program that looked
    // an address up before the fork still reaches it.
    assert_eq!(connect(&env, "polf", BY_NAME), "connected");
    env.run_ok(&["stop", "polf"]);
    env.run_ok(&["stop", "pol"]);
}
