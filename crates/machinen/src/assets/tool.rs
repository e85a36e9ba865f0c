//! Running the OS tools that install and image building lean on (apt, dpkg,
//! mmdebstrap, tar, mkfs.ext4, qemu-img, fakeroot): finding them, and turning
//! a failed run into an error that carries the tail of the tool's stderr.

use std::ffi::OsStr;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

/// How much of a failed tool's stderr to keep in the error: enough for the
/// real complaint, which tools print last, without flooding the terminal.
const STDERR_TAIL_BYTES: usize = 2000;

/// A host tool and the Debian package that ships it (named in hints).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Tool {
    pub name: &'static str,
    pub package: &'static str,
}

pub(crate) const APT_GET: Tool = Tool {
    name: "apt-get",
    package: "apt",
};
pub(crate) const APT_CACHE: Tool = Tool {
    name: "apt-cache",
    package: "apt",
};
pub(crate) const APT_CONFIG: Tool = Tool {
    name: "apt-config",
    package: "apt",
};
pub(crate) const DPKG_DEB: Tool = Tool {
    name: "dpkg-deb",
    package: "dpkg",
};
pub(crate) const MMDEBSTRAP: Tool = Tool {
    name: "mmdebstrap",
    package: "mmdebstrap",
};
pub(crate) const DEBOOTSTRAP: Tool = Tool {
    name: "debootstrap",
    package: "debootstrap",
};
pub(crate) const TAR: Tool = Tool {
    name: "tar",
    package: "tar",
};
pub(crate) const GZIP: Tool = Tool {
    name: "gzip",
    package: "gzip",
};
pub(crate) const MKFS_EXT4: Tool = Tool {
    name: "mkfs.ext4",
    package: "e2fsprogs",
};
pub(crate) const QEMU_IMG: Tool = Tool {
    name: "qemu-img",
    package: "qemu-utils",
};
pub(crate) const FAKEROOT: Tool = Tool {
    name: "fakeroot",
    package: "fakeroot",
};

impl Tool {
    /// The tool's absolute path, or `None` when it is not installed.
    ///
    /// `PATH` is searched first, then the sbin directories: `mkfs.ext4` and
    /// `debootstrap` live there and a non-root user's `PATH` often lacks them.
    pub fn find(self) -> Option<PathBuf> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let extra =
            ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from);
        std::env::split_paths(&path)
            .chain(extra)
            .map(|dir| dir.join(self.name))
            .find(|p| is_executable(p))
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A tool that could not be started or did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("could not start `{command}`")]
    Spawn {
        command: String,
        #[source]
        source: io::Error,
    },
    #[error("`{command}` {status}{}", tail_suffix(stderr_tail))]
    Failed {
        command: String,
        status: ExitStatus,
        stderr_tail: String,
    },
}

fn tail_suffix(tail: &str) -> String {
    if tail.is_empty() {
        String::new()
    } else {
        format!(": {tail}")
    }
}

/// A command line rendered for messages (program name, not its full path).
pub(crate) struct Shown<'a>(pub &'a Command);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prog = Path::new(self.0.get_program());
        let name = prog.file_name().unwrap_or(prog.as_os_str());
        write!(f, "{}", name.to_string_lossy())?;
        for a in self.0.get_args() {
            let a = a.to_string_lossy();
            if a.is_empty() || a.contains(char::is_whitespace) {
                write!(f, " '{a}'")?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// The last `STDERR_TAIL_BYTES` of `stderr`, trimmed, on one logical block.
pub(crate) fn stderr_tail(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let text = text.trim();
    if text.len() <= STDERR_TAIL_BYTES {
        return text.to_string();
    }
    let mut start = text.len() - STDERR_TAIL_BYTES;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &text[start..])
}

/// Run `cmd` to completion with stdin closed, capturing stdout and stderr.
/// A non-zero exit becomes [`ToolError::Failed`] with the stderr tail.
pub(crate) fn run(cmd: &mut Command) -> Result<Output, ToolError> {
    let command = Shown(cmd).to_string();
    tracing::debug!(%command, "running");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|source| ToolError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ToolError::Failed {
            command,
            status: out.status,
            stderr_tail: stderr_tail(&out.stderr),
        });
    }
    if !out.stderr.is_empty() {
        tracing::debug!(%command, stderr = %stderr_tail(&out.stderr), "tool said");
    }
    Ok(out)
}

/// `Command::new(path)` with a fixed, predictable locale so that the output
/// we parse (apt) and the messages we show are not translated.
pub(crate) fn command(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("LC_ALL", "C.UTF-8").env_remove("LANGUAGE");
    c
}

/// Whether this process runs as root (then no fakeroot is needed, and apt
/// may update its own package lists).
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_sh_and_not_nonsense() {
        assert!(Tool {
            name: "sh",
            package: "dash"
        }
        .find()
        .is_some());
        assert!(Tool {
            name: "no-such-tool-machinen",
            package: "x"
        }
        .find()
        .is_none());
    }

    #[test]
    fn failed_run_keeps_stderr_tail() {
        let err =
            run(command("sh").args(["-c", "echo first >&2; echo 'the real reason' >&2; exit 3"]))
                .expect_err("must fail");
        let msg = err.to_string();
        assert!(msg.starts_with("`sh -c"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(msg.ends_with("the real reason"), "{msg}");
    }

    #[test]
    fn tail_is_bounded_and_char_safe() {
        let long = "é".repeat(5000);
        let t = stderr_tail(long.as_bytes());
        assert!(t.len() <= STDERR_TAIL_BYTES + 4);
        assert!(t.starts_with('…'));
    }
}
