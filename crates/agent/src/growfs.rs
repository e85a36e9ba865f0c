//! Growing the root filesystem to fill its disk. `boot --disk-size` gives
//! the VM a root disk (a qcow2 layer) larger than the image's ext4
//! filesystem; at boot the agent grows the mounted filesystem with the
//! kernel's online resize (`EXT4_IOC_RESIZE_FS`, what `resize2fs` does on a
//! mounted filesystem), so `df /` shows the size asked for. A disk that is
//! not larger (the default) is left alone.

use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;

use crate::log::{debug, error};

/// `_IOR(0x12, 114, u64)`: a block device's size in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
/// `_IOW('f', 16, u64)`: grow a mounted ext4 to this many blocks.
const EXT4_IOC_RESIZE_FS: libc::c_ulong = 0x4008_6610;

/// Less than this much unused disk is not worth a resize (rounding of the
/// disk size to whole blocks and groups leaves some).
const MIN_GROWTH: u64 = 16 << 20;

/// Block count and block size from an ext4 superblock (the 1024 bytes at
/// offset 1024 of the device).
pub fn parse_superblock(sb: &[u8]) -> Option<(u64, u64)> {
    if sb.len() < 0x158 || u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xEF53 {
        return None;
    }
    let le32 = |o: usize| u32::from_le_bytes([sb[o], sb[o + 1], sb[o + 2], sb[o + 3]]);
    let log = le32(24);
    if log > 6 {
        return None;
    }
    let block = 1024u64 << log;
    let incompat = le32(0x60);
    let hi = if incompat & 0x80 != 0 {
        u64::from(le32(0x150))
    } else {
        0
    };
    Some(((hi << 32) | u64::from(le32(4)), block))
}

/// Grow the ext4 on `device`, mounted at `mountpoint`, to fill the device.
pub fn grow(device: &str, mountpoint: &str) -> io::Result<Option<(u64, u64)>> {
    let mut dev = std::fs::File::open(device)?;
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points
    // at a live u64; the fd is open for the duration of the call.
    if unsafe { libc::ioctl(dev.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut sb = vec![0u8; 1024];
    dev.seek(SeekFrom::Start(1024))?;
    dev.read_exact(&mut sb)?;
    let Some((blocks, block)) = parse_superblock(&sb) else {
        return Err(io::Error::other("no ext4 superblock"));
    };
    let want = size / block;
    if want.saturating_sub(blocks) * block < MIN_GROWTH {
        return Ok(None);
    }
    let root = std::fs::File::open(mountpoint)?;
    // SAFETY: EXT4_IOC_RESIZE_FS reads one u64 through the pointer, which
    // points at a live u64; the fd (the mounted root) is open.
    if unsafe {
        libc::ioctl(
            root.as_raw_fd(),
            EXT4_IOC_RESIZE_FS as _,
            &want as *const u64,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(Some((blocks * block, want * block)))
}

/// [`grow`], logged; a failure leaves the filesystem at its old size.
pub fn grow_root(device: &str, mountpoint: &str) {
    match grow(device, mountpoint) {
        Ok(Some((from, to))) => debug!("grew the root filesystem from {from} to {to} bytes"),
        Ok(None) => {}
        Err(e) => error!("cannot grow the root filesystem to fill {device}: {e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn superblocks_parse() {
        let mut sb = vec![0u8; 1024];
        sb[0x38] = 0x53;
        sb[0x39] = 0xEF;
        sb[24] = 2; // 4096-byte blocks
        sb[4..8].copy_from_slice(&524_288u32.to_le_bytes());
        assert_eq!(parse_superblock(&sb), Some((524_288, 4096)));
        sb[0x60] = 0x80; // 64bit
        sb[0x150..0x154].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(parse_superblock(&sb), Some(((1 << 32) + 524_288, 4096)));
        sb[0x38] = 0;
        assert_eq!(parse_superblock(&sb), None);
    }
}
