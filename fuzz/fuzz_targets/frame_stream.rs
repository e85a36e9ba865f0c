//! `read_frame` over a stream split at the sizes the input's first bytes
//! choose: frames come out exactly as `Frame::decode` sees them, and the
//! stream ends cleanly, truncated, or with the same decode error.
#![no_main]

use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};

use libfuzzer_sys::fuzz_target;
use machinen_proto::{read_frame, DecodeError, Frame, FrameError};
use tokio::io::{AsyncRead, ReadBuf};

struct Chunked<'a> {
    data: &'a [u8],
    sizes: &'a [u8],
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
            .get(this.next % this.sizes.len().max(1))
            .map_or(usize::MAX, |s| usize::from(*s).max(1));
        this.next += 1;
        let n = want.min(buf.remaining()).min(this.data.len());
        buf.put_slice(&this.data[..n]);
        this.data = &this.data[n..];
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|input: &[u8]| {
    let Some((&k, rest)) = input.split_first() else {
        return;
    };
    let (sizes, data) = rest.split_at(usize::from(k % 8).min(rest.len()));
    let mut r = Chunked {
        data,
        sizes,
        next: 0,
    };
    let mut buf = data;
    runtime().block_on(async {
        loop {
            let got = read_frame(&mut r).await;
            match (Frame::decode(buf), got) {
                (Ok(Some((want, used))), Ok(Some(f))) => {
                    assert_eq!(f, want);
                    buf = &buf[used..];
                }
                (Ok(None), Ok(None)) => {
                    assert!(buf.is_empty());
                    return;
                }
                (Ok(None), Err(FrameError::Decode(DecodeError::Truncated))) => {
                    assert!(!buf.is_empty());
                    return;
                }
                (Err(a), Err(FrameError::Decode(b))) => {
                    assert_eq!(
                        std::mem::discriminant(&a),
                        std::mem::discriminant(&b),
                        "{a:?} vs {b:?}"
                    );
                    return;
                }
                (a, b) => panic!("decode {a:?} but read_frame {b:?}"),
            }
        }
    });
});
