//! PID 1 duties: bring the guest up from the initramfs into the root disk,
//! and take it down.

use machinen_proto::timeouts;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::mount::{mount, MsFlags};

use crate::cmdline::{self, BootConfig};
use crate::log::{debug, error, info};
use crate::net;

/// The root disk (virtio-blk, ext4 on the whole disk).
pub const ROOT_DEVICE: &str = "/dev/vda";
/// How long to wait for the root disk to show up.
pub const ROOT_DEVICE_WAIT: Duration = timeouts::ROOT_DEVICE_WAIT;
/// Where the root disk is mounted before the switch.
pub const NEW_ROOT: &str = "/newroot";
/// Modules to load, absolute paths in dependency order.
pub const MODULES_LOAD: &str = "/etc/machinen/modules.load";

/// A boot step that leaves the guest unusable.
#[derive(Debug)]
pub struct Fatal(pub String);

fn ctx(what: impl std::fmt::Display) -> impl FnOnce(nix::Error) -> io::Error {
    move |e| io::Error::other(format!("{what}: {e}"))
}

/// Make sure fds 0, 1 and 2 are open (on the console, else /dev/null), so
/// that later descriptors never land on them and logs reach the console.
pub fn ensure_stdio() {
    for fd in 0..=2 {
        if nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFD).is_ok() {
            continue;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOCTTY)
            .open("/dev/console")
            .or_else(|_| {
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/dev/null")
            });
        if let Ok(f) = file {
            let f = OwnedFd::from(f);
            if f.as_raw_fd() != fd {
                // SAFETY: dup2 onto a descriptor number that is known to be
                // closed (F_GETFD failed); `f` stays valid across the call.
                unsafe { libc::dup2(f.as_raw_fd(), fd) };
            } else {
                // It landed on the free slot itself: keep it open.
                std::mem::forget(f);
            }
        }
    }
}

fn mkdir_p(path: &str) -> io::Result<()> {
    std::fs::create_dir_all(path)
        .map_err(|e| io::Error::new(e.kind(), format!("mkdir {path}: {e}")))
}

/// Mount `fstype` on `target` (created if needed). `EBUSY` (already mounted)
/// is fine.
fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> io::Result<()> {
    mkdir_p(target)?;
    match mount(Some(source), target, Some(fstype), flags, data) {
        Ok(()) => {
            debug!("mounted {fstype} on {target}");
            Ok(())
        }
        Err(nix::Error::EBUSY) => {
            debug!("{target} already mounted");
            Ok(())
        }
        Err(e) => Err(io::Error::other(format!("mount {fstype} on {target}: {e}"))),
    }
}

