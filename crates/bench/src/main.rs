//! `machinen-bench`: boots real VMs and measures boot, exec, port forwards,
//! snapshot, restore, fork, QEMU's own savevm/loadvm, memory and restore
//! time against the memory ceiling; prints a table and writes JSON. See
//! `docs/performance.md`.

mod boot;
mod chain;
mod containerd;
mod ctx;
mod exec;
mod fork;
mod host;
mod images;
mod memory;
mod mounts;
mod net;
mod plain;
mod ports;
mod qemu;
mod reclaim;
mod savevm;
mod scale;
mod snapshot;
mod stats;
mod transport;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use serde_json::json;

use crate::ctx::{Config, Ctx};
use crate::stats::Section;

/// Every section, in the order they run.
const SECTIONS: &[(&str, &str)] = &[
    (
        "plain",
        "plain QEMU boot of the same kernel and initramfs to init (the floor)",
    ),
    (
        "boot",
        "cold boot to agent-ready: base rootfs and a provisioned image",
    ),
    ("exec", "exec round-trip latency and stdout throughput"),
    ("ports", "port-forward request latency and throughput"),
    (
        "net",
        "guest download from outside and connections per second: passt (nat), with a 100-rule egress policy and without, next to QEMU user networking (nat-host)",
    ),
    (
        "snapshot",
        "snapshot time and bundle size (idle, N MiB touched), restore to ready",
    ),
    ("fork", "fork to ready and the source's pause"),
    (
        "chain",
        "checkpoint chains: deltas next to full bundles (size, time, pause), restore from the tip",
    ),
    (
        "transport",
        "bundles through a local OCI registry: push and pull throughput, what checkpoint 2 uploads",
    ),
    ("savevm", "QEMU's own savevm/loadvm of the same guest"),
    (
        "memory",
        "PSS of one VM with N MiB touched, plus sibling forks (one snapshot) or separate forks",
    ),
    (
        "scale",
        "restore to ready with a small vs a large memory ceiling, same memory touched",
    ),
    (
        "mounts",
        "file I/O on a copy-once mount next to the root disk, in one VM",
    ),
    (
        "containerd",
        "ctr run --rm IMAGE true: machinen's containerd shim next to runc and to machinen boot",
    ),
    (
        "images",
        "a ~200 MiB registry image: first boot (pull + unpack + boot) next to skopeo copy + a base boot; cached boot next to a base boot",
    ),
    (
        "reclaim",
        "host cost after the guest frees 1 GiB, with and without the balloon; idle VMs per 8 GiB",
    ),
];

