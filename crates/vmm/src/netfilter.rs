//! The egress filter: every frame between the guest's network device and
//! passt passes through the supervisor, which enforces the VM's
//! [`NetPolicy`] and counts the traffic.
//!
//! ```text
//! QEMU (virtio-net) ⇄ socket pair ⇄ [guest→world thread, world→guest thread] ⇄ socket pair ⇄ passt
//! ```
//!
//! Both links carry QEMU's stream netdev framing: a 32-bit big-endian
//! length, then one Ethernet frame. The filter sits on the host, outside
//! anything the guest controls: root in the guest can flush its firewall,
//! add routes, open raw sockets or configure a new address, and every
//! frame still crosses this code.
//!
//! * A packet to a destination the policy refuses is dropped and answered
//!   at once from that destination: a TCP reset (`connect` fails with
//!   ECONNREFUSED), or an ICMP "administratively prohibited" for UDP, ICMP
//!   and other protocols. The attempt is counted with its destination and
//!   rule, and logged (the first of each kind, then every tenfold).
//! * Verdicts are per packet, through a cache that a policy change
//!   empties: a connection the new policy refuses is reset on its next
//!   packet, so a change takes effect at once.
//! * DNS over UDP, to any address, is answered by the runtime's resolver
//!   ([`dns`]), which refuses names the policy refuses (NXDOMAIN) and
//!   remembers which addresses allowed names resolved to: a domain rule
//!   matches an address only through those answers. DNS over TCP to the
//!   guest's nameserver is refused under any policy that is not open, so
//!   the guest cannot resolve around the filter through passt's forwarder.
//! * Frames that stay on the virtual link (ARP, broadcast, multicast,
//!   link-local) pass.

mod dns;
mod frames;

use std::collections::HashMap;
use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use machinen_proto::netpolicy::{
    LearnedAddress, NetCounters, NetPolicy, NetReport, Refused, Verdict,
};
use machinen_proto::timeouts;

use frames::{Parsed, Proto};

/// The guest's nameserver (passt's DNS forwarder address, which the agent
/// writes into the guest's resolv.conf).
pub const GUEST_DNS: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 2, 3));

/// Largest frame either side may send: passt's 65520-byte MTU plus the
/// Ethernet header, with room to spare. A longer length breaks the link.
const MAX_FRAME: usize = 65536 + 64;
/// Guest DNS queries waiting for the host's nameservers at once; more are
/// dropped (the guest's resolver retries).
const MAX_DNS_IN_FLIGHT: usize = 64;
/// Addresses remembered from DNS answers, and names per address.
const MAX_LEARNED: usize = 16384;
const MAX_NAMES_PER_ADDRESS: usize = 8;
/// Kinds of refused attempts kept, and shown.
const MAX_REFUSED_KINDS: usize = 512;
const SHOWN_REFUSED_KINDS: usize = 32;
/// A UDP flow idle this long counts as new when it sends again.
const UDP_FLOW_IDLE: Duration = Duration::from_secs(120);

/// A VM's filter: its policy, what the resolver learned, its counters.
pub struct Net {
    policy: RwLock<Arc<NetPolicy>>,
    /// Bumped by every policy change and every newly learned name, so the
    /// relay's verdict cache knows when to start over.
    generation: AtomicU64,
    learned: Mutex<HashMap<IpAddr, Vec<String>>>,
    upstreams: Vec<SocketAddr>,
    dns_in_flight: AtomicUsize,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    packets_out: AtomicU64,
    packets_in: AtomicU64,
    connections: AtomicU64,
    dns_answered: AtomicU64,
    dns_refused: AtomicU64,
    refused_total: AtomicU64,
    refused: Mutex<HashMap<(&'static str, String, String), Refused>>,
}

type Writer = Arc<Mutex<UnixStream>>;

impl Net {
    /// A filter whose resolver asks the host's nameservers.
    /// `learned`: what the resolver had learned before (a restore's).
    pub fn new(policy: NetPolicy, learned: &[LearnedAddress]) -> Arc<Net> {
        let conf = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
        let net = Net::with_upstreams(policy, dns::upstreams(&conf));
        for l in learned.iter().take(MAX_LEARNED) {
            for name in l.names.iter().take(MAX_NAMES_PER_ADDRESS) {
                net.learn(name, vec![l.address]);
            }
        }
        net
    }

    /// What the resolver learned (for a snapshot).
    pub fn learned(&self) -> Vec<LearnedAddress> {
        let mut v: Vec<LearnedAddress> = self
            .learned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(a, n)| LearnedAddress {
                address: *a,
                names: n.clone(),
            })
            .collect();
        v.sort_by_key(|l| l.address);
        v
    }

