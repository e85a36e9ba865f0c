//! The options objects JS passes, and their mapping onto the library's
//! option structs. Field names become camelCase in JS (`memoryMib`).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use machinen::ErrorCode;
use napi::Result;
use napi_derive::napi;

use crate::invalid;

#[napi(object)]
#[derive(Default)]
pub struct BootOpts {
    pub image: Option<String>,
    pub name: Option<String>,
    /// The guest's hostname (default: the name's last segment).
    pub hostname: Option<String>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    /// The CPU model the guest sees (QEMU's `-cpu`).
    pub cpu_model: Option<String>,
    /// `nat` (default), `nat-host` or `none`.
    pub network: Option<String>,
    pub detached: Option<bool>,
    pub boot_timeout_ms: Option<u32>,
    pub accel: Option<String>,
    pub debug: Option<bool>,
    /// `[HOST_ADDR:]HOST_PORT:GUEST_PORT`, as `-p` takes them.
    pub ports: Option<Vec<String>>,
    pub secrets: Option<HashMap<String, String>>,
    /// Bytes, or a size with a unit (`4G`).
    pub disk_size: Option<String>,
    pub nested: Option<bool>,
    /// The VM's main command (a service VM).
    pub cmd: Option<Vec<String>>,
    pub env: Option<HashMap<String, String>>,
    pub cwd: Option<String>,
    /// Who the main command runs as.
    pub user: Option<String>,
    pub keep_alive_on_exit: Option<bool>,
    /// Copy-once mounts (`--mount`).
    pub mounts: Option<Vec<MountOpt>>,
    /// Room for the guest's writes to them, in bytes.
    pub mount_upper_size: Option<f64>,
    /// `false`: no balloon (`--no-balloon`).
    pub balloon: Option<bool>,
    /// Host directories shared live (`--mount-live`).
    pub live_mounts: Option<Vec<LiveMountOpt>>,
    /// What the guest may reach (`--egress`, `--allow-net`, `--deny-net`).
    pub net_policy: Option<NetPolicyOpt>,
    /// Credentials the guest never holds (`--egress-secret`).
    pub egress_secrets: Option<Vec<EgressSecretOpt>>,
}

/// An egress policy: `egress` (`"allow"`, the default, or `"deny"`) for
/// destinations no rule matches, and rules as the CLI takes them.
#[napi(object)]
#[derive(Default)]
pub struct NetPolicyOpt {
    pub egress: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
}

/// A change to a running VM's policy (`machinen network`).
#[napi(object)]
#[derive(Default)]
pub struct NetChangeOpt {
    pub egress: Option<String>,
    pub allow: Option<Vec<String>>,
    pub deny: Option<Vec<String>>,
    pub remove: Option<Vec<String>>,
    pub clear: Option<bool>,
}

fn egress(e: Option<String>) -> Result<Option<machinen::network::Egress>> {
    e.map(|s| {
        s.parse().map_err(|m: String| {
            invalid(
                ErrorCode::NetworkPolicyInvalid,
                m,
                "egress is \"allow\" or \"deny\"",
            )
        })
    })
    .transpose()
}

/// A credential the guest never holds: `$name` in the guest is a
/// placeholder, which the egress proxy replaces with `value` in the headers
/// of HTTPS requests to `hosts` (`*.DOMAIN` for every name below one).
#[napi(object)]
pub struct EgressSecretOpt {
    pub name: String,
    pub hosts: Vec<String>,
    pub value: String,
}

fn egress_secrets(s: Option<Vec<EgressSecretOpt>>) -> Result<Vec<machinen::network::EgressSecret>> {
    s.unwrap_or_default()
        .into_iter()
        .map(|e| {
            let hosts: Vec<&str> = e.hosts.iter().map(String::as_str).collect();
            machinen::network::EgressSecret::new(&e.name, &hosts, &e.value).map_err(crate::js_error)
        })
        .collect()
}

fn rules(what: &str, r: Option<Vec<String>>) -> Result<Vec<machinen::network::Rule>> {
    machinen::network::parse_rules(what, &r.unwrap_or_default()).map_err(crate::js_error)
}

impl NetPolicyOpt {
    pub fn into_lib(self) -> Result<machinen::network::NetPolicy> {
        Ok(machinen::network::NetPolicy {
            egress: egress(self.egress)?.unwrap_or_default(),
            allow: rules("allow", self.allow)?,
            deny: rules("deny", self.deny)?,
        })
    }
}

impl NetChangeOpt {
    pub fn into_lib(self) -> Result<machinen::network::PolicyChange> {
        Ok(machinen::network::PolicyChange {
            clear: self.clear.unwrap_or(false),
            egress: egress(self.egress)?,
            allow: rules("allow", self.allow)?,
            deny: rules("deny", self.deny)?,
            remove: rules("remove", self.remove)?,
        })
    }
}

