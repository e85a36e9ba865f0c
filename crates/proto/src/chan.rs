//! Blocking `Read`/`Write` ends of a bounded channel of byte chunks, so a
//! synchronous packer or unpacker (the `tar` crate) runs on the blocking
//! pool while async code moves the chunks over a protocol stream. The
//! channel's bound is the flow control: a slow disk holds back the network
//! side, not memory.

use std::io;

use tokio::sync::mpsc;

/// Reads the chunks sent into the channel; end of file once every sender is
/// gone. Must not be used on an async thread (it blocks).
pub struct ChanReader {
    rx: mpsc::Receiver<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChanReader {
    pub fn new(rx: mpsc::Receiver<Vec<u8>>) -> ChanReader {
        ChanReader {
            rx,
            cur: Vec::new(),
            pos: 0,
        }
    }
}

impl io::Read for ChanReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos >= self.cur.len() {
            match self.rx.blocking_recv() {
                Some(c) => {
                    self.cur = c;
                    self.pos = 0;
                }
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Collects writes into chunks of at most `chunk` bytes and sends them;
/// `BrokenPipe` once the receiver is gone. Call `flush` (or drop) at the
/// end to send the last partial chunk.
pub struct ChanWriter {
    tx: mpsc::Sender<Vec<u8>>,
    buf: Vec<u8>,
    chunk: usize,
}

impl ChanWriter {
    pub fn new(tx: mpsc::Sender<Vec<u8>>, chunk: usize) -> ChanWriter {
        ChanWriter {
            tx,
            buf: Vec::with_capacity(chunk),
            chunk: chunk.max(1),
        }
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        self.tx
            .blocking_send(full)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the stream side went away"))
    }
}

impl io::Write for ChanWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.chunk {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

impl Drop for ChanWriter {
    fn drop(&mut self) {
        let _ = self.send_buf();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn bytes_pass_through_in_bounded_chunks() {
        let (tx, mut rx) = mpsc::channel(4);
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let d2 = data.clone();
        let t = std::thread::spawn(move || {
            let mut w = ChanWriter::new(tx, 1000);
            for c in d2.chunks(777) {
                w.write_all(c).expect("write");
            }
            w.flush().expect("flush");
        });
        let (tx2, rx2) = mpsc::channel(4);
        let relay = std::thread::spawn(move || {
            while let Some(c) = rx.blocking_recv() {
                assert!(c.len() <= 1000 && !c.is_empty());
                tx2.blocking_send(c).expect("relay");
            }
        });
        let mut got = Vec::new();
        ChanReader::new(rx2).read_to_end(&mut got).expect("read");
        t.join().expect("writer");
        relay.join().expect("relay");
        assert_eq!(got, data);
    }

    #[test]
    fn a_gone_receiver_is_a_broken_pipe() {
        let (tx, rx) = mpsc::channel(1);
        drop(rx);
        let mut w = ChanWriter::new(tx, 4);
        let err = w.write_all(b"12345678").expect_err("broken");
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }
}
