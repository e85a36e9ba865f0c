//! `machinen stop TARGET [--force]`

use std::time::Duration;

use machinen::Result;

use crate::cli::StopArgs;
use crate::output::print_json;

pub async fn run(a: StopArgs) -> Result<i32> {
    let vm = machinen::attach(&a.target).await?;
    let report = vm.stop(a.force, Duration::from_secs(a.timeout)).await?;
    if a.json {
        print_json(&report);
    } else if report.killed {
        println!(
            "{} (pid {}) killed after {} s",
            report.name, report.pid, a.timeout
        );
    } else {
        println!("{} (pid {}) stopped", report.name, report.pid);
    }
    Ok(0)
}
