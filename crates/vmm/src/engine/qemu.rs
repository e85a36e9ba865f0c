//! The QEMU engine: `qemu-system-<arch> -M microvm`, direct kernel boot,
//! driven over QMP.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use futures::StreamExt;
use machinen::spec::{files, NetworkMode, VmSpec};
use machinen_proto::AGENT_PORT_NAME;
use qapi::futures::{QapiService, QmpStreamTokio};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::{Accel, Capabilities, Engine, EngineError, Exit, Machine};

type Qmp = QapiService<QmpStreamTokio<WriteHalf<UnixStream>>>;

/// QEMU binary name for the host architecture.
pub fn default_binary() -> String {
    format!("qemu-system-{}", std::env::consts::ARCH)
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join(name))
                .find(|c| c.is_file())
        })
        .unwrap_or(None)
}

pub struct QemuEngine {
    caps: Capabilities,
}

/// The descriptor number under which QEMU and passt each find their end of
/// the socket pair that carries the guest's Ethernet frames.
const NET_FD: i32 = 3;

/// passt's arguments: the guest's addresses as QEMU's user networking gives
/// them (the agent configures the guest statically for those), DNS queries
/// to 10.0.2.3 forwarded to the host's resolver, and `--no-map-gw`: the
/// gateway is not an alias of the host, so nothing bound to the host's
/// loopback (other VMs' port forwards included) is reachable. IPv4 only:
/// one address family to reason about.
fn passt_args() -> Vec<String> {
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

/// Make `fd` the child's descriptor [`NET_FD`] (inheritable: `dup2` clears
/// close-on-exec on the copy). Runs between fork and exec.
fn inherit_as_net_fd(fd: i32) -> std::io::Result<()> {
    // SAFETY: dup2 is async-signal-safe; both descriptors are valid in the
    // child (the socket pair was created before fork).
    if unsafe { libc::dup2(fd, NET_FD) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Start passt on one end of a socket pair; the other end is for QEMU.
fn spawn_passt(spec: &VmSpec) -> Result<(Child, std::os::fd::OwnedFd), EngineError> {
    use std::os::fd::AsRawFd;
    let binary = std::env::var_os("MACHINEN_PASST")
        .map(PathBuf::from)
        .or_else(|| find_in_path("passt"))
        .ok_or(EngineError::Missing {
            binary: "passt".into(),
        })?;
    let (ours, theirs) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| EngineError::Spawn {
        binary: "socketpair".into(),
        source: e.into(),
    })?;
    let log = std::fs::File::create(spec.path_in(files::PASST_LOG)).map_err(|source| {
        EngineError::Spawn {
            binary: files::PASST_LOG.into(),
            source,
        }
    })?;
    let mut cmd = std::process::Command::new(&binary);
    cmd.args(passt_args())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|source| EngineError::Spawn {
            binary: files::PASST_LOG.into(),
            source,
        })?)
        .stderr(log);
    let fd = theirs.as_raw_fd();
    // SAFETY: only async-signal-safe calls (prctl, dup2) between fork and
    // exec. PDEATHSIG: passt dies with the supervisor, like QEMU.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            inherit_as_net_fd(fd)
        });
    }
    let child = Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| EngineError::Spawn {
            binary: binary.display().to_string(),
            source,
        })?;
    drop(theirs);
    Ok((child, ours))
}

impl QemuEngine {
    pub fn probe(spec: &VmSpec) -> Result<QemuEngine, EngineError> {
        let name = spec
            .qemu
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(default_binary);
        let binary = find_in_path(&name).ok_or(EngineError::Missing { binary: name })?;
        let accel = machinen::accel::probe(spec.accel.as_deref())?;
        let cpu_model = accel.cpu_model().to_string();
        Ok(QemuEngine {
            caps: Capabilities {
                engine: "qemu",
                accel,
                cpu_model,
                binary,
            },
        })
    }

