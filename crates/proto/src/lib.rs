//! The machinen wire protocol, version 1.
//!
//! Two links speak it:
//!
//! * **host ↔ guest agent**: one virtio-serial port named
//!   [`AGENT_PORT_NAME`] carries one [yamux] session. The host (the per-VM
//!   supervisor) is the yamux *client*, the agent the *server*. Every
//!   operation (an exec, a file transfer, a port-forward connection) is its
//!   own yamux stream.
//! * **client ↔ supervisor**: a unix control socket. Each client connection
//!   carries exactly one operation, like one yamux stream does.
//!
//! Both links carry the same [`Frame`]s, so the supervisor forwards an exec
//! by splicing the client connection onto a fresh agent stream after the first
//! frame.
//!
//! # Encoding
//!
//! A frame is `len: u32 big-endian` followed by `len` bytes: one tag byte and
//! the body. Control bodies are UTF-8 JSON (serde); data bodies are raw bytes.
//! `len` is bounded by [`MAX_FRAME_LEN`]; a reader refuses a larger length
//! before allocating anything, and a truncated frame is an error, not a hang
//! or a panic. Unknown tags are an error ([`DecodeError::UnknownTag`]).
//!
//! # Message sequence
//!
//! Session start (agent link, on the first yamux stream the host opens):
//!
//! ```text
//! host  -> agent : Hello { version, role: "host" }
//! agent -> host  : HelloAck { version, agent_version, kernel, boot_id }
//! ```
//!
//! A peer that receives a `Hello` with a different major `version` answers
//! `Error { code: "PROTOCOL_VERSION_MISMATCH" }` and closes the stream.
//!
//! Exec (one stream per command, on either link):
//!
//! ```text
//! client -> peer : Request(Exec { argv, env, cwd, tty })
//! peer -> client : Started { pid }            | Error { code, message }
//! client -> peer : Stdin(bytes)* StdinEof?    (any time, interleaved)
//! peer -> client : Stdout(bytes)* Stderr(bytes)*
//! peer -> client : Exit { code, signal }      (last frame; stream closes)
//! client -> peer : Hangup                     (instead of further input)
//! ```
//!
//! `StdinEof` closes the command's stdin and nothing else; a client that goes
//! away before `Exit` is a terminal hang-up, which the supervisor tells the
//! agent with `Hangup` when the client's control connection ends early. The
//! agent then sends `SIGHUP` (and `SIGCONT`) to the command's process group
//! and, if the command itself still runs after a short grace period,
//! `SIGKILL` to the group. A stream that merely ends (its session was lost,
//! as when a restored guest's old session is broken) is not a hang-up: the
//! command keeps running, so a snapshot never kills it.
//!
//! Files (one stream per transfer, on either link):
//!
//! ```text
//! client -> peer : Request(WriteFile { path, mode, append }) Data* Eof
//! peer -> client : Response(Written { bytes })   | Error { code: FILES_*, .. }
//!
//! client -> peer : Request(ReadFile { path })
//! peer -> client : Response(FileInfo { mode, size }) Data* Eof | Error
//! ```
//!
//! Directory trees (one stream per transfer; the data is one tar stream):
//!
//! ```text
//! client -> peer : Request(PushDir { path, mode }) Data* Eof
//! peer -> client : Response(DirWritten { entries, bytes }) | Error
//!
//! client -> peer : Request(PullDir { path, exclude })
//! peer -> client : Response(DirInfo { mode, entries, bytes }) Data* Eof | Error
//! ```
//!
//! The VM's main command (agent link; service VMs), owned by the agent, its
//! output kept in a ring of numbered records that any later session reads:
//!
//! ```text
//! host -> agent : Request(StartMain { argv, env, cwd, after_secrets })
//! agent -> host : Started { pid }            | Error { code, message }
//! host -> agent : Request(AttachMain { from_seq })
//! agent -> host : Response(MainAttached { pid, seq })   (again after a gap)
//! agent -> host : Stdout(bytes)* Stderr(bytes)*  (records seq, seq+1, …)
//! agent -> host : Exit { code, signal }      (once it ended and all went out)
//! host -> agent : Request(MainStdin)
//! agent -> host : Started { pid }              | Error { code: MAIN_NOT_RUNNING, .. }
//! host -> agent : Stdin(bytes)* StdinEof?
//! host -> agent : Request(SignalMain { signal, group })
//! agent -> host : Response(MainSignalled { pid }) | Error { code: MAIN_NOT_RUNNING, .. }
//! ```
//!
//! The CRIU engine (agent link, forwarded from the control link; the host
//! staged CRIU and, for a restore, the images in guest directories first):
//!
//! ```text
//! host -> agent : Request(CriuDump { criu, images, pid, leave_running })
//! agent -> host : Response(CriuDumped { pid, comm, main, stdio }) | Error { code: SNAPSHOT_DUMP_FAILED, .. }
//! host -> agent : Request(CriuRestore { criu, images, main, tcp_close, first_seq })
//! agent -> host : Response(CriuRestored { pid }) | Error { code: RESTORE_BUNDLE_INCOMPATIBLE, .. }
//! ```
//!
//! Secrets: `Request(Secrets { secrets })` → `Response(SecretsSet)`;
//! `Request(WipeSecrets)` → `Response(SecretsWiped)` (before a snapshot).
//!
//! Control requests (client ↔ supervisor only): `Request(Status)` →
//! `Response(Status{..})` (its `state` is `recovering` or `unhealthy`, with
//! a `reason`, while the agent session is being re-established or could not
//! be); `Request(Stop { force })` → `Response(Stopping)`, then the
//! supervisor shuts the VM down and exits; `Request(Balloon { target_bytes })`
//! → `Response(Balloon{..})` (the balloon's target and the guest's usable
//! memory now; the guest reaches a new target over the next moments), or
//! `Error(BALLOON_UNAVAILABLE | BALLOON_TARGET_INVALID)`;
//! `Request(Network { change })` → `Response(Network{ policy, counters })`
//! (the egress policy after the change, and the traffic so far), or
//! `Error(NETWORK_POLICY_INVALID | NETWORK_UNAVAILABLE)`;
//! `Request(EgressSecrets { secrets })` → `Response(EgressSecretsSet)` (see
//! [`egress`] for the proxy's own sequence).
//!
//! Versioning: [`PROTOCOL_VERSION`] is bumped on any incompatible change to a
//! frame tag or a body. New optional JSON fields are compatible (serde
//! defaults), new tags are not.
//!
//! [yamux]: https://docs.rs/yamux

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

pub mod chan;
pub mod egress;
pub mod env;
pub mod exclude;
pub mod netpolicy;
pub mod rfc3339;
pub mod split;
pub mod timeouts;
pub mod tree;

