//! End-to-end tests of the serving logic: a yamux client (the host's role)
//! talks to the server over an in-memory transport; execs run real
//! processes on the test machine.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures::future::poll_fn;
use machinen_proto::{
    read_frame, send, ExecRequest, ExitStatus, Frame, Hello, Request, Response, WinSize, MAX_CHUNK,
    PROTOCOL_VERSION,
};
use tokio::io::{duplex, AsyncRead, AsyncWrite, DuplexStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};

use super::*;

type Stream = Compat<yamux::Stream>;
type OpenReq = oneshot::Sender<yamux::Result<yamux::Stream>>;

/// The host side of a session: a yamux client driven by its own task.
pub(crate) struct Client {
    open: mpsc::Sender<OpenReq>,
    driver: tokio::task::JoinHandle<()>,
}

/// The host's side of the session preamble, with junk before it that the
/// agent must skip.
pub(crate) async fn start_session<T: AsyncRead + AsyncWrite + Unpin>(io: &mut T) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = io.write_all(b"\xff\xff stale bytes\n").await;
    let _ = io
        .write_all(machinen_proto::preamble::hello("c0ffee").as_bytes())
        .await;
    let want = machinen_proto::preamble::ready("c0ffee");
    let mut got = Vec::new();
    let mut b = [0u8; 1];
    while !got.ends_with(want.as_bytes()) {
        match io.read(&mut b).await {
            Ok(1) => got.push(b[0]),
            _ => return,
        }
    }
}

impl Client {
    pub(crate) fn new<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T) -> Client {
        let (tx, mut rx) = mpsc::channel::<OpenReq>(16);
        let driver = tokio::spawn(async move {
            let mut io = io;
            start_session(&mut io).await;
            let mut conn =
                yamux::Connection::new(io.compat(), yamux::Config::default(), yamux::Mode::Client);
            let mut pending: Option<OpenReq> = None;
            poll_fn(|cx| loop {
                if pending.is_none() {
                    if let Poll::Ready(Some(req)) = rx.poll_recv(cx) {
                        pending = Some(req);
                    }
                }
                if pending.is_some() {
                    if let Poll::Ready(res) = conn.poll_new_outbound(cx) {
                        if let Some(p) = pending.take() {
                            let _ = p.send(res);
                        }
                        continue;
                    }
                }
                match conn.poll_next_inbound(cx) {
                    Poll::Ready(Some(Ok(_unexpected))) => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                    Poll::Pending => return Poll::Pending,
                }
            })
            .await;
        });
        Client { open: tx, driver }
    }

    async fn stream(&self) -> Stream {
        let (tx, rx) = oneshot::channel();
        self.open.send(tx).await.expect("driver alive");
        rx.await
            .expect("driver answered")
            .expect("stream opened")
            .compat()
    }

    /// Send `first`, then collect every frame until the agent closes.
    pub(crate) async fn call(&self, first: Frame) -> Vec<Frame> {
        let mut s = self.stream().await;
        send(&mut s, &first).await.expect("send");
        read_all(&mut s).await
    }

    /// Send `first`, then collect `n` frames (or fewer, if the agent closes
    /// first) and drop the stream.
    pub(crate) async fn call_until(&self, first: Frame, n: usize) -> Vec<Frame> {
        let mut s = self.stream().await;
        send(&mut s, &first).await.expect("send");
        let mut out = Vec::new();
        while out.len() < n {
            match tokio::time::timeout(Duration::from_secs(30), read_frame(&mut s))
                .await
                .expect("no frame for 30 s")
                .expect("read frame")
            {
                Some(f) => out.push(f),
                None => break,
            }
        }
        out
    }

    /// Drop the transport, as a host going away does.
    pub(crate) fn disconnect(self) {
        self.driver.abort();
    }
}

async fn read_all<R: AsyncRead + Unpin>(r: &mut R) -> Vec<Frame> {
    let mut out = Vec::new();
    while let Some(f) = tokio::time::timeout(Duration::from_secs(30), read_frame(r))
        .await
        .expect("no frame for 30 s")
        .expect("read frame")
    {
        out.push(f);
    }
    out
}

pub(crate) fn test_ctx() -> (Arc<Ctx>, Arc<AtomicBool>) {
    let powered_off = Arc::new(AtomicBool::new(false));
    let flag = powered_off.clone();
    let ctx = Ctx {
        hostname: "testbox".into(),
        kernel: "6.1.0-test".into(),
        boot_id: "00000000-0000-0000-0000-000000000001".into(),
        poweroff: Box::new(move || flag.store(true, Ordering::SeqCst)),
        main: Default::default(),
    };
    (Arc::new(ctx), powered_off)
}

