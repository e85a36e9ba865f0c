//! The QEMU engine: `qemu-system-<arch> -M microvm`, direct kernel boot,
//! driven over QMP.

use machinen_proto::timeouts;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use machinen::qemu_args::{passt_args, qemu_args, QemuHost, NET_FD};
use machinen::spec::{files, NetworkMode, VmSpec};
use qapi::futures::{QapiService, QmpStreamTokio};
use tokio::io::WriteHalf;
use tokio::net::UnixStream;
use tokio::process::{Child, Command};

use super::{Capabilities, Engine, EngineError, Exit, Machine};

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
    /// The host-side inputs of the command line (see `machinen::qemu_args`).
    host: QemuHost,
    /// The egress filter frames pass through (`--network nat`).
    net: Option<Arc<crate::netfilter::Net>>,
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

/// Put the egress filter between passt (`passt_fd`, our end of its socket
/// pair) and QEMU: returns the descriptor for QEMU.
fn filtered(
    net: &Arc<crate::netfilter::Net>,
    passt_fd: std::os::fd::OwnedFd,
) -> Result<std::os::fd::OwnedFd, EngineError> {
    let spawn_err = |source: std::io::Error| EngineError::Spawn {
        binary: "network filter".into(),
        source,
    };
    let (qemu_end, ours) = nix::sys::socket::socketpair(
        nix::sys::socket::AddressFamily::Unix,
        nix::sys::socket::SockType::Stream,
        None,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| spawn_err(e.into()))?;
    net.start(
        std::os::unix::net::UnixStream::from(ours),
        std::os::unix::net::UnixStream::from(passt_fd),
    )
    .map_err(spawn_err)?;
    Ok(qemu_end)
}

/// Start passt on one end of a socket pair; the other end is for QEMU.
fn spawn_passt(spec: &VmSpec) -> Result<(Child, std::os::fd::OwnedFd), EngineError> {
    use std::os::fd::AsRawFd;
    let binary = std::env::var_os(machinen_proto::env::PASST)
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
        let mut host = QemuHost::probe(accel);
        host.qemu_version = machinen::qemu_args::qemu_version(&binary);
        Ok(QemuEngine {
            caps: Capabilities {
                engine: "qemu",
                accel,
                cpu_model: host.cpu_model.clone(),
                binary,
                version: host.qemu_version,
            },
            host,
            net: None,
        })
    }

    pub fn with_net(mut self, net: Option<Arc<crate::netfilter::Net>>) -> QemuEngine {
        self.net = net;
        self
    }
}

pub(super) fn tail(path: &Path, max: usize) -> String {
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
                tokio::time::sleep(timeouts::STATE_POLL).await;
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
                let (child, passt_fd) = spawn_passt(spec)?;
                let net = self.net.clone().ok_or_else(|| EngineError::Spawn {
                    binary: "network filter".into(),
                    source: std::io::Error::other("no filter for a nat network"),
                })?;
                (Some(child), Some(filtered(&net, passt_fd)?))
            }
            NetworkMode::NatHost | NetworkMode::None => (None, None),
        };
        let virtiofsd = super::virtiofs::spawn_all(spec)?;
        let qemu_net_fd = net_fd.as_ref().map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = std::process::Command::new(&self.caps.binary);
        cmd.args(qemu_args(spec, &self.host))
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
            timeouts::QMP_CONNECT,
            "the QMP socket",
        )
        .await
        .map_err(|e| match e {
            // A live mount's server that could not start fails QEMU's
            // device: its own log says why.
            EngineError::EarlyExit { detail } => EngineError::EarlyExit {
                detail: detail + &super::virtiofs::log_tails(spec),
            },
            e => e,
        })?;
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
            virtiofsd,
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
    /// The live mounts' servers; they exit with QEMU's connection, and
    /// are killed on drop.
    virtiofsd: Vec<Child>,
    pid: u32,
    qmp: Qmp,
    log_path: PathBuf,
    agent_path: PathBuf,
}

