//! Reading an image from a directory and checking what ties its documents
//! together. Everything here is untrusted: sizes are bounded before
//! reading, files must be regular (no symlinks out of the directory),
//! numbers are checked before any arithmetic.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::docs::{Arch, Documents, Mapping, Registers};
use crate::FILES;

/// The largest JSON document read (a process with many mappings still
/// fits; a hostile file cannot make us allocate more).
pub const MAX_DOCUMENT_BYTES: u64 = 16 << 20;

/// Pages are 4 KiB on amd64 and 4, 16 or 64 KiB on arm64: every mapping
/// boundary is a multiple of 4 KiB.
const PAGE: u64 = 4096;

/// An image whose documents are missing, malformed or inconsistent; every
/// problem found, one per line.
#[derive(Debug, thiserror::Error)]
#[error("{} is not a valid native process image: {}", dir.display(), errors.join("; "))]
pub struct Invalid {
    pub dir: PathBuf,
    pub errors: Vec<String>,
}

/// A read and validated image.
#[derive(Debug, Clone)]
pub struct Image {
    pub dir: PathBuf,
    pub docs: Documents,
    /// Length of `native-memory.bin`.
    pub memory_bytes: u64,
}

fn read_bounded(path: &Path, max: u64) -> Result<Vec<u8>, String> {
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("{name}: {e}"))?;
    if !md.file_type().is_file() {
        return Err(format!("{name}: not a regular file"));
    }
    if md.len() > max {
        return Err(format!(
            "{name}: {} bytes, more than the {max} allowed",
            md.len()
        ));
    }
    let mut buf = Vec::with_capacity(md.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut buf))
        .map_err(|e| format!("{name}: {e}"))?;
    if buf.len() as u64 > max {
        return Err(format!("{name}: grew past the {max} bytes allowed"));
    }
    Ok(buf)
}

fn parse<T: DeserializeOwned>(name: &str, bytes: &[u8], errors: &mut Vec<String>) -> Option<T> {
    match serde_json::from_slice(bytes) {
        Ok(v) => Some(v),
        Err(e) => {
            errors.push(format!("{name}: {e}"));
            None
        }
    }
}

/// Read the image in `dir`: every document parsed strictly, the memory
/// file's size, then [`validate`].
pub fn read_dir(dir: &Path) -> Result<Image, Invalid> {
    let mut errors = Vec::new();
    let mut doc = |name: &str| match read_bounded(&dir.join(name), MAX_DOCUMENT_BYTES) {
        Ok(b) => Some(b),
        Err(e) => {
            errors.push(e);
            None
        }
    };
    let raw = [
        doc(FILES.manifest),
        doc(FILES.mappings),
        doc(FILES.threads),
        doc(FILES.resources),
        doc(FILES.translation),
    ];
    let memory = dir.join(FILES.memory);
    let memory_bytes = match std::fs::symlink_metadata(&memory) {
        Ok(m) if m.file_type().is_file() => Some(m.len()),
        Ok(_) => {
            errors.push(format!("{}: not a regular file", FILES.memory));
            None
        }
        Err(e) => {
            errors.push(format!("{}: {e}", FILES.memory));
            None
        }
    };
    let [m, mp, t, r, tr] = raw;
    let manifest = m.and_then(|b| parse(FILES.manifest, &b, &mut errors));
    let mappings = mp.and_then(|b| parse(FILES.mappings, &b, &mut errors));
    let threads = t.and_then(|b| parse(FILES.threads, &b, &mut errors));
    let resources = r.and_then(|b| parse(FILES.resources, &b, &mut errors));
    let translation = tr.and_then(|b| parse(FILES.translation, &b, &mut errors));
    let invalid = |errors| Invalid {
        dir: dir.to_path_buf(),
        errors,
    };
    let (
        Some(manifest),
        Some(mappings),
        Some(threads),
        Some(resources),
        Some(translation),
        Some(memory_bytes),
    ) = (
        manifest,
        mappings,
        threads,
        resources,
        translation,
        memory_bytes,
    )
    else {
        return Err(invalid(errors));
    };
    let docs = Documents {
        manifest,
        mappings,
        threads,
        resources,
        translation,
    };
    let errors = validate(&docs, memory_bytes);
    if !errors.is_empty() {
        return Err(invalid(errors));
    }
    Ok(Image {
        dir: dir.to_path_buf(),
        docs,
        memory_bytes,
    })
}

/// A 64-bit address or register value as the documents write them:
/// `0x` and 1 to 16 hex digits.
pub fn parse_hex(s: &str) -> Option<u64> {
    let digits = s.strip_prefix("0x")?;
    if digits.is_empty() || digits.len() > 16 {
        return None;
    }
    u64::from_str_radix(digits, 16).ok()
}