/// A server on one end of an in-memory pipe, a client on the other.
fn session() -> (Client, Arc<AtomicBool>) {
    let (ctx, off) = test_ctx();
    let (a, b) = duplex(64 * 1024);
    tokio::spawn(serve_session(a, ctx));
    (Client::new(b), off)
}

fn exec(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// Output of an exec, split up.
#[derive(Debug, Default)]
struct Outcome {
    pid: Option<u32>,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    exit: Option<ExitStatus>,
    error: Option<(String, String)>,
}

fn outcome(frames: Vec<Frame>) -> Outcome {
    let mut o = Outcome::default();
    let n = frames.len();
    for (i, f) in frames.into_iter().enumerate() {
        match f {
            Frame::Started { pid } => {
                assert_eq!(i, 0, "Started comes first");
                o.pid = Some(pid);
            }
            Frame::Stdout(b) => {
                assert!(b.len() <= MAX_CHUNK);
                assert!(!b.is_empty());
                o.stdout.extend(b);
            }
            Frame::Stderr(b) => {
                assert!(b.len() <= MAX_CHUNK);
                o.stderr.extend(b);
            }
            Frame::Exit(e) => {
                assert_eq!(i, n - 1, "Exit comes last");
                o.exit = Some(e);
            }
            Frame::Error(e) => {
                assert_eq!(n, 1, "an Error comes alone");
                o.error = Some((e.code, e.message));
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }
    o
}

fn code(c: i32) -> Option<ExitStatus> {
    Some(ExitStatus {
        code: Some(c),
        signal: None,
    })
}

#[test]
fn the_test_machine_has_a_ready_rng() {
    assert!(crng_ready());
}

#[tokio::test]
async fn hello_is_acknowledged() {
    let (client, _) = session();
    let frames = client
        .call(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: "host".into(),
        }))
        .await;
    let [Frame::HelloAck(ack)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(ack.version, PROTOCOL_VERSION);
    assert_eq!(ack.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(ack.kernel, "6.1.0-test");
    assert_eq!(ack.boot_id, "00000000-0000-0000-0000-000000000001");
}

#[tokio::test]
async fn other_protocol_version_is_refused() {
    let (client, _) = session();
    let frames = client
        .call(Frame::Hello(Hello {
            version: PROTOCOL_VERSION + 1,
            role: "host".into(),
        }))
        .await;
    let [Frame::Error(e)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(e.code, "PROTOCOL_VERSION_MISMATCH");
}

#[tokio::test]
async fn ping_pongs() {
    let (client, _) = session();
    assert_eq!(
        client.call(Frame::Request(Request::Ping)).await,
        vec![Frame::Response(Response::Pong)]
    );
    // The session goes on after a stream ends.
    assert_eq!(
        client.call(Frame::Request(Request::Ping)).await,
        vec![Frame::Response(Response::Pong)]
    );
}

#[tokio::test]
async fn unexpected_first_frames_are_protocol_errors() {
    let (client, _) = session();
    for first in [
        Frame::Stdin(b"x".to_vec()),
        Frame::Request(Request::Status),
        Frame::Eof,
    ] {
        let frames = client.call(first).await;
        let [Frame::Error(e)] = &frames[..] else {
            panic!("{frames:?}")
        };
        assert_eq!(e.code, "PROTOCOL_ERROR");
    }
    // A malformed frame too.
    let mut s = client.stream().await;
    tokio::io::AsyncWriteExt::write_all(&mut s, &[0, 0, 0, 3, 3, b'{', b'x'])
        .await
        .expect("write");
    let frames = read_all(&mut s).await;
    let [Frame::Error(e)] = &frames[..] else {
        panic!("{frames:?}")
    };
    assert_eq!(e.code, "PROTOCOL_ERROR");
}

#[tokio::test]
async fn exec_reports_output_and_exit_code() {
    let (client, _) = session();
    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&[
                "sh",
                "-c",
                "echo out; echo err >&2; exit 3",
            ]))))
            .await,
    );
    assert!(o.pid.is_some_and(|p| p > 1));
    assert_eq!(o.stdout, b"out\n");
    assert_eq!(o.stderr, b"err\n");
    assert_eq!(o.exit, code(3));
}