/// The line-based preamble that starts every agent session, below yamux.
///
/// The host writes `MACHINEN-HELLO <nonce>\n`; the agent, which discards
/// everything until it sees such a line, answers `MACHINEN-READY <nonce>\n`
/// and starts a yamux server; the host, which discards everything until the
/// matching answer, starts the yamux client. Stale bytes of an earlier
/// session (a restored guest's in-flight output, a half-sent frame) are
/// thereby skipped on both sides. An agent whose yamux session fails goes
/// back to scanning for a preamble. A supervisor whose session fails under a
/// running guest (bytes that are not yamux on the channel, an agent that
/// stopped answering) starts over the same way, on a fresh connection, with
/// the break in front of the hello.
pub mod error_code;
pub mod exchange;
pub mod phase;
pub mod state;

pub use error_code::ErrorCode;
pub use phase::{Phase, PhaseClock};
pub use state::VmState;

pub mod preamble {
    /// Sent by a host before its hello to a guest that may still be inside
    /// an earlier session (a restored one): no yamux peer accepts it as a
    /// frame header (version 0xff), so the stale session fails, and the
    /// newline ends the junk line for an agent already scanning for a hello.
    /// yamux reads a frame header exactly (12 bytes), so the hello sent right
    /// behind the break stays unread for the agent's next preamble scan.
    pub const BREAK: &[u8] = b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\n";

    pub const HELLO: &str = "MACHINEN-HELLO ";
    pub const READY: &str = "MACHINEN-READY ";
    /// Longest line a scanner keeps (longer lines cannot be a preamble).
    pub const MAX_LINE: usize = 64;

    pub fn hello(nonce: &str) -> String {
        format!("{HELLO}{nonce}\n")
    }

    pub fn ready(nonce: &str) -> String {
        format!("{READY}{nonce}\n")
    }

    /// The nonce of a hello line (without its newline), if it is one.
    pub fn parse_hello(line: &[u8]) -> Option<&str> {
        let s = std::str::from_utf8(line).ok()?;
        let nonce = s.strip_prefix(HELLO)?;
        (!nonce.is_empty() && nonce.len() <= 32 && nonce.bytes().all(|b| b.is_ascii_hexdigit()))
            .then_some(nonce)
    }

    /// The nonce of a hello at the end of `line` (without its newline),
    /// after whatever else the line holds. A stale session can leave bytes
    /// without a newline in front of a preamble line (a restored guest's
    /// last yamux frames, say); the nonce keeps the match unambiguous.
    pub fn hello_at_end(line: &[u8]) -> Option<&str> {
        let at = line
            .windows(HELLO.len())
            .rposition(|w| w == HELLO.as_bytes())?;
        parse_hello(&line[at..])
    }

    /// Whether `line` (without its newline) ends with the ready answer to
    /// `nonce`, whatever precedes it (see [`hello_at_end`]).
    pub fn is_ready_for(line: &[u8], nonce: &str) -> bool {
        let want = ready(nonce);
        line.ends_with(want.trim_end().as_bytes())
    }

    /// Splits a byte stream into lines, keeping only the last [`MAX_LINE`]
    /// bytes or so of each (enough for a preamble line and the bytes that
    /// may precede it), in constant memory whatever the stream holds.
    #[derive(Debug, Default)]
    pub struct LineTail {
        buf: Vec<u8>,
    }

    impl LineTail {
        /// Feed one byte; at a newline, the line's tail (without it).
        pub fn push(&mut self, b: u8) -> Option<Vec<u8>> {
            if b == b'\n' {
                return Some(std::mem::take(&mut self.buf));
            }
            if self.buf.len() >= 2 * MAX_LINE {
                self.buf.drain(..MAX_LINE);
            }
            self.buf.push(b);
            None
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn hello_round_trips_and_junk_is_not_hello() {
            let h = hello("00ff");
            assert_eq!(parse_hello(h.trim_end().as_bytes()), Some("00ff"));
            assert_eq!(ready("00ff"), "MACHINEN-READY 00ff\n");
            assert_eq!(parse_hello(b"MACHINEN-HELLO "), None);
            assert_eq!(parse_hello(b"MACHINEN-HELLO zz"), None);
            assert_eq!(parse_hello(&[0xff; 20]), None);
        }

        /// A restored guest's stale yamux frame (no newline) in front of the
        /// answer: seen on real restores, where an exact-line match missed it.
        #[test]
        fn preamble_lines_match_after_stale_bytes() {
            let stale = [0u8, 0, 0, 4, 0, 0, 0, 0x1b, 0, 0, 0, 0];
            let mut tail = LineTail::default();
            let mut lines = Vec::new();
            for b in stale
                .iter()
                .chain([0xffu8; 300].iter())
                .chain(ready("8bf418ca").as_bytes())
            {
                lines.extend(tail.push(*b));
            }
            assert_eq!(lines.len(), 1);
            assert!(is_ready_for(&lines[0], "8bf418ca"));
            assert!(!is_ready_for(&lines[0], "8bf418cb"));
            assert!(!is_ready_for(b"MACHINEN-READY 8bf418ca junk", "8bf418ca"));
            let mut line = stale.to_vec();
            line.extend_from_slice(hello("00ff").trim_end().as_bytes());
            assert_eq!(hello_at_end(&line), Some("00ff"));
            assert_eq!(hello_at_end(b"MACHINEN-HELLO 00ff MACHINEN-HELLO zz"), None);
            assert_eq!(hello_at_end(b"junk"), None);
        }
    }
}

/// Incompatible protocol changes bump this.
pub const PROTOCOL_VERSION: u32 = 1;

/// The PATH a command gets when its image and request set none (Docker's).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A valid hostname: RFC 1123 labels, at most 64 bytes (the kernel's
/// limit). The library refuses others at boot; the agent ignores them.
pub fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// What a launcher writes on a foreground supervisor's stdin (after the
/// restore gate's line, if any) before closing it, to let the VM outlive
/// it: without this line, the pipe closing stops the VM.
pub const DETACH_LINE: &[u8] = b"detach\n";

/// Name of the virtio-serial port the agent listens on.
pub const AGENT_PORT_NAME: &str = "org.machinen.agent";
/// Serial of the virtio-blk disk that holds a VM's copy-once mounts; the
/// agent finds the disk by it (`/sys/block/vd*/serial`), whatever its name.
pub const MOUNTS_DISK_SERIAL: &str = "machinen-mounts";
/// The virtio-fs tag of live mount `i` is this prefix and `i`.
pub const LIVE_MOUNT_TAG_PREFIX: &str = "machinen-live";

/// Largest accepted frame (tag + body), in bytes.
pub const MAX_FRAME_LEN: usize = 1024 * 1024;

/// Largest data chunk a sender puts into one `Stdin`/`Stdout`/`Stderr`/`Data`
/// frame. Well below [`MAX_FRAME_LEN`] so a frame never needs splitting.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Frame tags. Stable on the wire: never renumber.
mod tag {
    pub const HELLO: u8 = 1;
    pub const HELLO_ACK: u8 = 2;
    pub const REQUEST: u8 = 3;
    pub const RESPONSE: u8 = 4;
    pub const STARTED: u8 = 5;
    pub const STDIN: u8 = 6;
    pub const STDIN_EOF: u8 = 7;
    pub const STDOUT: u8 = 8;
    pub const STDERR: u8 = 9;
    pub const EXIT: u8 = 10;
    pub const ERROR: u8 = 11;
    pub const RESIZE: u8 = 12;
    pub const SIGNAL: u8 = 13;
    pub const DATA: u8 = 14;
    pub const EOF: u8 = 15;
    pub const HANGUP: u8 = 16;
}

/// First frame of a session, sent by the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Free-form identity of the sender, for logs.
    #[serde(default)]
    pub role: String,
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub version: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// `uname -r` of the guest.
    #[serde(default)]
    pub kernel: String,
    /// `/proc/sys/kernel/random/boot_id` of the guest.
    #[serde(default)]
    pub boot_id: String,
}

