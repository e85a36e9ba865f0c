//! `machinen logs TARGET [--vmm | --qemu] [--tail N|all]`

use machinen::Result;

use crate::cli::LogsArgs;

pub fn run(a: LogsArgs) -> Result<i32> {
    let lines = super::attach::tail_lines(&a.tail)?;
    let logs = machinen::logs(&a.target)?;
    if let Some(cause) = &logs.cause {
        // On stderr: stdout stays the log itself, for pipes.
        eprintln!("{} [{}] crashed: {cause}", logs.name, logs.id);
    }
    let path = if a.vmm {
        &logs.vmm
    } else if a.qemu {
        &logs.qemu
    } else {
        &logs.console
    };
    super::attach::print_tail(path, lines)?;
    Ok(0)
}
