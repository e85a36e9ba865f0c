//! What the library hands a supervisor: everything needed to start one VM.
//!
//! Written as `spec.json` into the VM's registry directory; the supervisor
//! (`machinen-vmm --spec <path>`) reads it. Both sides are built from this
//! one definition, so the file format cannot drift.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Files inside a VM's registry directory.
pub mod files {
    pub const SPEC: &str = "spec.json";
    pub const CONTROL: &str = "control.sock";
    pub const QMP: &str = "qmp.sock";
    pub const AGENT: &str = "agent.sock";
    pub const CONSOLE: &str = "console.log";
    pub const VMM_LOG: &str = "vmm.log";
    /// passt's output (`--network nat`).
    pub const PASST_LOG: &str = "passt.log";
    pub const QEMU_LOG: &str = "qemu.log";
    pub const DISK: &str = "disk.qcow2";
    /// The main command's output (see [`crate::service`]).
    pub const MAIN_LOG: &str = crate::service::MAIN_LOG;
}

/// One VM to start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmSpec {
    pub id: String,
    pub name: String,
    /// The guest's hostname (`None`: the name's last segment, made valid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// The VM's registry directory (sockets, logs, disk overlay live here).
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Per-VM copy-on-write root disk (one qcow2 layer over `base_image`).
    pub disk: PathBuf,
    /// The cached raw ext4 image under `disk` (read-only).
    pub base_image: PathBuf,
    /// sha256 of the image tarball (bundles record it).
    #[serde(default)]
    pub image_sha256: Option<String>,
    /// `uname -r` of the kernel (bundles record it).
    #[serde(default)]
    pub kernel_version: String,
    /// The rootfs tarball the disk came from (shown by `ls`).
    #[serde(default)]
    pub image: Option<PathBuf>,
    /// The container image that tarball was converted from, if any (see
    /// `bundle::ImageIdentity::source`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_source: Option<String>,
    pub memory_mib: u32,
    pub cpus: u32,
    /// `kvm`, `hvf`, `tcg`; `None` = probe.
    #[serde(default)]
    pub accel: Option<String>,
    /// QEMU binary; `None` = `qemu-system-<arch>` from `PATH`.
    #[serde(default)]
    pub qemu: Option<PathBuf>,
    /// How long to wait for the guest agent's first answer.
    pub boot_timeout_ms: u64,
    /// Whether the VM outlives the process that started it.
    pub detached: bool,
    /// Verbose guest agent logs on the console.
    #[serde(default)]
    pub debug: bool,
    /// Unix time (ms) the VM was created.
    pub created_at_ms: u64,
    /// Host port forwards.
    #[serde(default)]
    pub ports: Vec<crate::registry::PortForward>,
    /// Boot the guest kernel with `init_on_free=1` (VMs given secrets).
    #[serde(default)]
    pub zero_freed_memory: bool,
    /// Guest RAM as a shared file on tmpfs (snapshots then copy it into
    /// the bundle instead of serialising it); `None`: anonymous memory.
    #[serde(default)]
    pub ram_file: Option<PathBuf>,
    /// Resume from a snapshot bundle instead of booting.
    #[serde(default)]
    pub restore: Option<RestoreSpec>,
    /// How the guest reaches the network.
    #[serde(default)]
    pub network: NetworkMode,
    /// What the guest may reach (`--network nat` only; the supervisor's
    /// filter enforces it and `machinen network` changes it).
    #[serde(
        default,
        skip_serializing_if = "machinen_proto::netpolicy::NetPolicy::is_default"
    )]
    pub net_policy: machinen_proto::netpolicy::NetPolicy,
    /// Addresses the resolver gave for names, from the bundle (restores).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub net_learned: Vec<machinen_proto::netpolicy::LearnedAddress>,
    /// Credentials the guest never holds: names, hosts and placeholders
    /// (the values reach the supervisor on the control link only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_secrets: Vec<machinen_proto::egress::EgressSecretSpec>,
    /// The VM's main command (service VMs): started once the guest is
    /// ready; on a restore, the one the bundle's guest already runs, which
    /// the supervisor re-attaches to.
    #[serde(default)]
    pub main: Option<crate::service::MainSpec>,
    /// Copy-once mounts (one disk for all of them; see [`crate::mounts`]).
    #[serde(default)]
    pub mounts: Option<crate::mounts::MountsDisk>,
    /// Live mounts (virtio-fs; see [`crate::live_mounts`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live_mounts: Option<crate::live_mounts::LiveShares>,
    /// A virtio-balloon with free page reporting: pages the guest frees go
    /// back to the host (holes in the RAM file). Booted VMs have it;
    /// restored ones have what their bundle's VM had (the device set must
    /// match the migration stream).
    #[serde(default)]
    pub balloon: bool,
    /// The QEMU CPU model (`-cpu`) when not the accelerator's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_model: Option<String>,
}

