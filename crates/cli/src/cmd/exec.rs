//! `machinen exec TARGET -- CMD…`

use machinen::vm::{parse_env_pair, ExecOptions};
use machinen::{Result, Vm};
use serde::Serialize;

use crate::cli::{ExecArgs, ProcessArgs};
use crate::output::print_json;

pub fn exec_options(p: &ProcessArgs, argv: Vec<String>) -> Result<ExecOptions> {
    let env = p
        .env
        .iter()
        .map(|s| parse_env_pair(s))
        .collect::<Result<Vec<_>, _>>()?;
    let opts = ExecOptions {
        rlimits: Vec::new(),
        argv,
        env,
        cwd: p.cwd.clone(),
        user: p.user.clone(),
    };
    machinen::vm::validate_exec(&opts)?;
    Ok(opts)
}

#[derive(Serialize)]
struct ExecJson<'a> {
    name: &'a str,
    exit_code: i32,
    code: Option<i32>,
    signal: Option<i32>,
    stdout: String,
    stderr: String,
}

/// Run `opts` in `vm` with this process's stdio (streamed), or captured
/// into one JSON object. Returns the shell-style exit code.
pub async fn run_in(vm: &Vm, opts: ExecOptions, json: bool) -> Result<i32> {
    run_in_timeout(vm, opts, json, None).await
}

/// [`run_in`], killing the command after `timeout` (`EXEC_TIMEOUT`).
pub async fn run_in_timeout(
    vm: &Vm,
    opts: ExecOptions,
    json: bool,
    timeout: Option<std::time::Duration>,
) -> Result<i32> {
    if json {
        let out = vm.exec_timeout(opts, timeout).await?;
        print_json(&ExecJson {
            name: vm.name(),
            exit_code: out.status.shell_code(),
            code: out.status.code,
            signal: out.status.signal,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
        return Ok(out.status.shell_code());
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = vm
        .exec_stream_timeout(opts, timeout, tokio::io::stdin(), &mut stdout, &mut stderr)
        .await?;
    Ok(status.shell_code())
}

/// Run `opts` on a guest pty connected to this terminal (raw mode, window
/// size, keys forwarded). Returns the shell-style exit code.
pub async fn run_tty(vm: &Vm, opts: ExecOptions) -> Result<i32> {
    Ok(machinen::terminal::run_interactive(vm, opts)
        .await?
        .shell_code())
}

pub async fn run(a: ExecArgs) -> Result<i32> {
    let opts = exec_options(&a.process, a.cmd)?;
    let vm = machinen::attach(&a.target).await?;
    if a.tty {
        return Ok(
            machinen::terminal::run_interactive_timeout(&vm, opts, a.timeout)
                .await?
                .shell_code(),
        );
    }
    run_in_timeout(&vm, opts, a.json, a.timeout).await
}
