//! Credentials the guest never holds (`--egress-secret NAME@HOST=VALUE`).
//!
//! The guest sees `$NAME` set to a placeholder. Its HTTPS clients reach the
//! outside through the runtime's egress proxy (`HTTPS_PROXY`, which the
//! agent serves on the guest's loopback and carries to the supervisor over
//! the agent channel); for a host that has secrets, the proxy terminates
//! TLS with a certificate from a per-VM CA the guest trusts, replaces each
//! placeholder in the request *headers* with the real value, and sends the
//! request on to the real host over TLS. Requests to any other host pass
//! through untouched (the placeholder is all they could see).
//!
//! ```text
//! supervisor -> agent : Request(EgressSetup { port, ca_pem, env }) → Response(EgressReady)
//! supervisor -> agent : Request(EgressAccept)  (several at once, one per waiting accept)
//! agent -> supervisor : Response(Connected) then raw bytes: one guest proxy connection
//! client -> supervisor : Request(EgressSecrets { secrets }) → Response(EgressSecretsSet { count })
//! ```
//!
//! The values travel only on the control link and stay in the supervisor's
//! memory: never in the guest, a spec file, a bundle or a log. Bundles
//! record names, hosts and placeholders, so a restore or fork keeps the
//! guest's view and takes the values again from its caller.

use serde::{Deserialize, Serialize};

/// The guest port (on its loopback) the agent serves the egress proxy on.
pub const PROXY_PORT: u16 = 17480;
/// Secrets per VM, hosts per secret.
pub const MAX_SECRETS: usize = 64;
pub const MAX_HOSTS: usize = 16;
/// Longest value (a header value must stay well under any server's limit).
pub const MAX_VALUE: usize = 16 * 1024;

/// One egress secret as the VM's spec and bundles record it (no value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSecretSpec {
    /// The guest's environment variable holding the placeholder.
    pub name: String,
    /// Where the value goes: host names (`*.` for every name below one) or
    /// IP addresses, as the guest's client names them in `CONNECT`.
    pub hosts: Vec<String>,
    /// What the guest sees instead of the value.
    pub placeholder: String,
}

impl EgressSecretSpec {
    /// Whether requests to `host` get this secret's value.
    pub fn applies_to(&self, host: &str) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        self.hosts.iter().any(|h| match h.strip_prefix("*.") {
            Some(base) => host.len() > base.len() && host.ends_with(&format!(".{base}")),
            None => *h == host,
        })
    }
}

/// What the agent sets up for the proxy: its port, the CA the guest's
/// clients trust, and the variables every command gets (placeholders).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EgressSetup {
    pub port: u16,
    /// The per-VM CA certificate (PEM); its key never leaves the supervisor.
    pub ca_pem: String,
    /// `NAME=placeholder` for each secret.
    pub env: Vec<(String, String)>,
}

/// A parsed `--egress-secret` flag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressSecretArg {
    pub name: String,
    pub hosts: Vec<String>,
    /// `None`: take it from the caller's environment variable `name`.
    pub value: Option<String>,
}

/// Parse `NAME@HOST[,HOST…][=VALUE]`.
pub fn parse_arg(s: &str) -> Result<EgressSecretArg, String> {
    let (head, value) = match s.split_once('=') {
        Some((h, v)) => (h, Some(v.to_string())),
        None => (s, None),
    };
    let Some((name, hosts)) = head.split_once('@') else {
        return Err(format!(
            "{s:?} has no @HOST: the form is NAME@HOST[,HOST…][=VALUE]"
        ));
    };
    let hosts: Vec<&str> = hosts.split(',').collect();
    let hosts = check_parts(name, &hosts)?;
    if let Some(v) = &value {
        check_value(name, v)?;
    }
    Ok(EgressSecretArg {
        name: name.to_string(),
        hosts,
        value,
    })
}

/// Check a secret's name and hosts (the flag's parts, or an API's fields):
/// the hosts as they are kept (lower case, no trailing dot).
pub fn check_parts(name: &str, hosts: &[&str]) -> Result<Vec<String>, String> {
    check_name(name)?;
    let hosts: Vec<String> = hosts
        .iter()
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .collect();
    if hosts.is_empty() || hosts.len() > MAX_HOSTS {
        return Err(format!("{name}: 1 to {MAX_HOSTS} hosts"));
    }
    for h in &hosts {
        check_host(h)?;
    }
    Ok(hosts)
}

/// A variable name a shell can use.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?} is not a variable name (letters, digits and _, not starting with a digit)"
        ))
    }
}

fn check_host(h: &str) -> Result<(), String> {
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let name = h.strip_prefix("*.").unwrap_or(h);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "{h:?} is not a host name (or *.DOMAIN) or an IP address"
        ))
    }
}

/// A value that can go into a header: printable, no line breaks.
pub fn check_value(name: &str, v: &str) -> Result<(), String> {
    if v.is_empty() || v.len() > MAX_VALUE {
        return Err(format!("{name}: the value must be 1 to {MAX_VALUE} bytes"));
    }
    if v.bytes().any(|b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(format!(
            "{name}: the value cannot hold line breaks or NUL (it goes into a header)"
        ));
    }
    Ok(())
}

/// The placeholder the guest sees for `name`: recognisable, unguessable,
/// and valid wherever the value was (header-safe ASCII).
pub fn placeholder(name: &str, random: &[u8; 16]) -> String {
    let hex: String = random.iter().map(|b| format!("{b:02x}")).collect();
    format!("machinen-egress-{}-{hex}", name.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_ones_say_why() {
        let a = parse_arg("API_KEY@api.example.com,*.example.net=sk-1=2").expect("parse");
        assert_eq!(a.name, "API_KEY");
        assert_eq!(a.hosts, ["api.example.com", "*.example.net"]);
        assert_eq!(a.value.as_deref(), Some("sk-1=2"));
        assert_eq!(parse_arg("T@10.0.0.1").expect("ip").value, None);
        for bad in [
            "API_KEY=x",
            "1X@h",
            "A B@h=x",
            "K@=x",
            "K@bad_host=x",
            "K@h=",
            "K@h=a\r\nX: y",
        ] {
            assert!(parse_arg(bad).is_err(), "{bad}");
        }
        // Fields from an API are checked alike, a host with `=` included.
        assert_eq!(
            check_parts("K", &["API.example.com."]),
            Ok(vec!["api.example.com".to_string()])
        );
        assert!(check_parts("K", &["h=x"]).is_err());
        assert!(check_parts("K", &[]).is_err());
    }

    #[test]
    fn hosts_match_exactly_or_below_a_wildcard() {
        let s = EgressSecretSpec {
            name: "K".into(),
            hosts: vec!["api.example.com".into(), "*.example.net".into()],
            placeholder: placeholder("K", &[7; 16]),
        };
        assert!(s.applies_to("api.example.com"));
        assert!(s.applies_to("API.example.com."));
        assert!(s.applies_to("a.b.example.net"));
        assert!(!s.applies_to("example.net"));
        assert!(!s.applies_to("evil-example.net"));
        assert!(!s.applies_to("api.example.com.evil.test"));
        assert!(s.placeholder.starts_with("machinen-egress-k-0707"));
    }
}