#[tokio::test]
async fn exec_environment_and_cwd() {
    let (client, _) = session();
    let mut req = exec(&[
        "sh",
        "-c",
        "echo $PATH; echo $HOME $USER $LOGNAME $HOSTNAME; echo ${TERM:-none} $FOO; pwd",
    ]);
    req.env = vec![("FOO".into(), "bar".into())];
    req.cwd = Some("/tmp".into());
    let o = outcome(client.call(Frame::Request(Request::Exec(req))).await);
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!(
            "{}\n/root root root testbox\nnone bar\n/tmp\n",
            crate::exec::DEFAULT_PATH
        )
    );
    assert_eq!(o.exit, code(0));
}

/// Resource limits hold in the command; a bad one refuses it.
#[tokio::test]
async fn exec_resource_limits() {
    let (client, _) = session();
    let mut req = exec(&["sh", "-c", "ulimit -Sn; ulimit -Hn"]);
    let lim = |resource: &str, soft, hard| machinen_proto::Rlimit {
        resource: resource.into(),
        soft,
        hard,
    };
    req.rlimits = vec![lim("RLIMIT_NOFILE", 123, 456)];
    let o = outcome(client.call(Frame::Request(Request::Exec(req))).await);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "123\n456\n");
    assert_eq!(o.exit, code(0));
    for bad in [lim("RLIMIT_BOGUS", 1, 1), lim("RLIMIT_NOFILE", 9, 1)] {
        let mut req = exec(&["true"]);
        req.rlimits = vec![bad];
        let o = outcome(client.call(Frame::Request(Request::Exec(req))).await);
        assert_eq!(o.error.map(|e| e.0).as_deref(), Some("EXEC_SPAWN_FAILED"));
    }
}

#[tokio::test]
async fn exec_errors() {
    let (client, _) = session();
    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&[
                "no-such-command-xyz",
                "a",
            ]))))
            .await,
    );
    let (c, m) = o.error.expect("error");
    assert_eq!(c, "EXEC_COMMAND_NOT_FOUND");
    assert!(
        m.starts_with("no-such-command-xyz: command not found in PATH=/usr/local/sbin:"),
        "{m}"
    );

    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&["/no/such/program"]))))
            .await,
    );
    assert_eq!(o.error.expect("error").0, "EXEC_COMMAND_NOT_FOUND");

    let mut req = exec(&["true"]);
    req.cwd = Some("/no/such/dir".into());
    let (c, m) = outcome(client.call(Frame::Request(Request::Exec(req))).await)
        .error
        .expect("error");
    assert_eq!(c, "EXEC_SPAWN_FAILED");
    assert!(m.contains("/no/such/dir"), "{m}");

    let (c, _) = outcome(client.call(Frame::Request(Request::Exec(exec(&[])))).await)
        .error
        .expect("error");
    assert_eq!(c, "EXEC_SPAWN_FAILED");

    // Not executable, and an executable whose interpreter is missing (the
    // exec itself fails in the child).
    use std::os::unix::fs::PermissionsExt;
    let dir =
        std::env::temp_dir().join(format!("machinen-agent-exec-errors-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("mkdir");
    let plain = dir.join("plain");
    std::fs::write(&plain, "x").expect("write");
    std::fs::set_permissions(&plain, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let script = dir.join("script");
    std::fs::write(&script, "#!/no/such/interpreter\n").expect("write");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    for p in [&plain, &script] {
        let argv0 = p.to_str().expect("utf8");
        let (c, m) = outcome(
            client
                .call(Frame::Request(Request::Exec(exec(&[argv0]))))
                .await,
        )
        .error
        .expect("error");
        assert_eq!(c, "EXEC_SPAWN_FAILED", "{m}");
        assert!(m.starts_with(argv0), "{m}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn stdin_is_piped_binary_safe() {
    let (client, _) = session();
    let mut s = client.stream().await;
    send(&mut s, &Frame::Request(Request::Exec(exec(&["cat"]))))
        .await
        .expect("send");
    let (mut rd, mut wr) = tokio::io::split(s);
    let data: Vec<u8> = {
        let mut x: u32 = 0x1234_5678;
        (0..1024 * 1024)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    };
    let input = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in input.chunks(MAX_CHUNK - 7) {
            send(&mut wr, &Frame::Stdin(chunk.to_vec()))
                .await
                .expect("stdin");
        }
        send(&mut wr, &Frame::StdinEof).await.expect("eof");
        wr
    });
    let o = outcome(read_all(&mut rd).await);
    let _wr = writer.await.expect("writer");
    assert_eq!(o.stdout.len(), data.len());
    assert!(o.stdout == data, "cat echoed the bytes back intact");
    assert_eq!(o.exit, code(0));
}

#[tokio::test]
async fn host_closing_its_side_closes_stdin() {
    let (client, _) = session();
    let mut s = client.stream().await;
    send(&mut s, &Frame::Request(Request::Exec(exec(&["cat"]))))
        .await
        .expect("send");
    send(&mut s, &Frame::Stdin(b"abc".to_vec()))
        .await
        .expect("send");
    tokio::io::AsyncWriteExt::shutdown(&mut s)
        .await
        .expect("close");
    let o = outcome(read_all(&mut s).await);
    assert_eq!(o.stdout, b"abc");
    assert_eq!(o.exit, code(0));
}

#[tokio::test]
async fn killed_by_a_signal() {
    let (client, _) = session();
    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&[
                "sh",
                "-c",
                "kill -9 $$",
            ]))))
            .await,
    );
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: None,
            signal: Some(9)
        })
    );

    // A Signal frame goes to the child's process group.
    let mut s = client.stream().await;
    send(
        &mut s,
        &Frame::Request(Request::Exec(exec(&[
            "sh",
            "-c",
            "sleep 30; echo not reached",
        ]))),
    )
    .await
    .expect("send");
    let Some(Frame::Started { .. }) = read_frame(&mut s).await.expect("read") else {
        panic!("no Started")
    };
    let start = Instant::now();
    send(&mut s, &Frame::Signal(15)).await.expect("signal");
    let o = outcome(read_all(&mut s).await);
    assert_eq!(
        o.exit,
        Some(ExitStatus {
            code: None,
            signal: Some(15)
        })
    );
    assert!(o.stdout.is_empty());
    assert!(start.elapsed() < Duration::from_secs(10));
}

