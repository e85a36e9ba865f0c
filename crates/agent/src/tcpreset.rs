//! Reset the guest's TCP connections (after a fork): list them through
//! `NETLINK_SOCK_DIAG` and destroy each with `SOCK_DESTROY`, which sends the
//! peer a reset and fails the local socket with `ECONNABORTED`. Listening
//! sockets are kept. Needs `CONFIG_INET_DIAG_DESTROY` in the guest kernel.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NLMSG_HDR: usize = 16;
/// `struct inet_diag_sockid`: ports, addresses, interface, cookie.
const SOCKID_LEN: usize = 48;
/// `struct inet_diag_req_v2`.
const REQ_LEN: usize = 8 + SOCKID_LEN;
/// Connection states worth resetting: every TCP state but LISTEN (10),
/// CLOSE (7) and TIME_WAIT (6).
const STATES: u32 =
    (1 << 1) | (1 << 2) | (1 << 3) | (1 << 4) | (1 << 5) | (1 << 8) | (1 << 9) | (1 << 11);

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the result is checked before being owned.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn message(
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    states: u32,
    id: &[u8; SOCKID_LEN],
) -> Vec<u8> {
    let len = NLMSG_HDR + REQ_LEN;
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(&(len as u32).to_ne_bytes());
    m.extend_from_slice(&kind.to_ne_bytes());
    m.extend_from_slice(&flags.to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    m.extend_from_slice(&[family, libc::IPPROTO_TCP as u8, 0, 0]);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(id);
    m
}

fn send(fd: &OwnedFd, msg: &[u8]) -> io::Result<()> {
    // SAFETY: `msg` is a live buffer of the given length; the kernel is the
    // default destination of an unbound netlink socket.
    let n = unsafe { libc::send(fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, writable buffer of the given length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Walk the netlink messages in `buf`: (type, payload).
fn messages(buf: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let len = u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 4], buf[off + 5]]);
        if len < NLMSG_HDR || off + len > buf.len() {
            break;
        }
        out.push((kind, &buf[off + NLMSG_HDR..off + len]));
        off += (len + 3) & !3;
    }
    out
}

fn error_of(payload: &[u8]) -> i32 {
    payload
        .get(..4)
        .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(-libc::EPROTO)
}

/// Socket ids of the TCP connections of one address family.
fn list(fd: &OwnedFd, family: u8) -> io::Result<Vec<[u8; SOCKID_LEN]>> {
    send(
        fd,
        &message(
            SOCK_DIAG_BY_FAMILY,
            NLM_F_REQUEST | NLM_F_DUMP,
            1,
            family,
            STATES,
            &[0; SOCKID_LEN],
        ),
    )?;
    let mut ids = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = recv(fd, &mut buf)?;
        for (kind, payload) in messages(&buf[..n]) {
            match kind {
                NLMSG_DONE => return Ok(ids),
                NLMSG_ERROR => {
                    let e = error_of(payload);
                    // No diag handler for this family (IPv6 off): nothing to reset.
                    if -e == libc::ENOENT && family == libc::AF_INET6 as u8 {
                        return Ok(ids);
                    }
                    return Err(io::Error::from_raw_os_error(-e));
                }
                SOCK_DIAG_BY_FAMILY => {
                    // struct inet_diag_msg: family, state, timer, retrans, then the id.
                    if let Some(id) = payload.get(4..4 + SOCKID_LEN) {
                        let mut a = [0u8; SOCKID_LEN];
                        a.copy_from_slice(id);
                        ids.push(a);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Destroy every non-listening TCP socket; returns how many were reset.
pub fn reset_all() -> io::Result<u32> {
    let fd = netlink_socket()?;
    let mut count = 0;
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let ids = list(&fd, family)?;
        for (i, id) in ids.iter().enumerate() {
            send(
                &fd,
                &message(
                    SOCK_DESTROY,
                    NLM_F_REQUEST | NLM_F_ACK,
                    2 + i as u32,
                    family,
                    STATES,
                    id,
                ),
            )?;
            let mut buf = [0u8; 512];
            let n = recv(&fd, &mut buf)?;
            for (kind, payload) in messages(&buf[..n]) {
                if kind == NLMSG_ERROR {
                    match error_of(payload) {
                        0 => count += 1,
                        e if -e == libc::ENOENT => {} // closed meanwhile
                        e => return Err(io::Error::from_raw_os_error(-e)),
                    }
                }
            }
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout() {
        let m = message(
            SOCK_DESTROY,
            NLM_F_REQUEST | NLM_F_ACK,
            7,
            2,
            STATES,
            &[9; SOCKID_LEN],
        );
        assert_eq!(m.len(), 72);
        assert_eq!(u32::from_ne_bytes([m[0], m[1], m[2], m[3]]), 72);
        assert_eq!(m[16], 2);
        assert_eq!(m[17], libc::IPPROTO_TCP as u8);
        assert_eq!(&m[24..], &[9; SOCKID_LEN]);
    }

    #[test]
    fn message_walk_is_bounded() {
        let m = message(SOCK_DIAG_BY_FAMILY, 0, 1, 2, 0, &[0; SOCKID_LEN]);
        assert_eq!(messages(&m).len(), 1);
        assert!(
            messages(&m[..20]).is_empty(),
            "truncated message is not read"
        );
        let mut bad = m.clone();
        bad[0] = 3; // length below the header size
        assert!(messages(&bad).is_empty());
    }

    #[test]
    fn listing_works_on_the_host() {
        // Unprivileged listing is allowed; destroying needs CAP_NET_ADMIN.
        let _l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let fd = netlink_socket().expect("netlink");
        assert!(list(&fd, libc::AF_INET as u8).is_ok());
    }
}