/// A host directory copied into the VM at `guest`.
#[napi(object)]
pub struct MountOpt {
    pub host: String,
    pub guest: String,
}

/// A host directory shared with the VM at `guest`; `readonly` refuses
/// guest writes (on a restore or fork, unset keeps the recorded mode).
#[napi(object)]
pub struct LiveMountOpt {
    pub host: String,
    pub guest: String,
    pub readonly: Option<bool>,
}

fn live_mounts(l: Option<Vec<LiveMountOpt>>) -> Vec<machinen::live_mounts::LiveMountArg> {
    l.unwrap_or_default()
        .into_iter()
        .map(|m| machinen::live_mounts::LiveMountArg {
            host: PathBuf::from(m.host),
            guest: m.guest,
            readonly: m.readonly,
        })
        .collect()
}

#[napi(object)]
#[derive(Default)]
pub struct RestoreOpts {
    pub bundle: String,
    pub name: Option<String>,
    pub image: Option<String>,
    pub ports: Option<Vec<String>>,
    pub detached: Option<bool>,
    pub boot_timeout_ms: Option<u32>,
    pub reset_tcp: Option<bool>,
    pub verify: Option<bool>,
    pub own_ram: Option<bool>,
    /// `"1%"`, `"512M"`, bytes as a string; `"0"` turns the check off.
    pub free_memory_threshold: Option<String>,
    /// Serve the snapshot's live mounts at these guest paths from other
    /// host directories.
    pub live_mounts: Option<Vec<LiveMountOpt>>,
    /// Replace the bundle's egress policy.
    pub net_policy: Option<NetPolicyOpt>,
    /// Values for the bundle's egress secrets (bundles never hold them).
    pub egress_secrets: Option<Vec<EgressSecretOpt>>,
    /// CRIU bundles only: the new VM's memory, CPUs and CPU model.
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub cpu_model: Option<String>,
}

#[napi(object)]
#[derive(Default)]
pub struct ForkOpts {
    pub name: Option<String>,
    pub out_dir: Option<String>,
    pub tcp_keep: Option<bool>,
    pub detached: Option<bool>,
    pub ports: Option<Vec<String>>,
    pub own_ram: Option<bool>,
    pub free_memory_threshold: Option<String>,
    /// Serve the fork's live mounts at these guest paths from other host
    /// directories (default: the source's).
    pub live_mounts: Option<Vec<LiveMountOpt>>,
    /// The forks' egress policy (default: the source's).
    pub net_policy: Option<NetPolicyOpt>,
    /// Values for the source's egress secrets.
    pub egress_secrets: Option<Vec<EgressSecretOpt>>,
}

#[napi(object)]
#[derive(Default)]
pub struct ExecOpts {
    pub argv: Vec<String>,
    pub env: Option<HashMap<String, String>>,
    pub cwd: Option<String>,
    /// Run as this user (`NAME`, `UID`, `NAME:GROUP`, `UID:GID`).
    pub user: Option<String>,
    /// The command's process group is killed after this long
    /// (`EXEC_TIMEOUT`).
    pub timeout_ms: Option<u32>,
}

#[napi(object)]
#[derive(Default)]
pub struct ProvisionOpts {
    pub base: Option<String>,
    pub out: String,
    pub cmd: Option<Vec<String>>,
    pub env: Option<HashMap<String, String>>,
    pub cwd: Option<String>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub network: Option<String>,
    pub boot_timeout_ms: Option<u32>,
}

fn pairs(m: Option<HashMap<String, String>>) -> Vec<(String, String)> {
    let mut v: Vec<_> = m.unwrap_or_default().into_iter().collect();
    v.sort();
    v
}

fn ports(p: Option<Vec<String>>) -> Result<Vec<machinen::registry::PortForward>> {
    p.unwrap_or_default()
        .iter()
        .map(|s| machinen::ports::parse(s).map_err(|f| crate::js_error(f.into())))
        .collect()
}

pub(crate) fn network(n: Option<String>) -> Result<machinen::spec::NetworkMode> {
    match n {
        None => Ok(Default::default()),
        Some(s) => s.parse().map_err(|_| {
            invalid(
                ErrorCode::BootArgsInvalid,
                format!("unknown network mode {s:?}"),
                "network is \"nat\" (the default), \"nat-host\" or \"none\"",
            )
        }),
    }
}

fn ms(v: Option<u32>, default: Duration) -> Duration {
    v.map(|ms| Duration::from_millis(ms.into()))
        .unwrap_or(default)
}

fn path(p: Option<String>) -> Option<PathBuf> {
    p.map(PathBuf::from)
}

