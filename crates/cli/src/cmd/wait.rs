//! `machinen wait TARGET [--timeout SECS] [--json]`

use std::time::Duration;

use machinen::service::WaitOutcome;
use machinen::Result;

use crate::cli::WaitArgs;
use crate::output::print_json;

pub async fn run(a: WaitArgs) -> Result<i32> {
    let (entry, outcome) =
        machinen::service::wait(&a.target, a.timeout.map(Duration::from_secs)).await?;
    let code = outcome.exit_code();
    if a.json {
        let mut v = serde_json::to_value(&outcome).unwrap_or_default();
        v["name"] = entry.name.clone().into();
        v["id"] = entry.id.clone().into();
        v["exit_code"] = code.into();
        print_json(&v);
    } else {
        // On stderr: the exit status is the answer; stdout stays clean.
        match &outcome {
            WaitOutcome::Exited { status, .. } => {
                let how = match (status.code, status.signal) {
                    (Some(c), _) => format!("exited with status {c}"),
                    (None, Some(s)) => format!("was killed by signal {s}"),
                    _ => "ended".into(),
                };
                eprintln!("{}: the main command {how}", entry.name);
            }
            WaitOutcome::Stopped => eprintln!("{}: the VM was stopped", entry.name),
            WaitOutcome::Crashed { cause } => eprintln!("{}: the VM crashed: {cause}", entry.name),
        }
    }
    Ok(code)
}
