//! The part of an OCI runtime spec (`config.json` in the bundle) that a VM
//! can honour, and how it becomes machinen's settings.
//!
//! Read: the process (args, env, cwd, user, terminal, console size), the
//! memory limit and CPU quota (the VM's RAM ceiling and vCPUs), bind
//! mounts of host directories (live mounts), and machinen's annotations.
//! Not applicable in a VM and ignored: namespaces, cgroups paths, seccomp,
//! AppArmor/SELinux, capabilities, masked and read-only paths, devices, and
//! the kernel filesystems (`/proc`, `/sys`, `/dev`, …), which the guest has
//! of its own. Fields not listed here are ignored, not refused: a spec
//! from any containerd client parses.

use std::collections::HashMap;
use std::path::PathBuf;

use machinen::live_mounts::LiveMountArg;
use machinen::registry::PortForward;
use machinen::spec::NetworkMode;
use machinen::vm::ExecOptions;
use machinen::{ErrorCode, Failure};
use serde::Deserialize;

/// Annotation: host port forwards, `-p` syntax, comma-separated
/// (`8080:80,127.0.0.1:9000:9000`).
pub const ANNOTATION_PORTS: &str = "io.machinen.ports";
/// Annotation: `nat` (default), `none` or `nat-host`.
pub const ANNOTATION_NETWORK: &str = "io.machinen.network";

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Spec {
    #[serde(default)]
    pub process: Option<Process>,
    #[serde(default)]
    pub hostname: Option<String>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
    #[serde(default)]
    pub linux: Option<Linux>,
    #[serde(default)]
    pub annotations: HashMap<String, String>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Process {
    #[serde(default)]
    pub console_size: Option<ConsoleSize>,
    #[serde(default)]
    pub user: User,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: Vec<String>,
    #[serde(default)]
    pub cwd: String,
    #[serde(default)]
    pub rlimits: Vec<SpecRlimit>,
}

/// `process.rlimits[]`: `{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}`.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct SpecRlimit {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub hard: u64,
    #[serde(default)]
    pub soft: u64,
}

