//! A process's stdio between containerd's FIFOs and the guest.
//!
//! The shim holds each FIFO open from its own side as well, as containerd's
//! Go shim does, so that neither open waits and containerd's readers and
//! writers may come and go: output queues in the FIFO until containerd
//! reads it, and stdin ends (EOF to the guest process) only once CloseIO
//! let go of the shim's hold and containerd's writer is gone.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::Mutex;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

/// How long output copies may go on delivering what is buffered after the
/// process ended (as containerd's Go shim allows).
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Default)]
enum Hold {
    #[default]
    Pending,
    Open(#[allow(dead_code)] File),
    Released,
}

#[derive(Default)]
pub struct Io {
    stdin: Mutex<Hold>,
    outputs: Mutex<Vec<JoinHandle<()>>>,
    inputs: Mutex<Vec<JoinHandle<()>>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn hold(path: &str, o: &mut OpenOptions) -> std::io::Result<File> {
    o.custom_flags(libc::O_NONBLOCK).open(path)
}

impl Io {
    /// Copy `from` into the FIFO at `path` until `from` ends.
    pub fn copy_to_fifo<R>(&self, mut from: R, path: &str) -> std::io::Result<()>
    where
        R: AsyncRead + Send + Unpin + 'static,
    {
        let reader = hold(path, OpenOptions::new().read(true))?;
        let mut fifo = pipe::OpenOptions::new().open_sender(path)?;
        let h = tokio::spawn(async move {
            let _reader = reader;
            if let Err(e) = tokio::io::copy(&mut from, &mut fifo).await {
                log::debug!("output copy ended: {e}");
            }
        });
        lock(&self.outputs).push(h);
        Ok(())
    }

    /// Copy the FIFO at `path` into `to` until it ends (see the module docs).
    pub fn copy_from_fifo<W>(&self, path: &str, mut to: W) -> std::io::Result<()>
    where
        W: AsyncWrite + Send + Unpin + 'static,
    {
        let bridge = hold(path, OpenOptions::new().read(true).write(true))?;
        let mut fifo = pipe::OpenOptions::new().open_receiver(path)?;
        let writer = hold(path, OpenOptions::new().write(true))?;
        drop(bridge);
        {
            let mut g = lock(&self.stdin);
            if !matches!(*g, Hold::Released) {
                *g = Hold::Open(writer);
            }
        }
        let h = tokio::spawn(async move {
            if let Err(e) = tokio::io::copy(&mut fifo, &mut to).await {
                log::debug!("input copy ended: {e}");
            }
        });
        lock(&self.inputs).push(h);
        Ok(())
    }

    /// CloseIO: let go of the shim's hold on stdin.
    pub fn close_input(&self) {
        *lock(&self.stdin) = Hold::Released;
    }

    /// After the process ended: let the output copies finish (bounded),
    /// then stop everything and release the FIFOs.
    pub async fn shutdown(&self) {
        let outputs: Vec<_> = lock(&self.outputs).drain(..).collect();
        for h in outputs {
            let abort = h.abort_handle();
            if tokio::time::timeout(DRAIN, h).await.is_err() {
                log::warn!("output copy still running after {DRAIN:?}; cancelled");
                abort.abort();
            }
        }
        for h in lock(&self.inputs).drain(..) {
            h.abort();
        }
        self.close_input();
    }
}
