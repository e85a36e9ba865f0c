//! The controller against a fake engine (`engine::fake`) and a scripted
//! agent (`fake_agent`), driven through the real control socket: the races
//! that a TCG boot makes slow and rare to see. (The e2e tests run the same
//! flows on real guests.)

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use machinen::spec::{files, NetworkMode, ReadyLine, RestoreSpec, VmSpec};
use machinen_proto::{self as proto, Frame, Request, Response, SnapshotRequest, VmState, VmStatus};
use tokio::io::{AsyncWriteExt, DuplexStream};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};
use tokio::task::{JoinHandle, LocalSet};

use super::*;
use crate::engine::fake::{FakeEngine, Script};
use crate::fake_agent::{Fake, Peer};

/// A VM under test: its directory, the fake's script and agent, the
/// control socket, and the controller's task.
struct Vm {
    dir: tempfile::TempDir,
    spec: VmSpec,
    shared: Arc<Shared>,
    script: Arc<Script>,
    agent: Option<Fake>,
    ready: Arc<StdMutex<Vec<ReadyLine>>>,
    /// The launcher's end of the restore gate.
    gate: Option<DuplexStream>,
    task: Option<JoinHandle<i32>>,
}

struct Options {
    /// Restore with a gate (the launcher's verdict) instead of booting.
    restore: bool,
    /// Start the scripted agent with the VM (otherwise `Vm::start_agent`).
    agent: bool,
    /// Set up the script before the controller starts.
    script: fn(&Script),
}

impl Default for Options {
    fn default() -> Options {
        Options {
            restore: false,
            agent: true,
            script: |_| {},
        }
    }
}

fn spec(root: &Path, restore: bool) -> VmSpec {
    let dir = root.join("vm");
    std::fs::create_dir_all(&dir).expect("test fixture");
    std::fs::write(root.join("vmlinuz"), b"fake kernel").expect("test fixture");
    std::fs::write(dir.join("disk.qcow2"), vec![7u8; 64 << 10]).expect("test fixture");
    VmSpec {
        id: "0123abcd".into(),
        name: "ctl".into(),
        hostname: None,
        dir: dir.clone(),
        kernel: root.join("vmlinuz"),
        initrd: root.join("initrd"),
        disk: dir.join("disk.qcow2"),
        base_image: root.join("base.ext4"),
        image_sha256: None,
        kernel_version: "6.1.0".into(),
        image: None,
        memory_mib: 256,
        cpus: 1,
        accel: None,
        qemu: None,
        boot_timeout_ms: 10_000,
        detached: true,
        debug: false,
        created_at_ms: 1,
        ports: Vec::new(),
        net_policy: Default::default(),
        net_learned: Vec::new(),
        egress_secrets: Vec::new(),
        zero_freed_memory: false,
        ram_file: None,
        restore: restore.then(|| RestoreSpec {
            bundle: root.join("bundle"),
            reset_tcp: false,
            ram: None,
            gate: true,
            disk_below: Vec::new(),
            link: None,
        }),
        network: NetworkMode::Nat,
        main: None,
        mounts: None,
        live_mounts: None,
        image_source: None,
        balloon: false,
        cpu_model: None,
    }
}

impl Vm {
    /// Set the VM up and start the controller (call inside a `LocalSet`).
    async fn start(opts: Options) -> Vm {
        let dir = tempfile::tempdir().expect("tmp");
        let spec = spec(dir.path(), opts.restore);
        let script = Script::new();
        (opts.script)(&script);
        let (stop_tx, stop_rx) = mpsc::channel(4);
        let (snap_tx, snap_rx) = mpsc::channel(4);
        let (balloon_tx, balloon_rx) = mpsc::channel(4);
        let shared = Arc::new(Shared {
            status: Mutex::new(VmStatus {
                state: VmState::Starting,
                reason: None,
                supervisor_pid: std::process::id(),
                qemu_pid: None,
                agent: None,
            }),
            agent: Mutex::new(None),
            stop_tx,
            snap_tx,
            balloon_tx,
            balloon_target: Mutex::new(None),
            pausing: AtomicBool::new(false),
            registry: None,
            net: None,
            egress: None,
        });
        let control = UnixListener::bind(spec.path_in(files::CONTROL)).expect("control socket");
        tokio::spawn(crate::control::serve(control, shared.clone()));
        let mut vm = Vm {
            dir,
            spec,
            shared,
            script,
            agent: None,
            ready: Arc::default(),
            gate: None,
            task: None,
        };
        // The engine watches the agent's poweroffs: start the agent first
        // and hand the engine its receiver; a late agent (`start_agent`)
        // gets a fresh one the engine does not see, which is fine for tests
        // that force the stop or do not stop.
        let (off_tx, off_rx) = tokio::sync::watch::channel(false);
        if opts.agent {
            vm.start_agent();
        }
        let powered_off = vm
            .agent
            .as_ref()
            .map(|a| a.powered_off.clone())
            .unwrap_or(off_rx);
        let _keep = off_tx;
        let engine = FakeEngine::new(vm.script.clone(), powered_off);
        let (gate, launcher_end) = tokio::io::duplex(64);
        vm.gate = Some(launcher_end);
        let ready = vm.ready.clone();
        let launcher = Launcher {
            gate,
            gone: Box::pin(std::future::pending()),
            term: Box::pin(std::future::pending()),
            ready: Box::new(move |l: &ReadyLine| ready.lock().expect("lock").push(l.clone())),
        };
        let channels = Channels {
            stop_rx,
            snap_rx,
            balloon_rx,
        };
        let (spec, shared) = (vm.spec.clone(), vm.shared.clone());
        vm.task = Some(tokio::task::spawn_local(async move {
            run(
                &engine,
                &spec,
                &shared,
                channels,
                Vec::new(),
                launcher,
                Instant::now(),
            )
            .await
        }));
        vm
    }

