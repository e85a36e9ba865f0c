//! The virtio-serial port the host talks to.
//!
//! The port stays open for the agent's whole life. While no host is
//! connected to its chardev, the kernel reports `POLLHUP` and reads return
//! end-of-file; that ends a yamux session, after which we poll (every
//! [`RECONNECT_POLL`]) until a host is connected again and start a fresh
//! session on the same descriptor.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::fdio::FdIo;
use crate::log::{debug, error, info};
use crate::server::{Ctx, serve_sessions};

/// How often the port is checked for a (re)connected host.
pub const RECONNECT_POLL: Duration = Duration::from_millis(25);

const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// The device node of the virtio-serial port called `name`, found through
/// `/sys/class/virtio-ports/*/name`.
pub fn find_port_in(sysfs_dir: &Path, dev_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sysfs_dir).ok()?;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else { continue };
        if port_name.trim_end_matches(['\n', '\0']) == name {
            return Some(dev_dir.join(entry.file_name()));
        }
    }
    None
}

/// Wait (forever, logging now and then) until the port device exists.
pub async fn wait_for_port(name: &str) -> PathBuf {
    let start = Instant::now();
    let mut warned = false;
    loop {
        if let Some(p) = find_port_in(Path::new(SYSFS_PORTS), Path::new("/dev"), name) {
            if p.exists() {
                debug!("agent port {name} is {}", p.display());
                return p;
            }
        }
        if !warned && start.elapsed() > Duration::from_secs(10) {
            error!("no virtio-serial port named {name} after 10 s (is virtio_console loaded and the port configured?); still waiting");
            warned = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn open_port(path: &Path) -> io::Result<OwnedFd> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)?;
    Ok(OwnedFd::from(f))
}

/// Whether a host is connected to the port: the kernel flags `POLLHUP`
/// while the host side is closed.
pub fn host_connected(fd: &impl AsFd) -> bool {
    let mut fds = [PollFd::new(fd.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::ZERO) {
        Ok(_) => !fds[0].revents().is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(e) => {
            error!("poll on the agent port: {e}");
            false
        }
    }
}

/// Serve the host over the port at `path`, forever.
pub async fn serve_port(path: &Path, ctx: Arc<Ctx>) {
    let fd = loop {
        match open_port(path) {
            Ok(fd) => break fd,
            Err(e) => {
                error!("cannot open the agent port {}: {e}; retrying", path.display());
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let port = match FdIo::new(fd) {
        Ok(p) => p,
        Err(e) => {
            // Without the reactor there is nothing to serve with; the caller
            // restarts us.
            error!("cannot register the agent port: {e}");
            return;
        }
    };
    let mut first = true;
    serve_sessions(
        || {
            let port = port.clone();
            let was_first = std::mem::replace(&mut first, false);
            async move {
                if !was_first {
                    // A session that failed on garbage while the host stays
                    // connected must not spin.
                    tokio::time::sleep(RECONNECT_POLL).await;
                }
                let mut logged = false;
                while !host_connected(&port) {
                    if !logged {
                        debug!("waiting for the host to connect");
                        logged = true;
                    }
                    tokio::time::sleep(RECONNECT_POLL).await;
                }
                if was_first {
                    info!("host connected");
                } else {
                    debug!("host connected");
                }
                Some(port)
            }
        },
        ctx,
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name() {
        let dir = std::env::temp_dir().join(format!("machinen-agent-ports-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (port, name) in [("vport0p0", "org.qemu.guest_agent.0\n"), ("vport0p1", "org.machinen.agent\n")] {
            std::fs::create_dir_all(dir.join(port)).expect("mkdir");
            std::fs::write(dir.join(port).join("name"), name).expect("write");
        }
        std::fs::create_dir_all(dir.join("vport1p1")).expect("mkdir"); // no name file
        assert_eq!(
            find_port_in(&dir, Path::new("/dev"), "org.machinen.agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port_in(&dir, Path::new("/dev"), "nope"), None);
        assert_eq!(find_port_in(&dir.join("missing"), Path::new("/dev"), "nope"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn hangup_means_disconnected() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(host_connected(&a));
        drop(b);
        assert!(!host_connected(&a));
    }
}
