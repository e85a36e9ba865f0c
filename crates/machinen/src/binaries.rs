//! Finding machinen's helper programs: the supervisor (`machinen-vmm`) and
//! the statically linked guest agent (`machinen-agent`).
//!
//! Order: the environment override, then next to the running program (and
//! one level up, for test binaries in `target/*/deps`), then — for the agent —
//! the per-target build directory that `scripts/build` fills.

use std::path::{Path, PathBuf};

use crate::error::{fail, ErrorCode, Failure};

/// A directory searched before the running program's own: set by embedders
/// whose program is not machinen's (the Node addon runs inside `node`).
static SEARCH_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Look for `machinen-vmm` and `machinen-agent` in `dir` first (after the
/// environment overrides). The first call wins; later ones are ignored.
pub fn set_search_dir(dir: impl Into<PathBuf>) {
    let _ = SEARCH_DIR.set(dir.into());
}

fn exe_dirs() -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = SEARCH_DIR.get().cloned().into_iter().collect();
    if let Ok(exe) = std::env::current_exe() {
        let mut d = exe.parent().map(Path::to_path_buf);
        for _ in 0..2 {
            if let Some(dir) = d {
                d = dir.parent().map(Path::to_path_buf);
                out.push(dir);
            }
        }
    }
    out
}

fn from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// The supervisor binary.
pub fn vmm() -> Result<PathBuf, Failure> {
    if let Some(p) = from_env(machinen_proto::env::VMM) {
        return if p.is_file() {
            Ok(p)
        } else {
            Err(fail(
                ErrorCode::BootVmmMissing,
                format!(
                    "MACHINEN_VMM points to {}, which does not exist",
                    p.display()
                ),
            ))
        };
    }
    exe_dirs()
        .into_iter()
        .map(|d| d.join("machinen-vmm"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            fail(
                ErrorCode::BootVmmMissing,
                "the supervisor program machinen-vmm was not found next to this program",
            )
            .hint("build the workspace (`scripts/build`), or set MACHINEN_VMM to its path")
        })
}

/// The guest agent binary; it must be statically linked, since it runs as
/// `/init` before any root filesystem (and its libc) is mounted.
pub fn agent() -> Result<PathBuf, Failure> {
    let hint =
        "build it with `scripts/build` (a static build of crates/agent), or set MACHINEN_AGENT";
    let candidates: Vec<PathBuf> = match from_env(machinen_proto::env::AGENT) {
        Some(p) => vec![p],
        None => {
            let triple = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
            let mut c = Vec::new();
            for d in exe_dirs() {
                c.push(d.join("machinen-agent"));
                for profile in ["release", "debug"] {
                    c.push(d.join(&triple).join(profile).join("machinen-agent"));
                    if let Some(up) = d.parent() {
                        c.push(up.join(&triple).join(profile).join("machinen-agent"));
                    }
                }
            }
            c
        }
    };
    let mut dynamic = None;
    for p in candidates {
        if !p.is_file() {
            continue;
        }
        match is_static_elf(&p) {
            Ok(true) => return Ok(p),
            _ => dynamic = Some(p),
        }
    }
    Err(match dynamic {
        Some(p) => fail(
            ErrorCode::BootVmmMissing,
            format!(
                "the guest agent at {} is not a statically linked ELF",
                p.display()
            ),
        )
        .hint(hint),
        None => fail(
            ErrorCode::BootVmmMissing,
            "the guest agent machinen-agent was not found",
        )
        .hint(hint),
    })
}

/// Whether `path` is an ELF file without a program interpreter (static).
pub fn is_static_elf(path: &Path) -> std::io::Result<bool> {
    let data = std::fs::read(path)?;
    Ok(elf_is_static(&data))
}

fn elf_is_static(d: &[u8]) -> bool {
    const PT_INTERP: u32 = 3;
    if d.len() < 64 || &d[..4] != b"\x7fELF" || d[4] != 2 || d[5] != 1 {
        return false; // not a 64-bit little-endian ELF
    }
    let u16_at = |o: usize| {
        d.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        d.get(o..o + 8)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as usize)
    };
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    for i in 0..phnum {
        let Some(off) = i.checked_mul(phentsize).and_then(|x| x.checked_add(phoff)) else {
            return false;
        };
        match d.get(off..off + 4) {
            Some(b) if u32::from_le_bytes([b[0], b[1], b[2], b[3]]) == PT_INTERP => return false,
            Some(_) => {}
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_test_binary_is_not_static() {
        // This test binary is dynamically linked (the workspace default).
        let exe = std::env::current_exe().expect("exe");
        assert!(!is_static_elf(&exe).expect("read"));
    }

    #[test]
    fn garbage_is_not_static() {
        assert!(!elf_is_static(b"not an elf"));
        let mut fake = vec![0u8; 64];
        fake[..4].copy_from_slice(b"\x7fELF");
        fake[4] = 2;
        fake[5] = 1;
        fake[0x20] = 0xff; // phoff far outside
        fake[0x38] = 1;
        fake[0x36] = 56;
        assert!(!elf_is_static(&fake));
    }
}
