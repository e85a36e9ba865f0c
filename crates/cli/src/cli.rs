//! The command-line grammar. Arguments become typed settings here, at the
//! edge; the `cmd` modules receive them already checked by clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use machinen_proto::timeouts;

pub use crate::args::{
    AgentContextArgs, AttachArgs, CompletionArgs, CpArgs, MuxArgs, ReplArgs, SecretArgs,
};

const AFTER_HELP: &str = "\
Examples:
  machinen install                          fetch the kernel, build the Debian base
  machinen boot -- uname -a                 boot, run one command, exit with its code
  machinen boot --name web --detached       boot in the background
  machinen exec web -- cat /etc/os-release  run a command in a live VM
  machinen ls                               list live VMs, and crashed ones with the cause
  machinen logs web                         print a VM's console log (live or crashed)
  machinen stop web                         stop a VM

Exit codes: a command run in a VM passes its own exit status through (128+N
when killed by signal N). machinen's own failures exit with 125, 126 (command
cannot run), 127 (command not found), 124 (exec --timeout expired) or 2 (bad
arguments); the error line names
a stable code such as REGISTRY_NAME_IN_USE.
";

/// The examples and exit codes, then the environment variables from their
/// one list (`machinen_proto::env`).
fn after_help() -> String {
    format!(
        "{AFTER_HELP}\n{}",
        machinen_proto::env::help_text().trim_end()
    )
}

#[derive(Debug, Parser)]
#[command(
    name = "machinen",
    version = concat!(env!("CARGO_PKG_VERSION"), " (protocol ", "1", ")"),
    about = "Linux microVMs that can be frozen, moved, resumed and forked",
    after_help = after_help(),
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Reach this registry over plain HTTP (repeatable; also MACHINEN_INSECURE_REGISTRIES), for images named HOST[:PORT]/REPO[:TAG].
    #[arg(long, global = true, value_name = "HOST[:PORT]")]
    pub insecure_registry: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Boot a VM; run a command in it, or keep it running with --detached.
    Boot(BootArgs),
    /// Run a command in a live VM.
    Exec(ExecArgs),
    /// Open an interactive shell in a live VM.
    Attach(AttachArgs),
    /// Run each input line as its own command in a live VM.
    Repl(ReplArgs),
    /// Copy a file, or a directory tree with -r, into or out of a live VM.
    Cp(CpArgs),
    /// One terminal for many VMs: list, attach, detach (Ctrl-] Ctrl-]), re-attach.
    Mux(MuxArgs),
    /// Freeze a VM into a snapshot bundle (the VM stops unless --keep-alive).
    Snapshot(SnapshotArgs),
    /// Resume a VM from a snapshot bundle.
    Restore(RestoreArgs),
    /// Clone a running VM: a sibling that starts from the same memory and disk.
    Fork(ForkArgs),
    /// List live VMs, and crashed ones (with the cause) until `gc`.
    #[command(visible_aliases = ["list", "ps"])]
    Ls(LsArgs),
    /// Memory of live VMs: ceiling, the guest's view, and what each costs the host.
    Stats(StatsArgs),
    /// Show or set how much of its memory ceiling a VM's guest may use (the balloon).
    Balloon(BalloonArgs),
    /// Show or change what a running VM may reach (its egress policy), and its traffic.
    Network(NetworkArgs),
    /// Print a VM's main command output (or its console, supervisor or QEMU log); -f follows.
    Logs(LogsArgs),
    /// Wait until a VM ends (or its kept-alive main command exits); exit with the command's status.
    Wait(WaitArgs),
    /// Send a signal to a VM's main command (default SIGTERM), as `docker kill` does.
    Kill(KillArgs),
    /// Stop a VM (graceful, then forced after a timeout).
    Stop(StopArgs),
    /// Remove what dead VMs left behind.
    Gc(GcArgs),
    /// Fetch the guest kernel and build the Debian base rootfs.
    Install(InstallArgs),
    /// Bake a rootfs image: boot a base, run install steps, set a default command.
    Provision(ProvisionArgs),
    /// Bake an image from a Dockerfile (FROM, RUN, COPY, ADD, ENV, ARG, WORKDIR, USER, CMD, ENTRYPOINT, EXPOSE, LABEL), each step in a real VM.
    Build(BuildArgs),
    /// Describe every command, flag and exit code as versioned JSON (for agents and tools).
    AgentContext(AgentContextArgs),
    /// Print a shell completion script (bash, zsh, fish).
    Completion(CompletionArgs),
    /// Names of live VMs, one a line (used by the completion scripts).
    #[command(name = "__vm-names", hide = true)]
    VmNames,
    /// Leave a note about machinen (kept locally in ~/.machinen/feedback.jsonl, never sent), or list them.
    Feedback(FeedbackArgs),
    /// Fetch a registry image (HOST[:PORT]/REPO[:TAG|@DIGEST]) and convert it for booting; boot pulls by itself the first time. With DIR: fetch a snapshot bundle that `push` stored there.
    Pull(PullArgs),
    /// Store a snapshot bundle (and the parents of its chain) in an OCI registry; `pull REF DIR` or `restore REF` on another host fetches it.
    Push(PushArgs),
    /// List the container images in the cache (pulled references, converted images); inspect, export, push, rm or prune them.
    Images(ImagesArgs),
    /// Inspect snapshot bundles and their checkpoint chains: list, verify, flatten.
    Bundle(BundleArgs),
    /// Native process images (the portable format: one process captured with ptrace and procfs): check whether this host can restore one, print the documents' JSON Schemas.
    Image(ImageArgs),
    /// Capture a process of a VM from outside (ptrace, procfs) as a native process image: registers, mappings and their writable memory, threads, descriptors, signal state, the system call it is in; it goes on running unless --kill.
    Capture(CaptureArgs),
    /// Bring a native process image back as a process of a VM (same instruction set; one thread, stdio, outside a system call or in a sleep or poll); its output streams here and its exit status is this command's.
    Materialize(MaterializeArgs),
    /// Run CRIU in a VM (checkpoint/restore of process trees): `machinen criu TARGET -- dump -t PID -D DIR`; needs `install --criu`.
    Criu(CriuArgs),
}

impl Command {
    pub fn json(&self) -> bool {
        match self {
            Command::Boot(a) => a.json,
            Command::Snapshot(a) => a.json,
            Command::Restore(a) => a.json,
            Command::Fork(a) => a.json,
            Command::Exec(a) => a.json,
            Command::Cp(a) => a.json,
            Command::AgentContext(_) => true,
            Command::Attach(_)
            | Command::Repl(_)
            | Command::Mux(_)
            | Command::Completion(_)
            | Command::VmNames => false,
            Command::Ls(a) => a.json,
            Command::Stats(a) => a.json,
            Command::Balloon(a) => a.json,
            Command::Network(a) => a.json,
            Command::Logs(a) => a.json,
            Command::Wait(a) => a.json,
            Command::Kill(a) => a.json,
            Command::Stop(a) => a.json,
            Command::Gc(a) => a.json,
            Command::Install(a) => a.json,
            Command::Provision(a) => a.json,
            Command::Build(a) => a.json,
            Command::Feedback(a) => a.json,
            Command::Pull(a) => a.json,
            Command::Push(a) => a.json,
            Command::Images(a) => a.json,
            Command::Bundle(a) => a.json,
            Command::Image(a) => a.json,
            Command::Capture(a) => a.json,
            Command::Materialize(_) => false,
            Command::Criu(_) => false,
        }
    }
}

