//! `machinen-agent --capture PID DIR [--kill] [--max-bytes N]`: capture a
//! process of the guest from outside, as a native process image (see the
//! `machinen-procimage` crate), into `DIR` (created, mode 0700).
//!
//! The host runs it through an ordinary exec of `/proc/1/exe`: a process of
//! its own, so that it is the tracer (the agent's reaper never sees the
//! ptrace stops) and a crash cannot take the agent down.
//!
//! Sequence: read what procfs tells of a running thread (`/proc/T/syscall`:
//! the call it is blocked in and its arguments); seize every thread and
//! interrupt it (again until no new thread appears); read registers, the
//! rseq registration, signal masks, the mappings and the writable memory
//! (`/proc/PID/mem`), the descriptors; write the documents; detach (the
//! interrupted calls restart, the process goes on) or, with `--kill`,
//! kill it. What the restore cannot bring back is recorded as refusals
//! with the vocabulary's codes, not left out silently.

use std::collections::BTreeMap;
use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};

use machinen_procimage as img;
use nix::sys::ptrace;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Default bound on the bytes captured (`--max-bytes`).
const DEFAULT_MAX_BYTES: u64 = 1 << 30;
/// Rounds of "seize the threads that appeared since".
const SEIZE_ROUNDS: usize = 8;

const USAGE: &str = "usage: machinen-agent --capture PID DIR [--kill] [--max-bytes N]";

/// Entry point of the capture mode; prints a JSON summary on success.
pub fn main(args: &[String]) -> i32 {
    let mut pid = None;
    let mut dir = None;
    let mut kill = false;
    let mut max_bytes = DEFAULT_MAX_BYTES;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--kill" => kill = true,
            "--max-bytes" => match it.next().and_then(|v| v.parse().ok()) {
                Some(n) => max_bytes = n,
                None => {
                    eprintln!("{USAGE}");
                    return 2;
                }
            },
            v if pid.is_none() => match v.parse::<i32>() {
                Ok(p) => pid = Some(p),
                Err(_) => {
                    eprintln!("capture: {v:?} is not a process id");
                    return 2;
                }
            },
            v if dir.is_none() => dir = Some(PathBuf::from(v)),
            _ => {
                eprintln!("{USAGE}");
                return 2;
            }
        }
    }
    let (Some(pid), Some(dir)) = (pid, dir) else {
        eprintln!("{USAGE}");
        return 2;
    };
    match capture(pid, &dir, kill, max_bytes) {
        Ok(summary) => {
            println!("{summary}");
            0
        }
        Err(e) => {
            eprintln!("capture: {e}");
            1
        }
    }
}

/// Threads under our control: detached (or killed) when dropped, so that
/// an error half-way leaves the process as it was.
struct Seized {
    pid: i32,
    tids: Vec<i32>,
    kill: bool,
}

impl Drop for Seized {
    fn drop(&mut self) {
        if self.kill {
            let _ = nix::sys::signal::kill(Pid::from_raw(self.pid), nix::sys::signal::SIGKILL);
        }
        for &t in &self.tids {
            let _ = ptrace::detach(Pid::from_raw(t), None);
        }
    }
}

