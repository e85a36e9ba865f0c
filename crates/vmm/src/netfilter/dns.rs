//! The runtime's resolver: the guest's DNS queries are answered here, on
//! the host, so that the policy decides which names resolve and the filter
//! learns which addresses those names stand for.
//!
//! A query for a name the policy allows is sent as it is to the host's
//! nameservers (`/etc/resolv.conf`, as the supervisor sees it) and their
//! answer goes back to the guest; its A and AAAA records are remembered as
//! that name's addresses. A query for a refused name is answered NXDOMAIN
//! without leaving the host.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use simple_dns::{rdata::RData, Packet, PacketFlag, RCODE};

/// The first question of a standard query, and its name (lower case, no
/// trailing dot). `None`: not a query this resolver answers.
pub fn question(query: &[u8]) -> Option<String> {
    let p = Packet::parse(query).ok()?;
    if p.has_flags(PacketFlag::RESPONSE) || p.questions.len() != 1 {
        return None;
    }
    let name = p.questions[0].qname.to_string();
    Some(name.trim_end_matches('.').to_ascii_lowercase())
}

/// An answer to `query` with `rcode` and no records.
pub fn empty_answer(query: &[u8], rcode: RCODE) -> Option<Vec<u8>> {
    let q = Packet::parse(query).ok()?;
    let mut r = Packet::new_reply(q.id());
    r.questions = q.questions.clone();
    *r.rcode_mut() = rcode;
    r.set_flags(PacketFlag::RECURSION_AVAILABLE);
    if q.has_flags(PacketFlag::RECURSION_DESIRED) {
        r.set_flags(PacketFlag::RECURSION_DESIRED);
    }
    r.build_bytes_vec().ok()
}

/// The addresses and the shortest TTL an answer gives.
pub fn addresses(answer: &[u8]) -> Vec<IpAddr> {
    let Ok(p) = Packet::parse(answer) else {
        return Vec::new();
    };
    p.answers
        .iter()
        .filter_map(|rr| match &rr.rdata {
            RData::A(a) => Some(IpAddr::V4(a.address.into())),
            RData::AAAA(a) => Some(IpAddr::V6(a.address.into())),
            _ => None,
        })
        .collect()
}

/// The nameservers of `resolv_conf` (at most three, port 53).
pub fn upstreams(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            (w.next() == Some("nameserver")).then_some(())?;
            // A scoped IPv6 address (`fe80::1%eth0`) is not parsed; skip it.
            let ip: IpAddr = w.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .take(3)
        .collect()
}

/// Ask each upstream in turn, for up to `timeout` in all; the first answer
/// to this query (same ID) wins.
pub fn forward(upstreams: &[SocketAddr], query: &[u8], timeout: Duration) -> Option<Vec<u8>> {
    let id = query.get(..2)?;
    let deadline = Instant::now() + timeout;
    let per = timeout / u32::try_from(upstreams.len().max(1)).unwrap_or(1);
    for up in upstreams {
        let bind: SocketAddr = if up.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let Ok(sock) = UdpSocket::bind(bind) else {
            continue;
        };
        if sock.connect(up).is_err() || sock.send(query).is_err() {
            continue;
        }
        let until = (Instant::now() + per).min(deadline);
        let mut buf = vec![0u8; 65535];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || sock.set_read_timeout(Some(left)).is_err() {
                break;
            }
            match sock.recv(&mut buf) {
                Ok(n) if buf.get(..2) == Some(id) && n >= 12 => {
                    buf.truncate(n);
                    return Some(buf);
                }
                Ok(_) => continue,
                Err(_) => break,
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use simple_dns::{rdata::A, Name, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

    fn query(name: &str) -> Vec<u8> {
        let mut q = Packet::new_query(0x1234);
        q.set_flags(PacketFlag::RECURSION_DESIRED);
        q.questions.push(Question::new(
            Name::new_unchecked(name),
            QTYPE::TYPE(TYPE::A),
            QCLASS::CLASS(CLASS::IN),
            false,
        ));
        q.build_bytes_vec().expect("build")
    }

    #[test]
    fn questions_refusals_and_answers_are_read_and_written() {
        let q = query("Api.Example.COM.");
        assert_eq!(question(&q).as_deref(), Some("api.example.com"));
        assert_eq!(question(&[1, 2, 3]), None);
        let nx = empty_answer(&q, RCODE::NameError).expect("nx");
        let p = Packet::parse(&nx).expect("parse");
        assert_eq!(p.id(), 0x1234);
        assert_eq!(p.rcode(), RCODE::NameError);
        assert!(p.has_flags(PacketFlag::RESPONSE));
        assert_eq!(p.questions.len(), 1);
        // A response is not a question.
        assert_eq!(question(&nx), None);

        let mut a = Packet::new_reply(0x1234);
        a.answers.push(ResourceRecord::new(
            Name::new_unchecked("api.example.com"),
            CLASS::IN,
            60,
            RData::A(A {
                address: u32::from(std::net::Ipv4Addr::new(192, 0, 2, 7)),
            }),
        ));
        let bytes = a.build_bytes_vec().expect("build");
        assert_eq!(
            addresses(&bytes),
            vec!["192.0.2.7".parse::<IpAddr>().expect("ip")]
        );
    }

    #[test]
    fn nameservers_come_from_resolv_conf() {
        let ups = upstreams(
            "# comment\nnameserver 10.0.0.53\nsearch x\nnameserver fe80::1%eth0\nnameserver ::1\n",
        );
        assert_eq!(
            ups,
            vec![
                "10.0.0.53:53".parse::<SocketAddr>().expect("addr"),
                "[::1]:53".parse().expect("addr")
            ]
        );
    }

    #[test]
    fn a_silent_upstream_gives_no_answer_within_the_timeout() {
        // A bound socket that never answers.
        let quiet = UdpSocket::bind("127.0.0.1:0").expect("bind");
        let t = Instant::now();
        let got = forward(
            &[quiet.local_addr().expect("addr")],
            &query("x.test"),
            Duration::from_millis(300),
        );
        assert!(got.is_none());
        assert!(t.elapsed() < Duration::from_secs(2));
    }
}