/// Whether `pid` runs (a zombie does not count).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn wait_gone(pid: i32, within: Duration) -> Duration {
    let start = Instant::now();
    while running(pid) {
        assert!(
            start.elapsed() < within,
            "pid {pid} still runs {within:?} after the hang-up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    start.elapsed()
}

/// Start `script` and read `lines` lines of its stdout (pids it reports).
async fn started_with_pids(client: &Client, script: &str, lines: usize) -> (Stream, i32, Vec<i32>) {
    let mut s = client.stream().await;
    send(
        &mut s,
        &Frame::Request(Request::Exec(exec(&["sh", "-c", script]))),
    )
    .await
    .expect("send");
    let Some(Frame::Started { pid }) = read_frame(&mut s).await.expect("read") else {
        panic!("no Started")
    };
    let mut out = Vec::new();
    while out.iter().filter(|b| **b == b'\n').count() < lines {
        match read_frame(&mut s).await.expect("read") {
            Some(Frame::Stdout(b)) => out.extend(b),
            other => panic!("unexpected {other:?}"),
        }
    }
    let pids = String::from_utf8(out)
        .expect("utf8")
        .lines()
        .map(|l| l.trim().parse().expect("pid"))
        .collect();
    (s, pid as i32, pids)
}

#[tokio::test]
async fn hangup_ends_the_command_and_its_group_but_not_what_left_it() {
    let (client, _) = session();
    // The second pid is printed once it has left the group.
    let script = "sleep 30 & echo $!; setsid sh -c 'echo $$; exec sleep 31' & exec sleep 32";
    let (mut s, leader, pids) = started_with_pids(&client, script, 2).await;
    let (member, escaped) = (pids[0], pids[1]);
    assert!(running(leader) && running(member) && running(escaped));
    send(&mut s, &Frame::Hangup).await.expect("hangup");
    // SIGHUP ends both at once, well before the SIGKILL grace.
    let took = wait_gone(leader, Duration::from_secs(10)).await;
    assert!(
        took < exec::HANGUP_GRACE,
        "the command ended on SIGHUP, not SIGKILL ({took:?})"
    );
    wait_gone(member, Duration::from_secs(10)).await;
    // It left the group (setsid): a hang-up is not for it.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        running(escaped),
        "a process in its own session survives the hang-up"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(escaped),
        nix::sys::signal::Signal::SIGKILL,
    );

    // Stdin EOF and a stream that ends are no hang-up: the command runs on.
    let (mut s, leader, _) = started_with_pids(&client, "echo $$; exec sleep 30", 1).await;
    send(&mut s, &Frame::StdinEof).await.expect("eof");
    tokio::io::AsyncWriteExt::shutdown(&mut s)
        .await
        .expect("close");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        running(leader),
        "stdin EOF or a closed stream must not end the command"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(leader),
        nix::sys::signal::Signal::SIGKILL,
    );
}