fn tasks(pid: i32) -> Result<Vec<i32>, String> {
    let mut v: Vec<i32> = fs::read_dir(format!("/proc/{pid}/task"))
        .map_err(|e| format!("process {pid}: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    v.sort_unstable();
    Ok(v)
}

fn seize(tid: i32) -> Result<(), String> {
    let p = Pid::from_raw(tid);
    ptrace::seize(p, ptrace::Options::empty())
        .map_err(|e| format!("attaching to thread {tid}: {e}"))?;
    ptrace::interrupt(p).map_err(|e| format!("stopping thread {tid}: {e}"))?;
    loop {
        match waitpid(p, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::PtraceEvent(..)) | Ok(WaitStatus::Stopped(..)) => return Ok(()),
            Ok(WaitStatus::Exited(..)) | Ok(WaitStatus::Signaled(..)) => {
                return Err(format!("thread {tid} ended while being captured"))
            }
            Ok(_) => continue,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(format!("waiting for thread {tid} to stop: {e}")),
        }
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

const SIGNALS: [&str; 31] = [
    "SIGHUP",
    "SIGINT",
    "SIGQUIT",
    "SIGILL",
    "SIGTRAP",
    "SIGABRT",
    "SIGBUS",
    "SIGFPE",
    "SIGKILL",
    "SIGUSR1",
    "SIGSEGV",
    "SIGUSR2",
    "SIGPIPE",
    "SIGALRM",
    "SIGTERM",
    "SIGSTKFLT",
    "SIGCHLD",
    "SIGCONT",
    "SIGSTOP",
    "SIGTSTP",
    "SIGTTIN",
    "SIGTTOU",
    "SIGURG",
    "SIGXCPU",
    "SIGXFSZ",
    "SIGVTALRM",
    "SIGPROF",
    "SIGWINCH",
    "SIGIO",
    "SIGPWR",
    "SIGSYS",
];

/// Signal names of a `/proc/…/status` mask (bit N is signal N+1;
/// real-time ones as `SIGRTMIN+k`, the two the C library keeps as `SIG32`,
/// `SIG33`).
fn signal_names(mask: u64) -> Vec<String> {
    (0..64usize)
        .filter(|b| mask & (1u64 << b) != 0)
        .map(|b| {
            let n = b + 1;
            match SIGNALS.get(b) {
                Some(name) => name.to_string(),
                None if n < 34 => format!("SIG{n}"),
                None => format!("SIGRTMIN+{}", n - 34),
            }
        })
        .collect()
}

fn status_mask(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

/// x86_64 system call names the plan and a reader care about.
fn syscall_name(nr: u64) -> Option<&'static str> {
    Some(match nr {
        0 => "read",
        1 => "write",
        7 => "poll",
        19 => "readv",
        20 => "writev",
        23 => "select",
        34 => "pause",
        35 => "nanosleep",
        42 => "connect",
        43 => "accept",
        44 => "sendto",
        45 => "recvfrom",
        46 => "sendmsg",
        47 => "recvmsg",
        61 => "wait4",
        128 => "rt_sigtimedwait",
        130 => "rt_sigsuspend",
        202 => "futex",
        219 => "restart_syscall",
        230 => "clock_nanosleep",
        232 => "epoll_wait",
        247 => "waitid",
        270 => "pselect6",
        271 => "ppoll",
        281 => "epoll_pwait",
        288 => "accept4",
        _ => return None,
    })
}

/// The kernel's "restart this call" returns, seen in `rax` of a thread
/// stopped inside a call (ERESTARTSYS … ERESTART_RESTARTBLOCK).
fn interrupted_call(rax: u64) -> bool {
    (-516..=-512).contains(&(rax as i64))
}

/// What one read of a stopped thread's registers gives.
struct Stopped {
    regs: img::Registers,
    rip: u64,
    rsp: u64,
    /// The thread pointer (`fs_base`).
    tp: u64,
    orig_rax: u64,
    rax: u64,
    /// The six system call argument registers, in the ABI's order.
    args: [u64; 6],
}

#[cfg(target_arch = "x86_64")]
fn registers(tid: i32) -> Result<Stopped, String> {
    let r = ptrace::getregs(Pid::from_raw(tid))
        .map_err(|e| format!("registers of thread {tid}: {e}"))?;
    let regs = img::Registers::Amd64(Box::new(img::Amd64Registers {
        rip: hex(r.rip),
        rsp: hex(r.rsp),
        rflags: hex(r.eflags),
        rax: hex(r.rax),
        rbx: hex(r.rbx),
        rcx: hex(r.rcx),
        rdx: hex(r.rdx),
        rsi: hex(r.rsi),
        rdi: hex(r.rdi),
        rbp: hex(r.rbp),
        r8: hex(r.r8),
        r9: hex(r.r9),
        r10: hex(r.r10),
        r11: hex(r.r11),
        r12: hex(r.r12),
        r13: hex(r.r13),
        r14: hex(r.r14),
        r15: hex(r.r15),
        fs_base: hex(r.fs_base),
        gs_base: hex(r.gs_base),
    }));
    Ok(Stopped {
        regs,
        rip: r.rip,
        rsp: r.rsp,
        tp: r.fs_base,
        orig_rax: r.orig_rax,
        rax: r.rax,
        args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
    })
}

#[cfg(not(target_arch = "x86_64"))]
fn registers(_tid: i32) -> Result<Stopped, String> {
    Err("capturing on this instruction set is not built yet (amd64 only)".into())
}

/// A thread's rseq registration (`PTRACE_GET_RSEQ_CONFIGURATION`).
#[repr(C)]
#[derive(Default)]
pub(crate) struct RseqConfig {
    pub pointer: u64,
    pub size: u32,
    pub signature: u32,
    pub flags: u32,
    pad: u32,
}

/// The rseq registration of `tid` (a thread we trace and have stopped);
/// `None` when the kernel cannot say.
pub(crate) fn rseq_config(tid: i32) -> Option<RseqConfig> {
    const PTRACE_GET_RSEQ_CONFIGURATION: libc::c_uint = 0x420f;
    let mut c = RseqConfig::default();
    // SAFETY: the request writes at most `size_of::<RseqConfig>()` bytes
    // (the size passed as `addr`) into `c`, which lives across the call;
    // `tid` is a thread the caller traces and has stopped.
    let n = unsafe {
        libc::ptrace(
            PTRACE_GET_RSEQ_CONFIGURATION,
            tid,
            std::mem::size_of::<RseqConfig>(),
            &mut c as *mut RseqConfig,
        )
    };
    (n >= 0).then_some(c)
}

/// Whether the thread has a registered rseq area.
fn rseq(tid: i32) -> img::RseqState {
    match rseq_config(tid) {
        None => img::RseqState::Unsupported,
        Some(c) if c.pointer == 0 => img::RseqState::Absent,
        Some(_) => img::RseqState::Captured,
    }
}

struct MapLine {
    start: u64,
    end: u64,
    perms: [u8; 4],
    offset: u64,
    inode: u64,
    path: String,
}

fn parse_maps(text: &str) -> Vec<MapLine> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.splitn(6, ' ');
            let (range, perms, offset, _dev, inode) =
                (f.next()?, f.next()?, f.next()?, f.next()?, f.next()?);
            let path = f.next().unwrap_or("").trim_start().to_string();
            let (s, e) = range.split_once('-')?;
            let p = perms.as_bytes();
            Some(MapLine {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                perms: [*p.first()?, *p.get(1)?, *p.get(2)?, *p.get(3)?],
                offset: u64::from_str_radix(offset, 16).ok()?,
                inode: inode.parse().ok()?,
                path,
            })
        })
        .collect()
}

