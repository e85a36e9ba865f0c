//! Property tests of everything in this crate that reads bytes from a peer:
//! the frame decoder (`Frame::decode`, `read_frame`), the JSON control
//! bodies and the preamble line scanner. Both links are trust boundaries:
//! the host reads frames a guest writes, the supervisor reads frames any
//! local client writes.
//!
//! They run briefly in every `cargo test`; for a longer run set the case
//! count, e.g. `PROPTEST_CASES=200000 cargo test -p machinen-proto fuzz_`.
//! The cargo-fuzz targets in `fuzz/` cover the same decoders
//! coverage-guided.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::pin::Pin;
use std::task::{Context, Poll};

use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use serde_json::Value;
use tokio::io::{AsyncRead, ReadBuf};

use super::*;

/// `cases` unless `PROPTEST_CASES` asks for another count.
pub(crate) fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

// ---------------------------------------------------------------------------
// Allocation accounting: the decoder must not allocate on a peer's say-so.
// Counted per thread, so tests running in parallel do not disturb each other.

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note_alloc(size: usize) {
    let _ = LIVE.try_with(|l| {
        let now = l.get().saturating_add(size as isize);
        l.set(now);
        let _ = PEAK.try_with(|p| p.set(p.get().max(now)));
    });
    let _ = LARGEST.try_with(|m| m.set(m.get().max(size)));
}

fn note_free(size: usize) {
    let _ = LIVE.try_with(|l| l.set(l.get().saturating_sub(size as isize)));
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// bookkeeping touches only const-initialised thread-locals, which never
// allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note_alloc(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        note_free(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note_free(layout.size());
        note_alloc(new_size);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

/// What `f` allocated on this thread: (peak live bytes above the start,
/// largest single allocation).
fn measure<T>(f: impl FnOnce() -> T) -> (T, usize, usize) {
    let start = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(start));
    LARGEST.with(|m| m.set(0));
    let out = f();
    let peak = PEAK.with(Cell::get).saturating_sub(start).max(0) as usize;
    (out, peak, LARGEST.with(Cell::get))
}

// ---------------------------------------------------------------------------
// Generators for every message.

fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 0..max)
}

fn winsize() -> impl Strategy<Value = WinSize> {
    (any::<u16>(), any::<u16>()).prop_map(|(rows, cols)| WinSize { rows, cols })
}

fn hello_ack() -> impl Strategy<Value = HelloAck> {
    (any::<u32>(), text(), text(), text()).prop_map(|(version, agent_version, kernel, boot_id)| {
        HelloAck {
            version,
            agent_version,
            kernel,
            boot_id,
        }
    })
}

fn request() -> impl Strategy<Value = Request> {
    let exec = (
        prop::collection::vec(text(), 0..4),
        prop::collection::vec((text(), text()), 0..3),
        prop::option::of(text()),
        any::<bool>(),
        prop::option::of(winsize()),
        prop::option::of(text()),
    )
        .prop_map(|(argv, env, cwd, tty, winsize, user)| {
            Request::Exec(ExecRequest {
                rlimits: Vec::new(),
                argv,
                env,
                cwd,
                tty,
                winsize,
                user,
            })
        });
    let write =
        (text(), prop::option::of(any::<u32>()), any::<bool>()).prop_map(|(path, mode, append)| {
            Request::WriteFile(WriteFileRequest { path, mode, append })
        });
    let secrets = prop::collection::vec((text(), bytes(40)), 0..3).prop_map(|s| Request::Secrets {
        secrets: s
            .into_iter()
            .map(|(name, v)| Secret {
                name,
                value: SecretValue(v),
            })
            .collect(),
    });
    let fixup = (any::<u64>(), text(), any::<bool>(), any::<bool>()).prop_map(
        |(wall_clock_ns, entropy_hex, reset_tcp, stop_page_reporting)| {
            Request::Fixup(FixupRequest {
                wall_clock_ns,
                entropy_hex,
                reset_tcp,
                stop_page_reporting,
            })
        },
    );
    let snapshot = (text(), any::<bool>(), any::<u64>(), any::<bool>()).prop_map(
        |(out, keep_alive, timeout_ms, scratch)| {
            Request::Snapshot(SnapshotRequest {
                out,
                keep_alive,
                timeout_ms,
                scratch,
                full: !scratch,
                disk_only: keep_alive && !scratch,
            })
        },
    );
    prop_oneof![
        exec,
        Just(Request::Ping),
        Just(Request::Status),
        any::<bool>().prop_map(|force| Request::Stop { force }),
        Just(Request::Poweroff),
        write,
        text().prop_map(|path| Request::ReadFile { path }),
        secrets,
        Just(Request::WipeSecrets),
        any::<u16>().prop_map(|port| Request::Connect { port }),
        Just(Request::Quiesce),
        fixup,
        snapshot,
        (text(), prop::option::of(any::<u32>()))
            .prop_map(|(path, mode)| Request::PushDir(PushDirRequest { path, mode })),
        (text(), prop::collection::vec(text(), 0..4))
            .prop_map(|(path, exclude)| Request::PullDir(PullDirRequest { path, exclude })),
        (
            any::<u16>(),
            text(),
            prop::collection::vec((text(), text()), 0..3)
        )
            .prop_map(|(port, ca_pem, env)| Request::EgressSetup(
                crate::egress::EgressSetup { port, ca_pem, env }
            )),
        Just(Request::EgressAccept),
        prop::collection::vec((text(), bytes(40)), 0..3).prop_map(|s| Request::EgressSecrets {
            secrets: s
                .into_iter()
                .map(|(name, value)| crate::Secret {
                    name,
                    value: crate::SecretValue(value),
                })
                .collect(),
        }),
    ]
}

