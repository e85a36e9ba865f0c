//! The portable native process image: one Linux process, captured from
//! outside (ptrace and procfs) on one host, described so that another host
//! — another VM, another QEMU, later another instruction set — can decide
//! whether and how to bring it back.
//!
//! An image is a directory of six files ([`FILES`]):
//!
//! ```text
//! native-process.json      Manifest: capture (method, source arch, pid, time),
//!                          target (mode, arch, abi), process (exe, argv, env, cwd)
//! native-mappings.json     Mappings: every mapping, its permissions, its file,
//!                          where its captured bytes are, what a restore does with it
//! native-threads.json      Threads: registers, the system call each was in,
//!                          signal state, TLS and rseq
//! native-resources.json    Resources: descriptors, cwd, credentials … and whether
//!                          each was captured, has a recipe, or is refused
//! native-translation.json  Translation: the plan from source to target (code
//!                          locations, thread registers, memory relocations)
//! native-memory.bin        The captured bytes, at the offsets the mappings give
//! ```
//!
//! The format, field names, literal values and the refusal vocabulary are
//! the seed's (`formatVersion` 1, vocabulary version 1), so images and
//! refusals mean the same on both sides. Every document carries its own
//! refusals; so can each mapping, thread, resource and translation entry.
//!
//! Reading an image ([`read_dir`]) bounds every file, parses each document
//! strictly (unknown fields refused), then checks what ties them together
//! ([`validate`]): ids, ranges, addresses, architectures, the memory file's
//! size. [`check`] then says whether this host can restore it and how (a
//! [`Plan`]), or why not (refusals with the vocabulary's codes).
//!
//! All of it is untrusted input: an image comes from another host.

mod docs;
mod plan;
mod refusal;
pub mod schema;
mod validate;

pub use docs::*;
pub use plan::{check, CheckOptions, Plan, PlanStep, SyscallClass, SyscallPolicy};
pub use refusal::{RefusalCode, REFUSAL_CODES, VOCABULARY_VERSION};
pub use validate::{parse_hex, read_dir, validate, Image, Invalid, MAX_DOCUMENT_BYTES};

/// `formatVersion` of every document.
pub const FORMAT_VERSION: u32 = 1;

/// The file names of an image.
#[derive(Debug, Clone, Copy)]
pub struct FileNames {
    pub manifest: &'static str,
    pub mappings: &'static str,
    pub threads: &'static str,
    pub resources: &'static str,
    pub translation: &'static str,
    pub memory: &'static str,
}

/// The seed's `NATIVE_PROCESS_IMAGE_FILES`.
pub const FILES: FileNames = FileNames {
    manifest: "native-process.json",
    mappings: "native-mappings.json",
    threads: "native-threads.json",
    resources: "native-resources.json",
    translation: "native-translation.json",
    memory: "native-memory.bin",
};

/// Whether `dir` looks like a native process image (it has a manifest).
pub fn is_image(dir: &std::path::Path) -> bool {
    dir.join(FILES.manifest).is_file()
}

#[cfg(test)]
mod tests;
