//! The documents of a native process image, typed after the seed's
//! contract: field names (camelCase), literal values and optional fields
//! as it declares them. Every object refuses fields it does not know: the
//! documents come from other hosts, and a field this version ignores could
//! change what a restore must do.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::refusal::{RefusalCode, VOCABULARY_VERSION};

/// A field whose only value is one literal (`"formatVersion": 1`,
/// `"kind": "machinen.native-process-image"`): anything else is refused when
/// parsing, and the schema says `const`.
macro_rules! literal {
    ($(#[$doc:meta])* $name:ident = $value:expr, $ty:ty, $owned:ty) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        pub struct $name;

        impl $name {
            pub const VALUE: $ty = $value;
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                Self::VALUE.serialize(s)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let v = <$owned>::deserialize(d)?;
                if v == Self::VALUE {
                    Ok($name)
                } else {
                    Err(serde::de::Error::custom(format!(
                        "expected {:?}, found {:?}",
                        Self::VALUE,
                        v
                    )))
                }
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn inline_schema() -> bool {
                true
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({ "const": Self::VALUE })
            }
        }
    };
}

literal!(
    /// `formatVersion` of every document.
    FormatVersion = 1, u32, u32
);
literal!(
    /// `vocabularyVersion` of every refusal list.
    VocabularyVersion = VOCABULARY_VERSION, u32, u32
);
literal!(
    /// The manifest's `kind`.
    ImageKind = "machinen.native-process-image", &'static str, String
);
literal!(
    /// How the process was captured: from outside, with ptrace and procfs.
    CaptureMethod = "external-ptrace-procfs", &'static str, String
);
literal!(
    /// The restore mode the contract describes.
    CrossIsaMode = "native-cross-isa", &'static str, String
);
literal!(
    /// The target ABI: a Linux user process.
    LinuxUserAbi = "linux-user", &'static str, String
);
literal!(
    /// A captured thread's state: it was stopped.
    Stopped = "stopped", &'static str, String
);
literal!(
    /// Where captured bytes are: the memory file.
    MemoryFile = "native-memory.bin", &'static str, String
);

/// An instruction set a process image can come from or go to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Arm64,
    Amd64,
}

impl Arch {
    /// The seed's `nativeProcessImageArchitectures`, in its order.
    pub const ALL: [Arch; 2] = [Arch::Arm64, Arch::Amd64];

    pub fn as_str(self) -> &'static str {
        match self {
            Arch::Arm64 => "arm64",
            Arch::Amd64 => "amd64",
        }
    }

    /// The machine this program runs on, when it is one of them.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::Amd64),
            "aarch64" => Some(Arch::Arm64),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Arch {
    type Err = String;
    fn from_str(s: &str) -> Result<Arch, String> {
        match s {
            "arm64" | "aarch64" => Ok(Arch::Arm64),
            "amd64" | "x86_64" => Ok(Arch::Amd64),
            _ => Err(format!("{s:?} is not an architecture (arm64 or amd64)")),
        }
    }
}

/// One refusal: a code from the vocabulary, a message, details.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<serde_json::Map<String, serde_json::Value>>,
}

impl Refusal {
    pub fn new(code: RefusalCode, message: impl Into<String>) -> Refusal {
        Refusal {
            code,
            message: message.into(),
            detail: None,
        }
    }
}

/// A document's refusals.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Refusals {
    pub vocabulary_version: VocabularyVersion,
    pub refusals: Vec<Refusal>,
}

