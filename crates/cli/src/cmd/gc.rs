//! `machinen gc [--dry-run]`

use machinen::Result;

use crate::cli::GcArgs;
use crate::output::print_json;

pub fn run(a: GcArgs) -> Result<i32> {
    let report = machinen::gc(a.dry_run)?;
    if a.json {
        print_json(&report);
        return Ok(0);
    }
    let verb = if a.dry_run { "would remove" } else { "removed" };
    for i in &report.removed {
        let who = i.name.as_deref().unwrap_or("(unnamed)");
        match &i.cause {
            Some(cause) => crate::outln!(
                "{verb} {who} [{}]: {}: {} ({} KiB)",
                i.id,
                i.reason,
                cause.replace('\n', " "),
                i.bytes / 1024
            ),
            None => crate::outln!(
                "{verb} {who} [{}]: {} ({} KiB)",
                i.id,
                i.reason,
                i.bytes / 1024
            ),
        }
    }
    if report.removed.is_empty() {
        crate::outln!("nothing to clean up");
    } else {
        crate::outln!(
            "{verb} {} entr{}, {} MiB",
            report.removed.len(),
            if report.removed.len() == 1 {
                "y"
            } else {
                "ies"
            },
            report.bytes / (1024 * 1024)
        );
    }
    Ok(0)
}
