//! `machinen build [-f DOCKERFILE] -t OUT [--build-arg K=V]… [CONTEXT]`

use std::io::IsTerminal;
use std::time::Duration;

use machinen::build::{BuildOptions, BuildResult, StepOutput};
use machinen::progress::ProgressMode;
use machinen::Result;

use crate::cli::BuildArgs;
use crate::cmd::provision::{bake_target, interrupted};
use crate::output::{print_error, print_json};

fn print_human(r: &BuildResult) {
    if r.cached {
        crate::outln!(
            "{} from the build cache ({:.1} MiB; nothing changed since it was built)",
            r.path.display(),
            r.size as f64 / 1048576.0
        );
    } else {
        crate::outln!(
            "built {} ({:.1} MiB) from {} in {:.1} s, {} steps",
            r.path.display(),
            r.size as f64 / 1048576.0,
            r.from,
            r.elapsed_ms as f64 / 1000.0,
            r.steps
        );
    }
    crate::outln!("  sha256 {}", r.sha256);
    crate::cmd::images::print_config(&r.config);
    if !r.unused_build_args.is_empty() {
        eprintln!(
            "warning: build args no ARG declares: {}",
            r.unused_build_args.join(", ")
        );
    }
}

pub async fn run(a: BuildArgs) -> Result<i32> {
    let build_args = a
        .build_arg
        .iter()
        .map(|s| {
            s.split_once('=')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                // Docker takes `--build-arg NAME` as "from my environment".
                .or_else(|| std::env::var(s).ok().map(|v| (s.clone(), v)))
                .ok_or_else(|| {
                    machinen::error::fail(
                        machinen::ErrorCode::BuildDockerfileInvalid,
                        format!("--build-arg {s:?} is not NAME=VALUE (and ${s} is not set)"),
                    )
                    .hint("pass --build-arg NAME=VALUE")
                })
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let (out, export_to) = bake_target(&a.tag)?;
    let opts = BuildOptions {
        context: a.context.clone(),
        dockerfile: a.file.clone(),
        out: out.clone(),
        build_args,
        no_cache: a.no_cache,
        memory_mib: a.vm.memory,
        cpus: a.vm.cpus,
        network: a.vm.network()?,
        boot_timeout: Duration::from_secs(a.vm.boot_timeout),
        progress: if a.json {
            ProgressMode::Quiet
        } else {
            ProgressMode::Auto
        },
        step_output: if a.json {
            StepOutput::Stderr
        } else {
            StepOutput::Inherit
        },
        show_steps: !a.json && std::io::stderr().is_terminal(),
        on_phase: crate::output::phase_printer(a.vm.timings),
    };
    // Dropping the build on a signal removes its temp file and stops the
    // build VM (its supervisor sees the lifeline close).
    let result = tokio::select! {
        r = machinen::build::build(opts) => r,
        why = interrupted() => {
            eprintln!("build {why}; no image was written");
            return Ok(130);
        }
    };
    let mut r = match result {
        Ok(r) => r,
        Err(machinen::Error::Provision(pe)) if pe.step_status().is_some() => {
            let code = pe.step_status().map(|s| s.shell_code()).unwrap_or(125);
            print_error(&machinen::Error::Provision(pe), a.json);
            return Ok(code);
        }
        Err(e) => return Err(e),
    };
    let exported = match &export_to {
        Some(target) => {
            let paths = machinen::Paths::from_env()?;
            let exported = crate::cmd::images::export(&paths, &out, target);
            let _ = std::fs::remove_file(&out);
            Some(exported?)
        }
        None => None,
    };
    if exported.is_some() {
        r.path = a.tag.clone();
    }
    if a.json {
        let mut v = serde_json::to_value(&r).unwrap_or_default();
        if let Some(e) = &exported {
            v["exported"] = serde_json::to_value(e).unwrap_or_default();
        }
        print_json(&v);
    } else {
        print_human(&r);
        if let Some(e) = &exported {
            crate::outln!("exported to {} ({})", e.target, e.manifest_digest);
        }
    }
    Ok(0)
}
