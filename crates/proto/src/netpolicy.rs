//! A VM's egress policy: which destinations its guest may reach.
//!
//! A policy is a default ([`Egress`]) and two rule lists. A rule names a
//! destination, an address, a CIDR or a domain (exact, or `*.` for every
//! name below one), with an optional port or port range:
//!
//! ```text
//! 10.1.2.3   10.0.0.0/8:443   10.0.0.0/8:8000-8999   [fd00::/8]:53
//! example.com   *.example.com:443
//! ```
//!
//! A destination is judged in this order: a matching **deny** rule refuses
//! it; else a matching **allow** rule lets it through; else the default. An
//! address matches a domain rule only if the runtime's resolver answered
//! that name with that address (see the supervisor's `netfilter`): a
//! literal address cannot pass for a name. Names are judged the same way
//! (without ports) when the guest resolves them: a name the policy refuses
//! gets no answer (NXDOMAIN).
//!
//! The same type is carried by the control protocol (`Request::Network`),
//! kept in a VM's spec and a bundle's metadata, and shown by `inspect`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Where an unmatched destination goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Egress {
    #[default]
    Allow,
    Deny,
}

impl FromStr for Egress {
    type Err = String;
    fn from_str(s: &str) -> Result<Egress, String> {
        match s {
            "allow" => Ok(Egress::Allow),
            "deny" => Ok(Egress::Deny),
            _ => Err(format!("unknown egress default {s:?} (allow or deny)")),
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Egress::Allow => "allow",
            Egress::Deny => "deny",
        })
    }
}

/// What a rule's destination is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// An address (a /32 or /128) or a CIDR block.
    Net(IpNet),
    /// A name (lower case, no trailing dot); `wildcard`: every name below
    /// it (`*.example.com`), not the name itself.
    Domain { name: String, wildcard: bool },
}

/// One allow or deny rule. Written and read as its text form
/// (`*.example.com:443`), which is what the CLI, JSON and bundles carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub target: Target,
    /// Inclusive port range; `None`: every port (and ICMP).
    pub ports: Option<(u16, u16)>,
}

/// Longest name a rule may hold (DNS's own limit).
const MAX_NAME: usize = 253;

/// Most rules a policy may hold, per list: each packet of a new flow is
/// judged against them.
pub const MAX_RULES: usize = 4096;

impl FromStr for Rule {
    type Err = String;
    fn from_str(s: &str) -> Result<Rule, String> {
        let s = s.trim();
        if s.is_empty() {
            return Err("an empty network rule".into());
        }
        // `[v6 or v6/len]:ports`, `v4[/len][:ports]`, `name[:ports]`, or a
        // bare v6 address or block (colons, no brackets, no port).
        let (host, ports) = if let Some(rest) = s.strip_prefix('[') {
            let (inner, after) = rest
                .split_once(']')
                .ok_or_else(|| format!("{s:?}: a '[' without its ']'"))?;
            let ports = match after {
                "" => None,
                p => Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("{s:?}: expected ':PORT' after ']'"))?,
                ),
            };
            (inner, ports)
        } else if s.matches(':').count() > 1 {
            (s, None)
        } else {
            match s.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (s, None),
            }
        };
        let ports = ports.map(|p| parse_ports(s, p)).transpose()?;
        let target = if let Ok(net) = host.parse::<IpNet>() {
            Target::Net(net.trunc())
        } else if let Ok(ip) = host.parse::<IpAddr>() {
            Target::Net(IpNet::from(ip))
        } else {
            parse_domain(s, host)?
        };
        Ok(Rule { target, ports })
    }
}

fn parse_ports(rule: &str, p: &str) -> Result<(u16, u16), String> {
    let bad = || format!("{rule:?}: {p:?} is not a port (1-65535) or a range LOW-HIGH");
    let one = |x: &str| x.parse::<u16>().ok().filter(|&n| n > 0).ok_or_else(bad);
    let (lo, hi) = match p.split_once('-') {
        Some((a, b)) => (one(a)?, one(b)?),
        None => {
            let n = one(p)?;
            (n, n)
        }
    };
    if lo > hi {
        return Err(bad());
    }
    Ok((lo, hi))
}