/// Mount /proc, read the kernel command line (and so learn whether to log
/// debug lines), then mount /sys and /dev.
fn early_mounts() -> Result<BootConfig, Fatal> {
    let nosuid_nodev_noexec = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    let fatal = |e: io::Error| Fatal(e.to_string());
    mount_fs("proc", "/proc", "proc", nosuid_nodev_noexec, None).map_err(fatal)?;
    let cfg = cmdline::parse(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    crate::log::set_debug(cfg.debug);
    debug!(
        "agent {} starting as PID 1: {cfg:?}",
        env!("CARGO_PKG_VERSION")
    );
    mount_fs("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, None).map_err(fatal)?;
    mount_fs(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        MsFlags::MS_NOSUID,
        Some("mode=0755"),
    )
    .map_err(fatal)?;
    Ok(cfg)
}

/// Parse `modules.load`: one absolute path per line, in dependency order;
/// blank lines and `#` comments are skipped.
pub fn parse_modules_load(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(PathBuf::from)
        .collect()
}

/// Load the modules, in order. Already loaded (built in, or loaded as a
/// dependency) is fine; other failures are logged and the boot goes on (a
/// missing driver shows up as a missing device later, with a clearer
/// message).
pub fn load_modules(list: &[PathBuf]) {
    for path in list {
        match load_module(path) {
            Ok(()) => debug!("loaded {}", path.display()),
            Err(e) => error!("{e}"),
        }
    }
}

/// Load one kernel module file; one that is loaded already is fine.
pub(crate) fn load_module(path: &Path) -> Result<(), String> {
    use nix::kmod::{finit_module, ModuleInitFlags};
    let file = std::fs::File::open(path).map_err(|e| format!("module {}: {e}", path.display()))?;
    match finit_module(&file, c"", ModuleInitFlags::empty()) {
        Ok(()) | Err(nix::Error::EEXIST) => Ok(()),
        Err(e) => Err(format!("loading module {}: {e}", path.display())),
    }
}

pub(crate) fn wait_for(path: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if Path::new(path).exists() {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(timeouts::STATE_POLL);
    }
}

/// Remove the initramfs contents (they would pin memory for the guest's
/// life), staying on its filesystem and skipping `keep`. Only used when `/`
/// really is a ramfs/tmpfs.
fn free_initramfs(keep: &Path) {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // Not exported by nix; <linux/magic.h>.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let ok = statfs("/")
        .map(|s| s.filesystem_type() == RAMFS_MAGIC || s.filesystem_type() == TMPFS_MAGIC);
    if !matches!(ok, Ok(true)) {
        debug!("/ is not a ramfs: not cleaning it");
        return;
    }
    let dev = match std::fs::symlink_metadata("/") {
        Ok(m) => m.dev(),
        Err(_) => return,
    };
    fn rm_tree(dir: &Path, dev: u64, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if p == keep {
                continue;
            }
            let Ok(m) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            if m.dev() != dev {
                continue; // a mount point of another filesystem
            }
            if m.is_dir() {
                rm_tree(&p, dev, keep);
                let _ = std::fs::remove_dir(&p);
            } else {
                let _ = std::fs::remove_file(&p);
            }
        }
    }
    rm_tree(Path::new("/"), dev, keep);
}

/// Mount the root disk and make it `/`. The agent stays PID 1, in memory.
fn switch_root() -> Result<(), Fatal> {
    if !wait_for(ROOT_DEVICE, ROOT_DEVICE_WAIT) {
        return Err(Fatal(format!(
            "the root disk {ROOT_DEVICE} did not appear within {} s (is virtio_blk in {MODULES_LOAD}, and a virtio-blk device attached?)",
            ROOT_DEVICE_WAIT.as_secs()
        )));
    }
    debug!("{ROOT_DEVICE} is there");
    mkdir_p(NEW_ROOT).map_err(|e| Fatal(e.to_string()))?;
    match mount(
        Some(ROOT_DEVICE),
        NEW_ROOT,
        Some("ext4"),
        MsFlags::empty(),
        None::<&str>,
    ) {
        Ok(()) => debug!("mounted {ROOT_DEVICE} (ext4) on {NEW_ROOT}"),
        Err(nix::Error::ENODEV) => {
            return Err(Fatal(format!(
                "cannot mount {ROOT_DEVICE}: the kernel has no ext4 (add the ext4 module and its dependencies to {MODULES_LOAD})"
            )));
        }
        Err(e) => {
            return Err(Fatal(format!(
                "cannot mount {ROOT_DEVICE} as ext4 on {NEW_ROOT}: {e}"
            )))
        }
    }
    for m in ["/dev", "/proc", "/sys"] {
        let target = format!("{NEW_ROOT}{m}");
        let moved = mkdir_p(&target).and_then(|()| {
            mount(
                Some(m),
                target.as_str(),
                None::<&str>,
                MsFlags::MS_MOVE,
                None::<&str>,
            )
            .map_err(ctx(format!("move {m} to {target}")))
        });
        match moved {
            Ok(()) => debug!("moved {m} into the new root"),
            // Mounted afresh after the switch.
            Err(e) => error!("{e}"),
        }
    }
    free_initramfs(Path::new(NEW_ROOT));
    nix::unistd::chdir(NEW_ROOT).map_err(|e| Fatal(format!("chdir {NEW_ROOT}: {e}")))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| Fatal(format!("mount --move {NEW_ROOT} /: {e}")))?;
    nix::unistd::chroot(".").map_err(|e| Fatal(format!("chroot {NEW_ROOT}: {e}")))?;
    nix::unistd::chdir("/").map_err(|e| Fatal(format!("chdir / in the new root: {e}")))?;
    debug!("switched root to {ROOT_DEVICE}");
    Ok(())
}

fn symlink_if_missing(target: &str, link: &str) {
    if std::fs::symlink_metadata(link).is_ok() {
        return;
    }
    if let Err(e) = std::os::unix::fs::symlink(target, link) {
        error!("symlink {link} -> {target}: {e}");
    }
}

fn ensure_dir_mode(path: &str, mode: u32) {
    if std::fs::symlink_metadata(path).is_ok() {
        return;
    }
    let res = std::fs::create_dir_all(path)
        .and_then(|()| std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)));
    if let Err(e) = res {
        error!("mkdir {path}: {e}");
    }
}