/// Files larger than this are not hashed (a restore then trusts the path).
const MAX_HASHED_FILE: u64 = 256 << 20;

/// The sha256 of a mapped file (once per path), so that a restore can tell
/// the same file from another one at that path.
pub(crate) fn file_sha256(
    path: &str,
    cache: &mut BTreeMap<String, Option<String>>,
) -> Option<String> {
    if let Some(h) = cache.get(path) {
        return h.clone();
    }
    let h = sha256_of(Path::new(path));
    cache.insert(path.to_string(), h.clone());
    h
}

pub(crate) fn sha256_of(path: &Path) -> Option<String> {
    use sha2::Digest;
    use std::io::Read;
    let f = fs::File::open(path).ok()?;
    if f.metadata().ok()?.len() > MAX_HASHED_FILE {
        return None;
    }
    let mut h = sha2::Sha256::new();
    let mut r = std::io::BufReader::new(f.take(MAX_HASHED_FILE));
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = r.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Some(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

fn refusal(code: img::RefusalCode, msg: impl Into<String>) -> img::Refusal {
    img::Refusal::new(code, msg)
}

fn refusals(list: Vec<img::Refusal>) -> img::Refusals {
    img::Refusals {
        vocabulary_version: img::VocabularyVersion,
        refusals: list,
    }
}

fn write_json<T: serde::Serialize>(dir: &Path, name: &str, v: &T) -> Result<(), String> {
    let bytes = serde_json::to_vec_pretty(v).map_err(|e| format!("{name}: {e}"))?;
    let mut f = fs::File::create(dir.join(name)).map_err(|e| format!("{name}: {e}"))?;
    f.write_all(&bytes)
        .and_then(|_| f.sync_all())
        .map_err(|e| format!("{name}: {e}"))
}

fn capture(pid: i32, dir: &Path, kill: bool, max_bytes: u64) -> Result<String, String> {
    let me = std::process::id() as i32;
    let parent = nix::unistd::getppid().as_raw();
    if pid <= 1 || pid == me || pid == parent {
        return Err(format!(
            "process {pid} is the agent or this capture; it cannot be captured"
        ));
    }
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let exe = fs::read_link(proc_dir.join("exe"))
        .map_err(|e| format!("process {pid}: {e} (a kernel thread, or gone)"))?
        .to_string_lossy()
        .into_owned();
    let split0 = |b: Vec<u8>| -> Vec<String> {
        b.split(|c| *c == 0)
            .filter(|s| !s.is_empty())
            .map(|s| String::from_utf8_lossy(s).into_owned())
            .collect()
    };
    let argv = split0(fs::read(proc_dir.join("cmdline")).unwrap_or_default());
    let env: BTreeMap<String, String> =
        split0(fs::read(proc_dir.join("environ")).unwrap_or_default())
            .into_iter()
            .filter_map(|kv| {
                kv.split_once('=')
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect();
    let cwd = fs::read_link(proc_dir.join("cwd"))
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|_| "/".into());

    fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?;

    // Stop every thread (new ones may appear while we do).
    let mut seized = Seized {
        pid,
        tids: Vec::new(),
        kill,
    };
    for _ in 0..SEIZE_ROUNDS {
        let now = tasks(pid)?;
        let new: Vec<i32> = now
            .iter()
            .copied()
            .filter(|t| !seized.tids.contains(t))
            .collect();
        if new.is_empty() {
            break;
        }
        for t in new {
            seize(t)?;
            seized.tids.push(t);
        }
    }
    let mut manifest_refusals = Vec::new();
    let status = fs::read_to_string(proc_dir.join("status")).unwrap_or_default();
    let caught = status_mask(&status, "SigCgt:");
    let shared_pending = status_mask(&status, "ShdPnd:");
    if caught != 0 {
        manifest_refusals.push(refusal(
            img::RefusalCode::SignalStateUnsupported,
            format!(
                "handlers are installed for {}; their addresses and flags are not captured",
                signal_names(caught).join(", ")
            ),
        ));
    }

    // Mappings and memory.
    let maps =
        parse_maps(&fs::read_to_string(proc_dir.join("maps")).map_err(|e| format!("maps: {e}"))?);
    let mem = fs::File::open(proc_dir.join("mem")).map_err(|e| format!("memory of {pid}: {e}"))?;
    let mut out = fs::File::create(dir.join(img::FILES.memory))
        .map_err(|e| format!("{}: {e}", img::FILES.memory))?;
    let mut written = 0u64;
    let mut mappings = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut hashes = BTreeMap::new();
    for (i, m) in maps.iter().enumerate() {
        let [r, w, x, s] = m.perms;
        let perms = img::Permissions {
            read: r == b'r',
            write: w == b'w',
            execute: x == b'x',
            private: s == b'p',
            shared: s == b's',
        };
        let file_backed = m.inode != 0 && m.path.starts_with('/');
        let kind = match m.path.as_str() {
            "[heap]" => img::MappingKind::Heap,
            "[stack]" => img::MappingKind::Stack,
            "[vdso]" => img::MappingKind::Vdso,
            "[vvar]" => img::MappingKind::Vvar,
            "[vsyscall]" => img::MappingKind::Special,
            _ if perms.shared => img::MappingKind::Shared,
            _ if file_backed && perms.execute => img::MappingKind::Text,
            _ if file_backed && perms.write => img::MappingKind::Data,
            _ if file_backed => img::MappingKind::File,
            _ => img::MappingKind::Anonymous,
        };
        let size = m.end - m.start;
        let mut captured = None;
        let mut refusal_here = None;
        let mut target = img::MappingTarget {
            materialization: img::Materialization::Translate,
            target_start: None,
            reason: None,
        };
        let special = matches!(
            kind,
            img::MappingKind::Vdso | img::MappingKind::Vvar | img::MappingKind::Special
        );
        if special {
            target.materialization = img::Materialization::Omit;
            target.reason = Some("the target kernel maps its own".into());
        } else if !perms.read {
            // Guard pages and reservations: nothing to read, recreated
            // empty with the same protection.
            target.materialization = img::Materialization::Recreate;
        } else if file_backed && !perms.write && perms.execute {
            // Code, as in its file.
            target.materialization = img::Materialization::Recreate;
        } else if written.saturating_add(size) > max_bytes {
            target.materialization = img::Materialization::Refuse;
            refusal_here = Some(refusal(
                img::RefusalCode::MappingUnreadable,
                format!("capturing it would pass the bound of {max_bytes} bytes (--max-bytes)"),
            ));
        } else {
            // Writable or relocated data, stacks, heaps: their bytes.
            let mut done = 0u64;
            let mut failed = None;
            while done < size {
                let n = (size - done).min(buf.len() as u64) as usize;
                match mem.read_exact_at(&mut buf[..n], m.start + done) {
                    Ok(()) => {
                        out.write_all(&buf[..n])
                            .map_err(|e| format!("{}: {e}", img::FILES.memory))?;
                        done += n as u64;
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            match failed {
                None => {
                    captured = Some(img::Captured {
                        file: img::MemoryFile,
                        offset: written,
                        size_bytes: size,
                    });
                    written += size;
                }
                Some(e) => {
                    // Keep the memory file aligned with what was recorded.
                    out.set_len(written)
                        .map_err(|e| format!("{}: {e}", img::FILES.memory))?;
                    out.seek(SeekFrom::Start(written))
                        .map_err(|e| format!("{}: {e}", img::FILES.memory))?;
                    target.materialization = img::Materialization::Refuse;
                    refusal_here = Some(refusal(
                        img::RefusalCode::MappingUnreadable,
                        format!("reading {:#x}-{:#x} failed: {e}", m.start, m.end),
                    ));
                }
            }
        }
        mappings.push(img::Mapping {
            id: format!("m{i}"),
            kind,
            source_start: hex(m.start),
            source_end: hex(m.end),
            size_bytes: size,
            permissions: perms,
            file: file_backed.then(|| img::MappedFile {
                path: m.path.clone(),
                offset: m.offset,
                build_id: None,
                sha256: file_sha256(&m.path, &mut hashes),
            }),
            captured,
            target,
            refusal: refusal_here,
        });
    }
    out.sync_all()
        .map_err(|e| format!("{}: {e}", img::FILES.memory))?;
    let mapping_of = |addr: u64| -> Option<String> {
        maps.iter()
            .position(|m| (m.start..m.end).contains(&addr))
            .map(|i| format!("m{i}"))
    };

    // Threads.
    let mut threads = Vec::new();
    let mut code_locations = Vec::new();
    let mut translations = Vec::new();
    for (i, &tid) in seized.tids.iter().enumerate() {
        let Stopped {
            regs,
            rip: rip_v,
            rsp: rsp_v,
            tp,
            orig_rax,
            rax,
            args,
        } = registers(tid)?;
        let (rip, rsp) = (hex(rip_v), hex(rsp_v));
        let in_call = (orig_rax as i64) >= 0 && interrupted_call(rax);
        let syscall = if orig_rax == 219 {
            img::SyscallState {
                state: img::SyscallPosition::RestartBlock,
                number: Some(orig_rax),
                name: Some("restart_syscall".into()),
                arguments: None,
                stack_pointer: Some(rsp.clone()),
                instruction_pointer: Some(rip.clone()),
            }
        } else if in_call {
            img::SyscallState {
                state: img::SyscallPosition::InsideSyscall,
                number: Some(orig_rax),
                name: syscall_name(orig_rax).map(String::from),
                arguments: Some(args.into_iter().map(hex).collect()),
                stack_pointer: Some(rsp.clone()),
                instruction_pointer: Some(rip.clone()),
            }
        } else {
            img::SyscallState {
                state: img::SyscallPosition::OutsideSyscall,
                number: None,
                name: None,
                arguments: None,
                stack_pointer: None,
                instruction_pointer: None,
            }
        };
        let tstatus =
            fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).unwrap_or_default();
        let pending = status_mask(&tstatus, "SigPnd:") | shared_pending;
        let id = format!("t{i}");
        let stack_mapping = mapping_of(rsp_v).unwrap_or_default();
        let mut thread_refusal = None;
        if stack_mapping.is_empty() {
            thread_refusal = Some(refusal(
                img::RefusalCode::ThreadStateUnsupported,
                format!("its stack pointer {rsp} is in no mapping"),
            ));
        }
        if let Some(m) = mapping_of(rip_v) {
            code_locations.push(img::CodeLocation {
                id: format!("c{i}"),
                source_mapping: m,
                source_address: rip.clone(),
                target_address: None,
                state: img::CodeLocationState::Pending,
                refusal: None,
            });
        }
        translations.push(img::ThreadTranslation {
            source_thread_id: id.clone(),
            state: img::ThreadTranslationState::Pending,
            target_registers: None,
            refusal: None,
        });
        threads.push(img::Thread {
            id,
            lwpid: Some(tid as u32),
            state: img::Stopped,
            stop_reason: img::StopReason::PtraceStop,
            // A thread whose stack is in no mapping fails validation;
            // name the first mapping and let its refusal say why.
            stack_mapping: if stack_mapping.is_empty() {
                "m0".into()
            } else {
                stack_mapping
            },
            source_registers: regs,
            syscall,
            signal: img::SignalState {
                blocked: signal_names(status_mask(&tstatus, "SigBlk:")),
                pending: signal_names(pending),
                active_frame: false,
                // No ptrace request reads another thread's sigaltstack; it
                // only matters to a handler, and a process with handlers
                // is refused above.
                alt_stack: img::AltStack {
                    state: if caught == 0 {
                        img::AltStackState::Disabled
                    } else {
                        img::AltStackState::Unsupported
                    },
                    sp: None,
                    size_bytes: None,
                    refusal: None,
                },
            },
            tls: img::Tls {
                thread_pointer: hex(tp),
                rseq: img::Rseq {
                    state: rseq(tid),
                    refusal: None,
                },
            },
            refusal: thread_refusal,
        });
    }

    // Descriptors.
    let mut resources = vec![
        img::Resource {
            id: "exe".into(),
            kind: img::ResourceKind::Exe,
            state: img::ResourceState::Captured,
            fd: None,
            path: Some(exe.clone()),
            flags: None,
            offset: None,
            recipe: None,
            refusal: None,
        },
        img::Resource {
            id: "cwd".into(),
            kind: img::ResourceKind::Cwd,
            state: img::ResourceState::Captured,
            fd: None,
            path: Some(cwd.clone()),
            flags: None,
            offset: None,
            recipe: None,
            refusal: None,
        },
    ];
    let mut fds: Vec<i32> = fs::read_dir(proc_dir.join("fd"))
        .map_err(|e| format!("descriptors of {pid}: {e}"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    fds.sort_unstable();
    for fd in fds {
        let target = fs::read_link(proc_dir.join(format!("fd/{fd}")))
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let info = fs::read_to_string(proc_dir.join(format!("fdinfo/{fd}"))).unwrap_or_default();
        let field = |k: &str| {
            info.lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
        };
        let kind = if target.starts_with("pipe:") {
            img::ResourceKind::Pipe
        } else if target.starts_with("socket:") {
            img::ResourceKind::Socket
        } else if target.starts_with("/dev/pts/")
            || target == "/dev/console"
            || target == "/dev/tty"
        {
            img::ResourceKind::Pty
        } else if target == "anon_inode:[eventfd]" {
            img::ResourceKind::Eventfd
        } else if target == "anon_inode:[timerfd]" {
            img::ResourceKind::Timer
        } else if target == "anon_inode:[signalfd]" {
            img::ResourceKind::Signal
        } else if target == "anon_inode:[eventpoll]" {
            img::ResourceKind::Epoll
        } else if target.starts_with('/') {
            img::ResourceKind::File
        } else {
            img::ResourceKind::Unknown
        };
        let stdio = (0..=2).contains(&fd);
        let state = match kind {
            _ if stdio => img::ResourceState::Recipe,
            img::ResourceKind::File => img::ResourceState::Captured,
            _ => img::ResourceState::Refused,
        };
        resources.push(img::Resource {
            id: format!("fd{fd}"),
            kind,
            state,
            fd: Some(fd),
            path: Some(target),
            flags: field("flags:").map(|f| vec![f]),
            offset: field("pos:").and_then(|p| p.parse().ok()),
            recipe: None,
            refusal: None,
        });
    }

    let manifest = img::Manifest {
        format_version: img::FormatVersion,
        kind: img::ImageKind,
        capture: img::Capture {
            method: img::CaptureMethod,
            source_arch: img::Arch::host().unwrap_or(img::Arch::Amd64),
            pid: Some(pid as u32),
            captured_at: Some(machinen_proto::rfc3339::now()),
        },
        target: img::Target {
            mode: img::CrossIsaMode,
            arch: img::Arch::host().unwrap_or(img::Arch::Amd64),
            abi: img::LinuxUserAbi,
        },
        process: img::Process {
            exe: exe.clone(),
            argv: if argv.is_empty() {
                vec![exe.clone()]
            } else {
                argv
            },
            env,
            cwd,
        },
        refusals: refusals(manifest_refusals),
    };
    let arch = manifest.capture.source_arch;
    let nthreads = threads.len();
    let nmappings = mappings.len();
    write_json(dir, img::FILES.manifest, &manifest)?;
    write_json(
        dir,
        img::FILES.mappings,
        &img::Mappings {
            format_version: img::FormatVersion,
            mappings,
            refusals: refusals(vec![]),
        },
    )?;
    write_json(
        dir,
        img::FILES.threads,
        &img::Threads {
            format_version: img::FormatVersion,
            threads,
            refusals: refusals(vec![]),
        },
    )?;
    write_json(
        dir,
        img::FILES.resources,
        &img::Resources {
            format_version: img::FormatVersion,
            resources,
            refusals: refusals(vec![]),
        },
    )?;
    write_json(
        dir,
        img::FILES.translation,
        &img::Translation {
            format_version: img::FormatVersion,
            mode: img::CrossIsaMode,
            source_arch: arch,
            target_arch: arch,
            code_locations,
            threads: translations,
            memory_relocations: vec![],
            refusals: refusals(vec![]),
        },
    )?;
    drop(seized);
    let _ = fs::File::open(dir).and_then(|d| d.sync_all());
    let _ = std::io::stdout().flush();
    Ok(serde_json::json!({
        "pid": pid,
        "threads": nthreads,
        "mappings": nmappings,
        "memoryBytes": written,
        "killed": kill,
    })
    .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_lines_parse() {
        let m = parse_maps(
            "55d0c0a00000-55d0c0a02000 r-xp 00002000 fe:01 1234  /usr/bin/sleep\n\
             7ffd1000-7ffd3000 rw-p 00000000 00:00 0                          [stack]\n\
             7fff0000-7fff1000 ---p 00000000 00:00 0 \n\
             garbage\n",
        );
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].start, 0x55d0c0a00000);
        assert_eq!(m[0].path, "/usr/bin/sleep");
        assert_eq!(&m[0].perms, b"r-xp");
        assert_eq!(m[0].offset, 0x2000);
        assert_eq!(m[1].path, "[stack]");
        assert_eq!(m[2].path, "");
    }

    #[test]
    fn signal_masks_name_their_signals() {
        assert_eq!(signal_names(0), Vec::<String>::new());
        assert_eq!(signal_names(0x4002), ["SIGINT", "SIGTERM"]);
        assert_eq!(signal_names(1 << 33), ["SIGRTMIN+0"]);
        assert_eq!(signal_names(1 << 31), ["SIG32"]);
        assert_eq!(signal_names(1 << 63).len(), 1);
        assert_eq!(status_mask("SigBlk:\t0000000000000002\n", "SigBlk:"), 2);
    }

    #[test]
    fn interrupted_calls_are_recognised() {
        assert!(interrupted_call((-516i64) as u64));
        assert!(interrupted_call((-512i64) as u64));
        assert!(!interrupted_call((-4i64) as u64));
        assert!(!interrupted_call(0));
    }
}