impl QemuMachine {
    fn kill_helpers(&mut self) {
        for c in self.passt.iter_mut().chain(self.virtiofsd.iter_mut()) {
            let _ = c.start_kill();
        }
    }

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
    /// Wait until the migration in progress ends; errors carry QEMU's reason.
    async fn wait_migration(&self, deadline: Instant) -> Result<(), EngineError> {
        self.poll_migration(deadline, false).await.map(|_| ())
    }

    /// Wait for the migration to end, cancelling it at `deadline`. `live`:
    /// the guest runs meanwhile, and is paused if the copy has not
    /// converged after [`timeouts::PRECOPY_CONVERGE`]. Returns how long the
    /// guest has been paused by it (QEMU's downtime, or since we paused it).
    async fn poll_migration(&self, deadline: Instant, live: bool) -> Result<Duration, EngineError> {
        use qapi::qmp::MigrationStatus as S;
        let started = Instant::now();
        let mut paused_at: Option<Instant> = None;
        // A paused save of device state ends within milliseconds: poll
        // finely at first so the guest is not kept paused for the poll,
        // then back off to the usual pace for a long copy.
        let mut poll = timeouts::STATE_POLL_FIRST;
        loop {
            let info = self
                .qmp(
                    qapi::qmp::query_migrate {},
                    "query-migrate",
                    timeouts::QMP_COMMAND,
                )
                .await?;
            match info.status {
                Some(S::completed) => {
                    let qemu = Duration::from_millis(info.downtime.unwrap_or(0).max(0) as u64);
                    return Ok(paused_at.map_or(qemu, |t| t.elapsed().max(qemu)));
                }
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
                        timeouts::QMP_MIGRATE_CANCEL,
                    )
                    .await;
                return Err(EngineError::Timeout {
                    what: "the machine state to be written",
                });
            }
            if live && paused_at.is_none() && started.elapsed() >= timeouts::PRECOPY_CONVERGE {
                // Not converging: finish paused.
                tracing::info!("live snapshot copy did not converge; pausing the guest");
                self.pause().await?;
                paused_at = Some(Instant::now());
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(timeouts::STATE_POLL);
        }
    }

    /// Start writing the machine state to `path` (`exec:cat > path`).
    async fn start_save(&self, path: &Path) -> Result<(), EngineError> {
        // The default bandwidth cap (tens of MiB/s) is for live migration over
        // a network; a save to a local file should go flat out. The downtime
        // limit only matters to a live save (a paused guest is not running).
        let params: qapi::qmp::MigrateSetParameters = serde_json::from_value(serde_json::json!({
            "max-bandwidth": 64u64 << 30,
            "downtime-limit": timeouts::PRECOPY_DOWNTIME.as_millis() as u64,
        }))
        .map_err(|e| EngineError::Qmp {
            command: "migrate-set-parameters",
            detail: e.to_string(),
        })?;
        self.qmp(
            qapi::qmp::migrate_set_parameters(params),
            "migrate-set-parameters",
            timeouts::QMP_COMMAND,
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
        self.qmp(cmd, "migrate", timeouts::QMP_COMMAND)
            .await
            .map(|_| ())
    }

    /// Skip RAM that lives in a shared file (`x-ignore-shared`): it is
    /// copied (snapshot) or mapped (restore) as a file instead. Set on both
    /// sides of a migration.
    async fn ignore_shared_ram(&self) -> Result<(), EngineError> {
        let caps = qapi::qmp::migrate_set_capabilities {
            capabilities: vec![qapi::qmp::MigrationCapabilityStatus {
                capability: qapi::qmp::MigrationCapability::x_ignore_shared,
                state: true,
            }],
        };
        self.qmp(caps, "migrate-set-capabilities", timeouts::QMP_COMMAND)
            .await
            .map(|_| ())
    }
}

impl Machine for QemuMachine {
    /// Pause the vCPUs.
    async fn pause(&self) -> Result<(), EngineError> {
        self.qmp(qapi::qmp::stop {}, "stop", timeouts::QMP_COMMAND)
            .await
            .map(|_| ())
    }