#[tokio::test]
async fn a_command_that_ignores_the_hangup_is_killed_after_the_grace() {
    let (client, _) = session();
    let script = "trap '' HUP; sleep 30 & echo $!; wait";
    let (mut s, leader, pids) = started_with_pids(&client, script, 1).await;
    send(&mut s, &Frame::Hangup).await.expect("hangup");
    tokio::time::sleep(exec::HANGUP_GRACE / 2).await;
    assert!(running(leader) && running(pids[0]), "SIGHUP is ignored");
    wait_gone(leader, exec::HANGUP_GRACE * 5).await;
    wait_gone(pids[0], Duration::from_secs(5)).await;
}

#[tokio::test]
async fn two_execs_run_concurrently() {
    // Each command waits for the other to have started: they only finish if
    // both run at the same time.
    let (client, _) = session();
    let dir =
        std::env::temp_dir().join(format!("machinen-agent-concurrent-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("mkdir");
    let script = |me: &str, other: &str| {
        format!(
            "touch {d}/{me}; i=0; while [ ! -e {d}/{other} ]; do i=$((i+1)); [ $i -gt 400 ] && exit 9; sleep 0.05; done; echo {me}",
            d = dir.display()
        )
    };
    let (sa, sb) = (script("a", "b"), script("b", "a"));
    let a = client.call(Frame::Request(Request::Exec(exec(&["sh", "-c", &sa]))));
    let b = client.call(Frame::Request(Request::Exec(exec(&["sh", "-c", &sb]))));
    let (a, b) = tokio::join!(a, b);
    let (a, b) = (outcome(a), outcome(b));
    assert_eq!(
        (a.stdout.as_slice(), b.stdout.as_slice()),
        (&b"a\n"[..], &b"b\n"[..])
    );
    assert_eq!((a.exit, b.exit), (code(0), code(0)));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn large_output_streams_fully() {
    let (client, _) = session();
    const SIZE: usize = 20 * 1024 * 1024;
    let mut s = client.stream().await;
    let cmd = format!("head -c {SIZE} /dev/zero | tr '\\0' 'x'");
    send(
        &mut s,
        &Frame::Request(Request::Exec(exec(&["sh", "-c", &cmd]))),
    )
    .await
    .expect("send");
    let mut total = 0usize;
    let mut exit = None;
    let mut frames = 0usize;
    while let Some(f) = read_frame(&mut s).await.expect("read") {
        match f {
            Frame::Started { .. } => {}
            Frame::Stdout(b) => {
                assert!(b.len() <= MAX_CHUNK);
                assert!(b.iter().all(|&c| c == b'x'));
                total += b.len();
                frames += 1;
            }
            Frame::Exit(e) => exit = Some(e),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(total, SIZE);
    assert!(frames >= SIZE / MAX_CHUNK);
    assert_eq!(exit, code(0));
}

#[tokio::test]
async fn output_is_flow_controlled() {
    // A reader that does not read stalls the writer: the agent does not
    // buffer a command's output.
    let (client, _) = session();
    let mut s = client.stream().await;
    send(
        &mut s,
        &Frame::Request(Request::Exec(exec(&[
            "head",
            "-c",
            "67108864",
            "/dev/zero",
        ]))),
    )
    .await
    .expect("send");
    let Some(Frame::Started { pid }) = read_frame(&mut s).await.expect("read") else {
        panic!("no Started")
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stat =
        std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("the writer is still alive");
    assert!(!stat.contains(") Z "), "not a zombie: {stat}");
    // Then everything arrives.
    let mut total = 0;
    while let Some(f) = read_frame(&mut s).await.expect("read") {
        if let Frame::Stdout(b) = f {
            total += b.len();
        }
    }
    assert_eq!(total, 64 << 20);
}

#[tokio::test]
async fn grandchild_holding_the_pipes_does_not_hold_the_exit() {
    let (client, _) = session();
    let start = Instant::now();
    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&[
                "sh",
                "-c",
                "sleep 10 & echo hi",
            ]))))
            .await,
    );
    assert_eq!(o.stdout, b"hi\n");
    assert_eq!(o.exit, code(0));
    assert!(
        start.elapsed() < Duration::from_secs(6),
        "took {:?}",
        start.elapsed()
    );
}

#[tokio::test]
async fn output_after_the_exit_is_drained() {
    // A background job that writes shortly after the shell exited still gets
    // its output through (it arrives within the idle window).
    let (client, _) = session();
    let o = outcome(
        client
            .call(Frame::Request(Request::Exec(exec(&[
                "sh",
                "-c",
                "(sleep 0.05; echo late) & echo early",
            ]))))
            .await,
    );
    assert_eq!(o.stdout, b"early\nlate\n");
}

#[tokio::test]
async fn tty_exec() {
    let (client, _) = session();
    let mut req = exec(&[
        "sh",
        "-c",
        "tty; stty size; echo $TERM; test -t 0 && echo interactive",
    ]);
    req.tty = true;
    req.winsize = Some(WinSize {
        rows: 40,
        cols: 100,
    });
    let o = outcome(client.call(Frame::Request(Request::Exec(req))).await);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("/dev/pts/"), "{text}");
    assert!(text.contains("40 100"), "{text}");
    assert!(text.contains("xterm-256color"), "{text}");
    assert!(text.contains("interactive"), "{text}");
    assert!(o.stderr.is_empty());
    assert_eq!(o.exit, code(0));
}

