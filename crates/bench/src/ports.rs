//! Port forwards: request latency (a tiny HTTP counter, one connection per
//! request, as a browser or curl would) and bulk throughput, host
//! `127.0.0.1:HOST` → supervisor → agent stream → guest `127.0.0.1:GUEST`.

use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use machinen::registry::PortForward;
use machinen::spec::NetworkMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::ctx::{free_port, put, sh, stop, Ctx};
use crate::stats::{mib, ms, Section};

const COUNTER: &str = include_str!("../../../examples/counter/counter.pl");

/// Answers a line `N` with N × 64 KiB, then closes.
const BULK: &str = r#"use strict; use IO::Socket::INET;
my $s = IO::Socket::INET->new(LocalAddr => '127.0.0.1', LocalPort => shift, Listen => 16, ReuseAddr => 1) or die "listen: $!\n";
my $b = 'x' x 65536;
while (my $c = $s->accept) { my $n = <$c> // 0; $n = int($n); print $c $b for 1 .. $n; close $c; }
"#;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    for network in [NetworkMode::Nat, NetworkMode::NatHost] {
        run_mode(ctx, sec, network).await?;
    }
    Ok(())
}

/// Port forwards do not use the guest's network stack (they ride the agent
/// channel), so both network modes should measure alike: the `nat-host`
/// row is the baseline that shows it.
async fn run_mode(ctx: &Ctx, sec: &mut Section, network: NetworkMode) -> Result<()> {
    let (p_counter, p_bulk) = (free_port()?, free_port()?);
    let mut opts = ctx.boot_options(&format!("ports-{network}"));
    opts.network = network;
    opts.ports = vec![
        PortForward {
            host_addr: "127.0.0.1".into(),
            host_port: p_counter,
            guest_port: 8080,
        },
        PortForward {
            host_addr: "127.0.0.1".into(),
            host_port: p_bulk,
            guest_port: 9000,
        },
    ];
    let vm = machinen::boot(opts)
        .await
        .context("booting the port-forward VM")?;
    let r = measure(ctx, &vm, sec, p_counter, p_bulk, network).await;
    stop(vm).await?;
    r
}

async fn measure(
    ctx: &Ctx,
    vm: &machinen::Vm,
    sec: &mut Section,
    p_counter: u16,
    p_bulk: u16,
    network: NetworkMode,
) -> Result<()> {
    put(vm, "/root/counter.pl", COUNTER.as_bytes()).await?;
    put(vm, "/root/bulk.pl", BULK.as_bytes()).await?;
    sh(vm, "nohup perl /root/counter.pl 8080 >/dev/null 2>&1 & nohup perl /root/bulk.pl 9000 >/dev/null 2>&1 &").await?;
    // Wait until the counter answers (perl starting up under TCG).
    let deadline = Instant::now() + crate::ctx::SERVICE_START;
    while get(p_counter).await.is_err() {
        if Instant::now() > deadline {
            bail!("the guest counter never answered on port {p_counter}");
        }
        tokio::time::sleep(crate::ctx::SERVICE_POLL).await;
    }
    if network == NetworkMode::Nat {
        let mut lat = Vec::new();
        for _ in 0..ctx.cfg.reps {
            let t = Instant::now();
            get(p_counter).await?;
            lat.push(ms(t));
        }
        sec.add(
            "request_ms",
            "HTTP request over a port forward (connect, GET, close)",
            "ms",
            lat,
        );
    }

    let n = ctx.cfg.stream_mib;
    let mut tput = Vec::new();
    for _ in 0..ctx.cfg.runs {
        let t = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", p_bulk)).await?;
        s.write_all(format!("{}\n", n * 16).as_bytes()).await?;
        let mut buf = vec![0u8; 256 << 10];
        let mut total = 0u64;
        loop {
            let k = tokio::time::timeout(crate::ctx::TRANSFER_IDLE, s.read(&mut buf))
                .await
                .context("bulk read timed out")??;
            if k == 0 {
                break;
            }
            total += k as u64;
        }
        let secs = t.elapsed().as_secs_f64();
        if total != u64::from(n) << 20 {
            bail!("bulk transfer: got {total} bytes, wanted {} MiB", n);
        }
        tput.push(mib(total) / secs);
    }
    let (key, label) = match network {
        NetworkMode::Nat => ("download_mib_s", String::new()),
        NetworkMode::NatHost => (
            "download_nat_host_mib_s",
            ", --network nat-host".to_string(),
        ),
        NetworkMode::None => ("download_none_mib_s", ", --network none".to_string()),
    };
    sec.add(
        key,
        &format!("port-forward download throughput ({n} MiB{label})"),
        "MiB/s",
        tput,
    );
    Ok(())
}

/// One HTTP request to the counter; its answer.
async fn get(port: u16) -> Result<u64> {
    let fut = async {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
        let mut body = String::new();
        s.read_to_string(&mut body).await?;
        body.split("\r\n\r\n")
            .nth(1)
            .and_then(|b| b.trim().parse().ok())
            .with_context(|| format!("bad answer {body:?}"))
    };
    tokio::time::timeout(crate::ctx::REQUEST_TIMEOUT, fut)
        .await
        .context("request timed out")?
}