/// The mounts and device links a Linux userland expects, in the new root.
fn setup_new_root() {
    let steps: [(&str, &str, &str, MsFlags, Option<&str>); 6] = [
        // In case the moves failed.
        (
            "proc",
            "/proc",
            "proc",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "sysfs",
            "/sys",
            "sysfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None,
        ),
        (
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        (
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620,gid=5"),
        ),
        (
            "tmpfs",
            "/dev/shm",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=1777"),
        ),
        (
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ];
    for (src, target, fstype, flags, data) in steps {
        if matches!(target, "/proc" | "/sys" | "/dev") && is_mountpoint(target) {
            continue;
        }
        if let Err(e) = mount_fs(src, target, fstype, flags, data) {
            error!("{e}");
        }
    }
    ensure_dir_mode("/run/lock", 0o1777);
    ensure_dir_mode("/tmp", 0o1777);
    symlink_if_missing("/proc/self/fd", "/dev/fd");
    symlink_if_missing("/proc/self/fd/0", "/dev/stdin");
    symlink_if_missing("/proc/self/fd/1", "/dev/stdout");
    symlink_if_missing("/proc/self/fd/2", "/dev/stderr");
    symlink_if_missing("pts/ptmx", "/dev/ptmx");
}

/// Whether `path` is the root of a mount (its device differs from its
/// parent's).
fn is_mountpoint(path: &str) -> bool {
    let p = Path::new(path);
    let (Ok(m), Some(parent)) = (std::fs::metadata(p), p.parent()) else {
        return false;
    };
    std::fs::metadata(parent)
        .map(|pm| pm.dev() != m.dev())
        .unwrap_or(false)
}

/// The whole boot, up to the point where the host can be served.
pub fn boot() -> Result<BootConfig, Fatal> {
    let cfg = early_mounts()?;

    match std::fs::read_to_string(MODULES_LOAD) {
        Ok(text) => load_modules(&parse_modules_load(&text)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => debug!("no {MODULES_LOAD}"),
        Err(e) => error!("{MODULES_LOAD}: {e}"),
    }

    switch_root()?;
    setup_new_root();
    // `boot --disk-size`: a root disk larger than the image's filesystem.
    crate::growfs::grow_root(ROOT_DEVICE, "/");
    // `boot --mount`: before anything runs, so the main command finds them.
    crate::mounts::mount_all(&cfg.mounts, ROOT_DEVICE_WAIT).map_err(Fatal)?;
    // `boot --mount-live`.
    crate::mounts::mount_live(&cfg.live, ROOT_DEVICE_WAIT).map_err(Fatal)?;

    let hostname = match cfg.hostname.as_deref() {
        Some(h) if !cmdline::valid_hostname(h) => {
            error!("invalid machinen.hostname {h:?} ignored");
            cmdline::DEFAULT_HOSTNAME
        }
        _ => cfg.hostname(),
    };
    net::set_hostname(hostname);

    if !cfg.net {
        // No network device (`--network none`): the loopback still serves
        // the guest's own programs and the host's port forwards.
        if let Err(e) = net::loopback_up() {
            error!("lo: {e}");
        }
    } else {
        if let Err(e) = net::configure(timeouts::NET_CONFIGURE, cfg.mtu) {
            error!("network setup: {e}");
        }
        match net::ensure_resolv_conf(Path::new("/etc/resolv.conf")) {
            Ok(action) => debug!("/etc/resolv.conf: {action:?}"),
            Err(e) => error!("/etc/resolv.conf: {e}"),
        }
    }
    Ok(cfg)
}

/// `uname -r`.
pub fn kernel_release() -> String {
    nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default()
}

pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// PIDs of live userland processes other than us (kernel threads and
/// zombies have an empty cmdline).
fn other_processes() -> usize {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()))
        .filter(|&pid| pid != me && pid != 1)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| !c.is_empty())
                .unwrap_or(false)
        })
        .count()
}

/// Stop every process, flush, and power the machine off. Only returns if
/// the final `reboot` call fails.
pub fn poweroff() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    debug!("powering off");
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    let deadline = Instant::now() + timeouts::POWEROFF_TERM_GRACE;
    while other_processes() > 0 && Instant::now() < deadline {
        std::thread::sleep(timeouts::EXIT_POLL);
    }
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
    if let Err(e) = mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        debug!("remount / read-only: {e}");
    }
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    error!("power off: {e}");
}

/// A fatal boot error: say so clearly, then power off. Never returns.
pub fn fatal(msg: &str) -> ! {
    error!("FATAL: {msg}");
    info!("the guest cannot serve the host; powering off in 5 s");
    std::thread::sleep(timeouts::FATAL_POWEROFF_DELAY);
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    error!("power off: {e}");
    // PID 1 must not exit (the kernel would panic).
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_load_parsing() {
        let text = "# virtio\n/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko\n\n  /lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/virtio/virtio.ko  \n\t\n/lib/modules/x/virtio_blk.ko";
        assert_eq!(
            parse_modules_load(text),
            vec![
                PathBuf::from(
                    "/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/virtio/virtio_ring.ko"
                ),
                PathBuf::from("/lib/modules/6.1.0-28-cloud-amd64/kernel/drivers/virtio/virtio.ko"),
                PathBuf::from("/lib/modules/x/virtio_blk.ko"),
            ]
        );
        assert!(parse_modules_load("").is_empty());
        assert!(parse_modules_load("\n# only a comment\n").is_empty());
    }

    #[test]
    fn kernel_and_boot_id_are_read() {
        assert!(!kernel_release().is_empty());
        // /proc is there on any Linux test host.
        assert_eq!(boot_id().len(), 36);
    }

    #[test]
    fn mountpoints() {
        assert!(is_mountpoint("/proc"));
        assert!(!is_mountpoint("/proc/self/fd"));
    }
}
