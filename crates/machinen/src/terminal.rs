//! The host's terminal: raw mode with guaranteed restore, window size, one
//! process-wide stdin reader, and [`run_interactive`], which connects the
//! terminal to a guest pty ([`Vm::exec_pty`]).
//!
//! Raw mode turns off the host's line discipline (no echo, no line
//! buffering, no signal characters), so every key, Ctrl-C and Ctrl-Z
//! included, goes to the guest as a byte and the guest's terminal acts on
//! it. The saved settings come back when the [`RawMode`] guard is dropped:
//! on return, on error, on unwinding, and when SIGTERM/SIGHUP end the
//! session (they are caught while a session runs).

use std::io::IsTerminal;
use std::os::fd::{AsFd, BorrowedFd, RawFd};
use std::sync::OnceLock;

use machinen_proto::{ExitStatus, WinSize};
use nix::sys::termios::{self, SetArg, Termios};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};

use crate::error::{fail, ErrorCode, Result};
use crate::pty::PtyEvent;
use crate::vm::{ExecOptions, Vm};

/// Size used when the host has no terminal.
pub const DEFAULT_WINSIZE: WinSize = WinSize { rows: 24, cols: 80 };

/// Raw mode on a terminal for as long as the guard lives.
pub struct RawMode {
    fd: RawFd,
    saved: Termios,
}

fn borrow(fd: RawFd) -> BorrowedFd<'static> {
    // SAFETY: only used for the standard descriptors 0/1/2, which stay open
    // for the life of the process.
    unsafe { BorrowedFd::borrow_raw(fd) }
}

impl RawMode {
    /// Put `fd` (a terminal) into raw mode.
    pub fn enable(fd: RawFd) -> Result<RawMode> {
        let b = borrow(fd);
        let saved = termios::tcgetattr(b)
            .map_err(|e| fail(ErrorCode::Io, "cannot read the terminal settings").source(e))?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(b, SetArg::TCSADRAIN, &raw)
            .map_err(|e| fail(ErrorCode::Io, "cannot put the terminal into raw mode").source(e))?;
        Ok(RawMode { fd, saved })
    }

    /// Raw mode on stdin when it is a terminal.
    pub fn enable_stdin_if_terminal() -> Result<Option<RawMode>> {
        if std::io::stdin().is_terminal() {
            Ok(Some(RawMode::enable(0)?))
        } else {
            Ok(None)
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(borrow(self.fd), SetArg::TCSADRAIN, &self.saved);
    }
}

/// The window size of the terminal on `fd`, if it is one.
pub fn winsize_of(fd: RawFd) -> Option<WinSize> {
    let mut w = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points to a live local; an invalid fd only makes the call fail.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut w as *mut libc::winsize) };
    (rc == 0 && w.ws_row > 0 && w.ws_col > 0).then_some(WinSize {
        rows: w.ws_row,
        cols: w.ws_col,
    })
}

/// The host terminal's size: stdout's, else stdin's, else 24x80.
pub fn host_winsize() -> WinSize {
    winsize_of(1)
        .or_else(|| winsize_of(0))
        .unwrap_or(DEFAULT_WINSIZE)
}

/// Whether stdin and stdout are both terminals.
pub fn interactive_stdio() -> bool {
    std::io::stdin().is_terminal() && std::io::stdout().is_terminal()
}

/// Whether stdin is a terminal.
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().as_fd().is_terminal()
}

/// Chunks read from this process's stdin by one background thread; an
/// empty chunk is end of file. One reader for the whole process, so that
/// successive sessions (attach, detach, attach) never lose a keystroke to a
/// reader left blocked by an earlier one.
pub fn stdin_chunks() -> &'static Mutex<mpsc::Receiver<Vec<u8>>> {
    static RX: OnceLock<Mutex<mpsc::Receiver<Vec<u8>>>> = OnceLock::new();
    RX.get_or_init(|| {
        let (tx, rx) = mpsc::channel(64);
        let spawned = std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || {
                use std::io::Read;
                let mut buf = vec![0u8; 16 * 1024];
                let mut stdin = std::io::stdin().lock();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => {
                            let _ = tx.blocking_send(Vec::new());
                            return;
                        }
                        Ok(n) => {
                            if tx.blocking_send(buf[..n].to_vec()).is_err() {
                                return;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(_) => {
                            let _ = tx.blocking_send(Vec::new());
                            return;
                        }
                    }
                }
            });
        if spawned.is_err() {
            tracing::warn!("cannot start the stdin reader thread");
        }
        Mutex::new(rx)
    })
}

/// The detach sequence of interactive sessions that allow detaching:
/// `Ctrl-]` twice.
pub const DETACH_KEYS: [u8; 2] = [0x1d, 0x1d];

/// How an interactive session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The guest command exited.
    Exited(ExitStatus),
    /// The host got SIGTERM/SIGHUP; the signal was passed to the guest
    /// command and the session ended.
    Signalled(i32),
}

/// Run `opts` on a guest pty connected to this process's terminal (or
/// plain stdio when there is none): raw mode while it runs, the window size
/// at start and on every SIGWINCH, bytes forwarded untouched.
pub async fn run_interactive(vm: &Vm, opts: ExecOptions) -> Result<Outcome> {
    run_interactive_timeout(vm, opts, None).await
}

