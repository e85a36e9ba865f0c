//! The floor: plain QEMU booting the same kernel and initramfs to init.
//!
//! A copy of the cached initramfs gets one more (concatenated) cpio archive
//! holding `/bench-init`, a 100-byte static x86-64 program that writes a
//! marker to the console and powers off; the kernel runs it via
//! `rdinit=/bench-init`. We time QEMU process start → marker on the serial
//! console (QEMU's stdout), with a real VM's QEMU command line (see
//! `qemu.rs`): machine type, accelerator, CPU, memory, kernel flags, devices.

use std::process::Stdio;
use std::time::Instant;

use anyhow::{bail, Context as _, Result};
use tokio::io::AsyncReadExt;

use crate::ctx::{qemu_binary, Ctx};
use crate::qemu::{replace_arg, set_flag};
use crate::stats::{ms, Section};

const MARKER: &[u8] = b"MACHINEN-BENCH-INIT\n";
const INIT_PATH: &str = "bench-init";

/// A static x86-64 ELF: `write(1, MARKER)`, `reboot(RB_POWER_OFF)`, spin.
/// PID 1 starts with `/dev/console` (our serial console) on fds 0-2.
pub fn init_elf() -> Vec<u8> {
    const BASE: u64 = 0x40_0000;
    const HDR: usize = 64 + 56;
    let mut code: Vec<u8> = Vec::new();
    code.extend([0xB8, 1, 0, 0, 0]); // mov eax, 1 (write)
    code.extend([0xBF, 1, 0, 0, 0]); // mov edi, 1
    code.extend([0x48, 0x8D, 0x35]); // lea rsi, [rip + msg]
    let disp_at = code.len();
    code.extend([0, 0, 0, 0]);
    let after_lea = code.len();
    code.push(0xBA); // mov edx, len
    code.extend((MARKER.len() as u32).to_le_bytes());
    code.extend([0x0F, 0x05]); // syscall
    code.extend([0xB8, 169, 0, 0, 0]); // mov eax, 169 (reboot)
    code.push(0xBF); // mov edi, LINUX_REBOOT_MAGIC1
    code.extend(0xfee1_deadu32.to_le_bytes());
    code.push(0xBE); // mov esi, LINUX_REBOOT_MAGIC2
    code.extend(0x2812_1969u32.to_le_bytes());
    code.push(0xBA); // mov edx, LINUX_REBOOT_CMD_POWER_OFF
    code.extend(0x4321_fedcu32.to_le_bytes());
    code.extend([0x0F, 0x05]); // syscall
    code.extend([0xEB, 0xFE]); // jmp . (never reached)
    let msg_at = code.len();
    code.extend(MARKER);
    let disp = (msg_at - after_lea) as u32;
    code[disp_at..disp_at + 4].copy_from_slice(&disp.to_le_bytes());

    let total = (HDR + code.len()) as u64;
    let mut e: Vec<u8> = Vec::with_capacity(total as usize);
    e.extend(b"\x7fELF");
    e.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(0x3Eu16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes());
    e.extend((BASE + HDR as u64).to_le_bytes()); // entry
    e.extend(64u64.to_le_bytes()); // phoff
    e.extend(0u64.to_le_bytes()); // shoff
    e.extend(0u32.to_le_bytes()); // flags
    e.extend(64u16.to_le_bytes()); // ehsize
    e.extend(56u16.to_le_bytes()); // phentsize
    e.extend(1u16.to_le_bytes()); // phnum
    e.extend([0u8; 6]); // shentsize, shnum, shstrndx
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(5u32.to_le_bytes()); // R+X
    e.extend(0u64.to_le_bytes()); // offset
    e.extend(BASE.to_le_bytes()); // vaddr
    e.extend(BASE.to_le_bytes()); // paddr
    e.extend(total.to_le_bytes()); // filesz
    e.extend(total.to_le_bytes()); // memsz
    e.extend(0x1000u64.to_le_bytes()); // align
    debug_assert_eq!(e.len(), HDR);
    e.extend(code);
    e
}