    fn start_agent(&mut self) {
        let listener = UnixListener::bind(self.spec.path_in(files::AGENT)).expect("agent socket");
        self.agent = Some(Fake::start(listener, Peer::Answer));
    }

    async fn state(&self) -> VmState {
        self.shared.state().await
    }

    async fn wait_for(&self, want: VmState) {
        let start = Instant::now();
        while self.state().await != want {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "still {} after 10 s, not {want}",
                self.state().await
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    async fn wait_for_call(&self, call: &str) {
        let start = Instant::now();
        while !self.script.calls().contains(&call) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "no {call} after 10 s: {:?}",
                self.script.calls()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// The controller's exit status, once it ended.
    async fn ended(&mut self) -> i32 {
        let task = self.task.take().expect("running");
        tokio::time::timeout(Duration::from_secs(20), task)
            .await
            .expect("the controller ends")
            .expect("join")
    }

    fn control(&self) -> PathBuf {
        self.spec.path_in(files::CONTROL)
    }

    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// One request on the control socket; its answer.
async fn ask(control: &Path, req: Request) -> Frame {
    let mut conn = UnixStream::connect(control).await.expect("connect");
    proto::send(&mut conn, &Frame::Request(req))
        .await
        .expect("send");
    tokio::time::timeout(Duration::from_secs(20), proto::read_frame(&mut conn))
        .await
        .expect("an answer in time")
        .expect("read")
        .expect("a frame")
}

fn snapshot(out: &Path, keep_alive: bool, timeout_ms: u64) -> Request {
    Request::Snapshot(SnapshotRequest {
        out: out.display().to_string(),
        keep_alive,
        timeout_ms,
        scratch: false,
        full: false,
        disk_only: false,
    })
}

fn error_code(f: &Frame) -> &str {
    match f {
        Frame::Error(e) => &e.code,
        other => panic!("not an error: {other:?}"),
    }
}

/// Nothing of a bundle is left at `out` or beside it.
fn no_bundle(out: &Path) {
    assert!(!out.exists(), "{} exists", out.display());
    let parent = out.parent().expect("test fixture");
    let leftovers: Vec<_> = std::fs::read_dir(parent)
        .expect("test fixture")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial-"))
        .collect();
    assert!(leftovers.is_empty(), "temp bundles left: {leftovers:?}");
}

fn local<F: std::future::Future>(f: F) -> F::Output {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("test fixture");
    LocalSet::new().block_on(&rt, f)
}

#[test]
fn a_stop_during_start_up_wins_over_running() {
    local(async {
        let mut vm = Vm::start(Options {
            agent: false,
            ..Options::default()
        })
        .await;
        // The engine runs; the agent is not there yet: start-up waits.
        vm.wait_for_call("launch").await;
        assert_eq!(vm.state().await, VmState::Starting);
        let answer = ask(&vm.control(), Request::Stop { force: true }).await;
        assert_eq!(answer, Frame::Response(Response::Stopping));
        assert_eq!(vm.state().await, VmState::Stopping);
        // Start-up completes: the VM must not come back as running.
        vm.start_agent();
        let code = vm.ended().await;
        assert_eq!(code, 0);
        assert_eq!(
            vm.state().await,
            VmState::Stopping,
            "the late start-up overwrote the stop"
        );
        assert_eq!(vm.script.calls(), ["launch", "quit"]);
    });
}

#[test]
fn a_graceful_stop_powers_the_guest_off() {
    local(async {
        let mut vm = Vm::start(Options::default()).await;
        vm.wait_for(VmState::Running).await;
        assert!(matches!(
            vm.ready.lock().expect("lock").as_slice(),
            [ReadyLine::Ready { .. }]
        ));
        let answer = ask(&vm.control(), Request::Stop { force: false }).await;
        assert_eq!(answer, Frame::Response(Response::Stopping));
        assert_eq!(vm.ended().await, 0);
        let seen = vm
            .agent
            .as_ref()
            .expect("test fixture")
            .seen
            .lock()
            .expect("lock")
            .clone();
        assert!(seen.iter().any(|r| r == "Poweroff"), "{seen:?}");
        assert_eq!(vm.script.calls(), ["launch"], "no quit after a poweroff");
    });
}

#[test]
fn a_snapshot_during_a_stop_is_refused_and_never_taken() {
    local(async {
        let mut vm = Vm::start(Options::default()).await;
        vm.wait_for(VmState::Running).await;
        let out = vm.out("late-bundle");
        // The stop is answered once the VM is stopping; the snapshot comes
        // after it, whichever way the controller sees the two.
        let stop = ask(&vm.control(), Request::Stop { force: true }).await;
        assert_eq!(stop, Frame::Response(Response::Stopping));
        let answer = ask(&vm.control(), snapshot(&out, true, 0)).await;
        assert_eq!(error_code(&answer), "SNAPSHOT_STATE_INVALID", "{answer:?}");
        assert_eq!(vm.ended().await, 0);
        assert!(
            !vm.script.calls().contains(&"save"),
            "{:?}",
            vm.script.calls()
        );
        no_bundle(&out);
    });
}

#[test]
fn a_snapshot_past_its_deadline_leaves_no_bundle_and_the_source_running() {
    local(async {
        let mut vm = Vm::start(Options {
            script: |s| s.save_ms.store(5_000, Ordering::SeqCst),
            ..Options::default()
        })
        .await;
        vm.wait_for(VmState::Running).await;
        let out = vm.out("slow-bundle");

        // A guest slow to flush its filesystems: the deadline passes
        // before anything was paused.
        let agent = vm.agent.as_ref().expect("test fixture");
        agent.quiesce_ms.store(2_000, Ordering::SeqCst);
        let answer = ask(&vm.control(), snapshot(&out, false, 300)).await;
        assert_eq!(error_code(&answer), "SNAPSHOT_TIMEOUT", "{answer:?}");
        no_bundle(&out);
        assert_eq!(vm.state().await, VmState::Running);
        assert_eq!(vm.script.calls(), ["launch", "resume"]);
        agent.quiesce_ms.store(0, Ordering::SeqCst);
        vm.script.calls.lock().expect("lock").clear();

        let t0 = Instant::now();
        // Destructive: on success the source would stop.
        let answer = ask(&vm.control(), snapshot(&out, false, 300)).await;
        assert_eq!(error_code(&answer), "SNAPSHOT_TIMEOUT", "{answer:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "the deadline did not bound the save"
        );
        no_bundle(&out);
        assert!(!vm.spec.path_in(crate::snapshot::PARTIAL_MARKER).exists());
        assert_eq!(vm.state().await, VmState::Running);
        assert_eq!(vm.script.calls(), ["pause", "save", "resume"]);

        // The source runs on and can still be snapshotted.
        vm.script.save_ms.store(0, Ordering::SeqCst);
        let answer = ask(&vm.control(), snapshot(&out, false, 0)).await;
        let Frame::Response(Response::Snapshotted(report)) = answer else {
            panic!("{answer:?}")
        };
        assert_eq!(report.out, out.display().to_string());
        assert!(out.join(machinen::bundle::MANIFEST).is_file());
        assert_eq!(
            vm.ended().await,
            0,
            "a destructive snapshot ends the source"
        );
        assert_eq!(vm.script.calls().last(), Some(&"quit"));
    });
}

#[test]
fn a_client_gone_mid_snapshot_does_not_change_the_outcome() {
    local(async {
        let mut vm = Vm::start(Options {
            script: |s| s.save_ms.store(400, Ordering::SeqCst),
            ..Options::default()
        })
        .await;
        vm.wait_for(VmState::Running).await;

        // Keep-alive: the client leaves while the state is being saved;
        // the bundle completes and the source runs on.
        let kept = vm.out("kept");
        let mut conn = UnixStream::connect(vm.control())
            .await
            .expect("test fixture");
        proto::send(&mut conn, &Frame::Request(snapshot(&kept, true, 0)))
            .await
            .expect("test fixture");
        vm.wait_for(VmState::Snapshotting).await;
        conn.shutdown().await.expect("test fixture");
        drop(conn);
        vm.wait_for(VmState::Running).await;
        assert!(kept.join(machinen::bundle::MANIFEST).is_file());
        assert_eq!(vm.script.calls(), ["launch", "pause", "save", "resume"]);

        // Destructive: the bundle is complete, so the source stops even
        // though nobody is there to hear it.
        let gone = vm.out("gone");
        let mut conn = UnixStream::connect(vm.control())
            .await
            .expect("test fixture");
        proto::send(&mut conn, &Frame::Request(snapshot(&gone, false, 0)))
            .await
            .expect("test fixture");
        vm.wait_for_call("save").await;
        drop(conn);
        assert_eq!(vm.ended().await, 0);
        assert!(gone.join(machinen::bundle::MANIFEST).is_file());
        assert_eq!(vm.script.calls().last(), Some(&"quit"));
    });
}

/// Restore with the gate answered `verdict` (`None`: the launcher's end
/// closes) while the state loads; the controller's exit status and the
/// ready line.
async fn restore_with(verdict: Option<&'static [u8]>, load_fails: bool) -> (Vm, i32, ReadyLine) {
    let mut vm = Vm::start(Options {
        restore: true,
        script: if load_fails {
            |s| s.load_fails.store(true, Ordering::SeqCst)
        } else {
            |s| s.load_ms.store(200, Ordering::SeqCst)
        },
        ..Options::default()
    })
    .await;
    vm.wait_for_call("load").await;
    let mut gate = vm.gate.take().expect("test fixture");
    match verdict {
        Some(line) => gate.write_all(line).await.expect("test fixture"),
        None => drop(gate),
    }
    // A verdict of `go` leaves a running VM: stop it.
    if verdict == Some(b"go\n") {
        vm.wait_for(VmState::Running).await;
        ask(&vm.control(), Request::Stop { force: true }).await;
    }
    let code = vm.ended().await;
    let ready = vm
        .ready
        .lock()
        .expect("test fixture")
        .first()
        .cloned()
        .expect("a ready line");
    (vm, code, ready)
}

#[test]
fn a_restore_refused_by_its_gate_never_runs_the_guest() {
    local(async {
        for verdict in [Some(&b"no\n"[..]), None] {
            let (vm, code, ready) = restore_with(verdict, false).await;
            assert_eq!(code, 1, "{verdict:?}");
            let ReadyLine::Failed { code, message, .. } = ready else {
                panic!("{ready:?}")
            };
            assert_eq!(code, "RESTORE_BUNDLE_INVALID");
            assert!(message.contains("before the guest ran"), "{message}");
            assert_eq!(vm.script.calls(), ["launch", "load", "kill"], "{verdict:?}");
        }

        let (vm, code, ready) = restore_with(Some(b"no\n"), true).await;
        assert_eq!(code, 1);
        let ReadyLine::Failed { code, message, .. } = ready else {
            panic!("{ready:?}")
        };
        assert_eq!(code, "RESTORE_BUNDLE_INVALID");
        assert!(message.contains("could not load"), "{message}");
        assert!(!vm.script.calls().contains(&"resume"));

        // Go: the guest runs once the state is loaded, and is repaired.
        let (vm, code, ready) = restore_with(Some(b"go\n"), false).await;
        assert_eq!(code, 0);
        assert!(matches!(ready, ReadyLine::Ready { .. }), "{ready:?}");
        assert_eq!(vm.script.calls(), ["launch", "load", "resume", "quit"]);
        let seen = vm
            .agent
            .as_ref()
            .expect("test fixture")
            .seen
            .lock()
            .expect("lock")
            .clone();
        assert!(seen.iter().any(|r| r == "Fixup"), "{seen:?}");
    });
}

#[test]
fn an_engine_that_dies_is_recorded_as_a_crash() {
    local(async {
        let mut vm = Vm::start(Options::default()).await;
        vm.wait_for(VmState::Running).await;
        vm.script.end(crate::engine::Exit {
            signal: Some(libc::SIGKILL),
            ..Default::default()
        });
        assert_eq!(vm.ended().await, 1);
        assert_eq!(vm.state().await, VmState::Crashed);
        // The VM's directory is kept for `logs` and `gc`.
        assert!(vm.spec.dir.is_dir());
    });
}