/// Run a program in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ExecRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, applied over the agent's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute); `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Allocate a pseudo-terminal (stdout carries the merged output).
    #[serde(default)]
    pub tty: bool,
    /// Initial window size when `tty`.
    #[serde(default)]
    pub winsize: Option<WinSize>,
    /// Run as this user instead of root: `NAME`, `UID`, `NAME:GROUP` or
    /// `UID:GID`, names looked up in the guest's `/etc/passwd` and
    /// `/etc/group`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits set before the program starts (`setrlimit(2)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
}

/// The VM's main command (`Request::StartMain`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MainRequest {
    /// Program and arguments; `argv[0]` is looked up in `PATH`.
    pub argv: Vec<String>,
    /// Extra environment, applied over the agent's default environment.
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Working directory (absolute); `/` when absent.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Start it only once the host has installed the VM's secrets (a VM
    /// booted with secrets: the host sends them after the guest is ready),
    /// so that the command finds them; the answer waits as long.
    #[serde(default)]
    pub after_secrets: bool,
    /// Run as this user (see [`ExecRequest::user`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Resource limits set before the program starts (`setrlimit(2)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rlimits: Vec<Rlimit>,
    /// Keep its stdin open for `MainStdin` writers (else it is `/dev/null`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
}

/// A resource limit, named as the OCI runtime spec and `setrlimit(2)` name
/// it (`RLIMIT_NOFILE`); see [`RLIMITS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: String,
    pub soft: u64,
    pub hard: u64,
}

/// The resource names an [`Rlimit`] may have (Linux's).
pub const RLIMITS: &[&str] = &[
    "RLIMIT_AS",
    "RLIMIT_CORE",
    "RLIMIT_CPU",
    "RLIMIT_DATA",
    "RLIMIT_FSIZE",
    "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK",
    "RLIMIT_MSGQUEUE",
    "RLIMIT_NICE",
    "RLIMIT_NOFILE",
    "RLIMIT_NPROC",
    "RLIMIT_RSS",
    "RLIMIT_RTPRIO",
    "RLIMIT_RTTIME",
    "RLIMIT_SIGPENDING",
    "RLIMIT_STACK",
];

