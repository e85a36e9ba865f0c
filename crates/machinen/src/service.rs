//! Service VMs: the VM's main command, its output log and its end.
//!
//! A VM booted with a main command (`BootOptions::cmd`, `boot --detached --
//! CMD`, or an image's baked command when detached) runs it as a guest
//! process owned by the agent (see the agent's `service` module). The
//! supervisor follows it and appends every chunk of its stdout and stderr
//! to `main.log` in the VM's directory, one JSON record a line
//! ([`LogRecord`]), rotated to `main.log.1` past [`MAIN_LOG_MAX`] (so at
//! most twice that is kept). Each record is one `write(2)` to a file
//! opened for appending, so a crash loses at most the record being
//! written; a torn last line is skipped by readers. The record's `seq` is
//! the agent's number for it, so a restored VM's supervisor (whose
//! `main.log` starts as the bundle's copy) re-attaches right after the last
//! record it has.
//!
//! When the command exits, the supervisor records the status in the
//! registry entry ([`MainRecord::exit`]) and, unless `keep_alive_on_exit`,
//! stops the VM, whose entry then stays as `exited` (with `main.log`) until
//! `gc`: [`wait`] and `logs` work after the VM is gone.

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use machinen_proto::{timeouts, ExitStatus, VmState};
use serde::{Deserialize, Serialize};

use crate::error::{fail, ErrorCode, Result};
use crate::registry::{self, Registry, RegistryEntry};
use crate::Paths;

/// The main command's log in the VM's directory, and its previous part.
pub const MAIN_LOG: &str = "main.log";
pub const MAIN_LOG_OLD: &str = "main.log.1";

/// Size at which `main.log` is rotated to `main.log.1`.
pub const MAIN_LOG_MAX: u64 = 8 << 20;

/// The main command a VM runs (`spec.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MainSpec {
    pub argv: Vec<String>,
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// Who it runs as (root when `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Keep the VM running after the command exited.
    #[serde(default)]
    pub keep_alive_on_exit: bool,
    /// The VM gets secrets once it is ready: start the command after them.
    #[serde(default)]
    pub after_secrets: bool,
    /// Resource limits set before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<machinen_proto::Rlimit>,
    /// Its stdin stays open for [`Vm::main_stdin`] writers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// A VM booted to resume a CRIU bundle's main command: the supervisor
    /// does not start it but waits for the agent to adopt the restored
    /// process (see [`crate::criu::restore`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub adopt: bool,
}

/// What the registry entry says about the main command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MainRecord {
    pub argv: Vec<String>,
    #[serde(default)]
    pub keep_alive_on_exit: bool,
    /// How it ended, once it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
    /// When it ended (Unix ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exited_at_ms: Option<u64>,
}

impl MainRecord {
    /// `exited 7`, `exited 137 (signal 9)`, or `None` while it runs.
    pub fn status_text(&self) -> Option<String> {
        let e = self.exit?;
        Some(match e.signal {
            Some(sig) if e.code.is_none() => format!("exited {} (signal {sig})", e.shell_code()),
            _ => format!("exited {}", e.shell_code()),
        })
    }
}

/// Which output a record holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogStream {
    Stdout,
    Stderr,
    /// The main command ended (`exit` is set).
    Exit,
    /// Records the supervisor could not collect in time (the guest's
    /// ring dropped them); `seq` is where the log resumes.
    Gap,
    /// The guest's serial console (only in [`LogFollower`] events).
    Console,
}

/// One line of `main.log`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub seq: u64,
    /// When the supervisor received it (Unix ms).
    pub t_ms: u64,
    pub stream: LogStream,
    /// The bytes, when they are UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// The bytes, hex-encoded, when they are not UTF-8.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hex: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitStatus>,
}

impl LogRecord {
    pub fn chunk(seq: u64, stream: LogStream, bytes: &[u8]) -> LogRecord {
        let (data, hex) = match std::str::from_utf8(bytes) {
            Ok(s) => (Some(s.to_owned()), None),
            Err(_) => (None, Some(hex::encode(bytes))),
        };
        LogRecord {
            seq,
            t_ms: registry::now_ms(),
            stream,
            data,
            hex,
            exit: None,
        }
    }

