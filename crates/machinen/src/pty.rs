//! A command on a pseudo-terminal in the guest: [`Vm::exec_pty`].
//!
//! The guest agent gives the command a fresh pty as its controlling
//! terminal; its merged output arrives as `Stdout` frames. The host side
//! sends keystrokes (`Stdin`), window sizes (`Resize`) and signals. Bytes are
//! forwarded untouched: a Ctrl-C typed by the user is the byte 0x03, and the
//! guest's line discipline turns it into SIGINT for the guest's foreground
//! process group, exactly like a local terminal.

use machinen_proto::timeouts;
use std::sync::Arc;

use machinen_proto::{self as proto, ExecRequest, ExitStatus, Frame, Request, WinSize};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::Mutex;

use crate::error::{fail, ErrorCode, Result};
use crate::vm::{protocol_error, validate_exec, wire_error, ExecOptions, Vm};

pub use machinen_proto::WinSize as Winsize;

/// A running pty command. Read its output with [`PtyExec::next`]; send input
/// through [`PtyExec::input`] (cloneable, usable from other tasks).
#[derive(Debug)]
pub struct PtyExec {
    pid: u32,
    rd: OwnedReadHalf,
    input: PtyInput,
}

/// The input side of a [`PtyExec`].
#[derive(Debug, Clone)]
pub struct PtyInput {
    wr: Arc<Mutex<OwnedWriteHalf>>,
}

/// What a pty command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PtyEvent {
    /// Terminal output (stdout and stderr merged, as on a terminal).
    Output(Vec<u8>),
    /// The command ended; nothing follows.
    Exit(ExitStatus),
}

/// What a command driven by [`Vm::exec_session`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEvent {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The command ended; nothing follows.
    Exit(ExitStatus),
}

impl PtyInput {
    async fn send(&self, f: &Frame, what: &str) -> Result<()> {
        let mut wr = self.wr.lock().await;
        proto::send(&mut *wr, f)
            .await
            .map_err(|e| protocol_error(what, e))
    }

    /// Keystrokes / bytes for the terminal.
    pub async fn write(&self, bytes: &[u8]) -> Result<()> {
        for c in bytes.chunks(proto::MAX_CHUNK) {
            self.send(&Frame::Stdin(c.to_vec()), "sending terminal input")
                .await?;
        }
        Ok(())
    }

    /// The terminal changed size.
    pub async fn resize(&self, ws: WinSize) -> Result<()> {
        self.send(&Frame::Resize(ws), "resizing the terminal").await
    }

    /// Send a signal to the command's process group.
    pub async fn signal(&self, signal: i32) -> Result<()> {
        self.send(&Frame::Signal(signal), "sending a signal").await
    }

    /// End of input (the terminal's EOF character, ^D).
    pub async fn eof(&self) -> Result<()> {
        self.send(&Frame::StdinEof, "closing terminal input").await
    }
}

impl PtyExec {
    /// The command's pid in the guest.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn input(&self) -> PtyInput {
        self.input.clone()
    }

    /// The next output chunk, or the exit. After `Exit`, returns an error.
    pub async fn next(&mut self) -> Result<PtyEvent> {
        Ok(match self.next_stream().await? {
            StreamEvent::Stdout(b) | StreamEvent::Stderr(b) => PtyEvent::Output(b),
            StreamEvent::Exit(st) => PtyEvent::Exit(st),
        })
    }

    /// [`PtyExec::next`] with stdout and stderr apart (a command on pipes;
    /// on a pty everything is stdout).
    pub async fn next_stream(&mut self) -> Result<StreamEvent> {
        loop {
            match proto::read_frame(&mut self.rd)
                .await
                .map_err(|e| protocol_error("reading terminal output", e))?
            {
                Some(Frame::Stdout(b)) => return Ok(StreamEvent::Stdout(b)),
                Some(Frame::Stderr(b)) => return Ok(StreamEvent::Stderr(b)),
                Some(Frame::Exit(st)) => return Ok(StreamEvent::Exit(st)),
                Some(Frame::Error(e)) => return Err(wire_error(e)),
                Some(_) => continue,
                None => {
                    return Err(fail(
                        ErrorCode::ExecVsockUnavailable,
                        "the connection to the VM closed before the command finished",
                    )
                    .hint("the VM may have stopped; `machinen ls` lists live VMs")
                    .into())
                }
            }
        }
    }
}

impl Vm {
    /// Start `opts` on a new pty of size `winsize` in the guest.
    pub async fn exec_pty(&self, opts: ExecOptions, winsize: WinSize) -> Result<PtyExec> {
        self.exec_session(opts, Some(winsize)).await
    }

    /// Start `opts` in the guest on a new pty of size `winsize`, or with
    /// pipes (`None`), and drive it by hand: input, EOF, signals to its
    /// process group, resizes; output as [`PtyExec::next_stream`] gives it.
    /// For callers that keep a process's streams themselves (the containerd
    /// shim); [`Vm::exec_stream`] is simpler for the rest.
    pub async fn exec_session(
        &self,
        opts: ExecOptions,
        winsize: Option<WinSize>,
    ) -> Result<PtyExec> {
        validate_exec(&opts)?;
        let conn = self.connect().await?;
        let (mut rd, mut wr) = conn.into_split();
        let req = ExecRequest {
            argv: opts.argv,
            env: opts.env,
            cwd: opts.cwd,
            tty: winsize.is_some(),
            winsize,
            user: opts.user,
            rlimits: opts.rlimits,
        };
        proto::send(&mut wr, &Frame::Request(Request::Exec(req)))
            .await
            .map_err(|e| protocol_error("starting the command", e))?;
        let first = tokio::time::timeout(timeouts::PTY_FIRST_FRAME, proto::read_frame(&mut rd))
            .await
            .map_err(|_| {
                fail(
                    ErrorCode::ExecVsockUnavailable,
                    "the guest did not start the command within 60 s",
                )
            })?;
        match first.map_err(|e| protocol_error("starting the command", e))? {
            Some(Frame::Started { pid }) => Ok(PtyExec {
                pid,
                rd,
                input: PtyInput {
                    wr: Arc::new(Mutex::new(wr)),
                },
            }),
            Some(Frame::Error(e)) => Err(wire_error(e)),
            Some(other) => Err(fail(
                ErrorCode::ProtocolError,
                format!("unexpected answer {other:?}"),
            )
            .into()),
            None => Err(fail(
                ErrorCode::ExecVsockUnavailable,
                "the VM closed the connection before the command started",
            )
            .into()),
        }
    }
}
