//! `machinen logs TARGET [-f] [--tail N|all] [--since …] [--json] [--console | --vmm | --qemu]`

use std::io::Write;

use machinen::error::fail;
use machinen::service::{self, LogEvent, LogRecord, LogSource, LogStream};
use machinen::{ErrorCode, Result};

use crate::cli::LogsArgs;

pub async fn run(a: LogsArgs) -> Result<i32> {
    let lines = super::attach::tail_lines(&a.tail)?;
    let logs = machinen::logs(&a.target)?;
    if let Some(cause) = &logs.cause {
        // On stderr: stdout stays the log itself, for pipes.
        eprintln!("{} [{}] {}: {cause}", logs.name, logs.id, logs.state);
    }
    if a.vmm || a.qemu {
        let path = if a.vmm { &logs.vmm } else { &logs.qemu };
        super::attach::print_tail(path, lines)?;
        return Ok(0);
    }
    let entry = logs.entry.clone();
    // The main command's output by default; the console for a VM that has
    // no main command (as `logs` always showed) or with --console.
    let has_main = entry.as_ref().is_some_and(|e| e.main.is_some());
    if a.console || !has_main {
        if a.since.is_some() || a.json {
            return Err(fail(
                ErrorCode::BootArgsInvalid,
                format!(
                    "VM {:?} has no main command: --since and --json apply to its output",
                    logs.name
                ),
            )
            .hint("drop --since/--json to read the console")
            .into());
        }
        let follower = match (&entry, a.follow) {
            (Some(e), true) => Some(service::LogFollower::new(
                e,
                &logs.dir,
                LogSource::Console,
                false,
            )),
            _ => None,
        };
        super::attach::print_tail(&logs.console, lines)?;
        if let Some(f) = follower {
            follow(f, false).await;
        }
        return Ok(0);
    }
    let since = match &a.since {
        Some(s) => Some(service::parse_since(s, machinen::registry::now_ms())?),
        None => None,
    };
    // The follower first, at the log's end; then the history: nothing is
    // missed in between, and records seen in both are skipped.
    let mut follower = match (&entry, a.follow) {
        (Some(e), true) => Some(service::LogFollower::new(
            e,
            &logs.dir,
            LogSource::Main,
            false,
        )),
        _ => None,
    };
    let dir = logs.dir.clone();
    let records = tokio::task::spawn_blocking(move || service::read_records(&dir))
        .await
        .map_err(|e| fail(ErrorCode::Io, "reading the log failed").source(e))?
        .map_err(|e| {
            fail(
                ErrorCode::Io,
                format!("cannot read the main log in {}", logs.dir.display()),
            )
            .source(e)
        })?;
    let ended = records.iter().any(|r| r.stream == LogStream::Exit);
    let last_seq = records
        .iter()
        .filter(|r| r.stream != LogStream::Exit)
        .map(|r| r.seq)
        .max();
    for r in service::select(records, lines, since) {
        print_record(&r, a.json);
    }
    if let Some(mut f) = follower.take().filter(|_| !ended) {
        if let Some(s) = last_seq {
            f.skip_through(s);
        }
        follow(f, a.json).await;
    }
    Ok(0)
}

fn print_record(r: &LogRecord, json: bool) {
    if json {
        crate::output::print_json(r);
        return;
    }
    match r.stream {
        LogStream::Stdout | LogStream::Console => write_out(false, &r.bytes()),
        LogStream::Stderr => write_out(true, &r.bytes()),
        LogStream::Exit | LogStream::Gap => {}
    }
}

fn write_out(stderr: bool, bytes: &[u8]) {
    if stderr {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(bytes);
        let _ = e.flush();
    } else {
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(bytes);
        let _ = o.flush();
    }
}

/// Print events until the log ends (the VM ended, or the main command's
/// exit was read).
async fn follow(mut f: service::LogFollower, json: bool) {
    while let Some(ev) = f.next().await {
        match ev {
            LogEvent::Chunk {
                stream,
                data,
                t_ms,
                seq,
            } => {
                if json {
                    let r = LogRecord {
                        t_ms,
                        ..LogRecord::chunk(seq, stream, &data)
                    };
                    crate::output::print_json(&r);
                } else {
                    write_out(stream == LogStream::Stderr, &data);
                }
            }
            LogEvent::Exit(status) => {
                if json {
                    crate::output::print_json(&LogRecord::exit(0, status));
                }
            }
        }
    }
}
