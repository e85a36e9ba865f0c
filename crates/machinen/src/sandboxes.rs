//! A terminal multiplexer over VMs.
//!
//! [`Sandboxes`] keeps interactive shell sessions (one guest pty each) open
//! in this process, records their recent output (scrollback), and lets one
//! viewer at a time attach to a session. [`Supervisor`] is the terminal UI on
//! top: a command line (`/ls`, `/attach ID`, `/help`, `/quit`); while
//! attached, the terminal is raw and everything goes to the guest shell;
//! `Ctrl-]` twice detaches without stopping anything; attaching again replays
//! the scrollback first.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use machinen_proto::ExitStatus;
use serde::Serialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Mutex};

use crate::error::{fail, ErrorCode, Result};
use crate::pty::{PtyEvent, PtyInput};
use crate::terminal::{self, RawMode, DETACH_KEYS};
use crate::vm::ExecOptions;

/// How much output a session keeps for replay.
pub const SCROLLBACK_BYTES: usize = 256 * 1024;

/// What a session's output task shares with viewers.
#[derive(Default)]
struct Shared {
    scrollback: VecDeque<u8>,
    viewer: Option<mpsc::UnboundedSender<Vec<u8>>>,
    exited: Option<ExitStatus>,
    /// Set when the connection failed before an exit was seen.
    lost: bool,
}

struct Session {
    vm: String,
    pid: u32,
    input: PtyInput,
    shared: Arc<Mutex<Shared>>,
}

/// A live VM as the multiplexer shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SandboxEntry {
    pub name: String,
    pub pid: u32,
    /// Whether this multiplexer holds a shell session in it.
    pub session: bool,
}

/// Interactive sessions in many VMs, kept open across detach/attach.
pub struct Sandboxes {
    shell: Vec<String>,
    sessions: BTreeMap<String, Session>,
}

fn push_scrollback(sb: &mut VecDeque<u8>, b: &[u8]) {
    sb.extend(b.iter().copied());
    let excess = sb.len().saturating_sub(SCROLLBACK_BYTES);
    if excess > 0 {
        sb.drain(..excess);
    }
}

impl Sandboxes {
    /// `shell` is the argv each new session runs.
    pub fn new(shell: Vec<String>) -> Sandboxes {
        Sandboxes {
            shell,
            sessions: BTreeMap::new(),
        }
    }

    /// Live VMs, with whether a session is open in each.
    pub async fn list(&mut self) -> Result<Vec<SandboxEntry>> {
        self.prune().await;
        let vms = crate::vm::list()?;
        Ok(vms
            .into_iter()
            .map(|v| {
                let s = self.sessions.get(&v.name);
                SandboxEntry {
                    name: v.name.clone(),
                    pid: v.pid,
                    session: s.is_some(),
                }
            })
            .collect())
    }

    /// Forget sessions whose command ended.
    async fn prune(&mut self) {
        let mut dead = Vec::new();
        for (k, s) in &self.sessions {
            let sh = s.shared.lock().await;
            if sh.exited.is_some() || sh.lost {
                dead.push(k.clone());
            }
        }
        for k in dead {
            self.sessions.remove(&k);
        }
    }

    /// The session in VM `target` (name or pid), opened if needed. Returns
    /// the VM's name.
    pub async fn open(&mut self, target: &str) -> Result<String> {
        self.prune().await;
        let vm = crate::vm::attach(target).await?;
        let name = vm.name().to_string();
        if self.sessions.contains_key(&name) {
            return Ok(name);
        }
        let opts = ExecOptions {
            rlimits: Vec::new(),
            argv: self.shell.clone(),
            env: vec![],
            cwd: Some("/root".into()),
            user: None,
        };
        let mut exec = vm.exec_pty(opts, terminal::host_winsize()).await?;
        let shared = Arc::new(Mutex::new(Shared::default()));
        let input = exec.input();
        let pid = exec.pid();
        let sh2 = shared.clone();
        tokio::spawn(async move {
            loop {
                match exec.next().await {
                    Ok(PtyEvent::Output(b)) => {
                        let mut s = sh2.lock().await;
                        push_scrollback(&mut s.scrollback, &b);
                        if let Some(v) = &s.viewer {
                            if v.send(b).is_err() {
                                s.viewer = None;
                            }
                        }
                    }
                    Ok(PtyEvent::Exit(st)) => {
                        let mut s = sh2.lock().await;
                        s.exited = Some(st);
                        s.viewer = None;
                        return;
                    }
                    Err(_) => {
                        let mut s = sh2.lock().await;
                        s.lost = true;
                        s.viewer = None;
                        return;
                    }
                }
            }
        });
        self.sessions.insert(
            name.clone(),
            Session {
                vm: name.clone(),
                pid,
                input,
                shared,
            },
        );
        Ok(name)
    }