    pub fn with_upstreams(policy: NetPolicy, upstreams: Vec<SocketAddr>) -> Arc<Net> {
        Arc::new(Net {
            policy: RwLock::new(Arc::new(policy)),
            generation: AtomicU64::new(0),
            learned: Mutex::new(HashMap::new()),
            upstreams,
            dns_in_flight: AtomicUsize::new(0),
            bytes_out: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            packets_out: AtomicU64::new(0),
            packets_in: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            dns_answered: AtomicU64::new(0),
            dns_refused: AtomicU64::new(0),
            refused_total: AtomicU64::new(0),
            refused: Mutex::new(HashMap::new()),
        })
    }

    pub fn policy(&self) -> NetPolicy {
        (**self.policy.read().unwrap_or_else(|e| e.into_inner())).clone()
    }

    /// Replace the policy; the next packet of every flow is judged by it.
    pub fn set_policy(&self, policy: NetPolicy) {
        tracing::info!("network policy now: {policy}");
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
        self.generation.fetch_add(1, Ordering::SeqCst);
    }

    pub fn report(&self) -> NetReport {
        let mut refused_by: Vec<Refused> = self
            .refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        refused_by.sort_by(|a, b| b.count.cmp(&a.count).then(b.last_ms.cmp(&a.last_ms)));
        refused_by.truncate(SHOWN_REFUSED_KINDS);
        NetReport {
            policy: self.policy(),
            counters: NetCounters {
                bytes_out: self.bytes_out.load(Ordering::Relaxed),
                bytes_in: self.bytes_in.load(Ordering::Relaxed),
                packets_out: self.packets_out.load(Ordering::Relaxed),
                packets_in: self.packets_in.load(Ordering::Relaxed),
                connections: self.connections.load(Ordering::Relaxed),
                dns_answered: self.dns_answered.load(Ordering::Relaxed),
                dns_refused: self.dns_refused.load(Ordering::Relaxed),
                refused: self.refused_total.load(Ordering::Relaxed),
                refused_by,
            },
        }
    }

    /// Relay frames between `guest` (QEMU's side) and `world` (passt's) on
    /// two threads, until either side closes.
    pub fn start(self: &Arc<Net>, guest: UnixStream, world: UnixStream) -> std::io::Result<()> {
        let to_guest: Writer = Arc::new(Mutex::new(guest.try_clone()?));
        let world_reader = world.try_clone()?;
        let guest_end = guest.try_clone()?;
        let net = self.clone();
        let tg = to_guest.clone();
        std::thread::Builder::new()
            .name("net-out".into())
            .spawn(move || {
                let world_end = world.try_clone();
                if let Err(e) = net.outbound(guest, world, &tg) {
                    tracing::info!("network relay (guest to world) ended: {e}");
                }
                if let Ok(w) = world_end {
                    let _ = w.shutdown(std::net::Shutdown::Both);
                }
            })?;
        let net = self.clone();
        std::thread::Builder::new()
            .name("net-in".into())
            .spawn(move || {
                if let Err(e) = net.inbound(world_reader, &to_guest) {
                    tracing::info!("network relay (world to guest) ended: {e}");
                }
                let _ = guest_end.shutdown(std::net::Shutdown::Both);
            })?;
        Ok(())
    }

    fn inbound(&self, world: UnixStream, guest: &Writer) -> std::io::Result<()> {
        let mut rd = BufReader::with_capacity(256 * 1024, world);
        let mut frame = Vec::with_capacity(MAX_FRAME);
        while read_frame(&mut rd, &mut frame)? {
            self.packets_in.fetch_add(1, Ordering::Relaxed);
            self.bytes_in
                .fetch_add(frame.len().saturating_sub(14) as u64, Ordering::Relaxed);
            send(guest, &frame)?;
        }
        Ok(())
    }