    pub fn exit(seq: u64, status: ExitStatus) -> LogRecord {
        LogRecord {
            seq,
            t_ms: registry::now_ms(),
            stream: LogStream::Exit,
            data: None,
            hex: None,
            exit: Some(status),
        }
    }

    /// The record's bytes (empty for an exit or a gap).
    pub fn bytes(&self) -> Vec<u8> {
        match (&self.data, &self.hex) {
            (Some(s), _) => s.as_bytes().to_vec(),
            (None, Some(h)) => hex::decode(h).unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }
}

/// Appends records to a VM's `main.log`, rotating it (blocking I/O: the
/// supervisor calls it off its runtime thread).
#[derive(Debug)]
pub struct LogWriter {
    dir: PathBuf,
    file: Option<fs::File>,
    size: u64,
}

impl LogWriter {
    pub fn new(dir: &Path) -> LogWriter {
        LogWriter {
            dir: dir.to_path_buf(),
            file: None,
            size: 0,
        }
    }

    fn open(&mut self) -> std::io::Result<&mut fs::File> {
        if self.file.is_none() {
            let f = fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(self.dir.join(MAIN_LOG))?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    /// Append one record: one line, one write.
    pub fn append(&mut self, rec: &LogRecord) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(rec).map_err(std::io::Error::other)?;
        line.push(b'\n');
        self.open()?;
        if self.size > 0 && self.size + line.len() as u64 > MAIN_LOG_MAX {
            self.file = None;
            fs::rename(self.dir.join(MAIN_LOG), self.dir.join(MAIN_LOG_OLD))?;
            self.open()?;
        }
        let f = self.open()?;
        f.write_all(&line)?;
        self.size += line.len() as u64;
        Ok(())
    }
}

fn parse_lines(bytes: &[u8], out: &mut Vec<LogRecord>) {
    for line in bytes.split(|b| *b == b'\n') {
        // A torn last line (a crash mid-write) or junk: skipped.
        if let Ok(r) = serde_json::from_slice::<LogRecord>(line) {
            out.push(r);
        }
    }
}

/// Every record of a VM's main log, oldest first (`main.log.1`, then
/// `main.log`). A missing log has none.
pub fn read_records(dir: &Path) -> std::io::Result<Vec<LogRecord>> {
    let mut out = Vec::new();
    for name in [MAIN_LOG_OLD, MAIN_LOG] {
        match fs::read(dir.join(name)) {
            Ok(bytes) => parse_lines(&bytes, &mut out),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// The sequence number after the last record logged (where a re-attach
/// starts), reading only the tail of `main.log`.
pub fn next_seq(dir: &Path) -> u64 {
    for name in [MAIN_LOG, MAIN_LOG_OLD] {
        let Ok(mut f) = fs::File::open(dir.join(name)) else {
            continue;
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let mut buf = Vec::new();
        if f.seek(SeekFrom::Start(len.saturating_sub(256 * 1024)))
            .is_ok()
            && f.take(256 * 1024).read_to_end(&mut buf).is_ok()
        {
            let mut recs = Vec::new();
            parse_lines(&buf, &mut recs);
            if let Some(last) = recs.iter().rev().find(|r| r.stream != LogStream::Gap) {
                return last.seq + 1;
            }
            if let Some(gap) = recs.last() {
                return gap.seq;
            }
        }
    }
    0
}

/// `--since`: a duration back from now (`90s`, `10m`, `2h`, `1d`), a Unix
/// time in seconds, or a UTC time `YYYY-MM-DDTHH:MM:SS[Z]`. Unix ms.
pub fn parse_since(s: &str, now_ms: u64) -> Result<u64> {
    let bad = || {
        crate::error::Error::from(
            fail(ErrorCode::BootArgsInvalid, format!("invalid --since {s:?}"))
                .hint("give a duration (30s, 10m, 2h, 1d), Unix seconds, or 2026-01-31T12:00:00Z"),
        )
    };
    let s = s.trim();
    if let Some(unit) = s.chars().last().filter(|c| "smhd".contains(*c)) {
        let n: u64 = s[..s.len() - 1].parse().map_err(|_| bad())?;
        let secs = match unit {
            's' => n,
            'm' => n * 60,
            'h' => n * 3600,
            _ => n * 86400,
        };
        return Ok(now_ms.saturating_sub(secs.saturating_mul(1000)));
    }
    if let Ok(secs) = s.parse::<u64>() {
        return Ok(secs.saturating_mul(1000));
    }
    // YYYY-MM-DDTHH:MM:SS, optionally with a Z (UTC only).
    let t = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = t.split_once(['T', ' ']).ok_or_else(bad)?;
    let d: Vec<i64> = date
        .split('-')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    let h: Vec<i64> = time
        .split(':')
        .map(|p| p.parse())
        .collect::<Result<_, _>>()
        .map_err(|_| bad())?;
    if d.len() != 3 || h.len() != 3 || !(1..=12).contains(&d[1]) || !(1..=31).contains(&d[2]) {
        return Err(bad());
    }
    let days = days_from_civil(d[0], d[1], d[2]);
    let secs = days * 86400 + h[0] * 3600 + h[1] * 60 + h[2];
    u64::try_from(secs).map(|s| s * 1000).map_err(|_| bad())
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// Which records `logs` prints: the last `tail` chunks (`None`: all) from
/// `since_ms` on.
pub fn select(
    records: Vec<LogRecord>,
    tail: Option<usize>,
    since_ms: Option<u64>,
) -> Vec<LogRecord> {
    let mut recs: Vec<LogRecord> = records
        .into_iter()
        .filter(|r| since_ms.is_none_or(|s| r.t_ms >= s))
        .collect();
    if let Some(n) = tail {
        // Lines, counted by their chunks' newlines from the end (a chunk
        // is kept whole).
        let mut lines = 0usize;
        let mut keep = recs.len();
        for (i, r) in recs.iter().enumerate().rev() {
            if lines >= n {
                break;
            }
            // Exit and gap records are not lines: they come along.
            lines += match r.stream {
                LogStream::Stdout | LogStream::Stderr => r
                    .data
                    .as_deref()
                    .map_or(1, |d| d.matches('\n').count().max(1)),
                _ => 0,
            };
            keep = i;
        }
        recs.drain(..keep);
    }
    recs
}

/// One event of a followed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogEvent {
    /// Output: the main command's stdout or stderr, or console bytes.
    Chunk {
        stream: LogStream,
        data: Vec<u8>,
        t_ms: u64,
        /// The record's number (main log), or the console's byte offset.
        seq: u64,
    },
    /// The main command exited.
    Exit(ExitStatus),
}

/// What a [`LogFollower`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogSource {
    /// The main command's `main.log` records.
    Main,
    /// The guest's serial console, as bytes.
    Console,
}

/// A streaming subscription to a VM's main-command output or console:
/// [`LogFollower::next`] yields what is appended, as it is appended, and
/// `None` once the VM ended (or, for the main log, after the exit record).
/// It reads the files the supervisor writes, so any number of followers
/// cost the VM nothing.
pub struct LogFollower {
    dir: PathBuf,
    name: &'static str,
    source: LogSource,
    file: Option<fs::File>,
    ino: u64,
    partial: Vec<u8>,
    pending: std::collections::VecDeque<LogEvent>,
    supervisor: (u32, u64),
    done: bool,
    /// Main records up to this number were seen already (printed from
    /// the history): skipped.
    skip_through: Option<u64>,
}

impl LogFollower {
    /// Follow from the current end of the log (`from_start`: from its
    /// beginning, `main.log.1` excluded).
    pub fn new(
        entry: &RegistryEntry,
        dir: &Path,
        source: LogSource,
        from_start: bool,
    ) -> LogFollower {
        let name = match source {
            LogSource::Main => MAIN_LOG,
            LogSource::Console => crate::spec::files::CONSOLE,
        };
        let mut f = LogFollower {
            dir: dir.to_path_buf(),
            name,
            source,
            file: None,
            ino: 0,
            partial: Vec::new(),
            pending: Default::default(),
            supervisor: (entry.supervisor_pid, entry.supervisor_start),
            done: false,
            skip_through: None,
        };
        f.reopen(from_start);
        f
    }

    /// Skip main records numbered up to `seq` (already shown): a caller
    /// that creates the follower first and then reads the history misses
    /// nothing and shows nothing twice.
    pub fn skip_through(&mut self, seq: u64) {
        self.skip_through = Some(seq);
    }

    fn reopen(&mut self, from_start: bool) {
        if let Ok(mut file) = fs::File::open(self.dir.join(self.name)) {
            if !from_start {
                let _ = file.seek(SeekFrom::End(0));
            }
            self.ino = file.metadata().map(|m| m.ino()).unwrap_or(0);
            self.file = Some(file);
        }
    }

    /// Read what was appended to the open file; true if anything was.
    fn drain_file(&mut self) -> bool {
        let Some(file) = self.file.as_mut() else {
            return false;
        };
        let mut buf = Vec::new();
        if file.read_to_end(&mut buf).is_err() || buf.is_empty() {
            return false;
        }
        match self.source {
            LogSource::Console => {
                let seq = file
                    .stream_position()
                    .unwrap_or(0)
                    .saturating_sub(buf.len() as u64);
                self.pending.push_back(LogEvent::Chunk {
                    stream: LogStream::Console,
                    data: buf,
                    t_ms: registry::now_ms(),
                    seq,
                })
            }
            LogSource::Main => {
                self.partial.extend_from_slice(&buf);
                let end = self
                    .partial
                    .iter()
                    .rposition(|b| *b == b'\n')
                    .map_or(0, |i| i + 1);
                let whole: Vec<u8> = self.partial.drain(..end).collect();
                let mut recs = Vec::new();
                parse_lines(&whole, &mut recs);
                for r in recs {
                    if self.skip_through.is_some_and(|s| r.seq <= s) && r.stream != LogStream::Exit
                    {
                        continue;
                    }
                    match r.stream {
                        LogStream::Exit => {
                            if let Some(st) = r.exit {
                                self.pending.push_back(LogEvent::Exit(st));
                            }
                        }
                        LogStream::Gap => {}
                        stream => self.pending.push_back(LogEvent::Chunk {
                            data: r.bytes(),
                            stream,
                            t_ms: r.t_ms,
                            seq: r.seq,
                        }),
                    }
                }
            }
        }
        true
    }

    /// The next event; `None` when the log is over (the VM ended, or the
    /// main command's exit was read).
    pub async fn next(&mut self) -> Option<LogEvent> {
        loop {
            if let Some(ev) = self.pending.pop_front() {
                if matches!(ev, LogEvent::Exit(_)) {
                    self.done = true;
                }
                return Some(ev);
            }
            if self.done {
                return None;
            }
            if self.drain_file() {
                continue;
            }
            // Rotated (or created since): finish the old file, then switch.
            let ino = fs::metadata(self.dir.join(self.name)).map(|m| m.ino()).ok();
            if ino.is_some() && ino != Some(self.ino) {
                self.drain_file();
                self.partial.clear();
                self.reopen(true);
                continue;
            }
            if !registry::is_alive(self.supervisor.0, self.supervisor.1) {
                // One last look: the supervisor may have written its end.
                self.drain_file();
                self.done = true;
                continue;
            }
            tokio::time::sleep(timeouts::LOG_FOLLOW_POLL).await;
        }
    }
}

/// How a VM ended, as [`wait`] reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum WaitOutcome {
    /// The main command exited with this status (the VM stopped, or runs
    /// on when it was kept alive).
    Exited {
        status: ExitStatus,
        /// The shell's spelling of `status` (`exit_code` in the CLI's JSON).
        #[serde(skip)]
        code: i32,
    },
    /// The VM was stopped (or snapshotted away, or powered itself off)
    /// before a main command ended.
    Stopped,
    /// The VM crashed (or its supervisor died), with the cause.
    Crashed { cause: String },
}

impl WaitOutcome {
    /// The exit status `machinen wait` ends with: the main command's own;
    /// 143 (128 + SIGTERM, like a stopped container) for a stopped VM;
    /// 125 for a crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            WaitOutcome::Exited { code, .. } => *code,
            WaitOutcome::Stopped => 143,
            WaitOutcome::Crashed { .. } => 125,
        }
    }
}

fn read_entry(dir: &Path) -> Option<RegistryEntry> {
    let bytes = fs::read(dir.join("meta.json")).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The outcome of an entry that says it ended, if it does.
fn outcome_of(e: &RegistryEntry) -> Option<WaitOutcome> {
    if let Some(m) = &e.main {
        // A VM its main command stops is waited for until it is gone (as
        // `docker wait` returns once the container stopped); one kept alive
        // answers at the exit.
        if let Some(status) = m.exit.filter(|_| m.keep_alive_on_exit || !e.is_live()) {
            return Some(WaitOutcome::Exited {
                status,
                code: status.shell_code(),
            });
        }
    }
    if !e.is_live() {
        return Some(match e.state {
            VmState::Stopped | VmState::Stopping => WaitOutcome::Stopped,
            _ => WaitOutcome::Crashed {
                cause: e.death_cause(),
            },
        });
    }
    None
}

/// Block until the VM `target` (name, pid or id; a VM that already ended
/// too) ends, or the main command of a VM kept alive after it exits: then
/// how. `timeout` bounds the
/// wait (`None`: as long as it takes), failing with `WAIT_TIMEOUT`.
pub async fn wait(target: &str, timeout: Option<Duration>) -> Result<(RegistryEntry, WaitOutcome)> {
    let paths = Paths::from_env()?;
    let reg = Registry::new(&paths.registry);
    let entry = {
        let (reg, target) = (reg.clone(), target.to_owned());
        tokio::task::spawn_blocking(move || reg.find_any(&target))
            .await
            .map_err(|e| fail(ErrorCode::Io, "registry lookup task failed").source(e))??
    };
    let dir = reg.dir(&entry.id);
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let mut last = entry;
    loop {
        let d2 = dir.clone();
        let now = tokio::task::spawn_blocking(move || read_entry(&d2))
            .await
            .ok()
            .flatten();
        match now {
            // The directory went: the supervisor removed it on a stop.
            None => return Ok((last, WaitOutcome::Stopped)),
            Some(e) => {
                if let Some(out) = outcome_of(&e) {
                    return Ok((e, out));
                }
                last = e;
            }
        }
        if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
            return Err(fail(
                ErrorCode::WaitTimeout,
                format!(
                    "VM {:?} was still running when the wait timed out",
                    last.name
                ),
            )
            .hint("wait longer (--timeout), or without a timeout")
            .into());
        }
        tokio::time::sleep(timeouts::LOG_FOLLOW_POLL).await;
    }
}

impl crate::vm::Vm {
    /// Resolves when the VM ends or its main command exits: with the
    /// command's exit status, or why the VM ended (stopped, crashed).
    /// `timeout` bounds the wait (`None`: unbounded).
    pub async fn wait(&self, timeout: Option<Duration>) -> Result<WaitOutcome> {
        Ok(wait(&self.info().id, timeout).await?.1)
    }

