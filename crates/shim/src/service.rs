//! The task service containerd drives, and the shim's start and delete.
//!
//! One shim, one container, one VM (named `containerd/<namespace>/<id>`).
//! Not one VM per pod as Kata does: containerd checkpoints and restores a
//! *container*, and only a VM of its own can be snapshotted without its
//! neighbours; a pod's containers would also need one network namespace,
//! which separate VMs do not share (see docs/containerd.md).
//!
//! Create mounts the rootfs and packs it into an image (or takes over the
//! checkpoint it restores from); Start boots (or restores) the VM with the
//! spec's process as its main command; exec, kill, pause, checkpoint and
//! the rest act on it; Delete stops it and removes what the shim made.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use containerd_shim::api::Empty;
use containerd_shim::asynchronous::{spawn, ExitSignal};
use containerd_shim::event::Event;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config, Flags, StartOpts, TtrpcContext, TtrpcResult};
use containerd_shim_protos::api;
use containerd_shim_protos::events::task::{
    TaskCheckpointed, TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim_protos::protobuf::{EnumOrUnknown, Message, MessageField};
use containerd_shim_protos::types::task::{ProcessInfo, Status as TaskStatus};
use machinen::vm::{BootOptions, Vm};
use machinen::{ErrorCode, RestoreOptions};

use crate::process::{Proc, Status, Stdio};
use crate::spec::{self, Settings};
use crate::status::{from_machinen, refuse};

/// How long a stop of the VM may take before it is forced.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// The VM of container `id` in containerd namespace `ns`.
pub fn vm_name(ns: &str, id: &str) -> String {
    format!("containerd/{ns}/{id}")
}

/// Where the shim keeps a container's files (its rootfs image, the
/// checkpoint it was restored from): per containerd (by its socket's
/// address: two containerds on one host may both have `default/web`),
/// namespace and id.
fn state_dir(containerd: &str, ns: &str, id: &str) -> Result<PathBuf, machinen::Error> {
    let paths = machinen::Paths::from_env()?;
    let which = blake3::hash(containerd.as_bytes()).to_hex();
    Ok(paths
        .home
        .join("containers")
        .join(&which.as_str()[..12])
        .join(ns)
        .join(id))
}

pub struct Shim {
    exit: Arc<ExitSignal>,
    /// containerd's socket.
    address: String,
    namespace: String,
    id: String,
    bundle: String,
}

#[async_trait]
impl containerd_shim::asynchronous::Shim for Shim {
    type T = Service;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut Config) -> Self {
        Shim {
            exit: Arc::new(ExitSignal::default()),
            address: args.address.clone(),
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            bundle: args.bundle.clone(),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> containerd_shim::Result<String> {
        let grouping = opts.id.clone();
        let address = spawn(opts, &grouping, Vec::new()).await?;
        // In the bundle (our working directory), as the Go shims do: a
        // restarted containerd finds its running shims by this file.
        machinen::registry::write_atomic(Path::new("address"), address.as_bytes()).map_err(
            |e| containerd_shim::Error::IoError {
                context: "writing the bundle's address file".into(),
                err: e,
            },
        )?;
        Ok(address)
    }

    /// containerd's clean-up after a shim died: stop the VM, undo the
    /// rootfs mount, forget the container's files.
    async fn delete_shim(&mut self) -> containerd_shim::Result<api::DeleteResponse> {
        let bundle = if self.bundle.is_empty() {
            std::env::current_dir().unwrap_or_default()
        } else {
            PathBuf::from(&self.bundle)
        };
        let state = state_dir(&self.address, &self.namespace, &self.id).ok();
        tear_down(
            &vm_name(&self.namespace, &self.id),
            &bundle,
            state.as_deref(),
        )
        .await;
        Ok(api::DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> Service {
        Service {
            inner: Arc::new(Inner {
                exit: self.exit.clone(),
                address: self.address.clone(),
                namespace: self.namespace.clone(),
                publisher,
                containers: Mutex::new(HashMap::new()),
            }),
        }
    }
}

/// Undo what the shim made for a container: stop its VM (if it still runs)
/// and forget its entry, undo the rootfs mount, remove the shim's files.
/// The task's Delete and containerd's clean-up after a dead shim both end
/// here.
async fn tear_down(name: &str, bundle: &Path, state: Option<&Path>) {
    if let Ok(vm) = machinen::vm::attach(name).await {
        if let Err(e) = vm.stop(true, STOP_GRACE).await {
            log::warn!("stopping {name}: {e}");
        }
    }
    forget_vm(name).await;
    crate::rootfs::unmount(bundle);
    if let Some(dir) = state {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Remove an ended VM's registry entry (its logs went to containerd).
async fn forget_vm(name: &str) {
    let name = name.to_string();
    let _ = tokio::task::spawn_blocking(move || {
        let paths = machinen::Paths::from_env().ok()?;
        let reg = machinen::registry::Registry::new(&paths.registry);
        let e = reg.find_any(&name).ok()?;
        if !e.is_live() {
            let _ = reg.remove(&e.id);
        }
        Some(())
    })
    .await;
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
        ..Default::default()
    }
}

struct Container {
    id: String,
    bundle: PathBuf,
    settings: Settings,
    state: PathBuf,
    /// The packed rootfs; a restore's comes with its checkpoint.
    image: PathBuf,
    /// The checkpoint this container resumes (its own copy).
    checkpoint: Option<PathBuf>,
    init: Arc<Proc>,
    execs: Mutex<HashMap<String, Arc<Proc>>>,
    vm: Mutex<Option<Arc<Vm>>>,
}

impl Container {
    fn vm(&self) -> TtrpcResult<Arc<Vm>> {
        self.vm
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| refuse(ErrorCode::SnapshotStateInvalid, "the task has not started"))
    }

    fn process(&self, exec_id: &str) -> TtrpcResult<Arc<Proc>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                refuse(
                    ErrorCode::ContainerNotFound,
                    format!("container {} has no process {exec_id:?}", self.id),
                )
            })
    }

    fn live_processes(&self) -> Vec<Arc<Proc>> {
        let mut v = vec![self.init.clone()];
        v.extend(
            self.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .cloned(),
        );
        v.retain(|p| matches!(p.status(), Status::Running | Status::Paused));
        v
    }
}

struct Inner {
    exit: Arc<ExitSignal>,
    /// containerd's socket.
    address: String,
    namespace: String,
    publisher: RemotePublisher,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

#[derive(Clone)]
pub struct Service {
    inner: Arc<Inner>,
}

impl Inner {
    fn container(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| {
                refuse(
                    ErrorCode::ContainerNotFound,
                    format!("this shim has no container {id:?}"),
                )
            })
    }

    async fn publish(&self, ev: impl Event + 'static) {
        let topic = ev.topic();
        if let Err(e) = self
            .publisher
            .publish(Default::default(), &topic, &self.namespace, Box::new(ev))
            .await
        {
            log::warn!("publishing {topic}: {e}");
        }
    }
}

/// Publish the exit of `proc` of container `cid` from a sync callback.
fn exit_publisher(
    inner: Arc<Inner>,
    cid: String,
    exec_id: String,
    pid: u32,
) -> impl FnOnce(u32) + Send {
    move |code| {
        tokio::spawn(async move {
            inner
                .publish(TaskExit {
                    container_id: cid.clone(),
                    id: if exec_id.is_empty() { cid } else { exec_id },
                    pid,
                    exit_status: code,
                    exited_at: MessageField::some(timestamp(SystemTime::now())),
                    ..Default::default()
                })
                .await
        });
    }
}

fn io_error(what: &str, e: std::io::Error) -> containerd_shim_protos::ttrpc::Error {
    refuse(ErrorCode::Io, format!("{what}: {e}"))
}

fn blocking_err(e: tokio::task::JoinError) -> containerd_shim_protos::ttrpc::Error {
    refuse(ErrorCode::Io, format!("a blocking task failed: {e}"))
}

/// A spec `Process` from an exec request's `Any` (JSON, as containerd sends it).
fn exec_spec(any: &Any) -> TtrpcResult<spec::Process> {
    serde_json::from_slice(&any.value).map_err(|e| {
        refuse(
            ErrorCode::ContainerSpecInvalid,
            format!("the exec's process spec: {e}"),
        )
    })
}

/// Copy (sparse, hard links kept) or move `from` to `to`.
fn take_over(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::rename(from, to).is_ok() {
        return Ok(());
    }
    let st = std::process::Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(from)
        .arg(to)
        .status()?;
    if st.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!(
            "cp {} {} failed",
            from.display(),
            to.display()
        )))
    }
}

