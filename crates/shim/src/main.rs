//! `containerd-shim-machinen-v2`: the containerd runtime shim of machinen
//! (runtime type `io.containerd.machinen.v2`). containerd starts one per
//! container; the container runs in a machinen VM, which `machinen ls`
//! shows as `containerd/<namespace>/<id>`. See docs/containerd.md.

mod fifo;
mod process;
mod rootfs;
mod service;
mod spec;
mod status;

/// The runtime id containerd names this shim by.
pub const RUNTIME_ID: &str = "io.containerd.machinen.v2";

#[tokio::main]
async fn main() {
    // The library runs helper programs (tar, qemu-img, mkfs) and waits for
    // them: the shim must not reap children behind its back, nor adopt the
    // VMs' supervisors, which outlive it by design.
    let config = containerd_shim::Config {
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::asynchronous::run::<service::Shim>(RUNTIME_ID, Some(config)).await;
}
