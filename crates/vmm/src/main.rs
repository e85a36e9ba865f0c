//! `machinen-vmm --spec <vm-dir>/spec.json`: the per-VM supervisor.
//!
//! Started by the machinen library, never by hand. It prints one ready line
//! on stdout (see `machinen::spec::ReadyLine`) and logs to stderr.

mod agent;
mod balloon;
mod console;
mod control;
mod controller;
mod dirty;
mod egress;
mod engine;
#[cfg(test)]
mod fake_agent;
mod keeper;
mod lifecycle;
mod netfilter;
mod ports;
mod service;
mod snapshot;
mod startup;
mod supervisor;

use std::path::PathBuf;

fn main() {
    // Everything this process and its children (QEMU, the `cat` of a
    // snapshot) create holds guest data or controls the VM: owner only.
    // Files are also created with explicit modes; this covers what QEMU
    // makes itself (its sockets).
    // SAFETY: umask only sets the process's file mode creation mask; no
    // memory is involved and no other thread exists yet.
    unsafe {
        libc::umask(0o077);
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(machinen_proto::env::LOG)
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let mut args = std::env::args_os().skip(1);
    let spec_path = match (args.next(), args.next()) {
        (Some(flag), Some(p)) if flag == "--spec" => PathBuf::from(p),
        _ => {
            eprintln!(
                "usage: machinen-vmm --spec <vm-dir>/spec.json (started by machinen, not by hand)"
            );
            std::process::exit(2);
        }
    };
    let spec = match machinen::spec::VmSpec::load(&spec_path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("machinen-vmm: cannot read {}: {e}", spec_path.display());
            std::process::exit(2);
        }
    };
    // One thread: QEMU's parent-death signal is tied to the spawning thread,
    // which must therefore live as long as the process.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("machinen-vmm: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(supervisor::run(spec));
    std::process::exit(code);
}