    /// The full QEMU command line for `spec`.
    pub fn args(&self, spec: &VmSpec) -> Vec<OsString> {
        let mut cmdline = vec![
            "console=ttyS0".to_string(),
            "quiet".into(),
            "panic=-1".into(),
            "machinen.net=1".into(),
            format!("machinen.hostname={}", hostname_for(&spec.name)),
        ];
        // Under TCG the guest TSC ticks at the host's TSC rate, but the
        // kernel's PIT calibration of it fails when the host is busy (the
        // vCPU thread is descheduled mid-measurement); the kernel then falls
        // back to jiffies before timers run and hangs early in boot. Measured:
        // 4 parallel boots on 2 cores hung 4/4 without this, 8/8 booted with it.
        if self.caps.accel == Accel::Tcg {
            if let Some(khz) = host_tsc_khz() {
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
        // Extra kernel arguments, a debugging knob (e.g. `initcall_debug`).
        if let Ok(extra) = std::env::var("MACHINEN_KERNEL_ARGS") {
            cmdline.extend(extra.split_whitespace().map(String::from));
        }
        if spec.debug {
            cmdline.push("machinen.debug=1".into());
            cmdline.retain(|a| a != "quiet");
        }
        let path = |f: &str| spec.path_in(f).display().to_string();
        let mut a: Vec<String> = vec![
            "-M".into(),
            "microvm,acpi=on,memory-backend=ram".into(),
            "-accel".into(),
            match self.caps.accel {
                Accel::Tcg if spec.cpus > 1 => "tcg,thread=multi".into(),
                other => other.as_str().into(),
            },
            "-cpu".into(),
            self.caps.cpu_model.clone(),
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
                    format!(
                        "memory-backend-file,id=ram,size={}M,mem-path={},share=off",
                        spec.memory_mib,
                        ram.display()
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
            "-blockdev".into(),
            serde_json::json!({
                "driver": "qcow2", "node-name": "root", "backing": "base", "discard": "unmap",
                "file": {"driver": "file", "filename": spec.disk}
            })
            .to_string(),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-netdev".into(),
            match spec.network {
                // passt's end of the socket pair is QEMU's fd 3 (see `launch`).
                NetworkMode::Nat => {
                    format!("stream,id=net0,server=off,addr.type=fd,addr.str={NET_FD}")
                }
                NetworkMode::NatHost => "user,id=net0".into(),
            },
            "-device".into(),
            "virtio-net-device,netdev=net0".into(),
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
        ];
        if spec.restore.is_some() {
            // No -kernel/-initrd: the restored guest's kernel is already in
            // its RAM and never reads fw_cfg again, while QEMU would keep a
            // private heap copy of the kernel image (13.5 MiB of PSS per VM)
            // for it. The migration stream does not carry fw_cfg's files, so
            // the devices still match the source's.
            a.push("-incoming".into());
            a.push("defer".into());
            if spec.restore.as_ref().is_some_and(|r| r.gate) {
                // Do not run the guest when the state is loaded (see `gate`).
                a.push("-S".into());
            }
        } else {
            a.extend([
                "-kernel".into(),
                spec.kernel.display().to_string(),
                "-initrd".into(),
                spec.initrd.display().to_string(),
            ]);
            a.extend(["-append".into(), cmdline.join(" ")]);
        }
        a.into_iter().map(OsString::from).collect()
    }
}

/// The host's TSC frequency in kHz, when the CPU says it is constant.
fn host_tsc_khz() -> Option<u64> {
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

fn tail(path: &Path, max: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let s = s.trim();
    let start = s.len().saturating_sub(max);
    let start = (start..s.len())
        .find(|i| s.is_char_boundary(*i))
        .unwrap_or(s.len());
    s[start..].to_string()
}

async fn connect_retry(
    path: &Path,
    child: &mut Child,
    log: &Path,
    timeout: Duration,
    what: &'static str,
) -> Result<UnixStream, EngineError> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(path).await {
            Ok(s) => return Ok(s),
            Err(_) if Instant::now() < deadline => {
                if let Ok(Some(status)) = child.try_wait() {
                    return Err(EngineError::EarlyExit {
                        detail: format!("{status}: {}", tail(log, 2000)),
                    });
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err(_) => return Err(EngineError::Timeout { what }),
        }
    }
}

impl Engine for QemuEngine {
    type Machine = QemuMachine;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn launch(&self, spec: &VmSpec) -> Result<QemuMachine, EngineError> {
        let log_path = spec.path_in(files::QEMU_LOG);
        let log = machinen::vm::private_file(&log_path).map_err(|source| EngineError::Spawn {
            binary: "qemu.log".into(),
            source,
        })?;
        // QEMU creates the console file 0666 minus the umask; made here
        // first, it is the owner's only whatever the umask (QEMU keeps the
        // mode of a file that exists).
        let console = spec.path_in(files::CONSOLE);
        machinen::vm::private_file(&console).map_err(|source| EngineError::Spawn {
            binary: "console.log".into(),
            source,
        })?;
        let (passt, net_fd) = match spec.network {
            NetworkMode::Nat => {
                let (child, fd) = spawn_passt(spec)?;
                (Some(child), Some(fd))
            }
            NetworkMode::NatHost => (None, None),
        };
        let qemu_net_fd = net_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = std::process::Command::new(&self.caps.binary);
        cmd.args(self.args(spec))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        // SAFETY: prctl(PR_SET_PDEATHSIG) and dup2 are async-signal-safe and
        // touch no memory of the parent; PDEATHSIG makes QEMU die with its
        // supervisor, even on SIGKILL. The supervisor runs a single-threaded
        // runtime, so the "parent" is the thread that lives as long as the
        // process.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                match qemu_net_fd {
                    Some(fd) => inherit_as_net_fd(fd),
                    None => Ok(()),
                }
            });
        }
        let mut child = Command::from(cmd)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| EngineError::Spawn {
                binary: self.caps.binary.display().to_string(),
                source,
            })?;
        // QEMU holds its end now.
        drop(net_fd);
        let pid = child.id().unwrap_or(0);
        let qmp_sock = connect_retry(
            &spec.path_in(files::QMP),
            &mut child,
            &log_path,
            Duration::from_secs(20),
            "the QMP socket",
        )
        .await?;
        let stream = QmpStreamTokio::open(qmp_sock)
            .await
            .map_err(|e| EngineError::Qmp {
                command: "greeting",
                detail: e.to_string(),
            })?
            .negotiate()
            .await
            .map_err(|e| EngineError::Qmp {
                command: "qmp_capabilities",
                detail: e.to_string(),
            })?;
        let (qmp, mut events) = stream.into_parts();
        tokio::spawn(async move {
            while let Some(ev) = events.next().await {
                match ev {
                    Ok(ev) => tracing::info!("qmp event: {ev:?}"),
                    Err(e) => {
                        tracing::warn!("qmp stream error: {e}");
                        break;
                    }
                }
            }
        });
        Ok(QemuMachine {
            child,
            passt,
            pid,
            qmp,
            log_path,
            agent_path: spec.path_in(files::AGENT),
        })
    }
}

