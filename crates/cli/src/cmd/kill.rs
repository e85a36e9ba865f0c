//! `machinen kill TARGET [-s SIGNAL] [--group] [--json]`

use machinen::error::fail;
use machinen::{ErrorCode, Result};

use crate::cli::KillArgs;
use crate::output::print_json;

/// `TERM`, `SIGTERM`, `sigterm` or `15`.
pub fn parse_signal(s: &str) -> std::result::Result<i32, machinen::Failure> {
    let bad = || {
        fail(ErrorCode::SignalInvalid, format!("{s:?} is not a signal"))
            .hint("name one (TERM, KILL, HUP, INT, USR1, …) or give its number")
    };
    if let Ok(n) = s.parse::<i32>() {
        return nix::sys::signal::Signal::try_from(n)
            .map(|_| n)
            .map_err(|_| bad());
    }
    let up = s.to_ascii_uppercase();
    let name = if up.starts_with("SIG") {
        up
    } else {
        format!("SIG{up}")
    };
    name.parse::<nix::sys::signal::Signal>()
        .map(|sig| sig as i32)
        .map_err(|_| bad())
}

pub async fn run(a: KillArgs) -> Result<i32> {
    let signal = parse_signal(&a.signal)?;
    let vm = machinen::vm::attach(&a.target).await?;
    let pid = vm.signal_main(signal, a.group).await?;
    if a.json {
        print_json(&serde_json::json!({
            "name": vm.name(),
            "pid": pid,
            "signal": signal,
            "group": a.group,
        }));
    } else {
        eprintln!(
            "{}: sent signal {signal} to the main command (guest pid {pid})",
            vm.name()
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_by_name_and_number() {
        assert_eq!(parse_signal("TERM").ok(), Some(libc::SIGTERM));
        assert_eq!(parse_signal("sigkill").ok(), Some(libc::SIGKILL));
        assert_eq!(parse_signal("HUP").ok(), Some(libc::SIGHUP));
        assert_eq!(parse_signal("10").ok(), Some(10));
        for bad in ["", "NOPE", "999", "-1"] {
            assert_eq!(
                parse_signal(bad).map_err(|f| f.code),
                Err(ErrorCode::SignalInvalid),
                "{bad}"
            );
        }
    }
}
