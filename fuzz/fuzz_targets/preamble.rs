//! The preamble scanner and parsers on arbitrary bytes: constant memory,
//! and a nonce reported only where the line really holds it.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machinen_proto::preamble::{self, LineTail, HELLO, MAX_LINE};

fuzz_target!(|data: &[u8]| {
    let mut tail = LineTail::default();
    for &b in data {
        if let Some(line) = tail.push(b) {
            assert!(line.len() <= 2 * MAX_LINE);
            if let Some(n) = preamble::hello_at_end(&line) {
                assert!((1..=32).contains(&n.len()) && n.bytes().all(|b| b.is_ascii_hexdigit()));
                assert!(line.ends_with(n.as_bytes()));
                assert!(!preamble::is_ready_for(&line, n));
            }
            if let Some(n) = preamble::parse_hello(&line) {
                assert_eq!(line, [HELLO.as_bytes(), n.as_bytes()].concat());
            }
            let _ = preamble::is_ready_for(&line, "0123456789abcdef");
        }
    }
    // The whole input as one line too (what a scanner sees with no newline).
    let _ = preamble::hello_at_end(data);
    let _ = preamble::parse_hello(data);
});