#[tokio::test]
async fn tty_resize_and_input() {
    let (client, _) = session();
    let mut req = exec(&["sh", "-c", "read line; stty size; echo got:$line"]);
    req.tty = true;
    let mut s = client.stream().await;
    send(&mut s, &Frame::Request(Request::Exec(req)))
        .await
        .expect("send");
    let Some(Frame::Started { .. }) = read_frame(&mut s).await.expect("read") else {
        panic!("no Started")
    };
    send(
        &mut s,
        &Frame::Resize(WinSize {
            rows: 50,
            cols: 132,
        }),
    )
    .await
    .expect("resize");
    send(&mut s, &Frame::Stdin(b"hello\n".to_vec()))
        .await
        .expect("stdin");
    let o = outcome(read_all(&mut s).await);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("50 132"), "{text}");
    assert!(text.contains("got:hello"), "{text}");
    assert_eq!(o.exit, code(0));
}

#[tokio::test]
async fn tty_stdin_eof() {
    let (client, _) = session();
    let mut req = exec(&["cat"]);
    req.tty = true;
    let mut s = client.stream().await;
    send(&mut s, &Frame::Request(Request::Exec(req)))
        .await
        .expect("send");
    send(&mut s, &Frame::Stdin(b"abc\n".to_vec()))
        .await
        .expect("stdin");
    send(&mut s, &Frame::StdinEof).await.expect("eof");
    let o = outcome(read_all(&mut s).await);
    assert!(String::from_utf8_lossy(&o.stdout).contains("abc"));
    assert_eq!(o.exit, code(0));
}

