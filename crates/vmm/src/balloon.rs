//! The balloon: how much of its memory ceiling a guest may use.
//!
//! Booted VMs (and restores with their own RAM) carry a virtio-balloon
//! device with free page reporting: what the guest frees goes back to the
//! host by itself. A `Balloon` request also sets a target: the guest gives
//! up pages until it keeps only that much (inflating), or takes them back
//! (deflating, up to the ceiling). Pages given up are holes in the RAM file,
//! so they cost the host nothing and make snapshots smaller.

use machinen::qemu_args;
use machinen::spec::VmSpec;
use machinen::ErrorCode;
use machinen_proto::{BalloonReport, Frame, Response, VmState, WireError};

use crate::control::Shared;
use crate::engine::{Capabilities, Machine};

/// Why this VM has no usable balloon, if it has none.
pub fn unavailable(spec: &VmSpec, caps: &Capabilities) -> Option<String> {
    if !spec.balloon {
        return Some(
            "this VM was started without a balloon (by an older machinen, or from such a bundle); \
             boot or restore it again with this version"
                .into(),
        );
    }
    if !qemu_args::has_balloon(spec, caps.version) {
        return Some(
            "the engine (QEMU older than 8.2) cannot keep a balloon apart from a shared RAM file; \
             upgrade QEMU"
                .into(),
        );
    }
    if private_ram(spec) {
        return Some(
            "a restore that maps its bundle's RAM privately has its balloon turned off \
             (the pages it gave back would come from the bundle); restore with --own-ram"
                .into(),
        );
    }
    None
}

/// A restore mapping the bundle's RAM file privately (copy-on-write).
pub fn private_ram(spec: &VmSpec) -> bool {
    spec.restore
        .as_ref()
        .is_some_and(|r| r.ram.is_some() && spec.ram_file.is_none())
}

fn refuse(code: ErrorCode, message: String) -> Frame {
    Frame::Error(WireError {
        code: code.as_str().into(),
        message,
    })
}

/// Serve one `Balloon` request in the loop that owns the machine.
pub async fn serve<M: Machine>(
    machine: &M,
    shared: &Shared,
    spec: &VmSpec,
    caps: &Capabilities,
    target_bytes: Option<u64>,
) -> Frame {
    if let Some(why) = unavailable(spec, caps) {
        return refuse(ErrorCode::BalloonUnavailable, why);
    }
    let state = shared.status.lock().await.state;
    if state != VmState::Running {
        return refuse(
            ErrorCode::BalloonUnavailable,
            format!("the VM is {state}, not running; retry once it runs"),
        );
    }
    if let Some(Err(f)) = target_bytes.map(|t| machinen::balloon::check_target(t, spec.memory_mib))
    {
        return refuse(f.code, f.message);
    }
    match machine.balloon(target_bytes).await {
        Ok(actual) => {
            let mut last = shared.balloon_target.lock().await;
            if target_bytes.is_some() {
                *last = target_bytes;
            }
            let target = *last;
            drop(last);
            if let Some(t) = target_bytes {
                tracing::info!(
                    "balloon: target {} MiB, guest has {} MiB",
                    t >> 20,
                    actual >> 20
                );
            }
            Frame::Response(Response::Balloon(BalloonReport {
                ceiling_bytes: u64::from(spec.memory_mib) << 20,
                target_bytes: target,
                actual_bytes: actual,
                free_page_reporting: true,
            }))
        }
        Err(e) => refuse(ErrorCode::BalloonUnavailable, e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use machinen::spec::{NetworkMode, RestoreSpec};

    use super::*;

    fn spec(balloon: bool, ram_file: bool, restore_ram: bool) -> VmSpec {
        VmSpec {
            id: "0123abcd".into(),
            name: "b".into(),
            hostname: None,
            dir: "/nonexistent/vm".into(),
            kernel: "vmlinuz".into(),
            initrd: "initrd".into(),
            disk: "disk.qcow2".into(),
            base_image: "base.ext4".into(),
            image_sha256: None,
            kernel_version: "6.1.0".into(),
            image: None,
            memory_mib: 512,
            cpus: 1,
            accel: None,
            qemu: None,
            boot_timeout_ms: 1,
            detached: true,
            debug: false,
            created_at_ms: 1,
            ports: Vec::new(),
            net_policy: Default::default(),
            net_learned: Vec::new(),
            egress_secrets: Vec::new(),
            zero_freed_memory: false,
            ram_file: ram_file.then(|| "/dev/shm/x.ram".into()),
            restore: Some(RestoreSpec {
                bundle: "bundle".into(),
                reset_tcp: false,
                ram: restore_ram.then(|| "bundle/ram.img".into()),
                gate: false,
                disk_below: Vec::new(),
                link: None,
            }),
            network: NetworkMode::Nat,
            main: None,
            mounts: None,
            live_mounts: None,
            image_source: None,
            balloon,
            cpu_model: None,
        }
    }

    #[test]
    fn private_restores_and_balloonless_vms_say_why() {
        let caps = Capabilities {
            engine: "qemu",
            accel: machinen::accel::Accel::Tcg,
            cpu_model: "max".into(),
            binary: "qemu".into(),
            version: Some((10, 0)),
        };
        // Own RAM (a copy of the bundle's, or a boot): a working balloon.
        assert_eq!(unavailable(&spec(true, true, true), &caps), None);
        assert_eq!(unavailable(&spec(true, true, false), &caps), None);
        let private = unavailable(&spec(true, false, true), &caps).expect("private");
        assert!(private.contains("--own-ram"), "{private}");
        let old = Capabilities {
            version: Some((7, 2)),
            ..caps.clone()
        };
        assert!(unavailable(&spec(true, true, false), &old).is_some_and(|w| w.contains("8.2")));
        assert!(unavailable(&spec(false, true, false), &caps)
            .is_some_and(|w| w.contains("without a balloon")));
    }
}