/// `--env` and `--cwd`, shared by everything that runs a command.
#[derive(Debug, Args, Clone)]
pub struct ProcessArgs {
    /// Environment variable for the command (repeatable).
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// Working directory in the guest (absolute).
    #[arg(long, value_name = "DIR")]
    pub cwd: Option<String>,
    /// Run the command as this user instead of root (or the image's user): NAME, UID, NAME:GROUP or UID:GID, names from the guest's /etc/passwd and /etc/group.
    #[arg(long, short = 'u', value_name = "USER")]
    pub user: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen boot -- uname -a\n  machinen boot --env GREETING=hi --cwd /tmp -- sh -c 'echo $GREETING from $PWD'\n  machinen boot --name web --detached --json\n  machinen boot ./app.tar.gz -- /app/run\n  machinen boot --name web --detached -p 3000:8080 ./app.tar.gz     service: the image's command is the VM's main command\n  machinen boot --name job --detached -- sh -c 'make test'        then `machinen logs -f job`, `machinen wait job`\n  machinen boot --mount .:/work --cwd /work -- make test          the current directory, copied in\n\nWith --detached and a command (after `--`, or the image's baked one), the command is the VM's\nmain command: its output is kept (`machinen logs`), and when it exits the VM stops and keeps its\nexit status for `machinen wait` (and `ls`) until `machinen gc`; --keep-alive-on-exit keeps the VM up."
)]
pub struct BootArgs {
    /// Rootfs tarball to boot (default: the installed Debian base), or a container image: oci:DIR[:TAG] (OCI layout), docker-archive:FILE (`docker save` output).
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Name of the VM (unique among live VMs; path-shaped names like a/b/c are fine).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// The guest's hostname (default: the name's last segment, e.g. web for team/web).
    #[arg(long, value_name = "NAME")]
    pub hostname: Option<String>,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Guest memory ceiling in MiB (default: half the host's RAM, 512..4096).
    #[arg(long, short = 'm', value_name = "MIB")]
    pub memory: Option<u32>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// The CPU model the guest sees (QEMU's `-cpu`: Nehalem, qemu64,+ssse3, …) instead of the accelerator's own (`max` under TCG, `host` under KVM/HVF). A process a CRIU bundle holds resumes on a model with the features of the one it was dumped on, or more.
    #[arg(long, value_name = "MODEL")]
    pub cpu_model: Option<String>,
    /// Network: `nat` (outbound only: the host's loopback services and
    /// other VMs' published ports stay out of reach) or `nat-host` (also
    /// maps the gateway 10.0.2.2 to the host's 127.0.0.1: the guest reaches
    /// every service bound to the host's loopback; only for trusted guests)
    /// or `none` (no network device: no route anywhere; exec, cp, logs and
    /// -p port forwards still work). Restores and forks keep the mode of
    /// the bundle.
    #[arg(long, default_value = "nat", value_name = "MODE", value_parser = ["nat", "nat-host", "none"])]
    pub network: String,
    #[command(flatten)]
    pub net_policy: NetPolicyArgs,
    /// Forward a host port to a guest port: HOST:GUEST or ADDR:HOST:GUEST (repeatable; ADDR defaults to 127.0.0.1).
    #[arg(long = "publish", short = 'p', value_name = "[ADDR:]HOST:GUEST")]
    pub publish: Vec<String>,
    /// Return once the guest is ready and leave the VM running; a command
    /// (after `--`, or the image's baked one) becomes its main command.
    #[arg(long, short = 'd', visible_alias = "detach")]
    pub detached: bool,
    /// With --detached: keep the VM running after its main command exited
    /// (`ls` then shows `exited N`), instead of stopping it.
    #[arg(long, visible_alias = "keep-on-exit", requires = "detached")]
    pub keep_alive_on_exit: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = timeouts::BOOT.as_secs(), value_name = "SECS")]
    pub boot_timeout: u64,
    /// Verbose guest agent logs in the VM's console log.
    #[arg(long)]
    pub debug: bool,
    /// Size of the root disk: 8G, 20G, 512M (default: the image's filesystem, at least 2 GiB with 1 GiB free). The guest grows its root filesystem to fill it; the disk is sparse on the host.
    #[arg(long, value_name = "SIZE", value_parser = parse_disk_size)]
    pub disk_size: Option<u64>,
    /// Let the guest run VMs of its own (nested virtualisation). Needs KVM with nested support; refused with BOOT_NESTED_VIRT_UNSUPPORTED naming what the host lacks.
    #[arg(long)]
    pub nested: bool,
    /// Copy a host directory into the VM at GUEST_PATH (repeatable, up to 8). The guest may change its copy; the host never sees those changes, and the VM never sees the host's later ones. Snapshots, restores and forks keep the guest's copy.
    #[arg(long = "mount", value_name = "HOST_DIR:GUEST_PATH")]
    pub mounts: Vec<String>,
    /// Room for the guest's writes to its --mount copies, all together: 512M, 4G (default 1G; sparse on the host).
    #[arg(long, value_name = "SIZE", value_parser = parse_upper_size, requires = "mounts")]
    pub mount_upper_size: Option<u64>,
    /// Share a host directory with the VM at GUEST_PATH (repeatable, up to 8): the guest's writes reach the host at once, the host's show in the guest within a second. :ro refuses guest writes (EROFS). The guest acts as you (as root: as the directory's owner); device nodes are refused and nothing outside HOST_DIR is reachable. Needs virtiofsd; the VM's snapshots, restores and forks keep the share.
    #[arg(long = "mount-live", value_name = "HOST_DIR:GUEST_PATH[:ro|rw]")]
    pub live_mounts: Vec<String>,
    /// No balloon: memory the guest frees stays the host's until the VM ends, and `machinen balloon` refuses it (BALLOON_UNAVAILABLE). Saves the guest the reporting work.
    #[arg(long)]
    pub no_balloon: bool,
    /// Replace the image's entrypoint with this program (as Docker's --entrypoint: the image's command goes too, arguments after `--` go to it; '' runs the arguments alone).
    #[arg(long, value_name = "PROGRAM", requires = "image")]
    pub entrypoint: Option<String>,
    /// Print where the time went, phase by phase (image, engine start, guest boot, agent ready, …), on stderr as each ends; --json output has them as "phases".
    #[arg(long)]
    pub timings: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the guest.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// A size for --mount-upper-size: bytes, or with a binary suffix.
fn parse_upper_size(s: &str) -> Result<u64, String> {
    let n = machinen::hostfile::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 512M, 4G)"))?;
    machinen::mounts::check_upper_size(n).map_err(|f| f.message)
}

