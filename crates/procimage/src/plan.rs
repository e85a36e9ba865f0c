//! Whether this host can bring an image back, and how: a [`Plan`] of
//! steps, or the refusals (with the vocabulary's codes) that stop it.
//!
//! What a restore supports here is the subset the seed models: a process
//! on the same instruction set, with one thread, whose only descriptors
//! are standard input, output and error (inherited from whoever restores
//! it), stopped outside a system call or blocked in a sleep
//! (`nanosleep`, `clock_nanosleep`) or a poll with a timeout (`ppoll`,
//! `poll`), which it resumes with the time that was left. Anything else is
//! refused, naming what and why. A translation to another instruction set
//! is refused (`architecture-pair-unsupported`).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::docs::{
    AltStackState, Arch, MappingKind, Materialization, Refusal, ResourceKind, RseqState,
    SyscallPosition, Thread,
};
use crate::refusal::RefusalCode;
use crate::validate::{parse_hex, Image};

/// What to do with a thread blocked in a timed wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SyscallPolicy {
    /// Refuse the image.
    Refuse,
    /// Resume the wait on the target with the time that was left.
    #[default]
    DeferTargetResume,
}

/// Options of [`check`].
#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// The instruction set to restore on (default: this host's).
    pub target_arch: Option<Arch>,
    /// `nanosleep`, `clock_nanosleep`.
    pub sleep_timer_policy: SyscallPolicy,
    /// `ppoll`, `poll` with a timeout.
    pub poll_timeout_policy: SyscallPolicy,
}

/// The seed's classes of where a thread was in a system call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SyscallClass {
    OutsideSyscall,
    SleepTimer,
    PollTimeout,
    FdBlocking,
    Restart,
    UnknownActive,
}

impl SyscallClass {
    /// Classify a thread by the system call it was stopped in.
    pub fn of(t: &Thread) -> SyscallClass {
        match t.syscall.state {
            SyscallPosition::OutsideSyscall => SyscallClass::OutsideSyscall,
            SyscallPosition::RestartBlock => SyscallClass::Restart,
            SyscallPosition::InsideSyscall => match t.syscall.name.as_deref() {
                Some("nanosleep" | "clock_nanosleep") => SyscallClass::SleepTimer,
                Some("ppoll" | "poll") => SyscallClass::PollTimeout,
                Some(
                    "read" | "write" | "readv" | "writev" | "recvfrom" | "sendto" | "recvmsg"
                    | "sendmsg" | "accept" | "accept4" | "connect" | "select" | "pselect6"
                    | "epoll_wait" | "epoll_pwait" | "wait4" | "waitid" | "futex",
                ) => SyscallClass::FdBlocking,
                _ => SyscallClass::UnknownActive,
            },
        }
    }
}

/// One step of a restore.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(
    tag = "action",
    rename_all = "kebab-case",
    rename_all_fields = "camelCase"
)]
pub enum PlanStep {
    /// Map the range and fill it with the captured bytes.
    MapCaptured {
        mapping: String,
        start: String,
        end: String,
        perms: String,
        memory_offset: u64,
        size_bytes: u64,
    },
    /// Map the file's range (unchanged since capture: not captured).
    MapFile {
        mapping: String,
        start: String,
        end: String,
        perms: String,
        path: String,
        offset: u64,
    },
    /// Map zeroed memory (never written before the capture).
    MapZeroed {
        mapping: String,
        start: String,
        end: String,
        perms: String,
    },
    /// Leave the mapping to the target kernel (vdso, vvar) or out.
    Omit { mapping: String, reason: String },
    /// Descriptors 0, 1 and 2 are the restorer's.
    InheritStdio { fds: Vec<i32> },
    /// Load the thread's registers and thread pointer.
    SetRegisters { thread: String, arch: Arch },
    /// Go on where it was stopped.
    Continue { thread: String },
    /// Enter the wait again with the time that was left.
    ResumeWait {
        thread: String,
        class: SyscallClass,
        syscall: String,
    },
}

/// The verdict of [`check`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub source_arch: Arch,
    pub target_arch: Arch,
    pub exe: String,
    pub argv: Vec<String>,
    /// What a restore does, in order (empty when refused).
    pub steps: Vec<PlanStep>,
    /// Why it cannot be restored here; empty when it can.
    pub refusals: Vec<Refusal>,
}

impl Plan {
    pub fn restorable(&self) -> bool {
        self.refusals.is_empty()
    }
}

fn perms(p: &crate::docs::Permissions) -> String {
    format!(
        "{}{}{}{}",
        if p.read { 'r' } else { '-' },
        if p.write { 'w' } else { '-' },
        if p.execute { 'x' } else { '-' },
        if p.shared { 's' } else { 'p' }
    )
}

fn refuse(code: RefusalCode, at: &str, message: impl std::fmt::Display) -> Refusal {
    Refusal::new(code, format!("{at}: {message}"))
}

