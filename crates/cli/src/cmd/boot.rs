//! `machinen boot [IMAGE] [opts] [-- CMD…]`

use machinen_proto::timeouts;
use std::time::Duration;

use machinen::error::fail;
use machinen::progress::ProgressMode;
use machinen::vm::{parse_env_pair, ExecOptions};
use machinen::{BootOptions, ErrorCode, Result};

use crate::cli::BootArgs;
use crate::output::print_json;

/// `config` with `--entrypoint` applied, as Docker does: the program
/// replaces the entrypoint and the image's command (arguments given after
/// `--` then go to it); an empty one leaves the arguments alone.
fn with_entrypoint(
    mut config: machinen::provision::ImageConfig,
    entrypoint: Option<&str>,
) -> machinen::provision::ImageConfig {
    if let Some(ep) = entrypoint {
        let ep: Option<Vec<String>> = (!ep.is_empty()).then(|| vec![ep.to_string()]);
        config.cmd = ep.clone();
        config.entrypoint = ep;
    }
    config
}

/// What a foreground boot runs: the command after `--`, else the image's
/// baked one (`machinen provision`); the baked env and cwd apply, with
/// `--env` overriding single keys and `--cwd` the directory.
fn foreground_exec(a: &BootArgs) -> Result<ExecOptions> {
    let progress = if a.json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    };
    // The installed base (no IMAGE) is made by `machinen install` and has no baked config.
    let config = match &a.image {
        Some(img) => machinen::provision::image_config(Some(img), progress)?
            .map(|c| with_entrypoint(c, a.entrypoint.as_deref())),
        None => None,
    };
    let Some(config) = config else {
        if a.cmd.is_empty() {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                "nothing to run: give a command after `--`, or --detached",
            )
            .hint("e.g. `machinen boot -- uname -a`, or `machinen boot --name web --detached`")
            .into());
        }
        return super::exec::exec_options(&a.process, a.cmd.clone());
    };
    let env = a
        .process
        .env
        .iter()
        .map(|s| parse_env_pair(s))
        .collect::<Result<Vec<_>, _>>()?;
    let argv = if a.cmd.is_empty() {
        None
    } else {
        Some(a.cmd.clone())
    };
    let mut opts = config.exec_options(argv, &env, a.process.cwd.clone())?;
    if let Some(u) = &a.process.user {
        machinen::vm::check_user(u)?;
        opts.user = Some(u.clone());
    }
    Ok(opts)
}

/// What a detached boot runs as the VM's main command: the command after
/// `--`, else the image's baked one (env and cwd as for a foreground boot);
/// `None` (a VM that just stays up) when there is neither.
fn main_command(a: &BootArgs) -> Result<Option<ExecOptions>> {
    let baked = match &a.image {
        Some(img) if a.cmd.is_empty() => {
            let progress = if a.json {
                ProgressMode::Quiet
            } else {
                ProgressMode::Auto
            };
            machinen::provision::image_config(Some(img), progress)?
                .map(|c| with_entrypoint(c, a.entrypoint.as_deref()))
                .filter(|c| c.cmd.as_ref().is_some_and(|v| !v.is_empty()))
                .is_some()
        }
        _ => false,
    };
    if a.cmd.is_empty() && !baked {
        if a.keep_alive_on_exit {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                "--keep-alive-on-exit needs a main command (after `--`, or baked into the image)",
            )
            .into());
        }
        return Ok(None);
    }
    foreground_exec(a).map(Some)
}

pub async fn run(a: BootArgs) -> Result<i32> {
    // Check the command before paying for a boot.
    let (exec, main) = if a.detached {
        (None, main_command(&a)?)
    } else {
        (Some(foreground_exec(&a)?), None)
    };
    let ports = a
        .publish
        .iter()
        .map(|p| machinen::ports::parse(p))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = BootOptions {
        main_stdin: false,
        rlimits: Vec::new(),
        hostname: a.hostname.clone(),
        image: a.image.clone(),
        name: a.name.clone(),
        memory_mib: a.memory,
        cpus: a.cpus,
        cpu_model: a.cpu_model.clone(),
        criu_resume: None,
        network: a
            .network
            .parse()
            .map_err(|e: String| fail(ErrorCode::BootArgsInvalid, e))?,
        net_policy: a.net_policy.policy()?,
        egress_secrets: a.net_policy.egress_secrets()?,
        detached: a.detached,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        accel: None,
        debug: a.debug,
        progress: if a.json {
            ProgressMode::Quiet
        } else {
            ProgressMode::Auto
        },
        ports,
        secrets: a.secrets.parse()?,
        disk_size: a.disk_size,
        nested: a.nested,
        cmd: main.as_ref().map(|m| m.argv.clone()).unwrap_or_default(),
        env: main.as_ref().map(|m| m.env.clone()).unwrap_or_default(),
        cwd: main.as_ref().and_then(|m| m.cwd.clone()),
        user: main.as_ref().and_then(|m| m.user.clone()),
        keep_alive_on_exit: a.keep_alive_on_exit,
        on_phase: crate::output::phase_printer(a.timings),
        mounts: a
            .mounts
            .iter()
            .map(|m| m.parse())
            .collect::<Result<_, _>>()?,
        mount_upper_size: a.mount_upper_size,
        live_mounts: crate::cmd::snapshot::live_mounts(&a.live_mounts)?,
        balloon: !a.no_balloon,
    };
    let vm = machinen::boot(opts).await?;
    match exec {
        None => {
            if a.json {
                let mut v = serde_json::to_value(vm.info()).unwrap_or_default();
                v["boot_ms"] = vm.boot_ms().into();
                v["phases"] = serde_json::to_value(vm.phases()).unwrap_or_default();
                print_json(&v);
            } else if main.is_some() {
                crate::outln!("{} (pid {}) runs its main command; `machinen logs -f {}` shows its output, `machinen wait {}` waits for its exit", vm.name(), vm.pid(), vm.name(), vm.name());
            } else {
                crate::outln!("{} (pid {}) is running; `machinen exec {} -- CMD` to use it, `machinen stop {}` to stop it", vm.name(), vm.pid(), vm.name(), vm.name());
            }
            Ok(0)
        }
        Some(exec) => {
            // On a terminal the command gets a pty of its own (keys, job
            // control, window size); otherwise separate stdout and stderr.
            let result = if !a.json && machinen::terminal::interactive_stdio() {
                super::exec::run_tty(&vm, exec).await
            } else {
                super::exec::run_in(&vm, exec, a.json).await
            };
            // The VM is disposable: no graceful guest shutdown needed.
            let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
            result
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entrypoint_replaces_the_images_and_its_command() {
        let c = machinen::provision::ImageConfig {
            cmd: Some(vec!["perl".into(), "/srv/app.pl".into()]),
            entrypoint: Some(vec!["perl".into()]),
            ..Default::default()
        };
        let e = with_entrypoint(c.clone(), Some("/bin/sh"));
        assert_eq!(e.cmd.as_deref(), Some(&["/bin/sh".to_string()][..]));
        let args = e
            .exec_options(Some(vec!["-c".into(), "true".into()]), &[], None)
            .expect("opts");
        assert_eq!(args.argv, ["/bin/sh", "-c", "true"]);
        let none = with_entrypoint(c.clone(), Some(""));
        assert!(none.cmd.is_none() && none.entrypoint.is_none());
        assert_eq!(with_entrypoint(c.clone(), None), c);
    }
}
