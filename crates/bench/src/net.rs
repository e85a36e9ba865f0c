//! Outbound network: a guest downloads from a server outside it, with
//! `--network nat` (passt) next to `--network nat-host` (QEMU's built-in
//! user networking, what every VM used before), and with `nat` under a
//! 100-rule egress policy next to `nat` with none: download throughput and
//! new connections per second. The VMs and the server run
//! in a network namespace of the benchmark's own, the server on an address
//! of that namespace, so no packet leaves this machine. Needs root and
//! `ip` (iproute2); without them the section reports nothing.

use std::process::{Child, Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use machinen::spec::NetworkMode;

use crate::ctx::{sh, stop, Ctx};
use crate::stats::{mib, Section};

/// The server's address, on the namespace's own veth (TEST-NET-1).
const OUTSIDE: &str = "192.0.2.1";
const PORT: u16 = 19000;

/// Answers a line `N` with N × 64 KiB, then closes (as in the ports section).
const BULK: &str = r#"use strict; use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => shift, LocalPort => shift, Listen => 16, ReuseAddr => 1) or die "listen: $!\n";
my $b = 'x' x 65536;
while (my $c = $s->accept) { my $n = <$c> // 0; $n = int($n); print $c $b for 1 .. $n; close $c; }
"#;

struct Netns {
    name: String,
    server: Option<Child>,
}

impl Netns {
    fn create() -> Result<Netns> {
        let name = format!("mnb-{}", std::process::id());
        ip(&["netns", "add", &name])?;
        let ns = Netns { name, server: None };
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
            ip(&a)?;
        }
        Ok(ns)
    }

    fn exec(&self, program: &std::path::Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(s) = &mut self.server {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

fn ip(args: &[&str]) -> Result<()> {
    let st = Command::new("ip")
        .args(args)
        .stdout(Stdio::null())
        .status()
        .context("running ip")?;
    if !st.success() {
        bail!("ip {} failed ({st})", args.join(" "));
    }
    Ok(())
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    if !is_root() {
        eprintln!("  skipped: a network namespace needs root");
        return Ok(());
    }
    let cli = crate::boot::cli_binary().context("the machinen CLI is not next to the benchmark")?;
    let mut ns = Netns::create()?;
    let mut server = ns.exec(std::path::Path::new("perl"));
    server
        .args(["-e", BULK, OUTSIDE, &PORT.to_string()])
        .stdout(Stdio::null());
    ns.server = Some(server.spawn().context("starting the server")?);
    let policy = policy_flags();
    for (network, with_policy) in [
        (NetworkMode::Nat, false),
        (NetworkMode::Nat, true),
        (NetworkMode::NatHost, false),
    ] {
        let name = format!("net-{network}{}", if with_policy { "-policy" } else { "" });
        let memory = ctx.cfg.memory_mib.to_string();
        let mut args = vec![
            "boot",
            "--name",
            &name,
            "--detached",
            "--memory",
            &memory,
            "--network",
            network.as_str(),
        ];
        if with_policy {
            args.extend(policy.iter().map(String::as_str));
        }
        let out = ns
            .exec(&cli)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .context("booting in the namespace")?;
        if !out.status.success() {
            bail!(
                "boot --network {network} in the namespace: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let vm = machinen::attach(&name).await?;
        let r = measure(ctx, &vm, sec, network, with_policy).await;
        stop(vm).await?;
        r?;
    }
    Ok(())
}

/// A 100-rule policy that lets the server through, as a default-deny
/// policy of a real sandbox would: one allow rule, and 99 deny rules (half
/// addresses, half domains) that the traffic must be checked against.
fn policy_flags() -> Vec<String> {
    let mut f = vec![
        "--egress".to_string(),
        "deny".into(),
        "--allow-net".into(),
        format!("{OUTSIDE}/32:{PORT}"),
    ];
    for i in 0..50 {
        f.push("--deny-net".into());
        f.push(format!("10.{i}.0.0/16"));
    }
    for i in 0..49 {
        f.push("--deny-net".into());
        f.push(format!("*.blocked-{i}.test"));
    }
    f
}

async fn measure(
    ctx: &Ctx,
    vm: &machinen::Vm,
    sec: &mut Section,
    network: NetworkMode,
    with_policy: bool,
) -> Result<()> {
    let n = ctx.cfg.stream_mib;
    let fetch = format!(
        "bash -c 'exec 3<>/dev/tcp/{OUTSIDE}/{PORT} && echo {} >&3 && cat <&3' | wc -c",
        n * 16
    );
    // The server may still be starting; the first fetch also warms up.
    let deadline = Instant::now() + crate::ctx::SERVICE_START;
    while sh(vm, &fetch)
        .await
        .ok()
        .and_then(|o| o.trim().parse::<u64>().ok())
        != Some(u64::from(n) << 20)
    {
        if Instant::now() > deadline {
            bail!("the guest never downloaded {n} MiB from {OUTSIDE}:{PORT}");
        }
        tokio::time::sleep(crate::ctx::FETCH_RETRY).await;
    }
    let mut tput = Vec::new();
    for _ in 0..ctx.cfg.runs {
        let t = Instant::now();
        let got: u64 = sh(vm, &fetch).await?.trim().parse().context("byte count")?;
        let secs = t.elapsed().as_secs_f64();
        if got != u64::from(n) << 20 {
            bail!("outbound download: got {got} bytes, wanted {n} MiB");
        }
        tput.push(mib(got) / secs);
    }
    let (key, label) = match network {
        NetworkMode::Nat if with_policy => (
            "outbound_nat_policy_mib_s",
            "--network nat, 100-rule egress policy",
        ),
        NetworkMode::Nat => ("outbound_nat_mib_s", "--network nat (passt)"),
        NetworkMode::NatHost => (
            "outbound_nat_host_mib_s",
            "--network nat-host (QEMU user networking)",
        ),
        NetworkMode::None => bail!("a guest without a network has no outbound download"),
    };
    sec.add(
        key,
        &format!("guest download from outside ({n} MiB, {label})"),
        "MiB/s",
        tput,
    );
    if network != NetworkMode::Nat {
        return Ok(());
    }
    // New connections: each a SYN judged by the filter (a new flow), a
    // line, the server's close.
    const CONNS: u32 = 200;
    let churn = format!(
        "perl -MIO::Socket::INET -e 'for (1..{CONNS}) {{ my $s = IO::Socket::INET->new(PeerAddr => \"{OUTSIDE}\", PeerPort => {PORT}) or die \"connect: $!\\n\"; print $s \"0\\n\"; 1 while <$s>; }} print \"ok\\n\"'"
    );
    let mut rate = Vec::new();
    for _ in 0..ctx.cfg.runs {
        let t = Instant::now();
        let out = sh(vm, &churn).await?;
        let secs = t.elapsed().as_secs_f64();
        if out.trim() != "ok" {
            bail!("connection churn: {out}");
        }
        rate.push(f64::from(CONNS) / secs);
    }
    let (key, label) = if with_policy {
        ("connections_nat_policy_per_s", "100-rule egress policy")
    } else {
        ("connections_nat_per_s", "no policy")
    };
    sec.add(
        key,
        &format!("guest TCP connections to outside, one after another ({label})"),
        "conn/s",
        rate,
    );
    Ok(())
}