    fn outbound(
        self: &Arc<Net>,
        guest: UnixStream,
        mut world: UnixStream,
        to_guest: &Writer,
    ) -> std::io::Result<()> {
        let mut rd = BufReader::with_capacity(256 * 1024, guest);
        let mut frame = Vec::with_capacity(MAX_FRAME);
        let mut out = Vec::with_capacity(MAX_FRAME + 4);
        let mut seen_gen = u64::MAX;
        let mut policy = self
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut cache: HashMap<(Proto, IpAddr, Option<u16>), Verdict> = HashMap::new();
        let mut udp_flows: HashMap<(u16, IpAddr, u16), Instant> = HashMap::new();
        while read_frame(&mut rd, &mut frame)? {
            let generation = self.generation.load(Ordering::SeqCst);
            if generation != seen_gen {
                seen_gen = generation;
                policy = self
                    .policy
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                cache.clear();
            }
            let pass = match frames::parse(&frame) {
                Parsed::Local => true,
                Parsed::Malformed => policy.is_open(),
                Parsed::Ip(pkt) => {
                    if pkt.proto == Proto::Udp && pkt.dst_port == Some(53) {
                        self.dns(&policy, &pkt, to_guest)?;
                        continue;
                    }
                    let verdict = if pkt.proto == Proto::Tcp
                        && pkt.dst_port == Some(53)
                        && pkt.dst == GUEST_DNS
                        && !policy.is_open()
                    {
                        Verdict::Deny(
                            "DNS over TCP (the runtime's resolver answers over UDP)".into(),
                        )
                    } else {
                        if cache.len() > 65536 {
                            cache.clear();
                        }
                        cache
                            .entry((pkt.proto, pkt.dst, pkt.dst_port))
                            .or_insert_with(|| {
                                let names = self
                                    .learned
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .get(&pkt.dst)
                                    .cloned()
                                    .unwrap_or_default();
                                policy.verdict(pkt.dst, pkt.dst_port, &names)
                            })
                            .clone()
                    };
                    match verdict {
                        Verdict::Allow => {
                            self.count_connection(&pkt, &mut udp_flows);
                            self.packets_out.fetch_add(1, Ordering::Relaxed);
                            self.bytes_out
                                .fetch_add(pkt.ip.len() as u64, Ordering::Relaxed);
                            true
                        }
                        Verdict::Deny(rule) => {
                            let dest = match pkt.dst_port {
                                Some(p) if pkt.dst.is_ipv6() => format!("[{}]:{p}", pkt.dst),
                                Some(p) => format!("{}:{p}", pkt.dst),
                                None => pkt.dst.to_string(),
                            };
                            // A reset the guest sends on a refused
                            // connection is not another attempt.
                            if !pkt.tcp.is_some_and(|t| t.rst) {
                                self.refuse(pkt.proto.as_str(), dest, rule);
                            }
                            if let Some(answer) = frames::refusal(&pkt) {
                                send(to_guest, &answer)?;
                            }
                            false
                        }
                    }
                }
            };
            if pass {
                out.clear();
                out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
                out.extend_from_slice(&frame);
                world.write_all(&out)?;
            }
        }
        Ok(())
    }

