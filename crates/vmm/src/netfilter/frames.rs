//! Reading the guest's Ethernet frames and writing the ones the filter
//! answers with (refusals, DNS answers), with `etherparse`.

use std::net::IpAddr;

use etherparse::{
    icmpv4, icmpv6, Icmpv4Type, Icmpv6Type, LinkSlice, NetSlice, PacketBuilder, SlicedPacket,
    TransportSlice,
};

/// The IP protocols the policy tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
    Icmp,
    /// Any other IP protocol (judged by address, without a port).
    Other,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
            Proto::Icmp => "icmp",
            Proto::Other => "ip",
        }
    }
}

/// What the filter needs to know about one guest frame.
#[derive(Debug)]
pub enum Parsed<'a> {
    /// Not IP (ARP), or IP that stays on the virtual link (broadcast,
    /// multicast, link-local): passed through.
    Local,
    /// An IP packet leaving the guest.
    Ip(Packet<'a>),
    /// A frame the filter cannot read: dropped unless the policy is open.
    Malformed,
}

/// Who sent a packet to whom: what an answer from its destination needs.
#[derive(Debug, Clone, Copy)]
pub struct Hop {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: Option<u16>,
}

#[derive(Debug)]
pub struct Packet<'a> {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: Proto,
    pub src_port: u16,
    /// `None` for ICMP, other protocols and non-first fragments.
    pub dst_port: Option<u16>,
    /// The IP packet (header and payload), for ICMP errors that quote it.
    pub ip: &'a [u8],
    pub tcp: Option<TcpBits>,
    /// A UDP datagram's payload.
    pub udp_payload: &'a [u8],
}

/// The TCP fields a reset needs.
#[derive(Debug, Clone, Copy)]
pub struct TcpBits {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
    pub fin: bool,
    pub seq: u32,
    pub ack_no: u32,
    pub payload_len: u32,
}

const ETH_HEADER: usize = 14;

fn stays_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => a.is_broadcast() || a.is_multicast() || a.is_link_local(),
        IpAddr::V6(a) => a.is_multicast() || (a.segments()[0] & 0xffc0) == 0xfe80,
    }
}

pub fn parse(frame: &[u8]) -> Parsed<'_> {
    let Ok(p) = SlicedPacket::from_ethernet(frame) else {
        return Parsed::Malformed;
    };
    let Some(LinkSlice::Ethernet2(eth)) = &p.link else {
        return Parsed::Malformed;
    };
    if !p.link_exts.is_empty() {
        return Parsed::Malformed;
    }
    let (src, dst, fragment) = match &p.net {
        None | Some(NetSlice::Arp(_)) => return Parsed::Local,
        Some(NetSlice::Ipv4(v4)) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
            v4.payload().fragmented,
        ),
        Some(NetSlice::Ipv6(v6)) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
            v6.payload().fragmented,
        ),
    };
    if stays_local(dst) {
        return Parsed::Local;
    }
    let mut pkt = Packet {
        src_mac: eth.source(),
        dst_mac: eth.destination(),
        src,
        dst,
        proto: Proto::Other,
        src_port: 0,
        dst_port: None,
        ip: &frame[ETH_HEADER..],
        tcp: None,
        udp_payload: &[],
    };
    match &p.transport {
        Some(TransportSlice::Tcp(t)) if !fragment => {
            pkt.proto = Proto::Tcp;
            pkt.src_port = t.source_port();
            pkt.dst_port = Some(t.destination_port());
            pkt.tcp = Some(TcpBits {
                syn: t.syn(),
                ack: t.ack(),
                rst: t.rst(),
                fin: t.fin(),
                seq: t.sequence_number(),
                ack_no: t.acknowledgment_number(),
                payload_len: t.payload().len() as u32,
            });
        }
        Some(TransportSlice::Udp(u)) if !fragment => {
            pkt.proto = Proto::Udp;
            pkt.src_port = u.source_port();
            pkt.dst_port = Some(u.destination_port());
            pkt.udp_payload = u.payload();
        }
        Some(TransportSlice::Icmpv4(_)) | Some(TransportSlice::Icmpv6(_)) => {
            pkt.proto = Proto::Icmp;
        }
        _ => {}
    }
    Parsed::Ip(pkt)
}

/// Serialise a built packet (`size` bytes).
fn emit<E>(size: usize, write: impl FnOnce(&mut Vec<u8>) -> Result<(), E>) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(size);
    write(&mut out).ok()?;
    Some(out)
}

