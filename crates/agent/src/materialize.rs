//! `machinen-agent --materialize DIR`: bring a native process image back
//! as a process of this guest (amd64, the plan's subset), then wait for it
//! and exit with its status.
//!
//! A forked child resets what it inherited (signal handlers, the alternate
//! stack, descriptors past 2), moves to the image's cwd and stops itself.
//! Through ptrace the restorer then makes the child's address space the
//! image's: it maps a one-page trampoline (`syscall; int3`) where the image
//! has nothing, runs every system call from there one at a time (registers
//! set, single step), unregisters the child's rseq area, unmaps everything
//! of the child but the trampoline and the vDSO/vvar pages, moves those to
//! where the image had them, maps each mapping of the plan (files again,
//! captured bytes written through `/proc/PID/mem`, zeroes), sets the heap's
//! bounds and the signal mask, unmaps the trampoline, loads the captured
//! registers — for a thread stopped in a sleep or poll, pointed back at its
//! `syscall` instruction with the call's number, so it waits again for the
//! requested time (the seed's "requested duration, upper bound") — and lets
//! it go.

use std::ffi::CString;
use std::os::unix::fs::FileExt;
use std::path::Path;

use machinen_procimage as img;
use nix::sys::ptrace;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{ForkResult, Pid};

const USAGE: &str = "usage: machinen-agent --materialize DIR";

pub fn main(args: &[String]) -> i32 {
    let [dir] = args else {
        eprintln!("{USAGE}");
        return 2;
    };
    match run(Path::new(dir)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("materialize: {e}");
            125
        }
    }
}

fn hexv(s: &str) -> Result<u64, String> {
    img::parse_hex(s).ok_or_else(|| format!("{s:?} is not a hex value"))
}

fn prot(perms: &str) -> i32 {
    let b = perms.as_bytes();
    let mut p = libc::PROT_NONE;
    if b.first() == Some(&b'r') {
        p |= libc::PROT_READ;
    }
    if b.get(1) == Some(&b'w') {
        p |= libc::PROT_WRITE;
    }
    if b.get(2) == Some(&b'x') {
        p |= libc::PROT_EXEC;
    }
    p
}

fn signal_mask(names: &[String]) -> u64 {
    let mut m = 0u64;
    for n in names {
        let sig = n
            .strip_prefix("SIGRTMIN+")
            .and_then(|k| k.parse::<u64>().ok())
            .map(|k| k + 34)
            .or_else(|| n.strip_prefix("SIG").and_then(|k| k.parse::<u64>().ok()))
            .or_else(|| n.parse::<Signal>().ok().map(|s| s as u64));
        if let Some(s) = sig.filter(|s| (1..=64).contains(s)) {
            m |= 1 << (s - 1);
        }
    }
    m
}

/// The child, stopped under our trace.
struct Child {
    pid: Pid,
    mem: std::fs::File,
    /// Where a `syscall` instruction is.
    syscall_at: u64,
    /// Registers to start each injected call from.
    base: libc::user_regs_struct,
}

impl Child {
    /// Run one system call in the child; its return value.
    fn call(&mut self, nr: i64, args: [u64; 6]) -> Result<i64, String> {
        let mut r = self.base;
        r.rax = nr as u64;
        r.orig_rax = u64::MAX;
        r.rdi = args[0];
        r.rsi = args[1];
        r.rdx = args[2];
        r.r10 = args[3];
        r.r8 = args[4];
        r.r9 = args[5];
        r.rip = self.syscall_at;
        ptrace::setregs(self.pid, r).map_err(|e| format!("setting registers: {e}"))?;
        ptrace::step(self.pid, None).map_err(|e| format!("single step: {e}"))?;
        match waitpid(self.pid, Some(WaitPidFlag::__WALL)) {
            Ok(WaitStatus::Stopped(_, Signal::SIGTRAP)) => {}
            other => return Err(format!("system call {nr} in the child: {other:?}")),
        }
        let after = ptrace::getregs(self.pid).map_err(|e| format!("registers: {e}"))?;
        Ok(after.rax as i64)
    }

    fn call_ok(&mut self, what: &str, nr: i64, args: [u64; 6]) -> Result<i64, String> {
        let r = self.call(nr, args)?;
        if (-4095..0).contains(&r) {
            return Err(format!(
                "{what}: {}",
                std::io::Error::from_raw_os_error(-r as i32)
            ));
        }
        Ok(r)
    }

    fn write(&self, addr: u64, bytes: &[u8]) -> Result<(), String> {
        self.mem
            .write_all_at(bytes, addr)
            .map_err(|e| format!("writing {} bytes at {addr:#x}: {e}", bytes.len()))
    }
}

struct Area {
    start: u64,
    end: u64,
    name: String,
}

