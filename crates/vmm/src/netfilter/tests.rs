//! The relay against socket pairs standing in for QEMU and passt, and a
//! UDP socket standing in for the host's nameserver.

use std::io::Write;
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use etherparse::PacketBuilder;
use machinen_proto::netpolicy::{Egress, NetPolicy, Rule};
use simple_dns::{rdata::A, Name, Packet, Question, ResourceRecord, CLASS, QCLASS, QTYPE, TYPE};

use super::*;

const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const GW: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

struct Rig {
    net: Arc<Net>,
    /// QEMU's end: what the guest sends and receives.
    guest: UnixStream,
    /// passt's end: what reaches the world.
    world: UnixStream,
}

fn rig(policy: NetPolicy, upstreams: Vec<SocketAddr>) -> Rig {
    let (guest, filter_guest) = UnixStream::pair().expect("pair");
    let (world, filter_world) = UnixStream::pair().expect("pair");
    for s in [&guest, &world] {
        s.set_read_timeout(Some(Duration::from_millis(1500)))
            .expect("timeout");
    }
    let net = Net::with_upstreams(policy, upstreams);
    net.start(filter_guest, filter_world).expect("start");
    Rig { net, guest, world }
}

fn put(s: &mut UnixStream, frame: &[u8]) {
    s.write_all(&(frame.len() as u32).to_be_bytes())
        .expect("len");
    s.write_all(frame).expect("frame");
}

fn get(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    match read_frame(s, &mut buf) {
        Ok(true) => Some(buf),
        _ => None,
    }
}

fn syn(dst: [u8; 4], port: u16) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(GUEST, GW)
        .ipv4([10, 0, 2, 15], dst, 64)
        .tcp(40000, port, 7, 64240)
        .syn();
    let mut v = Vec::new();
    b.write(&mut v, &[]).expect("write");
    v
}

fn rules(s: &[&str]) -> Vec<Rule> {
    s.iter().map(|r| r.parse().expect("rule")).collect()
}

fn is_reset(frame: &[u8]) -> bool {
    matches!(frames::parse(frame), Parsed::Ip(p) if p.tcp.is_some_and(|t| t.rst))
}

#[test]
fn allowed_packets_pass_refused_ones_are_reset_and_counted() {
    let mut r = rig(
        NetPolicy {
            egress: Egress::Deny,
            allow: rules(&["192.0.2.0/24:80"]),
            deny: vec![],
        },
        vec![],
    );
    let ok = syn([192, 0, 2, 5], 80);
    put(&mut r.guest, &ok);
    assert_eq!(get(&mut r.world).as_deref(), Some(&ok[..]));
    put(&mut r.guest, &syn([192, 0, 2, 5], 81));
    let answer = get(&mut r.guest).expect("a reset");
    assert!(is_reset(&answer));
    // Replies from the world reach the guest and are counted.
    put(&mut r.world, &ok);
    assert_eq!(get(&mut r.guest).as_deref(), Some(&ok[..]));
    let c = r.net.report().counters;
    assert_eq!((c.connections, c.refused, c.packets_in), (1, 1, 1));
    assert_eq!(c.refused_by[0].destination, "192.0.2.5:81");
    assert_eq!(c.refused_by[0].rule, "default deny");

    // A policy change applies to the next packet.
    r.net.set_policy(NetPolicy {
        egress: Egress::Allow,
        allow: vec![],
        deny: rules(&["192.0.2.5"]),
    });
    put(&mut r.guest, &ok);
    assert!(is_reset(&get(&mut r.guest).expect("reset")));
    let c = r.net.report().counters;
    assert!(
        c.refused_by.iter().any(|k| k.rule == "deny 192.0.2.5"),
        "{c:?}"
    );
}

#[test]
fn a_frame_longer_than_any_mtu_ends_the_link() {
    let mut r = rig(NetPolicy::default(), vec![]);
    r.guest.write_all(&(1u32 << 24).to_be_bytes()).expect("len");
    // The filter closes passt's side: the world sees the end.
    assert!(get(&mut r.world).is_none());
}

