//! Every `MACHINEN_*` environment variable, in one list.
//!
//! Reading sites use the name constants; the README's Environment table, the
//! CLI's `--help` and `machinen agent-context` are generated from [`ALL`] or
//! tested against it, so a variable cannot be added in one place and
//! forgotten in the others (they had drifted: `MACHINEN_KERNEL_ARGS` was read
//! but documented nowhere). A test also scans the sources: a `MACHINEN_*`
//! name spelled anywhere under `crates/` must be in the list.

/// Root of machinen's files.
pub const HOME: &str = "MACHINEN_HOME";
/// Installed kernel, modules and base rootfs.
pub const ASSETS_DIR: &str = "MACHINEN_ASSETS_DIR";
/// Image and initramfs cache.
pub const CACHE_DIR: &str = "MACHINEN_CACHE_DIR";
/// The registry of VMs.
pub const REGISTRY_DIR: &str = "MACHINEN_REGISTRY_DIR";
/// Accelerator override.
pub const ACCEL: &str = "MACHINEN_ACCEL";
/// The engine `snapshot` uses without `--engine`.
pub const SNAPSHOT_ENGINE: &str = "MACHINEN_SNAPSHOT_ENGINE";
/// The supervisor binary.
pub const VMM: &str = "MACHINEN_VMM";
/// The static guest agent binary.
pub const AGENT: &str = "MACHINEN_AGENT";
/// The QEMU system emulator binary.
pub const QEMU: &str = "MACHINEN_QEMU";
/// The passt binary.
pub const PASST: &str = "MACHINEN_PASST";
/// The virtiofsd binary (live mounts).
pub const VIRTIOFSD: &str = "MACHINEN_VIRTIOFSD";
/// Bound on the uncompressed size of an OCI/Docker image's layers.
pub const IMAGE_MAX_BYTES: &str = "MACHINEN_IMAGE_MAX_BYTES";
/// The registry short image names (`python:3.12`) come from.
pub const DEFAULT_REGISTRY: &str = "MACHINEN_DEFAULT_REGISTRY";
/// Registries reached over plain HTTP (`HOST[:PORT]`, comma-separated).
pub const INSECURE_REGISTRIES: &str = "MACHINEN_INSECURE_REGISTRIES";
/// Registry credentials (`USER:PASSWORD`) over the Docker config's.
pub const REGISTRY_AUTH: &str = "MACHINEN_REGISTRY_AUTH";
/// Where guest RAM files live.
pub const RAM_DIR: &str = "MACHINEN_RAM_DIR";
/// Log filter of the CLI and the supervisor.
pub const LOG: &str = "MACHINEN_LOG";
/// Size at which a console log is cut.
pub const CONSOLE_LOG_MAX: &str = "MACHINEN_CONSOLE_LOG_MAX";
/// Free-space reserve of host filesystems written by `cp`/`provision -o`.
pub const DISK_RESERVE: &str = "MACHINEN_DISK_RESERVE";
/// Extra guest kernel arguments.
pub const KERNEL_ARGS: &str = "MACHINEN_KERNEL_ARGS";
/// Debug logging of the agent run as a host program (tests).
pub const AGENT_DEBUG: &str = "MACHINEN_AGENT_DEBUG";
/// Secrets directory of the agent run as a host program (tests).
pub const AGENT_SECRETS_DIR: &str = "MACHINEN_AGENT_SECRETS_DIR";
/// Rebuild the shared test assets.
pub const FORCE_INSTALL: &str = "MACHINEN_FORCE_INSTALL";
/// The agent binary the library's asset tests install.
pub const TEST_AGENT: &str = "MACHINEN_TEST_AGENT";
/// Seconds an end-to-end test may run before its watchdog ends it.
pub const TEST_DEADLINE_SECS: &str = "MACHINEN_TEST_DEADLINE_SECS";

/// Who a variable is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audience {
    /// Users of the CLI and the library: in the README, `--help` and
    /// `agent-context`.
    User,
    /// The project's own tests and debugging of the agent on the host: in
    /// the list (so the source scan knows them), not in user documentation.
    Development,
}

/// One variable: name, default and meaning. `default` and `meaning` are
/// Markdown (backticks), as the README shows them; [`plain`] strips them for
/// terminals.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Var {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
    pub audience: Audience,
}

