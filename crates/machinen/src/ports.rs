//! `-p [HOSTADDR:]HOST:GUEST` port forwards: parsing and conflict checks.

use std::net::IpAddr;

use crate::error::{fail, ErrorCode, Failure};
use crate::registry::{PortForward, RegistryEntry};

/// Parse `HOST:GUEST` or `HOSTADDR:HOST:GUEST` (IPv6 addresses in brackets).
pub fn parse(s: &str) -> Result<PortForward, Failure> {
    let bad = |why: &str| {
        fail(
            ErrorCode::BootArgsInvalid,
            format!("invalid port forward {s:?}: {why}"),
        )
        .hint("use -p HOST:GUEST or -p ADDR:HOST:GUEST, e.g. -p 8080:80 or -p 0.0.0.0:8080:80")
    };
    let (addr, rest) = if let Some(r) = s.strip_prefix('[') {
        let (a, rest) = r
            .split_once("]:")
            .ok_or_else(|| bad("unterminated [address]"))?;
        (Some(a), rest)
    } else {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.len() {
            2 => (None, s),
            3 => (Some(parts[0]), &s[parts[0].len() + 1..]),
            _ => return Err(bad("expected two or three ':'-separated parts")),
        }
    };
    let (host, guest) = rest
        .split_once(':')
        .ok_or_else(|| bad("missing the guest port"))?;
    let port = |p: &str, what: &str| -> Result<u16, Failure> {
        match p.parse::<u16>() {
            Ok(0) | Err(_) => Err(bad(&format!("{what} port must be 1-65535"))),
            Ok(n) => Ok(n),
        }
    };
    let host_addr = match addr {
        None => "127.0.0.1".to_string(),
        Some(a) => {
            let ip: IpAddr = a
                .parse()
                .map_err(|_| bad("the host address must be an IP address"))?;
            ip.to_string()
        }
    };
    Ok(PortForward {
        host_addr,
        host_port: port(host, "host")?,
        guest_port: port(guest, "guest")?,
    })
}

/// The host socket address of a forward (IPv6 addresses need brackets
/// when spelled with a port, so never build it from strings).
pub fn host_socket_addr(p: &PortForward) -> Option<std::net::SocketAddr> {
    let ip: IpAddr = p.host_addr.parse().ok()?;
    Some(std::net::SocketAddr::new(ip, p.host_port))
}

/// `ADDR:HOST->GUEST`, with an IPv6 address in brackets.
pub fn display(p: &PortForward) -> String {
    match host_socket_addr(p) {
        Some(a) => format!("{a}->{}", p.guest_port),
        None => format!("{}:{}->{}", p.host_addr, p.host_port, p.guest_port),
    }
}

fn overlaps(a: &PortForward, b: &PortForward) -> bool {
    let wild = |x: &str| x == "0.0.0.0" || x == "::";
    a.host_port == b.host_port
        && (a.host_addr == b.host_addr || wild(&a.host_addr) || wild(&b.host_addr))
}

/// Refuse two forwards on one host port in one command, and host ports
/// held by another live VM (naming it).
pub fn check(new: &[PortForward], live: &[RegistryEntry]) -> Result<(), Failure> {
    for (i, a) in new.iter().enumerate() {
        if let Some(b) = new[i + 1..].iter().find(|b| overlaps(a, b)) {
            return Err(fail(
                ErrorCode::BootPortForwardConflict,
                format!(
                    "host port {}:{} is forwarded twice (to guest ports {} and {})",
                    a.host_addr, a.host_port, a.guest_port, b.guest_port
                ),
            )
            .hint("give each -p its own host port"));
        }
        for e in live {
            if e.ports.iter().any(|p| overlaps(a, p)) {
                return Err(fail(
                    ErrorCode::BootPortForwardInUse,
                    format!(
                        "host port {}:{} is already forwarded by VM {:?} (pid {})",
                        a.host_addr, a.host_port, e.name, e.supervisor_pid
                    ),
                )
                .hint(format!(
                    "pick another host port, or `machinen stop {}`",
                    e.name
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(
            parse("8080:80").expect("2"),
            PortForward {
                host_addr: "127.0.0.1".into(),
                host_port: 8080,
                guest_port: 80
            }
        );
        assert_eq!(parse("0.0.0.0:1:2").expect("3").host_addr, "0.0.0.0");
        let v6 = parse("[::1]:5:6").expect("v6");
        assert_eq!(v6.host_addr, "::1");
        assert_eq!(
            host_socket_addr(&v6),
            Some("[::1]:5".parse().expect("addr"))
        );
        assert_eq!(display(&v6), "[::1]:5->6");
        assert_eq!(display(&parse("1:2").expect("v4")), "127.0.0.1:1->2");
        for bad in [
            "80", "a:80", "0:80", "80:70000", "x.y:1:2", "1:2:3:4", "[::1:5:6",
        ] {
            assert_eq!(
                parse(bad).expect_err(bad).code,
                ErrorCode::BootArgsInvalid,
                "{bad}"
            );
        }
    }

    #[test]
    fn conflicts() {
        let a = parse("8080:80").expect("a");
        let b = parse("8080:81").expect("b");
        let c = parse("0.0.0.0:8080:82").expect("c");
        assert_eq!(
            check(&[a.clone(), b], &[]).expect_err("dup").code,
            ErrorCode::BootPortForwardConflict
        );
        assert_eq!(
            check(&[a.clone(), c], &[]).expect_err("wild").code,
            ErrorCode::BootPortForwardConflict
        );
        check(&[a.clone(), parse("8081:80").expect("d")], &[]).expect("distinct");
        let live: RegistryEntry = serde_json::from_value(serde_json::json!({
            "id": "x", "name": "web", "state": "running", "supervisor_pid": 7, "supervisor_start": 1,
            "control_socket": "/x", "created_at_ms": 0,
            "ports": [{"host_addr": "127.0.0.1", "host_port": 8080, "guest_port": 3000}]
        }))
        .expect("entry");
        let err = check(&[a], std::slice::from_ref(&live)).expect_err("in use");
        assert_eq!(err.code, ErrorCode::BootPortForwardInUse);
        assert!(err.message.contains("\"web\""));
    }
}
