//! Streaming commands for JS: output is pulled with `next()` (one promise
//! per chunk, so a slow consumer holds the guest back instead of growing a
//! queue), input pushed with `write()`.

use std::sync::Arc;
use std::time::Duration;

use machinen::{PtyEvent, PtyExec, PtyInput, Vm};
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, Mutex};

use crate::js_error;

/// How much output (and input) may wait in each pipe.
const PIPE: usize = 64 * 1024;
/// Chunks queued for `next()` beyond the pipes.
const QUEUE: usize = 16;

enum Event {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(machinen_proto::ExitStatus),
    Failed(machinen::Error),
}

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
    events: Arc<Mutex<mpsc::Receiver<Event>>>,
    stdin: Arc<Mutex<Option<DuplexStream>>>,
    task: tokio::task::AbortHandle,
}

async fn pump(mut from: DuplexStream, to: mpsc::Sender<Event>, wrap: fn(Vec<u8>) -> Event) {
    let mut buf = vec![0u8; PIPE];
    loop {
        match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.send(wrap(buf[..n].to_vec())).await.is_err() {
                    return;
                }
            }
        }
    }
}

impl ExecStream {
    pub fn start(vm: Arc<Vm>, opts: machinen::ExecOptions, timeout: Option<Duration>) -> Self {
        let (stdin_w, stdin_r) = tokio::io::duplex(PIPE);
        let (out_w, out_r) = tokio::io::duplex(PIPE);
        let (err_w, err_r) = tokio::io::duplex(PIPE);
        let (tx, rx) = mpsc::channel(QUEUE);
        let task = tokio::spawn(async move {
            let run = async {
                let (mut out_w, mut err_w) = (out_w, err_w);
                // The writers drop at the end of this block: the pumps
                // then see the end of the output.
                vm.exec_stream_timeout(opts, timeout, stdin_r, &mut out_w, &mut err_w)
                    .await
            };
            let (r, (), ()) = tokio::join!(
                run,
                pump(out_r, tx.clone(), Event::Stdout),
                pump(err_r, tx.clone(), Event::Stderr)
            );
            let last = match r {
                Ok(status) => Event::Exit(status),
                Err(e) => Event::Failed(e),
            };
            let _ = tx.send(last).await;
        });
        ExecStream {
            events: Arc::new(Mutex::new(rx)),
            stdin: Arc::new(Mutex::new(Some(stdin_w))),
            task: task.abort_handle(),
        }
    }
}

#[napi]
impl ExecStream {
    /// The next event; `null` after `exit` (or an error, which rejects).
    #[napi]
    pub async fn next(&self) -> Result<Option<StreamEvent>> {
        let ev = self.events.lock().await.recv().await;
        match ev {
            None => Ok(None),
            Some(Event::Stdout(d)) => Ok(Some(chunk("stdout", d))),
            Some(Event::Stderr(d)) => Ok(Some(chunk("stderr", d))),
            Some(Event::Exit(s)) => Ok(Some(exit(s))),
            Some(Event::Failed(e)) => Err(js_error(e)),
        }
    }

    /// Bytes for the command's stdin.
    #[napi]
    pub async fn write(&self, data: Buffer) -> Result<()> {
        let mut g = self.stdin.lock().await;
        let Some(w) = g.as_mut() else {
            return Err(napi::Error::from_reason("stdin was already closed"));
        };
        // A command that exited (or does not read) closed its end: the
        // write is dropped, as a pipe to a gone reader would be.
        let _ = w.write_all(&data).await;
        Ok(())
    }

    /// Close the command's stdin.
    #[napi]
    pub async fn end(&self) -> Result<()> {
        self.stdin.lock().await.take();
        Ok(())
    }

    /// Give up the command: the connection closes and the guest kills it.
    #[napi]
    pub fn abort(&self) {
        self.task.abort();
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
