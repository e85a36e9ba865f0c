//! The QEMU and passt command lines of a VM, as pure functions of its spec
//! and of what the host gave the engine (accelerator, CPU model, TSC rate).
//!
//! The supervisor starts QEMU with [`qemu_args`]; the benchmark builds its
//! bare-QEMU baselines from the same function, so both run the same guest.

use crate::accel::Accel;
use crate::spec::{files, NetworkMode, VmSpec};
use machinen_proto::AGENT_PORT_NAME;

/// The descriptor number under which QEMU and passt each find their end of
/// the socket pair that carries the guest's Ethernet frames.
pub const NET_FD: i32 = 3;

/// The host-side inputs of the QEMU command line, probed once by the caller
/// so that [`qemu_args`] reads nothing from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuHost {
    pub accel: Accel,
    /// CPU model the guest sees (`-cpu`).
    pub cpu_model: String,
    /// The host's constant TSC rate in kHz, when known (see [`host_tsc_khz`]).
    pub tsc_khz: Option<u64>,
    /// Extra kernel arguments (`MACHINEN_KERNEL_ARGS`), a debugging knob.
    pub extra_kernel_args: Vec<String>,
    /// QEMU's (major, minor) version, when known ([`qemu_version`]);
    /// `None` is taken for a current QEMU.
    pub qemu_version: Option<(u32, u32)>,
}

impl QemuHost {
    /// The inputs as this host and environment give them for `accel`.
    pub fn probe(accel: Accel) -> QemuHost {
        QemuHost {
            accel,
            cpu_model: accel.cpu_model().to_string(),
            tsc_khz: host_tsc_khz(),
            extra_kernel_args: std::env::var(machinen_proto::env::KERNEL_ARGS)
                .map(|s| s.split_whitespace().map(String::from).collect())
                .unwrap_or_default(),
            qemu_version: None,
        }
    }
}

/// `binary --version`'s (major, minor).
pub fn qemu_version(binary: &std::path::Path) -> Option<(u32, u32)> {
    let out = std::process::Command::new(binary)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&out.stdout))
}

