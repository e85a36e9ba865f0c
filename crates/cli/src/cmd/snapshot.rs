//! `machinen snapshot`, `restore` and `fork`.

use machinen_proto::timeouts;
use std::time::Duration;

use machinen::error::fail;
use machinen::progress::ProgressMode;
use machinen::{ErrorCode, ForkOptions, RestoreOptions, Result, Vm};

use crate::cli::{ForkArgs, RestoreArgs, SnapshotArgs};
use crate::output::print_json;

fn ports(publish: &[String]) -> Result<Vec<machinen::registry::PortForward>> {
    Ok(publish
        .iter()
        .map(|p| machinen::ports::parse(p))
        .collect::<Result<Vec<_>, _>>()?)
}

/// `--engine`, else `$MACHINEN_SNAPSHOT_ENGINE`, else vmstate: whether it
/// is CRIU.
fn criu_engine(a: &SnapshotArgs) -> Result<bool> {
    let env = std::env::var(machinen_proto::env::SNAPSHOT_ENGINE).ok();
    let (engine, from) = match (&a.engine, &env) {
        (Some(e), _) => (e.as_str(), "--engine"),
        (None, Some(e)) if !e.is_empty() => (e.as_str(), machinen_proto::env::SNAPSHOT_ENGINE),
        _ => ("vmstate", ""),
    };
    let criu = match engine {
        "criu" => true,
        "vmstate" => false,
        "portable" => {
            return Err(fail(
                ErrorCode::SnapshotPortableUnsupported,
                format!(
                    "{from}: the portable engine captures one process, with `machinen capture`"
                ),
            )
            .hint("`machinen capture TARGET PID -o DIR`, then `machinen materialize`")
            .into())
        }
        other => {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!("{from}: {other:?} is not a snapshot engine"),
            )
            .hint("vmstate (the whole VM) or criu (its process tree and disk)")
            .into())
        }
    };
    if !criu && a.pid.is_some() {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            "--pid names the process tree of a CRIU snapshot: add --engine criu",
        )
        .into());
    }
    if criu && a.full {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            "--full is for whole-VM snapshots: a CRIU bundle is always self-contained",
        )
        .into());
    }
    Ok(criu)
}

async fn run_criu(a: SnapshotArgs, vm: Vm, out: std::path::PathBuf) -> Result<i32> {
    let step = if a.json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    }
    .step(format!("dumping {}'s process tree with CRIU", vm.name()));
    let paths = machinen::Paths::from_env()?;
    let report = machinen::criu::snapshot(
        &vm,
        &paths,
        &machinen::criu::SnapshotOptions {
            out,
            keep_alive: a.keep_alive,
            pid: a.pid,
            timeout: Duration::from_secs(a.timeout),
        },
    )
    .await?;
    step.done(format!("CRIU snapshot of {} written", vm.name()));
    if a.json {
        print_json(&report);
    } else {
        crate::outln!(
            "{} -> {} (process {} {}; {:.1} MiB, {:.1} MiB on disk, {:.1} MiB of CRIU images) in {} ms{}",
            vm.name(),
            report.out.display(),
            report.pid,
            report.comm,
            report.bytes as f64 / 1048576.0,
            report.disk_bytes as f64 / 1048576.0,
            report.images_bytes as f64 / 1048576.0,
            report.elapsed_ms,
            if a.keep_alive {
                "; it runs on"
            } else {
                "; the VM has stopped"
            }
        );
    }
    Ok(0)
}

pub async fn run(a: SnapshotArgs) -> Result<i32> {
    let criu = criu_engine(&a)?;
    let vm = machinen::attach(&a.target).await?;
    let out = if a.out.is_absolute() {
        a.out.clone()
    } else {
        std::env::current_dir()?.join(&a.out)
    };
    if a.dry_run {
        if out.exists() {
            return Err(machinen::bundle::BundleError::Exists { path: out }.into());
        }
        let st = vm.status().await?;
        if a.json {
            print_json(
                &serde_json::json!({"dry_run": true, "name": vm.name(), "state": st.state, "out": out, "keep_alive": a.keep_alive}),
            );
        } else {
            crate::outln!(
                "would snapshot {} ({}) into {}{}",
                vm.name(),
                st.state,
                out.display(),
                if a.keep_alive {
                    ", keeping it running"
                } else {
                    ", then stop it"
                }
            );
        }
        return Ok(0);
    }
    if criu {
        return run_criu(a, vm, out).await;
    }
    let step = if a.json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    }
    .step(format!("snapshotting {}", vm.name()));
    let report = vm
        .snapshot_full(&out, a.keep_alive, Duration::from_secs(a.timeout), a.full)
        .await?;
    step.done(format!("snapshot of {} written", vm.name()));
    if a.timings {
        report.phases.iter().for_each(crate::output::print_phase);
    }
    if a.json {
        print_json(&report);
    } else {
        crate::outln!(
            "{} -> {} ({:.1} MiB, {:.1} MiB on disk) in {} ms, paused {} ms{}",
            vm.name(),
            report.out,
            report.bytes as f64 / 1048576.0,
            report.disk_bytes as f64 / 1048576.0,
            report.elapsed_ms,
            report.paused_ms,
            if a.keep_alive {
                ""
            } else {
                "; the VM has stopped"
            }
        );
    }
    Ok(0)
}