#[tokio::test]
async fn poweroff_answers_then_powers_off() {
    let (client, off) = session();
    assert_eq!(
        client.call(Frame::Request(Request::Poweroff)).await,
        vec![Frame::Response(Response::Stopping)]
    );
    let start = Instant::now();
    while !off.load(Ordering::SeqCst) {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "poweroff not called"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_new_session_follows_a_closed_transport() {
    let (ctx, _) = test_ctx();
    let (tx, rx) = mpsc::channel::<DuplexStream>(1);
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let server = tokio::spawn(serve_sessions(
        move || {
            let rx = rx.clone();
            async move { rx.lock().await.recv().await }
        },
        ctx,
    ));

    let marker =
        std::env::temp_dir().join(format!("machinen-agent-survivor-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);

    let (a, b) = duplex(64 * 1024);
    tx.send(a).await.expect("first transport");
    let first = Client::new(b);
    let frames = first
        .call(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: "first".into(),
        }))
        .await;
    assert!(matches!(frames[..], [Frame::HelloAck(_)]));
    // A command started in the first session outlives it.
    let mut s = first.stream().await;
    // It writes output after the host went away: that must not kill it.
    let cmd = format!(
        "sleep 0.5; echo output after the disconnect; echo more >&2; echo done > {}",
        marker.display()
    );
    send(
        &mut s,
        &Frame::Request(Request::Exec(exec(&["sh", "-c", &cmd]))),
    )
    .await
    .expect("send");
    let Some(Frame::Started { .. }) = read_frame(&mut s).await.expect("read") else {
        panic!("no Started")
    };
    first.disconnect();

    let (a, b) = duplex(64 * 1024);
    tx.send(a).await.expect("second transport");
    let second = Client::new(b);
    let frames = second
        .call(Frame::Hello(Hello {
            version: PROTOCOL_VERSION,
            role: "second".into(),
        }))
        .await;
    assert!(matches!(frames[..], [Frame::HelloAck(_)]), "{frames:?}");
    assert_eq!(
        second.call(Frame::Request(Request::Ping)).await,
        vec![Frame::Response(Response::Pong)]
    );

    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the command of the first session did not finish"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let _ = std::fs::remove_file(&marker);
    drop(tx);
    second.disconnect();
    tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("server ends")
        .expect("join");
}

/// A restored guest's agent is still inside the session of the host that
/// took the snapshot. The new host sends a break and its hello in one write;
/// the stale yamux session reads both before failing on the break, and the
/// hello must not be lost with it: the agent answers it with no second try.
#[tokio::test]
async fn a_hello_right_behind_a_break_is_answered_after_the_stale_session() {
    use machinen_proto::preamble;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ctx, _) = test_ctx();
    let (host, guest) = std::os::unix::net::UnixStream::pair().expect("pair");
    host.set_nonblocking(true).expect("nonblocking");
    guest.set_nonblocking(true).expect("nonblocking");
    // Like the virtio port: every session gets the same connection anew.
    let guest = Arc::new(guest);
    let server = tokio::spawn(serve_sessions(
        move || {
            let g = guest.clone();
            async move { tokio::net::UnixStream::from_std(g.try_clone().ok()?).ok() }
        },
        ctx,
    ));
    let mut host = tokio::net::UnixStream::from_std(host).expect("tokio stream");
    async fn answered(host: &mut tokio::net::UnixStream, nonce: &str) {
        let mut lines = preamble::LineTail::default();
        let mut b = [0u8; 1];
        loop {
            assert_eq!(host.read(&mut b).await.expect("read"), 1, "agent hung up");
            if lines
                .push(b[0])
                .is_some_and(|l| preamble::is_ready_for(&l, nonce))
            {
                return;
            }
        }
    }
    host.write_all(preamble::hello("01").as_bytes())
        .await
        .expect("hello 1");
    tokio::time::timeout(Duration::from_secs(10), answered(&mut host, "01"))
        .await
        .expect("first session");
    // The agent now serves yamux; the "restored" host breaks it.
    let mut out = preamble::BREAK.to_vec();
    out.extend_from_slice(preamble::hello("02").as_bytes());
    host.write_all(&out).await.expect("break + hello 2");
    tokio::time::timeout(Duration::from_secs(5), answered(&mut host, "02"))
        .await
        .expect("the hello behind the break is answered without a retry");
    server.abort();
}

fn main(argv: &[&str]) -> machinen_proto::MainRequest {
    machinen_proto::MainRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The main command outlives the streams that started and followed it: its
/// output and status wait in the agent for any session (a restored guest's
/// next one) to attach, from any record on.
#[tokio::test]
async fn the_main_command_is_kept_for_any_session_to_attach() {
    let (ctx, _) = test_ctx();
    let (a, b) = duplex(64 * 1024);
    tokio::spawn(serve_session(a, ctx.clone()));
    let c = Client::new(b);
    let none = c
        .call(Frame::Request(Request::AttachMain { from_seq: 0 }))
        .await;
    assert!(
        matches!(&none[..], [Frame::Error(e)] if e.code == "MAIN_NOT_RUNNING"),
        "{none:?}"
    );
    let script = "echo out; sleep 0.3; echo err >&2; exit 3";
    let started = c
        .call(Frame::Request(Request::StartMain(main(&[
            "sh", "-c", script,
        ]))))
        .await;
    let Some(Frame::Started { pid }) = started.first().cloned() else {
        panic!("{started:?}");
    };
    let again = c
        .call(Frame::Request(Request::StartMain(main(&["true"]))))
        .await;
    assert!(
        matches!(&again[..], [Frame::Error(e)] if e.code == "MAIN_ALREADY_RUNNING"),
        "{again:?}"
    );
    let frames = c
        .call(Frame::Request(Request::AttachMain { from_seq: 0 }))
        .await;
    assert_eq!(
        frames,
        [
            Frame::Response(Response::MainAttached { pid, seq: 0 }),
            Frame::Stdout(b"out\n".to_vec()),
            Frame::Stderr(b"err\n".to_vec()),
            Frame::Exit(code(3).expect("status")),
        ]
    );
    c.disconnect();
    // A new session re-attaches after the records it has.
    let (a, b) = duplex(64 * 1024);
    tokio::spawn(serve_session(a, ctx));
    let c = Client::new(b);
    let frames = c
        .call(Frame::Request(Request::AttachMain { from_seq: 1 }))
        .await;
    assert_eq!(
        frames,
        [
            Frame::Response(Response::MainAttached { pid, seq: 1 }),
            Frame::Stderr(b"err\n".to_vec()),
            Frame::Exit(code(3).expect("status")),
        ]
    );
}

/// `SignalMain` reaches the main command (a trapped SIGTERM decides its
/// status; with `group`, SIGSTOP and SIGCONT reach its children too), and
/// is refused once it ended or for a number that is no signal.
#[tokio::test]
async fn signals_reach_the_main_command_until_it_ends() {
    let (ctx, _) = test_ctx();
    let (a, b) = duplex(64 * 1024);
    tokio::spawn(serve_session(a, ctx.clone()));
    let c = Client::new(b);
    let none = c
        .call(Frame::Request(Request::SignalMain {
            signal: 15,
            group: false,
        }))
        .await;
    assert!(
        matches!(&none[..], [Frame::Error(e)] if e.code == "MAIN_NOT_RUNNING"),
        "{none:?}"
    );
    let script = "trap 'echo term; exit 9' TERM; echo ready; while :; do sleep 0.05; done";
    let started = c
        .call(Frame::Request(Request::StartMain(main(&[
            "sh", "-c", script,
        ]))))
        .await;
    let Some(Frame::Started { pid }) = started.first().cloned() else {
        panic!("{started:?}");
    };
    // Wait for the trap to be in place.
    let t0 = std::time::Instant::now();
    while !c
        .call_until(Frame::Request(Request::AttachMain { from_seq: 0 }), 2)
        .await
        .contains(&Frame::Stdout(b"ready\n".to_vec()))
    {
        assert!(t0.elapsed() < std::time::Duration::from_secs(10));
    }
    let bad = c
        .call(Frame::Request(Request::SignalMain {
            signal: 999,
            group: false,
        }))
        .await;
    assert!(
        matches!(&bad[..], [Frame::Error(e)] if e.code == "SIGNAL_INVALID"),
        "{bad:?}"
    );
    for (signal, group) in [(libc::SIGSTOP, true), (libc::SIGCONT, true), (15, false)] {
        let r = c
            .call(Frame::Request(Request::SignalMain { signal, group }))
            .await;
        assert_eq!(r, [Frame::Response(Response::MainSignalled { pid })]);
    }
    let frames = c
        .call(Frame::Request(Request::AttachMain { from_seq: 0 }))
        .await;
    assert_eq!(
        frames.last(),
        Some(&Frame::Exit(code(9).expect("status"))),
        "{frames:?}"
    );
    let after = c
        .call(Frame::Request(Request::SignalMain {
            signal: 15,
            group: false,
        }))
        .await;
    assert!(
        matches!(&after[..], [Frame::Error(e)] if e.code == "MAIN_NOT_RUNNING"),
        "{after:?}"
    );
}

/// A main command started with `stdin` reads what `MainStdin` writers send:
/// a writer that goes away leaves it open for the next, `StdinEof` closes
/// it, and then there is nothing to write to.
#[tokio::test]
async fn the_main_command_reads_its_stdin_from_writers() {
    let (ctx, _) = test_ctx();
    let (a, b) = duplex(64 * 1024);
    tokio::spawn(serve_session(a, ctx.clone()));
    let c = Client::new(b);
    let mut req = main(&["cat"]);
    req.stdin = true;
    let started = c.call(Frame::Request(Request::StartMain(req))).await;
    let Some(Frame::Started { pid }) = started.first().cloned() else {
        panic!("{started:?}");
    };
    for (chunk, eof) in [(&b"one\n"[..], false), (&b"two\n"[..], true)] {
        let mut s = c.stream().await;
        send(&mut s, &Frame::Request(Request::MainStdin))
            .await
            .expect("send");
        let first = read_frame(&mut s).await.expect("read");
        assert_eq!(first, Some(Frame::Started { pid }));
        send(&mut s, &Frame::Stdin(chunk.to_vec()))
            .await
            .expect("send");
        if eof {
            send(&mut s, &Frame::StdinEof).await.expect("send");
            assert_eq!(read_frame(&mut s).await.expect("read"), None);
        }
        drop(s);
    }
    let frames = c
        .call(Frame::Request(Request::AttachMain { from_seq: 0 }))
        .await;
    let out: Vec<u8> = frames
        .iter()
        .filter_map(|f| match f {
            Frame::Stdout(b) => Some(b.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    assert_eq!(out, b"one\ntwo\n");
    assert_eq!(frames.last(), Some(&Frame::Exit(code(0).expect("status"))));
    let after = c.call(Frame::Request(Request::MainStdin)).await;
    assert!(
        matches!(&after[..], [Frame::Error(e)] if e.code == "MAIN_NOT_RUNNING"),
        "{after:?}"
    );
}
