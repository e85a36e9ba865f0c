//! Which pages of a VM's RAM file changed since the last checkpoint.
//!
//! At a checkpoint that holds the whole RAM the supervisor records a keyed
//! BLAKE3 digest (64 bits, with a key of its own, so a guest cannot craft
//! pages that collide) of every 4 KiB page; the next checkpoint, with the
//! guest paused, hashes the RAM file again and writes only the pages whose
//! digest differs, updating the record. Holes (never touched, or given back
//! by the balloon) count as zero pages. The cost is one read of the memory
//! the guest uses, at hashing speed, instead of a copy of it to disk.
//!
//! Content comparison needs nothing from the kernel (soft-dirty bits, which
//! would spare the read, are not built into every kernel) and misses
//! nothing: a page is left out only when its content is what the parent
//! holds.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PAGE: u64 = machinen::chain::PAGE;
/// Read in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

/// The digests of a RAM file's pages at the last checkpoint.
pub struct PageHashes {
    key: [u8; 32],
    zero: u64,
    hashes: Vec<u64>,
}

fn digest(key: &[u8; 32], page: &[u8]) -> u64 {
    let h = blake3::keyed_hash(key, page);
    let mut b = [0u8; 8];
    b.copy_from_slice(&h.as_bytes()[..8]);
    u64::from_le_bytes(b)
}

/// Read `[off, end)` of `f` chunk by chunk, calling `each(page index, page)`.
fn pages_of(
    f: &File,
    off: u64,
    end: u64,
    buf: &mut [u8],
    mut each: impl FnMut(u64, &[u8]) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut at = off;
    while at < end {
        let n = ((end - at) as usize).min(buf.len());
        f.read_exact_at(&mut buf[..n], at)?;
        for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
            each(at / PAGE + i as u64, page)?;
        }
        at += n as u64;
    }
    Ok(())
}

/// The data extents of `f`, cut to whole pages within `len`.
fn page_extents(f: &File, len: u64) -> Vec<(u64, u64)> {
    machinen::bundle::data_extents(f, len)
        .into_iter()
        .map(|(a, b)| {
            (
                a / PAGE * PAGE,
                b.div_ceil(PAGE).saturating_mul(PAGE).min(len),
            )
        })
        .filter(|(a, b)| a < b)
        .collect()
}

impl PageHashes {
    /// Record the pages of `file` (a RAM of `ram_bytes`) as they are now.
    pub fn of_file(file: &Path, ram_bytes: u64) -> std::io::Result<PageHashes> {
        let key: [u8; 32] = rand::random();
        let zero = digest(&key, &[0u8; PAGE as usize]);
        let mut hashes = vec![zero; (ram_bytes / PAGE) as usize];
        let f = File::open(file)?;
        let mut buf = vec![0u8; CHUNK];
        for (a, b) in page_extents(&f, ram_bytes) {
            pages_of(&f, a, b, &mut buf, |p, page| {
                if let Some(h) = hashes.get_mut(p as usize) {
                    *h = digest(&key, page);
                }
                Ok(())
            })?;
        }
        Ok(PageHashes { key, zero, hashes })
    }

    /// The pages of `file` that changed since the record, as (first page,
    /// count) ranges; each is written to `out` at its offset (zero pages
    /// left as holes) and the record updated.
    pub fn changed(&mut self, file: &Path, out: &File) -> std::io::Result<Vec<(u64, u64)>> {
        let ram_bytes = self.hashes.len() as u64 * PAGE;
        let f = File::open(file)?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        let mut push = |p: u64| match ranges.last_mut() {
            Some((first, count)) if *first + *count == p => *count += 1,
            _ => ranges.push((p, 1)),
        };
        let extents = page_extents(&f, ram_bytes);
        let mut buf = vec![0u8; CHUNK];
        let mut next = 0u64;
        let zero = self.zero;
        for (a, b) in extents.iter().copied().chain([(ram_bytes, ram_bytes)]) {
            // A hole: pages that held data before are zero now.
            for p in next / PAGE..a / PAGE {
                if let Some(h) = self.hashes.get_mut(p as usize) {
                    if *h != zero {
                        *h = zero;
                        push(p);
                    }
                }
            }
            let (key, hashes) = (&self.key, &mut self.hashes);
            pages_of(&f, a, b, &mut buf, |p, page| {
                let d = digest(key, page);
                let Some(h) = hashes.get_mut(p as usize) else {
                    return Ok(());
                };
                if *h != d {
                    *h = d;
                    push(p);
                    if d != zero {
                        out.write_all_at(page, p * PAGE)?;
                    }
                }
                Ok(())
            })?;
            next = b;
        }
        Ok(ranges)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changed_pages_are_found_written_and_recorded() {
        let dir = tempfile::tempdir().expect("tmp");
        let (ram, out) = (dir.path().join("ram"), dir.path().join("out"));
        let len = 64 * PAGE;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&ram)
            .expect("ram");
        f.set_len(len).expect("len");
        let put = |p: u64, v: u8| {
            f.write_all_at(&[v; PAGE as usize], p * PAGE)
                .expect("write")
        };
        for p in [0, 1, 2, 10, 40] {
            put(p, 7);
        }
        let mut rec = PageHashes::of_file(&ram, len).expect("record");
        let o = File::create(&out).expect("out");
        o.set_len(len).expect("len");
        assert!(rec.changed(&ram, &o).expect("none").is_empty());
        put(2, 8); // changed
        put(3, 9); // new
        put(10, 7); // rewritten with the same bytes: not a change
        put(40, 0); // zeroed
                    // SAFETY: fallocate on a file this test owns.
        let punched = unsafe {
            libc::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(&f),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                0,
                PAGE as i64,
            )
        };
        assert_eq!(punched, 0, "punch a hole like the balloon");
        let got = rec.changed(&ram, &o).expect("changed");
        assert_eq!(got, vec![(0, 1), (2, 2), (40, 1)]);
        let written = std::fs::read(&out).expect("read");
        assert_eq!(written[(2 * PAGE) as usize], 8);
        assert_eq!(written[(3 * PAGE) as usize], 9);
        assert_eq!(written[(40 * PAGE) as usize], 0);
        // Recorded: asking again finds nothing.
        assert!(rec.changed(&ram, &o).expect("none").is_empty());
    }
}
