//! `machinen provision [--base TAR] [--run CMD]… [--copy HOST:GUEST]… [--env K=V]… [--cwd /abs] [--cmd CMD | -- ARGV…] -o OUT`

use std::io::IsTerminal;
use std::time::Duration;

use clap::CommandFactory;
use machinen::progress::ProgressMode;
use machinen::provision::{
    run_step, CopySpec, InstallHook, ProvisionOptions, ProvisionResult, Step,
};
use machinen::vm::parse_env_pair;
use machinen::Result;

use crate::cli::{ordered_steps, Cli, ProvisionArgs, StepArg};
use crate::output::{print_error, print_json};

/// `--run`/`--copy` in command-line order. The derive API keeps the two
/// lists apart, so the raw arguments are matched again for their indices;
/// they parsed once already, so they parse again.
fn steps(a: &ProvisionArgs) -> Result<Vec<Step>> {
    let ordered = Cli::command()
        .try_get_matches_from(std::env::args_os())
        .ok()
        .and_then(|m| m.subcommand_matches("provision").map(ordered_steps))
        // Not called from the command line (tests): runs, then copies.
        .unwrap_or_else(|| {
            a.copy
                .iter()
                .cloned()
                .map(StepArg::Copy)
                .chain(a.run.iter().cloned().map(StepArg::Run))
                .collect()
        });
    ordered
        .into_iter()
        .map(|s| match s {
            StepArg::Run(c) => Ok(Step::Run(c)),
            StepArg::Copy(c) => Ok(Step::Copy(CopySpec::parse(&c)?)),
        })
        .collect()
}

fn hook(steps: Vec<Step>, json: bool) -> InstallHook {
    let headers = !json && std::io::stderr().is_terminal();
    Box::new(move |vm, config| {
        Box::pin(async move {
            let n = steps.len();
            for (i, step) in steps.iter().enumerate() {
                if headers {
                    eprintln!("==> [{}/{n}] {step}", i + 1);
                }
                let mut err = tokio::io::stderr();
                if json {
                    // stdout carries the one JSON result.
                    let mut out = tokio::io::stderr();
                    run_step(vm, config, step, &mut out, &mut err).await?;
                } else {
                    let mut out = tokio::io::stdout();
                    run_step(vm, config, step, &mut out, &mut err).await?;
                }
            }
            Ok(())
        })
    })
}

pub(crate) async fn interrupted() -> &'static str {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return "interrupted";
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

fn print_human(r: &ProvisionResult) {
    let s = |ms: u64| format!("{:.1} s", ms as f64 / 1000.0);
    crate::outln!(
        "baked {} ({:.1} MiB, {:.1} MiB unpacked) in {} (boot {}, install {}, export {})",
        r.path.display(),
        r.size as f64 / 1048576.0,
        r.uncompressed_size as f64 / 1048576.0,
        s(r.elapsed_ms),
        s(r.boot_ms),
        s(r.install_ms),
        s(r.export_ms)
    );
    crate::outln!("  sha256 {}", r.sha256);
    match &r.config.cmd {
        Some(cmd) => crate::outln!(
            "  cmd    {}",
            serde_json::to_string(cmd).unwrap_or_default()
        ),
        None => crate::outln!(
            "  cmd    (none: `machinen boot {} -- CMD` must name one)",
            r.path.display()
        ),
    }
    if let Some(cwd) = &r.config.cwd {
        crate::outln!("  cwd    {cwd}");
    }
    for (k, v) in &r.config.env {
        crate::outln!("  env    {k}={v}");
    }
}

/// Where a bake writes: OUT itself, or for a container image as OUT
/// (`oci:…`, `docker-archive:…`) a tarball in the cache that is exported
/// there and removed afterwards (the second value).
pub(crate) fn bake_target(out: &std::path::Path) -> Result<(std::path::PathBuf, Option<String>)> {
    let export_to = out
        .to_str()
        .and_then(machinen::oci::export::Target::parse)
        .map(|_| out.to_string_lossy().into_owned());
    let Some(target) = export_to else {
        return Ok((out.to_path_buf(), None));
    };
    let paths = machinen::Paths::from_env()?;
    std::fs::create_dir_all(&paths.cache).map_err(|e| {
        machinen::error::fail(
            machinen::ErrorCode::ProvisionOutputFailed,
            "cannot create the cache",
        )
        .source(e)
    })?;
    let tarball = paths
        .cache
        .join(format!("bake-export-{}.tar.gz", std::process::id()));
    Ok((tarball, Some(target)))
}

pub async fn run(a: ProvisionArgs) -> Result<i32> {
    let steps = steps(&a)?;
    let env = a
        .process
        .env
        .iter()
        .map(|s| parse_env_pair(s))
        .collect::<Result<Vec<_>, _>>()?;
    let cmd = match (&a.cmd, a.argv.is_empty()) {
        (Some(c), _) => Some(vec!["sh".to_string(), "-c".into(), c.clone()]),
        (None, false) => Some(a.argv.clone()),
        (None, true) => None,
    };
    let (out, export_to) = bake_target(&a.out)?;
    let opts = ProvisionOptions {
        base: a.base.clone(),
        out: out.clone(),
        install: if steps.is_empty() {
            None
        } else {
            Some(hook(steps, a.json))
        },
        cmd,
        env,
        cwd: a.process.cwd.clone(),
        config: None,
        memory_mib: a.vm.memory,
        cpus: a.vm.cpus,
        network: a.vm.network()?,
        boot_timeout: Duration::from_secs(a.vm.boot_timeout),
        progress: if a.json {
            ProgressMode::Quiet
        } else {
            ProgressMode::Auto
        },
        on_phase: crate::output::phase_printer(a.vm.timings),
    };
    // Dropping the bake on a signal removes its temp file and closes the
    // install VM's lifeline (its supervisor stops it): nothing is left.
    let result = tokio::select! {
        r = machinen::provision(opts) => r,
        why = interrupted() => {
            eprintln!("provision {why}; no image was written");
            return Ok(130);
        }
    };
    let result = match (result, &export_to) {
        (Ok(r), Some(target)) => {
            let paths = machinen::Paths::from_env()?;
            let exported = crate::cmd::images::export(&paths, &out, target);
            let _ = std::fs::remove_file(&out);
            let exported = exported?;
            if a.json {
                let mut v = serde_json::to_value(&r).unwrap_or_default();
                v["exported"] = serde_json::to_value(&exported).unwrap_or_default();
                print_json(&v);
            } else {
                print_human(&r);
                crate::outln!(
                    "exported to {} ({})",
                    exported.target,
                    exported.manifest_digest
                );
            }
            return Ok(0);
        }
        (r, _) => r,
    };
    match result {
        Ok(r) => {
            if a.json {
                print_json(&r);
            } else {
                print_human(&r);
            }
            Ok(0)
        }
        Err(machinen::Error::Provision(pe)) if pe.step_status().is_some() => {
            let code = pe.step_status().map(|s| s.shell_code()).unwrap_or(125);
            print_error(&machinen::Error::Provision(pe), a.json);
            Ok(code)
        }
        Err(e) => Err(e),
    }
}
