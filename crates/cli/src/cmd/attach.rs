//! `machinen attach TARGET [--shell CMD] [--tail [N]]`

use std::io::{BufRead, Write};

use machinen::error::fail;
use machinen::vm::ExecOptions;
use machinen::{ErrorCode, Result};

use crate::cli::AttachArgs;

/// The login shell: bash where the image has it, else sh.
pub const LOGIN_SHELL: &str =
    "if command -v bash >/dev/null 2>&1; then exec bash -l -i; else exec sh -l -i; fi";

/// The command of an interactive session: `--shell CMD` (through `sh -c`),
/// else the login shell.
pub fn shell_argv(shell: Option<&str>) -> Vec<String> {
    let script = shell.unwrap_or(LOGIN_SHELL);
    vec!["sh".into(), "-c".into(), script.into()]
}

/// `--tail` value: a line count, or `all`.
pub fn tail_lines(v: &str) -> Result<Option<usize>> {
    if v == "all" {
        return Ok(None);
    }
    v.parse::<usize>().map(Some).map_err(|_| {
        fail(
            ErrorCode::BootArgsInvalid,
            format!("--tail {v:?} is not a number of lines"),
        )
        .hint("e.g. --tail 50, or --tail all")
        .into()
    })
}

/// Largest part of a console log that `--tail all` prints.
const TAIL_CAP: u64 = 4 * 1024 * 1024;

/// Print the last `lines` lines (or the last [`TAIL_CAP`] bytes) of `log`.
pub fn print_tail(log: &std::path::Path, lines: Option<usize>) -> Result<()> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(log).map_err(|e| {
        fail(
            ErrorCode::Io,
            format!("cannot open the log {}", log.display()),
        )
        .source(e)
    })?;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_CAP);
    f.seek(SeekFrom::Start(start)).map_err(|e| {
        fail(
            ErrorCode::Io,
            format!("cannot read the log {}", log.display()),
        )
        .source(e)
    })?;
    let mut all: Vec<String> = std::io::BufReader::new(f)
        .split(b'\n')
        .map_while(|l| l.ok())
        .map(|l| {
            String::from_utf8_lossy(&l)
                .trim_end_matches('\r')
                .to_string()
        })
        .collect();
    if start > 0 && !all.is_empty() {
        all.remove(0); // a partial first line
    }
    let skip = lines.map(|n| all.len().saturating_sub(n)).unwrap_or(0);
    let mut out = std::io::stdout().lock();
    for l in &all[skip..] {
        let _ = writeln!(out, "{l}");
    }
    let _ = out.flush();
    Ok(())
}

pub async fn run(a: AttachArgs) -> Result<i32> {
    let vm = machinen::attach(&a.target).await?;
    if let Some(t) = &a.tail {
        let lines = tail_lines(t)?;
        match &vm.info().console_log {
            Some(log) => print_tail(log, lines)?,
            None => eprintln!("(no console log for {})", vm.name()),
        }
    }
    let opts = ExecOptions {
        rlimits: Vec::new(),
        argv: shell_argv(a.shell.as_deref()),
        env: vec![],
        cwd: Some("/root".into()),
        user: None,
    };
    super::exec::run_tty(&vm, opts).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_values() {
        assert_eq!(tail_lines("all").expect("all"), None);
        assert_eq!(tail_lines("5").expect("5"), Some(5));
        assert!(tail_lines("x").is_err());
        assert_eq!(shell_argv(Some("python3")), vec!["sh", "-c", "python3"]);
    }

    #[test]
    fn tail_prints_the_last_lines() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("console.log");
        std::fs::write(&p, "a\nb\r\nc\n").expect("write");
        print_tail(&p, Some(2)).expect("tail");
        print_tail(&p, None).expect("all");
    }
}