impl BootOpts {
    pub fn into_lib(self) -> Result<machinen::BootOptions> {
        let d = machinen::BootOptions::default();
        let disk_size = match self.disk_size {
            None => None,
            Some(s) => Some(machinen::hostfile::parse_size(&s).ok_or_else(|| {
                invalid(
                    ErrorCode::BootArgsInvalid,
                    format!("cannot read disk size {s:?}"),
                    "give bytes or a size with a unit, e.g. \"4G\"",
                )
            })?),
        };
        let secrets = pairs(self.secrets)
            .into_iter()
            .map(|(name, value)| machinen::Secret {
                name,
                value: machinen::SecretValue(value.into_bytes()),
            })
            .collect();
        Ok(machinen::BootOptions {
            cpu_model: self.cpu_model,
            criu_resume: None,
            main_stdin: false,
            rlimits: Vec::new(),
            image: path(self.image),
            name: self.name,
            hostname: self.hostname,
            memory_mib: self.memory_mib,
            cpus: self.cpus.unwrap_or(d.cpus),
            network: network(self.network)?,
            detached: self.detached.unwrap_or(false),
            boot_timeout: ms(self.boot_timeout_ms, d.boot_timeout),
            accel: self.accel,
            debug: self.debug.unwrap_or(false),
            progress: machinen::progress::ProgressMode::Quiet,
            ports: ports(self.ports)?,
            secrets,
            disk_size,
            nested: self.nested.unwrap_or(false),
            cmd: self.cmd.unwrap_or_default(),
            env: pairs(self.env),
            cwd: self.cwd,
            user: self.user,
            keep_alive_on_exit: self.keep_alive_on_exit.unwrap_or(false),
            on_phase: Default::default(),
            mounts: self
                .mounts
                .unwrap_or_default()
                .into_iter()
                .map(|m| machinen::mounts::Mount {
                    host: PathBuf::from(m.host),
                    guest: m.guest,
                })
                .collect(),
            mount_upper_size: match self.mount_upper_size {
                None => None,
                Some(n) if n.is_finite() && n >= 0.0 && n.fract() == 0.0 => Some(n as u64),
                Some(n) => {
                    return Err(invalid(
                        ErrorCode::BootMountInvalid,
                        format!("mountDiskUpperSizeBytes {n} is not a whole number of bytes"),
                        "e.g. mountDiskUpperSizeBytes: 512 * 1024 * 1024",
                    ))
                }
            },
            balloon: self.balloon.unwrap_or(true),
            live_mounts: live_mounts(self.live_mounts),
            net_policy: self
                .net_policy
                .map(NetPolicyOpt::into_lib)
                .transpose()?
                .unwrap_or_default(),
            egress_secrets: egress_secrets(self.egress_secrets)?,
        })
    }
}

impl RestoreOpts {
    pub fn into_lib(self) -> Result<machinen::RestoreOptions> {
        let mut o = machinen::RestoreOptions::new(self.bundle);
        o.name = self.name;
        o.image = path(self.image);
        o.ports = ports(self.ports)?;
        o.detached = self.detached.unwrap_or(false);
        o.boot_timeout = ms(self.boot_timeout_ms, o.boot_timeout);
        o.reset_tcp = self.reset_tcp.unwrap_or(false);
        o.verify = self.verify.unwrap_or(true);
        o.own_ram = self.own_ram.unwrap_or(false);
        o.live_mounts = live_mounts(self.live_mounts);
        o.free_memory_threshold = threshold(self.free_memory_threshold)?;
        o.net_policy = self.net_policy.map(NetPolicyOpt::into_lib).transpose()?;
        o.egress_secrets = egress_secrets(self.egress_secrets)?;
        o.progress = machinen::progress::ProgressMode::Quiet;
        o.memory_mib = self.memory_mib;
        o.cpus = self.cpus;
        o.cpu_model = self.cpu_model;
        Ok(o)
    }
}

impl ForkOpts {
    pub fn into_lib(self) -> Result<machinen::ForkOptions> {
        Ok(machinen::ForkOptions {
            new_name: self.name,
            out_dir: path(self.out_dir),
            tcp_keep: self.tcp_keep.unwrap_or(false),
            detached: self.detached.unwrap_or(false),
            ports: ports(self.ports)?,
            own_ram: self.own_ram.unwrap_or(false),
            live_mounts: live_mounts(self.live_mounts),
            free_memory_threshold: threshold(self.free_memory_threshold)?,
            on_phase: Default::default(),
            net_policy: self.net_policy.map(NetPolicyOpt::into_lib).transpose()?,
            egress_secrets: egress_secrets(self.egress_secrets)?,
        })
    }
}

fn threshold(t: Option<String>) -> Result<machinen::backpressure::Threshold> {
    match t {
        None => Ok(Default::default()),
        Some(s) => s
            .parse()
            .map_err(|f: machinen::error::Failure| crate::js_error(f.into())),
    }
}