fn parse_domain(rule: &str, host: &str) -> Result<Target, String> {
    let lower = host.trim_end_matches('.').to_ascii_lowercase();
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(n) => (true, n.to_string()),
        None => (false, lower),
    };
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.is_empty() || name.len() > MAX_NAME || !name.split('.').all(label_ok) {
        return Err(format!(
            "{rule:?} is not an address, a CIDR block or a domain name (a leading '*.' matches every name below one)"
        ));
    }
    // A name of digits and dots only is a mistyped address.
    if name.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(format!("{rule:?} is not a valid address"));
    }
    Ok(Target::Domain { name, wildcard })
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = match &self.target {
            Target::Net(n) if n.prefix_len() == n.max_prefix_len() => n.addr().to_string(),
            Target::Net(n) => n.to_string(),
            Target::Domain { name, wildcard } => {
                format!("{}{name}", if *wildcard { "*." } else { "" })
            }
        };
        let v6 = matches!(self.target, Target::Net(IpNet::V6(_)));
        match self.ports {
            None => f.write_str(&host),
            Some((lo, hi)) => {
                let host = if v6 { format!("[{host}]") } else { host };
                if lo == hi {
                    write!(f, "{host}:{lo}")
                } else {
                    write!(f, "{host}:{lo}-{hi}")
                }
            }
        }
    }
}

impl Serialize for Rule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Rule, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Rule {
    fn port_ok(&self, port: Option<u16>) -> bool {
        match (self.ports, port) {
            (None, _) => true,
            (Some((lo, hi)), Some(p)) => (lo..=hi).contains(&p),
            // A port rule does not cover portless traffic (ICMP).
            (Some(_), None) => false,
        }
    }

    /// Whether `name` (lower case, no trailing dot) is this rule's domain.
    pub fn matches_name(&self, name: &str) -> bool {
        match &self.target {
            Target::Net(_) => false,
            Target::Domain {
                name: n,
                wildcard: false,
            } => name == n,
            Target::Domain {
                name: n,
                wildcard: true,
            } => {
                name.len() > n.len() + 1 && name.ends_with(n.as_str()) && {
                    name.as_bytes()[name.len() - n.len() - 1] == b'.'
                }
            }
        }
    }

    /// Whether a packet to `ip` (port `port`; `None` for ICMP), an address
    /// the resolver gave for `names`, matches.
    pub fn matches(&self, ip: IpAddr, port: Option<u16>, names: &[String]) -> bool {
        self.port_ok(port)
            && match &self.target {
                Target::Net(n) => n.contains(&ip),
                Target::Domain { .. } => names.iter().any(|n| self.matches_name(n)),
            }
    }

    pub fn is_domain(&self) -> bool {
        matches!(self.target, Target::Domain { .. })
    }
}

/// A VM's egress policy. The default value lets everything through.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetPolicy {
    /// What happens to a destination no rule matches.
    #[serde(default)]
    pub egress: Egress,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Rule>,
}

/// What the policy says about one destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refused, by this rule (its text, or `default deny`).
    Deny(String),
}

impl NetPolicy {
    /// Whether this is the default policy (nothing to record).
    pub fn is_default(&self) -> bool {
        *self == NetPolicy::default()
    }

    /// Whether the policy lets everything through (no filtering needed).
    pub fn is_open(&self) -> bool {
        self.egress == Egress::Allow && self.deny.is_empty()
    }

    pub fn check(&self) -> Result<(), String> {
        if self.allow.len() > MAX_RULES || self.deny.len() > MAX_RULES {
            return Err(format!(
                "a policy holds at most {MAX_RULES} allow and {MAX_RULES} deny rules"
            ));
        }
        Ok(())
    }

    /// Judge a packet to `ip`:`port` (`None` for ICMP), an address the
    /// resolver gave for `names`.
    pub fn verdict(&self, ip: IpAddr, port: Option<u16>, names: &[String]) -> Verdict {
        if let Some(r) = self.deny.iter().find(|r| r.matches(ip, port, names)) {
            return Verdict::Deny(format!("deny {r}"));
        }
        if self.allow.iter().any(|r| r.matches(ip, port, names)) {
            return Verdict::Allow;
        }
        match self.egress {
            Egress::Allow => Verdict::Allow,
            Egress::Deny => Verdict::Deny("default deny".into()),
        }
    }

