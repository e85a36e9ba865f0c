//! `machinen`: the command-line interface. Parses arguments, calls the
//! library, prints results (human or `--json`), maps errors to exit codes.

mod args;
mod cli;
mod cmd;
mod output;

use clap::Parser;

fn main() {
    let cli = cli::Cli::parse();
    if !cli.insecure_registry.is_empty() {
        // Read by the library wherever it reaches a registry; set before
        // any thread starts.
        let var = machinen_proto::env::INSECURE_REGISTRIES;
        let mut list: Vec<String> = std::env::var(var)
            .ok()
            .filter(|v| !v.is_empty())
            .into_iter()
            .collect();
        list.extend(cli.insecure_registry.iter().cloned());
        std::env::set_var(var, list.join(","));
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(machinen_proto::env::LOG)
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .without_time()
        .with_target(false)
        .init();
    let json = cli.command.json();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(125);
        }
    };
    let code = match rt.block_on(cmd::run(cli.command)) {
        Ok(code) => code,
        Err(e) => {
            output::print_error(&e, json);
            e.code().exit_code()
        }
    };
    // Exit without waiting for blocked stdin readers.
    rt.shutdown_background();
    std::process::exit(code);
}