const fn user(name: &'static str, default: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        default,
        meaning,
        audience: Audience::User,
    }
}

const fn dev(name: &'static str, default: &'static str, meaning: &'static str) -> Var {
    Var {
        name,
        default,
        meaning,
        audience: Audience::Development,
    }
}

/// Every variable, in the order the README lists them.
pub const ALL: &[Var] = &[
    user(HOME, "`~/.machinen`", "everything below lives here"),
    user(
        ASSETS_DIR,
        "`$MACHINEN_HOME/<version>/bases/debian-<arch>`",
        "kernel, modules, base rootfs",
    ),
    user(
        CACHE_DIR,
        "`$MACHINEN_HOME/<version>/cache`",
        "ext4 images and initramfs by content hash; pulled images (`oci/`), checkpoint chains built for restores (`chains/`), bundles pulled by `restore REF` (`bundles/`) and the chunks of an unfinished pull (`chunks/`)",
    ),
    user(
        REGISTRY_DIR,
        "`$MACHINEN_HOME/vms`",
        "one directory per VM (0700, private to its owner)",
    ),
    user(ACCEL, "probed", "`kvm`, `hvf` or `tcg`"),
    user(
        SNAPSHOT_ENGINE,
        "`vmstate`",
        "what `snapshot` writes without `--engine`: `vmstate` (the whole VM) or `criu` (its process tree and disk)",
    ),
    user(
        VMM,
        "found next to `machinen`",
        "the per-VM supervisor program `machinen-vmm`",
    ),
    user(
        AGENT,
        "found next to `machinen`",
        "the static guest agent program `machinen-agent`",
    ),
    user(QEMU, "`qemu-system-<arch>` on `PATH`", "the QEMU program"),
    user(
        PASST,
        "`passt` on `PATH`",
        "the user-mode network stack of `--network nat`",
    ),
    user(
        VIRTIOFSD,
        "`virtiofsd` on `PATH`, `/usr/libexec/virtiofsd`, `~/.cargo/bin/virtiofsd`",
        "the virtio-fs server of `--mount-live`",
    ),
    user(
        IMAGE_MAX_BYTES,
        "`64G`",
        "bound on the unpacked size of an `oci:`/`docker-archive:` image's layers (`512M`, `100G`)",
    ),
    user(
        DEFAULT_REGISTRY,
        "none",
        "the registry short image names (`app:1`) are pulled from (`HOST[:PORT][/PREFIX]`)",
    ),
    user(
        INSECURE_REGISTRIES,
        "none",
        "registries reached over plain HTTP, comma-separated `HOST[:PORT]` (`--insecure-registry`)",
    ),
    user(
        REGISTRY_AUTH,
        "the Docker config (credential helper, else `auths`)",
        "registry credentials as `USER:PASSWORD` (never logged)",
    ),
    user(
        RAM_DIR,
        "`/dev/shm`",
        "where guest RAM files live (tmpfs, 0600 files); a VM gets one only if the free space covers every RAM file there growing to its ceiling, else anonymous RAM; empty: always anonymous RAM",
    ),
    user(LOG, "`warn`", "log filter (`info`, `debug`)"),
    user(
        CONSOLE_LOG_MAX,
        "`16M`",
        "a VM's `console.log` is cut to its newest half when it grows past this (the guest decides how much it writes)",
    ),
    user(
        DISK_RESERVE,
        "min(1 GiB, 5 %)",
        "free space a host filesystem keeps when files are copied out of a VM (`2G`, `10%`, `0` = none)",
    ),
    user(
        KERNEL_ARGS,
        "none",
        "extra guest kernel arguments, space-separated, for debugging (e.g. `initcall_debug`)",
    ),
    dev(
        AGENT_DEBUG,
        "unset",
        "`1`: debug lines from the agent run as a host program (tests)",
    ),
    dev(
        AGENT_SECRETS_DIR,
        "a directory under the temp dir",
        "secrets directory of the agent run as a host program (tests)",
    ),
    dev(
        FORCE_INSTALL,
        "unset",
        "the library's asset test rebuilds the shared assets",
    ),
    dev(
        TEST_AGENT,
        "the built agent",
        "the agent binary the library's asset test installs",
    ),
    dev(
        TEST_DEADLINE_SECS,
        "900",
        "seconds an end-to-end test may run before its watchdog reports and ends it",
    ),
];

