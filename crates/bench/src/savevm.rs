//! The baseline a user could pick instead: QEMU's own internal snapshots
//! (`savevm`/`loadvm` over QMP's human-monitor-command) of the same guest —
//! our kernel, initramfs and agent, a qcow2 overlay of the cached base
//! image — in a QEMU we start ourselves without the supervisor. Its boot to
//! agent-ready is reported too: our cold boot minus everything machinen
//! adds around QEMU.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use futures::StreamExt;
use qapi::futures::QmpStreamTokio;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::ctx::{qemu_binary, Ctx};
use crate::qemu::{connect_retry, Guest};
use crate::stats::{mib, ms, Section};
use machinen::spec::files;

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let guest = ctx.guest().await?.clone();
    let mut boots = Vec::new();
    // Every boot gets a fresh overlay, as a machinen VM does; the last one
    // is snapshotted.
    for i in 0..ctx.cfg.runs {
        let last = i + 1 == ctx.cfg.runs;
        boots.push(one_vm(ctx, &guest, sec, last).await?);
    }
    sec.add(
        "boot_to_agent_ms",
        "same guest in bare QEMU (no supervisor): start to agent-ready",
        "ms",
        boots,
    );
    Ok(())
}

/// Boot the guest in our own QEMU; returns ms to agent-ready. With
/// `savevm`, then time savevm/loadvm into `sec`.
async fn one_vm(ctx: &Ctx, guest: &Guest, sec: &mut Section, savevm: bool) -> Result<f64> {
    let dir = ctx.path("sv");
    guest.prepare(&dir)?;
    let overlay = dir.join(files::DISK);
    let (qmp_path, agent_path) = (dir.join(files::QMP), dir.join(files::AGENT));
    let (args, ram) = guest.args_in(&dir);
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(qemu_binary())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting QEMU")?;
    let r = measure(
        ctx,
        sec,
        &mut child,
        t0,
        &qmp_path,
        &agent_path,
        &overlay,
        savevm,
    )
    .await;
    let _ = child.start_kill();
    let _ = child.wait().await;
    let log = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
    let _ = std::fs::remove_dir_all(&dir);
    for f in &ram {
        let _ = std::fs::remove_file(f);
    }
    r.map_err(|e| {
        if log.trim().is_empty() {
            e
        } else {
            e.context(format!("qemu.log: {}", log.trim()))
        }
    })
}

fn sizes(p: &Path) -> Result<(u64, u64)> {
    let m = std::fs::metadata(p)?;
    Ok((m.len(), m.blocks() * 512))
}

#[allow(clippy::too_many_arguments)]
async fn measure(
    ctx: &Ctx,
    sec: &mut Section,
    child: &mut tokio::process::Child,
    t0: Instant,
    qmp_path: &Path,
    agent_path: &Path,
    overlay: &Path,
    savevm: bool,
) -> Result<f64> {
    let qmp = connect_retry(qmp_path, crate::ctx::REQUEST_TIMEOUT, child).await?;
    let stream = QmpStreamTokio::open(qmp)
        .await
        .context("QMP greeting")?
        .negotiate()
        .await
        .context("QMP negotiation")?;
    let (qmp, mut events) = stream.into_parts();
    tokio::spawn(async move { while let Some(Ok(_)) = events.next().await {} });

    // Agent-ready: the agent answers the session preamble once it serves.
    let mut agent = connect_retry(agent_path, crate::ctx::REQUEST_TIMEOUT, child).await?;
    let nonce = format!(
        "{:016x}",
        t0.elapsed().as_nanos() as u64 ^ u64::from(std::process::id())
    );
    agent
        .write_all(machinen_proto::preamble::hello(&nonce).as_bytes())
        .await?;
    let want = machinen_proto::preamble::ready(&nonce);
    let ready = tokio::time::timeout(crate::ctx::BOOT_TIMEOUT, async {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        loop {
            if agent.read(&mut b).await? == 0 {
                bail!("the agent socket closed");
            }
            line.push(b[0]);
            if b[0] == b'\n' {
                if line == want.as_bytes() {
                    return Ok(());
                }
                line.clear();
            }
        }
    })
    .await;
    match ready {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!("the guest agent did not answer within 180 s"),
    }
    let boot_ms = ms(t0);
    drop(agent);
    if !savevm {
        return Ok(boot_ms);
    }
    tokio::time::sleep(crate::ctx::SETTLE).await;

    let hmp = |line: &str| {
        let cmd = qapi::qmp::human_monitor_command {
            command_line: line.to_string(),
            cpu_index: None,
        };
        let line = line.to_string();
        let fut = qmp.execute(cmd);
        async move {
            let out = tokio::time::timeout(crate::ctx::SNAPSHOT_TIMEOUT, fut)
                .await
                .with_context(|| format!("`{line}` timed out"))?
                .with_context(|| format!("`{line}`"))?;
            // HMP reports failures as text, not as a QMP error.
            if !out.trim().is_empty() {
                bail!("`{line}`: {}", out.trim());
            }
            Ok::<(), anyhow::Error>(())
        }
    };
    let (len0, disk0) = sizes(overlay)?;
    let (mut save, mut load, mut grow, mut grow_disk) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ctx.cfg.runs {
        let t = Instant::now();
        hmp("savevm bench").await?;
        save.push(ms(t));
        let (len, disk) = sizes(overlay)?;
        grow.push(mib(len.saturating_sub(len0)));
        grow_disk.push(mib(disk.saturating_sub(disk0)));
        let t = Instant::now();
        hmp("loadvm bench").await?;
        load.push(ms(t));
    }
    sec.add(
        "savevm_ms",
        "QEMU savevm (internal qcow2 snapshot), idle VM",
        "ms",
        save,
    );
    sec.add("loadvm_ms", "QEMU loadvm, idle VM", "ms", load);
    sec.add(
        "qcow2_growth_mib",
        "qcow2 growth after savevm: apparent",
        "MiB",
        grow,
    );
    sec.add(
        "qcow2_growth_disk_mib",
        "qcow2 growth after savevm: on disk",
        "MiB",
        grow_disk,
    );
    let _ = tokio::time::timeout(crate::ctx::QUIT_TIMEOUT, qmp.execute(qapi::qmp::quit {})).await;
    Ok(boot_ms)
}
