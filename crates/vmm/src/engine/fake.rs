//! A fake engine for the controller's unit tests: no guest, scripted
//! timings and failures, every call recorded. Its "guest agent" is the
//! scripted peer of `fake_agent`, listening on the VM's agent socket path.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use machinen::spec::{files, VmSpec};
use tokio::net::UnixStream;
use tokio::sync::watch;

use super::{Accel, Capabilities, Engine, EngineError, Exit, Machine};

/// What the fake does, and what was done to it.
pub struct Script {
    /// Calls in order: `launch`, `pause`, `resume`, `balloon`, `save`,
    /// `load`, `quit`, `kill`.
    pub calls: Mutex<Vec<&'static str>>,
    /// How long loading a state takes.
    pub load_ms: AtomicU64,
    /// Loading a state fails (an incompatible bundle).
    pub load_fails: AtomicBool,
    /// How long saving the state takes (bounded by its deadline).
    pub save_ms: AtomicU64,
    /// The guest's RAM as the balloon left it (it reaches a target at once).
    pub balloon_bytes: AtomicU64,
    /// The machine's exit, once it ended (set by `quit`, `kill`, or a test
    /// simulating a crash).
    pub exit: watch::Sender<Option<Exit>>,
}

impl Script {
    pub fn new() -> Arc<Script> {
        Arc::new(Script {
            calls: Mutex::default(),
            load_ms: AtomicU64::new(0),
            load_fails: AtomicBool::new(false),
            save_ms: AtomicU64::new(0),
            balloon_bytes: AtomicU64::new(0),
            exit: watch::channel(None).0,
        })
    }

    pub fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("lock").clone()
    }

    fn record(&self, call: &'static str) {
        self.calls.lock().expect("lock").push(call);
    }

    /// The engine process ends as `exit` (a crash, unless status 0).
    pub fn end(&self, exit: Exit) {
        self.exit.send_if_modified(|e| {
            let first = e.is_none();
            if first {
                *e = Some(exit);
            }
            first
        });
    }
}

pub struct FakeEngine {
    caps: Capabilities,
    script: Arc<Script>,
    /// The guest "powers off" when this becomes true.
    powered_off: watch::Receiver<bool>,
}

impl FakeEngine {
    pub fn new(script: Arc<Script>, powered_off: watch::Receiver<bool>) -> FakeEngine {
        FakeEngine {
            caps: Capabilities {
                engine: "fake",
                accel: Accel::Tcg,
                cpu_model: "fake".into(),
                binary: PathBuf::from("/nonexistent/fake-engine"),
                version: None,
            },
            script,
            powered_off,
        }
    }
}

impl Engine for FakeEngine {
    type Machine = FakeMachine;

    fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    async fn launch(&self, spec: &VmSpec) -> Result<FakeMachine, EngineError> {
        self.script.record("launch");
        Ok(FakeMachine {
            script: self.script.clone(),
            agent_path: spec.path_in(files::AGENT),
            exit: self.script.exit.subscribe(),
            powered_off: self.powered_off.clone(),
        })
    }
}

pub struct FakeMachine {
    script: Arc<Script>,
    agent_path: PathBuf,
    exit: watch::Receiver<Option<Exit>>,
    powered_off: watch::Receiver<bool>,
}

/// Sleep `ms`, or until `deadline` if that comes first; whether the
/// deadline passed.
async fn sleep_until_or(ms: u64, deadline: Instant) -> bool {
    let want = Instant::now() + Duration::from_millis(ms);
    tokio::time::sleep_until(want.min(deadline).into()).await;
    want > deadline
}

impl Machine for FakeMachine {
    fn pid(&self) -> u32 {
        // Not a process of ours: nothing may signal it by this number.
        u32::MAX
    }

    async fn pause(&self) -> Result<(), EngineError> {
        self.script.record("pause");
        Ok(())
    }

    async fn resume(&self) -> Result<(), EngineError> {
        self.script.record("resume");
        Ok(())
    }

    async fn balloon(&self, target: Option<u64>) -> Result<u64, EngineError> {
        self.script.record("balloon");
        if let Some(t) = target {
            self.script.balloon_bytes.store(t, Ordering::SeqCst);
        }
        Ok(self.script.balloon_bytes.load(Ordering::SeqCst))
    }

    async fn save_state(&self, path: &Path, deadline: Instant) -> Result<(), EngineError> {
        self.script.record("save");
        if sleep_until_or(self.script.save_ms.load(Ordering::SeqCst), deadline).await {
            return Err(EngineError::Timeout {
                what: "the machine state to be written",
            });
        }
        std::fs::write(path, b"fake machine state").map_err(|source| EngineError::Spawn {
            binary: "fake".into(),
            source,
        })
    }

    async fn new_disk_layer(
        &self,
        _top_node: &str,
        _file: &Path,
        _new_node: &str,
    ) -> Result<(), EngineError> {
        self.script.record("new-disk-layer");
        Ok(())
    }

    async fn save_state_live(
        &self,
        path: &Path,
        deadline: Instant,
    ) -> Result<Duration, EngineError> {
        self.pause().await?;
        let t = Instant::now();
        self.save_state(path, deadline).await?;
        Ok(t.elapsed())
    }

    async fn load_state(
        &self,
        _path: &Path,
        deadline: Instant,
        start: bool,
    ) -> Result<(), EngineError> {
        self.script.record("load");
        if sleep_until_or(self.script.load_ms.load(Ordering::SeqCst), deadline).await {
            return Err(EngineError::Timeout {
                what: "the machine state to be loaded",
            });
        }
        if self.script.load_fails.load(Ordering::SeqCst) {
            return Err(EngineError::Qmp {
                command: "migrate-incoming",
                detail: "fake: incompatible state".into(),
            });
        }
        if start {
            self.script.record("resume");
        }
        Ok(())
    }

    async fn connect_agent(&mut self, timeout: Duration) -> Result<UnixStream, EngineError> {
        let until = Instant::now() + timeout;
        loop {
            match UnixStream::connect(&self.agent_path).await {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < until => {
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                Err(_) => {
                    return Err(EngineError::Timeout {
                        what: "the agent socket",
                    })
                }
            }
        }
    }

    async fn wait(&mut self) -> Exit {
        // A closed channel never changes again: stop watching it.
        let (mut exit_open, mut off_open) = (true, true);
        loop {
            if let Some(exit) = self.exit.borrow_and_update().clone() {
                return exit;
            }
            if *self.powered_off.borrow_and_update() {
                let off = Exit {
                    code: Some(0),
                    ..Exit::default()
                };
                self.script.end(off);
                continue;
            }
            tokio::select! {
                r = self.exit.changed(), if exit_open => exit_open = r.is_ok(),
                r = self.powered_off.changed(), if off_open => off_open = r.is_ok(),
                else => std::future::pending::<()>().await,
            }
        }
    }

    async fn quit(&mut self) {
        self.script.record("quit");
        self.script.end(Exit {
            code: Some(0),
            ..Exit::default()
        });
    }

    fn kill(&mut self) {
        self.script.record("kill");
        self.script.end(Exit {
            signal: Some(libc::SIGKILL),
            ..Exit::default()
        });
    }
}
