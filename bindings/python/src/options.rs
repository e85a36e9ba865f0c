//! Options from Python, as JSON built by the Python layer from keyword
//! arguments (snake_case, the library's names). Unknown keys are refused:
//! a misspelt option must not be silently ignored.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use machinen::ErrorCode;
use pyo3::PyResult;
use serde::Deserialize;

use crate::{err, invalid};

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct Policy {
    egress: Option<String>,
    allow: Vec<String>,
    deny: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EgressSecretArg {
    name: String,
    hosts: Vec<String>,
    value: String,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct BootArgs {
    image: Option<String>,
    name: Option<String>,
    hostname: Option<String>,
    memory_mib: Option<u32>,
    cpus: Option<u32>,
    cpu_model: Option<String>,
    network: Option<String>,
    detached: bool,
    boot_timeout: Option<f64>,
    ports: Vec<String>,
    secrets: BTreeMap<String, String>,
    cmd: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    keep_alive_on_exit: bool,
    disk_size: Option<String>,
    net_policy: Option<Policy>,
    egress_secrets: Vec<EgressSecretArg>,
    /// Copy-once mounts: `HOST_DIR:GUEST_PATH`.
    mounts: Vec<String>,
    /// Live mounts: `HOST_DIR:GUEST_PATH[:ro|rw]`.
    live_mounts: Vec<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct RestoreArgs {
    bundle: String,
    name: Option<String>,
    detached: bool,
    ports: Vec<String>,
    boot_timeout: Option<f64>,
    reset_tcp: bool,
    own_ram: bool,
    net_policy: Option<Policy>,
    egress_secrets: Vec<EgressSecretArg>,
    /// CRIU bundles only.
    memory_mib: Option<u32>,
    cpus: Option<u32>,
    cpu_model: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ForkArgs {
    name: Option<String>,
    out_dir: Option<String>,
    tcp_keep: bool,
    detached: bool,
    ports: Vec<String>,
    own_ram: bool,
    net_policy: Option<Policy>,
    egress_secrets: Vec<EgressSecretArg>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ProvisionArgs {
    base: Option<String>,
    out: String,
    run: Vec<String>,
    cmd: Option<Vec<String>>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    memory_mib: Option<u32>,
    network: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct BuildArgs {
    context: String,
    dockerfile: Option<String>,
    out: String,
    build_args: BTreeMap<String, String>,
    no_cache: bool,
    memory_mib: Option<u32>,
    network: Option<String>,
}

/// A `network` option: `nat` (the default), `nat-host` or `none`.
fn network_mode(n: Option<String>, code: ErrorCode) -> PyResult<machinen::spec::NetworkMode> {
    match n {
        None => Ok(Default::default()),
        Some(n) => n.parse().map_err(|_| {
            invalid(
                code,
                format!("unknown network mode {n:?}"),
                "network is \"nat\" (the default), \"nat-host\" or \"none\"",
            )
        }),
    }
}

/// `build()`'s options (JSON from the Python side).
pub fn build(s: &str) -> PyResult<machinen::build::BuildOptions> {
    let a: BuildArgs = parse("build", s, ErrorCode::BuildDockerfileInvalid)?;
    let network = network_mode(a.network, ErrorCode::BootArgsInvalid)?;
    Ok(machinen::build::BuildOptions {
        context: if a.context.is_empty() {
            ".".into()
        } else {
            a.context.into()
        },
        dockerfile: a.dockerfile.map(Into::into),
        out: a.out.into(),
        build_args: a.build_args.into_iter().collect(),
        no_cache: a.no_cache,
        memory_mib: a.memory_mib,
        network,
        progress: machinen::progress::ProgressMode::Quiet,
        step_output: machinen::build::StepOutput::Discard,
        ..Default::default()
    })
}

#[derive(Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct ChangeArgs {
    egress: Option<String>,
    allow: Vec<String>,
    deny: Vec<String>,
    remove: Vec<String>,
    clear: bool,
}

fn parse<T: for<'de> Deserialize<'de>>(what: &str, s: &str, code: ErrorCode) -> PyResult<T> {
    serde_json::from_str(s).map_err(|e| {
        invalid(
            code,
            format!("{what} options: {e}"),
            "see help(machinen) for the keyword arguments",
        )
    })
}

/// Seconds from Python (`None`: no limit or the default).
pub fn secs(s: Option<f64>) -> PyResult<Option<Duration>> {
    match s {
        None => Ok(None),
        Some(v) if v.is_finite() && v >= 0.0 => Ok(Some(Duration::from_secs_f64(v))),
        Some(v) => Err(invalid(
            ErrorCode::BootArgsInvalid,
            format!("{v} is not a number of seconds"),
            "a timeout is a non-negative number of seconds",
        )),
    }
}

fn ports(p: &[String]) -> PyResult<Vec<machinen::registry::PortForward>> {
    p.iter()
        .map(|s| machinen::ports::parse(s).map_err(|f| err(f.into())))
        .collect()
}

fn egress(e: Option<&str>) -> PyResult<Option<machinen::network::Egress>> {
    e.map(|e| {
        e.parse().map_err(|_| {
            invalid(
                ErrorCode::NetworkPolicyInvalid,
                format!("egress {e:?} is neither \"allow\" nor \"deny\""),
                "egress=\"deny\" refuses what no rule allows",
            )
        })
    })
    .transpose()
}

fn policy(p: Option<Policy>) -> PyResult<Option<machinen::network::NetPolicy>> {
    let Some(p) = p else { return Ok(None) };
    Ok(Some(machinen::network::NetPolicy {
        egress: egress(p.egress.as_deref())?.unwrap_or_default(),
        allow: machinen::network::parse_rules("allow", &p.allow).map_err(err)?,
        deny: machinen::network::parse_rules("deny", &p.deny).map_err(err)?,
    }))
}

fn egress_secrets(s: Vec<EgressSecretArg>) -> PyResult<Vec<machinen::network::EgressSecret>> {
    s.into_iter()
        .map(|e| {
            let hosts: Vec<&str> = e.hosts.iter().map(String::as_str).collect();
            machinen::network::EgressSecret::new(&e.name, &hosts, &e.value).map_err(err)
        })
        .collect()
}

pub fn boot(s: &str) -> PyResult<machinen::BootOptions> {
    let a: BootArgs = parse("boot", s, ErrorCode::BootArgsInvalid)?;
    let d = machinen::BootOptions::default();
    let network = network_mode(a.network, ErrorCode::BootArgsInvalid)?;
    let disk_size = match a.disk_size {
        None => None,
        Some(s) => Some(machinen::hostfile::parse_size(&s).ok_or_else(|| {
            invalid(
                ErrorCode::BootArgsInvalid,
                format!("cannot read disk size {s:?}"),
                "give bytes or a size with a unit, e.g. \"4G\"",
            )
        })?),
    };
    Ok(machinen::BootOptions {
        cpu_model: a.cpu_model,
        criu_resume: None,
        image: a.image.map(PathBuf::from),
        name: a.name,
        hostname: a.hostname,
        memory_mib: a.memory_mib,
        cpus: a.cpus.unwrap_or(d.cpus),
        network,
        net_policy: policy(a.net_policy)?.unwrap_or_default(),
        egress_secrets: egress_secrets(a.egress_secrets)?,
        detached: a.detached,
        boot_timeout: secs(a.boot_timeout)?.unwrap_or(d.boot_timeout),
        progress: machinen::progress::ProgressMode::Quiet,
        ports: ports(&a.ports)?,
        secrets: a
            .secrets
            .into_iter()
            .map(|(name, value)| machinen::Secret {
                name,
                value: machinen::SecretValue(value.into_bytes()),
            })
            .collect(),
        disk_size,
        cmd: a.cmd,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        user: a.user,
        keep_alive_on_exit: a.keep_alive_on_exit,
        mounts: a
            .mounts
            .iter()
            .map(|m| {
                m.parse::<machinen::mounts::Mount>()
                    .map_err(|e| err(e.into()))
            })
            .collect::<PyResult<_>>()?,
        live_mounts: a
            .live_mounts
            .iter()
            .map(|m| {
                m.parse::<machinen::live_mounts::LiveMountArg>()
                    .map_err(|e| err(e.into()))
            })
            .collect::<PyResult<_>>()?,
        ..d
    })
}

pub fn restore(s: &str) -> PyResult<machinen::RestoreOptions> {
    let a: RestoreArgs = parse("restore", s, ErrorCode::RestoreBundleInvalid)?;
    let mut o = machinen::RestoreOptions::new(a.bundle);
    o.name = a.name;
    o.detached = a.detached;
    o.ports = ports(&a.ports)?;
    if let Some(t) = secs(a.boot_timeout)? {
        o.boot_timeout = t;
    }
    o.reset_tcp = a.reset_tcp;
    o.own_ram = a.own_ram;
    o.net_policy = policy(a.net_policy)?;
    o.egress_secrets = egress_secrets(a.egress_secrets)?;
    o.progress = machinen::progress::ProgressMode::Quiet;
    o.memory_mib = a.memory_mib;
    o.cpus = a.cpus;
    o.cpu_model = a.cpu_model;
    Ok(o)
}

pub fn fork(s: &str) -> PyResult<machinen::ForkOptions> {
    let a: ForkArgs = parse("fork", s, ErrorCode::BootArgsInvalid)?;
    Ok(machinen::ForkOptions {
        new_name: a.name,
        out_dir: a.out_dir.map(PathBuf::from),
        tcp_keep: a.tcp_keep,
        detached: a.detached,
        ports: ports(&a.ports)?,
        own_ram: a.own_ram,
        net_policy: policy(a.net_policy)?,
        egress_secrets: egress_secrets(a.egress_secrets)?,
        ..Default::default()
    })
}

/// Bake an image: boot the base, run each `run` step (`sh -c`, with the
/// baked env and cwd), export.
pub fn provision(s: &str) -> PyResult<machinen::ProvisionOptions> {
    let a: ProvisionArgs = parse("provision", s, ErrorCode::ProvisionArgsInvalid)?;
    let network = network_mode(a.network, ErrorCode::ProvisionArgsInvalid)?;
    let steps = a.run;
    let install: Option<machinen::provision::InstallHook> = (!steps.is_empty()).then(|| {
        let hook: machinen::provision::InstallHook = Box::new(move |vm, config| {
            Box::pin(async move {
                for step in &steps {
                    let opts = machinen::ExecOptions {
                        rlimits: Vec::new(),
                        argv: vec!["sh".into(), "-c".into(), step.clone()],
                        env: config.env.clone().into_iter().collect(),
                        cwd: config.cwd.clone(),
                        user: None,
                    };
                    let out = vm.exec_timeout(opts, None).await?;
                    let code = out.status.shell_code();
                    if code != 0 {
                        let err = String::from_utf8_lossy(&out.stderr);
                        let tail: String = err
                            .chars()
                            .rev()
                            .take(500)
                            .collect::<Vec<_>>()
                            .into_iter()
                            .rev()
                            .collect();
                        return Err(machinen::error::fail(
                            ErrorCode::ProvisionStepFailed,
                            format!("step {step:?} exited with {code}: {}", tail.trim()),
                        )
                        .hint("the step's stderr ends the message; fix the step and bake again")
                        .into());
                    }
                }
                Ok(())
            })
        });
        hook
    });
    Ok(machinen::ProvisionOptions {
        base: a.base.map(PathBuf::from),
        out: PathBuf::from(a.out),
        install,
        cmd: a.cmd,
        env: a.env.into_iter().collect(),
        cwd: a.cwd,
        config: None,
        memory_mib: a.memory_mib,
        network,
        progress: machinen::progress::ProgressMode::Quiet,
        ..Default::default()
    })
}

pub fn policy_change(s: &str) -> PyResult<machinen::network::PolicyChange> {
    let a: ChangeArgs = parse("set_network", s, ErrorCode::NetworkPolicyInvalid)?;
    Ok(machinen::network::PolicyChange {
        clear: a.clear,
        egress: egress(a.egress.as_deref())?,
        allow: machinen::network::parse_rules("allow", &a.allow).map_err(err)?,
        deny: machinen::network::parse_rules("deny", &a.deny).map_err(err)?,
        remove: machinen::network::parse_rules("remove", &a.remove).map_err(err)?,
    })
}