    /// Judge a name the guest resolves (lower case, no trailing dot).
    pub fn name_verdict(&self, name: &str) -> Verdict {
        if let Some(r) = self
            .deny
            .iter()
            .find(|r| r.ports.is_none() && r.matches_name(name))
        {
            return Verdict::Deny(format!("deny {r}"));
        }
        if self.allow.iter().any(|r| r.matches_name(name)) {
            return Verdict::Allow;
        }
        match self.egress {
            Egress::Allow => Verdict::Allow,
            Egress::Deny => Verdict::Deny("default deny".into()),
        }
    }

    /// The policy after `change`: with `clear`, the change's lists replace
    /// this one's; otherwise its rules are added (a rule given again is
    /// kept once), `remove` drops rules from both lists, and `egress`, if
    /// given, replaces the default.
    pub fn apply(&self, change: &PolicyChange) -> Result<NetPolicy, String> {
        let mut p = if change.clear {
            NetPolicy {
                egress: self.egress,
                ..NetPolicy::default()
            }
        } else {
            self.clone()
        };
        for r in &change.remove {
            let before = p.allow.len() + p.deny.len();
            p.allow.retain(|x| x != r);
            p.deny.retain(|x| x != r);
            if p.allow.len() + p.deny.len() == before {
                return Err(format!("the policy has no rule {r}"));
            }
        }
        for r in &change.allow {
            if !p.allow.contains(r) {
                p.allow.push(r.clone());
            }
        }
        for r in &change.deny {
            if !p.deny.contains(r) {
                p.deny.push(r.clone());
            }
        }
        if let Some(e) = change.egress {
            p.egress = e;
        }
        p.check()?;
        Ok(p)
    }
}

impl fmt::Display for NetPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "egress {}", self.egress)?;
        for r in &self.allow {
            write!(f, ", allow {r}")?;
        }
        for r in &self.deny {
            write!(f, ", deny {r}")?;
        }
        Ok(())
    }
}

/// A change to a running VM's policy (`machinen network`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PolicyChange {
    #[serde(default)]
    pub clear: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Egress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Rule>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<Rule>,
}

impl PolicyChange {
    pub fn is_empty(&self) -> bool {
        !self.clear
            && self.egress.is_none()
            && self.allow.is_empty()
            && self.deny.is_empty()
            && self.remove.is_empty()
    }
}

/// One kind of refused attempt, with how often it happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refused {
    /// `tcp`, `udp`, `icmp` or `dns`.
    pub proto: String,
    /// `ADDR:PORT`, `ADDR` (ICMP) or the name (DNS).
    pub destination: String,
    /// The rule that refused it (`deny RULE` or `default deny`).
    pub rule: String,
    pub count: u64,
    /// Unix time (ms) of the last one.
    pub last_ms: u64,
}

/// A VM's traffic since it started (this supervisor's life).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetCounters {
    /// IP bytes the guest sent out / received.
    pub bytes_out: u64,
    pub bytes_in: u64,
    pub packets_out: u64,
    pub packets_in: u64,
    /// TCP connections and UDP flows the guest opened (let through).
    pub connections: u64,
    /// DNS queries the runtime's resolver answered / refused.
    pub dns_answered: u64,
    pub dns_refused: u64,
    /// Attempts the policy refused, in all.
    pub refused: u64,
    /// The most frequent kinds of refused attempts (bounded).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub refused_by: Vec<Refused>,
}

/// Names the runtime's resolver answered with an address: what lets that
/// address match domain rules. Kept in bundles, so that a restored or
/// forked guest reaches the addresses it looked up before.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LearnedAddress {
    pub address: IpAddr,
    pub names: Vec<String>,
}

