//! A command whose output is taken one event at a time, for callers that
//! pull rather than hand over writers (the Node and Python bindings): its
//! stdout and stderr chunks, then its exit. The queue is short, so a slow
//! reader holds the guest back instead of growing memory.

use std::sync::Arc;
use std::time::Duration;

use machinen_proto::ExitStatus;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{mpsc, Mutex};

use crate::vm::{ExecOptions, Vm};
use crate::Error;

/// How much output (and input) may wait in each pipe.
const PIPE: usize = 64 * 1024;
/// Events queued beyond the pipes.
const QUEUE: usize = 16;

/// One event of a streaming command.
#[derive(Debug)]
pub enum ExecEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The last event of a command that ran to its end.
    Exit(ExitStatus),
    /// The last event of a command that could not run or was cut off.
    Failed(Error),
}

/// A running command: [`ExecEvents::next`] for its events,
/// [`ExecEvents::write`] for its stdin. Dropping it gives the command up
/// (its stream closes and the guest ends it).
pub struct ExecEvents {
    events: Mutex<mpsc::Receiver<ExecEvent>>,
    stdin: Mutex<Option<DuplexStream>>,
    task: tokio::task::AbortHandle,
}

async fn pump(mut from: DuplexStream, to: mpsc::Sender<ExecEvent>, wrap: fn(Vec<u8>) -> ExecEvent) {
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

impl ExecEvents {
    /// Start `opts` on `vm` (on the current tokio runtime).
    pub fn start(vm: Arc<Vm>, opts: ExecOptions, timeout: Option<Duration>) -> ExecEvents {
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
                pump(out_r, tx.clone(), ExecEvent::Stdout),
                pump(err_r, tx.clone(), ExecEvent::Stderr)
            );
            let last = match r {
                Ok(status) => ExecEvent::Exit(status),
                Err(e) => ExecEvent::Failed(e),
            };
            let _ = tx.send(last).await;
        });
        ExecEvents {
            events: Mutex::new(rx),
            stdin: Mutex::new(Some(stdin_w)),
            task: task.abort_handle(),
        }
    }

    /// The next event; `None` after the last.
    pub async fn next(&self) -> Option<ExecEvent> {
        self.events.lock().await.recv().await
    }

    /// Bytes for the command's stdin; `false` once stdin was closed. A
    /// command that exited (or does not read) closed its end: the write
    /// is dropped, as a pipe to a gone reader would be.
    pub async fn write(&self, data: &[u8]) -> bool {
        let mut g = self.stdin.lock().await;
        let Some(w) = g.as_mut() else {
            return false;
        };
        let _ = w.write_all(data).await;
        true
    }

    /// Close the command's stdin (it reads end of file).
    pub async fn close_stdin(&self) {
        if let Some(mut w) = self.stdin.lock().await.take() {
            let _ = w.shutdown().await;
        }
    }

    /// Give the command up: its stream closes and the guest ends it.
    pub fn abort(&self) {
        self.task.abort();
    }
}

impl Drop for ExecEvents {
    fn drop(&mut self) {
        self.task.abort();
    }
}
