//! Which pages of a VM's RAM file changed since the last checkpoint.
//!
//! At a checkpoint that holds the whole RAM the supervisor records a keyed
//! digest of every 4 KiB page: 64 bits of XXH3 with a random 192-byte
//! secret of the supervisor's own, which the guest never sees. The next
//! checkpoint, with the guest paused, hashes the RAM file again and writes
//! only the pages whose digest differs, updating the record. The hashing
//! is the pause's largest part, so its speed is the pause: 300 MiB of
//! 4 KiB pages on one core here take 25-29 ms with XXH3, 75 ms with
//! HighwayHash and 116 ms with keyed BLAKE3 (docs/performance.md has what
//! each did to a delta checkpoint's pause).
//!
//! XXH3 is not a pseudorandom function, and it need not be one here: a
//! page whose new content collides with its old digest is left out of the
//! delta, so the restored VM shows what that page held at the parent. Only
//! the guest writes its RAM, so a guest that crafted such a collision
//! (blind: it knows neither the secret nor the digests) could only make its
//! own snapshot show content it could have written itself. Chance
//! collisions, at 2^-64 per changed page, are far rarer than memory errors.
//!
//! The pages are read through a read-only mapping of the RAM file whose
//! page tables [`PageHashes::prepare`] fills while the guest still runs
//! (`MADV_POPULATE_READ` over the file's data): the paused scan then
//! neither copies the memory (`pread`) nor takes a page fault per page (a
//! mapping populated at pause time was slower than `pread`). The mapping
//! lives for one checkpoint, so that the pages do not count as the
//! supervisor's between checkpoints. Holes (never touched, or given back by
//! the balloon) count as zero pages. The cost is one read of the memory the
//! guest uses, at hashing speed, instead of a copy of it to disk.
//!
//! Content comparison needs nothing from the kernel (soft-dirty bits, which
//! would spare the read, are not built into every kernel) and misses
//! nothing: a page is left out only when its content is what the parent
//! holds (or collides with it, as above).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PAGE: u64 = machinen::chain::PAGE;
/// Read in chunks of this many bytes.
const CHUNK: usize = 1 << 20;

/// The digests of a RAM file's pages at the last checkpoint.
pub struct PageHashes {
    key: Box<Key>,
    zero: u64,
    hashes: Vec<u64>,
    /// The RAM file mapped for the next scan ([`PageHashes::prepare`]).
    mapped: Option<Mapped>,
}

/// A file mapped read-only and shared: its page-cache pages as they are.
struct Mapped {
    ptr: std::ptr::NonNull<std::ffi::c_void>,
    len: usize,
}

// SAFETY: the mapping is plain memory the kernel keeps valid until `Drop`
// unmaps it; the threads that share it only read it.
unsafe impl Send for Mapped {}
// SAFETY: as above: shared reads of a mapping that outlives them.
unsafe impl Sync for Mapped {}

impl Mapped {
    fn of(f: &File, len: u64) -> std::io::Result<Mapped> {
        use nix::sys::mman::{mmap, MapFlags, ProtFlags};
        let len = std::num::NonZeroUsize::new(len as usize)
            .ok_or_else(|| std::io::Error::other("an empty RAM file"))?;
        // SAFETY: a fresh shared read-only mapping of an open file, at an
        // address of the kernel's choosing; nothing else refers to it.
        let ptr = unsafe { mmap(None, len, ProtFlags::PROT_READ, MapFlags::MAP_SHARED, f, 0) }?;
        Ok(Mapped {
            ptr,
            len: len.get(),
        })
    }

    /// Fill the page tables for `[a, b)` (data of the file: a hole would be
    /// allocated). Best effort: a kernel without `MADV_POPULATE_READ`
    /// (before 5.14) faults the pages in during the scan instead.
    fn populate(&self, a: u64, b: u64) {
        let (a, b) = (a as usize, (b as usize).min(self.len));
        if a >= b {
            return;
        }
        // SAFETY: the range lies inside this live mapping; madvise only
        // fills page tables and changes no memory.
        unsafe {
            libc::madvise(
                self.ptr.as_ptr().cast::<u8>().add(a).cast(),
                b - a,
                libc::MADV_POPULATE_READ,
            );
        }
    }

