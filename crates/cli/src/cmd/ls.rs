//! `machinen ls|list|ps`

use machinen::Result;

use crate::cli::LsArgs;
use crate::output::{human_duration, print_json};

pub fn run(a: LsArgs) -> Result<i32> {
    let vms = machinen::list_all()?;
    if a.json {
        print_json(&vms);
        return Ok(0);
    }
    let (crashed, live): (Vec<_>, Vec<_>) = vms.iter().partition(|v| !v.state.is_live());
    let rows: Vec<[String; 6]> = live
        .iter()
        .map(|v| {
            let ports = v
                .ports
                .iter()
                .map(machinen::ports::display)
                .collect::<Vec<_>>()
                .join(",");
            [
                v.pid.to_string(),
                v.name.clone(),
                // A VM kept alive after its main command exited says so.
                v.main
                    .as_ref()
                    .and_then(|m| m.status_text())
                    .filter(|_| v.state == machinen_proto::VmState::Running)
                    .unwrap_or_else(|| v.state.to_string()),
                human_duration(v.uptime_ms),
                ports,
                v.forked_from.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print_table(
        ["PID", "NAME", "STATUS", "UP", "PORTS", "FORKED-FROM"].map(String::from),
        &rows,
    );
    // A VM that is not healthy says why, below the table.
    for v in &live {
        if let Some(reason) = &v.reason {
            crate::outln!("{} is {}: {reason}", v.name, v.state);
        }
    }
    if !crashed.is_empty() {
        crate::outln!(
            "\nended: crashed, or exited with their main command (`machinen logs NAME|ID` shows the output or console, `machinen gc` removes them):"
        );
        let rows: Vec<[String; 3]> = crashed
            .iter()
            .map(|v| {
                [
                    v.id.clone(),
                    v.name.clone(),
                    v.cause.clone().unwrap_or_default().replace('\n', " "),
                ]
            })
            .collect();
        print_table(["ID", "NAME", "CAUSE"].map(String::from), &rows);
    }
    Ok(0)
}

pub(crate) fn print_table<const N: usize>(header: [String; N], rows: &[[String; N]]) {
    let mut widths = header.clone().map(|h| h.len());
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = r
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::outln!("{}", line.join("  ").trim_end());
    }
}
