//! Parsing of the kernel command line (`/proc/cmdline`).

/// What the host asked for through `machinen.*` keys.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BootConfig {
    /// `machinen.net=1`: configure `lo` and `eth0` (QEMU user networking).
    pub net: bool,
    /// `machinen.hostname=<name>`.
    pub hostname: Option<String>,
    /// `machinen.debug=1`: log every step to the console.
    pub debug: bool,
    /// `machinen.mtu=<bytes>`: the MTU of `eth0` (passt takes 65520-byte
    /// frames; QEMU's user networking only the default 1500).
    pub mtu: Option<u32>,
    /// `machinen.mount=<i>:<guest path>`, repeated: the copy-once mounts
    /// (disk index, guest path), in the order given.
    pub mounts: Vec<(u32, String)>,
    /// `machinen.live=<i>:<ro|rw>:<guest path>`, repeated: the live mounts
    /// (virtio-fs tag `machinen-live<i>`).
    pub live: Vec<LiveMount>,
}

/// One live mount as the kernel command line names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveMount {
    pub index: u32,
    pub readonly: bool,
    pub path: String,
}

/// Default hostname when the cmdline names none.
pub const DEFAULT_HOSTNAME: &str = "machinen";

impl BootConfig {
    pub fn hostname(&self) -> &str {
        self.hostname.as_deref().unwrap_or(DEFAULT_HOSTNAME)
    }
}

fn truthy(v: Option<&str>) -> bool {
    // A bare `machinen.net` counts as on, like kernel boolean parameters.
    matches!(
        v,
        None | Some("1") | Some("y") | Some("yes") | Some("on") | Some("true")
    )
}

/// A hostname is used only if it is a valid one (see
/// [`machinen_proto::valid_hostname`]); anything else is ignored with a
/// warning by the caller.
pub fn valid_hostname(name: &str) -> bool {
    machinen_proto::valid_hostname(name)
}

/// Split a command line into words. The kernel allows double quotes around a
/// value (`key="a b"`); quotes are removed, as the kernel does.
fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_quotes = false;
    let mut have = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                have = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            c => {
                cur.push(c);
                have = true;
            }
        }
    }
    if have {
        out.push(cur);
    }
    out
}

/// Parse our keys out of a kernel command line; unknown words are ignored.
/// A later key overrides an earlier one.
pub fn parse(cmdline: &str) -> BootConfig {
    let mut cfg = BootConfig::default();
    for word in words(cmdline) {
        let (key, value) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word.as_str(), None),
        };
        match key {
            "machinen.net" => cfg.net = truthy(value),
            "machinen.debug" => cfg.debug = truthy(value),
            "machinen.mtu" => {
                cfg.mtu = value
                    .and_then(|v| v.parse().ok())
                    .filter(|m| (68..=65535).contains(m));
            }
            "machinen.mount" => {
                if let Some((i, path)) = value
                    .and_then(|v| v.split_once(':'))
                    .and_then(|(i, p)| Some((i.parse().ok()?, p.to_owned())))
                {
                    cfg.mounts.push((i, path));
                }
            }
            "machinen.live" => {
                let parsed = value.and_then(|v| {
                    let (i, rest) = v.split_once(':')?;
                    let (mode, path) = rest.split_once(':')?;
                    let readonly = match mode {
                        "ro" => true,
                        "rw" => false,
                        _ => return None,
                    };
                    Some(LiveMount {
                        index: i.parse().ok()?,
                        readonly,
                        path: path.to_owned(),
                    })
                });
                cfg.live.extend(parsed);
            }
            "machinen.hostname" => {
                cfg.hostname = value.filter(|v| !v.is_empty()).map(str::to_owned);
            }
            _ => {}
        }
    }
    cfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_our_keys() {
        let c =
            parse("console=ttyS0 quiet machinen.net=1 machinen.hostname=web-1 machinen.debug=1 machinen.mtu=65520\n");
        assert_eq!(
            c,
            BootConfig {
                net: true,
                hostname: Some("web-1".into()),
                debug: true,
                mtu: Some(65520),
                mounts: vec![],
                live: vec![],
            }
        );
        assert_eq!(
            parse("machinen.live=0:ro:/work machinen.live=1:rw:/data machinen.live=2:xx:/y machinen.live=3:/z").live,
            vec![
                LiveMount { index: 0, readonly: true, path: "/work".into() },
                LiveMount { index: 1, readonly: false, path: "/data".into() },
            ]
        );
        assert_eq!(
            parse("machinen.mount=0:/work/src machinen.mount=1:/data machinen.mount=x:/y machinen.mount=2").mounts,
            vec![(0, "/work/src".to_string()), (1, "/data".to_string())]
        );
        assert_eq!(parse("machinen.mtu=9").mtu, None, "below IPv4's minimum");
        assert_eq!(parse("machinen.mtu=x").mtu, None);
        assert_eq!(c.hostname(), "web-1");
    }

    #[test]
    fn defaults_when_absent() {
        let c = parse("console=ttyS0 quiet");
        assert_eq!(c, BootConfig::default());
        assert_eq!(c.hostname(), DEFAULT_HOSTNAME);
        assert!(!parse("").net);
    }

    #[test]
    fn zero_and_bare_keys() {
        assert!(!parse("machinen.net=0").net);
        assert!(parse("machinen.net").net);
        assert!(!parse("machinen.debug=off").debug);
        assert!(parse("machinen.net=0 machinen.net=1").net, "last one wins");
        assert_eq!(parse("machinen.hostname=").hostname, None);
    }

    #[test]
    fn similar_keys_are_not_ours() {
        let c = parse("xmachinen.net=1 machinen.netx=1 machinen.hostnamex=a");
        assert_eq!(c, BootConfig::default());
    }

    #[test]
    fn quotes_are_handled() {
        let c = parse("foo=\"a b c\" machinen.hostname=\"box\" machinen.debug=1");
        assert_eq!(c.hostname.as_deref(), Some("box"));
        assert!(c.debug);
        assert_eq!(
            words("a=\"x y\"  b"),
            vec!["a=x y".to_string(), "b".to_string()]
        );
    }

    #[test]
    fn hostname_validation() {
        assert!(valid_hostname("web-1"));
        assert!(valid_hostname("a.b.c"));
        assert!(!valid_hostname(""));
        assert!(!valid_hostname("-a"));
        assert!(!valid_hostname("a b"));
        assert!(!valid_hostname("a..b"));
        assert!(!valid_hostname(&"x".repeat(65)));
    }
}