impl Rlimit {
    /// Why this limit cannot be set, if it cannot.
    pub fn problem(&self) -> Option<String> {
        if !RLIMITS.contains(&self.resource.as_str()) {
            return Some(format!("unknown resource limit {:?}", self.resource));
        }
        (self.soft > self.hard).then(|| {
            format!(
                "{}: the soft limit {} is above the hard limit {}",
                self.resource, self.soft, self.hard
            )
        })
    }
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WinSize {
    pub rows: u16,
    pub cols: u16,
}

/// First frame of a stream: what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Run a program (agent link and control link).
    Exec(ExecRequest),
    /// Liveness probe; answered with `Response(Pong)`.
    Ping,
    /// Supervisor state (control link).
    Status,
    /// Shut the VM down (control link). `force` skips the graceful path.
    Stop {
        #[serde(default)]
        force: bool,
    },
    /// Flush guest filesystems and power off (agent link).
    Poweroff,
    /// Write a guest file (agent link, forwarded from the control link).
    /// The client then sends `Data* Eof`; the agent answers
    /// `Response(Written)` or `Error` (codes `FILES_*`).
    WriteFile(WriteFileRequest),
    /// Read a guest file. Answered with `Response(FileInfo)` then
    /// `Data* Eof`, or `Error`.
    ReadFile { path: String },
    /// Install secrets as files in the guest's secrets tmpfs, replacing the
    /// ones of the same names. Answered with `Response(SecretsSet)`.
    Secrets { secrets: Vec<Secret> },
    /// Overwrite, remove and unmount every installed secret (before a
    /// snapshot). Answered with `Response(SecretsWiped)`.
    WipeSecrets,
    /// Open a TCP connection to `127.0.0.1:port` in the guest (agent link).
    /// Answered with `Response(Connected)`, after which the stream carries
    /// raw bytes both ways (no more frames); or `Error`
    /// (`PORT_FORWARD_REFUSED`) and the stream closes.
    Connect { port: u16 },
    /// Flush filesystems before a snapshot (agent link). Answered with
    /// `Response(Quiesced)`.
    Quiesce,
    /// Repair guest state after a restore or fork (agent link): set the wall
    /// clock, mix fresh host entropy into the kernel RNG and reseed it, and
    /// optionally reset inherited TCP connections. Answered with
    /// `Response(FixedUp)`.
    Fixup(FixupRequest),
    /// Write a snapshot bundle to `out` (control link). Answered with
    /// `Response(Snapshotted)` once the bundle is complete; unless
    /// `keep_alive`, the VM then stops.
    Snapshot(SnapshotRequest),
    /// Unpack a directory tree into the guest (agent link, forwarded from
    /// the control link). The client then sends one tar stream as
    /// `Data* Eof`; the agent answers `Response(DirWritten)` or `Error`.
    PushDir(PushDirRequest),
    /// Pack a guest directory tree. Answered with `Response(DirInfo)` then
    /// one tar stream as `Data* Eof`, or `Error`.
    PullDir(PullDirRequest),
    /// Start the VM's main command (agent link): a guest process like an
    /// exec's, but owned by the agent rather than by the stream. Its stdin
    /// is `/dev/null`; its stdout and stderr go to a bounded ring of
    /// sequence-numbered records in the agent, and its exit status is kept,
    /// so that any later session (after a snapshot and restore, too) can
    /// read them with `AttachMain`. Answered with `Started { pid }`, or
    /// `Error` (`EXEC_*`, or `MAIN_ALREADY_RUNNING`: one per guest).
    StartMain(MainRequest),
    /// Follow the main command (agent link): answered with
    /// `Response(MainAttached { pid, seq })`, then its output records from
    /// `from_seq` on as `Stdout`/`Stderr` frames numbered `seq`, `seq + 1`,
    /// … (a new `MainAttached` says where the numbering resumes after
    /// records the ring dropped), and `Exit` once it ended and every record
    /// went out. `Error(MAIN_NOT_RUNNING)` when no main command was started.
    AttachMain {
        #[serde(default)]
        from_seq: u64,
    },
    /// Write to the main command's stdin (agent link, forwarded from the
    /// control link), when it was started with `MainRequest::stdin`:
    /// answered with `Started { pid }` (or `Error(MAIN_NOT_RUNNING)`: none,
    /// ended, stdin closed; `Error(MAIN_ALREADY_RUNNING)`: another client
    /// writes to it), then the client sends `Stdin(bytes)*` and `StdinEof`
    /// to close it. A stream that ends without `StdinEof` leaves stdin open
    /// for the next writer (a restored VM's client).
    MainStdin,
    /// Send `signal` to the main command's process (agent link, forwarded
    /// from the control link), as `kill(2)` would: to the process alone,
    /// so that the command decides what its children get, or with `group`
    /// to its whole process group (it leads one). Answered with
    /// `Response(MainSignalled { pid })`, or `Error(MAIN_NOT_RUNNING)` when
    /// there is none or it has ended, or `Error(SIGNAL_INVALID)` for a
    /// number that is no signal.
    SignalMain {
        signal: i32,
        #[serde(default)]
        group: bool,
    },
    /// Dump a process tree with CRIU (agent link, forwarded from the
    /// control link). Answered with `Response(CriuDumped(..))`, or
    /// `Error(SNAPSHOT_DUMP_FAILED)` naming the process and CRIU's reason,
    /// or `Error(MAIN_NOT_RUNNING)` without a pid and a main command.
    CriuDump(CriuDumpRequest),
    /// Restore a tree CRIU dumped (agent link, forwarded from the control
    /// link). Answered with `Response(CriuRestored { pid })`, or
    /// `Error(RESTORE_BUNDLE_INCOMPATIBLE)` with CRIU's reason, or
    /// `Error(MAIN_ALREADY_RUNNING)` when adopting beside a live main command.
    CriuRestore(CriuRestoreRequest),
    /// Read the balloon (control link), and with `target_bytes` set the
    /// memory the guest may use (the ceiling deflates it fully). Answered
    /// with `Response(Balloon(..))` at once; the guest inflates or deflates
    /// over the next moments.
    Balloon {
        #[serde(default)]
        target_bytes: Option<u64>,
    },
    /// Read the VM's egress policy and traffic counters (control link),
    /// and with `change` set alter the policy first: it applies to the next
    /// packet of every connection. Answered with `Response(Network(..))`,
    /// or `Error` (`NETWORK_POLICY_INVALID`, `NETWORK_UNAVAILABLE`).
    Network {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        change: Option<netpolicy::PolicyChange>,
    },
    /// Set up the egress proxy in the guest (agent link): listen on the
    /// guest's loopback, trust the CA, give commands the variables.
    /// Answered with `Response(EgressReady)`. Repeated after a restore with
    /// a new CA.
    EgressSetup(egress::EgressSetup),
    /// Wait for the next connection to the guest's egress proxy (agent
    /// link): answered with `Response(Connected)` once one arrives, then
    /// the stream carries its raw bytes; or `Error` when there is no proxy.
    EgressAccept,
    /// The values of the VM's egress secrets (control link), replacing
    /// earlier ones; an empty list says none will come. Answered with
    /// `Response(EgressSecretsSet)`, or `Error(SECRETS_INVALID)` for a name
    /// the VM has no egress secret for.
    EgressSecrets { secrets: Vec<Secret> },
}

/// Answer to a [`Request`] that is not an exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong,
    Status(VmStatus),
    Stopping,
    /// A file transfer's metadata (before the `Data` of a `ReadFile`).
    FileInfo(FileInfo),
    /// A `WriteFile` completed: bytes written.
    Written {
        bytes: u64,
    },
    /// Secrets installed: how many, and the directory holding them.
    SecretsSet {
        count: u32,
        dir: String,
    },
    /// Secrets wiped: how many files were removed.
    SecretsWiped {
        count: u32,
    },
    /// A `Connect` succeeded; raw bytes follow.
    Connected,
    /// Filesystems are flushed.
    Quiesced,
    /// What a `Fixup` did.
    FixedUp(FixupReport),
    /// A snapshot bundle is complete.
    Snapshotted(SnapshotReport),
    /// A `PushDir` completed: entries unpacked and file bytes written.
    DirWritten {
        entries: u64,
        bytes: u64,
    },
    /// What a `PullDir` is about to send (before its `Data`).
    DirInfo(DirInfo),
    /// `AttachMain` accepted: the main command's pid, and the sequence
    /// number of the next output record on this stream.
    MainAttached {
        pid: u32,
        seq: u64,
    },
    /// `SignalMain` delivered the signal to this guest pid.
    MainSignalled {
        pid: u32,
    },
    /// A `CriuDump` completed.
    CriuDumped(CriuDumped),
    /// A `CriuRestore` completed: the restored tree's root.
    CriuRestored {
        pid: u32,
    },
    /// The balloon's state (after a `Balloon` request).
    Balloon(BalloonReport),
    /// The egress policy and traffic counters (after a `Network` request).
    Network(Box<netpolicy::NetReport>),
    /// The guest's egress proxy is listening.
    EgressReady,
    /// Egress secret values taken: how many the VM now has.
    EgressSecretsSet {
        count: u32,
    },
}

/// A VM's balloon: how much of its memory ceiling the guest may use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct BalloonReport {
    /// The VM's memory ceiling.
    pub ceiling_bytes: u64,
    /// What the guest was last asked to keep through this supervisor (the
    /// ceiling: no limit); `None` when never set since it started (a
    /// restored VM keeps the target its source had).
    #[serde(default)]
    pub target_bytes: Option<u64>,
    /// What the guest can use now: the ceiling minus the inflated balloon.
    pub actual_bytes: u64,
    /// Whether the guest reports the pages it frees (they go back to the host).
    pub free_page_reporting: bool,
}