/// The variables users see documented.
pub fn user_vars() -> impl Iterator<Item = &'static Var> {
    ALL.iter().filter(|v| v.audience == Audience::User)
}

/// Markdown without its code marks, for a terminal.
pub fn plain(s: &str) -> String {
    s.replace('`', "")
}

/// The README's Environment table, exactly.
pub fn markdown_table() -> String {
    let mut t = String::from("| variable | default | |\n| --- | --- | --- |\n");
    for v in user_vars() {
        t.push_str(&format!(
            "| `{}` | {} | {} |\n",
            v.name, v.default, v.meaning
        ));
    }
    t
}

/// The `Environment:` section of `--help`.
pub fn help_text() -> String {
    let mut t = String::from("Environment:\n");
    for v in user_vars() {
        t.push_str(&format!(
            "  {}\n      {} (default: {})\n",
            v.name,
            plain(v.meaning),
            plain(v.default)
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    fn workspace() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn names_are_unique_and_prefixed() {
        for (i, v) in ALL.iter().enumerate() {
            assert!(v.name.starts_with("MACHINEN_"), "{}", v.name);
            assert!(!v.default.is_empty() && !v.meaning.is_empty(), "{}", v.name);
            assert!(
                ALL[i + 1..].iter().all(|w| w.name != v.name),
                "{} twice",
                v.name
            );
        }
    }

    /// The README's table is the list's: the same variables, defaults and
    /// meanings, in the same order.
    #[test]
    fn readme_table_is_the_list() {
        let readme = std::fs::read_to_string(workspace().join("README.md")).expect("README.md");
        let section = readme
            .split("### Environment\n")
            .nth(1)
            .expect("README has an Environment section");
        let rows: Vec<(String, String, String)> = section
            .lines()
            .skip_while(|l| l.trim().is_empty())
            .take_while(|l| l.starts_with('|'))
            .skip(2)
            .map(|l| {
                let cells: Vec<&str> = l.trim_matches('|').split(" | ").map(str::trim).collect();
                assert_eq!(cells.len(), 3, "README row {l:?}");
                (
                    cells[0].trim_matches('`').to_string(),
                    cells[1].to_string(),
                    cells[2].to_string(),
                )
            })
            .collect();
        let want: Vec<(String, String, String)> = user_vars()
            .map(|v| (v.name.into(), v.default.into(), v.meaning.into()))
            .collect();
        assert_eq!(
            rows,
            want,
            "README's Environment table differs from proto::env::ALL; it should read:\n{}",
            markdown_table()
        );
    }

    /// Every `MACHINEN_*` name spelled in the crates' sources (read, set in a
    /// test, or named in a hint) is in the list.
    #[test]
    fn every_variable_in_the_sources_is_listed() {
        fn walk(dir: &Path, found: &mut Vec<(String, PathBuf)>) {
            for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, found);
                } else if p.extension().is_some_and(|x| x == "rs" || x == "md") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let mut rest = text.as_str();
                    while let Some(i) = rest.find("MACHINEN_") {
                        let tail = &rest[i..];
                        let end = tail
                            .find(|c: char| {
                                !(c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
                            })
                            .unwrap_or(tail.len());
                        let name = tail[..end].trim_end_matches('_');
                        // `MACHINEN_*` in prose is the family, not a variable.
                        if name.len() > "MACHINEN_".len() {
                            found.push((name.to_string(), p.clone()));
                        }
                        rest = &tail[end..];
                    }
                }
            }
        }
        let mut found = Vec::new();
        walk(&workspace().join("crates"), &mut found);
        assert!(
            found.iter().any(|(n, _)| n == RAM_DIR),
            "the scan sees the sources"
        );
        for (name, path) in found {
            assert!(
                ALL.iter().any(|v| v.name == name),
                "{name} (in {}) is not in proto::env::ALL",
                path.display()
            );
        }
    }

    #[test]
    fn help_names_every_user_variable() {
        let h = help_text();
        for v in user_vars() {
            assert!(h.contains(v.name), "{}", v.name);
        }
        assert!(!h.contains('`'));
    }
}
