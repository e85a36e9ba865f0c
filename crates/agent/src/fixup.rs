//! Guest repairs around snapshots: flush before (`Quiesce`), and after a
//! restore or fork (`Fixup`) set the wall clock, reseed the kernel RNG with
//! fresh host entropy so siblings do not share random streams, and reset TCP
//! connections inherited from the snapshot.

use std::path::Path;

use machinen_proto::{send, FixupReport, FixupRequest, Frame, Response, WireError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::log::{debug, error};

pub const FIXUP_FAILED: &str = machinen_proto::ErrorCode::FixupFailed.as_str();

/// Most entropy accepted in one request.
pub const MAX_ENTROPY: usize = 512;

pub async fn serve_quiesce<S: AsyncRead + AsyncWrite + Unpin>(mut s: S) {
    let _ = tokio::task::spawn_blocking(nix::unistd::sync).await;
    let _ = send(&mut s, &Frame::Response(Response::Quiesced)).await;
    let _ = s.shutdown().await;
}

pub async fn serve_fixup<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, req: FixupRequest) {
    let reply = match tokio::task::spawn_blocking(move || apply(&req)).await {
        Ok(Ok(report)) => Frame::Response(Response::FixedUp(report)),
        Ok(Err(message)) => {
            error!("fixup: {message}");
            Frame::Error(WireError {
                code: FIXUP_FAILED.into(),
                message,
            })
        }
        Err(e) => Frame::Error(WireError {
            code: FIXUP_FAILED.into(),
            message: e.to_string(),
        }),
    };
    let _ = send(&mut s, &reply).await;
    let _ = s.shutdown().await;
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > MAX_ENTROPY * 2 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn apply(req: &FixupRequest) -> Result<FixupReport, String> {
    use nix::time::{clock_gettime, clock_settime, ClockId};
    let mut report = FixupReport::default();
    let now =
        clock_gettime(ClockId::CLOCK_REALTIME).map_err(|e| format!("reading the clock: {e}"))?;
    report.clock_was_ns = (now.tv_sec() as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(now.tv_nsec() as u64);
    if req.wall_clock_ns > 0 {
        let ts = nix::sys::time::TimeSpec::new(
            (req.wall_clock_ns / 1_000_000_000) as i64,
            (req.wall_clock_ns % 1_000_000_000) as i64,
        );
        clock_settime(ClockId::CLOCK_REALTIME, ts)
            .map_err(|e| format!("setting the clock: {e}"))?;
    }
    let entropy = decode_hex(&req.entropy_hex).ok_or("entropy must be at most 512 bytes of hex")?;
    if !entropy.is_empty() {
        add_entropy(&entropy)?;
        report.entropy_bytes = entropy.len() as u32;
    }
    if req.reset_tcp {
        report.tcp_reset =
            crate::tcpreset::reset_all().map_err(|e| format!("resetting TCP connections: {e}"))?;
    }
    if req.stop_page_reporting {
        report.balloons_stopped = stop_balloons(Path::new(BALLOON_DRIVER))?;
    }
    debug!("fixup: {report:?}");
    Ok(report)
}

/// Where the balloon driver's bound devices are listed.
const BALLOON_DRIVER: &str = "/sys/bus/virtio/drivers/virtio_balloon";

/// Unbind every device from the balloon driver at `driver` (a sysfs driver
/// directory): page reporting stops with it. A guest without the driver
/// has nothing to stop.
fn stop_balloons(driver: &Path) -> Result<u32, String> {
    let Ok(rd) = std::fs::read_dir(driver) else {
        return Ok(0);
    };
    let mut n = 0;
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("virtio") {
            continue;
        }
        std::fs::write(driver.join("unbind"), &name)
            .map_err(|e| format!("unbinding balloon {name}: {e}"))?;
        n += 1;
    }
    Ok(n)
}

/// Credit `bytes` to the kernel's input pool and force the CRNG to reseed
/// from it, so that every restored copy draws from a different state.
fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    #[repr(C)]
    struct PoolInfo {
        entropy_count: libc::c_int,
        buf_size: libc::c_int,
        buf: [u8; MAX_ENTROPY],
    }
    const RNDADDENTROPY: libc::c_ulong = 0x4008_5203; // _IOW('R', 0x03, int[2])
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207; // _IO('R', 0x07)
    let n = bytes.len().min(MAX_ENTROPY);
    let mut info = PoolInfo {
        entropy_count: (n * 8) as libc::c_int,
        buf_size: n as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..n].copy_from_slice(&bytes[..n]);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buffer holds
    // buf_size bytes; `info` is a live, properly laid out struct of that shape.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY as _, &info as *const PoolInfo) };
    if rc != 0 {
        return Err(format!(
            "RNDADDENTROPY: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG as _) };
    if rc != 0 {
        return Err(format!(
            "RNDRESEEDCRNG: {}",
            std::io::Error::last_os_error()
        ));
    }
    info.buf.fill(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloons_are_unbound_by_name() {
        let d = std::env::temp_dir().join(format!("mn-balloon-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("virtio5")).expect("dev");
        assert_eq!(stop_balloons(&d.join("absent")), Ok(0));
        std::fs::write(d.join("bind"), "").expect("bind");
        std::fs::write(d.join("unbind"), "").expect("unbind");
        assert_eq!(stop_balloons(&d), Ok(1));
        assert_eq!(
            std::fs::read_to_string(d.join("unbind")).expect("read"),
            "virtio5"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn hex_is_bounded_and_strict() {
        assert_eq!(decode_hex("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(decode_hex(""), Some(vec![]));
        assert_eq!(decode_hex("0"), None);
        assert_eq!(decode_hex("zz"), None);
        assert_eq!(decode_hex(&"ab".repeat(MAX_ENTROPY + 1)), None);
    }
}