fn response() -> impl Strategy<Value = Response> {
    let status = (
        prop::sample::select(crate::VmState::ALL.to_vec()),
        any::<u32>(),
        prop::option::of(any::<u32>()),
        prop::option::of(hello_ack()),
        prop::option::of(text()),
    )
        .prop_map(|(state, supervisor_pid, qemu_pid, agent, reason)| {
            Response::Status(VmStatus {
                state,
                supervisor_pid,
                qemu_pid,
                agent,
                reason,
            })
        });
    let fixed = (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()).prop_map(
        |(clock_was_ns, entropy_bytes, tcp_reset, balloons_stopped)| {
            Response::FixedUp(FixupReport {
                clock_was_ns,
                entropy_bytes,
                tcp_reset,
                balloons_stopped,
            })
        },
    );
    let snapped = (
        text(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(out, elapsed_ms, paused_ms, bytes, disk_bytes)| {
            Response::Snapshotted(SnapshotReport {
                out,
                elapsed_ms,
                paused_ms,
                bytes,
                disk_bytes,
                phases: vec![Phase {
                    name: "state".into(),
                    at_ms: paused_ms,
                    ms: elapsed_ms,
                }],
            })
        });
    prop_oneof![
        Just(Response::Pong),
        status,
        Just(Response::Stopping),
        (any::<u32>(), any::<u64>())
            .prop_map(|(mode, size)| Response::FileInfo(FileInfo { mode, size })),
        any::<u64>().prop_map(|bytes| Response::Written { bytes }),
        (any::<u32>(), text()).prop_map(|(count, dir)| Response::SecretsSet { count, dir }),
        any::<u32>().prop_map(|count| Response::SecretsWiped { count }),
        Just(Response::Connected),
        Just(Response::Quiesced),
        Just(Response::EgressReady),
        any::<u32>().prop_map(|count| Response::EgressSecretsSet { count }),
        fixed,
        snapped,
        (any::<u64>(), any::<u64>())
            .prop_map(|(entries, bytes)| Response::DirWritten { entries, bytes }),
        (any::<u32>(), any::<u64>(), any::<u64>()).prop_map(|(mode, entries, bytes)| {
            Response::DirInfo(DirInfo {
                mode,
                entries,
                bytes,
            })
        }),
    ]
}

/// Any frame, every variant.
pub(crate) fn frame() -> impl Strategy<Value = Frame> {
    let exit = (
        prop::option::of(any::<i32>()),
        prop::option::of(any::<i32>()),
    )
        .prop_map(|(code, signal)| Frame::Exit(ExitStatus { code, signal }));
    prop_oneof![
        (any::<u32>(), text()).prop_map(|(version, role)| Frame::Hello(Hello { version, role })),
        hello_ack().prop_map(Frame::HelloAck),
        request().prop_map(Frame::Request),
        response().prop_map(Frame::Response),
        any::<u32>().prop_map(|pid| Frame::Started { pid }),
        bytes(300).prop_map(Frame::Stdin),
        Just(Frame::StdinEof),
        Just(Frame::Hangup),
        bytes(300).prop_map(Frame::Stdout),
        bytes(300).prop_map(Frame::Stderr),
        exit,
        (text(), text()).prop_map(|(code, message)| Frame::Error(WireError { code, message })),
        winsize().prop_map(Frame::Resize),
        any::<i32>().prop_map(Frame::Signal),
        bytes(300).prop_map(Frame::Data),
        Just(Frame::Eof),
    ]
}

/// An arbitrary JSON value, to splice into control bodies.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        text().prop_map(Value::String),
        // Tag names of the other variants, to confuse the internally tagged enums.
        prop::sample::select(vec![
            "exec",
            "ping",
            "status",
            "stop",
            "pong",
            "file_info",
            "secrets",
            "fixup",
            "snapshot"
        ])
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((text(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// One change to a JSON document.
#[derive(Debug, Clone)]
enum JsonEdit {
    /// Replace the node picked by the index (over all nodes, in order).
    Replace(usize, Value),
    /// Remove the key picked by the index (over all object keys).
    Remove(usize),
    /// Add a key to the object picked by the index.
    Insert(usize, String, Value),
}

fn json_edit() -> impl Strategy<Value = JsonEdit> {
    prop_oneof![
        (any::<usize>(), json_value()).prop_map(|(i, v)| JsonEdit::Replace(i, v)),
        any::<usize>().prop_map(JsonEdit::Remove),
        (
            any::<usize>(),
            prop_oneof![text(), Just("op".to_string()), Just("kind".to_string())],
            json_value()
        )
            .prop_map(|(i, k, v)| JsonEdit::Insert(i, k, v)),
    ]
}

/// JSON pointers of every node of `v` (the root first).
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    out.push(at.clone());
    match v {
        Value::Array(a) => a
            .iter()
            .enumerate()
            .for_each(|(i, x)| pointers(x, format!("{at}/{i}"), out)),
        Value::Object(o) => o.iter().for_each(|(k, x)| {
            pointers(
                x,
                format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                out,
            )
        }),
        _ => {}
    }
}

fn apply(doc: &mut Value, edit: &JsonEdit) {
    let mut all = Vec::new();
    pointers(doc, String::new(), &mut all);
    let objects: Vec<String> = all
        .iter()
        .filter(|p| doc.pointer(p).is_some_and(Value::is_object))
        .cloned()
        .collect();
    match edit {
        JsonEdit::Replace(i, v) => {
            if let Some(node) = doc.pointer_mut(&all[i % all.len()]) {
                *node = v.clone();
            }
        }
        JsonEdit::Remove(i) => {
            let keys: Vec<(String, String)> = objects
                .iter()
                .flat_map(|p| {
                    doc.pointer(p)
                        .and_then(Value::as_object)
                        .into_iter()
                        .flat_map(|o| o.keys().map(|k| (p.clone(), k.clone())))
                })
                .collect();
            if !keys.is_empty() {
                let (p, k) = &keys[i % keys.len()];
                if let Some(o) = doc.pointer_mut(p).and_then(Value::as_object_mut) {
                    o.remove(k);
                }
            }
        }
        JsonEdit::Insert(i, k, v) => {
            if !objects.is_empty() {
                if let Some(o) = doc
                    .pointer_mut(&objects[i % objects.len()])
                    .and_then(Value::as_object_mut)
                {
                    o.insert(k.clone(), v.clone());
                }
            }
        }
    }
}

/// One change to an encoded frame.
#[derive(Debug, Clone)]
enum ByteEdit {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
    /// Overwrite the length prefix.
    Length(u32),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        (any::<usize>(), 0u8..8).prop_map(|(i, b)| ByteEdit::Flip(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Set(i, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
        any::<usize>().prop_map(ByteEdit::Remove),
        any::<usize>().prop_map(ByteEdit::Truncate),
        prop_oneof![
            any::<u32>(),
            0u32..64,
            Just(MAX_FRAME_LEN as u32),
            Just(MAX_FRAME_LEN as u32 + 1)
        ]
        .prop_map(ByteEdit::Length),
    ]
}

fn mutate(bytes: &mut Vec<u8>, edit: &ByteEdit) {
    let n = bytes.len();
    match *edit {
        ByteEdit::Flip(i, b) if n > 0 => bytes[i % n] ^= 1 << b,
        ByteEdit::Set(i, b) if n > 0 => bytes[i % n] = b,
        ByteEdit::Insert(i, b) => bytes.insert(i % (n + 1), b),
        ByteEdit::Remove(i) if n > 0 => {
            bytes.remove(i % n);
        }
        ByteEdit::Truncate(i) => bytes.truncate(i % (n + 1)),
        ByteEdit::Length(len) if n >= 4 => bytes[..4].copy_from_slice(&len.to_be_bytes()),
        _ => {}
    }
}

// ---------------------------------------------------------------------------
// Checks shared by the tests.

/// A reader that hands out the bytes in the given chunk sizes, so the frame
/// reader sees every way a stream can split its input.
struct Chunked<'a> {
    data: &'a [u8],
    sizes: Vec<usize>,
    next: usize,
}

impl AsyncRead for Chunked<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let want = this
            .sizes
            .get(this.next)
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        this.next += 1;
        let n = want.min(buf.remaining()).min(this.data.len());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime =
            tokio::runtime::Builder::new_current_thread().build().unwrap_or_else(|e| panic!("test runtime: {e}"));
    }
    RT.with(|rt| rt.block_on(f))
}

fn read_all(data: &[u8], sizes: Vec<usize>) -> (Vec<Frame>, Result<(), FrameError>) {
    let mut r = Chunked {
        data,
        sizes,
        next: 0,
    };
    let mut frames = Vec::new();
    let end = block_on(async {
        loop {
            match read_frame(&mut r).await {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    });
    (frames, end)
}

/// What every decoder result must satisfy, whatever the input: the length
/// prefix is obeyed exactly, a decoded frame re-encodes to a frame that
/// decodes to itself, and the stream reader agrees with the buffer decoder.
fn check_decode(buf: &[u8], sizes: Vec<usize>) -> Result<(), TestCaseError> {
    // The runtime's own first allocations are not the decoder's.
    block_on(async {});
    let ((got, stream), peak, largest) = measure(|| (Frame::decode(buf), read_all(buf, sizes)));
    // The only allocation sized by the peer is the frame buffer, bounded by
    // the limit; everything else follows the bytes actually received.
    prop_assert!(
        largest <= MAX_FRAME_LEN.max(64 * buf.len()) + 4096,
        "largest allocation {largest} for {} bytes",
        buf.len()
    );
    prop_assert!(
        peak <= MAX_FRAME_LEN + 64 * buf.len() + 64 * 1024,
        "peak {peak} for {} bytes",
        buf.len()
    );
    let claimed = buf
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
    match &got {
        Ok(None) => {
            prop_assert!(
                claimed.is_none_or(|len| (1..=MAX_FRAME_LEN).contains(&len) && buf.len() < 4 + len)
            );
            // The stream ends inside the first frame: clean only when empty.
            prop_assert!(stream.0.is_empty());
            if buf.is_empty() {
                prop_assert!(stream.1.is_ok());
            } else {
                prop_assert!(
                    matches!(stream.1, Err(FrameError::Decode(DecodeError::Truncated))),
                    "{:?}",
                    stream.1
                );
            }
        }
        Ok(Some((frame, used))) => {
            prop_assert_eq!(Some(*used), claimed.map(|l| l + 4));
            prop_assert_eq!(stream.0.first(), Some(frame));
            check_reencodes(frame)?;
        }
        Err(e) => {
            let kind = std::mem::discriminant(e);
            prop_assert!(stream.0.is_empty());
            let same = matches!(&stream.1, Err(FrameError::Decode(s)) if std::mem::discriminant(s) == kind);
            prop_assert!(same, "decode: {e:?}, stream: {:?}", stream.1);
            if let DecodeError::TooLong { len, .. } = e {
                prop_assert!(*len > MAX_FRAME_LEN);
            }
        }
    }
    Ok(())
}

fn check_reencodes(frame: &Frame) -> Result<(), TestCaseError> {
    match frame.encode() {
        Ok(bytes) => {
            let back = Frame::decode(&bytes);
            prop_assert!(
                matches!(&back, Ok(Some((f, used))) if f == frame && *used == bytes.len()),
                "{frame:?} -> {back:?}"
            );
        }
        // Serde defaults filled in can make a frame of nearly the limit
        // longer; refusing to send it is the right outcome.
        Err(e) => prop_assert!(matches!(e, FrameError::Oversized { .. }), "{e:?}"),
    }
    Ok(())
}

fn json_tag(frame: &Frame) -> Option<u8> {
    match frame {
        Frame::Hello(_) => Some(tag::HELLO),
        Frame::HelloAck(_) => Some(tag::HELLO_ACK),
        Frame::Request(_) => Some(tag::REQUEST),
        Frame::Response(_) => Some(tag::RESPONSE),
        Frame::Started { .. } => Some(tag::STARTED),
        Frame::Exit(_) => Some(tag::EXIT),
        Frame::Error(_) => Some(tag::ERROR),
        Frame::Resize(_) => Some(tag::RESIZE),
        Frame::Signal(_) => Some(tag::SIGNAL),
        Frame::Stdin(_)
        | Frame::StdinEof
        | Frame::Hangup
        | Frame::Stdout(_)
        | Frame::Stderr(_)
        | Frame::Data(_)
        | Frame::Eof => None,
    }
}

// ---------------------------------------------------------------------------
// The tests.

proptest! {
    #![proptest_config(config(256))]

    /// Every message survives encode → decode, alone and with whatever
    /// bytes follow it on the stream.
    #[test]
    fn fuzz_valid_frames_round_trip(f in frame(), tail in bytes(16)) {
        let bytes = f.encode().map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let (back, used) = Frame::decode(&bytes).map_err(|e| TestCaseError::fail(format!("{e:?}")))?
            .ok_or_else(|| TestCaseError::fail("incomplete"))?;
        prop_assert_eq!(&back, &f);
        prop_assert_eq!(used, bytes.len());
        let mut longer = bytes.clone();
        longer.extend_from_slice(&tail);
        let again = Frame::decode(&longer).map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        prop_assert_eq!(again, Some((f, bytes.len())));
        for cut in [0, 1, 3, 4, 5, bytes.len() / 2, bytes.len() - 1] {
            prop_assert!(matches!(Frame::decode(&bytes[..cut.min(bytes.len() - 1)]), Ok(None)), "cut at {cut}");
        }
    }

    /// A sequence of frames comes out of the stream reader in order, however
    /// the stream splits it, and a cut anywhere inside a frame is `Truncated`.
    #[test]
    fn fuzz_frame_streams_round_trip(
        frames in prop::collection::vec(frame(), 0..6),
        sizes in prop::collection::vec(1usize..40, 0..64),
        cut in any::<usize>(),
    ) {
        let mut wire = Vec::new();
        let mut ends = Vec::new();
        for f in &frames {
            wire.extend(f.encode().map_err(|e| TestCaseError::fail(format!("{e:?}")))?);
            ends.push(wire.len());
        }
        let (got, end) = read_all(&wire, sizes.clone());
        prop_assert!(end.is_ok(), "{end:?}");
        prop_assert_eq!(&got, &frames);
        let cut = cut % (wire.len() + 1);
        let whole = ends.iter().filter(|e| **e <= cut).count();
        let (got, end) = read_all(&wire[..cut], sizes);
        prop_assert_eq!(&got[..], &frames[..whole]);
        if ends.contains(&cut) || cut == 0 {
            prop_assert!(end.is_ok(), "{end:?}");
        } else {
            prop_assert!(matches!(end, Err(FrameError::Decode(DecodeError::Truncated))), "{end:?}");
        }
    }

    /// Arbitrary bytes, half of them behind a plausible length prefix.
    #[test]
    fn fuzz_arbitrary_bytes_never_panic(
        small_len in prop::option::of(0u32..600),
        tag in prop::option::of(any::<u8>()),
        mut buf in bytes(600),
        sizes in prop::collection::vec(1usize..64, 0..8),
    ) {
        if let Some(t) = tag {
            buf.insert(0, t);
        }
        if let Some(len) = small_len {
            buf.splice(0..0, len.to_be_bytes());
        }
        check_decode(&buf, sizes)?;
    }

    /// Valid frames with a few bytes changed, inserted, removed or cut, or
    /// with a different length prefix.
    #[test]
    fn fuzz_mutated_frames_never_panic(
        f in frame(),
        edits in prop::collection::vec(byte_edit(), 1..5),
        sizes in prop::collection::vec(1usize..64, 0..8),
    ) {
        let mut bytes = f.encode().map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        for e in &edits {
            mutate(&mut bytes, e);
        }
        check_decode(&bytes, sizes)?;
    }

    /// Control bodies that are valid JSON but not quite the message: values
    /// of the wrong type, missing and unknown keys, another variant's tag.
    #[test]
    fn fuzz_mutated_json_bodies_never_panic(f in frame(), edits in prop::collection::vec(json_edit(), 1..4)) {
        let Some(tag) = json_tag(&f) else { return Ok(()) };
        let bytes = f.encode().map_err(|e| TestCaseError::fail(format!("{e:?}")))?;
        let mut doc: Value = serde_json::from_slice(&bytes[5..]).map_err(|e| TestCaseError::fail(e.to_string()))?;
        for e in &edits {
            apply(&mut doc, e);
        }
        let body = serde_json::to_vec(&doc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        match Frame::decode_body(tag, &body) {
            Ok(frame) => check_reencodes(&frame)?,
            Err(e) => prop_assert!(matches!(e, DecodeError::Body { tag: t, .. } if t == tag), "{e:?}"),
        }
    }

    /// Any JSON at all under any tag.
    #[test]
    fn fuzz_arbitrary_json_bodies_never_panic(tag in 0u8..20, doc in json_value()) {
        let body = serde_json::to_vec(&doc).map_err(|e| TestCaseError::fail(e.to_string()))?;
        if let Ok(frame) = Frame::decode_body(tag, &body) {
            check_reencodes(&frame)?;
        }
    }

    /// A peer's length prefix alone never makes the reader allocate more
    /// than the frame limit, whatever it claims.
    #[test]
    fn fuzz_claimed_length_bounds_allocation(len in any::<u32>(), body in bytes(64)) {
        let mut buf = len.to_be_bytes().to_vec();
        buf.extend_from_slice(&body);
        block_on(async {});
        let (r, _peak, largest) = measure(|| read_all(&buf, Vec::new()));
        prop_assert!(largest <= MAX_FRAME_LEN + 4096, "allocated {largest} for a claimed {len}");
        if len as usize > MAX_FRAME_LEN {
            prop_assert!(largest < 64 * 1024, "allocated {largest} before refusing {len}");
            prop_assert!(matches!(r.1, Err(FrameError::Decode(DecodeError::TooLong { .. }))), "{:?}", r.1);
        }
    }

    /// The preamble scanner keeps constant memory, finds a hello or ready
    /// line behind any stale bytes, and matches only its own nonce.
    #[test]
    fn fuzz_preamble_finds_its_line_after_any_junk(
        junk in prop_oneof![bytes(400), bytes(40).prop_map(|b| [b.as_slice(), preamble::HELLO.as_bytes()].concat())],
        nonce in "[0-9a-fA-F]{1,32}",
        other in "[0-9a-f]{1,32}",
        ready in any::<bool>(),
    ) {
        let line = if ready { preamble::ready(&nonce) } else { preamble::hello(&nonce) };
        let mut tail = preamble::LineTail::default();
        let mut lines = Vec::new();
        for b in junk.iter().chain(line.as_bytes()) {
            if let Some(l) = tail.push(*b) {
                prop_assert!(l.len() <= 2 * preamble::MAX_LINE);
                lines.push(l);
            }
        }
        let last = lines.last().ok_or_else(|| TestCaseError::fail("no line"))?;
        if ready {
            prop_assert!(preamble::is_ready_for(last, &nonce));
            prop_assert_eq!(preamble::is_ready_for(last, &other), other == nonce);
        } else {
            prop_assert_eq!(preamble::hello_at_end(last), Some(nonce.as_str()));
        }
    }

    /// Arbitrary bytes through every preamble parser: no panic, and a
    /// nonce is only ever reported where the line says it.
    #[test]
    fn fuzz_preamble_parsers_never_panic(line in prop_oneof![
        bytes(200),
        (bytes(20), "[ -~]{0,40}").prop_map(|(b, s)| [b.as_slice(), preamble::HELLO.as_bytes(), s.as_bytes()].concat()),
    ], nonce in "[0-9a-f]{0,40}") {
        if let Some(n) = preamble::parse_hello(&line) {
            let want = [preamble::HELLO.as_bytes(), n.as_bytes()].concat();
            prop_assert_eq!(line.as_slice(), want.as_slice());
        }
        if let Some(n) = preamble::hello_at_end(&line) {
            prop_assert!((1..=32).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit()));
            prop_assert!(line.ends_with(n.as_bytes()));
        }
        if preamble::is_ready_for(&line, &nonce) {
            prop_assert!(line.ends_with(nonce.as_bytes()));
        }
        let mut tail = preamble::LineTail::default();
        for b in &line {
            let _ = tail.push(*b);
        }
        prop_assert!(tail.push(b'\n').is_some_and(|l| l.len() <= 2 * preamble::MAX_LINE));
    }
}

/// The generators reach every frame tag and every request and response
/// variant (a new variant left out of them fails here).
#[test]
fn fuzz_generators_cover_every_message() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let (mut tags, mut ops) = (
        std::collections::BTreeSet::new(),
        std::collections::BTreeSet::new(),
    );
    let strategy = frame();
    for _ in 0..1500 {
        let f = strategy
            .new_tree(&mut runner)
            .map(|t| t.current())
            .unwrap_or(Frame::Eof);
        let bytes = f.encode().unwrap_or_default();
        tags.insert(bytes.get(4).copied().unwrap_or(0));
        match &f {
            Frame::Request(r) => ops.insert(
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v["op"].as_str().map(|o| format!("request {o}"))),
            ),
            Frame::Response(r) => ops.insert(
                serde_json::to_value(r)
                    .ok()
                    .and_then(|v| v["kind"].as_str().map(|k| format!("response {k}"))),
            ),
            _ => false,
        };
    }
    assert_eq!(
        tags,
        (tag::HELLO..=tag::HANGUP).collect(),
        "frame tags generated"
    );
    assert_eq!(
        ops.len(),
        18 + 15,
        "request and response variants generated: {ops:?}"
    );
}

/// How much memory decoding the worst bodies costs, relative to their size:
/// JSON that expands most when parsed (many empty values, which serde
/// buffers for the internally tagged enums). Documents the bound the
/// property tests enforce (peak below 64 bytes per body byte).
#[test]
fn fuzz_worst_case_json_expansion_is_bounded() {
    // A quarter of the limit: the ratio is the same at 1 MiB, four times
    // cheaper to check in a debug build.
    let n = MAX_FRAME_LEN / 4;
    let fill = |head: &str, item: &str, end: &str| {
        let mut s = head.to_string();
        while s.len() + item.len() + end.len() < n {
            s.push_str(item);
        }
        s.pop();
        s.push_str(end);
        s.into_bytes()
    };
    let cases = [
        (tag::RESPONSE, fill(r#"{"kind":"pong","x":["#, "[],", "]}")),
        (tag::RESPONSE, fill(r#"{"kind":"pong","x":["#, "{},", "]}")),
        (
            tag::REQUEST,
            fill(r#"{"op":"exec","argv":["#, r#""","#, "]}"),
        ),
        (
            tag::REQUEST,
            fill(
                r#"{"op":"secrets","secrets":[{"name":"a","value":["#,
                "0,",
                "]}]}",
            ),
        ),
        (
            tag::HELLO_ACK,
            fill(r#"{"version":1,"agent_version":"","x":["#, "[],", "]}"),
        ),
    ];
    for (tag, body) in cases {
        assert!(body.len() < MAX_FRAME_LEN, "{}", body.len());
        let (r, peak, largest) = measure(|| Frame::decode_body(tag, &body).map(|_| ()));
        let ratio = peak as f64 / body.len() as f64;
        eprintln!(
            "tag {tag}: {} body bytes, peak {peak} ({ratio:.1}x), largest {largest}, {r:?}",
            body.len()
        );
        assert!(
            peak <= 64 * body.len(),
            "tag {tag}: peak {peak} for {} bytes",
            body.len()
        );
    }
}