/// What the supervisor knows about its VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmStatus {
    /// Where the VM is in its lifecycle ([`VmState`]).
    pub state: VmState,
    /// Why the VM is `recovering` or `unhealthy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub supervisor_pid: u32,
    #[serde(default)]
    pub qemu_pid: Option<u32>,
    #[serde(default)]
    pub agent: Option<HelloAck>,
}

/// How a guest process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
}

impl ExitStatus {
    /// Shell convention: the exit code, or `128 + signal`.
    pub fn shell_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// Guest repairs after a restore or fork.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FixupRequest {
    /// Host wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
    /// Fresh host entropy, hex-encoded (at most 512 bytes).
    pub entropy_hex: String,
    /// Reset TCP connections the guest had before the snapshot.
    #[serde(default)]
    pub reset_tcp: bool,
    /// Stop free page reporting (unbind the balloon driver): the guest's
    /// RAM is a private mapping of a bundle's file, which QEMU cannot
    /// discard pages from.
    #[serde(default)]
    pub stop_page_reporting: bool,
}

/// What a [`FixupRequest`] changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FixupReport {
    /// Guest wall clock before it was set, nanoseconds since the epoch.
    pub clock_was_ns: u64,
    /// Entropy bytes credited to the kernel RNG.
    pub entropy_bytes: u32,
    /// TCP connections reset.
    pub tcp_reset: u32,
    /// Balloon devices whose driver was unbound.
    #[serde(default)]
    pub balloons_stopped: u32,
}

/// Where to write a snapshot and whether the VM keeps running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotRequest {
    /// Absolute path of the bundle directory to create (must not exist).
    pub out: String,
    #[serde(default)]
    pub keep_alive: bool,
    /// Upper bound on the whole snapshot, milliseconds.
    #[serde(default)]
    pub timeout_ms: u64,
    /// A fork's temporary bundle, restored at once on this host and then
    /// removed: written without digests, manifest or fsync (it never leaves
    /// the page cache). Not a bundle `restore` accepts with verification.
    #[serde(default)]
    pub scratch: bool,
    /// A self-contained bundle even when the VM has a checkpoint to write
    /// a delta over (`snapshot --full`).
    #[serde(default)]
    pub full: bool,
    /// The CRIU engine's part: only the disk (its layers merged into one
    /// `rootdisk.qcow2`) and the main command's log are written, into
    /// `out`, an existing directory; the guest is paused for the copy only,
    /// and the VM runs on whatever `keep_alive` says (the client ends it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub disk_only: bool,
}

/// Dump a process tree with CRIU (`/proc/1/exe --criu`), into a guest
/// directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CriuDumpRequest {
    /// Where the host staged CRIU (`machinen::criu::GUEST_DIR`).
    pub criu: String,
    /// Guest directory for the images (created; must not hold a dump).
    pub images: String,
    /// The tree's root; `None`: the main command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The tree runs on after the dump (else CRIU ends it).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leave_running: bool,
}

/// What a `CriuDump` captured.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CriuDumped {
    pub pid: u32,
    /// The process's name (`/proc/PID/comm`).
    pub comm: String,
    /// The tree is the VM's main command.
    pub main: bool,
    /// What its descriptors 0, 1 and 2 were (`pipe:[INODE]`, a path, …):
    /// a restore hands the main command's pipes to the agent by these.
    pub stdio: Vec<String>,
}

/// The highest pid among the processes CRIU dumped into a directory, from
/// its file names (`core-PID.img`); 0 when there is none. CRIU gives every
/// process its pid back, so a restore keeps new pids above this one.
pub fn criu_top_pid<S: AsRef<str>>(names: impl IntoIterator<Item = S>) -> u32 {
    names
        .into_iter()
        .filter_map(|n| {
            n.as_ref()
                .strip_prefix("core-")?
                .strip_suffix(".img")?
                .parse::<u32>()
                .ok()
        })
        .max()
        .unwrap_or(0)
}

/// [`criu_top_pid`] of the files in `dir` (0 when it cannot be read).
pub fn criu_top_pid_in(dir: &std::path::Path) -> u32 {
    let names = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok());
    criu_top_pid(names)
}

/// Restore a process tree from CRIU images in a guest directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CriuRestoreRequest {
    pub criu: String,
    pub images: String,
    /// Adopt the restored tree as the VM's main command: its descriptors
    /// that were these pipes (`CriuDumped::stdio`) become fresh pipes of
    /// the agent's, its output goes to the main command's ring.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<Vec<String>>,
    /// Keep the main command's stdin open for `MainStdin` writers.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    /// Established TCP connections come back closed (CRIU's
    /// `--tcp-close`) instead of repaired.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tcp_close: bool,
    /// The number of the main command's first output record here (its
    /// log goes on from the bundle's).
    #[serde(default)]
    pub first_seq: u64,
}

/// A completed snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SnapshotReport {
    pub out: String,
    /// Wall time from request to complete bundle.
    pub elapsed_ms: u64,
    /// How long the guest was paused.
    pub paused_ms: u64,
    /// Apparent and on-disk bytes of the bundle.
    pub bytes: u64,
    pub disk_bytes: u64,
    /// Where the time went (wipe, flush, pause, state, copies, …).
    #[serde(default)]
    pub phases: Vec<Phase>,
}

/// Where and how to write a guest file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct WriteFileRequest {
    /// Absolute guest path. Missing parent directories are created (0755).
    pub path: String,
    /// Permission bits; `None` keeps an existing file's mode, else 0644.
    #[serde(default)]
    pub mode: Option<u32>,
    /// Append instead of replacing (a replacement is atomic: temp + rename).
    #[serde(default)]
    pub append: bool,
}

/// Where to unpack a tar stream in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PushDirRequest {
    /// Absolute guest directory; created (with its parents) when missing,
    /// merged into when it exists.
    pub path: String,
    /// Permission bits of `path` itself when the agent creates it.
    #[serde(default)]
    pub mode: Option<u32>,
}

/// Which guest directory to pack, and what to leave out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PullDirRequest {
    /// Absolute guest directory.
    pub path: String,
    /// Glob patterns on paths relative to `path` ([`exclude`]).
    #[serde(default)]
    pub exclude: Vec<String>,
}

/// The tree a `PullDir` sends, counted before the first byte (the guest
/// may change it while it is packed: the host bounds what arrives anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DirInfo {
    /// Permission bits of the directory itself.
    pub mode: u32,
    /// Entries in the stream (files, directories, symlinks).
    pub entries: u64,
    /// Bytes of regular-file data.
    pub bytes: u64,
}

/// A guest file's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    /// Permission bits (`st_mode & 0o7777`).
    pub mode: u32,
    /// Size in bytes when the transfer started.
    pub size: u64,
}