    /// The bytes `[a, b)` of the file.
    ///
    /// The guest is paused while a scan reads them, so nothing writes the
    /// file meanwhile.
    fn bytes(&self, a: u64, b: u64) -> &[u8] {
        let (a, b) = (a as usize, (b as usize).min(self.len));
        if a >= b {
            return &[];
        }
        // SAFETY: the range lies inside the mapping, which lives as long
        // as `self`; the memory is initialised (file pages, zero for
        // holes) and only read here.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().cast::<u8>().add(a), b - a) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping `of` made; no slice of it
        // outlives `self` (they borrow it).
        let _ = unsafe { nix::sys::mman::munmap(self.ptr, self.len) };
    }
}

/// The digests' secret: longer than XXH3's minimum (136 bytes), so that
/// keyed hashing cannot fail.
type Key = [u8; 192];

fn digest(key: &Key, page: &[u8]) -> u64 {
    // Cannot fail: the secret is longer than the minimum. Were it to, every
    // page would differ from its record and be written: a full delta, never
    // a missed page.
    twox_hash::XxHash3_64::oneshot_with_secret(key, page).unwrap_or_else(|_| rand::random())
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
        let mut key: Box<Key> = Box::new([0; 192]);
        rand::Rng::fill(&mut rand::thread_rng(), &mut key[..]);
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
        Ok(PageHashes {
            key,
            zero,
            hashes,
            mapped: None,
        })
    }

    /// Map `file` and fill the page tables of its data, with the guest
    /// still running, for the next [`PageHashes::changed`]. Pages the
    /// guest adds meanwhile are faulted in by the scan; on failure the
    /// scan reads the file instead.
    pub fn prepare(&mut self, file: &Path) {
        let len = self.hashes.len() as u64 * PAGE;
        let mapped = File::open(file).and_then(|f| {
            let m = Mapped::of(&f, len)?;
            for (a, b) in page_extents(&f, len) {
                m.populate(a, b);
            }
            Ok(m)
        });
        match mapped {
            Ok(m) => self.mapped = Some(m),
            Err(e) => tracing::debug!("mapping the RAM file: {e}; the scan reads it"),
        }
    }

    /// The pages of `file` that changed since the record, as (first page,
    /// count) ranges; each is written to `out` at its offset (zero pages
    /// left as holes) and the record updated. The RAM is split between the
    /// host's cores: the guest is paused meanwhile.
    pub fn changed(&mut self, file: &Path, out: &File) -> std::io::Result<Vec<(u64, u64)>> {
        let pages = self.hashes.len() as u64;
        let f = File::open(file)?;
        let extents = page_extents(&f, pages * PAGE);
        let workers = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4) as u64;
        let (key, zero) = (&self.key, self.zero);
        // Used for this scan only (see `prepare`).
        let mapped = self.mapped.take();
        let mapped = mapped.as_ref();
        let mut parts: Vec<(u64, &mut [u64])> = Vec::new();
        let mut rest: &mut [u64] = &mut self.hashes;
        let mut first = 0;
        for end in split_by_data(&extents, pages, workers) {
            let (a, b) = rest.split_at_mut((end - first) as usize);
            parts.push((first, a));
            first = end;
            rest = b;
        }
        let results: Vec<std::io::Result<Vec<(u64, u64)>>> = std::thread::scope(|s| {
            let handles: Vec<_> = parts
                .into_iter()
                .map(|(first, hashes)| {
                    let (f, extents) = (&f, &extents);
                    s.spawn(move || scan(key, zero, f, mapped, out, extents, first, hashes))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(std::io::Error::other("a hashing thread panicked")))
                })
                .collect()
        });
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for r in results {
            for (p, n) in r? {
                match ranges.last_mut() {
                    Some((a, c)) if *a + *c == p => *c += n,
                    _ => ranges.push((p, n)),
                }
            }
        }
        Ok(ranges)
    }
}