/// A disk size: bytes, or with a binary suffix (K, M, G, T).
fn parse_disk_size(s: &str) -> Result<u64, String> {
    let n = machinen::hostfile::parse_size(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 8G, 20G, 512M)"))?;
    machinen::image::check_disk_size(n, None).map_err(|f| f.message)?;
    Ok(n)
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen exec web -- ls -la /\n  cat data.bin | machinen exec web -- sha256sum\n  machinen exec 12345 --json -- hostname\n  machinen exec -t web -- top\n  machinen exec --timeout 60 web -- make test     exit 124 (EXEC_TIMEOUT) if it runs longer"
)]
pub struct ExecArgs {
    /// VM name, id or pid.
    pub target: String,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Run on a pseudo-terminal: the host terminal goes raw, keys (Ctrl-C, Ctrl-Z) and window size reach the command.
    #[arg(long, short = 't', visible_alias = "pty", conflicts_with = "json")]
    pub tty: bool,
    /// Kill the command (SIGKILL to its process group in the guest) after SECS seconds; then exit 124 with EXEC_TIMEOUT, like timeout(1).
    #[arg(long, value_name = "SECS", value_parser = parse_secs)]
    pub timeout: Option<std::time::Duration>,
    /// Print one JSON object with the exit status and the captured output.
    #[arg(long)]
    pub json: bool,
    /// Command to run.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

/// A positive number of seconds, fractions allowed (`1`, `0.5`, `90`).
fn parse_secs(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() && v <= 1e9 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not a positive number of seconds (e.g. 30 or 0.5)"
        )),
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen snapshot web ./web.snap            freeze web into ./web.snap (web stops)\n  machinen snapshot web ./ckpt1 --keep-alive  checkpoint, web keeps running\n\nThe bundle is a directory: meta.json, manifest.json (size and BLAKE3 digest of every file),\nstate.vmstate (devices and RAM) and rootdisk.qcow2 (the disk layer over the image).\nSecrets given at boot are wiped in the guest first; pass them again on restore."
)]
pub struct SnapshotArgs {
    /// VM name, id or pid.
    pub target: String,
    /// Bundle directory to create (must not exist).
    #[arg(value_name = "OUT_DIR")]
    pub out: PathBuf,
    /// Keep the VM running after the snapshot (with --engine criu: the tree is restored in place and runs on).
    #[arg(long, visible_alias = "leave-running")]
    pub keep_alive: bool,
    /// What the bundle holds: `vmstate`, the whole VM (memory, devices, disk), resumed exactly but only by the same QEMU, accelerator and CPU model; or `criu`, the VM's workload (its main command's process tree, or --pid's) dumped with CRIU plus its disk, which a fresh VM of the same image resumes on any accelerator, CPU model or QEMU, with other memory and CPUs. Default: $MACHINEN_SNAPSHOT_ENGINE, else vmstate.
    #[arg(long, value_name = "ENGINE", value_parser = ["vmstate", "criu"])]
    pub engine: Option<String>,
    /// With --engine criu: the root of the process tree to dump, a guest pid (default: the VM's main command).
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,
    /// Write a self-contained bundle. Without it, a VM that has a checkpoint
    /// (or was restored from a bundle that is still there, unchanged) gets a
    /// delta: only the disk blocks and RAM pages written since.
    #[arg(long)]
    pub full: bool,
    /// Seconds the snapshot may take.
    #[arg(long, default_value_t = timeouts::SNAPSHOT.as_secs(), value_name = "SECS")]
    pub timeout: u64,
    /// Check the VM and the destination, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print where the time went, phase by phase (image, engine start, guest boot, agent ready, …), on stderr as each ends; --json output has them as "phases".
    #[arg(long)]
    pub timings: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen restore ./web.snap -p 3000:3000 --detached\n  machinen restore ./web.snap --name web2 --image ./app.tar.gz -- cat /proc/uptime\n  machinen restore ./ckpt1 --name work --own-ram --detached   to be checkpointed again\n\nBy default the VM maps the bundle's RAM copy-on-write: restores of one bundle share\nits unchanged pages, and restoring costs what the guest touches, not its memory size.\nIts snapshots copy its RAM while it runs (a brief pause) and are deltas over the\nbundle for the disk only; --own-ram copies the used memory into a RAM file of the\nVM's own instead, so its checkpoints hold only the RAM pages that changed too.\nA delta bundle restores with its whole chain (see `machinen bundle --help`)."
)]
pub struct RestoreArgs {
    /// Snapshot bundle directory.
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// Name of the restored VM (default: <source>/<pid>).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// The rootfs tarball the VM was booted from, when not at its recorded path (sha256 must match); oci:DIR[:TAG] and docker-archive:FILE as for boot.
    #[arg(long, value_name = "TAR")]
    pub image: Option<PathBuf>,
    /// Forward a host port: HOST:GUEST or ADDR:HOST:GUEST (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "[ADDR:]HOST:GUEST")]
    pub publish: Vec<String>,
    /// Replace the bundle's egress policy (without these the VM keeps the one it was snapshotted with).
    #[command(flatten)]
    pub net_policy: NetPolicyArgs,
    /// Return once the VM is ready and leave it running.
    #[arg(long, short = 'd', visible_alias = "detach")]
    pub detached: bool,
    /// CRIU bundles only: the new VM's memory ceiling in MiB (default: the source's).
    #[arg(long, short = 'm', value_name = "MIB")]
    pub memory: Option<u32>,
    /// CRIU bundles only: the new VM's virtual CPUs (default: the source's).
    #[arg(long, value_name = "N")]
    pub cpus: Option<u32>,
    /// CRIU bundles only: the CPU model the new VM shows (default: the accelerator's own).
    #[arg(long, value_name = "MODEL")]
    pub cpu_model: Option<String>,
    /// Reset TCP connections the guest had at snapshot time.
    #[arg(long)]
    pub tcp_reset: bool,
    /// Copy the bundle's RAM into a file of the VM's own instead of mapping it copy-on-write (quick snapshots and forks of this VM). Always so for a VM with live mounts.
    #[arg(long)]
    pub own_ram: bool,
    /// Serve the snapshot's live mount at GUEST_PATH from another host directory (repeatable); the mode stays the recorded one unless given. A guest path the snapshot has no live mount at is BOOT_LIVE_MOUNT_OVERRIDE_UNKNOWN.
    #[arg(long = "mount-live", value_name = "HOST_DIR:GUEST_PATH[:ro|rw]")]
    pub live_mounts: Vec<String>,
    /// Refuse (FORK_MEMORY_BACKPRESSURE, retryable) when the host would keep less memory available than this: 1%, 0.5%, 512M; 0 turns the check off.
    #[arg(long, default_value = "1%", value_name = "PCT%|SIZE")]
    pub free_memory_threshold: String,
    #[command(flatten)]
    pub process: ProcessArgs,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Seconds to wait for the restored guest to answer.
    #[arg(long, default_value_t = timeouts::BOOT.as_secs(), value_name = "SECS")]
    pub boot_timeout: u64,
    /// Verify the bundle and check this host can resume it; start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print where the time went, phase by phase (image, engine start, guest boot, agent ready, …), on stderr as each ends; --json output has them as "phases".
    #[arg(long)]
    pub timings: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the restored VM (then the VM is removed).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen fork web --new-name web-b --detach -p 3001:3000\n  machinen fork web --out-dir ./web-at-fork --detach\n  machinen fork web --count 4 --new-name w --detach     w-1 .. w-4 from one snapshot\n\nThe source keeps running; its port forwards are not inherited. TCP connections the\nsource had are reset in the fork unless --tcp-keep. --count N forks N siblings from\none snapshot: they share its unchanged memory pages (copy-on-write)."
)]
pub struct ForkArgs {
    /// VM name, id or pid.
    pub target: String,
    /// Name of the fork (default: <source>/<pid>); with --count N > 1 the forks are NAME-1..NAME-N.
    #[arg(long)]
    pub new_name: Option<String>,
    /// Keep the intermediate bundle in this (new) directory.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<PathBuf>,
    /// Keep TCP connections inherited from the source.
    #[arg(long)]
    pub tcp_keep: bool,
    /// Give the fork its own copy of the RAM instead of sharing the snapshot's copy-on-write (quick to snapshot or fork again). Always so for a VM with live mounts.
    #[arg(long)]
    pub own_ram: bool,
    /// Serve the fork's live mount at GUEST_PATH from another host directory (repeatable; default: the source's).
    #[arg(long = "mount-live", value_name = "HOST_DIR:GUEST_PATH[:ro|rw]")]
    pub live_mounts: Vec<String>,
    /// Make N forks from one snapshot (1-64; N > 1 needs --detach, no -p; named NAME-1..NAME-N).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub count: usize,
    /// Refuse (FORK_MEMORY_BACKPRESSURE, retryable) when the host would keep less memory available than this: 1%, 0.5%, 512M; 0 turns the check off.
    #[arg(long, default_value = "1%", value_name = "PCT%|SIZE")]
    pub free_memory_threshold: String,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Return once the fork is ready and leave it running.
    #[arg(long, short = 'd', visible_alias = "detached")]
    pub detach: bool,
    /// Forward a host port to the fork: HOST:GUEST or ADDR:HOST:GUEST (repeatable).
    #[arg(long = "publish", short = 'p', value_name = "[ADDR:]HOST:GUEST")]
    pub publish: Vec<String>,
    /// The forks' egress policy (without these they keep the source's, as it is now).
    #[command(flatten)]
    pub net_policy: NetPolicyArgs,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Print where the time went, phase by phase (image, engine start, guest boot, agent ready, …), on stderr as each ends; --json output has them as "phases".
    #[arg(long)]
    pub timings: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the fork (then the fork is removed).
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen logs web                  the main command's stdout and stderr (kept per VM, rotated at 8 MiB)\n  machinen logs -f --tail 20 web     the last 20 lines, then new output until the VM ends\n  machinen logs --since 10m --json web\n  machinen logs --console web        the guest's console (the default for a VM without a main command)\n\nThe main command's stdout goes to stdout and its stderr to stderr; with --json, one record a line:\n{\"seq\":N,\"t_ms\":UNIX_MS,\"stream\":\"stdout\"|\"stderr\"|\"exit\"|\"gap\",\"data\":TEXT | \"hex\":HEX,\"exit\":{\"code\",\"signal\"}}."
)]
pub struct LogsArgs {
    /// VM name, pid or id; a crashed or exited VM's too, until `machinen gc`.
    pub target: String,
    /// The guest's console log instead of the main command's output.
    #[arg(long, conflicts_with_all = ["vmm", "qemu"])]
    pub console: bool,
    /// The supervisor's log (vmm.log).
    #[arg(long, conflicts_with = "qemu")]
    pub vmm: bool,
    /// QEMU's own output (qemu.log).
    #[arg(long)]
    pub qemu: bool,
    /// Only the last N lines, or `all` (the console: up to its last 4 MiB).
    #[arg(long, short = 'n', default_value = "all", value_name = "N|all")]
    pub tail: String,
    /// Keep printing new output until the VM ends (or its main command exits).
    #[arg(long, short = 'f', conflicts_with_all = ["vmm", "qemu"])]
    pub follow: bool,
    /// Only output from this time on: a duration back (30s, 10m, 2h, 1d), Unix seconds, or 2026-01-31T12:00:00Z.
    #[arg(long, value_name = "DURATION|TIME", conflicts_with_all = ["console", "vmm", "qemu"])]
    pub since: Option<String>,
    /// The main command's output as JSON records, one a line.
    #[arg(long, conflicts_with_all = ["console", "vmm", "qemu"])]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen kill web                 # SIGTERM: the command may clean up\n  machinen kill -s KILL web; machinen wait web\n  machinen kill -s STOP --group web  # the whole process group\n\nThe signal goes to the main command's process (a VM booted with a command, `boot -d -- CMD`);\nMAIN_NOT_RUNNING when it has none or it ended, SIGNAL_INVALID for an unknown signal."
)]
pub struct KillArgs {
    /// VM name, pid or id.
    pub target: String,
    /// The signal: a name (TERM, SIGTERM, KILL, HUP, …) or a number.
    #[arg(long, short = 's', default_value = "TERM", value_name = "SIGNAL")]
    pub signal: String,
    /// Signal the main command's whole process group, not its process alone.
    #[arg(long)]
    pub group: bool,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen wait web; echo $?\n  machinen wait --timeout 60 --json web\n\nExit status: the main command's (128+N when killed by signal N); 143 when the VM was stopped\n(or had no main command); 125 when it crashed. A VM that already exited or crashed is answered\nat once (until `machinen gc`); a stopped VM leaves no entry (REGISTRY_NOT_FOUND)."
)]
pub struct WaitArgs {
    /// VM name, pid or id; one that already ended too, until `machinen gc`.
    pub target: String,
    /// Give up after SECS with WAIT_TIMEOUT (default: wait as long as it takes).
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// Print how the VM ended as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen stats\n  machinen stats web --json\n  machinen stats --watch 2\n\nGUEST-* come from the guest's /proc/meminfo (USED = MemTotal - MemAvailable; CACHED includes\ntmpfs); HOST-PSS is the proportional set size of the VM's QEMU and supervisor (pages shared\nwith sibling forks count once in total); RAM-FILE is how much of the VM's RAM file is allocated\n(booted VMs and --own-ram restores): memory the guest frees goes back within seconds. NET-OUT,\nNET-IN and REFUSED are the guest's traffic and refused attempts (`machinen network` has the\ndetail; `-` without a filtered network)."
)]
pub struct StatsArgs {
    /// VM name, id or pid (default: every live VM).
    pub target: Option<String>,
    /// Print again every SECS seconds until Ctrl-C.
    #[arg(long, value_name = "SECS")]
    pub watch: Option<f64>,
    /// Print machine-readable JSON (one object for a TARGET, else an array).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen network web                                   the policy, traffic and refused attempts\n  machinen network web --egress deny --allow '*.packages.example:443' --allow files.example:443\n  machinen network web --deny 10.0.0.0/8                  add a rule (applies to open connections too)\n  machinen network web --remove 10.0.0.0/8\n  machinen network web --clear --egress allow             back to open\n\nA RULE is an address, a CIDR block or a domain (*.example.com: every name below it), optionally\nwith :PORT or :LOW-HIGH (IPv6 with a port in brackets: [fd00::/8]:53). A destination matching a\ndeny rule is refused; else one matching an allow rule passes; else --egress decides. Domain\nrules work through the VM's resolver: names the policy refuses do not resolve, and an address\nmatches a domain rule only if an allowed name resolved to it. Refused connections fail at once\n(TCP reset, ICMP prohibited). Enforced on the host: nothing the guest does lifts it."
)]
pub struct NetworkArgs {
    /// VM name, id or pid.
    pub target: String,
    /// Let the guest reach RULE (repeatable).
    #[arg(long, value_name = "RULE")]
    pub allow: Vec<String>,
    /// Refuse RULE (repeatable; deny rules win over allow rules).
    #[arg(long, value_name = "RULE")]
    pub deny: Vec<String>,
    /// Drop RULE from the allow or deny list (repeatable).
    #[arg(long, value_name = "RULE")]
    pub remove: Vec<String>,
    /// What happens to destinations no rule matches.
    #[arg(long, value_name = "DEFAULT", value_parser = ["allow", "deny"])]
    pub egress: Option<String>,
    /// Drop every rule first (the default stays unless --egress is given).
    #[arg(long)]
    pub clear: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

/// The egress policy flags of boot, restore and fork.
#[derive(Debug, Args, Clone, Default)]
pub struct NetPolicyArgs {
    /// Let the guest reach RULE: ADDR, CIDR or DOMAIN (*.DOMAIN: every name below it), optionally :PORT or :LOW-HIGH (repeatable; see `machinen network --help`). Needs --network nat.
    #[arg(long = "allow-net", value_name = "RULE")]
    pub allow: Vec<String>,
    /// Refuse RULE (repeatable; deny rules win over allow rules).
    #[arg(long = "deny-net", value_name = "RULE")]
    pub deny: Vec<String>,
    /// What happens to destinations no rule matches: allow (the default) or deny.
    #[arg(long, value_name = "DEFAULT", value_parser = ["allow", "deny"])]
    pub egress: Option<String>,
    /// A credential the guest never holds: $NAME in the guest is a placeholder that the egress proxy replaces with VALUE in the headers of HTTPS requests to HOST only (without =VALUE: your $NAME). Repeatable; restore and fork take the values again. Needs --network nat.
    #[arg(long = "egress-secret", value_name = "NAME@HOST[,HOST…][=VALUE]")]
    pub egress_secret: Vec<String>,
}

impl NetPolicyArgs {
    pub fn given(&self) -> bool {
        !self.allow.is_empty() || !self.deny.is_empty() || self.egress.is_some()
    }