pub struct QemuMachine {
    child: Child,
    /// The user-mode network stack (`--network nat`); killed on drop.
    passt: Option<Child>,
    pid: u32,
    qmp: Qmp,
    log_path: PathBuf,
    agent_path: PathBuf,
}

impl QemuMachine {
    /// Run a QMP command with a bound on the wait.
    pub async fn qmp<C>(
        &self,
        command: C,
        name: &'static str,
        timeout: Duration,
    ) -> Result<C::Ok, EngineError>
    where
        C: qapi::Command,
        QmpStreamTokio<WriteHalf<UnixStream>>:
            futures::Sink<qapi::Execute<C, u32>, Error = std::io::Error> + Unpin,
    {
        match tokio::time::timeout(timeout, self.qmp.execute(command)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(EngineError::Qmp {
                command: name,
                detail: e.to_string(),
            }),
            Err(_) => Err(EngineError::Timeout { what: name }),
        }
    }
}

/// Quote `s` for `/bin/sh` (QEMU runs `exec:` migration URIs through it).
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl QemuMachine {
    /// Pause the vCPUs.
    pub async fn pause(&self) -> Result<(), EngineError> {
        self.qmp(qapi::qmp::stop {}, "stop", Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Resume the vCPUs.
    pub async fn resume(&self) -> Result<(), EngineError> {
        self.qmp(qapi::qmp::cont {}, "cont", Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Wait until the migration in progress ends; errors carry QEMU's reason.
    async fn wait_migration(&self, deadline: Instant) -> Result<(), EngineError> {
        use qapi::qmp::MigrationStatus as S;
        loop {
            let info = self
                .qmp(
                    qapi::qmp::query_migrate {},
                    "query-migrate",
                    Duration::from_secs(10),
                )
                .await?;
            match info.status {
                Some(S::completed) => return Ok(()),
                Some(S::failed) | Some(S::cancelled) => {
                    return Err(EngineError::Qmp {
                        command: "migrate",
                        detail: info.error_desc.unwrap_or_else(|| "migration failed".into()),
                    });
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                let _ = self
                    .qmp(
                        qapi::qmp::migrate_cancel {},
                        "migrate_cancel",
                        Duration::from_secs(5),
                    )
                    .await;
                return Err(EngineError::Timeout {
                    what: "the machine state to be written",
                });
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Skip RAM that lives in a shared file (`x-ignore-shared`): it is
    /// copied (snapshot) or mapped (restore) as a file instead. Set on both
    /// sides of a migration.
    pub async fn ignore_shared_ram(&self) -> Result<(), EngineError> {
        let caps = qapi::qmp::migrate_set_capabilities {
            capabilities: vec![qapi::qmp::MigrationCapabilityStatus {
                capability: qapi::qmp::MigrationCapability::x_ignore_shared,
                state: true,
            }],
        };
        self.qmp(caps, "migrate-set-capabilities", Duration::from_secs(10))
            .await
            .map(|_| ())
    }

    /// Write the machine state (devices and RAM) to `path`. The VM must be
    /// paused; it stays paused.
    pub async fn save_state(&self, path: &Path, deadline: Instant) -> Result<(), EngineError> {
        // The default bandwidth cap (tens of MiB/s) is for live migration over
        // a network; a paused VM saving to a local file should go flat out.
        let params: qapi::qmp::MigrateSetParameters = serde_json::from_value(
            serde_json::json!({"max-bandwidth": 64u64 << 30}),
        )
        .map_err(|e| EngineError::Qmp {
            command: "migrate-set-parameters",
            detail: e.to_string(),
        })?;
        self.qmp(
            qapi::qmp::migrate_set_parameters(params),
            "migrate-set-parameters",
            Duration::from_secs(10),
        )
        .await?;
        self.ignore_shared_ram().await?;
        let uri = format!("exec:cat > {}", sh_quote(&path.display().to_string()));
        let cmd = qapi::qmp::migrate {
            uri: Some(uri),
            channels: None,
            detach: None,
            resume: None,
        };
        self.qmp(cmd, "migrate", Duration::from_secs(10)).await?;
        self.wait_migration(deadline).await
    }

    /// Load machine state from `path` into a QEMU started with
    /// `-incoming defer`; the guest runs again when it returns.
    /// `start`: run the guest once loaded. Otherwise it stays paused (QEMU
    /// was started with `-S`) until [`QemuMachine::resume`].
    pub async fn load_state(
        &self,
        path: &Path,
        deadline: Instant,
        start: bool,
    ) -> Result<(), EngineError> {
        self.ignore_shared_ram().await?;
        let uri = format!("exec:cat {}", sh_quote(&path.display().to_string()));
        let cmd = qapi::qmp::migrate_incoming {
            uri: Some(uri),
            channels: None,
            exit_on_error: None,
        };
        self.qmp(cmd, "migrate-incoming", Duration::from_secs(10))
            .await?;
        self.wait_migration(deadline).await?;
        if start {
            // The guest autostarts after an incoming migration; make sure.
            let st = self
                .qmp(
                    qapi::qmp::query_status {},
                    "query-status",
                    Duration::from_secs(10),
                )
                .await?;
            if !st.running {
                self.resume().await?;
            }
        }
        Ok(())
    }
}

impl Machine for QemuMachine {
    fn pid(&self) -> u32 {
        self.pid
    }

    async fn connect_agent(&mut self, timeout: Duration) -> Result<UnixStream, EngineError> {
        let path = self.agent_path.clone();
        let log = self.log_path.clone();
        connect_retry(&path, &mut self.child, &log, timeout, "the agent socket").await
    }

    async fn wait(&mut self) -> Exit {
        use std::os::unix::process::ExitStatusExt;
        match self.child.wait().await {
            Ok(status) => Exit {
                code: status.code(),
                signal: status.signal(),
                log_tail: tail(&self.log_path, 1000),
                wait_error: None,
            },
            Err(e) => Exit {
                wait_error: Some(e.to_string()),
                ..Exit::default()
            },
        }
    }

    async fn quit(&mut self) {
        let _ = self
            .qmp(qapi::qmp::quit {}, "quit", Duration::from_secs(2))
            .await;
        if tokio::time::timeout(Duration::from_secs(3), self.child.wait())
            .await
            .is_err()
        {
            self.kill();
        }
        if let Some(p) = &mut self.passt {
            let _ = p.start_kill();
        }
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
        if let Some(p) = &mut self.passt {
            let _ = p.start_kill();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_frequency_from_cpuinfo() {
        let ok = "cpu MHz\t\t: 2596.122\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
        assert_eq!(tsc_khz_from_cpuinfo(ok), Some(2_596_122));
        assert_eq!(
            tsc_khz_from_cpuinfo("cpu MHz : 2596.1\nflags : fpu tsc\n"),
            None,
            "no constant_tsc"
        );
        assert_eq!(tsc_khz_from_cpuinfo("flags : constant_tsc\n"), None);
        assert_eq!(
            tsc_khz_from_cpuinfo("cpu MHz : junk\nflags : constant_tsc\n"),
            None
        );
    }

    #[test]
    fn hostnames_are_valid() {
        assert_eq!(hostname_for("team/app/web"), "web");
        assert_eq!(hostname_for("a.b_c"), "a-b-c");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }
}
