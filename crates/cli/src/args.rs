//! Arguments of the interactive, file, secret and agent-facing commands
//! (`cp`, `attach`, `repl`, `mux`, `agent-context`, `completion`, and the
//! `--secret` flags). Part of the grammar in [`crate::cli`].

use clap::{Args, ValueEnum};

/// `--secret` and `--secret-file`: values that reach the guest as files in
/// a tmpfs (`/run/machinen/secrets/NAME`, mode 0400), never on its disk.
#[derive(Debug, Args, Clone, Default)]
pub struct SecretArgs {
    /// Secret for the guest, readable at /run/machinen/secrets/NAME (repeatable). Never stored on disk, in logs or metadata; supply it again after restore/fork.
    #[arg(long = "secret", value_name = "NAME=VALUE")]
    pub secret: Vec<String>,
    /// Secret read from a host file (repeatable).
    #[arg(long = "secret-file", value_name = "NAME=PATH")]
    pub secret_file: Vec<String>,
}

impl SecretArgs {
    /// Parse into secrets (reads the files). Errors never echo a value.
    pub fn parse(&self) -> machinen::Result<Vec<machinen::Secret>> {
        let mut out = Vec::new();
        for s in &self.secret {
            out.push(machinen::secrets::parse_secret_arg(s)?);
        }
        for s in &self.secret_file {
            out.push(machinen::secrets::parse_secret_file_arg(s)?);
        }
        machinen::secrets::validate(&out)?;
        Ok(out)
    }
}

#[derive(Debug, Args)]
#[command(after_help = "\
SRC and DST: a host path, `-` (stdin/stdout), or TARGET:/guest/path (TARGET is a VM name or pid;
the guest path is absolute). Exactly one side is in a VM. Binary-safe and streamed; missing parent
directories are created on the receiving side; the file's mode is kept.

Copies out of a VM are bounded: at most --max-size (default 4G), and the host filesystem keeps a
free-space reserve (the smaller of 1 GiB and 5% of its size; MACHINEN_DISK_RESERVE=2G, 10% or 0
overrides it). The file appears complete or not at all: an error, Ctrl-C or SIGTERM leaves nothing
behind (where the filesystem supports O_TMPFILE, not even SIGKILL does).

Directories (-r): one tar stream each way; modes, mtimes and symlinks are kept (links are never
followed), owners are not. Into a VM, SRC's contents go into the guest directory DST (created when
missing, merged into when it exists); DST ending in `/` means DST/NAME-OF-SRC. Out of a VM, an
existing directory DST means DST/NAME-OF-SRC; the target must not exist (or be an empty directory)
and appears complete or not at all; every entry must stay inside it (no `..`, absolute paths, writes
through symlinks or hard links to outside: FILES_PATH_ESCAPE), devices and FIFOs are skipped,
set-id bits dropped, and --max-size counts file data plus 512 bytes an entry.
--exclude PATTERN (repeatable) leaves out matching paths, relative to SRC: `*.o` or `node_modules`
(no `/`) match a name at any depth; `build/*.log`, `/top` and `**/cache` match the relative path
(`*` stays within one directory, `**` spans any); a trailing `/` matches directories only.

Examples:
  machinen cp ./app.tar.gz web:/srv/app.tar.gz
  machinen cp web:/var/log/syslog ./syslog
  machinen cp web:/etc/hostname -            print to stdout
  echo hi | machinen cp - web:/tmp/greeting
  machinen cp -r ./src web:/srv/app --exclude target --exclude '*.o'
  machinen cp -r web:/srv/app/out ./out")]
pub struct CpArgs {
    /// Source: HOST_PATH, `-`, or TARGET:/GUEST_PATH.
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Destination: HOST_PATH, `-`, or TARGET:/GUEST_PATH (a trailing `/` or an existing directory keeps the source's file name).
    #[arg(value_name = "DST")]
    pub dst: String,
    /// Permission bits for the destination, octal (default: the source's).
    #[arg(long, value_name = "OCTAL")]
    pub mode: Option<String>,
    /// Append to the destination instead of replacing it (guest destinations).
    #[arg(long)]
    pub append: bool,
    /// Largest file (or directory tree) copied out of a VM: bytes or 10K/500M/20G/1T, or `unlimited` (default 4G).
    #[arg(long, value_name = "SIZE")]
    pub max_size: Option<String>,
    /// Copy a directory tree (as one streamed tar), like cp -r.
    #[arg(long, short = 'r', visible_short_alias = 'R')]
    pub recursive: bool,
    /// Leave out paths matching this glob, relative to SRC (repeatable; needs -r).
    #[arg(long, value_name = "PATTERN", requires = "recursive")]
    pub exclude: Vec<String>,
    /// Print machine-readable JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Opens an interactive login shell in the VM on a real terminal (bash -l -i where bash exists, else sh).
Exit the shell to leave; the VM keeps running.

Examples:
  machinen attach web
  machinen attach web --tail            print the VM's console log first (last 200 lines)
  machinen attach web --tail 50 --shell 'python3'")]
pub struct AttachArgs {
    /// VM name or pid.
    pub target: String,
    /// Command to run instead of the login shell (run with `sh -c`).
    #[arg(long, value_name = "CMD")]
    pub shell: Option<String>,
    /// Print the VM's console log first: the last N lines (default 200), or `all`.
    #[arg(long, value_name = "N", num_args = 0..=1, default_missing_value = "200")]
    pub tail: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Each input line runs as its own command (`sh -c LINE`) in the VM; state such as the working
directory or variables does not carry over between lines. Works with piped input:
  printf 'uname -a\\nls /\\n' | machinen repl web
The exit code is that of the last line run.")]
pub struct ReplArgs {
    /// VM name or pid.
    pub target: String,
    #[command(flatten)]
    pub process: crate::cli::ProcessArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "\
One terminal for all your VMs. Commands: /ls, /attach NAME|PID|#, /help, /quit.
While attached, everything goes to the VM's shell; press Ctrl-] twice to detach (the VM and its
shell keep running). /attach again re-attaches and replays the scrollback.")]
pub struct MuxArgs {
    /// Attach to this VM right away.
    pub target: Option<String>,
    /// Shell command for new sessions (default: bash -l -i where bash exists, else sh).
    #[arg(long, value_name = "CMD")]
    pub shell: Option<String>,
}

#[derive(Debug, Args)]
pub struct AgentContextArgs {
    /// Accepted for uniformity; the output is always JSON.
    #[arg(long)]
    pub json: bool,
}

/// Shells `completion` knows.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Shell {
    Bash,
    Zsh,
    Fish,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  source <(machinen completion bash)
  machinen completion zsh > \"${fpath[1]}/_machinen\"
  machinen completion fish > ~/.config/fish/completions/machinen.fish")]
pub struct CompletionArgs {
    /// The shell to generate completions for.
    #[arg(value_enum)]
    pub shell: Shell,
}