#[derive(Debug, Default, Clone, Copy, Deserialize)]
pub struct ConsoleSize {
    #[serde(default)]
    pub height: u32,
    #[serde(default)]
    pub width: u32,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct User {
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
}

#[derive(Debug, Default, Clone, Deserialize)]
pub struct Mount {
    pub destination: String,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub source: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Linux {
    #[serde(default)]
    pub resources: Option<Resources>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Resources {
    #[serde(default)]
    pub memory: Option<Memory>,
    #[serde(default)]
    pub cpu: Option<Cpu>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Memory {
    #[serde(default)]
    pub limit: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
pub struct Cpu {
    #[serde(default)]
    pub quota: Option<i64>,
    #[serde(default)]
    pub period: Option<u64>,
    #[serde(default)]
    pub cpus: Option<String>,
}

/// A terminal's first size: the spec's, or 24x80 where it names none.
pub fn winsize(size: Option<ConsoleSize>) -> machinen_proto::WinSize {
    let s = size.unwrap_or_default();
    let cells = |n: u32, default: u16| match n {
        0 => default,
        n => u16::try_from(n).unwrap_or(u16::MAX),
    };
    machinen_proto::WinSize {
        rows: cells(s.height, 24),
        cols: cells(s.width, 80),
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure::new(ErrorCode::ContainerSpecInvalid, msg)
}

/// Parse `config.json`'s bytes.
pub fn parse(bytes: &[u8]) -> Result<Spec, Failure> {
    serde_json::from_slice(bytes).map_err(|e| invalid(format!("config.json: {e}")))
}

/// A process of the spec (the container's, or an exec's) as an exec.
pub fn exec_options(p: &Process) -> Result<ExecOptions, Failure> {
    if p.args.is_empty() || p.args[0].is_empty() {
        return Err(invalid("the process has no args: nothing to run")
            .hint("give the image a command, or name one: ctr run IMAGE ID CMD"));
    }
    let mut env = Vec::with_capacity(p.env.len());
    for kv in &p.env {
        match kv.split_once('=') {
            Some((k, v)) if !k.is_empty() => env.push((k.to_string(), v.to_string())),
            _ => return Err(invalid(format!("env entry {kv:?} is not KEY=VALUE"))),
        }
    }
    let cwd = if p.cwd.is_empty() {
        "/".to_string()
    } else {
        p.cwd.clone()
    };
    if !cwd.starts_with('/') {
        return Err(invalid(format!("cwd {cwd:?} is not absolute")));
    }
    let user =
        (p.user.uid != 0 || p.user.gid != 0).then(|| format!("{}:{}", p.user.uid, p.user.gid));
    let rlimits: Vec<machinen_proto::Rlimit> = p
        .rlimits
        .iter()
        .map(|r| machinen_proto::Rlimit {
            resource: r.kind.clone(),
            soft: r.soft,
            hard: r.hard,
        })
        .collect();
    if let Some(problem) = rlimits.iter().find_map(|r| r.problem()) {
        return Err(invalid(problem));
    }
    Ok(ExecOptions {
        rlimits,
        argv: p.args.clone(),
        env,
        cwd: Some(cwd),
        user,
    })
}

/// What a container's VM is made of, read from its spec once, at create
/// (where a spec the shim cannot run is refused).
#[derive(Debug, Clone)]
pub struct Settings {
    /// The container's process.
    pub exec: ExecOptions,
    pub console_size: Option<ConsoleSize>,
    pub hostname: Option<String>,
    pub memory_mib: Option<u32>,
    pub cpus: u32,
    pub network: NetworkMode,
    pub ports: Vec<PortForward>,
    pub live_mounts: Vec<LiveMountArg>,
}

impl Spec {
    pub fn settings(&self) -> Result<Settings, Failure> {
        let process = self.process()?;
        Ok(Settings {
            exec: exec_options(process)?,
            console_size: process.console_size,
            hostname: self.hostname()?,
            memory_mib: self.memory_mib()?,
            cpus: self.cpus(),
            network: self.network()?,
            ports: self.ports()?,
            live_mounts: self.live_mounts(),
        })
    }

    pub fn process(&self) -> Result<&Process, Failure> {
        self.process
            .as_ref()
            .ok_or_else(|| invalid("config.json has no process"))
    }

    fn resources(&self) -> Option<&Resources> {
        self.linux.as_ref().and_then(|l| l.resources.as_ref())
    }

    /// The VM's RAM ceiling: the memory limit rounded up to MiB (`None`:
    /// machinen's default).
    pub fn memory_mib(&self) -> Result<Option<u32>, Failure> {
        let limit = self
            .resources()
            .and_then(|r| r.memory.as_ref())
            .and_then(|m| m.limit)
            .filter(|l| *l > 0);
        let Some(limit) = limit else { return Ok(None) };
        let mib = u32::try_from((limit as u64).div_ceil(1 << 20)).unwrap_or(u32::MAX);
        if mib < machinen::vm::MIN_MEMORY_MIB {
            return Err(invalid(format!(
                "memory limit {limit} bytes is below a VM's minimum of {} MiB",
                machinen::vm::MIN_MEMORY_MIB
            ))
            .hint("raise --memory-limit"));
        }
        machinen::vm::validate_memory_mib(mib).map(Some)
    }

    /// vCPUs: the CFS quota over its period, rounded up, else the cpuset's
    /// size, else one.
    pub fn cpus(&self) -> u32 {
        let Some(cpu) = self.resources().and_then(|r| r.cpu.as_ref()) else {
            return 1;
        };
        if let (Some(q), Some(p)) = (cpu.quota, cpu.period) {
            if q > 0 && p > 0 {
                return ((q as u64).div_ceil(p) as u32).clamp(1, machinen::vm::MAX_CPUS);
            }
        }
        cpu.cpus
            .as_deref()
            .and_then(cpuset_size)
            .unwrap_or(1)
            .clamp(1, machinen::vm::MAX_CPUS)
    }

    /// Bind mounts of host directories: live mounts. Kernel filesystems and
    /// bind mounts of single files (`/etc/hosts` and friends, which the
    /// guest writes itself) stay out.
    pub fn live_mounts(&self) -> Vec<LiveMountArg> {
        self.mounts
            .iter()
            .filter(|m| {
                m.kind.as_deref() == Some("bind")
                    || m.options.iter().any(|o| o == "bind" || o == "rbind")
            })
            .filter_map(|m| {
                let src = PathBuf::from(m.source.as_deref()?);
                if !src.is_dir() {
                    log::info!("bind mount {} of a file is left out", m.destination);
                    return None;
                }
                Some(LiveMountArg {
                    host: src,
                    guest: m.destination.clone(),
                    readonly: Some(m.options.iter().any(|o| o == "ro")),
                })
            })
            .collect()
    }

    pub fn ports(&self) -> Result<Vec<PortForward>, Failure> {
        match self.annotations.get(ANNOTATION_PORTS) {
            None => Ok(Vec::new()),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(machinen::ports::parse)
                .collect(),
        }
    }

    /// The guest's hostname, when the spec sets one (an invalid one is
    /// refused: the guest would silently keep another).
    pub fn hostname(&self) -> Result<Option<String>, Failure> {
        match self.hostname.as_deref().filter(|h| !h.is_empty()) {
            None => Ok(None),
            Some(h) if machinen_proto::valid_hostname(h) => Ok(Some(h.to_string())),
            Some(h) => Err(invalid(format!("hostname {h:?} is not RFC 1123"))),
        }
    }

    pub fn network(&self) -> Result<NetworkMode, Failure> {
        match self.annotations.get(ANNOTATION_NETWORK) {
            None => Ok(NetworkMode::default()),
            Some(v) => v
                .parse()
                .map_err(|e: String| invalid(format!("annotation {ANNOTATION_NETWORK}: {e}"))),
        }
    }
}

/// `0-3,5` → 5.
fn cpuset_size(s: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<u32>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => {
                part.parse::<u32>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC: &str = r#"{
        "ociVersion": "1.0.2",
        "process": {"terminal": false, "user": {"uid": 1000, "gid": 100},
            "args": ["sh", "-c", "echo hi"], "env": ["PATH=/bin", "A=b=c"], "cwd": "/srv",
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "capabilities": {"bounding": ["CAP_KILL"]}},
        "root": {"path": "rootfs"},
        "hostname": "web",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/data", "type": "bind", "source": "/tmp", "options": ["rbind", "ro"]},
            {"destination": "/etc/hosts", "type": "bind", "source": "/etc/hosts", "options": ["rbind"]}
        ],
        "annotations": {"io.machinen.ports": "8080:80, 127.0.0.1:9000:9000"},
        "linux": {"resources": {"memory": {"limit": 268435456}, "cpu": {"quota": 150000, "period": 100000}},
            "namespaces": [{"type": "pid"}], "seccomp": {"defaultAction": "SCMP_ACT_ALLOW"}}
    }"#;

    #[test]
    fn a_containerd_spec_becomes_vm_settings() {
        let s = parse(SPEC.as_bytes()).expect("parse");
        let e = exec_options(s.process().expect("process")).expect("exec");
        assert_eq!(e.argv, ["sh", "-c", "echo hi"]);
        assert_eq!(e.env[1], ("A".to_string(), "b=c".to_string()));
        assert_eq!(e.cwd.as_deref(), Some("/srv"));
        assert_eq!(e.user.as_deref(), Some("1000:100"));
        assert_eq!(e.rlimits[0].resource, "RLIMIT_NOFILE");
        assert_eq!((e.rlimits[0].soft, e.rlimits[0].hard), (1024, 1024));
        assert_eq!(s.memory_mib().expect("mem"), Some(256));
        assert_eq!(s.cpus(), 2);
        let lm = s.live_mounts();
        assert_eq!(lm.len(), 1, "{lm:?}");
        assert_eq!(lm[0].guest, "/data");
        assert_eq!(lm[0].readonly, Some(true));
        let p = s.ports().expect("ports");
        assert_eq!((p[0].host_port, p[0].guest_port), (8080, 80));
        assert_eq!(p[1].host_addr, "127.0.0.1");
        assert_eq!(s.network().expect("net"), NetworkMode::Nat);
        assert_eq!(s.hostname().expect("hostname").as_deref(), Some("web"));
    }

    #[test]
    fn bad_specs_are_refused_with_the_spec_code() {
        for (json, what) in [
            (r#"{"process": {"args": []}}"#, "no args"),
            (
                r#"{"process": {"args": ["x"], "env": ["NOEQUALS"]}}"#,
                "env",
            ),
            (r#"{"process": {"args": ["x"], "cwd": "rel"}}"#, "cwd"),
            (
                r#"{"process": {"args": ["x"], "rlimits": [{"type": "RLIMIT_X", "hard": 1, "soft": 1}]}}"#,
                "rlimit",
            ),
        ] {
            let s = parse(json.as_bytes()).expect("parse");
            let e = exec_options(s.process().expect("p")).expect_err(what);
            assert_eq!(e.code, ErrorCode::ContainerSpecInvalid, "{what}");
        }
        let s = parse(br#"{"linux": {"resources": {"memory": {"limit": 1048576}}}}"#).expect("p");
        assert_eq!(
            s.memory_mib().expect_err("tiny").code,
            ErrorCode::ContainerSpecInvalid
        );
        assert!(parse(b"{not json").is_err());
        assert!(parse(br#"{}"#).expect("empty").process().is_err());
        let s = parse(br#"{"annotations": {"io.machinen.network": "bogus"}}"#).expect("p");
        assert!(s.network().is_err());
        let s = parse(br#"{"hostname": "not a host"}"#).expect("p");
        assert!(s.hostname().is_err());
    }

    #[test]
    fn terminals_get_the_spec_size_or_24_by_80() {
        assert_eq!(
            winsize(None),
            machinen_proto::WinSize { rows: 24, cols: 80 }
        );
        let big = ConsoleSize {
            height: 50,
            width: 1 << 20,
        };
        assert_eq!(
            winsize(Some(big)),
            machinen_proto::WinSize {
                rows: 50,
                cols: u16::MAX
            }
        );
    }

    #[test]
    fn cpusets_count_their_cpus() {
        assert_eq!(cpuset_size("0-3,5"), Some(5));
        assert_eq!(cpuset_size("2"), Some(1));
        assert_eq!(cpuset_size("3-1"), None);
        assert_eq!(cpuset_size("x"), None);
    }
}