/// Decide whether `image` can be restored on `opts.target_arch` (this
/// host's by default) and how.
pub fn check(image: &Image, opts: CheckOptions) -> Plan {
    let docs = &image.docs;
    let source = docs.manifest.capture.source_arch;
    let mut refusals: Vec<Refusal> = docs
        .refusals()
        .into_iter()
        .map(|(at, r)| Refusal {
            code: r.code,
            message: format!("{at}: {}", r.message),
            detail: r.detail.clone(),
        })
        .collect();
    let target = match opts.target_arch.or_else(Arch::host) {
        Some(t) => t,
        None => {
            refusals.push(Refusal::new(
                RefusalCode::ArchitectureUnsupported,
                format!(
                    "this host ({}) is neither arm64 nor amd64",
                    std::env::consts::ARCH
                ),
            ));
            source
        }
    };
    if target != source {
        refusals.push(Refusal::new(
            RefusalCode::ArchitecturePairUnsupported,
            format!("captured on {source}, to restore on {target}: only a restore on the same instruction set is supported"),
        ));
    }

    let mut steps = Vec::new();
    for mp in &docs.mappings.mappings {
        let at = format!(
            "mapping {} ({:?} {}-{})",
            mp.id, mp.kind, mp.source_start, mp.source_end
        );
        let p = perms(&mp.permissions);
        if mp.target.materialization == Materialization::Refuse {
            refusals.push(refuse(
                RefusalCode::MappingPermissionUnsupported,
                &at,
                mp.target
                    .reason
                    .as_deref()
                    .unwrap_or("the capture marked it not restorable"),
            ));
            continue;
        }
        if matches!(mp.kind, MappingKind::Vdso | MappingKind::Vvar) {
            if mp.target.materialization == Materialization::Translate {
                refusals.push(refuse(
                    RefusalCode::VdsoPolicyUnsupported,
                    &at,
                    "the vDSO and vvar pages are the target kernel's; they cannot be translated",
                ));
            }
            steps.push(PlanStep::Omit {
                mapping: mp.id.clone(),
                reason: "the target kernel maps its own".into(),
            });
            continue;
        }
        if mp.target.materialization == Materialization::Omit {
            steps.push(PlanStep::Omit {
                mapping: mp.id.clone(),
                reason: mp
                    .target
                    .reason
                    .clone()
                    .unwrap_or_else(|| "the capture left it out".into()),
            });
            continue;
        }
        if mp.permissions.shared || mp.kind == MappingKind::Shared {
            refusals.push(refuse(
                RefusalCode::MappingPermissionUnsupported,
                &at,
                "a shared mapping ties the process to others (or to a file it writes through)",
            ));
            continue;
        }
        let (start, end) = (mp.source_start.clone(), mp.source_end.clone());
        match (&mp.captured, &mp.file) {
            (Some(c), _) => {
                if c.size_bytes != mp.size_bytes {
                    refusals.push(refuse(
                        RefusalCode::MappingUnreadable,
                        &at,
                        format!(
                            "only {} of its {} bytes were captured",
                            c.size_bytes, mp.size_bytes
                        ),
                    ));
                    continue;
                }
                steps.push(PlanStep::MapCaptured {
                    mapping: mp.id.clone(),
                    start,
                    end,
                    perms: p,
                    memory_offset: c.offset,
                    size_bytes: c.size_bytes,
                })
            }
            (None, Some(f)) if !mp.permissions.write => steps.push(PlanStep::MapFile {
                mapping: mp.id.clone(),
                start,
                end,
                perms: p,
                path: f.path.clone(),
                offset: f.offset,
            }),
            (None, None) if matches!(mp.kind, MappingKind::Anonymous | MappingKind::Heap) => steps
                .push(PlanStep::MapZeroed {
                    mapping: mp.id.clone(),
                    start,
                    end,
                    perms: p,
                }),
            _ => refusals.push(refuse(
                RefusalCode::MappingUnreadable,
                &at,
                "its content was not captured and cannot be recreated",
            )),
        }
    }

    let mut stdio = Vec::new();
    for r in &docs.resources.resources {
        let at = format!(
            "resource {} ({:?}{})",
            r.id,
            r.kind,
            r.fd.map(|f| format!(", fd {f}")).unwrap_or_default()
        );
        match r.kind {
            ResourceKind::Argv | ResourceKind::Env | ResourceKind::Cwd | ResourceKind::Exe | ResourceKind::Auxv | ResourceKind::Credential => {}
            ResourceKind::Fd | ResourceKind::File | ResourceKind::Pipe | ResourceKind::Pty
                if r.fd.is_some_and(|fd| (0..=2).contains(&fd)) =>
            {
                stdio.extend(r.fd);
            }
            ResourceKind::Fd | ResourceKind::File | ResourceKind::Pipe | ResourceKind::Pty => refusals.push(refuse(
                RefusalCode::FdKindUnsupported,
                &at,
                "only standard input, output and error are restored (inherited from the restorer)",
            )),
            ResourceKind::Socket | ResourceKind::RawSocket => refusals.push(refuse(
                RefusalCode::ResourceKindUnsupported,
                &at,
                "a socket's connection cannot be carried to another host",
            )),
            ResourceKind::Futex => refusals.push(refuse(
                RefusalCode::FutexStateUnsupported,
                &at,
                "futex waiters are not restored",
            )),
            ResourceKind::Timer | ResourceKind::Eventfd | ResourceKind::Signal | ResourceKind::Epoll | ResourceKind::Namespace => refusals.push(refuse(
                RefusalCode::NonStdioKernelStateUnsupported,
                &at,
                "this kernel object is not restored",
            )),
            ResourceKind::Unknown => refusals.push(refuse(
                RefusalCode::KernelStateUnsupported,
                &at,
                "the capture did not know what it is",
            )),
        }
    }
    stdio.sort_unstable();
    stdio.dedup();
    steps.push(PlanStep::InheritStdio { fds: stdio });

    if docs.threads.threads.len() > 1 {
        refusals.push(Refusal::new(
            RefusalCode::ThreadStateUnsupported,
            format!(
                "{} threads: only a single-threaded process is restored",
                docs.threads.threads.len()
            ),
        ));
    }
    for t in &docs.threads.threads {
        let at = format!("thread {}", t.id);
        if t.signal.active_frame {
            refusals.push(refuse(
                RefusalCode::SignalFrameActive,
                &at,
                "stopped inside a signal handler",
            ));
        }
        if !t.signal.pending.is_empty() {
            refusals.push(refuse(
                RefusalCode::SignalStateUnsupported,
                &at,
                format!("signals pending: {}", t.signal.pending.join(", ")),
            ));
        }
        if t.signal.alt_stack.state == AltStackState::Unsupported {
            refusals.push(refuse(
                RefusalCode::SignalStateUnsupported,
                &at,
                "its alternate signal stack was not captured",
            ));
        }
        if t.tls.rseq.state == RseqState::Unsupported {
            refusals.push(refuse(
                RefusalCode::RseqStateUnsupported,
                &at,
                "its rseq registration was not captured",
            ));
        }
        if parse_hex(&t.tls.thread_pointer) == Some(0) && source == Arch::Amd64 {
            refusals.push(refuse(
                RefusalCode::TlsStateUnsupported,
                &at,
                "no thread pointer was captured",
            ));
        }
        steps.push(PlanStep::SetRegisters {
            thread: t.id.clone(),
            arch: t.source_registers.arch(),
        });
        let class = SyscallClass::of(t);
        let name = t.syscall.name.clone().unwrap_or_default();
        match class {
            SyscallClass::OutsideSyscall => steps.push(PlanStep::Continue {
                thread: t.id.clone(),
            }),
            SyscallClass::SleepTimer | SyscallClass::PollTimeout => {
                let policy = if class == SyscallClass::SleepTimer {
                    opts.sleep_timer_policy
                } else {
                    opts.poll_timeout_policy
                };
                if policy == SyscallPolicy::Refuse {
                    refusals.push(refuse(
                        RefusalCode::ActiveSyscall,
                        &at,
                        format!("blocked in {name} (policy: refuse)"),
                    ));
                } else if t.syscall.arguments.as_ref().is_none_or(|a| a.len() < 2) {
                    refusals.push(refuse(
                        RefusalCode::SyscallArgumentStateUnsupported,
                        &at,
                        format!("blocked in {name}, but its arguments were not captured"),
                    ));
                } else {
                    steps.push(PlanStep::ResumeWait {
                        thread: t.id.clone(),
                        class,
                        syscall: name,
                    });
                }
            }
            SyscallClass::FdBlocking => refusals.push(refuse(
                RefusalCode::BlockingSyscallStateUnsupported,
                &at,
                format!("blocked in {name} on a kernel object that is not restored"),
            )),
            SyscallClass::Restart => refusals.push(refuse(
                RefusalCode::SyscallRestartUnsupported,
                &at,
                "stopped in a system call's restart block",
            )),
            SyscallClass::UnknownActive => refusals.push(refuse(
                RefusalCode::ActiveSyscall,
                &at,
                format!(
                    "inside system call {}",
                    if name.is_empty() {
                        t.syscall
                            .number
                            .map(|n| n.to_string())
                            .unwrap_or_else(|| "?".into())
                    } else {
                        name
                    }
                ),
            )),
        }
    }
    if !refusals.is_empty() {
        steps.clear();
    }
    Plan {
        source_arch: source,
        target_arch: target,
        exe: docs.manifest.process.exe.clone(),
        argv: docs.manifest.process.argv.clone(),
        steps,
        refusals,
    }
}