impl ExecOpts {
    pub fn into_lib(self) -> (machinen::ExecOptions, Option<Duration>) {
        let timeout = self.timeout_ms.map(|t| Duration::from_millis(t.into()));
        (
            machinen::ExecOptions {
                rlimits: Vec::new(),
                argv: self.argv,
                env: pairs(self.env),
                cwd: self.cwd,
                user: self.user,
            },
            timeout,
        )
    }
}

impl ProvisionOpts {
    pub fn into_lib(self) -> Result<machinen::ProvisionOptions> {
        let d = machinen::ProvisionOptions::default();
        Ok(machinen::ProvisionOptions {
            base: path(self.base),
            out: PathBuf::from(self.out),
            install: None,
            cmd: self.cmd,
            env: pairs(self.env),
            cwd: self.cwd,
            config: None,
            memory_mib: self.memory_mib,
            cpus: self.cpus.unwrap_or(d.cpus),
            network: network(self.network)?,
            boot_timeout: ms(self.boot_timeout_ms, d.boot_timeout),
            progress: machinen::progress::ProgressMode::Quiet,
            on_phase: Default::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code_of(e: napi::Error) -> String {
        let json = e
            .reason
            .strip_prefix(crate::ERROR_MARK)
            .expect("a library error");
        let v: serde_json::Value = serde_json::from_str(json).expect("JSON after the mark");
        v["code"].as_str().expect("a code").to_owned()
    }

    #[test]
    fn boot_defaults_match_the_library() {
        let o = BootOpts::default().into_lib().expect("defaults are valid");
        let d = machinen::BootOptions::default();
        assert_eq!(o.cpus, d.cpus);
        assert_eq!(o.boot_timeout, d.boot_timeout);
        assert!(!o.detached);
        assert!(o.cmd.is_empty());
    }

    #[test]
    fn boot_options_map_and_sort_env() {
        let o = BootOpts {
            memory_mib: Some(512),
            ports: Some(vec!["8080:80".into(), "127.0.0.1:9000:90".into()]),
            env: Some(HashMap::from([
                ("B".into(), "2".into()),
                ("A".into(), "1".into()),
            ])),
            secrets: Some(HashMap::from([("TOKEN".into(), "s3cret".into())])),
            disk_size: Some("2G".into()),
            network: Some("nat-host".into()),
            boot_timeout_ms: Some(1500),
            ..Default::default()
        }
        .into_lib()
        .expect("valid");
        assert_eq!(o.memory_mib, Some(512));
        assert_eq!(o.ports.len(), 2);
        assert_eq!(o.ports[1].host_addr, "127.0.0.1");
        assert_eq!(o.ports[1].guest_port, 90);
        assert_eq!(
            o.env,
            vec![("A".into(), "1".into()), ("B".into(), "2".into())]
        );
        assert_eq!(o.secrets[0].value.0, b"s3cret");
        assert_eq!(o.disk_size, Some(2 << 30));
        assert_eq!(o.network, machinen::spec::NetworkMode::NatHost);
        assert_eq!(o.boot_timeout, Duration::from_millis(1500));
        assert!(o.balloon, "a balloon unless asked otherwise");
        let o = BootOpts {
            network: Some("none".into()),
            balloon: Some(false),
            ..Default::default()
        }
        .into_lib()
        .expect("valid");
        assert_eq!(o.network, machinen::spec::NetworkMode::None);
        assert!(!o.balloon);
    }

    #[test]
    fn bad_options_carry_a_code() {
        let bad = |o: BootOpts| code_of(o.into_lib().expect_err("refused"));
        assert_eq!(
            bad(BootOpts {
                network: Some("wifi".into()),
                ..Default::default()
            }),
            "BOOT_ARGS_INVALID"
        );
        assert_eq!(
            bad(BootOpts {
                disk_size: Some("lots".into()),
                ..Default::default()
            }),
            "BOOT_ARGS_INVALID"
        );
        assert_eq!(
            bad(BootOpts {
                ports: Some(vec!["x".into()]),
                ..Default::default()
            }),
            "BOOT_ARGS_INVALID"
        );
    }

    #[test]
    fn exec_and_restore_options() {
        let (o, t) = ExecOpts {
            argv: vec!["true".into()],
            timeout_ms: Some(250),
            cwd: Some("/tmp".into()),
            ..Default::default()
        }
        .into_lib();
        assert_eq!(o.argv, vec!["true".to_string()]);
        assert_eq!(o.cwd.as_deref(), Some("/tmp"));
        assert_eq!(t, Some(Duration::from_millis(250)));
        let r = RestoreOpts {
            bundle: "/b".into(),
            own_ram: Some(true),
            ..Default::default()
        }
        .into_lib()
        .expect("valid");
        assert!(r.own_ram && r.verify && !r.detached);
    }
}