/// A named secret. The value never appears in `Debug` output and is zeroed
/// when dropped.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub name: String,
    pub value: SecretValue,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.name)
            .field("value", &self.value)
            .finish()
    }
}

/// Secret bytes: redacted in `Debug`, zeroed on drop.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(transparent)]
pub struct SecretValue(pub Vec<u8>);

impl std::fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<redacted {} bytes>", self.0.len())
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        self.0.fill(0);
        std::hint::black_box(&self.0);
    }
}

/// An error reported by the peer. `code` is a stable `ErrorCode` name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: String,
    pub message: String,
}

/// One protocol frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Hello(Hello),
    HelloAck(HelloAck),
    Request(Request),
    Response(Response),
    Started {
        pid: u32,
    },
    Stdin(Vec<u8>),
    StdinEof,
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Exit(ExitStatus),
    Error(WireError),
    Resize(WinSize),
    Signal(i32),
    Data(Vec<u8>),
    Eof,
    /// The client of an exec went away (see the message sequence).
    Hangup,
}

#[derive(Serialize, Deserialize)]
struct StartedBody {
    pid: u32,
}

#[derive(Serialize, Deserialize)]
struct SignalBody {
    signal: i32,
}

/// Why a frame could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("frame length {len} exceeds the limit of {max} bytes")]
    TooLong { len: usize, max: usize },
    #[error("empty frame (no tag byte)")]
    Empty,
    #[error("unknown frame tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("malformed body of a frame with tag {tag}")]
    Body {
        tag: u8,
        #[source]
        source: serde_json::Error,
    },
    #[error("stream ended in the middle of a frame")]
    Truncated,
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("i/o on the protocol stream")]
    Io(#[from] std::io::Error),
    #[error("bad frame")]
    Decode(#[from] DecodeError),
    #[error("frame body of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail: no maps with non-string
    // keys, no custom serialisers.
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<'a, T: Deserialize<'a>>(tag: u8, body: &'a [u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(body).map_err(|source| DecodeError::Body { tag, source })
}

impl Frame {
    /// Tag and body of this frame.
    fn parts(&self) -> (u8, std::borrow::Cow<'_, [u8]>) {
        use std::borrow::Cow::{Borrowed, Owned};
        match self {
            Frame::Hello(h) => (tag::HELLO, Owned(json(h))),
            Frame::HelloAck(h) => (tag::HELLO_ACK, Owned(json(h))),
            Frame::Request(r) => (tag::REQUEST, Owned(json(r))),
            Frame::Response(r) => (tag::RESPONSE, Owned(json(r))),
            Frame::Started { pid } => (tag::STARTED, Owned(json(&StartedBody { pid: *pid }))),
            Frame::Stdin(b) => (tag::STDIN, Borrowed(b)),
            Frame::StdinEof => (tag::STDIN_EOF, Borrowed(&[])),
            Frame::Stdout(b) => (tag::STDOUT, Borrowed(b)),
            Frame::Stderr(b) => (tag::STDERR, Borrowed(b)),
            Frame::Exit(e) => (tag::EXIT, Owned(json(e))),
            Frame::Error(e) => (tag::ERROR, Owned(json(e))),
            Frame::Resize(w) => (tag::RESIZE, Owned(json(w))),
            Frame::Signal(s) => (tag::SIGNAL, Owned(json(&SignalBody { signal: *s }))),
            Frame::Data(b) => (tag::DATA, Borrowed(b)),
            Frame::Eof => (tag::EOF, Borrowed(&[])),
            Frame::Hangup => (tag::HANGUP, Borrowed(&[])),
        }
    }

    /// Encode into `len | tag | body`.
    pub fn encode(&self) -> Result<Vec<u8>, FrameError> {
        let (tag, body) = self.parts();
        let len = body.len() + 1;
        if len > MAX_FRAME_LEN {
            return Err(FrameError::Oversized {
                len,
                max: MAX_FRAME_LEN,
            });
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.push(tag);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decode one frame's tag and body (the part after the length prefix).
    pub fn decode_body(tag: u8, body: &[u8]) -> Result<Frame, DecodeError> {
        Ok(match tag {
            tag::HELLO => Frame::Hello(from_json(tag, body)?),
            tag::HELLO_ACK => Frame::HelloAck(from_json(tag, body)?),
            tag::REQUEST => Frame::Request(from_json(tag, body)?),
            tag::RESPONSE => Frame::Response(from_json(tag, body)?),
            tag::STARTED => Frame::Started {
                pid: from_json::<StartedBody>(tag, body)?.pid,
            },
            tag::STDIN => Frame::Stdin(body.to_vec()),
            tag::STDIN_EOF => Frame::StdinEof,
            tag::STDOUT => Frame::Stdout(body.to_vec()),
            tag::STDERR => Frame::Stderr(body.to_vec()),
            tag::EXIT => Frame::Exit(from_json(tag, body)?),
            tag::ERROR => Frame::Error(from_json(tag, body)?),
            tag::RESIZE => Frame::Resize(from_json(tag, body)?),
            tag::SIGNAL => Frame::Signal(from_json::<SignalBody>(tag, body)?.signal),
            tag::DATA => Frame::Data(body.to_vec()),
            tag::EOF => Frame::Eof,
            tag::HANGUP => Frame::Hangup,
            tag => return Err(DecodeError::UnknownTag { tag }),
        })
    }

    /// Decode the first frame in `buf`. Returns the frame and the number of
    /// bytes it used, or `Ok(None)` when `buf` holds only part of a frame.
    pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, DecodeError> {
        if buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
        check_len(len)?;
        if buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = Frame::decode_body(buf[4], &buf[5..4 + len])?;
        Ok(Some((frame, 4 + len)))
    }
}

fn check_len(len: usize) -> Result<(), DecodeError> {
    if len == 0 {
        return Err(DecodeError::Empty);
    }
    if len > MAX_FRAME_LEN {
        return Err(DecodeError::TooLong {
            len,
            max: MAX_FRAME_LEN,
        });
    }
    Ok(())
}

/// Read one frame. `Ok(None)` on a clean end of stream before a frame starts.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let mut len_buf = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = r.read(&mut len_buf[got..]).await?;
        if n == 0 {
            return if got == 0 {
                Ok(None)
            } else {
                Err(DecodeError::Truncated.into())
            };
        }
        got += n;
    }
    let len = u32::from_be_bytes(len_buf) as usize;
    check_len(len)?;
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            FrameError::Decode(DecodeError::Truncated)
        } else {
            FrameError::Io(e)
        }
    })?;
    let frame = Frame::decode_body(buf[0], &buf[1..]);
    // Control bodies may carry secrets: leave no copy in freed memory.
    if buf[0] == tag::REQUEST {
        buf.fill(0);
        std::hint::black_box(&buf);
    }
    Ok(Some(frame?))
}