/// Where to cut `0..pages` into at most `workers` ranges holding about as
/// much data each (the hashing is the work; holes cost nearly nothing, and
/// a guest's data is rarely spread evenly over its RAM): the ranges' ends,
/// increasing, the last `pages`.
fn split_by_data(extents: &[(u64, u64)], pages: u64, workers: u64) -> Vec<u64> {
    let data: u64 = extents.iter().map(|(a, b)| (b - a) / PAGE).sum();
    let share = data.div_ceil(workers.max(1)).max(1);
    let mut ends = Vec::new();
    let mut taken = 0;
    for &(a, b) in extents {
        let (a, b) = (a / PAGE, (b / PAGE).min(pages));
        let mut at = a;
        while at < b {
            let want = share * (ends.len() as u64 + 1);
            let step = want.saturating_sub(taken).min(b - at);
            if step == 0 {
                break;
            }
            at += step;
            taken += step;
            if taken >= want && ends.len() + 1 < workers as usize && at < pages {
                ends.push(at);
            }
        }
    }
    // Every end above was pushed after a step forward and below `pages`:
    // the ends rise strictly.
    ends.push(pages);
    ends
}

/// [`PageHashes::changed`] for the pages `first..first + hashes.len()`,
/// read from `mapped` when there is one, else from `f`.
#[allow(clippy::too_many_arguments)]
fn scan(
    key: &Key,
    zero: u64,
    f: &File,
    mapped: Option<&Mapped>,
    out: &File,
    extents: &[(u64, u64)],
    first: u64,
    hashes: &mut [u64],
) -> std::io::Result<Vec<(u64, u64)>> {
    let end = first + hashes.len() as u64;
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let mut push = |p: u64| match ranges.last_mut() {
        Some((a, c)) if *a + *c == p => *c += 1,
        _ => ranges.push((p, 1)),
    };
    let mut buf = vec![0u8; CHUNK];
    let mut next = first;
    // This part's data extents, cut to its pages, then its end as a last
    // (empty) extent so the hole before it is looked at too.
    let mine = extents
        .iter()
        .map(|&(a, b)| ((a / PAGE).max(first), (b / PAGE).min(end)))
        .filter(|(a, b)| a < b)
        .chain([(end, end)]);
    for (a, b) in mine {
        // A hole: pages that held data before are zero now.
        for p in next..a {
            let h = &mut hashes[(p - first) as usize];
            if *h != zero {
                *h = zero;
                push(p);
            }
        }
        let mut each = |p: u64, page: &[u8]| {
            let d = digest(key, page);
            let h = &mut hashes[(p - first) as usize];
            if *h != d {
                *h = d;
                push(p);
                if d != zero {
                    out.write_all_at(page, p * PAGE)?;
                }
            }
            Ok(())
        };
        match mapped {
            Some(m) => {
                let bytes = m.bytes(a * PAGE, b * PAGE);
                for (i, page) in bytes.chunks(PAGE as usize).enumerate() {
                    each(a + i as u64, page)?;
                }
            }
            None => pages_of(f, a * PAGE, b * PAGE, &mut buf, each)?,
        }
        next = b;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_scan_is_split_by_data_not_by_pages() {
        let p = PAGE;
        // All data in the last quarter: two workers each get half of it.
        assert_eq!(split_by_data(&[(300 * p, 400 * p)], 400, 2), vec![350, 400]);
        // Two extents of 10 and 30 pages: the cut falls in the second.
        assert_eq!(
            split_by_data(&[(0, 10 * p), (50 * p, 80 * p)], 100, 2),
            vec![60, 100]
        );
        // No data, one worker, more workers than pages: always one range
        // at least, ending at `pages`.
        assert_eq!(split_by_data(&[], 100, 4), vec![100]);
        assert_eq!(split_by_data(&[(0, 100 * p)], 100, 1), vec![100]);
        assert_eq!(split_by_data(&[(0, 3 * p)], 3, 4), vec![1, 2, 3]);
        // Data up to the very end: no empty last range.
        assert_eq!(split_by_data(&[(0, 4 * p)], 4, 2), vec![2, 4]);
    }

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
        // Through a mapping prepared beforehand: the same answers.
        put(5, 3);
        put(2, 0);
        rec.prepare(&ram);
        assert!(rec.mapped.is_some(), "mapped");
        put(6, 4); // written after the mapping was filled
        let got = rec.changed(&ram, &o).expect("changed");
        assert_eq!(got, vec![(2, 1), (5, 2)]);
        assert!(rec.mapped.is_none(), "the mapping is for one scan");
        let written = std::fs::read(&out).expect("read");
        assert_eq!(written[(5 * PAGE) as usize], 3);
        assert_eq!(written[(6 * PAGE) as usize], 4);
        rec.prepare(&ram);
        assert!(rec.changed(&ram, &o).expect("none").is_empty());
    }
}