/// A restored or forked VM as JSON: its identity plus the time to ready.
fn vm_json(vm: &Vm) -> serde_json::Value {
    let mut v = serde_json::to_value(vm.info()).unwrap_or_default();
    v["ready_ms"] = vm.boot_ms().into();
    v["phases"] = serde_json::to_value(vm.phases()).unwrap_or_default();
    v
}

/// After a restore or fork: run the command (then remove the VM), or print
/// the VM's identity.
async fn finish(
    vm: Vm,
    cmd: Vec<String>,
    process: &crate::cli::ProcessArgs,
    json: bool,
    what: &str,
) -> Result<i32> {
    if cmd.is_empty() {
        if json {
            print_json(&vm_json(&vm));
        } else {
            crate::outln!(
                "{} (pid {}) {what} in {} ms",
                vm.name(),
                vm.pid(),
                vm.boot_ms().unwrap_or(0)
            );
        }
        // A detached VM outlives us; a foreground one without a command has
        // nothing to do (refused before starting).
        let _ = vm.into_info();
        return Ok(0);
    }
    let exec = super::exec::exec_options(process, cmd)?;
    let result = super::exec::run_in(&vm, exec, json).await;
    let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
    result
}

/// Secrets are never in a bundle: the caller hands them to the new VM.
async fn supply_secrets(vm: &Vm, secrets: &[machinen::Secret]) -> Result<()> {
    if secrets.is_empty() {
        return Ok(());
    }
    if let Err(e) = vm.set_secrets(secrets).await {
        if let Ok(handle) = machinen::attach(vm.name()).await {
            let _ = handle.stop(true, timeouts::CLEANUP_STOP).await;
        }
        return Err(e);
    }
    Ok(())
}

/// Neither a command nor `--detached`: the new VM gets an interactive
/// shell (as `fork` without `--detach` in the reference runtime), and
/// stops when the shell exits. Returns whether that is the case.
fn interactive_shell(cmd: &[String], detached: bool, json: bool) -> Result<bool> {
    let interactive = cmd.is_empty() && !detached;
    if interactive && json {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            "--json needs --detached or a command: without them an interactive shell is opened",
        )
        .hint("add --detached (then `machinen attach NAME`), or a command after `--`")
        .into());
    }
    if !interactive {
        need_command_or_detach(cmd, detached)?;
    }
    Ok(interactive)
}

/// Open a login shell on `vm` (a guest pty on this terminal), then stop the
/// VM: it was started for this session. Returns the shell's status.
async fn shell_then_stop(vm: Vm, process: &crate::cli::ProcessArgs, what: &str) -> Result<i32> {
    eprintln!(
        "{} (pid {}) {what}; opening a shell in it. The VM stops when the shell exits (--detached keeps it running).",
        vm.name(),
        vm.pid()
    );
    let mut opts = super::exec::exec_options(process, super::attach::shell_argv(None))?;
    if opts.cwd.is_none() {
        opts.cwd = Some("/root".into());
    }
    let result = super::exec::run_tty(&vm, opts).await;
    let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
    result
}

fn need_command_or_detach(cmd: &[String], detached: bool) -> Result<()> {
    if cmd.is_empty() && !detached {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            "nothing to run: give a command after `--`, or --detached",
        )
        .hint("e.g. `--detached`, then `machinen exec NAME -- CMD`")
        .into());
    }
    if !cmd.is_empty() && detached {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            "a command cannot be combined with --detached",
        )
        .into());
    }
    Ok(())
}