#[derive(Parser, Debug)]
#[command(
    name = "machinen-bench",
    version,
    about = "Benchmark machinen on real VMs: prints a table and writes JSON"
)]
struct Args {
    /// One iteration and small sizes (CI: proves the benchmark still runs).
    #[arg(long)]
    quick: bool,
    /// Repetitions of boots, snapshots, restores, forks (default 7; 1 with --quick).
    #[arg(long)]
    runs: Option<usize>,
    /// Repetitions of the cheap latency measurements (default 30; 3 with --quick).
    #[arg(long)]
    reps: Option<usize>,
    /// Where to write the JSON report.
    #[arg(long, default_value = "target/bench/bench.json")]
    json_out: PathBuf,
    /// Also write the table as Markdown (for docs/performance.md).
    #[arg(long)]
    markdown_out: Option<PathBuf>,
    /// Run only these sections (repeatable or comma-separated): plain, boot,
    /// exec, ports, net, snapshot, fork, chain, transport, savevm, memory,
    /// scale, mounts, reclaim, containerd, images.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Guest RAM of every VM, MiB.
    #[arg(long, default_value_t = 512)]
    memory: u32,
    /// Memory the "touched" VMs fill (snapshot and memory sections), MiB (default 200; 16 with --quick).
    #[arg(long)]
    touched_mib: Option<u32>,
    /// Bytes streamed by the throughput measurements, MiB (default 64; 4 with --quick).
    #[arg(long)]
    stream_mib: Option<u32>,
    /// Forks next to the source in the memory section, as siblings and as separate forks (default 4; 2 with --quick).
    #[arg(long)]
    forks: Option<usize>,
    /// Measure only the exec round-trip of `true` in this live VM (name or
    /// pid, in the caller's registry) and print the latencies in ms as a
    /// JSON array: the Node binding's benchmark runs it beside its own.
    #[arg(long, value_name = "VM")]
    exec_rtt_of: Option<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    for s in &args.only {
        if !SECTIONS.iter().any(|(n, _)| n == s) {
            let names: Vec<&str> = SECTIONS.iter().map(|(n, _)| *n).collect();
            eprintln!(
                "error: unknown section {s:?}; sections: {}",
                names.join(", ")
            );
            return ExitCode::from(2);
        }
    }
    if let Some(vm) = args.exec_rtt_of.clone() {
        let reps = args.reps.unwrap_or(30).max(1);
        return match runtime() {
            Ok(rt) => match rt.block_on(exec::rtt_of(&vm, reps)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            },
            Err(code) => code,
        };
    }
    // An isolated registry (short path: unix socket paths are limited) and
    // scratch space, both removed at the end. Set before any thread starts.
    let tmp = |prefix: &str| tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp");
    let (registry, work) = match (tmp("mnb-"), tmp("mnb-work-")) {
        (Ok(r), Ok(w)) => (r, w),
        (Err(e), _) | (_, Err(e)) => {
            eprintln!("error: cannot create a temporary directory: {e}");
            return ExitCode::FAILURE;
        }
    };
    std::env::set_var(machinen_proto::env::REGISTRY_DIR, registry.path());
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(code) => return code,
    };
    let code = rt.block_on(run(args, work.path().to_path_buf()));
    drop(rt);
    drop(work);
    drop(registry);
    code
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("error: tokio runtime: {e}");
            ExitCode::FAILURE
        })
}

fn config(args: &Args) -> Config {
    let q = args.quick;
    Config {
        quick: q,
        runs: args.runs.unwrap_or(if q { 1 } else { 7 }).max(1),
        reps: args.reps.unwrap_or(if q { 3 } else { 30 }).max(1),
        memory_mib: args.memory,
        touched_mib: args.touched_mib.unwrap_or(if q { 16 } else { 200 }),
        stream_mib: args.stream_mib.unwrap_or(if q { 4 } else { 64 }).max(1),
        forks: args
            .forks
            .unwrap_or(if q { 2 } else { 4 })
            .clamp(1, machinen::restore::MAX_FORKS),
    }
}

