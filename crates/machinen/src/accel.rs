//! Which hardware acceleration a VM gets, decided by a probe.
//!
//! Shared by the supervisor (which starts QEMU with it) and the library
//! (which refuses bundles this host cannot resume).

use serde::Serialize;

/// Hardware acceleration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Hvf,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }

    pub fn parse(s: &str) -> Option<Accel> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Some(Accel::Kvm),
            "hvf" => Some(Accel::Hvf),
            "tcg" => Some(Accel::Tcg),
            _ => None,
        }
    }

    /// The CPU model the guest sees. Hardware accelerators pass the host CPU
    /// through; TCG emulates QEMU's `max` model.
    pub fn cpu_model(self) -> &'static str {
        match self {
            Accel::Tcg => "max",
            Accel::Kvm | Accel::Hvf => "host",
        }
    }
}

/// An accelerator name that is none of kvm, hvf, tcg.
#[derive(Debug, thiserror::Error)]
#[error("accelerator {value:?} is not one of kvm, hvf, tcg")]
pub struct BadAccel {
    pub value: String,
}

/// Whether KVM can really run guests here. `/dev/kvm` alone is not enough:
/// nested paravirtual hosts expose it without hardware virtualisation, and
/// stock kernels die there on emulation failures. So require the CPU flag too.
fn kvm_usable() -> bool {
    let dev_ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !dev_ok {
        return false;
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Pick the accelerator: `MACHINEN_ACCEL`, else an explicit request, else
/// HVF on macOS, KVM where it really works, else TCG.
pub fn probe(requested: Option<&str>) -> Result<Accel, BadAccel> {
    let env = std::env::var(machinen_proto::env::ACCEL).ok();
    if let Some(r) = env
        .as_deref()
        .or(requested)
        .filter(|r| !r.is_empty() && *r != "auto")
    {
        return Accel::parse(r).ok_or_else(|| BadAccel {
            value: r.to_string(),
        });
    }
    if cfg!(target_os = "macos") {
        return Ok(Accel::Hvf);
    }
    Ok(if kvm_usable() { Accel::Kvm } else { Accel::Tcg })
}

/// What the host offers for nested virtualisation, as read from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NestedHost {
    /// The accelerator this boot would use.
    pub accel: Option<Accel>,
    /// `/dev/kvm` opens read-write.
    pub kvm_dev: bool,
    /// `vmx` or `svm` in `/proc/cpuinfo`.
    pub cpu_flag: Option<&'static str>,
    /// `/sys/module/kvm_intel/parameters/nested`, when the module is loaded.
    pub kvm_intel_nested: Option<String>,
    /// `/sys/module/kvm_amd/parameters/nested`, when the module is loaded.
    pub kvm_amd_nested: Option<String>,
}

impl NestedHost {
    /// Read this host (the accelerator as [`probe`] picks it for `requested`).
    pub fn read(requested: Option<&str>) -> NestedHost {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags: Vec<&str> = cpuinfo
            .lines()
            .filter(|l| l.starts_with("flags"))
            .flat_map(|l| l.split_whitespace())
            .collect();
        let param = |m: &str| {
            std::fs::read_to_string(format!("/sys/module/{m}/parameters/nested"))
                .ok()
                .map(|s| s.trim().to_owned())
        };
        NestedHost {
            accel: probe(requested).ok(),
            kvm_dev: std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .is_ok(),
            cpu_flag: ["vmx", "svm"].into_iter().find(|f| flags.contains(f)),
            kvm_intel_nested: param("kvm_intel"),
            kvm_amd_nested: param("kvm_amd"),
        }
    }

    /// `Ok` when a guest can run its own VMs here, else what is missing.
    pub fn missing(&self) -> Result<(), Vec<String>> {
        let mut lacks = Vec::new();
        if !self.kvm_dev {
            lacks.push(
                "a usable /dev/kvm (it is missing or cannot be opened read-write)".to_owned(),
            );
        }
        if self.cpu_flag.is_none() {
            lacks.push(
                "hardware virtualisation in the CPU (no vmx or svm flag in /proc/cpuinfo)"
                    .to_owned(),
            );
        }
        let on = |v: &Option<String>| v.as_deref().is_some_and(|v| v == "Y" || v == "1");
        match (&self.kvm_intel_nested, &self.kvm_amd_nested) {
            (None, None) => lacks.push(
                "a loaded kvm_intel or kvm_amd module (/sys/module/kvm_intel/parameters/nested and /sys/module/kvm_amd/parameters/nested do not exist)".to_owned(),
            ),
            (i, a) if !on(i) && !on(a) => {
                let (m, v) = match (i, a) {
                    (Some(v), _) => ("kvm_intel", v),
                    (_, Some(v)) => ("kvm_amd", v),
                    _ => ("kvm", &String::new()),
                };
                lacks.push(format!(
                    "nested support in {m} (/sys/module/{m}/parameters/nested is {v:?}, not Y)"
                ));
            }
            _ => {}
        }
        if lacks.is_empty() && self.accel != Some(Accel::Kvm) {
            lacks.push(format!(
                "the KVM accelerator for this VM (it would run under {})",
                self.accel
                    .map(Accel::as_str)
                    .unwrap_or("an unknown accelerator")
            ));
        }
        if lacks.is_empty() {
            Ok(())
        } else {
            Err(lacks)
        }
    }
}

/// The `BOOT_NESTED_VIRT_UNSUPPORTED` failure for what `host` lacks, if
/// anything.
pub fn nested_support(host: &NestedHost) -> Result<(), crate::Failure> {
    host.missing().map_err(|lacks| {
        crate::error::fail(
            crate::ErrorCode::BootNestedVirtUnsupported,
            format!(
                "--nested needs KVM with nested virtualisation; this host lacks {}",
                lacks.join("; and ")
            ),
        )
        .hint("boot without --nested, or on a Linux host with KVM where nested is on (`modprobe kvm_intel nested=1`, or kvm_amd); under TCG emulation a guest cannot run VMs of its own")
    })
}

/// Refuse `--nested` unless this host supports it.
pub fn check_nested(requested: Option<&str>) -> Result<(), crate::Failure> {
    nested_support(&NestedHost::read(requested))
}

/// Refuse a CPU model QEMU's `-cpu` could read as more than a model name
/// and its feature flags (`Nehalem`, `qemu64,+ssse3`). QEMU itself
/// refuses a model it does not know, when the VM starts.
pub fn check_cpu_model(model: &str) -> Result<(), crate::Failure> {
    let ok = !model.is_empty()
        && model.len() <= 128
        && model.as_bytes()[0].is_ascii_alphanumeric()
        && model
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+=,".contains(&b));
    if ok {
        return Ok(());
    }
    Err(crate::error::fail(
        crate::ErrorCode::BootArgsInvalid,
        format!("{model:?} is not a CPU model"),
    )
    .hint("a QEMU CPU model name, optionally with feature flags (Nehalem, qemu64,+ssse3); `qemu-system-x86_64 -cpu help` lists them"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_models_are_names_and_flags_only() {
        for good in ["max", "Nehalem-v2", "qemu64,+ssse3,-avx", "host"] {
            assert!(check_cpu_model(good).is_ok(), "{good}");
        }
        for bad in ["", ",max", "max -device x", "max;rm", &"a".repeat(129)] {
            assert!(check_cpu_model(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_nested_probe_names_what_is_missing() {
        let msg = |h: &NestedHost| nested_support(h).expect_err("refused").message;
        let none = NestedHost {
            accel: Some(Accel::Tcg),
            ..NestedHost::default()
        };
        let m = msg(&none);
        assert!(
            m.contains("/dev/kvm")
                && m.contains("vmx or svm")
                && m.contains("kvm_intel or kvm_amd"),
            "{m}"
        );
        assert_eq!(
            nested_support(&none).expect_err("x").code,
            crate::ErrorCode::BootNestedVirtUnsupported
        );
        let off = NestedHost {
            accel: Some(Accel::Kvm),
            kvm_dev: true,
            cpu_flag: Some("vmx"),
            kvm_intel_nested: Some("N".into()),
            kvm_amd_nested: None,
        };
        let m = msg(&off);
        assert!(
            m.contains("/sys/module/kvm_intel/parameters/nested is \"N\""),
            "{m}"
        );
        assert!(!m.contains("/dev/kvm"), "{m}");
        let tcg = NestedHost {
            accel: Some(Accel::Tcg),
            kvm_intel_nested: Some("Y".into()),
            ..off.clone()
        };
        assert!(msg(&tcg).contains("run under tcg"), "{}", msg(&tcg));
        let ok = NestedHost {
            kvm_amd_nested: Some("1".into()),
            kvm_intel_nested: None,
            cpu_flag: Some("svm"),
            ..off
        };
        assert!(nested_support(&ok).is_ok());
        // This host: KVM is not usable in CI's VMs, so this is refused.
        if !kvm_usable() {
            assert!(check_nested(None).is_err());
        }
    }

    #[test]
    fn explicit_choices_and_validation() {
        if std::env::var_os(machinen_proto::env::ACCEL).is_some() {
            return; // the environment decides; nothing to check here
        }
        assert_eq!(probe(Some("tcg")).expect("tcg"), Accel::Tcg);
        assert_eq!(probe(Some("KVM")).expect("kvm"), Accel::Kvm);
        assert!(probe(Some("xen")).is_err());
        assert!(probe(None).is_ok());
        assert_eq!(Accel::Tcg.cpu_model(), "max");
    }
}
