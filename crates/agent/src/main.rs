//! machinen-agent: the guest agent.
//!
//! In the guest it is `/init` of the initramfs: as PID 1 it mounts the root
//! disk, switches into it, sets up the system (see [`init`]), then serves the
//! host over the virtio-serial port `org.machinen.agent` (see [`port`] and
//! [`server`]) while reaping every process (see [`reaper`]).
//!
//! Run as any other PID it skips the system setup ("host test mode") and
//! serves, so the serving logic can be tried on a development machine:
//!
//! ```text
//! machinen-agent --listen /tmp/agent.sock   # each connection is a session
//! machinen-agent --port /dev/vport0p1       # a virtio-serial port
//! machinen-agent                            # find the port by name in sysfs
//! ```

mod capture;
mod checkpoint;
mod cmdline;
mod criu;
mod dirs;
mod egress;
mod exec;
mod fdio;
mod files;
mod fixup;
mod forward;
mod growfs;
mod init;
mod log;
#[cfg(target_arch = "x86_64")]
mod materialize;
mod mounts;
mod net;
mod port;
mod reaper;
mod secrets;
mod server;
mod service;
mod tcpreset;
mod user;
mod zalloc;

/// Every heap block is zeroed when freed: see [`zalloc`].
#[global_allocator]
static ALLOC: zalloc::ZeroOnFree = zalloc::ZeroOnFree;

use machinen_proto::timeouts;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::Arc;

use machinen_proto::AGENT_PORT_NAME;

use crate::log::{debug, error, info};
use crate::reaper::Reaper;
use crate::server::Ctx;

fn main() {
    if nix::unistd::getpid().as_raw() == 1 {
        pid1_main()
    } else {
        std::process::exit(host_main())
    }
}

fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        error!("internal error (panic): {info}");
    }));
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The guest's init. Never returns: PID 1 exiting panics the kernel.
fn pid1_main() -> ! {
    init::ensure_stdio();
    install_panic_hook();
    let cfg = match catch_unwind(init::boot) {
        Ok(Ok(cfg)) => cfg,
        Ok(Err(init::Fatal(msg))) => init::fatal(&msg),
        Err(_) => init::fatal("the boot sequence panicked"),
    };
    // Start reaping before anything can be spawned.
    Reaper::global();
    let hostname = match net::hostname() {
        h if !h.is_empty() => h,
        _ => cfg.hostname().to_owned(),
    };
    let ctx = Arc::new(Ctx {
        hostname,
        kernel: init::kernel_release(),
        boot_id: init::boot_id(),
        poweroff: Box::new(init::poweroff),
        main: Default::default(),
    });
    debug!("kernel {}, boot id {}", ctx.kernel, ctx.boot_id);
    loop {
        let ctx = ctx.clone();
        let res = catch_unwind(AssertUnwindSafe(move || -> std::io::Result<()> {
            let rt = runtime()?;
            rt.block_on(async move {
                let path = port::wait_for_port(AGENT_PORT_NAME).await;
                port::serve_port(&path, ctx).await;
            });
            Ok(())
        }));
        match res {
            Ok(Ok(())) => error!("the serving loop ended; restarting it"),
            Ok(Err(e)) => error!("cannot start the serving loop: {e}; retrying"),
            Err(_) => error!("the serving loop panicked; restarting it"),
        }
        std::thread::sleep(timeouts::SERVE_RESTART);
    }
}

enum Transport {
    Listen(PathBuf),
    Port(PathBuf),
    FindPort,
}

const USAGE: &str = "usage: machinen-agent [--debug] [--listen SOCKET | --port DEVICE]

As PID 1 (the guest's /init) it boots the guest and serves the host over the
virtio-serial port org.machinen.agent. Otherwise (host test mode) it only
serves: on a unix socket (--listen, one session per connection), on a given
port device (--port), or on the port found by name in /sys/class/virtio-ports.";

fn host_main() -> i32 {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("--capture") {
        // A process of the guest captured as a native process image (run
        // by the host through an exec of /proc/1/exe).
        return capture::main(&argv[1..]);
    }
    if argv.first().map(String::as_str) == Some("--criu") {
        // CRIU run from the tree the host staged (`machinen criu`).
        return criu::main(&argv[1..]);
    }
    if argv.first().map(String::as_str) == Some("--materialize") {
        // A native process image brought back as a process of this guest.
        #[cfg(target_arch = "x86_64")]
        return materialize::main(&argv[1..]);
        #[cfg(not(target_arch = "x86_64"))]
        {
            eprintln!("materialize: built for amd64 guests only");
            return 125;
        }
    }
    install_panic_hook();
    let mut transport = Transport::FindPort;
    let mut args = std::env::args_os().skip(1);
    let debug_env = std::env::var_os(machinen_proto::env::AGENT_DEBUG).is_some_and(|v| v == "1");
    log::set_debug(debug_env);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("--debug") => log::set_debug(true),
            Some("--listen") | Some("--port") => {
                let Some(v) = args.next() else {
                    eprintln!("{USAGE}");
                    return 2;
                };
                transport = if arg == "--listen" {
                    Transport::Listen(PathBuf::from(v))
                } else {
                    Transport::Port(PathBuf::from(v))
                };
            }
            Some("--version") | Some("-V") => {
                println!("machinen-agent {}", env!("CARGO_PKG_VERSION"));
                return 0;
            }
            Some("--help") | Some("-h") => {
                println!("{USAGE}");
                return 0;
            }
            _ => {
                eprintln!("machinen-agent: unknown argument {arg:?}\n{USAGE}");
                return 2;
            }
        }
    }
    Reaper::global();
    let ctx = Arc::new(Ctx {
        hostname: net::hostname(),
        kernel: init::kernel_release(),
        boot_id: init::boot_id(),
        poweroff: Box::new(|| {
            info!("poweroff requested (host test mode): exiting");
            std::process::exit(0);
        }),
        main: Default::default(),
    });
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            error!("cannot build the runtime: {e}");
            return 1;
        }
    };
    rt.block_on(async move {
        match transport {
            Transport::Listen(path) => listen(&path, ctx).await,
            Transport::Port(path) => {
                port::serve_port(&path, ctx).await;
                1
            }
            Transport::FindPort => {
                let path = port::wait_for_port(AGENT_PORT_NAME).await;
                port::serve_port(&path, ctx).await;
                1
            }
        }
    })
}

/// Host test mode: every connection to the unix socket is a session.
async fn listen(path: &std::path::Path, ctx: Arc<Ctx>) -> i32 {
    let _ = std::fs::remove_file(path);
    let listener = match tokio::net::UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            error!("bind {}: {e}", path.display());
            return 1;
        }
    };
    info!("listening on {}", path.display());
    loop {
        match listener.accept().await {
            Ok((conn, _)) => {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    match server::serve_session(conn, ctx).await {
                        Ok(()) => debug!("session ended"),
                        Err(e) => debug!("session ended: {e}"),
                    }
                });
            }
            Err(e) => {
                error!("accept: {e}");
                tokio::time::sleep(timeouts::ACCEPT_RETRY).await;
            }
        }
    }
}
