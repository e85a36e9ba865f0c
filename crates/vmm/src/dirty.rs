//! Which pages of a VM's RAM file the guest wrote since the last checkpoint:
//! the kernel's soft-dirty bits on QEMU's mapping of the file
//! (`Documentation/admin-guide/mm/soft-dirty.rst`).
//!
//! At a checkpoint the supervisor clears QEMU's soft-dirty bits
//! (`/proc/<pid>/clear_refs` ← `4`); every page written after that has bit
//! 55 set in `/proc/<pid>/pagemap`. A page whose entry is gone (reclaimed
//! to swap, or never mapped) carries no bit: it counts as written whenever
//! the file holds data there, so nothing written is ever missed (the delta
//! is at worst larger). Pages the balloon gave back are holes: they read as
//! zero in the guest's eyes only until it uses them again, and the guest
//! never reads a free page before writing it.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;

const PAGE: u64 = machinen::chain::PAGE;
const PM_SOFT_DIRTY: u64 = 1 << 55;
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAP: u64 = 1 << 62;

/// Whether this kernel tracks soft-dirty bits (CONFIG_MEM_SOFT_DIRTY):
/// checked on this process's own memory.
pub fn supported() -> bool {
    let page = vec![0u8; 2 * PAGE as usize];
    let addr = (page.as_ptr() as u64).div_ceil(PAGE) * PAGE;
    let entry = |a: u64| -> Option<u64> {
        let f = File::open("/proc/self/pagemap").ok()?;
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b, a / PAGE * 8).ok()?;
        Some(u64::from_le_bytes(b))
    };
    if clear(std::process::id()).is_err() {
        return false;
    }
    // SAFETY: `addr` lies inside `page`, which this function owns; a
    // volatile write so the store is not optimised away.
    unsafe { std::ptr::write_volatile(addr as *mut u8, 1) };
    let dirty = entry(addr).is_some_and(|e| e & PM_SOFT_DIRTY != 0);
    drop(page);
    dirty
}

/// Clear the soft-dirty bits of every mapping of process `pid`.
pub fn clear(pid: u32) -> std::io::Result<()> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{pid}/clear_refs"))?
        .write_all(b"4")
}

/// Where process `pid` maps `file` from its start: (address, length).
fn mapping_of(pid: u32, file: &Path) -> std::io::Result<(u64, u64)> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps"))?;
    let want = file.display().to_string();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(_perms), Some(offset)) = (f.next(), f.next(), f.next()) else {
            continue;
        };
        let path = f.nth(2).unwrap_or_default();
        if path != want || u64::from_str_radix(offset, 16).ok() != Some(0) {
            continue;
        }
        if let Some((a, b)) = range.split_once('-') {
            if let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) {
                return Ok((a, b - a));
            }
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("process {pid} does not map {want}"),
    ))
}

/// The pages of `file` (of `ram_bytes`) that process `pid` wrote since its
/// soft-dirty bits were last cleared, as (first page, count) ranges.
pub fn written_pages(pid: u32, file: &Path, ram_bytes: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let (addr, len) = mapping_of(pid, file)?;
    let pages = ram_bytes.min(len) / PAGE;
    let f = File::open(file)?;
    let data = machinen::bundle::data_extents(&f, ram_bytes);
    let pagemap = File::open(format!("/proc/{pid}/pagemap"))?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |p: u64| match out.last_mut() {
        Some((first, count)) if *first + *count == p => *count += 1,
        _ => out.push((p, 1)),
    };
    let in_data = |p: u64| {
        let off = p * PAGE;
        data.iter().any(|&(a, b)| off >= a && off < b)
    };
    const CHUNK: u64 = 8192;
    let mut buf = vec![0u8; (CHUNK * 8) as usize];
    let mut p = 0;
    while p < pages {
        let n = CHUNK.min(pages - p);
        let b = &mut buf[..(n * 8) as usize];
        pagemap.read_exact_at(b, (addr / PAGE + p) * 8)?;
        for (i, e) in b.chunks_exact(8).enumerate() {
            let e = u64::from_le_bytes(e.try_into().unwrap_or_default());
            let page = p + i as u64;
            let present = e & (PM_PRESENT | PM_SWAP) != 0;
            if e & PM_SOFT_DIRTY != 0 || (!present && in_data(page)) {
                push(page);
            }
        }
        p += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_dirty_bits_follow_writes_to_a_shared_file() {
        if !supported() {
            eprintln!("soft-dirty bits not tracked by this kernel; skipped");
            return;
        }
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("ram");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("file");
        let len = 64 * PAGE;
        f.set_len(len).expect("len");
        // SAFETY: a fresh shared mapping of a file this test owns; unmapped
        // below before the file goes.
        let m = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(&f),
                0,
            )
        };
        assert_ne!(m, libc::MAP_FAILED);
        let base = m as *mut u8;
        let write = |page: u64| {
            // SAFETY: inside the mapping of `len` bytes.
            unsafe { std::ptr::write_volatile(base.add((page * PAGE) as usize), 7) }
        };
        let me = std::process::id();
        clear(me).expect("clear");
        for p in [0, 1, 2, 10] {
            write(p);
        }
        assert_eq!(
            written_pages(me, &path, len).expect("pages"),
            vec![(0, 3), (10, 1)]
        );
        clear(me).expect("clear");
        assert!(written_pages(me, &path, len).expect("pages").is_empty());
        write(2);
        write(40);
        assert_eq!(
            written_pages(me, &path, len).expect("pages"),
            vec![(2, 1), (40, 1)]
        );
        // SAFETY: the mapping made above.
        unsafe { libc::munmap(m, len as usize) };
    }
}
