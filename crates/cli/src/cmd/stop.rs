//! `machinen stop TARGET [--force] [--dry-run]`

use std::time::Duration;

use machinen::Result;
use serde::Serialize;

use crate::cli::StopArgs;
use crate::output::print_json;

/// What `stop --dry-run` would do.
#[derive(Serialize)]
struct DryRun<'a> {
    dry_run: bool,
    name: &'a str,
    pid: u32,
    state: String,
    /// `graceful` (guest power-off, killed after `timeout_secs`) or `force`.
    how: &'static str,
    timeout_secs: u64,
}

pub async fn run(a: StopArgs) -> Result<i32> {
    let vm = machinen::attach(&a.target).await?;
    if a.dry_run {
        let how = if a.force { "force" } else { "graceful" };
        if a.json {
            print_json(&DryRun {
                dry_run: true,
                name: vm.name(),
                pid: vm.pid(),
                state: vm.info().state.to_string(),
                how,
                timeout_secs: a.timeout,
            });
        } else if a.force {
            crate::outln!(
                "would stop {} (pid {}, {}) at once (--force); nothing was stopped",
                vm.name(),
                vm.pid(),
                vm.info().state
            );
        } else {
            crate::outln!(
                "would stop {} (pid {}, {}): guest power-off, killed after {} s; nothing was stopped",
                vm.name(),
                vm.pid(),
                vm.info().state,
                a.timeout
            );
        }
        return Ok(0);
    }
    let report = vm.stop(a.force, Duration::from_secs(a.timeout)).await?;
    if a.json {
        print_json(&report);
    } else if report.killed {
        crate::outln!(
            "{} (pid {}) killed after {} s",
            report.name,
            report.pid,
            a.timeout
        );
    } else {
        crate::outln!("{} (pid {}) stopped", report.name, report.pid);
    }
    Ok(0)
}