/// A newc cpio archive with one regular file (mode 0755) and the trailer.
pub fn cpio_with(name: &str, data: &[u8]) -> Vec<u8> {
    fn entry(out: &mut Vec<u8>, ino: u32, mode: u32, name: &str, data: &[u8]) {
        let namesize = name.len() + 1;
        let fields = [
            ino,
            mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            namesize as u32,
            0,
        ];
        out.extend(b"070701");
        for f in fields {
            out.extend(format!("{f:08X}").as_bytes());
        }
        out.extend(name.as_bytes());
        out.push(0);
        while out.len() & 3 != 0 {
            out.push(0);
        }
        out.extend(data);
        while out.len() & 3 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    entry(&mut out, 0x7000_0001, 0o100755, name, data);
    entry(&mut out, 0, 0, "TRAILER!!!", &[]);
    while out.len() % 512 != 0 {
        out.push(0);
    }
    out
}

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    if std::env::consts::ARCH != "x86_64" {
        bail!("the plain-QEMU init program is x86-64 machine code");
    }
    let guest = ctx.guest().await?;
    let dir = ctx.path("plain");
    guest.prepare(&dir)?;
    // The initramfs plus our init, as one file: the kernel unpacks
    // concatenated archives in order.
    let initrd = dir.join("initrd.cpio");
    let mut bytes = tokio::fs::read(&guest.initrd)
        .await
        .with_context(|| format!("reading {}", guest.initrd.display()))?;
    while bytes.len() & 3 != 0 {
        bytes.push(0);
    }
    bytes.extend(cpio_with(INIT_PATH, &init_elf()));
    tokio::fs::write(&initrd, &bytes).await?;
    let (mut args, ram) = guest.args_in(&dir);
    let append = args
        .iter()
        .position(|a| a == "-append")
        .and_then(|i| args.get(i + 1))
        .context("no -append")?
        .clone();
    set_flag(
        &mut args,
        "-append",
        format!("{append} rdinit=/{INIT_PATH}"),
    )?;
    set_flag(&mut args, "-initrd", initrd.display().to_string())?;
    // The console on QEMU's stdout, where we watch for the marker.
    replace_arg(&mut args, "file,id=con,", "stdio,id=con,signal=off".into())?;

    let mut to_init = Vec::new();
    let mut to_exit = Vec::new();
    // One unmeasured run warms the page cache (kernel, initramfs).
    for i in 0..=ctx.cfg.runs {
        let r = boot_once(&args).await;
        for f in &ram {
            let _ = std::fs::remove_file(f);
        }
        let (init, exit) = r.with_context(|| format!("plain QEMU boot {i}"))?;
        if i > 0 {
            to_init.push(init);
            if let Some(e) = exit {
                to_exit.push(e);
            }
        }
    }
    sec.add(
        "qemu_to_init_ms",
        "plain QEMU: process start to init running",
        "ms",
        to_init,
    );
    sec.add(
        "qemu_to_poweroff_ms",
        "plain QEMU: process start to exit after init powers off",
        "ms",
        to_exit,
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// One boot: (ms to marker, ms to QEMU exit if it powered off in time).
async fn boot_once(args: &[String]) -> Result<(f64, Option<f64>)> {
    let t0 = Instant::now();
    let mut child = tokio::process::Command::new(qemu_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting QEMU")?;
    let mut out = child.stdout.take().context("stdout")?;
    let mut seen: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    let found = tokio::time::timeout(crate::ctx::PLAIN_BOOT_TIMEOUT, async {
        loop {
            let n = out.read(&mut buf).await?;
            if n == 0 {
                return Ok::<bool, std::io::Error>(false);
            }
            seen.extend(&buf[..n]);
            // The tty turns "\n" into "\r\n": match the text alone.
            let text = &MARKER[..MARKER.len() - 1];
            if seen.windows(text.len()).any(|w| w == text) {
                return Ok(true);
            }
        }
    })
    .await;
    let init = ms(t0);
    match found {
        Ok(Ok(true)) => {}
        other => {
            let _ = child.start_kill();
            let out = child.wait_with_output().await?;
            bail!(
                "no init marker ({other:?}); console: {:?}; stderr: {}",
                String::from_utf8_lossy(&seen[seen.len().saturating_sub(2000)..]),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    // Keep draining the console so QEMU never blocks on the pipe.
    tokio::spawn(async move { while matches!(out.read(&mut buf).await, Ok(n) if n > 0) {} });
    let exit = match tokio::time::timeout(crate::ctx::PLAIN_EXIT_TIMEOUT, child.wait()).await {
        Ok(_) => Some(ms(t0)),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            None
        }
    };
    Ok((init, exit))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_is_a_static_elf() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("init");
        std::fs::write(&p, init_elf()).expect("write");
        assert!(machinen::binaries::is_static_elf(&p).expect("read"));
        let e = init_elf();
        assert_eq!(&e[e.len() - MARKER.len()..], MARKER);
    }

    #[test]
    fn cpio_is_aligned_and_terminated() {
        let c = cpio_with("x", b"abc");
        assert_eq!(c.len() % 512, 0);
        assert!(c.starts_with(b"070701"));
        assert!(c.windows(10).any(|w| w == b"TRAILER!!!"));
    }
}