    /// Start viewing session `name`: the scrollback so far, and a channel of
    /// what follows (closed when the session ends or another viewer takes
    /// over).
    pub async fn view(
        &self,
        name: &str,
    ) -> Result<(Vec<u8>, mpsc::UnboundedReceiver<Vec<u8>>, PtyInput)> {
        let s = self.sessions.get(name).ok_or_else(|| {
            fail(
                ErrorCode::RegistryNotFound,
                format!("no session in {name:?}"),
            )
        })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let mut sh = s.shared.lock().await;
        sh.viewer = Some(tx);
        let replay: Vec<u8> = sh.scrollback.iter().copied().collect();
        Ok((replay, rx, s.input.clone()))
    }

    /// Stop viewing (the session keeps running and recording).
    pub async fn unview(&self, name: &str) {
        if let Some(s) = self.sessions.get(name) {
            s.shared.lock().await.viewer = None;
        }
    }

    /// How session `name` ended, if it did.
    pub async fn exit_status(&self, name: &str) -> Option<ExitStatus> {
        let s = self.sessions.get(name)?;
        let sh = s.shared.lock().await;
        sh.exited
    }

    /// Hang up every session (their shells get SIGHUP) and forget them.
    pub async fn close_all(&mut self) {
        for s in self.sessions.values() {
            let _ = s.input.signal(libc::SIGHUP).await;
            tracing::debug!("closed session in {} (pid {})", s.vm, s.pid);
        }
        self.sessions.clear();
    }
}

/// Find the detach sequence in `chunk`, given whether the previous chunk
/// ended in a lone first key. Returns `(bytes to forward, detach?, pending)`.
pub fn scan_detach(pending: bool, chunk: &[u8]) -> (Vec<u8>, bool, bool) {
    let mut out = Vec::with_capacity(chunk.len() + 1);
    let mut held = pending;
    for &b in chunk {
        if held {
            if b == DETACH_KEYS[1] {
                return (out, true, false);
            }
            out.push(DETACH_KEYS[0]);
            held = false;
        }
        if b == DETACH_KEYS[0] {
            held = true;
        } else {
            out.push(b);
        }
    }
    (out, false, held)
}

const HELP: &str = "commands:\r\n  /ls               live VMs (* = open session)\r\n  /attach NAME|PID  attach (opens a shell the first time; replays scrollback after)\r\n  /help             this text\r\n  /quit             hang up all sessions and leave (the VMs keep running)\r\nwhile attached: Ctrl-] Ctrl-] detaches; the shell keeps running\r\n";

/// The multiplexer's terminal UI.
pub struct Supervisor {
    sandboxes: Sandboxes,
}

enum Attached {
    Detached,
    Ended(String),
}

impl Supervisor {
    /// `shell` is the argv of new sessions.
    pub fn new(shell: Vec<String>) -> Supervisor {
        Supervisor {
            sandboxes: Sandboxes::new(shell),
        }
    }

    pub fn sandboxes(&mut self) -> &mut Sandboxes {
        &mut self.sandboxes
    }

    async fn say(&self, s: &str) {
        let mut out = tokio::io::stdout();
        let _ = out.write_all(s.as_bytes()).await;
        let _ = out.flush().await;
    }

    async fn ls(&mut self) {
        match self.sandboxes.list().await {
            Ok(list) if list.is_empty() => {
                self.say("no live VMs (`machinen boot --name NAME --detached`)\n")
                    .await
            }
            Ok(list) => {
                let mut s = String::from("  PID      NAME\n");
                for e in list {
                    s.push_str(&format!(
                        "{} {:<8} {}\n",
                        if e.session { '*' } else { ' ' },
                        e.pid,
                        e.name
                    ));
                }
                self.say(&s).await;
            }
            Err(e) => self.say(&format!("error[{}]: {e}\n", e.code())).await,
        }
    }

