//! One consistent error format, human or JSON.

use std::io::Write;

use serde::Serialize;

/// Print an error: `error[CODE]: message`, its causes, and a hint; or the
/// JSON form on stdout when the caller asked for `--json`.
pub fn print_error(e: &machinen::Error, json: bool) {
    if json {
        println!("{}", e.to_json());
        return;
    }
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "error[{}]: {}", e.code(), e);
    for c in e.causes() {
        let _ = writeln!(err, "  caused by: {c}");
    }
    if let Some(h) = e.hint() {
        let _ = writeln!(err, "  hint: {h}");
    }
}

/// Print a value as one line of JSON on stdout.
pub fn print_json<T: Serialize>(v: &T) {
    match serde_json::to_string(v) {
        Ok(s) => println!("{s}"),
        Err(e) => eprintln!("error: cannot encode JSON output: {e}"),
    }
}

/// `1h02m`, `3m04s`, `12s`.
pub fn human_duration(ms: u64) -> String {
    let s = ms / 1000;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// With `--timings`: print each phase on stderr as it ends.
pub fn phase_printer(enabled: bool) -> machinen::phases::OnPhase {
    if !enabled {
        return Default::default();
    }
    machinen::phases::OnPhase::new(print_phase)
}

/// One phase line on stderr: `phase NAME   MS ms (at MS ms)`.
pub fn print_phase(p: &machinen::phases::Phase) {
    eprintln!("phase {:<22} {:>7} ms  (at {} ms)", p.name, p.ms, p.at_ms);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(human_duration(999), "0s");
        assert_eq!(human_duration(64_000), "1m04s");
        assert_eq!(human_duration(3_720_000), "1h02m");
    }
}
