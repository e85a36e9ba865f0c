//! `Frame::decode` on arbitrary bytes: no panic, the length prefix obeyed,
//! and a decoded frame re-encodes to bytes that decode to the same frame.
#![no_main]

use libfuzzer_sys::fuzz_target;
use machinen_proto::{DecodeError, Frame, FrameError, MAX_FRAME_LEN};

fuzz_target!(|data: &[u8]| {
    match Frame::decode(data) {
        Ok(Some((frame, used))) => {
            let len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
            assert_eq!(used, 4 + len);
            match frame.encode() {
                Ok(bytes) => {
                    let (back, n) = Frame::decode(&bytes).expect("re-decode").expect("complete");
                    assert_eq!(back, frame);
                    assert_eq!(n, bytes.len());
                }
                // Serde defaults filled in may push a frame near the limit over it.
                Err(e) => assert!(matches!(e, FrameError::Oversized { .. }), "{e:?}"),
            }
        }
        Ok(None) => assert!(
            data.len() < 4
                || data.len()
                    < 4 + u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize
        ),
        Err(DecodeError::TooLong { len, .. }) => assert!(len > MAX_FRAME_LEN),
        Err(_) => {}
    }
    // The body decoder alone, under every tag.
    if let Some((&tag, body)) = data.split_first() {
        let _ = Frame::decode_body(tag, body);
    }
});
