//! One consistent error format, human or JSON; and stdout that a closed
//! pipe does not turn into a panic.

use std::io::Write;

/// Write to stdout; when its reader is gone (`machinen ls | head`), exit
/// quietly with 141 (128 + SIGPIPE) as a Unix tool killed by SIGPIPE
/// would, instead of the panic of `print!`. Other write errors are dropped,
/// as `print!` cannot report them either.
pub fn stdout_fmt(args: std::fmt::Arguments<'_>) {
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(141);
        }
    }
}

/// `print!` through [`stdout_fmt`].
#[macro_export]
macro_rules! out {
    ($($t:tt)*) => { $crate::output::stdout_fmt(format_args!($($t)*)) };
}

/// `println!` through [`stdout_fmt`].
#[macro_export]
macro_rules! outln {
    () => { $crate::output::stdout_fmt(format_args!("\n")) };
    ($($t:tt)*) => { $crate::output::stdout_fmt(format_args!("{}\n", format_args!($($t)*))) };
}

use serde::Serialize;

/// Print an error: `error[CODE]: message`, its causes, and a hint; or the
/// JSON form on stdout when the caller asked for `--json`.
pub fn print_error(e: &machinen::Error, json: bool) {
    if json {
        crate::outln!("{}", e.to_json());
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
        Ok(s) => crate::outln!("{s}"),
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