    /// A streaming subscription to the main command's output
    /// ([`LogSource::Main`]) or the guest console, from now on
    /// (`from_start`: from the start of the current log file).
    pub fn follow_logs(&self, source: LogSource, from_start: bool) -> Result<LogFollower> {
        follow(&self.info().id, source, from_start)
    }

    /// Write to the main command's stdin (a VM booted with
    /// [`crate::vm::BootOptions::main_stdin`]): one writer at a time
    /// (`MAIN_ALREADY_RUNNING` while another writes); dropping the writer
    /// without [`MainStdin::eof`] leaves stdin open for the next one (after
    /// a restore, too). `MAIN_NOT_RUNNING` when there is no main command,
    /// it ended, or its stdin is closed.
    pub async fn main_stdin(&self) -> Result<MainStdin> {
        use machinen_proto::{Frame, Request};
        let mut conn = self.connect().await?;
        let what = "opening the main command's stdin";
        machinen_proto::send(&mut conn, &Frame::Request(Request::MainStdin))
            .await
            .map_err(|e| crate::vm::protocol_error(what, e))?;
        let first = tokio::time::timeout(
            timeouts::CONTROL_ANSWER,
            machinen_proto::read_frame(&mut conn),
        )
        .await
        .map_err(|_| {
            fail(
                ErrorCode::ExecVsockUnavailable,
                format!("no answer while {what}"),
            )
        })?
        .map_err(|e| crate::vm::protocol_error(what, e))?;
        match first {
            Some(Frame::Started { pid }) => Ok(MainStdin { conn, pid }),
            Some(Frame::Error(e)) => Err(crate::vm::wire_error(e)),
            other => Err(fail(
                ErrorCode::ProtocolError,
                format!("unexpected answer while {what}: {other:?}"),
            )
            .into()),
        }
    }