/// (major, minor) from `QEMU emulator version 10.0.2 (Debian …)`.
pub fn parse_qemu_version(s: &str) -> Option<(u32, u32)> {
    let v = s.split("version ").nth(1)?.split_whitespace().next()?;
    let mut parts = v.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// QEMU 8.2 maps a file opened read-only as private, writable guest RAM
/// (`readonly=on,rom=off`), and has no other way to keep a balloon's
/// discards out of a privately mapped file.
const READONLY_PRIVATE_RAM: (u32, u32) = (8, 2);

/// Whether QEMU `version` (unknown: assumed recent) is `want` or later.
pub fn at_least(version: Option<(u32, u32)>, want: (u32, u32)) -> bool {
    version.is_none_or(|v| v >= want)
}

/// Whether a VM of `spec` on QEMU `version` has the free-page-reporting
/// balloon. Only with QEMU 8.2 or later: a restore that maps a bundle's
/// RAM file privately must open it read-only, or QEMU would punch the
/// guest's freed pages out of the bundle (and out of every sibling that
/// maps it).
pub fn has_balloon(spec: &VmSpec, version: Option<(u32, u32)>) -> bool {
    spec.balloon && at_least(version, READONLY_PRIVATE_RAM)
}

/// passt's arguments: the guest's addresses as QEMU's user networking gives
/// them (the agent configures the guest statically for those), DNS queries
/// to 10.0.2.3 forwarded to the host's resolver, and `--no-map-gw`: the
/// gateway is not an alias of the host, so nothing bound to the host's
/// loopback (other VMs' port forwards included) is reachable. IPv4 only:
/// one address family to reason about.
pub fn passt_args() -> Vec<String> {
    [
        "--foreground",
        "--ipv4-only",
        "--no-map-gw",
        "--fd",
        &NET_FD.to_string(),
    ]
    .into_iter()
    .chain([
        "--address",
        "10.0.2.15",
        "--netmask",
        "24",
        "--gateway",
        "10.0.2.2",
    ])
    .chain([
        "--dns-forward",
        "10.0.2.3",
        "--dns",
        "10.0.2.3",
        "--no-dhcpv6",
        "--no-ndp",
        "--no-ra",
    ])
    .map(String::from)
    .collect()
}

/// The MTU passt offers its guests (its default).
pub const PASST_MTU: u32 = 65520;

/// The guest kernel's command line for a booted (not restored) VM.
fn kernel_cmdline(spec: &VmSpec, host: &QemuHost) -> String {
    let mut cmdline = vec![
        "console=ttyS0".to_string(),
        "quiet".into(),
        "panic=-1".into(),
        // Reboot (a panic's included) by triple fault: the default chain
        // (ACPI reset register, keyboard controller, …) can spin forever
        // on microvm, leaving a panicked guest's QEMU running (seen with
        // Debian's 6.1.0-57 cloud kernel); `-no-reboot` turns the triple
        // fault into QEMU's exit.
        "reboot=t".into(),
        format!(
            "machinen.net={}",
            u8::from(spec.network != NetworkMode::None)
        ),
        format!(
            "machinen.hostname={}",
            spec.hostname
                .clone()
                .unwrap_or_else(|| hostname_for(&spec.name))
        ),
    ];
    // passt moves 65520-byte frames; at the default 1500 its TCP path
    // stalls (measured here: a 64 MiB download at 1.8 MiB/s with resets,
    // against ~30 MiB/s at 65520). QEMU's user networking keeps 1500.
    if spec.network == NetworkMode::Nat {
        cmdline.push(format!("machinen.mtu={PASST_MTU}"));
    }
    // Under TCG the guest TSC ticks at the host's TSC rate, but the
    // kernel's PIT calibration of it fails when the host is busy (the
    // vCPU thread is descheduled mid-measurement); the kernel then falls
    // back to jiffies before timers run and hangs early in boot. Measured:
    // 4 parallel boots on 2 cores hung 4/4 without this, 8/8 booted with it.
    if host.accel == Accel::Tcg {
        if let Some(khz) = host.tsc_khz {
            cmdline.push(format!("tsc_early_khz={khz}"));
            cmdline.push("tsc=reliable".into());
        }
    }
    // With secrets, freed guest pages are zeroed, so secrets wiped before
    // a snapshot leave no copy in pipe, serial or process memory. Only
    // then: it makes the kernel touch (zero) all of guest RAM at boot,
    // which costs the whole memory ceiling in host RSS (measured: 4.3 GB
    // for an idle 4 GiB VM) and seconds of boot under TCG.
    if spec.zero_freed_memory {
        cmdline.push("init_on_free=1".into());
    }
    if let Some(m) = &spec.mounts {
        cmdline.extend(crate::mounts::cmdline_words(&m.mounts));
    }
    if let Some(l) = &spec.live_mounts {
        cmdline.extend(crate::live_mounts::cmdline_words(&l.mounts));
    }
    cmdline.extend(host.extra_kernel_args.iter().cloned());
    if spec.debug {
        cmdline.push("machinen.debug=1".into());
        cmdline.retain(|a| a != "quiet");
    }
    cmdline.join(" ")
}

/// The full QEMU command line for `spec` (without the program name).
pub fn qemu_args(spec: &VmSpec, host: &QemuHost) -> Vec<String> {
    let path = |f: &str| spec.path_in(f).display().to_string();
    let mut a: Vec<String> = vec![
        "-M".into(),
        "microvm,acpi=on,memory-backend=ram".into(),
        "-accel".into(),
        match host.accel {
            Accel::Tcg if spec.cpus > 1 => "tcg,thread=multi".into(),
            other => other.as_str().into(),
        },
        "-cpu".into(),
        spec.cpu_model
            .clone()
            .unwrap_or_else(|| host.cpu_model.clone()),
        "-m".into(),
        format!("{}M", spec.memory_mib),
        // Always a backend named "ram": the RAM block's name must match
        // between a snapshot's source and the VM that restores it.
        "-object".into(),
        match (
            spec.restore.as_ref().and_then(|r| r.ram.as_ref()),
            &spec.ram_file,
        ) {
            // Copy-on-write over the bundle's RAM file: pages load on
            // first touch and stay shared between restores and forks.
            (Some(ram), _) => {
                // Opened read-only (QEMU 8.2+): the bundle is never
                // written, whatever the guest or a balloon does.
                format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={},share=off{}",
                    spec.memory_mib,
                    ram.display(),
                    if at_least(host.qemu_version, READONLY_PRIVATE_RAM) {
                        ",readonly=on,rom=off"
                    } else {
                        ""
                    }
                )
            }
            // A booted VM's RAM file, or a restored VM's own copy.
            (None, Some(file)) => {
                format!(
                    "memory-backend-file,id=ram,size={}M,mem-path={},share=on",
                    spec.memory_mib,
                    file.display()
                )
            }
            // vhost-user (live mounts) needs RAM its server can map.
            _ if spec.live_mounts.is_some() => format!(
                "memory-backend-memfd,id=ram,size={}M,share=on",
                spec.memory_mib
            ),
            _ => format!("memory-backend-ram,id=ram,size={}M", spec.memory_mib),
        },
        "-smp".into(),
        spec.cpus.to_string(),
        "-nodefaults".into(),
        "-no-user-config".into(),
        "-display".into(),
        "none".into(),
        "-no-reboot".into(),
        "-chardev".into(),
        // Appending: the supervisor drops the log's head when it grows
        // too large (`console.rs`), and QEMU's writes must follow the end.
        format!("file,id=con,path={},append=on", path(files::CONSOLE)),
        "-serial".into(),
        "chardev:con".into(),
        // The backing chain is given explicitly, so the paths recorded
        // inside qcow2 layers (possibly from another host) never matter.
        "-blockdev".into(),
        serde_json::json!({
            "driver": "raw", "node-name": "base", "read-only": true,
            "file": {"driver": "file", "filename": spec.base_image, "read-only": true}
        })
        .to_string(),
    ];
    // A restore's read-only layers (see `RestoreSpec::disk_below`).
    let mut backing = "base".to_string();
    let below = spec
        .restore
        .as_ref()
        .map(|r| r.disk_below.as_slice())
        .unwrap_or_default();
    for (i, layer) in below.iter().enumerate() {
        let node = format!("below{i}");
        a.push("-blockdev".into());
        a.push(
            serde_json::json!({
                "driver": "qcow2", "node-name": node, "backing": backing, "read-only": true,
                "file": {"driver": "file", "filename": layer, "read-only": true}
            })
            .to_string(),
        );
        backing = node;
    }
    a.extend([
        "-blockdev".into(),
        serde_json::json!({
            "driver": "qcow2", "node-name": "root", "backing": backing, "discard": "unmap",
            "file": {"driver": "file", "filename": spec.disk}
        })
        .to_string(),
        "-device".into(),
        "virtio-blk-device,drive=root".into(),
    ]);
    // Copy-once mounts: the VM's layer over the cached lower, one disk for
    // all of them, found by the agent through its serial. After the root
    // disk, which the guest kernel then still names /dev/vda.
    if let Some(m) = &spec.mounts {
        a.extend([
            "-blockdev".into(),
            serde_json::json!({
                "driver": "raw", "node-name": "mlower", "read-only": true,
                "file": {"driver": "file", "filename": m.lower, "read-only": true}
            })
            .to_string(),
            "-blockdev".into(),
            serde_json::json!({
                "driver": "qcow2", "node-name": "mounts", "backing": "mlower", "discard": "unmap",
                "file": {"driver": "file", "filename": m.layer}
            })
            .to_string(),
            "-device".into(),
            format!(
                "virtio-blk-device,drive=mounts,serial={}",
                crate::mounts::DISK_SERIAL
            ),
        ]);
    }
    let netdev = match spec.network {
        // passt's end of the socket pair is QEMU's fd NET_FD (the
        // supervisor puts it there before exec).
        NetworkMode::Nat => Some(format!(
            "stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}"
        )),
        NetworkMode::NatHost => Some("user,id=net0".into()),
        NetworkMode::None => None,
    };
    if let Some(netdev) = netdev {
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
        ]);
    }
    a.extend([
        "-device".into(),
        "virtio-rng-device".into(),
        "-device".into(),
        "virtio-serial-device".into(),
        "-chardev".into(),
        format!(
            "socket,id=agent,path={},server=on,wait=off",
            path(files::AGENT)
        ),
        "-device".into(),
        format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
        "-qmp".into(),
        format!("unix:{},server=on,wait=off", path(files::QMP)),
    ]);
    if has_balloon(spec, host.qemu_version) {
        // Free page reporting: the guest hands freed 2 MiB blocks back
        // (QEMU punches them out of the VM's RAM file; a restore mapping a
        // bundle's file privately has the agent unbind the driver), so a
        // VM costs what it uses, not what it once touched, and its
        // snapshots copy less. No size target is set:
        // the balloon never takes memory the guest has not freed. Last, so
        // the other devices keep their places.
        a.extend([
            "-device".into(),
            "virtio-balloon-device,free-page-reporting=on".into(),
        ]);
    }
    // Live mounts: a virtio-fs device per mount, served by the virtiofsd
    // the supervisor listens for on its socket. After the balloon, so a
    // VM without them keeps its devices where they were.
    for (i, _) in spec
        .live_mounts
        .iter()
        .flat_map(|l| l.mounts.iter())
        .enumerate()
    {
        a.extend([
            "-chardev".into(),
            format!(
                "socket,id=live{i},path={}",
                path(&crate::live_mounts::socket_name(i))
            ),
            "-device".into(),
            format!(
                "vhost-user-fs-device,chardev=live{i},tag={},queue-size=1024",
                crate::live_mounts::tag(i)
            ),
        ]);
    }
    if let Some(restore) = &spec.restore {
        // No -kernel/-initrd: the restored guest's kernel is already in
        // its RAM and never reads fw_cfg again, while QEMU would keep a
        // private heap copy of the kernel image (13.5 MiB of PSS per VM)
        // for it. The migration stream does not carry fw_cfg's files, so
        // the devices still match the source's.
        a.push("-incoming".into());
        a.push("defer".into());
        if restore.gate {
            // Do not run the guest when the state is loaded: the launcher
            // releases it once the bundle is verified.
            a.push("-S".into());
        }
    } else {
        a.extend([
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initrd.display().to_string(),
            "-append".into(),
            kernel_cmdline(spec, host),
        ]);
    }
    a
}

/// The host's TSC frequency in kHz, when the CPU says it is constant.
pub fn host_tsc_khz() -> Option<u64> {
    if std::env::consts::ARCH != "x86_64" {
        return None;
    }
    tsc_khz_from_cpuinfo(&std::fs::read_to_string("/proc/cpuinfo").ok()?)
}

fn tsc_khz_from_cpuinfo(cpuinfo: &str) -> Option<u64> {
    let constant = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "constant_tsc"));
    if !constant {
        return None;
    }
    let mhz: f64 = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))?
        .split(':')
        .nth(1)?
        .trim()
        .parse()
        .ok()?;
    (mhz > 100.0).then(|| (mhz * 1000.0).round() as u64)
}

/// Guest hostname: the last segment of a path-shaped name, capped at 63.
fn hostname_for(name: &str) -> String {
    let last = name.rsplit('/').next().unwrap_or(name);
    let h: String = last
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(63)
        .collect();
    if h.is_empty() {
        "machinen".into()
    } else {
        h
    }
}

#[cfg(test)]
#[path = "qemu_args_tests.rs"]
mod tests;
