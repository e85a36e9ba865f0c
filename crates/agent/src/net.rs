//! Guest networking on QEMU user networking (slirp): fixed addresses, plain
//! ioctls, and `/etc/resolv.conf`.

use machinen_proto::timeouts;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use crate::log::{debug, error};

pub const GUEST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
pub const NETMASK: Ipv4Addr = Ipv4Addr::new(255, 255, 255, 0);
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);

fn inet_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2); we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    // SAFETY: ifreq is plain old data; all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    let bytes = name.as_bytes();
    if bytes.is_empty() || bytes.len() >= req.ifr_name.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    for (dst, src) in req.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok(req)
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // sockaddr is plain old data, so any bit pattern is valid; this is the
    // standard way to pass an IPv4 address through ifreq/rtentry.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn ioctl_ifreq(
    sock: &OwnedFd,
    request: libc::Ioctl,
    req: &mut libc::ifreq,
    what: &str,
) -> io::Result<()> {
    // SAFETY: these SIOC*IF* requests read/write one `ifreq` through the
    // pointer, which points to a live, exclusively borrowed value.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

fn set_addr(
    sock: &OwnedFd,
    ifname: &str,
    request: libc::Ioctl,
    addr: Ipv4Addr,
    what: &str,
) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(sock, request, &mut req, what)
}

fn link_up(sock: &OwnedFd, ifname: &str) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    ioctl_ifreq(sock, libc::SIOCGIFFLAGS, &mut req, "SIOCGIFFLAGS")?;
    // SAFETY: SIOCGIFFLAGS filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    ioctl_ifreq(sock, libc::SIOCSIFFLAGS, &mut req, "SIOCSIFFLAGS")
}

fn add_default_route(sock: &OwnedFd, gateway: Ipv4Addr) -> io::Result<()> {
    // SAFETY: rtentry is plain old data; all-zero bytes are a valid value
    // (null pointers for rt_dev, which lets the kernel pick the device).
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = sockaddr_in(gateway);
    rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads one `rtentry` through the pointer, which
    // points to a live local; its rt_dev is null.
    let rc = unsafe {
        libc::ioctl(
            sock.as_raw_fd(),
            libc::SIOCADDRT,
            &mut rt as *mut libc::rtentry,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EEXIST) {
            return Ok(());
        }
        return Err(io::Error::new(e.kind(), format!("SIOCADDRT: {e}")));
    }
    Ok(())
}

fn set_mtu(sock: &OwnedFd, ifname: &str, mtu: u32) -> io::Result<()> {
    let mut req = ifreq(ifname)?;
    req.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl_ifreq(sock, libc::SIOCSIFMTU, &mut req, "SIOCSIFMTU")
}

/// Bring `lo` up.
pub fn loopback_up() -> io::Result<()> {
    let sock = inet_socket()?;
    link_up(&sock, "lo")
}

/// Bring `lo` and `eth0` up with the slirp addresses and a default route,
/// `eth0` with `mtu` when given. Waits up to `wait` for `eth0` to appear.
pub fn configure(wait: Duration, mtu: Option<u32>) -> io::Result<()> {
    let sock = inet_socket()?;
    link_up(&sock, "lo").map_err(|e| io::Error::new(e.kind(), format!("lo: {e}")))?;
    debug!("lo up");
    let start = Instant::now();
    while !Path::new("/sys/class/net/eth0").exists() {
        if start.elapsed() > wait {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "eth0 did not appear within {} s (is virtio_net loaded?)",
                    wait.as_secs()
                ),
            ));
        }
        std::thread::sleep(timeouts::STATE_POLL);
    }
    set_addr(
        &sock,
        "eth0",
        libc::SIOCSIFADDR,
        GUEST_ADDR,
        "eth0 SIOCSIFADDR",
    )?;
    set_addr(
        &sock,
        "eth0",
        libc::SIOCSIFNETMASK,
        NETMASK,
        "eth0 SIOCSIFNETMASK",
    )?;
    if let Some(mtu) = mtu {
        // A failure costs throughput, not connectivity: go on.
        match set_mtu(&sock, "eth0", mtu) {
            Ok(()) => debug!("eth0 mtu {mtu}"),
            Err(e) => debug!("eth0 mtu {mtu}: {e}"),
        }
    }
    link_up(&sock, "eth0").map_err(|e| io::Error::new(e.kind(), format!("eth0: {e}")))?;
    debug!("eth0 {GUEST_ADDR}/24 up");
    add_default_route(&sock, GATEWAY)?;
    debug!("default route via {GATEWAY}");
    Ok(())
}