fn registers_ok(r: &Registers, at: &str, errors: &mut Vec<String>) {
    let values: Vec<(&str, &String)> = match r {
        Registers::Arm64(a) => {
            if a.x.len() != 31 {
                errors.push(format!(
                    "{at}: arm64 has 31 general registers x0-x30, not {}",
                    a.x.len()
                ));
            }
            let mut v = vec![("pc", &a.pc), ("sp", &a.sp), ("pstate", &a.pstate)];
            v.extend(a.x.iter().map(|x| ("x", x)));
            v
        }
        Registers::Amd64(a) => vec![
            ("rip", &a.rip),
            ("rsp", &a.rsp),
            ("rflags", &a.rflags),
            ("rax", &a.rax),
            ("rbx", &a.rbx),
            ("rcx", &a.rcx),
            ("rdx", &a.rdx),
            ("rsi", &a.rsi),
            ("rdi", &a.rdi),
            ("rbp", &a.rbp),
            ("r8", &a.r8),
            ("r9", &a.r9),
            ("r10", &a.r10),
            ("r11", &a.r11),
            ("r12", &a.r12),
            ("r13", &a.r13),
            ("r14", &a.r14),
            ("r15", &a.r15),
            ("fsBase", &a.fs_base),
            ("gsBase", &a.gs_base),
        ],
    };
    for (name, v) in values {
        if parse_hex(v).is_none() {
            errors.push(format!(
                "{at}: register {name} {v:?} is not a 0x-prefixed 64-bit hex value"
            ));
        }
    }
}