    pub fn egress_secrets(&self) -> machinen::Result<Vec<machinen::network::EgressSecret>> {
        self.egress_secret
            .iter()
            .map(|s| machinen::network::EgressSecret::parse(s))
            .collect()
    }

    /// The policy these flags describe (from an open one).
    pub fn policy(&self) -> machinen::Result<machinen::network::NetPolicy> {
        use machinen::network::{parse_rules, NetPolicy};
        Ok(NetPolicy {
            egress: self
                .egress
                .as_deref()
                .map(|e| e.parse().unwrap_or_default())
                .unwrap_or_default(),
            allow: parse_rules("--allow-net", &self.allow)?,
            deny: parse_rules("--deny-net", &self.deny)?,
        })
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  machinen balloon web            show the balloon\n  machinen balloon web 512M       the guest keeps 512 MiB, gives the rest back\n  machinen balloon web max        the guest gets its whole ceiling again\n\nThe guest gives pages up until it keeps SIZE (its MemTotal drops); they cost the host nothing\nand are holes in snapshots. Without a SIZE, or after one, prints CEILING, TARGET and ACTUAL\n(what the guest has now). Memory the guest frees goes back to the host by itself (free page\nreporting) whatever the target. Restores that map their bundle's RAM privately have no balloon\n(BALLOON_UNAVAILABLE): restore with --own-ram."
)]
pub struct BalloonArgs {
    /// VM name, id or pid.
    pub target: String,
    /// What the guest may use: MiB, or with a unit (512M, 1.5G), or `max` (the ceiling).
    pub size: Option<String>,
    /// Wait at most SECS for the guest to reach SIZE (0: do not wait).
    #[arg(long, value_name = "SECS", default_value_t = timeouts::BALLOON_SETTLE.as_secs())]
    pub wait: u64,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// VM name, id or pid.
    pub target: String,
    /// Skip the graceful guest power-off.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Seconds to wait before killing the VM.
    #[arg(long, default_value_t = timeouts::STOP.as_secs(), value_name = "SECS")]
    pub timeout: u64,
    /// Say which VM would be stopped (and how); stop nothing.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only show what would be removed.
    #[arg(long, short = 'n')]
    pub dry_run: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen images
  machinen images rm 127.0.0.1:5000/app:dev
  machinen images prune
  machinen images export app.tar.gz oci:./app-layout:v1
  machinen images export app.tar.gz docker-archive:app.tar:local/app:v1   # then: docker load -i app.tar
  machinen images inspect app.tar.gz
  machinen images push app.tar.gz registry.example:5000/team/app:1 [--insecure-registry registry.example:5000]")]
pub struct ImagesArgs {
    #[command(subcommand)]
    pub action: Option<ImagesAction>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen image check ./proc.img                       the restore plan on this host, or why not
  machinen image check ./proc.img --target-arch arm64   on another instruction set
  machinen image check ./proc.img --json                the plan (steps, refusals) as JSON
  machinen image schema threads                         a document's JSON Schema

An image is a directory: native-process.json (the manifest), native-mappings.json,
native-threads.json, native-resources.json, native-translation.json and native-memory.bin.
A restore here supports one thread on the same instruction set, standard input/output/error
only, stopped outside a system call or in a sleep or poll with a timeout; anything else is
refused with a code from the image vocabulary (thread-state-unsupported, active-syscall, ...).
Exit status: 0 restorable, 125 refused (BOOT_PORTABLE_UNSUPPORTED), 2 invalid (PORTABLE_IMAGE_INVALID).")]
pub struct ImageArgs {
    #[command(subcommand)]
    pub action: ImageAction,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen exec web -- sh -c 'sleep 600 & echo $!'      a process to capture (prints its pid)
  machinen capture web 214 -o ./proc.img                  capture it; it goes on running
  machinen image check ./proc.img                         how this host would restore it, or why not
  machinen capture web 214 -o ./proc.img --kill           capture it and end it (to move it)

The image holds the process's writable memory and its environment: treat it as you would a
core dump. What a restore cannot bring back (more threads, sockets, other descriptors, installed
signal handlers, system calls other than a sleep or poll) is recorded as refusals with the image
vocabulary's codes; `image check` lists them. Capture runs in the guest: amd64 guests only.")]
pub struct CaptureArgs {
    /// VM name, id or pid.
    pub target: String,
    /// The process id in the guest.
    pub pid: u32,
    /// The image directory to create (must not exist).
    #[arg(long, short = 'o', value_name = "DIR")]
    pub out: PathBuf,
    /// Kill the process once it is captured.
    #[arg(long)]
    pub kill: bool,
    /// Capture at most this much memory (bytes, or 512M, 2G; default 1G); larger mappings are recorded as refused.
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen capture web 214 -o ./proc.img --kill     on one VM (or host)
  machinen materialize other ./proc.img             the process goes on in another VM

The image is checked first (`machinen image check`); a refused one is BOOT_PORTABLE_UNSUPPORTED
and nothing is copied. The process gets the command's standard input, output and error; a thread
that was in a sleep or poll waits again for the time it asked for (an upper bound of what was left).
Not restored: rseq registration, signal handlers (an image with handlers is refused), credentials
(the process runs as root), descriptors past 2.")]
pub struct MaterializeArgs {
    /// VM name, id or pid.
    pub target: String,
    /// The image directory.
    #[arg(value_name = "DIR")]
    pub dir: PathBuf,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen install --criu                                  once: CRIU and the modules it needs
  machinen criu web -- check                               can CRIU work in this guest?
  machinen criu web -- dump -t 214 -D /var/tmp/ck --shell-job
  machinen cp -r web:/var/tmp/ck ./ck                      move the images
  machinen cp -r ./ck other:/var/tmp/ck
  machinen criu other -- restore -D /var/tmp/ck -d --shell-job

CRIU runs as the guest's root with Debian's criu package, staged once per VM in /run/machinen-criu
(tmpfs); the modules it probes for (nf_tables, socket diagnostics) are loaded first. A tree dumped in
one VM restores in another VM booted from the same image, whatever its CPU count, memory size or
accelerator; files it has open must be there too. CRIU's exit status is passed through.")]
pub struct CriuArgs {
    /// VM name, id or pid.
    pub target: String,
    /// CRIU's arguments (after `--`).
    #[arg(last = true, required = true, value_name = "CRIU ARGS")]
    pub args: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ImageAction {
    /// Read and validate an image, then print how this host would restore it, or the refusals that stop it.
    Check {
        #[arg(value_name = "DIR")]
        dir: PathBuf,
        /// The instruction set to restore on (default: this host's).
        #[arg(long, value_name = "ARCH", value_parser = ["arm64", "amd64"])]
        target_arch: Option<String>,
        /// A thread blocked in nanosleep/clock_nanosleep: resume it with the time left, or refuse.
        #[arg(long, value_name = "POLICY", default_value = "defer-target-resume", value_parser = ["defer-target-resume", "refuse"])]
        sleep_policy: String,
        /// A thread blocked in ppoll/poll with a timeout: resume it with the time left, or refuse.
        #[arg(long, value_name = "POLICY", default_value = "defer-target-resume", value_parser = ["defer-target-resume", "refuse"])]
        poll_policy: String,
    },
    /// Print the JSON Schema (draft 2020-12) of a document, or of all five.
    Schema {
        #[arg(value_name = "DOCUMENT", value_parser = ["manifest", "mappings", "threads", "resources", "translation"])]
        document: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesAction {
    /// Forget pulled references and remove converted images, by reference or digest (a unique prefix of at least 6 hex digits).
    Rm {
        #[arg(value_name = "IMAGE", required = true)]
        names: Vec<String>,
    },
    /// Remove pulled blobs no remaining reference needs, converted images (boots convert again; bundles of such VMs then restore with --image), the ext4 images no VM on this host boots from (a later boot or restore converts its tarball again) and the build cache; what was used in the last 10 minutes stays (a pull or boot may be using it) unless --all.
    Prune {
        /// Also what was used in the last 10 minutes (only when no pull, build or boot is under way).
        #[arg(long)]
        all: bool,
    },
    /// Write an image (a rootfs tarball such as `provision` makes, or any image reference machinen boots) as a container image: oci:DIR[:TAG] (an OCI image layout, created or given one more tag; TAG defaults to latest) or docker-archive:FILE[:REPO[:TAG]] (for `docker load`, `podman load`, `ctr images import`). Its baked command, env, working directory and user become the image's config.
    Export {
        #[arg(value_name = "IMAGE")]
        image: std::path::PathBuf,
        #[arg(value_name = "TARGET")]
        target: String,
    },
    /// Show an image's settings: command (entrypoint and arguments), env, working directory, user, exposed ports, labels, and where it came from.
    Inspect {
        #[arg(value_name = "IMAGE")]
        image: std::path::PathBuf,
    },
    /// Push an image (a rootfs tarball such as `provision` or `build` makes, or any image machinen boots) to a registry as a container image (HOST[:PORT]/REPO[:TAG]), its baked settings as the image config; blobs the registry has are not uploaded again.
    Push {
        #[arg(value_name = "IMAGE")]
        image: std::path::PathBuf,
        #[arg(value_name = "REFERENCE")]
        reference: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen bundle ls ./checkpoints
  machinen bundle verify ./checkpoints/c5
  machinen bundle flatten ./checkpoints/c5 ./c5-full

A keep-alive checkpoint of a VM that already has one is a delta: it holds the disk
blocks and RAM pages written since its parent and names the parent by a relative
path and the digest of its manifest. Keep a chain's bundles together; `flatten`
writes a bundle that needs no other.")]
pub struct BundleArgs {
    #[command(subcommand)]
    pub action: BundleAction,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum BundleAction {
    /// List bundles (each PATH a bundle, or a directory of bundles) with their chain: kind, sequence, parent, size.
    Ls {
        #[arg(value_name = "PATH", required = true)]
        paths: Vec<PathBuf>,
    },
    /// Check a bundle and every parent of its chain against their manifests and recorded digests.
    Verify {
        #[arg(value_name = "BUNDLE")]
        bundle: PathBuf,
    },
    /// Write OUT_DIR, a self-contained bundle with the guest state of the delta checkpoint TIP.
    Flatten {
        #[arg(value_name = "TIP")]
        tip: PathBuf,
        #[arg(value_name = "OUT_DIR")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen pull registry.example:5000/team/app:1.2
  machinen pull --insecure-registry 127.0.0.1:5000 127.0.0.1:5000/app:dev
  machinen boot 127.0.0.1:5000/app:dev --insecure-registry 127.0.0.1:5000 -- uname -a

An image is pulled once into the cache and converted; later boots of the same reference
neither pull nor convert. `pull` fetches the reference again (a moved tag).")]
pub struct PullArgs {
    /// HOST[:PORT]/REPO[:TAG|@sha256:…] (short names from MACHINEN_DEFAULT_REGISTRY).
    #[arg(value_name = "IMAGE")]
    pub image: String,
    /// Pull a snapshot bundle (pushed with `machinen push`) into this new
    /// directory; the parents of its chain this host lacks go beside it.
    #[arg(value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen push ./web.snap registry.example:5000/team/web:ckpt1
  machinen push --insecure-registry 127.0.0.1:5000 ./ckpt/c2 127.0.0.1:5000/agent:c2
  machinen restore 127.0.0.1:5000/agent:c2 --insecure-registry 127.0.0.1:5000 --name again

A bundle is stored as an OCI artifact: its files cut into 4 MiB chunks (holes are not
stored), each a blob named by its digest. A chunk the registry has is not uploaded again,
and a delta checkpoint is pushed with its parents, so pushing checkpoint 2 costs what
changed since checkpoint 1. Credentials: MACHINEN_REGISTRY_AUTH=USER:PASSWORD or the
Docker config; HTTPS unless --insecure-registry names the registry.")]
pub struct PushArgs {
    /// Snapshot bundle directory.
    #[arg(value_name = "BUNDLE")]
    pub bundle: PathBuf,
    /// HOST[:PORT]/REPO[:TAG].
    #[arg(value_name = "REF")]
    pub reference: String,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Notes go to $MACHINEN_HOME/feedback.jsonl (default ~/.machinen), one JSON object a line with
the time and the machinen version. Nothing is sent anywhere; share the file if you want to.

Examples:
  machinen feedback \"restore needed --image although the tarball had not moved\"
  machinen feedback --list")]
pub struct FeedbackArgs {
    /// The note (quote it).
    #[arg(
        value_name = "TEXT",
        required_unless_present = "list",
        conflicts_with = "list"
    )]
    pub text: Option<String>,
    /// List the notes recorded so far.
    #[arg(long)]
    pub list: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Fetch and rebuild even when already installed.
    #[arg(long)]
    pub force: bool,
    /// Also fetch CRIU for the guest (Debian's criu package and its libraries, through apt) and the kernel modules it needs, for `machinen criu`.
    #[arg(long)]
    pub criu: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Steps (--run, --copy) run in the order given, with the baked --env and --cwd;
the first failing step stops the bake with its exit code and no image is written.

Examples:
  machinen provision --copy ./hello:/app/hello --run 'chmod +x /app/hello' \\
      --env MODE=prod --cwd /app --cmd '/app/hello --loud' -o app.tar.gz
  machinen provision --run 'apt-get update && apt-get install -y python3' -o py.tar.gz
  machinen provision --base py.tar.gz --copy ./src:/app -o app.tar.gz -- python3 /app/main.py
  machinen boot app.tar.gz                  runs the baked command"
)]
pub struct ProvisionArgs {
    /// Rootfs tarball to start from (default: the installed Debian base), or oci:DIR[:TAG] / docker-archive:FILE; a provisioned image keeps its baked settings.
    #[arg(long, value_name = "TAR")]
    pub base: Option<PathBuf>,
    /// Run a shell command in the guest (repeatable).
    #[arg(long = "run", value_name = "CMD")]
    pub run: Vec<String>,
    /// Copy a host file or directory into the guest; a directory's contents go into GUEST (repeatable).
    #[arg(long = "copy", value_name = "HOST:GUEST")]
    pub copy: Vec<String>,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Default command of the image, run with `sh -c` (or give it as argv after `--`).
    #[arg(long = "cmd", value_name = "CMD", conflicts_with = "argv")]
    pub cmd: Option<String>,
    /// Where to write the image (.tar.gz; replaced atomically), or a container image: oci:DIR[:TAG] (an OCI image layout) or docker-archive:FILE[:REPO[:TAG]] (for docker/podman load), with the baked command, env, cwd and user as its config.
    #[arg(long = "out", short = 'o', value_name = "OUT.tar.gz")]
    pub out: PathBuf,
    #[command(flatten)]
    pub vm: BakeVmArgs,
    /// Print machine-readable JSON (step output goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Default command of the image as argv (no shell).
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  machinen build -t app.tar.gz .
  machinen build -f docker/Dockerfile --build-arg VERSION=1.2 -t app.tar.gz ./src
  machinen build -t oci:./app-layout:v1 .        then: skopeo copy oci:./app-layout:v1 docker://…
  machinen build -t app.tar.gz . && machinen images push app.tar.gz registry.example:5000/team/app:1

FROM takes a registry reference, oci:DIR[:TAG], docker-archive:FILE, a rootfs tarball (relative
paths from the context), or machinen:base (the installed Debian base); ARGs before FROM may set
it. Each RUN, COPY, ADD and WORKDIR runs in one build VM with the ENV, ARG values, WORKDIR and
USER in force at its line; the VM's disk becomes the image, with CMD/ENTRYPOINT, ENV, WORKDIR,
USER, EXPOSE and LABEL as its settings (`machinen images inspect` shows them). COPY/ADD read
the build context (.dockerignore applies; nothing outside it), take --chown and --chmod, and
ADD unpacks local tar archives. Not supported, refused with the line: multi-stage builds
(a second FROM, COPY --from), RUN --mount, ADD of URLs, SHELL, VOLUME, HEALTHCHECK,
STOPSIGNAL, ONBUILD. A build whose inputs are all unchanged comes from the build cache
without booting (--no-cache builds anyway).")]
pub struct BuildArgs {
    /// The build context: the directory COPY and ADD read from.
    #[arg(value_name = "CONTEXT", default_value = ".")]
    pub context: PathBuf,
    /// The Dockerfile (default: CONTEXT/Dockerfile).
    #[arg(long = "file", short = 'f', value_name = "DOCKERFILE")]
    pub file: Option<PathBuf>,
    /// Where to write the image: a rootfs tarball (.tar.gz), or oci:DIR[:TAG] / docker-archive:FILE[:REPO[:TAG]] as for `provision -o`.
    #[arg(long = "tag", short = 't', value_name = "OUT")]
    pub tag: PathBuf,
    /// A value for an ARG (repeatable).
    #[arg(long = "build-arg", value_name = "NAME=VALUE")]
    pub build_arg: Vec<String>,
    /// Build even when the build cache holds this build's result.
    #[arg(long)]
    pub no_cache: bool,
    #[command(flatten)]
    pub vm: BakeVmArgs,
    /// Print machine-readable JSON (step output goes to stderr).
    #[arg(long)]
    pub json: bool,
}

/// The VM a bake (`provision`, `build`) runs its steps in.
#[derive(Debug, Args)]
pub struct BakeVmArgs {
    /// Memory of the VM the steps run in, in MiB.
    #[arg(long, short = 'm', value_name = "MIB")]
    pub memory: Option<u32>,
    /// Virtual CPUs of the VM the steps run in.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// The steps' network: `nat` (outbound only), `nat-host` (also the
    /// host's loopback, e.g. for a package proxy listening there) or
    /// `none` (steps that only copy files and run local commands).
    #[arg(long, default_value = "nat", value_name = "MODE", value_parser = ["nat", "nat-host", "none"])]
    pub network: String,
    /// Seconds to wait for the VM to become ready.
    #[arg(long, default_value_t = timeouts::BOOT.as_secs(), value_name = "SECS")]
    pub boot_timeout: u64,
    /// Print where the time went, phase by phase (image, engine start, guest boot, agent ready, …), on stderr as each ends; --json output has them as "phases".
    #[arg(long)]
    pub timings: bool,
}

impl BakeVmArgs {
    pub fn network(&self) -> machinen::Result<machinen::spec::NetworkMode> {
        self.network.parse().map_err(|e: String| {
            machinen::error::fail(machinen::ErrorCode::BootArgsInvalid, e).into()
        })
    }
}

/// A `--run` or `--copy` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepArg {
    Run(String),
    Copy(String),
}

/// The `--run` and `--copy` values of `provision` in command-line order
/// (clap keeps each flag's values apart; their indices interleave them).
pub fn ordered_steps(m: &clap::ArgMatches) -> Vec<StepArg> {
    let mut steps: Vec<(usize, StepArg)> = Vec::new();
    for (id, make) in [
        ("run", StepArg::Run as fn(String) -> StepArg),
        ("copy", StepArg::Copy),
    ] {
        if let (Some(vals), Some(idx)) = (m.get_many::<String>(id), m.indices_of(id)) {
            steps.extend(idx.zip(vals).map(|(i, v)| (i, make(v.clone()))));
        }
    }
    steps.sort_by_key(|(i, _)| *i);
    steps.into_iter().map(|(_, s)| s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn default_secs(cmd: &str, flag: &str) -> u64 {
        let root = Cli::command();
        let sub = root.find_subcommand(cmd).expect("command");
        let arg = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(flag))
            .expect("flag");
        arg.get_default_values()[0]
            .to_str()
            .and_then(|v| v.parse().ok())
            .expect("a number of seconds")
    }

    /// A flag's default and the library's default for the same wait are
    /// the same named timeout, so the CLI and a library caller agree.
    #[test]
    fn timeout_defaults_match_the_library() {
        let boot = machinen::BootOptions::default().boot_timeout.as_secs();
        assert_eq!(default_secs("boot", "boot-timeout"), boot);
        let restore = machinen::RestoreOptions::new("b").boot_timeout.as_secs();
        assert_eq!(default_secs("restore", "boot-timeout"), restore);
        let provision = machinen::ProvisionOptions::default().boot_timeout.as_secs();
        assert_eq!(default_secs("provision", "boot-timeout"), provision);
        assert_eq!(
            default_secs("snapshot", "timeout"),
            timeouts::SNAPSHOT.as_secs()
        );
        assert_eq!(default_secs("stop", "timeout"), timeouts::STOP.as_secs());
        assert_eq!(boot, timeouts::BOOT.as_secs());
    }

    #[test]
    fn provision_keeps_the_order_of_run_and_copy() {
        let args = [
            "machinen",
            "provision",
            "--copy",
            "a:/a",
            "--run",
            "one",
            "--env",
            "K=V",
            "--copy=b:/b",
            "--run",
            "two",
            "--run=three",
            "-o",
            "out.tar.gz",
            "--",
            "/app/x",
            "--flag",
        ];
        let m = Cli::command().try_get_matches_from(args).expect("parse");
        let sub = m.subcommand_matches("provision").expect("provision");
        use StepArg::*;
        assert_eq!(
            ordered_steps(sub),
            vec![
                Copy("a:/a".into()),
                Run("one".into()),
                Copy("b:/b".into()),
                Run("two".into()),
                Run("three".into())
            ]
        );
        let Command::Provision(p) = Cli::try_parse_from(args).expect("parse").command else {
            panic!("not provision")
        };
        assert_eq!(p.argv, vec!["/app/x", "--flag"]);
        assert_eq!(p.out, PathBuf::from("out.tar.gz"));
        assert_eq!(p.process.env, vec!["K=V"]);
        assert!(
            Cli::try_parse_from(["machinen", "provision", "--run", "x"]).is_err(),
            "-o is required"
        );
        assert!(
            Cli::try_parse_from(["machinen", "provision", "-o", "x", "--cmd", "a", "--", "b"])
                .is_err(),
            "--cmd or argv, not both"
        );
    }

    #[test]
    fn parity_flags_parse() {
        let parse = |args: &[&str]| Cli::try_parse_from(args).map(|c| c.command);
        let Ok(Command::Exec(e)) = parse(&[
            "machinen",
            "exec",
            "--pty",
            "--timeout",
            "1.5",
            "web",
            "--",
            "true",
        ]) else {
            panic!("exec")
        };
        assert!(e.tty);
        assert_eq!(e.timeout, Some(std::time::Duration::from_millis(1500)));
        for bad in ["0", "-1", "soon", "inf"] {
            assert!(
                parse(&["machinen", "exec", "--timeout", bad, "web", "--", "true"]).is_err(),
                "{bad}"
            );
        }
        let Ok(Command::Gc(g)) = parse(&["machinen", "gc", "-n"]) else {
            panic!("gc")
        };
        assert!(g.dry_run);
        let Ok(Command::Stop(st)) = parse(&["machinen", "stop", "--dry-run", "web"]) else {
            panic!("stop")
        };
        assert!(st.dry_run);
        let Ok(Command::Cp(c)) = parse(&[
            "machinen",
            "cp",
            "-r",
            "--exclude",
            "*.o",
            "--exclude",
            "target",
            "a",
            "web:/b",
        ]) else {
            panic!("cp")
        };
        assert!(c.recursive && c.exclude == ["*.o", "target"]);
        assert!(
            parse(&["machinen", "cp", "--exclude", "x", "a", "web:/b"]).is_err(),
            "--exclude needs -r"
        );
        let Ok(Command::Boot(b)) = parse(&["machinen", "boot", "--disk-size", "8G", "--nested"])
        else {
            panic!("boot")
        };
        assert_eq!((b.disk_size, b.nested), (Some(8 << 30), true));
        assert!(parse(&["machinen", "boot", "--disk-size", "1M"]).is_err());
        let Ok(Command::Boot(b)) = parse(&[
            "machinen",
            "boot",
            "--mount",
            "/a:/x",
            "--mount",
            "b:/y",
            "--mount-upper-size",
            "64M",
        ]) else {
            panic!("mounts")
        };
        assert_eq!((b.mounts.len(), b.mount_upper_size), (2, Some(64 << 20)));
        assert!(parse(&["machinen", "boot", "--mount-upper-size", "64M"]).is_err());
        assert!(parse(&[
            "machinen",
            "boot",
            "--mount",
            "/a:/x",
            "--mount-upper-size",
            "x"
        ])
        .is_err());
        assert!(parse(&["machinen", "feedback"]).is_err(), "text or --list");
        assert!(parse(&["machinen", "feedback", "x", "--list"]).is_err());
        assert!(matches!(
            parse(&["machinen", "feedback", "--list"]),
            Ok(Command::Feedback(_))
        ));
    }

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn boot_parses_flags_and_trailing_command() {
        let cli = Cli::try_parse_from([
            "machinen",
            "boot",
            "img.tar.gz",
            "--name",
            "a/b",
            "-e",
            "A=1",
            "--env",
            "B=2",
            "--cwd",
            "/tmp",
            "--memory",
            "256",
            "-d",
            "--",
            "sh",
            "-c",
            "echo --name",
        ])
        .expect("parse");
        let Command::Boot(b) = cli.command else {
            panic!("not boot")
        };
        assert_eq!(b.image.as_deref(), Some(std::path::Path::new("img.tar.gz")));
        assert_eq!(b.name.as_deref(), Some("a/b"));
        assert_eq!(b.process.env, vec!["A=1", "B=2"]);
        assert_eq!(b.process.cwd.as_deref(), Some("/tmp"));
        assert_eq!(b.memory, Some(256));
        assert!(b.detached);
        assert_eq!(b.cmd, vec!["sh", "-c", "echo --name"]);
    }

    #[test]
    fn aliases_and_required_parts() {
        for alias in ["ls", "list", "ps"] {
            assert!(matches!(
                Cli::try_parse_from(["machinen", alias])
                    .expect(alias)
                    .command,
                Command::Ls(_)
            ));
        }
        assert!(
            Cli::try_parse_from(["machinen", "exec", "web"]).is_err(),
            "exec needs a command"
        );
        assert!(
            Cli::try_parse_from(["machinen", "stop"]).is_err(),
            "stop needs a target"
        );
        assert!(Cli::try_parse_from(["machinen", "boot", "--memory", "lots"]).is_err());
        let Command::Gc(g) = Cli::try_parse_from(["machinen", "gc", "--dry-run", "--json"])
            .expect("gc")
            .command
        else {
            panic!()
        };
        assert!(g.dry_run && g.json);
    }
}