/// [`run_interactive`] with a time limit: past `timeout` the guest
/// command's process group gets `SIGKILL` and the call fails with
/// `EXEC_TIMEOUT` (the terminal is restored first).
pub async fn run_interactive_timeout(
    vm: &Vm,
    opts: ExecOptions,
    timeout: Option<std::time::Duration>,
) -> Result<Outcome> {
    let program = opts.argv.first().cloned().unwrap_or_default();
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut exec = vm.exec_pty(opts, host_winsize()).await?;
    let input = exec.input();
    let sig = |k| {
        tokio::signal::unix::signal(k)
            .map_err(|e| fail(ErrorCode::Io, "cannot install signal handlers").source(e))
    };
    use tokio::signal::unix::SignalKind;
    let mut winch = sig(SignalKind::window_change())?;
    let mut term = sig(SignalKind::terminate())?;
    let mut hup = sig(SignalKind::hangup())?;
    let mut int = sig(SignalKind::interrupt())?;
    let mut quit = sig(SignalKind::quit())?;
    // From here on, every exit path drops the guard and restores the terminal.
    let _raw = RawMode::enable_stdin_if_terminal()?;
    let mut stdin = stdin_chunks().lock().await;
    let mut stdin_open = true;
    // Input is best-effort once the command may have ended: the guest closes
    // the stream right after the exit frame, so a keystroke, EOF or resize
    // sent in that moment fails with a broken pipe while the exit status
    // still waits to be read. After the first failed send, input stops and
    // the output side decides: it yields the exit, or the real error.
    let mut input_ok = true;
    let mut out = tokio::io::stdout();
    loop {
        let sent: Result<()> = tokio::select! {
            ev = exec.next() => match ev? {
                PtyEvent::Output(b) => {
                    out.write_all(&b).await.map_err(|e| fail(ErrorCode::Io, "writing to the terminal failed").source(e))?;
                    out.flush().await.map_err(|e| fail(ErrorCode::Io, "writing to the terminal failed").source(e))?;
                    Ok(())
                }
                PtyEvent::Exit(st) => return Ok(Outcome::Exited(st)),
            },
            chunk = stdin.recv(), if stdin_open && input_ok => match chunk {
                Some(b) if !b.is_empty() => input.write(&b).await,
                _ => {
                    stdin_open = false;
                    input.eof().await
                }
            },
            _ = winch.recv() => if input_ok { input.resize(host_winsize()).await } else { Ok(()) },
            // Only reach us when stdin is not a raw terminal (or from kill):
            // the guest command gets them, as it would from a terminal.
            _ = int.recv() => if input_ok { input.signal(libc::SIGINT).await } else { Ok(()) },
            _ = quit.recv() => if input_ok { input.signal(libc::SIGQUIT).await } else { Ok(()) },
            _ = term.recv() => {
                let _ = input.signal(libc::SIGTERM).await;
                return Ok(Outcome::Signalled(libc::SIGTERM));
            }
            _ = hup.recv() => {
                let _ = input.signal(libc::SIGHUP).await;
                return Ok(Outcome::Signalled(libc::SIGHUP));
            }
            _ = sleep_until(deadline), if deadline.is_some() => {
                // A failed send still waits: the exit may already be on its way.
                let _ = input.signal(libc::SIGKILL).await;
                // Wait (bounded) for the guest to confirm the end.
                let confirm = async {
                    loop {
                        if let PtyEvent::Exit(_) = exec.next().await? {
                            return Ok::<_, crate::Error>(());
                        }
                    }
                };
                let confirmed = matches!(
                    tokio::time::timeout(machinen_proto::timeouts::EXEC_KILL_CONFIRM, confirm).await,
                    Ok(Ok(()))
                );
                return Err(exec_timeout_error(&program, timeout, confirmed));
            }
        };
        if sent.is_err() {
            input_ok = false;
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Outcome {
    /// Shell-style exit code.
    pub fn shell_code(&self) -> i32 {
        match self {
            Outcome::Exited(st) => st.shell_code(),
            Outcome::Signalled(s) => 128 + s,
        }
    }
}

/// `EXEC_TIMEOUT`: the command ran past its time limit and was killed
/// (`confirmed`: the guest reported its end).
pub(crate) fn exec_timeout_error(
    program: &str,
    timeout: Option<std::time::Duration>,
    confirmed: bool,
) -> crate::Error {
    let secs = timeout.map(|t| t.as_secs_f64()).unwrap_or_default();
    let how = if confirmed {
        "its process group was killed (SIGKILL) in the guest"
    } else {
        "SIGKILL was sent to its process group, but the guest did not confirm its end"
    };
    fail(
        ErrorCode::ExecTimeout,
        format!("{program:?} ran longer than the time limit of {secs} s; {how}"),
    )
    .hint("raise the limit (`exec --timeout SECS`), or run it in the background: `machinen exec VM -- sh -c 'nohup CMD >/tmp/out.log 2>&1 &'`")
    .into()
}
