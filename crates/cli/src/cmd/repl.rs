//! `machinen repl TARGET`: each input line runs as its own command.

use std::io::{IsTerminal, Write};

use machinen::{ExecOptions, Result};

use crate::cli::ReplArgs;

pub async fn run(a: ReplArgs) -> Result<i32> {
    let base = super::exec::exec_options(&a.process, vec!["true".into()])?;
    let vm = machinen::attach(&a.target).await?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        eprintln!("machinen repl on {}: each line runs as `sh -c LINE` (state does not carry over); Ctrl-D to quit", vm.name());
    }
    let mut last = 0;
    let mut pending: Vec<u8> = Vec::new();
    let mut chunks = machinen::terminal::stdin_chunks().lock().await;
    let mut eof = false;
    loop {
        if interactive {
            eprint!("{}> ", vm.name());
            let _ = std::io::stderr().flush();
        }
        // One line from stdin (the shared reader: never two readers on stdin).
        let line = loop {
            if let Some(i) = pending.iter().position(|&b| b == b'\n') {
                let l: Vec<u8> = pending.drain(..=i).collect();
                break Some(l);
            }
            if eof {
                break if pending.is_empty() {
                    None
                } else {
                    Some(std::mem::take(&mut pending))
                };
            }
            match chunks.recv().await {
                Some(b) if !b.is_empty() => pending.extend_from_slice(&b),
                _ => eof = true,
            }
        };
        let Some(line) = line else { break };
        let line = String::from_utf8_lossy(&line).trim().to_string();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if interactive && (line == "exit" || line == "quit") {
            break;
        }
        let opts = ExecOptions {
            argv: vec!["sh".into(), "-c".into(), line.clone()],
            ..base.clone()
        };
        let mut out = tokio::io::stdout();
        let mut err = tokio::io::stderr();
        match vm
            .exec_stream(opts, tokio::io::empty(), &mut out, &mut err)
            .await
        {
            Ok(st) => {
                last = st.shell_code();
                if interactive && last != 0 {
                    eprintln!("[exit {last}]");
                }
            }
            Err(e) => {
                crate::output::print_error(&e, false);
                last = e.code().exit_code();
                // The VM is gone: no point reading on.
                if e.code() == machinen::ErrorCode::ExecVsockUnavailable {
                    return Ok(last);
                }
            }
        }
    }
    if interactive {
        eprintln!();
    }
    Ok(last)
}