async fn run(args: Args, work: PathBuf) -> ExitCode {
    let t0 = Instant::now();
    let ctx = Ctx {
        cfg: config(&args),
        work,
        guest: Default::default(),
    };
    let mut host = host::collect();
    eprintln!(
        "machinen-bench: accel {}, {} cores, {}, guest kernel {}, commit {}{}, load {}",
        host.accel,
        host.host_cores,
        host.qemu_version,
        host.guest_kernel,
        &host.git_commit[..host.git_commit.len().min(12)],
        if host.git_dirty { " (dirty)" } else { "" },
        host.loadavg_start
    );
    let selected: Vec<&str> = SECTIONS
        .iter()
        .map(|(n, _)| *n)
        .filter(|n| args.only.is_empty() || args.only.iter().any(|o| o == n))
        .collect();

    let mut rows = Vec::new();
    let mut sections = serde_json::Map::new();
    let mut failed = false;
    let mut interrupted = false;
    for name in &selected {
        eprintln!("[{name}]");
        let t = Instant::now();
        let mut sec = Section::new(name);
        if *name == "plain" && std::env::consts::ARCH != "x86_64" {
            // The init program of the plain boot is x86-64 machine code.
            eprintln!("  skipped: no init program for {}", std::env::consts::ARCH);
            sections.insert(
                name.to_string(),
                json!({"status": "skipped", "error": null, "elapsed_s": 0.0, "rows": []}),
            );
            continue;
        }
        let res = tokio::select! {
            r = run_section(&ctx, name, &mut sec) => Some(r),
            _ = tokio::signal::ctrl_c() => None,
        };
        // Whatever the section left running (after an error or Ctrl-C).
        stop_all().await;
        let (status, error) = match res {
            Some(Ok(())) => ("ok", None),
            Some(Err(e)) => {
                failed = true;
                eprintln!("  FAILED: {e:#}");
                ("failed", Some(format!("{e:#}")))
            }
            None => {
                interrupted = true;
                ("interrupted", None)
            }
        };
        sections.insert(
            name.to_string(),
            json!({"status": status, "error": error, "elapsed_s": t.elapsed().as_secs_f64(), "rows": sec.rows.iter().map(|r| r.key.clone()).collect::<Vec<_>>()}),
        );
        rows.extend(sec.rows);
        if interrupted {
            break;
        }
    }
    if let Some(g) = ctx.guest.get() {
        g.sweep_ram_files();
    }
    host.loadavg_end = host::loadavg();
    let ratios = stats::ratios(&rows);
    println!();
    print!("{}", stats::table(&rows, &ratios));
    let elapsed = t0.elapsed().as_secs_f64();
    println!(
        "\naccel {} · {} cores · {} · {} · load {} → {} · {:.0} s",
        host.accel,
        host.host_cores,
        host.qemu_version,
        host.guest_kernel,
        host.loadavg_start,
        host.loadavg_end,
        elapsed
    );
    let report = json!({
        "schema_version": 1,
        "tool": "machinen-bench",
        "host": host,
        "config": ctx.cfg,
        "sections": sections,
        "rows": rows,
        "ratios": ratios,
        "baseline_qemu_args": ctx.guest.get().map(|g| g.args.clone()),
        "elapsed_s": elapsed,
    });
    if let Err(e) = write(
        &args.json_out,
        &serde_json::to_string_pretty(&report).unwrap_or_default(),
    ) {
        eprintln!("error: writing {}: {e}", args.json_out.display());
        return ExitCode::FAILURE;
    }
    eprintln!("wrote {}", args.json_out.display());
    if let Some(md) = &args.markdown_out {
        if let Err(e) = write(md, &stats::markdown(&rows, &ratios)) {
            eprintln!("error: writing {}: {e}", md.display());
            return ExitCode::FAILURE;
        }
    }
    if interrupted {
        ExitCode::from(130)
    } else if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn write(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, text)
}

async fn run_section(ctx: &Ctx, name: &str, sec: &mut Section) -> anyhow::Result<()> {
    match name {
        "plain" => plain::run(ctx, sec).await,
        "boot" => boot::run(ctx, sec).await,
        "exec" => exec::run(ctx, sec).await,
        "ports" => ports::run(ctx, sec).await,
        "net" => net::run(ctx, sec).await,
        "snapshot" => snapshot::run(ctx, sec).await,
        "fork" => fork::run(ctx, sec).await,
        "chain" => chain::run(ctx, sec).await,
        "transport" => transport::run(ctx, sec).await,
        "savevm" => savevm::run(ctx, sec).await,
        "memory" => memory::run(ctx, sec).await,
        "scale" => scale::run(ctx, sec).await,
        "mounts" => mounts::run(ctx, sec).await,
        "reclaim" => reclaim::run(ctx, sec).await,
        "containerd" => containerd::run_section(ctx, sec).await,
        "images" => images::run_section(ctx, sec).await,
        other => anyhow::bail!("unknown section {other}"),
    }
}

/// Stop every VM in our (private) registry.
async fn stop_all() {
    let Ok(vms) = machinen::list() else { return };
    for info in vms {
        if let Ok(vm) = machinen::attach(&info.pid.to_string()).await {
            let _ = vm.stop(true, ctx::STOP_TIMEOUT).await;
        }
    }
}
