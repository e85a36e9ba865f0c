//! The command-line grammar. Arguments become typed settings here, at the
//! edge; the `cmd` modules receive them already checked by clap.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

pub use crate::args::{AgentContextArgs, AttachArgs, CompletionArgs, CpArgs, MuxArgs, ReplArgs, SecretArgs};

const AFTER_HELP: &str = "\
Examples:
  machinen install                          fetch the kernel, build the Debian base
  machinen boot -- uname -a                 boot, run one command, exit with its code
  machinen boot --name web --detached       boot in the background
  machinen exec web -- cat /etc/os-release  run a command in a live VM
  machinen ls                               list live VMs
  machinen stop web                         stop a VM

Exit codes: a command run in a VM passes its own exit status through (128+N
when killed by signal N). machinen's own failures exit with 125, 126 (command
cannot run), 127 (command not found) or 2 (bad arguments); the error line names
a stable code such as REGISTRY_NAME_IN_USE.

Environment: MACHINEN_HOME, MACHINEN_ASSETS_DIR, MACHINEN_CACHE_DIR,
MACHINEN_REGISTRY_DIR, MACHINEN_ACCEL (kvm|hvf|tcg), MACHINEN_LOG.";

#[derive(Debug, Parser)]
#[command(
    name = "machinen",
    version = concat!(env!("CARGO_PKG_VERSION"), " (protocol ", "1", ")"),
    about = "Linux microVMs that can be frozen, moved, resumed and forked",
    after_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
    /// Copy a file into or out of a live VM.
    Cp(CpArgs),
    /// One terminal for many VMs: list, attach, detach (Ctrl-] Ctrl-]), re-attach.
    Mux(MuxArgs),
    /// List live VMs.
    #[command(visible_aliases = ["list", "ps"])]
    Ls(LsArgs),
    /// Stop a VM (graceful, then forced after a timeout).
    Stop(StopArgs),
    /// Remove what dead VMs left behind.
    Gc(GcArgs),
    /// Fetch the guest kernel and build the Debian base rootfs.
    Install(InstallArgs),
    /// Describe every command, flag and exit code as versioned JSON (for agents and tools).
    AgentContext(AgentContextArgs),
    /// Print a shell completion script (bash, zsh, fish).
    Completion(CompletionArgs),
    /// Names of live VMs, one a line (used by the completion scripts).
    #[command(name = "__vm-names", hide = true)]
    VmNames,
}

impl Command {
    pub fn json(&self) -> bool {
        match self {
            Command::Boot(a) => a.json,
            Command::Exec(a) => a.json,
            Command::Cp(a) => a.json,
            Command::AgentContext(_) => true,
            Command::Attach(_) | Command::Repl(_) | Command::Mux(_) | Command::Completion(_) | Command::VmNames => false,
            Command::Ls(a) => a.json,
            Command::Stop(a) => a.json,
            Command::Gc(a) => a.json,
            Command::Install(a) => a.json,
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
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  machinen boot -- uname -a\n  machinen boot --env GREETING=hi --cwd /tmp -- sh -c 'echo $GREETING from $PWD'\n  machinen boot --name web --detached --json\n  machinen boot ./app.tar.gz -- /app/run")]
pub struct BootArgs {
    /// Rootfs tarball to boot (default: the installed Debian base).
    #[arg(value_name = "IMAGE")]
    pub image: Option<PathBuf>,
    /// Name of the VM (unique among live VMs; path-shaped names like a/b/c are fine).
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Guest memory ceiling in MiB (default: half the host's RAM, 512..4096).
    #[arg(long, short = 'm', value_name = "MIB")]
    pub memory: Option<u32>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,
    /// Return once the guest is ready and leave the VM running.
    #[arg(long, short = 'd', visible_alias = "detach")]
    pub detached: bool,
    #[command(flatten)]
    pub secrets: SecretArgs,
    /// Seconds to wait for the guest to become ready.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    pub boot_timeout: u64,
    /// Verbose guest agent logs in the VM's console log.
    #[arg(long)]
    pub debug: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
    /// Command to run in the guest.
    #[arg(last = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  machinen exec web -- ls -la /\n  cat data.bin | machinen exec web -- sha256sum\n  machinen exec 12345 --json -- hostname\n  machinen exec -t web -- top")]
pub struct ExecArgs {
    /// VM name or pid.
    pub target: String,
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Run on a pseudo-terminal: the host terminal goes raw, keys (Ctrl-C, Ctrl-Z) and window size reach the command.
    #[arg(long, short = 't', conflicts_with = "json")]
    pub tty: bool,
    /// Print one JSON object with the exit status and the captured output.
    #[arg(long)]
    pub json: bool,
    /// Command to run.
    #[arg(last = true, required = true, value_name = "CMD")]
    pub cmd: Vec<String>,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct StopArgs {
    /// VM name or pid.
    pub target: String,
    /// Skip the graceful guest power-off.
    #[arg(long, short = 'f')]
    pub force: bool,
    /// Seconds to wait before killing the VM.
    #[arg(long, default_value_t = 15, value_name = "SECS")]
    pub timeout: u64,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    /// Only show what would be removed.
    #[arg(long)]
    pub dry_run: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// Fetch and rebuild even when already installed.
    #[arg(long)]
    pub force: bool,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn grammar_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn boot_parses_flags_and_trailing_command() {
        let cli = Cli::try_parse_from([
            "machinen", "boot", "img.tar.gz", "--name", "a/b", "-e", "A=1", "--env", "B=2", "--cwd", "/tmp", "--memory", "256", "-d", "--", "sh", "-c",
            "echo --name",
        ])
        .expect("parse");
        let Command::Boot(b) = cli.command else { panic!("not boot") };
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
            assert!(matches!(Cli::try_parse_from(["machinen", alias]).expect(alias).command, Command::Ls(_)));
        }
        assert!(Cli::try_parse_from(["machinen", "exec", "web"]).is_err(), "exec needs a command");
        assert!(Cli::try_parse_from(["machinen", "stop"]).is_err(), "stop needs a target");
        assert!(Cli::try_parse_from(["machinen", "boot", "--memory", "lots"]).is_err());
        let Command::Gc(g) = Cli::try_parse_from(["machinen", "gc", "--dry-run", "--json"]).expect("gc").command else { panic!() };
        assert!(g.dry_run && g.json);
    }
}