fn dns_query(name: &str) -> Vec<u8> {
    let mut q = Packet::new_query(77);
    q.questions.push(Question::new(
        Name::new_unchecked(name),
        QTYPE::TYPE(TYPE::A),
        QCLASS::CLASS(CLASS::IN),
        false,
    ));
    let payload = q.build_bytes_vec().expect("query");
    let b = PacketBuilder::ethernet2(GUEST, GW)
        .ipv4([10, 0, 2, 15], [10, 0, 2, 3], 64)
        .udp(5353, 53);
    let mut v = Vec::new();
    b.write(&mut v, &payload).expect("write");
    v
}

fn dns_payload(frame: &[u8]) -> Packet<'_> {
    let Parsed::Ip(p) = frames::parse(frame) else {
        panic!("not ip")
    };
    Packet::parse(p.udp_payload).expect("dns")
}

#[test]
fn names_resolve_through_the_policy_and_their_addresses_are_let_through() {
    // A nameserver that answers every query with 198.51.100.7.
    let ns = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let ns_addr = ns.local_addr().expect("addr");
    std::thread::spawn(move || {
        let mut buf = [0u8; 1500];
        while let Ok((n, from)) = ns.recv_from(&mut buf) {
            let q = Packet::parse(&buf[..n]).expect("query");
            let mut a = Packet::new_reply(q.id());
            a.questions = q.questions.clone();
            a.answers.push(ResourceRecord::new(
                q.questions[0].qname.clone(),
                CLASS::IN,
                30,
                RData::A(A {
                    address: u32::from(Ipv4Addr::new(198, 51, 100, 7)),
                }),
            ));
            let _ = ns.send_to(&a.build_bytes_vec().expect("answer"), from);
        }
    });
    use simple_dns::rdata::RData;
    let mut r = rig(
        NetPolicy {
            egress: Egress::Deny,
            allow: rules(&["*.allowed.test:443"]),
            deny: vec![],
        },
        vec![ns_addr],
    );
    // Before any lookup the address is nobody's: refused.
    put(&mut r.guest, &syn([198, 51, 100, 7], 443));
    assert!(is_reset(&get(&mut r.guest).expect("reset")));
    // A refused name gets NXDOMAIN from the filter itself.
    put(&mut r.guest, &dns_query("evil.test"));
    let nx = get(&mut r.guest).expect("nxdomain");
    assert_eq!(dns_payload(&nx).rcode(), simple_dns::RCODE::NameError);
    // An allowed name is answered by the nameserver...
    put(&mut r.guest, &dns_query("api.allowed.test"));
    let ans = get(&mut r.guest).expect("answer");
    assert_eq!(dns_payload(&ans).answers.len(), 1);
    // ...and its address now passes, on the rule's port only.
    let ok = syn([198, 51, 100, 7], 443);
    put(&mut r.guest, &ok);
    assert_eq!(get(&mut r.world).as_deref(), Some(&ok[..]));
    put(&mut r.guest, &syn([198, 51, 100, 7], 80));
    assert!(is_reset(&get(&mut r.guest).expect("reset")));
    let c = r.net.report().counters;
    assert_eq!((c.dns_answered, c.dns_refused), (1, 1));
    assert!(c
        .refused_by
        .iter()
        .any(|k| k.proto == "dns" && k.destination == "evil.test"));
    // No DNS frame ever reached passt.
    r.world
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    assert!(get(&mut r.world).is_none());
}

/// Guest frames are untrusted input: arbitrary bytes and mutations of
/// valid packets go through every parser the filter runs on them.
/// `PROPTEST_CASES=N cargo test -p machinen-vmm fuzz_` runs longer.
mod fuzz {
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;

    use super::*;