pub async fn restore(a: RestoreArgs) -> Result<i32> {
    if a.dry_run && machinen::criu::is_bundle(&a.bundle) {
        let b = a.bundle.clone();
        let meta = tokio::task::spawn_blocking(move || machinen::criu::check_bundle(&b))
            .await
            .map_err(|e| fail(ErrorCode::Io, "bundle check failed").source(e))??;
        if a.json {
            print_json(&serde_json::json!({"dry_run": true, "bundle": a.bundle, "meta": meta}));
        } else {
            crate::outln!(
                "{} is a valid CRIU bundle of {:?} (process {} {}) taken at {} ms; a fresh VM of its image resumes it",
                a.bundle.display(),
                meta.source_name,
                meta.pid,
                meta.comm,
                meta.snapped_at_ms
            );
        }
        return Ok(0);
    }
    if a.dry_run {
        let meta = machinen::restore::check_bundle(&a.bundle).await?;
        if a.json {
            print_json(&serde_json::json!({"dry_run": true, "bundle": a.bundle, "meta": meta}));
        } else {
            crate::outln!(
                "{} is a valid bundle of {:?} taken at {} ms; this host can resume it",
                a.bundle.display(),
                meta.source_name,
                meta.snapped_at_ms
            );
        }
        return Ok(0);
    }
    let interactive = interactive_shell(&a.cmd, a.detached, a.json)?;
    let mut o = RestoreOptions::new(&a.bundle);
    o.name = a.name.clone();
    o.image = a.image.clone();
    o.ports = ports(&a.publish)?;
    o.detached = a.detached;
    o.boot_timeout = Duration::from_secs(a.boot_timeout);
    o.reset_tcp = a.tcp_reset;
    o.own_ram = a.own_ram;
    o.memory_mib = a.memory;
    o.cpus = a.cpus;
    o.cpu_model = a.cpu_model.clone();
    o.live_mounts = live_mounts(&a.live_mounts)?;
    o.free_memory_threshold = a.free_memory_threshold.parse()?;
    o.net_policy = a
        .net_policy
        .given()
        .then(|| a.net_policy.policy())
        .transpose()?;
    o.egress_secrets = a.net_policy.egress_secrets()?;
    o.progress = if a.json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    };
    let secrets = a.secrets.parse()?;
    o.on_phase = crate::output::phase_printer(a.timings);
    let vm = machinen::restore(o).await?;
    supply_secrets(&vm, &secrets).await?;
    if interactive {
        return shell_then_stop(vm, &a.process, "restored").await;
    }
    finish(vm, a.cmd, &a.process, a.json, "restored").await
}

/// `--mount-live` values (boot, restore, fork).
pub(crate) fn live_mounts(
    args: &[String],
) -> Result<Vec<machinen::live_mounts::LiveMountArg>, machinen::Failure> {
    args.iter().map(|m| m.parse()).collect()
}

pub async fn fork(a: ForkArgs) -> Result<i32> {
    let interactive = a.count <= 1 && interactive_shell(&a.cmd, a.detach, a.json)?;
    if !interactive {
        need_command_or_detach(&a.cmd, a.detach)?;
    }
    let opts = ForkOptions {
        new_name: a.new_name.clone(),
        out_dir: a.out_dir.clone(),
        tcp_keep: a.tcp_keep,
        detached: a.detach,
        ports: ports(&a.publish)?,
        own_ram: a.own_ram,
        live_mounts: live_mounts(&a.live_mounts)?,
        free_memory_threshold: a.free_memory_threshold.parse()?,
        on_phase: crate::output::phase_printer(a.timings),
        net_policy: a
            .net_policy
            .given()
            .then(|| a.net_policy.policy())
            .transpose()?,
        egress_secrets: a.net_policy.egress_secrets()?,
    };
    machinen::restore::check_fork_many(&opts, a.count)?;
    if a.count > 1 && !a.detach {
        return Err(fail(
            ErrorCode::BootArgsInvalid,
            format!(
                "--count {} makes several forks: it needs --detach and no command",
                a.count
            ),
        )
        .hint("fork with --detach, then `machinen exec NAME -- CMD` in each")
        .into());
    }
    let src = machinen::attach(&a.target).await?;
    let secrets = a.secrets.parse()?;
    if a.count > 1 {
        return fork_siblings(&src, opts, a.count, &secrets, a.json).await;
    }
    let (vm, report) = src.fork(opts).await?;
    supply_secrets(&vm, &secrets).await?;
    if !a.json && a.cmd.is_empty() {
        eprintln!(
            "source {} was paused {} ms",
            src.name(),
            report.snapshot.paused_ms
        );
    }
    if interactive {
        return shell_then_stop(vm, &a.process, "forked").await;
    }
    finish(vm, a.cmd, &a.process, a.json, "forked").await
}

/// `fork --count N` (N > 1, detached): N siblings from one snapshot.
async fn fork_siblings(
    src: &Vm,
    opts: ForkOptions,
    count: usize,
    secrets: &[machinen::Secret],
    json: bool,
) -> Result<i32> {
    let (vms, report) = src.fork_many(opts, count).await?;
    for (i, vm) in vms.iter().enumerate() {
        if let Err(e) = supply_secrets(vm, secrets).await {
            // That fork is gone already; do not leave its siblings half set up.
            for (j, other) in vms.into_iter().enumerate() {
                if j != i {
                    let _ = other.stop(true, timeouts::CLEANUP_STOP).await;
                }
            }
            return Err(e);
        }
    }
    if json {
        print_json(&vms.iter().map(vm_json).collect::<Vec<_>>());
    } else {
        eprintln!(
            "source {} was paused {} ms",
            src.name(),
            report.snapshot.paused_ms
        );
        for vm in &vms {
            crate::outln!(
                "{} (pid {}) forked in {} ms",
                vm.name(),
                vm.pid(),
                vm.boot_ms().unwrap_or(0)
            );
        }
    }
    for vm in vms {
        // Detached: they outlive us.
        let _ = vm.into_info();
    }
    Ok(0)
}
