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

#[cfg(test)]
mod tests {
    use super::*;

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