    /// Valid frames of each kind the filter reads, to mutate.
    fn seeds() -> Vec<Vec<u8>> {
        let udp = {
            let b = PacketBuilder::ethernet2(GUEST, GW)
                .ipv4([10, 0, 2, 15], [10, 0, 2, 3], 64)
                .udp(5353, 53);
            let q = dns_query("api.example.com");
            let mut v = Vec::new();
            b.write(&mut v, &q).expect("write");
            v
        };
        let v6 = {
            let b = PacketBuilder::ethernet2(GUEST, GW)
                .ipv6([0xfd; 16], [0x20; 16], 64)
                .tcp(1, 443, 9, 100)
                .syn();
            let mut v = Vec::new();
            b.write(&mut v, b"x").expect("write");
            v
        };
        vec![syn([192, 0, 2, 5], 80), udp, v6]
    }

    fn judge(frame: &[u8]) {
        if let Parsed::Ip(p) = frames::parse(frame) {
            let _ = frames::refusal(&p);
            let _ = frames::udp_reply(&p.hop(), p.udp_payload);
            let _ = dns::question(p.udp_payload);
            let _ = dns::empty_answer(p.udp_payload, simple_dns::RCODE::NameError);
            let _ = dns::addresses(p.udp_payload);
        }
    }

    proptest! {
        #[test]
        fn fuzz_arbitrary_frames_never_panic(frame in proptest::collection::vec(any::<u8>(), 0..1600)) {
            judge(&frame);
            let _ = dns::question(&frame);
            let _ = dns::addresses(&frame);
        }

        #[test]
        fn fuzz_mutated_packets_never_panic(
            seed in 0usize..3,
            flips in proptest::collection::vec((any::<u16>(), any::<u8>()), 1..12),
            cut in any::<u16>(),
        ) {
            let mut f = seeds()[seed].clone();
            for (at, b) in flips {
                let n = f.len();
                f[at as usize % n] = b;
            }
            f.truncate(cut as usize % (f.len() + 1) + 14.min(f.len()));
            judge(&f);
        }
    }

    /// A live relay fed garbage keeps judging: after a burst of mutated
    /// frames, a refused SYN is still reset and an allowed one still passes.
    #[test]
    fn fuzz_relay_survives_garbage() {
        let mut r = rig(
            NetPolicy {
                egress: Egress::Deny,
                allow: rules(&["192.0.2.0/24:80"]),
                deny: vec![],
            },
            vec![],
        );
        // passt's side is read all along, as passt would: frames the
        // filter cannot place (unknown ethertypes) pass to it.
        let (tx, passed) = std::sync::mpsc::channel();
        let mut world = r.world.try_clone().expect("clone");
        world.set_read_timeout(None).expect("timeout");
        std::thread::spawn(move || {
            while let Some(f) = get(&mut world) {
                if tx.send(f).is_err() {
                    break;
                }
            }
        });
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let gen = proptest::collection::vec(any::<u8>(), 0..400);
        for _ in 0..300 {
            let junk = gen.new_tree(&mut runner).expect("value").current();
            put(&mut r.guest, &junk);
        }
        for seed in seeds() {
            let mut f = seed;
            let n = f.len();
            f[n / 2] ^= 0xff;
            put(&mut r.guest, &f);
        }
        let probe = syn([198, 51, 100, 1], 80);
        put(&mut r.guest, &probe);
        // Answers to the garbage come first; the probe's reset is the one
        // that acknowledges its sequence number.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                std::time::Instant::now() < deadline,
                "no reset for the probe"
            );
            let f = get(&mut r.guest).expect("the relay still answers");
            if let Parsed::Ip(p) = frames::parse(&f) {
                if p.src == "198.51.100.1".parse::<IpAddr>().expect("ip")
                    && p.tcp.is_some_and(|t| t.rst && t.ack_no == 8)
                {
                    break;
                }
            }
        }
        let ok = syn([192, 0, 2, 5], 80);
        put(&mut r.guest, &ok);
        loop {
            let f = passed
                .recv_timeout(Duration::from_secs(10))
                .expect("the allowed SYN reaches passt");
            if f == ok {
                break;
            }
        }
        assert!(r.net.report().counters.refused >= 1);
    }
}
