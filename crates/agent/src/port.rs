//! The virtio-serial port the host talks to.
//!
//! The port stays open for the agent's whole life. While no host is
//! connected to its chardev, the kernel reports `POLLHUP` and reads return
//! end-of-file; that ends a yamux session, after which we poll (every
//! [`RECONNECT_POLL`]) until a host is connected again and start a fresh
//! session on the same descriptor.

use machinen_proto::timeouts;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};

use crate::fdio::FdIo;
use crate::log::{debug, error};
use crate::server::{serve_sessions, Ctx};

/// How often the port is checked for a (re)connected host.
pub const RECONNECT_POLL: Duration = timeouts::PORT_RECONNECT_POLL;

const SYSFS_PORTS: &str = "/sys/class/virtio-ports";

/// The device node of the virtio-serial port called `name`, found through
/// `/sys/class/virtio-ports/*/name`.
pub fn find_port_in(sysfs_dir: &Path, dev_dir: &Path, name: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sysfs_dir).ok()?;
    for entry in entries.flatten() {
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
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
        if !warned && start.elapsed() > timeouts::PORT_WAIT_WARN {
            error!("no virtio-serial port named {name} after 10 s (is virtio_console loaded and the port configured?); still waiting");
            warned = true;
        }
        tokio::time::sleep(timeouts::SLOW_POLL).await;
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
        Ok(_) => !fds[0]
            .revents()
            .is_some_and(|r| r.contains(PollFlags::POLLHUP)),
        Err(e) => {
            error!("poll on the agent port: {e}");
            false
        }
    }
}

/// Serve the host over the port at `path`, forever.
pub async fn serve_port(path: &Path, ctx: Arc<Ctx>) {
    let port = loop {
        match open_port(path) {
            Ok(fd) => break fd,
            Err(e) => {
                error!(
                    "cannot open the agent port {}: {e}; retrying",
                    path.display()
                );
                tokio::time::sleep(timeouts::PORT_REOPEN).await;
            }
        }
    };
    serve_port_fd(port, ctx).await;
}

/// Serve the host over an open port (anything with the port's semantics:
/// `POLLHUP` while no host is connected), one session per connection.
pub async fn serve_port_fd(port: OwnedFd, ctx: Arc<Ctx>) {
    let mut last: Option<Instant> = None;
    serve_sessions(
        || {
            // A session that failed on garbage right after it started, while
            // the host stays connected, must not spin. One that lasted (a
            // restored guest's, broken by its new host) is followed at once:
            // the new host's hello is already waiting.
            let quick = last
                .replace(Instant::now())
                .is_some_and(|t| t.elapsed() < timeouts::PORT_QUICK_RECONNECT);
            let port = &port;
            async move {
                if quick {
                    tokio::time::sleep(RECONNECT_POLL).await;
                }
                loop {
                    let mut logged = false;
                    while !host_connected(port) {
                        if !logged {
                            debug!("waiting for the host to connect");
                            logged = true;
                        }
                        tokio::time::sleep(RECONNECT_POLL).await;
                    }
                    // A fresh registration per session: the reactor never
                    // forgets a hangup it saw on a registration (see FdIo).
                    match port.try_clone().and_then(FdIo::new) {
                        Ok(io) => {
                            debug!("host connected");
                            return Some(io);
                        }
                        Err(e) => {
                            error!("cannot set up the agent port for a session: {e}; retrying");
                            tokio::time::sleep(timeouts::PORT_REOPEN).await;
                        }
                    }
                }
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
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0\n"),
            ("vport0p1", "org.machinen.agent\n"),
        ] {
            std::fs::create_dir_all(dir.join(port)).expect("mkdir");
            std::fs::write(dir.join(port).join("name"), name).expect("write");
        }
        std::fs::create_dir_all(dir.join("vport1p1")).expect("mkdir"); // no name file
        assert_eq!(
            find_port_in(&dir, Path::new("/dev"), "org.machinen.agent"),
            Some(PathBuf::from("/dev/vport0p1"))
        );
        assert_eq!(find_port_in(&dir, Path::new("/dev"), "nope"), None);
        assert_eq!(
            find_port_in(&dir.join("missing"), Path::new("/dev"), "nope"),
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pty behaves like the virtio port: the master reports POLLHUP while
    /// no one has the slave open, and works again when it is reopened. So
    /// the slave plays the host, connecting and going away twice.
    #[tokio::test]
    async fn port_sessions_follow_the_host_connecting_and_leaving() {
        use crate::server::tests::{test_ctx, Client};
        use machinen_proto::{Frame, Request, Response};
        use nix::fcntl::{open, OFlag};
        use nix::pty::{grantpt, posix_openpt, ptsname_r, unlockpt};
        use nix::sys::stat::Mode;
        use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg};
        use std::os::fd::{FromRawFd, IntoRawFd};

        let master =
            posix_openpt(OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC).expect("openpt");
        grantpt(&master).expect("grantpt");
        unlockpt(&master).expect("unlockpt");
        let slave_name = ptsname_r(&master).expect("ptsname");
        // SAFETY: we take over the descriptor `into_raw_fd` released.
        let master = unsafe { OwnedFd::from_raw_fd(master.into_raw_fd()) };

        let open_slave = || {
            let raw = open(
                slave_name.as_str(),
                OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .expect("open slave");
            // SAFETY: `open` just returned this descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut t = tcgetattr(&fd).expect("tcgetattr");
            cfmakeraw(&mut t);
            tcsetattr(&fd, SetArg::TCSANOW, &t).expect("raw mode");
            FdIo::new(fd).expect("register slave")
        };

        let (ctx, _) = test_ctx();
        let server = tokio::spawn(serve_port_fd(master, ctx));
        for round in 0..3 {
            let client = Client::new(open_slave());
            // Two calls with a pause: the session must stay up while idle.
            for call in 0..2 {
                let frames = tokio::time::timeout(
                    Duration::from_secs(10),
                    client.call(Frame::Request(Request::Ping)),
                )
                .await
                .unwrap_or_else(|_| panic!("round {round}, call {call}: no answer"));
                assert_eq!(
                    frames,
                    vec![Frame::Response(Response::Pong)],
                    "round {round}, call {call}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            client.disconnect();
            // Let the server see the hangup before the next host connects.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        server.abort();
    }

    #[test]
    fn hangup_means_disconnected() {
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        assert!(host_connected(&a));
        drop(b);
        assert!(!host_connected(&a));
    }
}
