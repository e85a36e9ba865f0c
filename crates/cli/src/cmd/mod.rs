//! One module per subcommand.

mod boot;
mod exec;
mod gc;
mod install;
mod ls;
mod stop;

use machinen::Result;

use crate::cli::Command;

/// Run a parsed command; returns the process exit code.
pub async fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Boot(a) => boot::run(a).await,
        Command::Exec(a) => exec::run(a).await,
        Command::Ls(a) => ls::run(a),
        Command::Stop(a) => stop::run(a).await,
        Command::Gc(a) => gc::run(a),
        Command::Install(a) => install::run(a).await,
    }
}
