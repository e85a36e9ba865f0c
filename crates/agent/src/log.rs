//! Console logging. The console is the agent's stderr (`/dev/console`, which
//! the kernel hands to `/init`); nothing else is available that early.
//!
//! Debug lines only appear with `machinen.debug=1` on the kernel cmdline (or
//! `MACHINEN_AGENT_DEBUG=1` in host test mode); errors always do.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};

static DEBUG: AtomicBool = AtomicBool::new(false);

pub fn set_debug(on: bool) {
    DEBUG.store(on, Ordering::Relaxed);
}

pub fn debug_enabled() -> bool {
    DEBUG.load(Ordering::Relaxed)
}

/// Write one line to stderr, ignoring failures (there is nowhere else to
/// report them).
pub fn line(level: &str, args: std::fmt::Arguments<'_>) {
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "machinen-agent: {level}{args}");
}

/// A step of the boot or of the serving loop; shown in debug mode only.
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::log::debug_enabled() {
            $crate::log::line("", format_args!($($arg)*));
        }
    };
}

/// Something went wrong; always shown.
macro_rules! error {
    ($($arg:tt)*) => {
        $crate::log::line("error: ", format_args!($($arg)*))
    };
}

/// Something the operator should see even without debug mode.
macro_rules! info {
    ($($arg:tt)*) => {
        $crate::log::line("", format_args!($($arg)*))
    };
}

pub(crate) use {debug, error, info};