/// What to do with `/etc/resolv.conf`.
///
/// The guest's only network is QEMU user networking, whose resolver is
/// 10.0.2.3, so whatever an image carries (often the resolver of the host
/// that built it) is replaced, unless the file says `# machinen: keep`.
#[derive(Debug, PartialEq, Eq)]
pub enum ResolvAction {
    /// Already ours, or marked `# machinen: keep`: leave it alone.
    Keep,
    /// Missing, empty or naming another resolver: write ours.
    Write,
    /// A symlink (e.g. to systemd-resolved's stub, not running here):
    /// replace the link itself with a file of ours.
    ReplaceSymlink,
}

/// Marker line that keeps an image's own resolv.conf.
pub const KEEP_MARKER: &str = "# machinen: keep";

pub fn resolv_action(path: &Path) -> ResolvAction {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return ResolvAction::Write;
    };
    if meta.file_type().is_symlink() {
        let keep =
            std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.trim() == KEEP_MARKER));
        return if keep {
            ResolvAction::Keep
        } else {
            ResolvAction::ReplaceSymlink
        };
    }
    match std::fs::read_to_string(path) {
        Ok(t) if t == RESOLV_CONF || t.lines().any(|l| l.trim() == KEEP_MARKER) => {
            ResolvAction::Keep
        }
        Ok(_) => ResolvAction::Write,
        // Unreadable (a directory, say): not ours to fix.
        Err(e) if e.kind() == io::ErrorKind::InvalidData => ResolvAction::Write,
        Err(_) => ResolvAction::Keep,
    }
}

pub const RESOLV_CONF: &str = "nameserver 10.0.2.3\n";

/// Make sure `path` names a resolver; returns what was done.
pub fn ensure_resolv_conf(path: &Path) -> io::Result<ResolvAction> {
    let action = resolv_action(path);
    match action {
        ResolvAction::Keep => {}
        ResolvAction::Write => std::fs::write(path, RESOLV_CONF)?,
        ResolvAction::ReplaceSymlink => {
            std::fs::remove_file(path)?;
            std::fs::write(path, RESOLV_CONF)?;
        }
    }
    Ok(action)
}

/// Set the hostname (UTS namespace).
pub fn set_hostname(name: &str) {
    match nix::unistd::sethostname(name) {
        Ok(()) => debug!("hostname {name}"),
        Err(e) => error!("sethostname {name}: {e}"),
    }
}

/// The current hostname, or "" if unavailable.
pub fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("machinen-agent-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    #[test]
    fn resolv_conf_decisions() {
        let d = tmpdir("resolv");
        let p = d.join("resolv.conf");
        assert_eq!(resolv_action(&p), ResolvAction::Write, "missing");
        std::fs::write(&p, "").expect("write");
        assert_eq!(resolv_action(&p), ResolvAction::Write, "empty");
        std::fs::write(&p, "nameserver 10.255.255.53\n").expect("write");
        assert_eq!(
            resolv_action(&p),
            ResolvAction::Write,
            "the build host's resolver is useless here"
        );
        std::fs::write(&p, RESOLV_CONF).expect("write");
        assert_eq!(resolv_action(&p), ResolvAction::Keep, "already ours");
        std::fs::write(&p, "# machinen: keep\nnameserver 1.1.1.1\n").expect("write");
        assert_eq!(resolv_action(&p), ResolvAction::Keep, "marked");
        std::fs::remove_file(&p).expect("rm");
        std::os::unix::fs::symlink(d.join("nowhere/stub-resolv.conf"), &p).expect("symlink");
        assert_eq!(resolv_action(&p), ResolvAction::ReplaceSymlink, "dangling");
        std::fs::remove_file(&p).expect("rm");
        std::fs::write(d.join("real"), "nameserver 9.9.9.9\n").expect("write");
        std::os::unix::fs::symlink(d.join("real"), &p).expect("symlink");
        assert_eq!(
            resolv_action(&p),
            ResolvAction::ReplaceSymlink,
            "symlink to another resolver"
        );
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn resolv_conf_is_written() {
        let d = tmpdir("resolv-write");
        let p = d.join("resolv.conf");
        std::os::unix::fs::symlink("/nonexistent/stub-resolv.conf", &p).expect("symlink");
        assert_eq!(
            ensure_resolv_conf(&p).expect("ensure"),
            ResolvAction::ReplaceSymlink
        );
        assert!(!std::fs::symlink_metadata(&p)
            .expect("meta")
            .file_type()
            .is_symlink());
        assert_eq!(std::fs::read_to_string(&p).expect("read"), RESOLV_CONF);
        assert_eq!(ensure_resolv_conf(&p).expect("ensure"), ResolvAction::Keep);
        std::fs::write(&p, "nameserver 8.8.8.8\n").expect("write");
        assert_eq!(ensure_resolv_conf(&p).expect("ensure"), ResolvAction::Write);
        assert_eq!(std::fs::read_to_string(&p).expect("read"), RESOLV_CONF);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn ifreq_names() {
        assert!(ifreq("eth0").is_ok());
        assert!(ifreq("").is_err());
        assert!(ifreq("a-very-long-interface-name").is_err());
    }
}
