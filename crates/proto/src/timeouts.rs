//! Every timeout and interval of the library, the CLI, the supervisor and
//! the guest agent, in one place.
//!
//! Several are halves of a pair that must agree across processes (a client
//! waits longer than the supervisor's own deadline, so the supervisor's
//! answer, not a client give-up, decides the outcome); the tests at the end
//! hold those relations. The benchmark names its own, larger, bounds in
//! `crates/bench/src/ctx.rs`.

use std::time::Duration;

const fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

const fn millis(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---- client (library and CLI) ----------------------------------------------

/// Default bound on a boot, a restore or a provision until the guest agent
/// answers (`--boot-timeout`, `BootOptions::boot_timeout`). A cold TCG boot
/// of the Debian base takes 10–40 s on a loaded 2-core host; 120 s leaves
/// room for a busy machine without hiding a hung one for long.
pub const BOOT: Duration = secs(120);

/// Extra time the library waits for the supervisor's ready line beyond the
/// boot timeout it handed the supervisor: the supervisor enforces the boot
/// timeout itself and reports `failed`; this only catches a supervisor that
/// hangs before it can say so.
pub const READY_LINE_SLACK: Duration = secs(30);

/// Default bound on a snapshot (`snapshot --timeout`, and the temporary
/// bundle of a fork). A multi-GiB migration under TCG takes tens of seconds.
pub const SNAPSHOT: Duration = secs(90);

/// Extra time a client waits for the snapshot answer beyond the deadline it
/// sent, so the supervisor's own timeout answer arrives first.
pub const SNAPSHOT_REPLY_SLACK: Duration = secs(30);

/// Default wait for a graceful `stop` before the VM is killed
/// (`stop --timeout`): longer than the supervisor's [`GRACEFUL_STOP`], so
/// the supervisor's own fallback to `quit` runs before the client kills it.
pub const STOP: Duration = secs(15);

/// Bound on a forced stop of a VM being abandoned on an error path (secrets
/// not accepted, a bake that is done, a failed fork sibling).
pub const CLEANUP_STOP: Duration = secs(10);

/// Wait for the supervisor of a VM that a snapshot consumed to be gone, so
/// its name and host ports are free for the restore that usually follows.
pub const SNAPSHOT_SOURCE_EXIT: Duration = secs(20);

/// How long `ls`/`status` wait for a supervisor that just died to record
/// the crash cause in `meta.json`.
pub const CRASH_CAUSE: Duration = secs(3);

/// Bound on a short control-socket question (a stop request's answer).
pub const CONTROL_ANSWER: Duration = secs(5);

/// Wait for a supervisor to exit after it was signalled.
pub const SUPERVISOR_EXIT: Duration = secs(5);

/// Bound on the first frame of an interactive (pty) command: the agent has
/// to fork the shell, which under TCG on a busy host can take a while.
pub const PTY_FIRST_FRAME: Duration = secs(60);

/// Bound on a `set_secrets` round trip.
pub const SECRETS: Duration = secs(30);

/// How long a file transfer may go without any progress before it fails.
pub const FILE_IDLE: Duration = secs(120);

/// A registry directory without `meta.json` younger than this is a VM being
/// created, not debris: creating one (image, overlay, spec) takes seconds,
/// and the boot timeout bounds the rest.
pub const REGISTRY_CLAIM_GRACE: Duration = secs(120);

/// After `exec --timeout` expired and the command's process group was sent
/// `SIGKILL`, how long the client waits for the guest to report its end
/// (it normally does at once; a VM that does not answer is not waited for).
pub const EXEC_KILL_CONFIRM: Duration = secs(10);

// ---- supervisor ------------------------------------------------------------

/// How long the supervisor gives a powered-off guest to end before it sends
/// QMP `quit`.
pub const GRACEFUL_STOP: Duration = secs(10);

/// Bound on the agent's answer to a power-off request.
pub const POWEROFF_REQUEST: Duration = secs(3);

/// How long a control-socket client may take to send its first frame.
pub const CONTROL_FIRST_FRAME: Duration = secs(30);

/// Bound on QEMU creating and accepting its QMP socket after spawn.
pub const QMP_CONNECT: Duration = secs(20);

/// Bound on one QMP command (`stop`, `cont`, `migrate`, `query-*`): each is
/// answered by QEMU's main loop in milliseconds unless QEMU is wedged.
pub const QMP_COMMAND: Duration = secs(10);

/// How long a snapshot of a VM whose RAM is not a file of its own (a
/// copy-on-write restore) copies that RAM while the guest runs before it
/// pauses the guest to finish: a guest that dirties memory faster than the
/// copy goes converges then, paused, in one last pass.
pub const PRECOPY_CONVERGE: Duration = secs(15);

/// The longest pause the live copy aims for (QEMU's `downtime-limit`):
/// it pauses the guest once what is left copies within this.
pub const PRECOPY_DOWNTIME: Duration = millis(50);

/// Bound on `migrate_cancel` after a snapshot passed its deadline.
pub const QMP_MIGRATE_CANCEL: Duration = secs(5);

/// Bound on QMP `quit`, and then on QEMU exiting after it, before SIGKILL.
pub const QMP_QUIT: Duration = secs(2);
/// See [`QMP_QUIT`].
pub const QEMU_EXIT_AFTER_QUIT: Duration = secs(3);

/// Bound on connecting to the agent's socket once QEMU runs.
pub const AGENT_CONNECT: Duration = secs(20);

/// Bound on the agent's hello after the session preamble.
pub const AGENT_HANDSHAKE: Duration = secs(30);

/// First wait for the preamble answer of a resumed session (a fresh boot
/// starts from the remaining boot budget instead), doubled per retry up to
/// [`PREAMBLE_RETRY_MAX`].
pub const PREAMBLE_RETRY_FIRST: Duration = millis(150);
/// See [`PREAMBLE_RETRY_FIRST`].
pub const PREAMBLE_RETRY_MAX: Duration = secs(2);

/// Bound on the agent wiping secrets before a snapshot.
pub const WIPE_SECRETS: Duration = secs(10);

/// Bound on the agent quiescing (sync, freeze) before a snapshot.
pub const QUIESCE: Duration = secs(30);

/// Bound on the agent's post-restore fixup (clock, entropy, addresses).
pub const FIXUP: Duration = secs(20);

/// Bound on reading a guest's memory figures (`machinen stats`).
pub const STATS: Duration = secs(10);

/// How long `machinen balloon` waits for the guest to reach a new target
/// (a guest gives pages up as fast as it can free them; one that cannot
/// free enough stops short, which is reported, not an error).
pub const BALLOON_SETTLE: Duration = secs(30);

/// How often the balloon's size is read while waiting for it to settle.
pub const BALLOON_POLL: Duration = millis(250);

/// How often the console log's size is checked; what a guest writes in this
/// time is the most the file can exceed its limit by.
pub const CONSOLE_CHECK: Duration = secs(1);

/// Keeper: interval of the liveness probe of a running session.
pub const KEEPER_PROBE_EVERY: Duration = secs(15);
/// Keeper: bound on one liveness probe's answer.
pub const KEEPER_PROBE_TIMEOUT: Duration = secs(20);
/// Keeper: first reconnect delay, tripled per quick attempt (0.1 s … 8.1 s).
pub const KEEPER_FIRST_DELAY: Duration = millis(100);
/// Keeper: delay between attempts once the VM is `unhealthy`.
pub const KEEPER_SLOW_RETRY: Duration = secs(30);
/// Keeper: a session that lived this long resets the backoff when it fails.
pub const KEEPER_STABLE: Duration = secs(60);
/// Keeper: bound on one attempt's connection, preamble and hello, each.
pub const KEEPER_ATTEMPT_STEP: Duration = secs(10);
/// Network filter: bound on the host's nameservers answering one guest DNS
/// query, all of them in turn (the guest's resolver retries after 5 s).
pub const DNS_UPSTREAM: Duration = secs(4);
/// Egress proxy: how long a request that needs a secret waits for the
/// values at boot (they are handed over just after the supervisor is up).
pub const EGRESS_VALUES_WAIT: Duration = secs(10);
/// Egress proxy: bound on connecting to the real host.
pub const EGRESS_UPSTREAM_CONNECT: Duration = secs(10);

// ---- guest agent -----------------------------------------------------------

/// After a command exited, output still arriving is forwarded; once nothing
/// arrived for this long (a background grandchild holding the pipes), stop.
pub const DRAIN_IDLE: Duration = millis(500);

/// How long a hung-up command has to end on `SIGHUP` before its process
/// group is killed.
pub const HANGUP_GRACE: Duration = secs(2);

/// How long the agent waits for the root block device to appear.
pub const ROOT_DEVICE_WAIT: Duration = secs(10);

/// Bound on configuring `eth0` (the link coming up).
pub const NET_CONFIGURE: Duration = secs(5);

/// At power-off, how long other processes have to end on SIGTERM.
pub const POWEROFF_TERM_GRACE: Duration = secs(3);

/// After a fatal error, the pause before power-off so the console shows it.
pub const FATAL_POWEROFF_DELAY: Duration = secs(5);

/// How long an exit status nobody claimed is kept for a late claimer.
pub const UNCLAIMED_TTL: Duration = secs(30);

/// Bound on the reaper thread reporting that it runs.
pub const REAPER_READY: Duration = secs(5);

/// Bound on a port forward's connection to the guest service.
pub const FORWARD_CONNECT: Duration = secs(10);

/// How often the agent polls for a reconnected host on the port.
pub const PORT_RECONNECT_POLL: Duration = millis(25);

/// After this long without its virtio-serial port, the agent logs an error
/// (and keeps waiting).
pub const PORT_WAIT_WARN: Duration = secs(10);

/// Pause before reopening an agent port that failed to open or read.
pub const PORT_REOPEN: Duration = secs(1);

/// After this long without a ready kernel CRNG, the agent logs an error.
pub const CRNG_WARN: Duration = secs(1);

// ---- polling and retry intervals -------------------------------------------

/// Poll of something that appears within milliseconds: QEMU's sockets, the
/// migration status, the root block device, the guest's link.
pub const STATE_POLL: Duration = millis(10);

/// The first poll of a wait that often ends within milliseconds (a paused
/// machine-state save): later polls double up to [`STATE_POLL`].
pub const STATE_POLL_FIRST: Duration = millis(1);

/// Poll for processes to be gone (a supervisor, the guest's other
/// processes at power-off).
pub const EXIT_POLL: Duration = millis(20);

/// Poll of slower things: a crash record being written, the agent's
/// virtio-serial port appearing, the kernel CRNG becoming ready.
pub const SLOW_POLL: Duration = millis(50);

/// Poll of a VM's logs and registry entry by `logs -f` and `wait` (the
/// files are written by another process; a human reads the result).
pub const LOG_FOLLOW_POLL: Duration = millis(200);

/// Supervisor: pause before re-attaching to the main command after its
/// agent stream failed (the session is being re-established).
pub const MAIN_REATTACH: Duration = millis(500);

/// Agent: bound on a CRIU dump (the tree frozen and its memory written to
/// the guest's tmpfs; CRIU is killed past it and the tree resumed).
pub const CRIU_DUMP: Duration = secs(300);

/// Agent: bound on a CRIU restore (CRIU is killed past it).
pub const CRIU_RESTORE: Duration = secs(300);

/// The host's wait for a CRIU request's answer: the agent's own bound plus
/// slack for the answer to arrive.
pub const CRIU_ANSWER: Duration = secs(330);

/// Supervisor: how long a VM booted to adopt a restored main command waits
/// for the agent to have one (the host stages CRIU and the images first).
pub const MAIN_ADOPT: Duration = secs(900);

/// Supervisor: bound on the agent's answer to `StartMain`.
pub const MAIN_START: Duration = secs(10);

/// Agent: how long a main command that waits for the VM's secrets waits
/// (the host sends them right after the guest is ready; past this the
/// launcher gave up and stops the VM). The supervisor then waits this long
/// plus [`MAIN_START`] for the answer.
pub const MAIN_SECRETS_WAIT: Duration = BOOT;

/// Pause after a failed `accept` on the control socket or the agent's
/// listener (e.g. out of file descriptors), so the loop does not spin.
pub const ACCEPT_RETRY: Duration = millis(100);

/// Pause after a failed `accept` on a host port-forward listener.
pub const FORWARD_ACCEPT_RETRY: Duration = millis(50);

/// Agent: time for the `Stopping` answer to reach the wire before the guest
/// powers off.
pub const POWEROFF_ANSWER_FLUSH: Duration = millis(100);

/// Agent: pause before restarting a serving loop that ended or panicked.
pub const SERVE_RESTART: Duration = secs(1);

/// Agent: a session that ends within this long of the previous one's start
/// is followed at once (a restored guest's host is already waiting).
pub const PORT_QUICK_RECONNECT: Duration = secs(1);

/// Agent reaper: sweep of unreaped children with SIGCHLD delivery (a safety
/// net), without it (the only way), and when the reaper has no runtime.
pub const REAPER_SWEEP: Duration = secs(1);
/// See [`REAPER_SWEEP`].
pub const REAPER_SWEEP_NO_SIGCHLD: Duration = millis(100);
/// See [`REAPER_SWEEP`].
pub const REAPER_SWEEP_NO_RUNTIME: Duration = millis(200);

#[cfg(test)]
mod tests {
    use super::*;

    /// The pairs that must agree across processes.
    #[test]
    fn relations_hold() {
        // After its deadline the supervisor cancels the migration and
        // resumes the source (cancel, a status query, `cont`) before it
        // answers; the client's extra wait covers that, so a timeout is the
        // supervisor's verdict, never a client give-up.
        assert!(SNAPSHOT_REPLY_SLACK > QMP_MIGRATE_CANCEL + 2 * QMP_COMMAND);
        // The supervisor's start-up failure path (quit, wait for QEMU) fits
        // in the extra wait for the ready line.
        assert!(READY_LINE_SLACK > QMP_QUIT + QEMU_EXIT_AFTER_QUIT);
        // A client stop outlasts the supervisor's graceful stop.
        assert!(STOP > GRACEFUL_STOP);
        assert!(GRACEFUL_STOP > POWEROFF_REQUEST);
        // The agent gives up on the root device, and the supervisor on the
        // agent's socket and hello, before the boot timeout ends, so the
        // error names the step.
        assert!(ROOT_DEVICE_WAIT < BOOT);
        assert!(AGENT_CONNECT + AGENT_HANDSHAKE < BOOT);
        assert!(PREAMBLE_RETRY_FIRST < PREAMBLE_RETRY_MAX);
        // A hung-up command is killed and drained well within a stop.
        assert!(HANGUP_GRACE + DRAIN_IDLE < GRACEFUL_STOP);
        // Polls are much finer than the waits they serve.
        assert!(STATE_POLL * 10 <= QMP_COMMAND && EXIT_POLL * 10 <= SUPERVISOR_EXIT);
        assert!(STATE_POLL_FIRST < STATE_POLL);
        assert!(SLOW_POLL * 10 <= CRASH_CAUSE && SLOW_POLL * 10 <= PORT_WAIT_WARN);
        // A half-created VM is not taken for debris while it may still boot.
        assert!(REGISTRY_CLAIM_GRACE >= BOOT);
    }
}
