//! One process of a container: the container's own (its init) or one that
//! `ctr tasks exec` added, its stdio between containerd's FIFOs and the
//! guest, and its end.
//!
//! Two drivers:
//! * **main**: the init of a container without a terminal is the VM's main
//!   command. The agent owns it, its output goes to the VM's log, which the
//!   shim follows into the FIFOs, and it survives checkpoint and restore
//!   (a restored VM's log and exit status continue). Its stdin is
//!   `/dev/null` (what containerd writes to it is read and dropped); use a
//!   terminal (`ctr run -t`) or `ctr tasks exec` for interactive input.
//! * **session**: a process on a stream of the guest agent, on a pty or on
//!   pipes: execs, and the init of a container with a terminal. Input,
//!   EOF, resizes and signals (to its process group) go on the stream. A
//!   session does not survive a snapshot, so a container whose init is one
//!   cannot be checkpointed.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use crate::fifo::Io;
use machinen::pty::StreamEvent;
use machinen::service::{LogEvent, LogSource, LogStream};
use machinen::vm::Vm;
use machinen::{PtyExec, PtyInput};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::watch;

/// How much output may wait between the guest and a FIFO.
const PIPE: usize = 256 * 1024;

/// The stdio containerd asked a process to have: FIFO paths (empty: not
/// wanted) and whether it gets a terminal.
#[derive(Debug, Clone, Default)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl Stdio {
    pub fn new(stdin: &str, stdout: &str, stderr: &str, terminal: bool) -> Stdio {
        Stdio {
            stdin: stdin.into(),
            stdout: stdout.into(),
            stderr: stderr.into(),
            terminal,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Created,
    Running,
    Paused,
    Stopped,
}

/// How a process ended.
#[derive(Debug, Clone, Copy)]
pub struct Exit {
    /// Shell convention: the exit code, or 128 + the signal.
    pub code: u32,
    pub at: SystemTime,
}

#[derive(Debug)]
struct State {
    status: Status,
    pid: u32,
}

pub struct Proc {
    /// Empty for the container's init.
    pub exec_id: String,
    pub stdio: Stdio,
    pub io: Io,
    /// An exec's process (the init's is the container's spec).
    pub spec: Option<crate::spec::Process>,
    state: Mutex<State>,
    exited: watch::Sender<Option<Exit>>,
    /// A session's input side (`None`: main-driven, or not started).
    input: Mutex<Option<PtyInput>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Proc {
    pub fn new(exec_id: &str, stdio: Stdio, spec: Option<crate::spec::Process>) -> Arc<Proc> {
        Arc::new(Proc {
            exec_id: exec_id.to_string(),
            stdio,
            io: Io::default(),
            spec,
            state: Mutex::new(State {
                status: Status::Created,
                pid: 0,
            }),
            exited: watch::channel(None).0,
            input: Mutex::new(None),
        })
    }

    pub fn status(&self) -> Status {
        lock(&self.state).status
    }

    pub fn set_status(&self, s: Status) {
        let mut st = lock(&self.state);
        if st.status != Status::Stopped {
            st.status = s;
        }
    }

    pub fn pid(&self) -> u32 {
        lock(&self.state).pid
    }

    pub fn exit(&self) -> Option<Exit> {
        *self.exited.borrow()
    }

    pub fn input(&self) -> Option<PtyInput> {
        lock(&self.input).clone()
    }

    /// Resolves once the process ended.
    pub async fn wait(&self) -> Exit {
        let mut rx = self.exited.subscribe();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as `self`: unreachable, but not a panic.
                return Exit {
                    code: 255,
                    at: SystemTime::now(),
                };
            }
        }
    }

    fn started(&self, pid: u32) {
        let mut st = lock(&self.state);
        st.pid = pid;
        st.status = Status::Running;
    }

    /// Record the end (once).
    pub fn finish(&self, code: u32) -> Exit {
        let exit = Exit {
            code,
            at: SystemTime::now(),
        };
        lock(&self.state).status = Status::Stopped;
        self.exited.send_if_modified(|e| {
            if e.is_none() {
                *e = Some(exit);
                true
            } else {
                false
            }
        });
        self.exit().unwrap_or(exit)
    }

    /// Pipes from the guest to the stdout and stderr FIFOs (a pty's output
    /// is all stdout).
    fn outputs(&self) -> std::io::Result<(Option<DuplexStream>, Option<DuplexStream>)> {
        let pipe = |path: &str| -> std::io::Result<Option<DuplexStream>> {
            if path.is_empty() {
                return Ok(None);
            }
            let (w, r) = tokio::io::duplex(PIPE);
            self.io.copy_to_fifo(r, path)?;
            Ok(Some(w))
        };
        let out = pipe(&self.stdio.stdout)?;
        let err = if self.stdio.terminal {
            None
        } else {
            pipe(&self.stdio.stderr)?
        };
        Ok((out, err))
    }

    /// The stdin FIFO's bytes, as a pipe (`None`: no stdin).
    fn stdin(&self) -> std::io::Result<Option<DuplexStream>> {
        if self.stdio.stdin.is_empty() {
            return Ok(None);
        }
        let (w, r) = tokio::io::duplex(PIPE);
        self.io.copy_from_fifo(&self.stdio.stdin, w)?;
        Ok(Some(r))
    }

    /// Drive a started session until it ends; `on_exit` runs with the code
    /// before anyone waiting learns it.
    pub fn run_session<F>(self: &Arc<Self>, exec: PtyExec, on_exit: F) -> std::io::Result<()>
    where
        F: FnOnce(u32) + Send + 'static,
    {
        let (out, err) = self.outputs()?;
        let stdin = self.stdin()?;
        let input = exec.input();
        *lock(&self.input) = Some(input.clone());
        self.started(exec.pid());
        if let Some(mut r) = stdin {
            let input = input.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 32 * 1024];
                loop {
                    match r.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            let _ = input.eof().await;
                            return;
                        }
                        Ok(n) => {
                            if input.write(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
        let me = self.clone();
        tokio::spawn(async move {
            let code = pump_session(exec, out, err).await;
            on_exit(code);
            me.finish(code);
            me.io.shutdown().await;
        });
        Ok(())
    }

    /// Follow the VM's main command (the init of a container without a
    /// terminal) until it ends. `from_start`: from the log's beginning (a
    /// boot), or from now on (a restore, whose log holds the past).
    pub fn run_main<F>(
        self: &Arc<Self>,
        vm: Arc<Vm>,
        pid: u32,
        from_start: bool,
        on_exit: F,
    ) -> std::io::Result<()>
    where
        F: FnOnce(u32) + Send + 'static,
    {
        let (mut out, mut err) = self.outputs()?;
        // The VM was booted with the main command's stdin kept open: feed it.
        if let Some(r) = self.stdin()? {
            tokio::spawn(feed_main_stdin(vm.clone(), r));
        }
        self.started(pid);
        let mut follower = vm
            .follow_logs(LogSource::Main, from_start)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let me = self.clone();
        tokio::spawn(async move {
            let mut status = None;
            while let Some(ev) = follower.next().await {
                match ev {
                    LogEvent::Chunk { stream, data, .. } => {
                        let w = match stream {
                            LogStream::Stdout => out.as_mut(),
                            LogStream::Stderr => err.as_mut(),
                            _ => None,
                        };
                        if let Some(w) = w {
                            let _ = w.write_all(&data).await;
                        }
                    }
                    LogEvent::Exit(st) => status = Some(st),
                }
            }
            drop((out, err));
            let code = match status {
                Some(st) => st.shell_code(),
                None => match vm.wait(None).await {
                    Ok(outcome) => outcome.exit_code(),
                    Err(e) => {
                        log::error!("waiting for the VM: {e}");
                        255
                    }
                },
            } as u32;
            on_exit(code);
            me.finish(code);
            me.io.shutdown().await;
        });
        Ok(())
    }
}

/// Copy `r` (the stdin FIFO's bytes) to the main command's stdin, then
/// close it. The main command starts just after the VM is ready: a
/// refusal for want of it is retried for a while.
async fn feed_main_stdin(vm: Arc<Vm>, mut r: DuplexStream) {
    let t0 = std::time::Instant::now();
    let mut w = loop {
        match vm.main_stdin().await {
            Ok(w) => break w,
            Err(e)
                if e.code() == machinen::ErrorCode::MainNotRunning
                    && t0.elapsed() < machinen_proto::timeouts::BOOT =>
            {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => {
                log::info!("the task's stdin goes nowhere: {e}");
                // Drained, so that containerd's writer is not blocked.
                let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                return;
            }
        }
    };
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => {
                let _ = w.eof().await;
                return;
            }
            Ok(n) => {
                if let Err(e) = w.write(&buf[..n]).await {
                    log::info!("the task's stdin: {e}");
                    let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
                    return;
                }
            }
        }
    }
}

async fn pump_session(
    mut exec: PtyExec,
    mut out: Option<DuplexStream>,
    mut err: Option<DuplexStream>,
) -> u32 {
    loop {
        match exec.next_stream().await {
            Ok(StreamEvent::Stdout(b)) => {
                if let Some(w) = out.as_mut() {
                    let _ = w.write_all(&b).await;
                }
            }
            Ok(StreamEvent::Stderr(b)) => {
                if let Some(w) = err.as_mut() {
                    let _ = w.write_all(&b).await;
                }
            }
            Ok(StreamEvent::Exit(st)) => return st.shell_code() as u32,
            Err(e) => {
                log::error!("process stream ended without an exit: {e}");
                // As a process killed by SIGKILL: it is gone, how is unknown.
                return 137;
            }
        }
    }
}