/// The frame that refuses `pkt` at once, seen from its destination: a TCP
/// reset (the connect fails with ECONNREFUSED, an open connection ends),
/// or an ICMP "administratively prohibited" for anything else. `None`: no
/// answer (a reset is never answered).
pub fn refusal(pkt: &Packet<'_>) -> Option<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(pkt.dst_mac, pkt.src_mac);
    if let (Proto::Tcp, Some(t), Some(dport)) = (pkt.proto, pkt.tcp, pkt.dst_port) {
        if t.rst {
            return None;
        }
        // A SYN is answered with RST|ACK acknowledging it; a segment of an
        // open connection with a RST at the sequence number it expects.
        let (seq, ack) = if t.ack {
            (t.ack_no, None)
        } else {
            let consumed = t.payload_len + u32::from(t.syn) + u32::from(t.fin);
            (0, Some(t.seq.wrapping_add(consumed)))
        };
        return match (pkt.dst, pkt.src) {
            (IpAddr::V4(d), IpAddr::V4(s)) => {
                let b = eth
                    .ipv4(d.octets(), s.octets(), 64)
                    .tcp(dport, pkt.src_port, seq, 0);
                let b = match ack {
                    Some(a) => b.rst().ack(a),
                    None => b.rst(),
                };
                emit(b.size(0), |o| b.write(o, &[]))
            }
            (IpAddr::V6(d), IpAddr::V6(s)) => {
                let b = eth
                    .ipv6(d.octets(), s.octets(), 64)
                    .tcp(dport, pkt.src_port, seq, 0);
                let b = match ack {
                    Some(a) => b.rst().ack(a),
                    None => b.rst(),
                };
                emit(b.size(0), |o| b.write(o, &[]))
            }
            _ => None,
        };
    }
    match (pkt.dst, pkt.src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => {
            // The quoted packet: its header and the first 8 bytes after it.
            let ihl = usize::from(pkt.ip.first()? & 0x0f) * 4;
            let quote = &pkt.ip[..pkt.ip.len().min(ihl + 8)];
            let b =
                eth.ipv4(d.octets(), s.octets(), 64)
                    .icmpv4(Icmpv4Type::DestinationUnreachable(
                        icmpv4::DestUnreachableHeader::FilterProhibited,
                    ));
            emit(b.size(quote.len()), |o| b.write(o, quote))
        }
        (IpAddr::V6(d), IpAddr::V6(s)) => {
            let quote = &pkt.ip[..pkt.ip.len().min(1232 - 48)];
            let b =
                eth.ipv6(d.octets(), s.octets(), 64)
                    .icmpv6(Icmpv6Type::DestinationUnreachable(
                        icmpv6::DestUnreachableCode::Prohibited,
                    ));
            emit(b.size(quote.len()), |o| b.write(o, quote))
        }
        _ => None,
    }
}

impl Packet<'_> {
    pub fn hop(&self) -> Hop {
        Hop {
            src_mac: self.src_mac,
            dst_mac: self.dst_mac,
            src: self.src,
            dst: self.dst,
            src_port: self.src_port,
            dst_port: self.dst_port,
        }
    }
}

/// A UDP datagram answering `pkt` (a DNS answer from where it was sent).
pub fn udp_reply(pkt: &Hop, payload: &[u8]) -> Option<Vec<u8>> {
    let eth = PacketBuilder::ethernet2(pkt.dst_mac, pkt.src_mac);
    let sport = pkt.dst_port?;
    match (pkt.dst, pkt.src) {
        (IpAddr::V4(d), IpAddr::V4(s)) => {
            let b = eth
                .ipv4(d.octets(), s.octets(), 64)
                .udp(sport, pkt.src_port);
            emit(b.size(payload.len()), |o| b.write(o, payload))
        }
        (IpAddr::V6(d), IpAddr::V6(s)) => {
            let b = eth
                .ipv6(d.octets(), s.octets(), 64)
                .udp(sport, pkt.src_port);
            emit(b.size(payload.len()), |o| b.write(o, payload))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const GW: [u8; 6] = [0x9a, 0x55, 0x9a, 0x55, 0x9a, 0x55];

    pub fn syn(dst: [u8; 4], port: u16) -> Vec<u8> {
        let b = PacketBuilder::ethernet2(GUEST, GW)
            .ipv4([10, 0, 2, 15], dst, 64)
            .tcp(40000, port, 1000, 64240)
            .syn();
        let mut v = Vec::new();
        b.write(&mut v, &[]).expect("write");
        v
    }

    #[test]
    fn a_refused_syn_gets_a_reset_that_acknowledges_it() {
        let f = syn([192, 0, 2, 9], 443);
        let Parsed::Ip(p) = parse(&f) else {
            panic!("not ip")
        };
        assert_eq!(p.proto, Proto::Tcp);
        assert_eq!(p.dst_port, Some(443));
        let r = refusal(&p).expect("a reset");
        let Parsed::Ip(back) = parse(&r) else {
            panic!("reset unreadable")
        };
        let t = back.tcp.expect("tcp");
        assert!(t.rst && t.ack);
        assert_eq!(t.ack_no, 1001);
        assert_eq!(back.dst, "10.0.2.15".parse::<IpAddr>().expect("ip"));
        assert_eq!(back.src_port, 443);
        assert_eq!(back.dst_mac, GUEST);
    }

    #[test]
    fn udp_and_icmp_are_refused_with_a_prohibited_unreachable() {
        let b = PacketBuilder::ethernet2(GUEST, GW)
            .ipv4([10, 0, 2, 15], [192, 0, 2, 9], 64)
            .udp(5000, 9999);
        let mut f = Vec::new();
        b.write(&mut f, b"hello").expect("write");
        let Parsed::Ip(p) = parse(&f) else {
            panic!("not ip")
        };
        assert_eq!(p.udp_payload, b"hello");
        let r = refusal(&p).expect("icmp");
        let s = SlicedPacket::from_ethernet(&r).expect("parse");
        let Some(TransportSlice::Icmpv4(i)) = s.transport else {
            panic!("not icmp")
        };
        assert_eq!(
            i.icmp_type(),
            Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::FilterProhibited)
        );
        // It quotes the refused packet's header and first 8 bytes.
        assert_eq!(i.payload().len(), 20 + 8);
    }

    #[test]
    fn arp_broadcast_and_garbage_are_told_apart() {
        assert!(matches!(parse(&[0u8; 10]), Parsed::Malformed));
        let b = PacketBuilder::ethernet2(GUEST, [0xff; 6])
            .ipv4([10, 0, 2, 15], [255, 255, 255, 255], 64)
            .udp(68, 67);
        let mut f = Vec::new();
        b.write(&mut f, &[0; 8]).expect("write");
        assert!(matches!(parse(&f), Parsed::Local));
        let mut arp = vec![0xff; 6];
        arp.extend(GUEST);
        arp.extend([0x08, 0x06]);
        arp.extend([0u8; 28]);
        assert!(matches!(parse(&arp), Parsed::Local | Parsed::Malformed));
    }
}
