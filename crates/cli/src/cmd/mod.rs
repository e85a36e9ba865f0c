//! One module per subcommand.

mod agent_context;
mod attach;
mod balloon;
mod boot;
mod build;
mod bundle;
mod completion;
mod cp;
mod exec;
mod feedback;
mod gc;
mod image;
mod images;
mod install;
mod kill;
mod logs;
mod ls;
mod mux;
mod network;
mod provision;
mod pull;
mod repl;
mod snapshot;
mod stats;
mod stop;
mod wait;

use machinen::Result;

use crate::cli::Command;

/// Run a parsed command; returns the process exit code.
pub async fn run(cmd: Command) -> Result<i32> {
    match cmd {
        Command::Boot(a) => boot::run(a).await,
        Command::Exec(a) => exec::run(a).await,
        Command::Attach(a) => attach::run(a).await,
        Command::Repl(a) => repl::run(a).await,
        Command::Cp(a) => cp::run(a).await,
        Command::Mux(a) => mux::run(a).await,
        Command::AgentContext(_) => agent_context::run(),
        Command::Completion(a) => completion::run(a),
        Command::VmNames => completion::vm_names(),
        Command::Snapshot(a) => snapshot::run(a).await,
        Command::Restore(a) => snapshot::restore(a).await,
        Command::Fork(a) => snapshot::fork(a).await,
        Command::Ls(a) => ls::run(a),
        Command::Stats(a) => stats::run(a).await,
        Command::Balloon(a) => balloon::run(a).await,
        Command::Network(a) => network::run(a).await,
        Command::Logs(a) => logs::run(a).await,
        Command::Wait(a) => wait::run(a).await,
        Command::Kill(a) => kill::run(a).await,
        Command::Stop(a) => stop::run(a).await,
        Command::Gc(a) => gc::run(a),
        Command::Install(a) => install::run(a).await,
        Command::Provision(a) => provision::run(a).await,
        Command::Build(a) => build::run(a).await,
        Command::Feedback(a) => feedback::run(a),
        Command::Pull(a) => pull::run(a).await,
        Command::Push(a) => pull::push(a).await,
        Command::Images(a) => images::run(a).await,
        Command::Bundle(a) => bundle::run(a).await,
        Command::Image(a) => image::run(a),
        Command::Capture(a) => image::capture(a).await,
        Command::Materialize(a) => image::materialize(a).await,
        Command::Criu(a) => image::criu(a).await,
    }
}