#[async_trait]
impl containerd_shim::Task for Service {
    async fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self
            .inner
            .container(&req.id)
            .map(|c| c.init.pid())
            .unwrap_or_default();
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    async fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let ns = self.inner.namespace.clone();
        let bundle = PathBuf::from(&req.bundle);
        let config = std::fs::read(bundle.join("config.json"))
            .map_err(|e| io_error("reading the bundle's config.json", e))?;
        let settings = spec::parse(&config)
            .and_then(|spec| spec.settings())
            .map_err(|f| from_machinen(&f.into()))?;
        let state = state_dir(&self.inner.address, &ns, &req.id).map_err(|e| from_machinen(&e))?;
        std::fs::create_dir_all(&state).map_err(|e| io_error("creating the shim's state", e))?;
        let (image, checkpoint) = if req.checkpoint.is_empty() {
            let root = crate::rootfs::mount(&req.rootfs, &bundle)
                .await
                .map_err(|f| from_machinen(&f.into()))?;
            let image = state.join("rootfs.tar");
            let out = image.clone();
            tokio::task::spawn_blocking(move || crate::rootfs::pack(&root, &out))
                .await
                .map_err(blocking_err)?
                .map_err(|f| from_machinen(&f.into()))?;
            (image, None)
        } else {
            // containerd removes its unpacked checkpoint once this returns.
            let dest = state.join("checkpoint");
            let _ = std::fs::remove_dir_all(&dest);
            let from = PathBuf::from(&req.checkpoint);
            let to = dest.clone();
            tokio::task::spawn_blocking(move || take_over(&from, &to))
                .await
                .map_err(blocking_err)?
                .map_err(|e| io_error("taking over the checkpoint", e))?;
            if !dest.join(CHECKPOINT_BUNDLE).join("meta.json").is_file() {
                return Err(refuse(
                    ErrorCode::RestoreBundleInvalid,
                    format!(
                        "{} holds no machinen checkpoint (made by another runtime?)",
                        req.checkpoint
                    ),
                ));
            }
            (dest.join(CHECKPOINT_ROOTFS), Some(dest))
        };
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        let container = Arc::new(Container {
            id: req.id.clone(),
            bundle: bundle.clone(),
            settings,
            state,
            image,
            checkpoint,
            init: Proc::new("", stdio, None),
            execs: Mutex::new(HashMap::new()),
            vm: Mutex::new(None),
        });
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(req.id.clone(), container);
        // The task's pid is the shim's: the VM's processes are not the
        // host's, and the shim lives exactly as long as the task.
        let pid = std::process::id();
        self.inner
            .publish(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                checkpoint: req.checkpoint.clone(),
                pid,
                ..Default::default()
            })
            .await;
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    async fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        let c = self.inner.container(&req.id)?;
        if !req.exec_id.is_empty() {
            return self.start_exec(&c, &req.exec_id).await;
        }
        if c.init.status() != Status::Created {
            return Err(refuse(
                ErrorCode::SnapshotStateInvalid,
                "the task was started already",
            ));
        }
        let set = &c.settings;
        let opts = set.exec.clone();
        let name = vm_name(&self.inner.namespace, &c.id);
        let ports = set.ports.clone();
        let pid = std::process::id();
        let on_exit = exit_publisher(self.inner.clone(), c.id.clone(), String::new(), pid);
        if let Some(cp) = &c.checkpoint {
            let mut ro = RestoreOptions::new(cp.join(CHECKPOINT_BUNDLE));
            ro.name = Some(name);
            ro.image = Some(c.image.clone());
            ro.detached = true;
            ro.ports = ports;
            ro.progress = machinen::progress::ProgressMode::Quiet;
            // The VM will be checkpointed again: its RAM its own.
            ro.own_ram = true;
            let vm = Arc::new(machinen::restore(ro).await.map_err(|e| from_machinen(&e))?);
            *c.vm.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm.clone());
            c.init
                .run_main(vm.clone(), pid, false, on_exit)
                .map_err(|e| io_error("following the restored task", e))?;
            // A checkpoint is taken paused (containerd pauses first).
            let _ = vm.signal_main(libc::SIGCONT, true).await;
        } else {
            let terminal = c.init.stdio.terminal;
            let boot = BootOptions {
                image: Some(c.image.clone()),
                name: Some(name),
                hostname: set.hostname.clone(),
                memory_mib: set.memory_mib,
                cpus: set.cpus,
                network: set.network,
                detached: true,
                progress: machinen::progress::ProgressMode::Quiet,
                ports,
                live_mounts: set.live_mounts.clone(),
                cmd: if terminal {
                    Vec::new()
                } else {
                    opts.argv.clone()
                },
                env: opts.env.clone(),
                cwd: opts.cwd.clone(),
                user: opts.user.clone(),
                rlimits: opts.rlimits.clone(),
                main_stdin: !terminal && !c.init.stdio.stdin.is_empty(),
                ..Default::default()
            };
            let vm = Arc::new(
                machinen::vm::boot(boot)
                    .await
                    .map_err(|e| from_machinen(&e))?,
            );
            *c.vm.lock().unwrap_or_else(|p| p.into_inner()) = Some(vm.clone());
            if terminal {
                let ws = crate::spec::winsize(set.console_size);
                let exec = vm.exec_session(opts, Some(ws)).await.map_err(|e| {
                    let vm = vm.clone();
                    tokio::spawn(async move { vm.shutdown(true, STOP_GRACE).await });
                    from_machinen(&e)
                })?;
                // The init's end is the container's: the VM goes with it.
                let vm2 = vm.clone();
                let on_exit = move |code| {
                    tokio::spawn(async move {
                        let _ = vm2.shutdown(true, STOP_GRACE).await;
                    });
                    on_exit(code)
                };
                c.init
                    .run_session(exec, on_exit)
                    .map_err(|e| io_error("connecting the task's stdio", e))?;
            } else {
                c.init
                    .run_main(vm, pid, true, on_exit)
                    .map_err(|e| io_error("connecting the task's stdio", e))?;
            }
        }
        self.inner
            .publish(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            })
            .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    async fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if matches!(p.status(), Status::Running | Status::Paused) {
            return Err(refuse(
                ErrorCode::SnapshotStateInvalid,
                "the process is running: kill it first (ctr tasks kill, or delete --force)",
            ));
        }
        let exit = p.exit();
        let resp = api::DeleteResponse {
            pid: p.pid(),
            exit_status: exit.map(|e| e.code).unwrap_or_default(),
            exited_at: MessageField::some(timestamp(
                exit.map(|e| e.at).unwrap_or_else(SystemTime::now),
            )),
            ..Default::default()
        };
        if !req.exec_id.is_empty() {
            c.execs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&req.exec_id);
            return Ok(resp);
        }
        // The container: its VM (gone already when the init ended), its
        // rootfs mount, the shim's files.
        drop(c.vm.lock().unwrap_or_else(|p| p.into_inner()).take());
        let name = vm_name(&self.inner.namespace, &c.id);
        tear_down(&name, &c.bundle, Some(&c.state)).await;
        self.inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&req.id);
        self.inner
            .publish(TaskDelete {
                container_id: req.id.clone(),
                pid: resp.pid,
                exit_status: resp.exit_status,
                exited_at: resp.exited_at.clone(),
                id: req.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(resp)
    }

    async fn pids(
        &self,
        _ctx: &TtrpcContext,
        req: api::PidsRequest,
    ) -> TtrpcResult<api::PidsResponse> {
        let c = self.inner.container(&req.id)?;
        let processes = c
            .live_processes()
            .iter()
            .map(|p| ProcessInfo {
                pid: p.pid(),
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    async fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        self.signal_all(&c, libc::SIGSTOP).await?;
        for p in c.live_processes() {
            p.set_status(Status::Paused);
        }
        self.inner
            .publish(TaskPaused {
                container_id: req.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        self.signal_all(&c, libc::SIGCONT).await?;
        for p in c.live_processes() {
            p.set_status(Status::Running);
        }
        self.inner
            .publish(TaskResumed {
                container_id: req.id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        if c.init.input().is_some() {
            return Err(refuse(
                ErrorCode::SnapshotStateInvalid,
                "a task with a terminal cannot be checkpointed: its terminal session would not survive the restore",
            ));
        }
        let vm = c.vm()?;
        let exit = checkpoint_exit(req.options.as_ref());
        let dir = PathBuf::from(&req.path);
        std::fs::create_dir_all(&dir)
            .map_err(|e| io_error("creating the checkpoint directory", e))?;
        vm.snapshot_full(
            &dir.join(CHECKPOINT_BUNDLE),
            !exit,
            machinen::restore::DEFAULT_SNAPSHOT_TIMEOUT,
            true,
        )
        .await
        .map_err(|e| from_machinen(&e))?;
        let (from, to) = (c.image.clone(), dir.join(CHECKPOINT_ROOTFS));
        tokio::task::spawn_blocking(move || {
            std::fs::hard_link(&from, &to).or_else(|_| std::fs::copy(&from, &to).map(|_| ()))
        })
        .await
        .map_err(blocking_err)?
        .map_err(|e| io_error("copying the rootfs into the checkpoint", e))?;
        self.inner
            .publish(TaskCheckpointed {
                container_id: req.id.clone(),
                checkpoint: req.path.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let sig = i32::try_from(req.signal).unwrap_or(-1);
        if p.status() == Status::Stopped {
            return Err(refuse(
                ErrorCode::MainNotRunning,
                "the process has already finished",
            ));
        }
        if p.status() == Status::Created {
            return Err(refuse(
                ErrorCode::SnapshotStateInvalid,
                "the process has not started",
            ));
        }
        if req.all && req.exec_id.is_empty() {
            for e in c.live_processes().iter().filter(|e| !e.exec_id.is_empty()) {
                if let Some(input) = e.input() {
                    let _ = input.signal(sig).await;
                }
            }
        }
        match p.input() {
            Some(input) => input.signal(sig).await.map_err(|e| from_machinen(&e))?,
            None => {
                c.vm()?
                    .signal_main(sig, req.all)
                    .await
                    .map_err(|e| from_machinen(&e))?;
            }
        }
        Ok(Empty::new())
    }

    async fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        let spec = exec_spec(req.spec.as_ref().unwrap_or(&Any::new()))?;
        spec::exec_options(&spec).map_err(|f| from_machinen(&f.into()))?;
        let stdio = Stdio::new(&req.stdin, &req.stdout, &req.stderr, req.terminal);
        {
            let mut execs = c.execs.lock().unwrap_or_else(|p| p.into_inner());
            if execs.contains_key(&req.exec_id) {
                return Err(refuse(
                    ErrorCode::ContainerSpecInvalid,
                    format!("exec id {:?} is in use", req.exec_id),
                ));
            }
            execs.insert(
                req.exec_id.clone(),
                Proc::new(&req.exec_id, stdio, Some(spec)),
            );
        }
        self.inner
            .publish(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            })
            .await;
        Ok(Empty::new())
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if let Some(input) = p.input().filter(|_| p.stdio.terminal) {
            let ws = machinen_proto::WinSize {
                rows: req.height.min(u16::MAX as u32) as u16,
                cols: req.width.min(u16::MAX as u32) as u16,
            };
            input.resize(ws).await.map_err(|e| from_machinen(&e))?;
        }
        Ok(Empty::new())
    }

    async fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        if req.stdin {
            p.io.close_input();
        }
        Ok(Empty::new())
    }

    async fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        let c = self.inner.container(&req.id)?;
        let vm = c.vm()?;
        let resources: spec::Resources = match req.resources.as_ref() {
            Some(any) if !any.value.is_empty() => {
                serde_json::from_slice(&any.value).map_err(|e| {
                    refuse(
                        ErrorCode::ContainerSpecInvalid,
                        format!("the update's resources: {e}"),
                    )
                })?
            }
            _ => return Ok(Empty::new()),
        };
        if let Some(limit) = resources.memory.and_then(|m| m.limit).filter(|l| *l > 0) {
            // The ceiling is fixed at boot; below it, the balloon gives the
            // guest exactly this much.
            let ceiling = (vm.info().memory_mib as u64) << 20;
            let target = (limit as u64).min(ceiling);
            vm.set_balloon(target, None)
                .await
                .map_err(|e| from_machinen(&e))?;
        }
        Ok(Empty::new())
    }

    async fn wait(
        &self,
        _ctx: &TtrpcContext,
        req: api::WaitRequest,
    ) -> TtrpcResult<api::WaitResponse> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let exit = p.wait().await;
        Ok(api::WaitResponse {
            exit_status: exit.code,
            exited_at: MessageField::some(timestamp(exit.at)),
            ..Default::default()
        })
    }

    async fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim_protos::cgroups::metrics::{MemoryEntry, MemoryStat, Metrics};
        let c = self.inner.container(&req.id)?;
        let vm = c.vm()?;
        let m = vm.memory_stats().await.map_err(|e| from_machinen(&e))?;
        let guest = m.guest;
        let metrics = Metrics {
            memory: MessageField::some(MemoryStat {
                cache: guest.map(|g| g.cached_bytes).unwrap_or_default(),
                rss: guest.map(|g| g.used_bytes).unwrap_or_default(),
                total_cache: guest.map(|g| g.cached_bytes).unwrap_or_default(),
                total_rss: guest.map(|g| g.used_bytes).unwrap_or_default(),
                usage: MessageField::some(MemoryEntry {
                    limit: m.ceiling_bytes,
                    usage: guest.map(|g| g.used_bytes).unwrap_or_default(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let stats = Any {
            type_url: "io.containerd.cgroups.v1.Metrics".to_string(),
            value: metrics
                .write_to_bytes()
                .map_err(|e| refuse(ErrorCode::Io, format!("encoding the stats: {e}")))?,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(stats),
            ..Default::default()
        })
    }

    async fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        let c = self.inner.container(&req.id)?;
        let p = c.process(&req.exec_id)?;
        let status = match p.status() {
            Status::Created => TaskStatus::CREATED,
            Status::Running => TaskStatus::RUNNING,
            Status::Paused => TaskStatus::PAUSED,
            Status::Stopped => TaskStatus::STOPPED,
        };
        let exit = p.exit();
        Ok(api::StateResponse {
            id: req.id.clone(),
            exec_id: req.exec_id.clone(),
            bundle: c.bundle.to_string_lossy().into_owned(),
            pid: p.pid(),
            status: EnumOrUnknown::new(status),
            stdin: p.stdio.stdin.clone(),
            stdout: p.stdio.stdout.clone(),
            stderr: p.stdio.stderr.clone(),
            terminal: p.stdio.terminal,
            exit_status: exit.map(|e| e.code).unwrap_or_default(),
            exited_at: match exit {
                Some(e) => MessageField::some(timestamp(e.at)),
                None => MessageField::none(),
            },
            ..Default::default()
        })
    }

    async fn shutdown(
        &self,
        _ctx: &TtrpcContext,
        _req: api::ShutdownRequest,
    ) -> TtrpcResult<Empty> {
        if self
            .inner
            .containers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
        {
            self.inner.exit.signal();
        }
        Ok(Empty::new())
    }
}

/// The checkpoint's files: the machinen bundle and the rootfs it runs on.
pub const CHECKPOINT_BUNDLE: &str = "machinen-bundle";
pub const CHECKPOINT_ROOTFS: &str = "rootfs.tar";

/// Whether the checkpoint options (runc's `CheckpointOptions`, which `ctr`
/// sends) ask the task to exit afterwards.
fn checkpoint_exit(options: Option<&Any>) -> bool {
    use containerd_shim_protos::shim::oci::CheckpointOptions;
    match options {
        Some(any) if any.type_url.ends_with("CheckpointOptions") => {
            CheckpointOptions::parse_from_bytes(&any.value)
                .map(|o| o.exit)
                .unwrap_or(false)
        }
        _ => false,
    }
}

impl Service {
    async fn start_exec(
        &self,
        c: &Arc<Container>,
        exec_id: &str,
    ) -> TtrpcResult<api::StartResponse> {
        let p = c.process(exec_id)?;
        if p.status() != Status::Created {
            return Err(refuse(
                ErrorCode::SnapshotStateInvalid,
                "the process was started already",
            ));
        }
        let vm = c.vm()?;
        let spec = p.spec.clone().unwrap_or_default();
        let opts = spec::exec_options(&spec).map_err(|f| from_machinen(&f.into()))?;
        let ws = p
            .stdio
            .terminal
            .then(|| crate::spec::winsize(spec.console_size));
        let exec = vm.exec_session(opts, ws).await.map_err(|e| {
            p.finish(if e.code() == ErrorCode::ExecCommandNotFound {
                127
            } else {
                126
            });
            from_machinen(&e)
        })?;
        let pid = exec.pid();
        let on_exit = exit_publisher(self.inner.clone(), c.id.clone(), exec_id.to_string(), pid);
        p.run_session(exec, on_exit)
            .map_err(|e| io_error("connecting the process's stdio", e))?;
        self.inner
            .publish(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            })
            .await;
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    /// `signal` to every live process of the container (each's group).
    async fn signal_all(&self, c: &Container, signal: i32) -> TtrpcResult<()> {
        for p in c.live_processes() {
            match p.input() {
                Some(input) => input.signal(signal).await.map_err(|e| from_machinen(&e))?,
                None => {
                    c.vm()?
                        .signal_main(signal, true)
                        .await
                        .map_err(|e| from_machinen(&e))?;
                }
            }
        }
        Ok(())
    }
}