    fn count_connection(
        &self,
        pkt: &frames::Packet<'_>,
        udp_flows: &mut HashMap<(u16, IpAddr, u16), Instant>,
    ) {
        let new = match (pkt.proto, pkt.tcp, pkt.dst_port) {
            (Proto::Tcp, Some(t), _) => t.syn && !t.ack,
            (Proto::Udp, _, Some(port)) => {
                if udp_flows.len() > 65536 {
                    udp_flows.clear();
                }
                let now = Instant::now();
                let last = udp_flows.insert((pkt.src_port, pkt.dst, port), now);
                last.is_none_or(|t| now.duration_since(t) > UDP_FLOW_IDLE)
            }
            _ => false,
        };
        if new {
            self.connections.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Judge a connection the egress proxy is asked for: `host` as the
    /// guest named it, `addrs` what it resolved to (a name's answers are
    /// learned, as the resolver's are). The allowed addresses, or the rule
    /// that refused them all (counted).
    pub fn judge_proxied(
        &self,
        host: &str,
        addrs: &[IpAddr],
        port: u16,
    ) -> Result<Vec<IpAddr>, String> {
        let policy = self.policy();
        let is_name = host.parse::<IpAddr>().is_err();
        let dest = format!("{host}:{port}");
        if is_name {
            if let Verdict::Deny(rule) = policy.name_verdict(host) {
                self.refuse("tcp", dest, rule.clone());
                return Err(rule);
            }
            self.learn(host, addrs.to_vec());
        }
        let mut allowed = Vec::new();
        let mut last = String::from("no address");
        for ip in addrs {
            // The proxy connects from the host: its loopback (and "any")
            // is as far out of reach as it is through the filter.
            if ip.is_loopback() || ip.is_unspecified() {
                last = "the host's loopback is out of the guest's reach".into();
                continue;
            }
            let names = self
                .learned
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(ip)
                .cloned()
                .unwrap_or_default();
            match policy.verdict(*ip, Some(port), &names) {
                Verdict::Allow => allowed.push(*ip),
                Verdict::Deny(rule) => last = rule,
            }
        }
        if allowed.is_empty() {
            self.refuse("tcp", dest, last.clone());
            return Err(last);
        }
        Ok(allowed)
    }

    /// Count a proxied connection's traffic.
    pub fn count_proxied(&self, out: u64, back: u64) {
        self.bytes_out.fetch_add(out, Ordering::Relaxed);
        self.bytes_in.fetch_add(back, Ordering::Relaxed);
    }

    /// Count a new proxied connection.
    pub fn count_proxied_connection(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    fn refuse(&self, proto: &'static str, dest: String, rule: String) {
        self.refused_total.fetch_add(1, Ordering::Relaxed);
        let now_ms = machinen::registry::now_ms();
        let mut kinds = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        if kinds.len() >= MAX_REFUSED_KINDS
            && !kinds.contains_key(&(proto, dest.clone(), rule.clone()))
        {
            // Forget the rarest kind to make room.
            if let Some(k) = kinds
                .iter()
                .min_by_key(|(_, r)| r.count)
                .map(|(k, _)| k.clone())
            {
                kinds.remove(&k);
            }
        }
        let r = kinds
            .entry((proto, dest.clone(), rule.clone()))
            .or_insert_with(|| Refused {
                proto: proto.into(),
                destination: dest,
                rule,
                count: 0,
                last_ms: now_ms,
            });
        r.count += 1;
        r.last_ms = now_ms;
        // The first of each kind, then every tenfold: a log that shows
        // what is refused without a line per packet.
        if r.count == 1 || (r.count.is_multiple_of(10) && 10u64.pow(r.count.ilog10()) == r.count) {
            tracing::info!(
                "egress refused: {} {} by {} ({} so far)",
                r.proto,
                r.destination,
                r.rule,
                r.count
            );
        }
    }

    /// Answer a DNS query: refused names at once, allowed ones from the
    /// host's nameservers on a thread of their own.
    fn dns(
        self: &Arc<Net>,
        policy: &NetPolicy,
        pkt: &frames::Packet<'_>,
        to_guest: &Writer,
    ) -> std::io::Result<()> {
        let query = pkt.udp_payload;
        let Some(name) = dns::question(query) else {
            return Ok(());
        };
        let hop = pkt.hop();
        if let Verdict::Deny(rule) = policy.name_verdict(&name) {
            self.dns_refused.fetch_add(1, Ordering::Relaxed);
            self.refuse("dns", name, rule);
            if let Some(answer) = dns::empty_answer(query, simple_dns::RCODE::NameError)
                .and_then(|a| frames::udp_reply(&hop, &a))
            {
                send(to_guest, &answer)?;
            }
            return Ok(());
        }
        if self.dns_in_flight.fetch_add(1, Ordering::SeqCst) >= MAX_DNS_IN_FLIGHT {
            self.dns_in_flight.fetch_sub(1, Ordering::SeqCst);
            return Ok(());
        }
        let net = self.clone();
        let query = query.to_vec();
        let to_guest = to_guest.clone();
        let spawned = std::thread::Builder::new()
            .name("net-dns".into())
            .spawn(move || {
                let answer = match dns::forward(&net.upstreams, &query, timeouts::DNS_UPSTREAM) {
                    Some(a) => {
                        net.learn(&name, dns::addresses(&a));
                        net.dns_answered.fetch_add(1, Ordering::Relaxed);
                        Some(a)
                    }
                    None => {
                        tracing::warn!("no nameserver answered for {name} ({:?})", net.upstreams);
                        dns::empty_answer(&query, simple_dns::RCODE::ServerFailure)
                    }
                };
                if let Some(frame) = answer.and_then(|a| frames::udp_reply(&hop, &a)) {
                    let _ = send(&to_guest, &frame);
                }
                net.dns_in_flight.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.dns_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        Ok(())
    }

    fn learn(&self, name: &str, addrs: Vec<IpAddr>) {
        let mut changed = false;
        {
            let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
            for ip in addrs {
                if learned.len() >= MAX_LEARNED && !learned.contains_key(&ip) {
                    if let Some(k) = learned.keys().next().copied() {
                        learned.remove(&k);
                    }
                }
                let names = learned.entry(ip).or_default();
                if !names.iter().any(|n| n == name) {
                    if names.len() >= MAX_NAMES_PER_ADDRESS {
                        names.remove(0);
                    }
                    names.push(name.to_string());
                    changed = true;
                }
            }
        }
        if changed {
            self.generation.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Read one length-prefixed frame into `buf`; `false` at a clean end.
fn read_frame(rd: &mut impl Read, buf: &mut Vec<u8>) -> std::io::Result<bool> {
    let mut len = [0u8; 4];
    match rd.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a {len}-byte frame (at most {MAX_FRAME})"),
        ));
    }
    buf.resize(len, 0);
    rd.read_exact(buf)?;
    Ok(true)
}

/// Write one frame to the guest (both relay threads and the resolver do).
fn send(guest: &Writer, frame: &[u8]) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(frame.len() + 4);
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
    guest
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .write_all(&out)
}

#[cfg(test)]
mod tests;