/// Check what ties the documents together; every problem found, in words.
/// An empty list means the image is well-formed (not that this host can
/// restore it: that is [`crate::check`]).
pub fn validate(docs: &Documents, memory_bytes: u64) -> Vec<String> {
    let mut errors = Vec::new();
    let m = &docs.manifest;
    let source: Arch = m.capture.source_arch;
    if m.process.exe.is_empty() {
        errors.push("native-process.json: process.exe is empty".into());
    }
    if m.process.cwd.is_empty() {
        errors.push("native-process.json: process.cwd is empty".into());
    }
    if m.process.argv.is_empty() {
        errors.push("native-process.json: process.argv is empty".into());
    }
    if m.capture.pid == Some(0) {
        errors.push("native-process.json: capture.pid is 0".into());
    }
    let tr = &docs.translation;
    if tr.source_arch != source {
        errors.push(format!(
            "native-translation.json: sourceArch {} but the manifest captured on {source}",
            tr.source_arch
        ));
    }
    if tr.target_arch != m.target.arch {
        errors.push(format!(
            "native-translation.json: targetArch {} but the manifest targets {}",
            tr.target_arch, m.target.arch
        ));
    }

    // Mappings: unique ids, sane ranges, in order and apart, captured
    // bytes inside the memory file.
    let mut by_id: BTreeMap<&str, &Mapping> = BTreeMap::new();
    let mut prev_end = 0u64;
    for (i, mp) in docs.mappings.mappings.iter().enumerate() {
        let at = format!("native-mappings.json: mapping {i} ({:?})", mp.id);
        if mp.id.is_empty() {
            errors.push(format!("{at}: empty id"));
        } else if by_id.insert(&mp.id, mp).is_some() {
            errors.push(format!("{at}: duplicate id"));
        }
        let (Some(start), Some(end)) = (parse_hex(&mp.source_start), parse_hex(&mp.source_end))
        else {
            errors.push(format!(
                "{at}: sourceStart/sourceEnd are not 0x-prefixed 64-bit hex values"
            ));
            continue;
        };
        if start >= end || start % PAGE != 0 || end % PAGE != 0 {
            errors.push(format!(
                "{at}: range {start:#x}-{end:#x} is empty, reversed or not page-aligned"
            ));
            continue;
        }
        if mp.size_bytes != end - start {
            errors.push(format!(
                "{at}: sizeBytes {} but the range spans {}",
                mp.size_bytes,
                end - start
            ));
        }
        if start < prev_end {
            errors.push(format!("{at}: overlaps or precedes the mapping before it"));
        }
        prev_end = end;
        if let Some(c) = &mp.captured {
            match c.offset.checked_add(c.size_bytes) {
                Some(e) if e <= memory_bytes => {}
                _ => errors.push(format!(
                    "{at}: captured bytes {}+{} lie outside {} ({memory_bytes} bytes)",
                    c.offset, c.size_bytes, FILES.memory
                )),
            }
            if c.size_bytes > mp.size_bytes {
                errors.push(format!(
                    "{at}: {} captured bytes for a mapping of {}",
                    c.size_bytes, mp.size_bytes
                ));
            }
        }
        if let Some(t) = &mp.target.target_start {
            if parse_hex(t).is_none() {
                errors.push(format!(
                    "{at}: target.targetStart {t:?} is not a hex address"
                ));
            }
        }
    }

    // Threads: unique ids, their stack in a mapping, registers of the
    // source architecture.
    let mut thread_ids = BTreeSet::new();
    for (i, t) in docs.threads.threads.iter().enumerate() {
        let at = format!("native-threads.json: thread {i} ({:?})", t.id);
        if t.id.is_empty() || !thread_ids.insert(t.id.as_str()) {
            errors.push(format!("{at}: empty or duplicate id"));
        }
        if t.lwpid == Some(0) {
            errors.push(format!("{at}: lwpid 0"));
        }
        if !by_id.contains_key(t.stack_mapping.as_str()) {
            errors.push(format!(
                "{at}: stackMapping {:?} names no mapping",
                t.stack_mapping
            ));
        }
        if t.source_registers.arch() != source {
            errors.push(format!(
                "{at}: {} registers in an image captured on {source}",
                t.source_registers.arch()
            ));
        }
        registers_ok(&t.source_registers, &at, &mut errors);
        if let Some(args) = &t.syscall.arguments {
            if args.len() > 6 || args.iter().any(|a| parse_hex(a).is_none()) {
                errors.push(format!(
                    "{at}: syscall.arguments must be at most 6 hex values"
                ));
            }
        }
        for (name, v) in [
            ("stackPointer", &t.syscall.stack_pointer),
            ("instructionPointer", &t.syscall.instruction_pointer),
        ] {
            if v.as_deref().is_some_and(|v| parse_hex(v).is_none()) {
                errors.push(format!("{at}: syscall.{name} is not a hex value"));
            }
        }
        if parse_hex(&t.tls.thread_pointer).is_none() {
            errors.push(format!("{at}: tls.threadPointer is not a hex value"));
        }
    }
    if docs.threads.threads.is_empty() {
        errors.push("native-threads.json: no thread".into());
    }

    let mut resource_ids = BTreeSet::new();
    for (i, r) in docs.resources.resources.iter().enumerate() {
        let at = format!("native-resources.json: resource {i} ({:?})", r.id);
        if r.id.is_empty() || !resource_ids.insert(r.id.as_str()) {
            errors.push(format!("{at}: empty or duplicate id"));
        }
        if r.fd.is_some_and(|fd| fd < 0) {
            errors.push(format!("{at}: negative fd"));
        }
    }

    for (i, c) in tr.code_locations.iter().enumerate() {
        let at = format!("native-translation.json: code location {i} ({:?})", c.id);
        match (
            by_id.get(c.source_mapping.as_str()),
            parse_hex(&c.source_address),
        ) {
            (None, _) => errors.push(format!(
                "{at}: sourceMapping {:?} names no mapping",
                c.source_mapping
            )),
            (_, None) => errors.push(format!("{at}: sourceAddress is not a hex value")),
            (Some(mp), Some(a)) => {
                let inside = parse_hex(&mp.source_start)
                    .zip(parse_hex(&mp.source_end))
                    .is_some_and(|(s, e)| (s..e).contains(&a));
                if !inside {
                    errors.push(format!(
                        "{at}: sourceAddress {a:#x} is outside mapping {:?}",
                        mp.id
                    ));
                }
            }
        }
    }
    for (i, t) in tr.threads.iter().enumerate() {
        let at = format!(
            "native-translation.json: thread {i} ({:?})",
            t.source_thread_id
        );
        if !thread_ids.contains(t.source_thread_id.as_str()) {
            errors.push(format!("{at}: names no captured thread"));
        }
        if let Some(r) = &t.target_registers {
            if r.arch() != tr.target_arch {
                errors.push(format!(
                    "{at}: {} registers for a {} target",
                    r.arch(),
                    tr.target_arch
                ));
            }
            registers_ok(r, &at, &mut errors);
        }
    }
    for (i, r) in tr.memory_relocations.iter().enumerate() {
        let at = format!("native-translation.json: relocation {i}");
        match by_id.get(r.mapping.as_str()) {
            None => errors.push(format!("{at}: mapping {:?} names no mapping", r.mapping)),
            Some(mp) => {
                if r.offset.checked_add(8).is_none_or(|e| e > mp.size_bytes) {
                    errors.push(format!(
                        "{at}: offset {} is outside mapping {:?}",
                        r.offset, mp.id
                    ));
                }
            }
        }
        if parse_hex(&r.source_value).is_none()
            || r.target_value
                .as_deref()
                .is_some_and(|v| parse_hex(v).is_none())
        {
            errors.push(format!("{at}: values must be hex"));
        }
    }
    errors
}
