//! Streaming commands for JS: output is pulled with `next()` (one promise
//! per chunk, so a slow consumer holds the guest back instead of growing a
//! queue), input pushed with `write()`.

use std::sync::Arc;
use std::time::Duration;

use machinen::exec_events::{ExecEvent, ExecEvents};
use machinen::{PtyEvent, PtyExec, PtyInput, Vm};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::sync::Mutex;

use crate::js_error;

/// One event of a streaming command: `stdout`/`stderr` with `data`, or
/// `exit` with `exitCode` (and `signal` when killed by one).
#[napi(object)]
pub struct StreamEvent {
    pub kind: String,
    pub data: Option<Buffer>,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

fn chunk(kind: &str, data: Vec<u8>) -> StreamEvent {
    StreamEvent {
        kind: kind.to_owned(),
        data: Some(data.into()),
        exit_code: None,
        signal: None,
    }
}

fn exit(status: machinen_proto::ExitStatus) -> StreamEvent {
    StreamEvent {
        kind: "exit".to_owned(),
        data: None,
        exit_code: Some(status.shell_code()),
        signal: status.signal,
    }
}

/// A command started by `VmHandle.execStart`.
#[napi]
pub struct ExecStream {
    inner: Arc<ExecEvents>,
}

impl ExecStream {
    pub fn start(vm: Arc<Vm>, opts: machinen::ExecOptions, timeout: Option<Duration>) -> Self {
        ExecStream {
            inner: Arc::new(ExecEvents::start(vm, opts, timeout)),
        }
    }
}

#[napi]
impl ExecStream {
    /// The next event; `null` after `exit` (or an error, which rejects).
    #[napi]
    pub async fn next(&self) -> Result<Option<StreamEvent>> {
        match self.inner.next().await {
            None => Ok(None),
            Some(ExecEvent::Stdout(d)) => Ok(Some(chunk("stdout", d))),
            Some(ExecEvent::Stderr(d)) => Ok(Some(chunk("stderr", d))),
            Some(ExecEvent::Exit(s)) => Ok(Some(exit(s))),
            Some(ExecEvent::Failed(e)) => Err(js_error(e)),
        }
    }

    /// Bytes for the command's stdin.
    #[napi]
    pub async fn write(&self, data: Buffer) -> Result<()> {
        if self.inner.write(&data).await {
            Ok(())
        } else {
            Err(napi::Error::from_reason("stdin was already closed"))
        }
    }

    /// Close the command's stdin.
    #[napi]
    pub async fn end(&self) -> Result<()> {
        self.inner.close_stdin().await;
        Ok(())
    }

    /// Give up the command: the connection closes and the guest kills it.
    #[napi]
    pub fn abort(&self) {
        self.inner.abort();
    }
}

/// A command on a terminal, started by `VmHandle.execPty`.
#[napi]
pub struct PtyStream {
    pid: u32,
    /// The command, until it exited.
    exec: Arc<Mutex<Option<PtyExec>>>,
    input: PtyInput,
}

impl PtyStream {
    pub fn new(exec: PtyExec) -> PtyStream {
        PtyStream {
            pid: exec.pid(),
            input: exec.input(),
            exec: Arc::new(Mutex::new(Some(exec))),
        }
    }
}

#[napi]
impl PtyStream {
    /// The command's pid in the guest.
    #[napi(getter)]
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The next event: `output` with `data`, then `exit`; `null` after it.
    #[napi]
    pub async fn next(&self) -> Result<Option<StreamEvent>> {
        let mut g = self.exec.lock().await;
        let Some(exec) = g.as_mut() else {
            return Ok(None);
        };
        match exec.next().await {
            Ok(PtyEvent::Output(d)) => Ok(Some(chunk("output", d))),
            Ok(PtyEvent::Exit(s)) => {
                *g = None;
                Ok(Some(exit(s)))
            }
            Err(e) => {
                *g = None;
                Err(js_error(e))
            }
        }
    }

    /// Keystrokes.
    #[napi]
    pub async fn write(&self, data: Buffer) -> Result<()> {
        self.input.write(&data).await.map_err(js_error)
    }

    #[napi]
    pub async fn resize(&self, rows: u32, cols: u32) -> Result<()> {
        let size = machinen_proto::WinSize {
            rows: rows.clamp(1, u16::MAX.into()) as u16,
            cols: cols.clamp(1, u16::MAX.into()) as u16,
        };
        self.input.resize(size).await.map_err(js_error)
    }

    /// Send a signal (a number, e.g. 2 for SIGINT) to the command.
    #[napi]
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.input.signal(signal).await.map_err(js_error)
    }

    /// End of input (as Ctrl-D on an empty line would).
    #[napi]
    pub async fn eof(&self) -> Result<()> {
        self.input.eof().await.map_err(js_error)
    }
}
