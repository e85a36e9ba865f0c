//! Property tests of the supervisor's side of the session preamble: what
//! comes back from the guest before the agent's answer is whatever a
//! restored guest (or a hostile one) left on the port. Whatever it is, the
//! supervisor must find only the answer to its own nonce, must not read a
//! byte past it (yamux starts right there), and must give up within its
//! budget when no answer comes.
//!
//! `PROPTEST_CASES=N cargo test -p machinen-vmm fuzz_` runs longer.

use std::time::Duration;

use machinen_proto::preamble;
use proptest::prelude::*;
use proptest::test_runner::Config as ProptestConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use super::*;

fn config(cases: u32) -> ProptestConfig {
    let mut c = ProptestConfig::default();
    if std::env::var_os("PROPTEST_CASES").is_none() {
        c.cases = cases;
    }
    c
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("runtime: {e}"))
}

/// Stale output: random bytes, and lines that look like preamble lines
/// but carry other nonces or none.
fn junk() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..200),
        "[0-9a-f]{0,20}".prop_map(|n| preamble::ready(&n).into_bytes()),
        "[0-9a-f]{1,20}".prop_map(|n| preamble::hello(&n).into_bytes()),
        Just(preamble::READY.as_bytes().to_vec()),
        Just(preamble::BREAK.to_vec()),
        Just(vec![b'\n']),
    ];
    prop::collection::vec(piece, 0..8).prop_map(|p| p.concat())
}

/// The guest end: wait for the host's hello, then answer with `junk`, the
/// answer `reply` makes of the nonce, and `after` (the first bytes of the
/// session that follows), in chunks of `chunk` bytes.
async fn fake_agent(
    mut guest: UnixStream,
    junk: Vec<u8>,
    reply: impl Fn(&str) -> String,
    after: &[u8],
    chunk: usize,
) {
    let mut tail = preamble::LineTail::default();
    let mut byte = [0u8; 1];
    let nonce = loop {
        if guest.read(&mut byte).await.unwrap_or(0) == 0 {
            return;
        }
        if let Some(n) = tail
            .push(byte[0])
            .and_then(|l| preamble::hello_at_end(&l).map(String::from))
        {
            break n;
        }
    };
    let mut out = junk;
    out.extend_from_slice(reply(&nonce).as_bytes());
    out.extend_from_slice(after);
    for c in out.chunks(chunk.max(1)) {
        if guest.write_all(c).await.is_err() {
            return;
        }
    }
    // Hold the connection open until the host is done with it.
    let _ = guest.read(&mut byte).await;
}

proptest! {
    #![proptest_config(config(48))]

    #[test]
    fn fuzz_preamble_finds_its_answer_behind_any_stale_output(
        junk in junk(),
        resume in any::<bool>(),
        chunk in 1usize..300,
    ) {
        let ok = runtime().block_on(async {
            let (mut host, guest) = UnixStream::pair().map_err(|e| e.to_string())?;
            let agent = tokio::spawn(fake_agent(guest, junk, preamble::ready, b"YAMX", chunk));
            preamble(&mut host, Duration::from_secs(10), resume).await.map_err(|e| e.to_string())?;
            // Not a byte of what follows the answer was consumed.
            let mut next = [0u8; 4];
            host.read_exact(&mut next).await.map_err(|e| e.to_string())?;
            drop(host);
            let _ = agent.await;
            Ok::<_, String>(next)
        });
        prop_assert_eq!(ok.as_ref().map(|b| &b[..]), Ok(&b"YAMX"[..]));
    }
}

/// An answer to another nonce (or a longer or shorter one) is not an
/// answer: the supervisor gives up when its budget runs out.
#[test]
fn fuzz_preamble_ignores_answers_to_other_nonces() {
    let wrong: [fn(&str) -> String; 4] = [
        |n| preamble::ready(&format!("{n}0")),
        |n| preamble::ready(&n[1..]),
        |n| {
            format!(
                "{}{}\n",
                preamble::READY,
                n.to_uppercase().replace(|c: char| c.is_ascii_digit(), "a")
            )
        },
        |n| format!("{}{n} \n", preamble::READY),
    ];
    for (i, reply) in wrong.into_iter().enumerate() {
        let r = runtime().block_on(async {
            let (mut host, guest) = UnixStream::pair().expect("pair");
            let agent = tokio::spawn(fake_agent(guest, Vec::new(), reply, b"", 64));
            let r = preamble(&mut host, Duration::from_millis(100), false).await;
            drop(host);
            let _ = agent.await;
            r
        });
        assert!(matches!(r, Err(AgentError::NoAnswer)), "reply {i}: {r:?}");
    }
}

/// A guest that closes the port instead of answering ends the preamble at
/// once with an error, not a wait for the whole budget.
#[test]
fn fuzz_preamble_fails_fast_when_the_guest_hangs_up() {
    let started = std::time::Instant::now();
    let r = runtime().block_on(async {
        let (mut host, guest) = UnixStream::pair().expect("pair");
        let mut guest = guest;
        let _ = guest.write_all(b"stale bytes, then gone").await;
        drop(guest);
        preamble(&mut host, Duration::from_secs(30), true).await
    });
    assert!(matches!(r, Err(AgentError::Preamble(_))), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
}