/// Write one frame (no flush of the underlying stream's buffers beyond
/// `write_all`; call `flush` when latency matters).
pub async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    frame: &Frame,
) -> Result<(), FrameError> {
    let bytes = frame.encode()?;
    w.write_all(&bytes).await?;
    Ok(())
}

/// Write one frame and flush.
pub async fn send<W: AsyncWrite + Unpin>(w: &mut W, frame: &Frame) -> Result<(), FrameError> {
    write_frame(w, frame).await?;
    w.flush().await?;
    Ok(())
}

#[cfg(test)]
mod fuzz_tests;

#[cfg(test)]
mod tests {
    use super::*;

    fn all_frames() -> Vec<Frame> {
        vec![
            Frame::Hello(Hello {
                version: PROTOCOL_VERSION,
                role: "host".into(),
            }),
            Frame::HelloAck(HelloAck {
                version: 1,
                agent_version: "0.1.0".into(),
                kernel: "6.1.0".into(),
                boot_id: "abc".into(),
            }),
            Frame::Request(Request::Exec(ExecRequest {
                rlimits: Vec::new(),
                argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
                env: vec![("A".into(), "b=c".into())],
                cwd: Some("/tmp".into()),
                tty: true,
                winsize: Some(WinSize { rows: 24, cols: 80 }),
                user: Some("1000:100".into()),
            })),
            Frame::Request(Request::Ping),
            Frame::Request(Request::Status),
            Frame::Request(Request::Stop { force: true }),
            Frame::Request(Request::Poweroff),
            Frame::Request(Request::Connect { port: 8080 }),
            Frame::Request(Request::Quiesce),
            Frame::Request(Request::Fixup(FixupRequest {
                wall_clock_ns: 1,
                entropy_hex: "ab".into(),
                reset_tcp: true,
                stop_page_reporting: true,
            })),
            Frame::Request(Request::Snapshot(SnapshotRequest {
                out: "/b".into(),
                keep_alive: true,
                timeout_ms: 9,
                scratch: true,
                full: false,
                disk_only: true,
            })),
            Frame::Request(Request::CriuDump(CriuDumpRequest {
                criu: "/run/c".into(),
                images: "/run/i".into(),
                pid: Some(42),
                leave_running: true,
            })),
            Frame::Response(Response::CriuDumped(CriuDumped {
                pid: 42,
                comm: "sh".into(),
                main: true,
                stdio: vec!["pipe:[1]".into(), "/dev/null".into()],
            })),
            Frame::Request(Request::CriuRestore(CriuRestoreRequest {
                criu: "/run/c".into(),
                images: "/run/i".into(),
                main: Some(vec!["pipe:[1]".into()]),
                stdin: true,
                tcp_close: true,
                first_seq: 7,
            })),
            Frame::Response(Response::CriuRestored { pid: 42 }),
            Frame::Response(Response::Connected),
            Frame::Request(Request::StartMain(MainRequest {
                stdin: true,
                rlimits: vec![Rlimit {
                    resource: "RLIMIT_NOFILE".into(),
                    soft: 1024,
                    hard: 4096,
                }],
                argv: vec!["httpd".into(), "-f".into()],
                env: vec![("PORT".into(), "8080".into())],
                cwd: Some("/srv".into()),
                after_secrets: true,
                user: Some("app:staff".into()),
            })),
            Frame::Request(Request::AttachMain { from_seq: 1 << 40 }),
            Frame::Response(Response::MainAttached { pid: 77, seq: 12 }),
            Frame::Request(Request::MainStdin),
            Frame::Request(Request::SignalMain {
                signal: 15,
                group: false,
            }),
            Frame::Request(Request::SignalMain {
                signal: 19,
                group: true,
            }),
            Frame::Response(Response::MainSignalled { pid: 77 }),
            Frame::Request(Request::Balloon {
                target_bytes: Some(512 << 20),
            }),
            Frame::Request(Request::Balloon { target_bytes: None }),
            Frame::Request(Request::EgressSetup(egress::EgressSetup {
                port: egress::PROXY_PORT,
                ca_pem: "-----BEGIN CERTIFICATE-----".into(),
                env: vec![("API_KEY".into(), "machinen-egress-api_key-00".into())],
            })),
            Frame::Request(Request::EgressAccept),
            Frame::Request(Request::EgressSecrets {
                secrets: vec![Secret {
                    name: "API_KEY".into(),
                    value: SecretValue(b"sk-123".to_vec()),
                }],
            }),
            Frame::Response(Response::EgressReady),
            Frame::Response(Response::EgressSecretsSet { count: 1 }),
            Frame::Request(Request::Network { change: None }),
            Frame::Request(Request::Network {
                change: Some(netpolicy::PolicyChange {
                    clear: true,
                    egress: Some(netpolicy::Egress::Deny),
                    allow: vec!["*.example.com:443".parse().expect("rule")],
                    deny: vec!["10.0.0.0/8".parse().expect("rule")],
                    remove: vec!["[fd00::1]:53".parse().expect("rule")],
                }),
            }),
            Frame::Response(Response::Network(Box::new(netpolicy::NetReport {
                policy: netpolicy::NetPolicy {
                    egress: netpolicy::Egress::Allow,
                    allow: vec![],
                    deny: vec!["evil.test".parse().expect("rule")],
                },
                counters: netpolicy::NetCounters {
                    bytes_out: 1,
                    bytes_in: 2,
                    packets_out: 3,
                    packets_in: 4,
                    connections: 5,
                    dns_answered: 6,
                    dns_refused: 7,
                    refused: 8,
                    refused_by: vec![netpolicy::Refused {
                        proto: "dns".into(),
                        destination: "evil.test".into(),
                        rule: "deny evil.test".into(),
                        count: 7,
                        last_ms: 9,
                    }],
                },
            }))),
            Frame::Response(Response::Balloon(BalloonReport {
                ceiling_bytes: 1 << 30,
                target_bytes: Some(512 << 20),
                actual_bytes: 700 << 20,
                free_page_reporting: true,
            })),
            Frame::Response(Response::Quiesced),
            Frame::Response(Response::FixedUp(FixupReport {
                clock_was_ns: 2,
                entropy_bytes: 64,
                tcp_reset: 1,
                balloons_stopped: 1,
            })),
            Frame::Response(Response::Snapshotted(SnapshotReport {
                out: "/b".into(),
                elapsed_ms: 1,
                paused_ms: 2,
                bytes: 3,
                disk_bytes: 4,
                phases: vec![Phase {
                    name: "copies".into(),
                    at_ms: 5,
                    ms: 6,
                }],
            })),
            Frame::Request(Request::WriteFile(WriteFileRequest {
                path: "/a/b".into(),
                mode: Some(0o600),
                append: true,
            })),
            Frame::Request(Request::WriteFile(WriteFileRequest {
                path: "/c".into(),
                mode: None,
                append: false,
            })),
            Frame::Request(Request::ReadFile {
                path: "/etc/hostname".into(),
            }),
            Frame::Request(Request::Secrets {
                secrets: vec![Secret {
                    name: "TOKEN".into(),
                    value: SecretValue(vec![0, 1, 255, b'x']),
                }],
            }),
            Frame::Request(Request::WipeSecrets),
            Frame::Response(Response::FileInfo(FileInfo {
                mode: 0o755,
                size: 1 << 40,
            })),
            Frame::Response(Response::Written { bytes: 52_428_800 }),
            Frame::Response(Response::SecretsSet {
                count: 2,
                dir: "/run/machinen/secrets".into(),
            }),
            Frame::Response(Response::SecretsWiped { count: 2 }),
            Frame::Response(Response::Pong),
            Frame::Response(Response::Stopping),
            Frame::Response(Response::Status(VmStatus {
                state: VmState::Running,
                reason: None,
                supervisor_pid: 7,
                qemu_pid: Some(8),
                agent: None,
            })),
            Frame::Response(Response::Status(VmStatus {
                state: VmState::Unhealthy,
                reason: Some("the guest agent does not answer".into()),
                supervisor_pid: 7,
                qemu_pid: None,
                agent: None,
            })),
            Frame::Started { pid: 42 },
            Frame::Stdin(vec![0, 1, 2, 255]),
            Frame::StdinEof,
            Frame::Stdout(b"out".to_vec()),
            Frame::Stderr(Vec::new()),
            Frame::Exit(ExitStatus {
                code: None,
                signal: Some(9),
            }),
            Frame::Error(WireError {
                code: "EXEC_SPAWN_FAILED".into(),
                message: "no such file".into(),
            }),
            Frame::Resize(WinSize {
                rows: 50,
                cols: 132,
            }),
            Frame::Signal(2),
            Frame::Request(Request::PushDir(PushDirRequest {
                path: "/srv/app".into(),
                mode: Some(0o750),
            })),
            Frame::Request(Request::PullDir(PullDirRequest {
                path: "/srv/app".into(),
                exclude: vec!["*.o".into(), "target/**".into()],
            })),
            Frame::Response(Response::DirWritten {
                entries: 1000,
                bytes: 1 << 20,
            }),
            Frame::Response(Response::DirInfo(DirInfo {
                mode: 0o755,
                entries: 3,
                bytes: 4096,
            })),
            Frame::Data(vec![9; 1000]),
            Frame::Eof,
            Frame::Hangup,
        ]
    }