/// How to resume a VM from a bundle.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreSpec {
    /// The bundle directory (never written).
    pub bundle: PathBuf,
    /// Reset inherited TCP connections (forks, unless `--tcp-keep`).
    pub reset_tcp: bool,
    /// The bundle's RAM file, mapped privately (copy-on-write): restores
    /// and forks of one bundle share its unchanged pages.
    #[serde(default)]
    pub ram: Option<PathBuf>,
    /// The launcher is still verifying the bundle: load the state but keep
    /// the guest paused until it writes `go` on the supervisor's stdin.
    #[serde(default)]
    pub gate: bool,
    /// Read-only qcow2 layers between the base image and `disk` (bottom
    /// first): a restore's copy of the bundle's disk, so `disk` starts
    /// empty and holds only what the restored VM writes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disk_below: Vec<PathBuf>,
    /// The bundle, as the parent of this VM's next checkpoint (none for a
    /// fork's scratch bundle, which is removed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<ChainLink>,
}

/// A bundle a running VM's next checkpoint can be a delta over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// The bundle's directory (absolute).
    pub dir: PathBuf,
    /// BLAKE3 of its `manifest.json`.
    pub manifest_blake3: String,
    pub chain_id: String,
    pub chain_seq: u32,
}

impl VmSpec {
    pub fn path_in(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn load(path: &Path) -> std::io::Result<VmSpec> {
        let bytes = std::fs::read(path)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

/// The single line a supervisor prints on stdout once the VM is ready (or
/// could not start). The launcher waits for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum ReadyLine {
    Ready {
        supervisor_pid: u32,
        qemu_pid: u32,
        accel: String,
        boot_ms: u64,
        /// The supervisor's phases (engine start, state load, agent ready,
        /// …), timed from its own start.
        #[serde(default)]
        phases: Vec<machinen_proto::Phase>,
    },
    Failed {
        code: String,
        message: String,
        #[serde(default)]
        hint: Option<String>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_line_round_trips() {
        for l in [
            ReadyLine::Ready {
                supervisor_pid: 1,
                qemu_pid: 2,
                accel: "tcg".into(),
                boot_ms: 3,
                phases: vec![machinen_proto::Phase {
                    name: "engine-start".into(),
                    at_ms: 1,
                    ms: 1,
                }],
            },
            ReadyLine::Failed {
                code: "BOOT_TIMEOUT".into(),
                message: "m".into(),
                hint: None,
            },
        ] {
            let s = serde_json::to_string(&l).expect("ser");
            assert!(!s.contains('\n'));
            assert_eq!(serde_json::from_str::<ReadyLine>(&s).expect("de"), l);
        }
    }
}

/// How a VM reaches the network. `nat` and `nat-host` give the guest the
/// same view (10.0.2.15/24, gateway 10.0.2.2, resolver 10.0.2.3); they
/// differ in what the guest can reach on the host. `none` gives it no
/// network device at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NetworkMode {
    /// Outbound connections through passt, a user-mode network stack in a
    /// process of its own: the guest reaches what the host can reach
    /// outside, but not the host's loopback (services bound to 127.0.0.1,
    /// other VMs' port forwards). IPv4 only.
    #[default]
    Nat,
    /// QEMU's built-in user networking (slirp), as machinen used before:
    /// outbound like `nat`, and in addition the gateway 10.0.2.2 is the
    /// host's loopback, so the guest reaches every service bound to the
    /// host's 127.0.0.1. Only for guests trusted with that.
    NatHost,
    /// No network device: the guest has only its loopback and no route
    /// anywhere, whatever root in it does. Exec, files, logs and port
    /// forwards still work: they travel over the agent's channel.
    None,
}

impl NetworkMode {
    pub const ALL: [NetworkMode; 3] = [NetworkMode::Nat, NetworkMode::NatHost, NetworkMode::None];

    pub fn as_str(self) -> &'static str {
        match self {
            NetworkMode::Nat => "nat",
            NetworkMode::NatHost => "nat-host",
            NetworkMode::None => "none",
        }
    }

    /// Bundles written before the mode was recorded ran QEMU's user
    /// networking, whose state is in their migration stream.
    pub fn legacy() -> NetworkMode {
        NetworkMode::NatHost
    }
}

impl std::str::FromStr for NetworkMode {
    type Err = String;
    fn from_str(s: &str) -> Result<NetworkMode, String> {
        NetworkMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("unknown network mode {s:?} (nat, nat-host or none)"))
    }
}

impl std::fmt::Display for NetworkMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}