fn maps_of(pid: Pid) -> Result<Vec<Area>, String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (s, e) = f.next()?.split_once('-')?;
            let name = f.nth(4).unwrap_or("").to_string();
            Some(Area {
                start: u64::from_str_radix(s, 16).ok()?,
                end: u64::from_str_radix(e, 16).ok()?,
                name,
            })
        })
        .collect())
}

/// A page free in both the image and the child.
fn free_page(image: &[(u64, u64)], child: &[Area]) -> Option<u64> {
    let mut a = 0x10000u64;
    while a < 0x7000_0000 {
        let busy = image.iter().any(|&(s, e)| a < e && a + 4096 > s)
            || child.iter().any(|m| a < m.end && a + 4096 > m.start);
        if !busy {
            return Some(a);
        }
        a += 0x10000;
    }
    None
}

fn run(dir: &Path) -> Result<i32, String> {
    if !cfg!(target_arch = "x86_64") {
        return Err("materializing is built for amd64 guests only".into());
    }
    let image = img::read_dir(dir).map_err(|e| e.to_string())?;
    let plan = img::check(&image, img::CheckOptions::default());
    if !plan.restorable() {
        let codes: Vec<&str> = plan.refusals.iter().map(|r| r.code.as_str()).collect();
        return Err(format!(
            "the image cannot be restored here: {}",
            codes.join(", ")
        ));
    }
    let memory = std::fs::File::open(dir.join(img::FILES.memory)).map_err(|e| e.to_string())?;
    let docs = &image.docs;
    let thread = docs.threads.threads.first().ok_or("no thread")?;
    let img::Registers::Amd64(regs) = &thread.source_registers else {
        return Err("not an amd64 image".into());
    };
    let cwd = CString::new(docs.manifest.process.cwd.clone()).map_err(|e| e.to_string())?;

    // SAFETY: this process is single-threaded (the capture/materialize mode
    // starts no runtime), so the child may run arbitrary code after fork.
    match unsafe { nix::unistd::fork() }.map_err(|e| format!("fork: {e}"))? {
        ForkResult::Child => {
            // SAFETY: plain system calls on the child's own state; nothing
            // here allocates or takes a lock.
            unsafe {
                for s in 1..=64 {
                    libc::signal(s, libc::SIG_DFL);
                }
                let ss = libc::stack_t {
                    ss_sp: std::ptr::null_mut(),
                    ss_flags: libc::SS_DISABLE,
                    ss_size: 0,
                };
                libc::sigaltstack(&ss, std::ptr::null_mut());
                libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
                libc::chdir(cwd.as_ptr());
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::raise(libc::SIGSTOP);
                libc::_exit(127);
            }
        }
        ForkResult::Parent { child } => {
            let r = rebuild(child, &image, &plan, &memory, regs);
            if let Err(e) = r {
                let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
                let _ = waitpid(child, None);
                return Err(e);
            }
            loop {
                match waitpid(child, None) {
                    Ok(WaitStatus::Exited(_, code)) => return Ok(code),
                    Ok(WaitStatus::Signaled(_, sig, _)) => return Ok(128 + sig as i32),
                    Ok(_) => continue,
                    Err(nix::errno::Errno::EINTR) => continue,
                    Err(e) => return Err(format!("waiting for the process: {e}")),
                }
            }
        }
    }
}