    #[test]
    fn every_frame_round_trips() {
        for f in all_frames() {
            let bytes = f.encode().expect("encode");
            let (back, used) = Frame::decode(&bytes).expect("decode").expect("complete");
            assert_eq!(used, bytes.len());
            assert_eq!(back, f);
        }
    }

    #[tokio::test]
    async fn every_frame_round_trips_through_a_stream() {
        let frames = all_frames();
        let mut buf = Vec::new();
        for f in &frames {
            write_frame(&mut buf, f).await.expect("write");
        }
        let mut r = &buf[..];
        for f in &frames {
            assert_eq!(read_frame(&mut r).await.expect("read").as_ref(), Some(f));
        }
        assert!(read_frame(&mut r).await.expect("eof").is_none());
    }

    #[test]
    fn partial_frames_ask_for_more() {
        let bytes = Frame::Stdout(b"hello".to_vec()).encode().expect("encode");
        for cut in 0..bytes.len() {
            assert!(
                Frame::decode(&bytes[..cut]).expect("no error").is_none(),
                "cut at {cut}"
            );
        }
    }

    #[tokio::test]
    async fn truncated_frame_is_an_error() {
        let bytes = Frame::Stdout(b"hello".to_vec()).encode().expect("encode");
        for cut in 1..bytes.len() {
            let mut r = &bytes[..cut];
            let err = read_frame(&mut r).await.expect_err("truncated");
            assert!(
                matches!(err, FrameError::Decode(DecodeError::Truncated)),
                "cut {cut}: {err:?}"
            );
        }
    }

    #[tokio::test]
    async fn oversized_length_is_refused_before_allocating() {
        // Claims 4 GiB; must fail on the length alone.
        let mut r = &[0xff, 0xff, 0xff, 0xff, 1][..];
        let err = read_frame(&mut r).await.expect_err("too long");
        assert!(matches!(
            err,
            FrameError::Decode(DecodeError::TooLong { .. })
        ));
        assert!(matches!(
            Frame::decode(&[0xff; 8]),
            Err(DecodeError::TooLong { .. })
        ));
    }

    #[test]
    fn oversized_body_is_refused_on_encode() {
        let err = Frame::Data(vec![0; MAX_FRAME_LEN])
            .encode()
            .expect_err("too big");
        assert!(matches!(err, FrameError::Oversized { .. }));
        assert!(Frame::Data(vec![0; MAX_FRAME_LEN - 1]).encode().is_ok());
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 0]),
            Err(DecodeError::Empty)
        ));
        assert!(matches!(
            Frame::decode(&[0, 0, 0, 1, 200]),
            Err(DecodeError::UnknownTag { tag: 200 })
        ));
        let bad_json = [0, 0, 0, 3, tag::REQUEST, b'{', b'x'];
        assert!(matches!(
            Frame::decode(&bad_json),
            Err(DecodeError::Body { .. })
        ));
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz pass; the cargo-fuzz target goes deeper.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let len = (x % 40) as usize;
            let mut buf: Vec<u8> = (0..len).map(|i| (x >> (i % 8 * 8)) as u8).collect();
            if buf.len() >= 4 {
                buf[0] = 0;
                buf[1] = 0;
            }
            let _ = Frame::decode(&buf);
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let f = Frame::Request(Request::Secrets {
            secrets: vec![Secret {
                name: "TOKEN".into(),
                value: SecretValue(b"hunter2".to_vec()),
            }],
        });
        let dbg = format!("{f:?}");
        assert!(dbg.contains("TOKEN") && !dbg.contains("hunter2"), "{dbg}");
    }

    #[test]
    fn shell_code_follows_convention() {
        assert_eq!(
            ExitStatus {
                code: Some(3),
                signal: None
            }
            .shell_code(),
            3
        );
        assert_eq!(
            ExitStatus {
                code: None,
                signal: Some(9)
            }
            .shell_code(),
            137
        );
    }
}