    /// Send `signal` to the main command's process, as `kill(2)` (with
    /// `group`, to its whole process group, as `killpg(2)`): its guest pid.
    /// `MAIN_NOT_RUNNING` when there is none or it ended, `SIGNAL_INVALID`
    /// for a number that is no signal.
    pub async fn signal_main(&self, signal: i32, group: bool) -> Result<u32> {
        self.call(
            machinen_proto::exchange::SignalMain { signal, group },
            machinen_proto::timeouts::CONTROL_ANSWER,
            ErrorCode::ExecVsockUnavailable,
        )
        .await
    }
}

/// A writer to the VM's main command's stdin (see [`Vm::main_stdin`]).
#[derive(Debug)]
pub struct MainStdin {
    conn: tokio::net::UnixStream,
    pid: u32,
}

impl MainStdin {
    /// The main command's guest pid.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Bytes for its stdin (in chunks the protocol takes).
    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        for c in bytes.chunks(machinen_proto::MAX_CHUNK) {
            machinen_proto::send(&mut self.conn, &machinen_proto::Frame::Stdin(c.to_vec()))
                .await
                .map_err(|e| crate::vm::protocol_error("writing the main command's stdin", e))?;
        }
        Ok(())
    }

    /// Close its stdin: it reads end of file.
    pub async fn eof(mut self) -> Result<()> {
        machinen_proto::send(&mut self.conn, &machinen_proto::Frame::StdinEof)
            .await
            .map_err(|e| crate::vm::protocol_error("closing the main command's stdin", e))
    }
}

/// [`LogFollower`] for the VM `target` (name, pid or id; live or ended).
pub fn follow(target: &str, source: LogSource, from_start: bool) -> Result<LogFollower> {
    let paths = Paths::from_env()?;
    let reg = Registry::new(&paths.registry);
    let entry = reg.find_any(target)?;
    let dir = reg.dir(&entry.id);
    Ok(LogFollower::new(&entry, &dir, source, from_start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_log_and_rotate() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut w = LogWriter::new(dir.path());
        w.append(&LogRecord::chunk(0, LogStream::Stdout, b"GET / HTTP/1.1\n"))
            .expect("append");
        w.append(&LogRecord::chunk(1, LogStream::Stderr, &[0xff, 0x00]))
            .expect("append");
        w.append(&LogRecord::exit(
            2,
            ExitStatus {
                code: Some(7),
                signal: None,
            },
        ))
        .expect("append");
        // A torn line at the end (a crash mid-write) is skipped.
        fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(MAIN_LOG))
            .and_then(|mut f| f.write_all(b"{\"seq\":3,\"t_m"))
            .expect("torn");
        let recs = read_records(dir.path()).expect("read");
        assert_eq!(recs.len(), 3);
        assert_eq!(recs[0].bytes(), b"GET / HTTP/1.1\n");
        assert_eq!(recs[1].bytes(), [0xff, 0x00]);
        assert_eq!(recs[1].stream, LogStream::Stderr);
        assert_eq!(recs[2].exit.and_then(|e| e.code), Some(7));
        assert_eq!(next_seq(dir.path()), 3);

        // Past the limit the log moves to main.log.1 and a new one starts.
        let big = "x".repeat(machinen_proto::MAX_CHUNK);
        let mut w = LogWriter::new(dir.path());
        for seq in 3..150 {
            w.append(&LogRecord::chunk(seq, LogStream::Stdout, big.as_bytes()))
                .expect("append");
        }
        assert!(dir.path().join(MAIN_LOG_OLD).exists());
        assert!(fs::metadata(dir.path().join(MAIN_LOG)).expect("log").len() <= MAIN_LOG_MAX);
        let recs = read_records(dir.path()).expect("read");
        assert_eq!(recs.last().map(|r| r.seq), Some(149));
        assert_eq!(next_seq(dir.path()), 150);
    }

    /// A follower sees records as they are appended, across a rotation,
    /// skips what the caller already showed, and ends at the exit record.
    #[tokio::test]
    async fn a_follower_streams_appended_records_across_rotation_until_the_exit() {
        let dir = tempfile::tempdir().expect("tmp");
        let me = std::process::id();
        let entry: RegistryEntry = serde_json::from_value(serde_json::json!({
            "id": "x", "name": "x", "state": "running",
            "supervisor_pid": me,
            "supervisor_start": registry::process_start_time(me).expect("start"),
            "control_socket": "/nonexistent", "created_at_ms": 0,
        }))
        .expect("entry");
        let mut w = LogWriter::new(dir.path());
        w.append(&LogRecord::chunk(0, LogStream::Stdout, b"old\n"))
            .expect("append");
        let mut f = LogFollower::new(&entry, dir.path(), LogSource::Main, true);
        f.skip_through(0);
        let path = dir.path().to_path_buf();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = LogWriter::new(&path);
            w.append(&LogRecord::chunk(1, LogStream::Stderr, b"one\n"))
                .expect("append");
            // Rotate: the follower finishes the old file, then reads the new.
            std::thread::sleep(Duration::from_millis(300));
            let big = "y".repeat(machinen_proto::MAX_CHUNK);
            for seq in 2..140 {
                w.append(&LogRecord::chunk(seq, LogStream::Stdout, big.as_bytes()))
                    .expect("append");
            }
            w.append(&LogRecord::chunk(140, LogStream::Stdout, b"last\n"))
                .expect("append");
            w.append(&LogRecord::exit(
                141,
                ExitStatus {
                    code: Some(7),
                    signal: None,
                },
            ))
            .expect("append");
        });
        let mut seqs = Vec::new();
        let mut exit = None;
        let collect = async {
            while let Some(ev) = f.next().await {
                match ev {
                    LogEvent::Chunk {
                        seq, stream, data, ..
                    } => {
                        if seq == 1 {
                            assert_eq!(
                                (stream, data.as_slice()),
                                (LogStream::Stderr, &b"one\n"[..])
                            );
                        }
                        seqs.push(seq);
                    }
                    LogEvent::Exit(st) => exit = Some(st),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(60), collect)
            .await
            .expect("the follower ends at the exit record");
        writer.await.expect("writer");
        assert!(dir.path().join(MAIN_LOG_OLD).exists(), "the log rotated");
        assert_eq!(
            seqs,
            (1..=140).collect::<Vec<_>>(),
            "every record once, in order"
        );
        assert_eq!(exit.and_then(|e| e.code), Some(7));
    }

    #[test]
    fn tail_counts_lines_and_since_filters_by_time() {
        let mk = |seq, t_ms, s: &str| LogRecord {
            t_ms,
            ..LogRecord::chunk(seq, LogStream::Stdout, s.as_bytes())
        };
        let recs = vec![mk(0, 10, "a\nb\n"), mk(1, 20, "c\n"), mk(2, 30, "d\ne\n")];
        let seqs = |v: Vec<LogRecord>| v.iter().map(|r| r.seq).collect::<Vec<_>>();
        assert_eq!(seqs(select(recs.clone(), Some(2), None)), [2]);
        assert_eq!(seqs(select(recs.clone(), Some(3), None)), [1, 2]);
        assert_eq!(seqs(select(recs.clone(), None, Some(20))), [1, 2]);
        assert_eq!(seqs(select(recs.clone(), Some(1), None)), [2]);
        assert_eq!(seqs(select(recs.clone(), None, None)), [0, 1, 2]);
        let mut ended = recs;
        ended.push(LogRecord::exit(
            3,
            ExitStatus {
                code: Some(0),
                signal: None,
            },
        ));
        assert_eq!(seqs(select(ended.clone(), Some(1), None)), [2, 3]);
        assert!(select(ended, Some(0), None).is_empty());
    }

    #[test]
    fn since_accepts_durations_unix_seconds_and_utc_times() {
        let now = 1_000_000_000;
        assert_eq!(parse_since("10s", now).expect("s"), now - 10_000);
        assert_eq!(parse_since("2m", now).expect("m"), now - 120_000);
        assert_eq!(
            parse_since("1700000000", now).expect("unix"),
            1_700_000_000_000
        );
        assert_eq!(
            parse_since("2023-11-14T22:13:20Z", now).expect("utc"),
            1_700_000_000_000
        );
        assert!(parse_since("yesterday", now).is_err());
        assert!(parse_since("2023-13-01T00:00:00Z", now).is_err());
    }

    #[test]
    fn exit_status_text() {
        let mut m = MainRecord::default();
        assert_eq!(m.status_text(), None);
        m.exit = Some(ExitStatus {
            code: Some(7),
            signal: None,
        });
        assert_eq!(m.status_text().as_deref(), Some("exited 7"));
        m.exit = Some(ExitStatus {
            code: None,
            signal: Some(9),
        });
        assert_eq!(m.status_text().as_deref(), Some("exited 137 (signal 9)"));
    }
}