/// `native-process.json`: what was captured, from where, for where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machinen native process image manifest")]
pub struct Manifest {
    pub format_version: FormatVersion,
    pub kind: ImageKind,
    pub capture: Capture,
    pub target: Target,
    pub process: Process,
    pub refusals: Refusals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Capture {
    pub method: CaptureMethod,
    pub source_arch: Arch,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub pid: Option<u32>,
    /// RFC 3339 time of the capture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured_at: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Target {
    pub mode: CrossIsaMode,
    pub arch: Arch,
    pub abi: LinuxUserAbi,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Process {
    #[schemars(length(min = 1))]
    pub exe: String,
    #[schemars(length(min = 1))]
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    #[schemars(length(min = 1))]
    pub cwd: String,
}

/// What a mapping holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum MappingKind {
    Text,
    Data,
    Heap,
    Stack,
    Tls,
    Vdso,
    Vvar,
    File,
    Anonymous,
    Shared,
    Special,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Permissions {
    pub read: bool,
    pub write: bool,
    pub execute: bool,
    pub private: bool,
    pub shared: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MappedFile {
    pub path: String,
    pub offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub build_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Where a mapping's captured bytes are in `native-memory.bin`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Captured {
    pub file: MemoryFile,
    pub offset: u64,
    pub size_bytes: u64,
}

/// What a restore does with a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Materialization {
    Translate,
    Recreate,
    Omit,
    Refuse,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MappingTarget {
    pub materialization: Materialization,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_start: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// One mapping of the source process (addresses are hex strings: 64-bit
/// values do not survive JSON numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mapping {
    pub id: String,
    pub kind: MappingKind,
    pub source_start: String,
    pub source_end: String,
    pub size_bytes: u64,
    pub permissions: Permissions,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<MappedFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub captured: Option<Captured>,
    pub target: MappingTarget,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// `native-mappings.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machinen native process image mappings")]
pub struct Mappings {
    pub format_version: FormatVersion,
    pub mappings: Vec<Mapping>,
    pub refusals: Refusals,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Arm64Registers {
    pub pc: String,
    pub sp: String,
    pub pstate: String,
    /// x0 … x30.
    pub x: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Amd64Registers {
    pub rip: String,
    pub rsp: String,
    pub rflags: String,
    pub rax: String,
    pub rbx: String,
    pub rcx: String,
    pub rdx: String,
    pub rsi: String,
    pub rdi: String,
    pub rbp: String,
    pub r8: String,
    pub r9: String,
    pub r10: String,
    pub r11: String,
    pub r12: String,
    pub r13: String,
    pub r14: String,
    pub r15: String,
    pub fs_base: String,
    pub gs_base: String,
}

/// A thread's registers, tagged with their architecture.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "arch", rename_all = "lowercase")]
pub enum Registers {
    Arm64(Arm64Registers),
    Amd64(Box<Amd64Registers>),
}

impl Registers {
    pub fn arch(&self) -> Arch {
        match self {
            Registers::Arm64(_) => Arch::Arm64,
            Registers::Amd64(_) => Arch::Amd64,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StopReason {
    PtraceStop,
    SignalDeliveryStop,
    GroupStop,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum SyscallPosition {
    OutsideSyscall,
    InsideSyscall,
    RestartBlock,
}

/// The system call a thread was in (or not) when it was stopped.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SyscallState {
    pub state: SyscallPosition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub number: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stack_pointer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instruction_pointer: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AltStackState {
    Disabled,
    Enabled,
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AltStack {
    pub state: AltStackState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignalState {
    pub blocked: Vec<String>,
    pub pending: Vec<String>,
    pub active_frame: bool,
    pub alt_stack: AltStack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RseqState {
    Absent,
    Captured,
    Unsupported,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Rseq {
    pub state: RseqState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tls {
    pub thread_pointer: String,
    pub rseq: Rseq,
}

/// One stopped thread.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Thread {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lwpid: Option<u32>,
    pub state: Stopped,
    pub stop_reason: StopReason,
    /// The id of the mapping its stack pointer is in.
    pub stack_mapping: String,
    pub source_registers: Registers,
    pub syscall: SyscallState,
    pub signal: SignalState,
    pub tls: Tls,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// `native-threads.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machinen native process image threads")]
pub struct Threads {
    pub format_version: FormatVersion,
    #[schemars(length(min = 1))]
    pub threads: Vec<Thread>,
    pub refusals: Refusals,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ResourceKind {
    Argv,
    Env,
    Cwd,
    Exe,
    Auxv,
    Fd,
    File,
    Pipe,
    Socket,
    RawSocket,
    Pty,
    Timer,
    Eventfd,
    Signal,
    Namespace,
    Credential,
    Futex,
    Epoll,
    Unknown,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ResourceState {
    Captured,
    Recipe,
    Refused,
    Unsupported,
}

/// A kernel resource the process holds (a descriptor, its cwd, …).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource {
    pub id: String,
    pub kind: ResourceKind,
    pub state: ResourceState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fd: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recipe: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// `native-resources.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machinen native process image resources")]
pub struct Resources {
    pub format_version: FormatVersion,
    pub resources: Vec<Resource>,
    pub refusals: Refusals,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum CodeLocationState {
    Mapped,
    Pending,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CodeLocation {
    pub id: String,
    pub source_mapping: String,
    pub source_address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_address: Option<String>,
    pub state: CodeLocationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ThreadTranslationState {
    Pending,
    Translated,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ThreadTranslation {
    pub source_thread_id: String,
    pub state: ThreadTranslationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_registers: Option<Registers>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RelocationKind {
    Pointer,
    CodePointer,
    ReturnAddress,
    ThreadPointer,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum RelocationState {
    Translated,
    Ambiguous,
    Refused,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MemoryRelocation {
    pub mapping: String,
    pub offset: u64,
    pub kind: RelocationKind,
    pub source_value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_value: Option<String>,
    pub state: RelocationState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refusal: Option<Refusal>,
}

/// `native-translation.json`: the plan from source to target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "Machinen native process image translation plan")]
pub struct Translation {
    pub format_version: FormatVersion,
    pub mode: CrossIsaMode,
    pub source_arch: Arch,
    pub target_arch: Arch,
    pub code_locations: Vec<CodeLocation>,
    pub threads: Vec<ThreadTranslation>,
    pub memory_relocations: Vec<MemoryRelocation>,
    pub refusals: Refusals,
}

/// The five JSON documents of an image (the memory file is read apart).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Documents {
    pub manifest: Manifest,
    pub mappings: Mappings,
    pub threads: Threads,
    pub resources: Resources,
    pub translation: Translation,
}

impl Documents {
    /// Every refusal the documents carry: the lists' and those on
    /// mappings, threads, resources and translations, with where each is.
    pub fn refusals(&self) -> Vec<(String, &Refusal)> {
        let mut out: Vec<(String, &Refusal)> = Vec::new();
        for (doc, l) in [
            (crate::FILES.manifest, &self.manifest.refusals),
            (crate::FILES.mappings, &self.mappings.refusals),
            (crate::FILES.threads, &self.threads.refusals),
            (crate::FILES.resources, &self.resources.refusals),
            (crate::FILES.translation, &self.translation.refusals),
        ] {
            out.extend(l.refusals.iter().map(|r| (doc.to_string(), r)));
        }
        for m in &self.mappings.mappings {
            out.extend(m.refusal.iter().map(|r| (format!("mapping {}", m.id), r)));
        }
        for t in &self.threads.threads {
            let at = format!("thread {}", t.id);
            out.extend(t.refusal.iter().map(|r| (at.clone(), r)));
            out.extend(t.signal.alt_stack.refusal.iter().map(|r| (at.clone(), r)));
            out.extend(t.tls.rseq.refusal.iter().map(|r| (at.clone(), r)));
        }
        for r in &self.resources.resources {
            out.extend(r.refusal.iter().map(|x| (format!("resource {}", r.id), x)));
        }
        for c in &self.translation.code_locations {
            out.extend(
                c.refusal
                    .iter()
                    .map(|r| (format!("code location {}", c.id), r)),
            );
        }
        for t in &self.translation.threads {
            out.extend(
                t.refusal
                    .iter()
                    .map(|r| (format!("thread translation {}", t.source_thread_id), r)),
            );
        }
        for m in &self.translation.memory_relocations {
            out.extend(
                m.refusal
                    .iter()
                    .map(|r| (format!("relocation {}+{}", m.mapping, m.offset), r)),
            );
        }
        out
    }
}