/// A VM's policy and traffic, as the supervisor reports them.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NetReport {
    pub policy: NetPolicy,
    pub counters: NetCounters,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> Rule {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn rules_parse_and_print_back() {
        for s in [
            "10.1.2.3",
            "10.0.0.0/8",
            "10.0.0.0/8:443",
            "10.0.0.0/8:8000-8999",
            "fd00::1",
            "fd00::/8",
            "[fd00::/8]:53",
            "[fd00::1]:80-81",
            "example.com",
            "*.example.com:443",
        ] {
            assert_eq!(r(s).to_string(), s);
        }
        assert_eq!(r("10.1.2.3/8").to_string(), "10.0.0.0/8");
        assert_eq!(r("Example.COM.").to_string(), "example.com");
        assert_eq!(r("10.1.2.3/32").to_string(), "10.1.2.3");
        for bad in [
            "",
            "10.0.0.0/33",
            "10.1.2.3:0",
            "10.1.2.3:70000",
            "10.1.2.3:9-8",
            "[fd00::1",
            "[fd00::1]80",
            "exa mple.com",
            "-bad.com",
            "*.",
            "10.1.2",
            "a..b",
        ] {
            assert!(bad.parse::<Rule>().is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn deny_wins_then_allow_then_the_default() {
        let p = NetPolicy {
            egress: Egress::Deny,
            allow: vec![r("10.0.0.0/8"), r("*.example.com:443")],
            deny: vec![r("10.9.0.0/16")],
        };
        assert_eq!(p.verdict(ip("10.1.1.1"), Some(80), &[]), Verdict::Allow);
        assert_eq!(
            p.verdict(ip("10.9.1.1"), Some(80), &[]),
            Verdict::Deny("deny 10.9.0.0/16".into())
        );
        assert_eq!(
            p.verdict(ip("192.0.2.1"), Some(443), &[]),
            Verdict::Deny("default deny".into())
        );
        // Only the resolver's answers tie an address to a name.
        let names = vec!["api.example.com".to_string()];
        assert_eq!(
            p.verdict(ip("192.0.2.1"), Some(443), &names),
            Verdict::Allow
        );
        assert!(matches!(
            p.verdict(ip("192.0.2.1"), Some(80), &names),
            Verdict::Deny(_)
        ));
        // A wildcard covers names below it, not the name itself.
        assert_eq!(p.name_verdict("api.example.com"), Verdict::Allow);
        assert!(matches!(p.name_verdict("example.com"), Verdict::Deny(_)));
        assert!(matches!(p.name_verdict("badexample.com"), Verdict::Deny(_)));
        // ICMP has no port: only portless rules cover it.
        assert_eq!(p.verdict(ip("10.1.1.1"), None, &[]), Verdict::Allow);
        assert!(NetPolicy::default().is_open());
        assert!(!p.is_open());
    }

    #[test]
    fn changes_add_remove_clear_and_set_the_default() {
        let p = NetPolicy::default();
        let p = p
            .apply(&PolicyChange {
                allow: vec![r("10.0.0.0/8"), r("10.0.0.0/8")],
                deny: vec![r("evil.com")],
                egress: Some(Egress::Deny),
                ..Default::default()
            })
            .expect("apply");
        assert_eq!(
            p.to_string(),
            "egress deny, allow 10.0.0.0/8, deny evil.com"
        );
        let p2 = p
            .apply(&PolicyChange {
                remove: vec![r("evil.com")],
                ..Default::default()
            })
            .expect("remove");
        assert!(p2.deny.is_empty());
        assert!(p2
            .apply(&PolicyChange {
                remove: vec![r("evil.com")],
                ..Default::default()
            })
            .is_err());
        let p3 = p
            .apply(&PolicyChange {
                clear: true,
                allow: vec![r("1.1.1.1")],
                ..Default::default()
            })
            .expect("clear");
        assert_eq!(p3.to_string(), "egress deny, allow 1.1.1.1");
    }

    #[test]
    fn policies_round_trip_through_json() {
        let p = NetPolicy {
            egress: Egress::Deny,
            allow: vec![r("[fd00::/8]:53"), r("*.example.com")],
            deny: vec![r("10.0.0.0/8:1-1024")],
        };
        let j = serde_json::to_string(&p).expect("json");
        assert_eq!(
            j,
            r#"{"egress":"deny","allow":["[fd00::/8]:53","*.example.com"],"deny":["10.0.0.0/8:1-1024"]}"#
        );
        assert_eq!(serde_json::from_str::<NetPolicy>(&j).expect("back"), p);
        assert!(serde_json::from_str::<NetPolicy>(r#"{"allow":["no way"]}"#).is_err());
    }
}