    /// Run the UI until `/quit` or end of input. With `first`, attach to it
    /// right away. Returns the exit code.
    pub async fn run(&mut self, first: Option<&str>) -> Result<i32> {
        self.say("machinen mux: /ls, /attach NAME, /help, /quit; Ctrl-] Ctrl-] detaches\n")
            .await;
        if let Some(t) = first {
            self.attach(t).await;
        }
        let mut pending: Vec<u8> = Vec::new();
        loop {
            self.say("mux> ").await;
            let line = {
                let mut chunks = terminal::stdin_chunks().lock().await;
                loop {
                    if let Some(i) = pending.iter().position(|&b| b == b'\n' || b == b'\r') {
                        let l: Vec<u8> = pending.drain(..=i).collect();
                        break Some(l);
                    }
                    match chunks.recv().await {
                        Some(b) if !b.is_empty() => pending.extend_from_slice(&b),
                        _ => break None,
                    }
                }
            };
            let Some(line) = line else { break };
            let line = String::from_utf8_lossy(&line).trim().to_string();
            let mut words = line.split_whitespace();
            match (words.next(), words.next()) {
                (None, _) => {}
                (Some("/ls"), _) => self.ls().await,
                (Some("/help"), _) => self.say(&HELP.replace("\r\n", "\n")).await,
                (Some("/quit") | Some("/exit"), _) => break,
                (Some("/attach"), Some(t)) => self.attach(t).await,
                (Some("/attach"), None) => self.say("usage: /attach NAME|PID\n").await,
                (Some(other), _) => {
                    self.say(&format!("unknown command {other:?}; /help lists them\n"))
                        .await
                }
            }
        }
        self.sandboxes.close_all().await;
        Ok(0)
    }

    async fn attach(&mut self, target: &str) {
        let name = match self.sandboxes.open(target).await {
            Ok(n) => n,
            Err(e) => {
                self.say(&format!("error[{}]: {e}\n", e.code())).await;
                return;
            }
        };
        match self.attached(&name).await {
            Ok(Attached::Detached) => {
                self.say(&format!(
                    "\r\n[detached from {name}; /attach {name} to return]\n"
                ))
                .await
            }
            Ok(Attached::Ended(why)) => self.say(&format!("\r\n[{name}: {why}]\n")).await,
            Err(e) => self.say(&format!("\r\nerror[{}]: {e}\n", e.code())).await,
        }
    }

    async fn attached(&mut self, name: &str) -> Result<Attached> {
        let (replay, mut rx, input) = self.sandboxes.view(name).await?;
        self.say(&format!("[attached to {name}; Ctrl-] Ctrl-] detaches]\r\n"))
            .await;
        let _raw = RawMode::enable_stdin_if_terminal()?;
        let mut out = tokio::io::stdout();
        let _ = out.write_all(&replay).await;
        let _ = out.flush().await;
        let _ = input.resize(terminal::host_winsize()).await;
        let mut winch =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::window_change())
                .map_err(|e| fail(ErrorCode::Io, "cannot watch window size changes").source(e))?;
        let mut chunks = terminal::stdin_chunks().lock().await;
        let mut pending = false;
        let result = loop {
            tokio::select! {
                o = rx.recv() => match o {
                    Some(b) => {
                        let _ = out.write_all(&b).await;
                        let _ = out.flush().await;
                    }
                    None => {
                        let why = match self.sandboxes.exit_status(name).await {
                            Some(st) => format!("shell exited with {}", st.shell_code()),
                            None => "connection to the VM lost".to_string(),
                        };
                        break Attached::Ended(why);
                    }
                },
                c = chunks.recv() => match c {
                    Some(b) if !b.is_empty() => {
                        let (fwd, detach, p) = scan_detach(pending, &b);
                        pending = p;
                        if !fwd.is_empty() {
                            input.write(&fwd).await?;
                        }
                        if detach {
                            break Attached::Detached;
                        }
                    }
                    _ => break Attached::Detached,
                },
                _ = winch.recv() => {
                    let _ = input.resize(terminal::host_winsize()).await;
                }
            }
        };
        self.sandboxes.unview(name).await;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detach_sequence_is_found_across_chunks() {
        assert_eq!(scan_detach(false, b"abc"), (b"abc".to_vec(), false, false));
        assert_eq!(
            scan_detach(false, b"ab\x1d\x1dcd"),
            (b"ab".to_vec(), true, false)
        );
        assert_eq!(scan_detach(false, b"ab\x1d"), (b"ab".to_vec(), false, true));
        assert_eq!(scan_detach(true, b"\x1d"), (Vec::new(), true, false));
        assert_eq!(scan_detach(true, b"x"), (b"\x1dx".to_vec(), false, false));
    }

    #[test]
    fn scrollback_is_capped() {
        let mut sb = VecDeque::new();
        push_scrollback(&mut sb, &vec![1; SCROLLBACK_BYTES]);
        push_scrollback(&mut sb, b"tail");
        assert_eq!(sb.len(), SCROLLBACK_BYTES);
        assert_eq!(
            sb.iter().rev().take(4).copied().collect::<Vec<_>>(),
            b"liat"
        );
    }
}