    /// Resume the vCPUs.
    async fn resume(&self) -> Result<(), EngineError> {
        self.qmp(qapi::qmp::cont {}, "cont", timeouts::QMP_COMMAND)
            .await
            .map(|_| ())
    }

    async fn balloon(&self, target: Option<u64>) -> Result<u64, EngineError> {
        if let Some(t) = target {
            let value = i64::try_from(t).map_err(|_| EngineError::Qmp {
                command: "balloon",
                detail: format!("target {t} out of range"),
            })?;
            self.qmp(
                qapi::qmp::balloon { value },
                "balloon",
                timeouts::QMP_COMMAND,
            )
            .await?;
        }
        let info = self
            .qmp(
                qapi::qmp::query_balloon {},
                "query-balloon",
                timeouts::QMP_COMMAND,
            )
            .await?;
        Ok(u64::try_from(info.actual).unwrap_or(0))
    }

    /// Write the machine state (devices and RAM) to `path`. The VM must be
    /// paused; it stays paused.
    async fn save_state(&self, path: &Path, deadline: Instant) -> Result<(), EngineError> {
        self.start_save(path).await?;
        self.wait_migration(deadline).await
    }

    async fn save_state_live(
        &self,
        path: &Path,
        deadline: Instant,
    ) -> Result<Duration, EngineError> {
        self.start_save(path).await?;
        self.poll_migration(deadline, true).await
    }

    async fn new_disk_layer(
        &self,
        top_node: &str,
        file: &Path,
        new_node: &str,
    ) -> Result<(), EngineError> {
        let bad = |command: &'static str, e: serde_json::Error| EngineError::Qmp {
            command,
            detail: e.to_string(),
        };
        let opts: qapi::qmp::BlockdevOptions = serde_json::from_value(serde_json::json!({
            "driver": "qcow2", "node-name": new_node, "discard": "unmap", "backing": null,
            "file": {"driver": "file", "filename": file}
        }))
        .map_err(|e| bad("blockdev-add", e))?;
        self.qmp(
            qapi::qmp::blockdev_add(opts),
            "blockdev-add",
            timeouts::QMP_COMMAND,
        )
        .await?;
        let snap: qapi::qmp::BlockdevSnapshot = serde_json::from_value(serde_json::json!({
            "node": top_node, "overlay": new_node
        }))
        .map_err(|e| bad("blockdev-snapshot", e))?;
        self.qmp(
            qapi::qmp::blockdev_snapshot(snap),
            "blockdev-snapshot",
            timeouts::QMP_COMMAND,
        )
        .await
        .map(|_| ())
    }

    /// Load machine state from `path` into a QEMU started with
    /// `-incoming defer`; the guest runs again when it returns.
    /// `start`: run the guest once loaded. Otherwise it stays paused (QEMU
    /// was started with `-S`) until [`Machine::resume`].
    async fn load_state(
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
        self.qmp(cmd, "migrate-incoming", timeouts::QMP_COMMAND)
            .await?;
        self.wait_migration(deadline).await?;
        if start {
            // The guest autostarts after an incoming migration; make sure.
            let st = self
                .qmp(
                    qapi::qmp::query_status {},
                    "query-status",
                    timeouts::QMP_COMMAND,
                )
                .await?;
            if !st.running {
                self.resume().await?;
            }
        }
        Ok(())
    }

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
            .qmp(qapi::qmp::quit {}, "quit", timeouts::QMP_QUIT)
            .await;
        if tokio::time::timeout(timeouts::QEMU_EXIT_AFTER_QUIT, self.child.wait())
            .await
            .is_err()
        {
            self.kill();
        }
        self.kill_helpers();
    }

    fn kill(&mut self) {
        let _ = self.child.start_kill();
        self.kill_helpers();
    }
}