fn rebuild(
    pid: Pid,
    image: &img::Image,
    plan: &img::Plan,
    memory: &std::fs::File,
    regs: &img::Amd64Registers,
) -> Result<(), String> {
    match waitpid(pid, Some(WaitPidFlag::__WALL)) {
        Ok(WaitStatus::Stopped(_, Signal::SIGSTOP)) => {}
        other => return Err(format!("the child did not stop: {other:?}")),
    }
    let base = ptrace::getregs(pid).map_err(|e| format!("registers: {e}"))?;
    let mem = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/{pid}/mem"))
        .map_err(|e| format!("the child's memory: {e}"))?;
    let mut insn = [0u8; 2];
    mem.read_exact_at(&mut insn, base.rip - 2)
        .map_err(|e| format!("reading the child's code: {e}"))?;
    if insn != [0x0f, 0x05] {
        return Err("the child did not stop right after a system call".into());
    }
    let mut c = Child {
        pid,
        mem,
        syscall_at: base.rip - 2,
        base,
    };

    let mappings = &image.docs.mappings.mappings;
    let ranges: Vec<(u64, u64)> = mappings
        .iter()
        .filter_map(|m| Some((hexv(&m.source_start).ok()?, hexv(&m.source_end).ok()?)))
        .collect();
    let own = maps_of(pid)?;
    let tramp = free_page(&ranges, &own).ok_or("no free page for the trampoline")?;
    let r = c.call_ok(
        "mapping the trampoline",
        libc::SYS_mmap,
        [
            tramp,
            4096,
            (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ],
    )?;
    if r as u64 != tramp {
        return Err("the trampoline landed elsewhere".into());
    }
    c.write(tramp, &[0x0f, 0x05, 0xcc])?;
    c.syscall_at = tramp;
    let data = tramp + 0x800;

    // The child's rseq area would otherwise be written by the kernel into
    // whatever the image maps there.
    if let Some(rc) = crate::capture::rseq_config(pid.as_raw()).filter(|c| c.pointer != 0) {
        c.call_ok(
            "unregistering the child's rseq",
            libc::SYS_rseq,
            [rc.pointer, rc.size.into(), 1, rc.signature.into(), 0, 0],
        )?;
    }

    // Keep the vDSO and vvar pages (the kernel's), drop everything else.
    let keep: Vec<&Area> = own
        .iter()
        .filter(|a| a.name == "[vdso]" || a.name == "[vvar]")
        .collect();
    let mut cut = vec![(0x1000u64, tramp)];
    let mut from = tramp + 4096;
    let mut sorted = keep.clone();
    sorted.sort_by_key(|a| a.start);
    for a in &sorted {
        if a.start > from {
            cut.push((from, a.start));
        }
        from = from.max(a.end);
    }
    cut.push((from, 0x7fff_ffff_f000));
    for (s, e) in cut {
        if e > s {
            c.call_ok(
                "unmapping the child",
                libc::SYS_munmap,
                [s, e - s, 0, 0, 0, 0],
            )?;
        }
    }
    // Move them where the image had them (its code keeps their addresses).
    for a in &keep {
        let target = mappings.iter().find(|m| {
            (a.name == "[vdso]" && m.kind == img::MappingKind::Vdso)
                || (a.name == "[vvar]" && m.kind == img::MappingKind::Vvar)
        });
        if let Some(m) = target {
            let to = hexv(&m.source_start)?;
            if to != a.start {
                c.call_ok(
                    &format!("moving {}", a.name),
                    libc::SYS_mremap,
                    [
                        a.start,
                        a.end - a.start,
                        a.end - a.start,
                        (libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) as u64,
                        to,
                        0,
                    ],
                )?;
            }
        }
    }

    // The files the process maps its code from must be the ones it had.
    let mut seen = std::collections::BTreeMap::new();
    for m in mappings {
        let Some(f) = &m.file else { continue };
        if !plan
            .steps
            .iter()
            .any(|s| matches!(s, img::PlanStep::MapFile { mapping, .. } if *mapping == m.id))
        {
            continue;
        }
        if !Path::new(&f.path).is_file() {
            return Err(format!(
                "{}: {} is not in this VM",
                img::RefusalCode::TargetModuleFileMissing,
                f.path
            ));
        }
        if let Some(want) = &f.sha256 {
            let have = crate::capture::file_sha256(&f.path, &mut seen);
            if have.as_deref() != Some(want.as_str()) {
                return Err(format!(
                    "{}: {} in this VM is not the file the process had (sha256 {} here, {want} captured)",
                    img::RefusalCode::TargetBuildMismatch,
                    f.path,
                    have.as_deref().unwrap_or("unreadable")
                ));
            }
        }
    }

    let fixed = (libc::MAP_PRIVATE | libc::MAP_FIXED) as u64;
    let anon = fixed | libc::MAP_ANONYMOUS as u64;
    let mut buf = vec![0u8; 1 << 20];
    for step in &plan.steps {
        match step {
            img::PlanStep::MapFile {
                start,
                end,
                perms,
                path,
                offset,
                ..
            } => {
                let (s, e) = (hexv(start)?, hexv(end)?);
                let mut p = path.as_bytes().to_vec();
                p.push(0);
                if p.len() > 0x700 {
                    return Err(format!("path {path:?} is too long"));
                }
                c.write(data, &p)?;
                let fd = c.call_ok(
                    &format!("opening {path}"),
                    libc::SYS_open,
                    [data, libc::O_RDONLY as u64, 0, 0, 0, 0],
                )?;
                c.call_ok(
                    &format!("mapping {path} at {start}"),
                    libc::SYS_mmap,
                    [s, e - s, prot(perms) as u64, fixed, fd as u64, *offset],
                )?;
                c.call_ok("closing", libc::SYS_close, [fd as u64, 0, 0, 0, 0, 0])?;
            }
            img::PlanStep::MapCaptured {
                start,
                end,
                perms,
                memory_offset,
                size_bytes,
                ..
            } => {
                let (s, e) = (hexv(start)?, hexv(end)?);
                c.call_ok(
                    &format!("mapping {start}"),
                    libc::SYS_mmap,
                    [
                        s,
                        e - s,
                        (libc::PROT_READ | libc::PROT_WRITE) as u64,
                        anon,
                        u64::MAX,
                        0,
                    ],
                )?;
                let mut done = 0u64;
                while done < *size_bytes {
                    let n = (*size_bytes - done).min(buf.len() as u64) as usize;
                    memory
                        .read_exact_at(&mut buf[..n], memory_offset + done)
                        .map_err(|e| format!("reading {}: {e}", img::FILES.memory))?;
                    c.write(s + done, &buf[..n])?;
                    done += n as u64;
                }
                c.call_ok(
                    &format!("protecting {start}"),
                    libc::SYS_mprotect,
                    [s, e - s, prot(perms) as u64, 0, 0, 0],
                )?;
            }
            img::PlanStep::MapZeroed {
                start, end, perms, ..
            } => {
                let (s, e) = (hexv(start)?, hexv(end)?);
                c.call_ok(
                    &format!("mapping {start}"),
                    libc::SYS_mmap,
                    [s, e - s, prot(perms) as u64, anon, u64::MAX, 0],
                )?;
            }
            _ => {}
        }
    }
    // The heap's bounds, so that brk() goes on from where it was (best
    // effort: malloc falls back to mmap when brk fails).
    if let Some(h) = mappings.iter().find(|m| m.kind == img::MappingKind::Heap) {
        let (s, e) = (hexv(&h.source_start)?, hexv(&h.source_end)?);
        let _ = c.call(
            libc::SYS_prctl,
            [
                libc::PR_SET_MM as u64,
                libc::PR_SET_MM_START_BRK as u64,
                s,
                0,
                0,
                0,
            ],
        );
        let _ = c.call(
            libc::SYS_prctl,
            [
                libc::PR_SET_MM as u64,
                libc::PR_SET_MM_BRK as u64,
                e,
                0,
                0,
                0,
            ],
        );
    }
    let thread = &image.docs.threads.threads[0];
    c.write(data, &signal_mask(&thread.signal.blocked).to_ne_bytes())?;
    c.call_ok(
        "the signal mask",
        libc::SYS_rt_sigprocmask,
        [libc::SIG_SETMASK as u64, data, 0, 8, 0, 0],
    )?;
    // The trampoline goes last; the step stops right after the call.
    let _ = c.call(libc::SYS_munmap, [tramp, 4096, 0, 0, 0, 0]);

    let mut r = c.base;
    r.rip = hexv(&regs.rip)?;
    r.rsp = hexv(&regs.rsp)?;
    r.eflags = hexv(&regs.rflags)?;
    r.rax = hexv(&regs.rax)?;
    r.rbx = hexv(&regs.rbx)?;
    r.rcx = hexv(&regs.rcx)?;
    r.rdx = hexv(&regs.rdx)?;
    r.rsi = hexv(&regs.rsi)?;
    r.rdi = hexv(&regs.rdi)?;
    r.rbp = hexv(&regs.rbp)?;
    r.r8 = hexv(&regs.r8)?;
    r.r9 = hexv(&regs.r9)?;
    r.r10 = hexv(&regs.r10)?;
    r.r11 = hexv(&regs.r11)?;
    r.r12 = hexv(&regs.r12)?;
    r.r13 = hexv(&regs.r13)?;
    r.r14 = hexv(&regs.r14)?;
    r.r15 = hexv(&regs.r15)?;
    r.fs_base = hexv(&regs.fs_base)?;
    r.gs_base = hexv(&regs.gs_base)?;
    r.orig_rax = u64::MAX;
    if let Some(img::PlanStep::ResumeWait { .. }) = plan.steps.last() {
        // Back onto its `syscall` instruction, with the call's number: it
        // waits again for the time it asked for.
        r.rip -= 2;
        r.rax = thread
            .syscall
            .number
            .ok_or("the wait's system call number is missing")?;
    }
    ptrace::setregs(pid, r).map_err(|e| format!("loading the registers: {e}"))?;
    ptrace::detach(pid, None).map_err(|e| format!("letting it go: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_and_protections() {
        assert_eq!(signal_mask(&["SIGINT".into(), "SIGTERM".into()]), 0x4002);
        assert_eq!(
            signal_mask(&["SIGRTMIN+0".into(), "SIG32".into()]),
            (1 << 33) | (1 << 31)
        );
        assert_eq!(prot("r-xp"), libc::PROT_READ | libc::PROT_EXEC);
        assert_eq!(prot("---p"), libc::PROT_NONE);
        assert_eq!(hexv("0x10").ok(), Some(16));
        assert!(hexv("10").is_err());
    }

    #[test]
    fn the_trampoline_avoids_both_layouts() {
        let image = [(0x10000, 0x20000)];
        let child = [Area {
            start: 0x20000,
            end: 0x30000,
            name: String::new(),
        }];
        assert_eq!(free_page(&image, &child), Some(0x30000));
    }
}
