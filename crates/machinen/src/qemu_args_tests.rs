//! Golden tests: each spec's QEMU command line, written out in full.

use super::*;
use crate::spec::RestoreSpec;
use std::path::PathBuf;

fn spec() -> VmSpec {
    VmSpec {
        id: "0123abcd".into(),
        name: "team/web_1".into(),
        hostname: None,
        dir: PathBuf::from("/run/m/vms/0123abcd"),
        kernel: PathBuf::from("/c/vmlinuz"),
        initrd: PathBuf::from("/c/initrd.cpio"),
        disk: PathBuf::from("/run/m/vms/0123abcd/disk.qcow2"),
        base_image: PathBuf::from("/c/base.ext4"),
        image_sha256: None,
        kernel_version: "6.1.0".into(),
        image: None,
        memory_mib: 512,
        cpus: 1,
        accel: None,
        qemu: None,
        boot_timeout_ms: 120_000,
        detached: false,
        debug: false,
        created_at_ms: 1,
        ports: Vec::new(),
        net_policy: Default::default(),
        net_learned: Vec::new(),
        egress_secrets: Vec::new(),
        zero_freed_memory: false,
        ram_file: Some(PathBuf::from("/dev/shm/machinen-0123abcd.ram")),
        restore: None,
        network: NetworkMode::Nat,
        main: None,
        mounts: None,
        live_mounts: None,
        image_source: None,
        balloon: false,
        cpu_model: None,
    }
}

fn tcg() -> QemuHost {
    QemuHost {
        accel: Accel::Tcg,
        cpu_model: "max".into(),
        tsc_khz: Some(2_596_122),
        extra_kernel_args: Vec::new(),
        qemu_version: Some((10, 0)),
    }
}

fn kvm() -> QemuHost {
    QemuHost {
        accel: Accel::Kvm,
        cpu_model: "host".into(),
        tsc_khz: Some(2_596_122),
        extra_kernel_args: Vec::new(),
        qemu_version: Some((10, 0)),
    }
}

const BASE: &str = r#"{"driver":"raw","file":{"driver":"file","filename":"/c/base.ext4","read-only":true},"node-name":"base","read-only":true}"#;
const ROOT: &str = r#"{"backing":"base","discard":"unmap","driver":"qcow2","file":{"driver":"file","filename":"/run/m/vms/0123abcd/disk.qcow2"},"node-name":"root"}"#;
const PASST: &str = "stream,id=net0,server=off,addr.type=fd,addr.str=3";
const SHARED_RAM: &str =
    "memory-backend-file,id=ram,size=512M,mem-path=/dev/shm/machinen-0123abcd.ram,share=on";
const BOOT_CMDLINE: &str = "console=ttyS0 quiet panic=-1 reboot=t machinen.net=1 machinen.hostname=web-1 machinen.mtu=65520 tsc_early_khz=2596122 tsc=reliable";

/// The whole argv, with the parts the cases vary as parameters.
fn golden(
    accel: &str,
    cpu: &str,
    object: &str,
    smp: &str,
    netdev: &str,
    tail: &[&str],
) -> Vec<String> {
    let mut a: Vec<String> = [
        "-M",
        "microvm,acpi=on,memory-backend=ram",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        "512M",
        "-object",
        object,
        "-smp",
        smp,
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-chardev",
        "file,id=con,path=/run/m/vms/0123abcd/console.log,append=on",
        "-serial",
        "chardev:con",
        "-blockdev",
        BASE,
        "-blockdev",
        ROOT,
        "-device",
        "virtio-blk-device,drive=root",
        "-netdev",
        netdev,
        "-device",
        "virtio-net-device,netdev=net0",
        "-device",
        "virtio-rng-device",
        "-device",
        "virtio-serial-device",
        "-chardev",
        "socket,id=agent,path=/run/m/vms/0123abcd/agent.sock,server=on,wait=off",
        "-device",
        "virtserialport,chardev=agent,name=org.machinen.agent",
        "-qmp",
        "unix:/run/m/vms/0123abcd/qmp.sock,server=on,wait=off",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a.extend(tail.iter().map(|s| s.to_string()));
    a
}

#[test]
fn fresh_boot_with_ram_file() {
    assert_eq!(
        qemu_args(&spec(), &tcg()),
        golden(
            "tcg",
            "max",
            SHARED_RAM,
            "1",
            PASST,
            &[
                "-kernel",
                "/c/vmlinuz",
                "-initrd",
                "/c/initrd.cpio",
                "-append",
                BOOT_CMDLINE
            ]
        )
    );
}

#[test]
fn fresh_boot_without_ram_file_under_kvm() {
    let mut s = spec();
    s.ram_file = None;
    assert_eq!(
        qemu_args(&s, &kvm()),
        golden(
            "kvm",
            "host",
            "memory-backend-ram,id=ram,size=512M",
            "1",
            PASST,
            &[
                "-kernel",
                "/c/vmlinuz",
                "-initrd",
                "/c/initrd.cpio",
                "-append",
                // The TSC hint is for TCG only.
                "console=ttyS0 quiet panic=-1 reboot=t machinen.net=1 machinen.hostname=web-1 machinen.mtu=65520"
            ]
        )
    );
}

#[test]
fn restore_maps_the_bundle_ram_copy_on_write() {
    let mut s = spec();
    s.restore = Some(RestoreSpec {
        bundle: PathBuf::from("/b/snap"),
        reset_tcp: false,
        ram: Some(PathBuf::from("/b/snap/ram")),
        gate: false,
        disk_below: Vec::new(),
        link: None,
    });
    assert_eq!(
        qemu_args(&s, &tcg()),
        golden(
            "tcg",
            "max",
            "memory-backend-file,id=ram,size=512M,mem-path=/b/snap/ram,share=off,readonly=on,rom=off",
            "1",
            PASST,
            &["-incoming", "defer"]
        )
    );
}

#[test]
fn restore_with_own_ram_shares_its_copy() {
    let mut s = spec();
    s.restore = Some(RestoreSpec {
        bundle: PathBuf::from("/b/snap"),
        reset_tcp: true,
        ram: None,
        gate: false,
        disk_below: Vec::new(),
        link: None,
    });
    assert_eq!(
        qemu_args(&s, &tcg()),
        golden(
            "tcg",
            "max",
            SHARED_RAM,
            "1",
            PASST,
            &["-incoming", "defer"]
        )
    );
}

#[test]
fn gated_restore_starts_paused() {
    let mut s = spec();
    s.restore = Some(RestoreSpec {
        bundle: PathBuf::from("/b/snap"),
        reset_tcp: false,
        ram: Some(PathBuf::from("/b/snap/ram")),
        gate: true,
        disk_below: Vec::new(),
        link: None,
    });
    assert_eq!(
        qemu_args(&s, &tcg()),
        golden(
            "tcg",
            "max",
            "memory-backend-file,id=ram,size=512M,mem-path=/b/snap/ram,share=off,readonly=on,rom=off",
            "1",
            PASST,
            &["-incoming", "defer", "-S"]
        )
    );
}

#[test]
fn nat_host_uses_qemu_user_networking() {
    let mut s = spec();
    s.network = NetworkMode::NatHost;
    assert_eq!(
        qemu_args(&s, &tcg()),
        golden(
            "tcg",
            "max",
            SHARED_RAM,
            "1",
            "user,id=net0",
            &[
                "-kernel",
                "/c/vmlinuz",
                "-initrd",
                "/c/initrd.cpio",
                "-append",
                "console=ttyS0 quiet panic=-1 reboot=t machinen.net=1 machinen.hostname=web-1 tsc_early_khz=2596122 tsc=reliable"
            ]
        )
    );
}

#[test]
fn secrets_debug_and_extra_kernel_args() {
    let mut s = spec();
    s.zero_freed_memory = true;
    s.debug = true;
    let mut host = tcg();
    host.extra_kernel_args = vec!["initcall_debug".into()];
    assert_eq!(
        qemu_args(&s, &host),
        golden(
            "tcg",
            "max",
            SHARED_RAM,
            "1",
            PASST,
            &[
                "-kernel",
                "/c/vmlinuz",
                "-initrd",
                "/c/initrd.cpio",
                "-append",
                "console=ttyS0 panic=-1 reboot=t machinen.net=1 machinen.hostname=web-1 machinen.mtu=65520 \
                 tsc_early_khz=2596122 tsc=reliable init_on_free=1 initcall_debug machinen.debug=1"
            ]
        )
    );
}

#[test]
fn multi_cpu_tcg_runs_a_thread_per_vcpu() {
    let mut s = spec();
    s.cpus = 4;
    s.name = "x/".into();
    let mut host = tcg();
    host.tsc_khz = None;
    assert_eq!(
        qemu_args(&s, &host),
        golden(
            "tcg,thread=multi",
            "max",
            SHARED_RAM,
            "4",
            PASST,
            &[
                "-kernel",
                "/c/vmlinuz",
                "-initrd",
                "/c/initrd.cpio",
                "-append",
                "console=ttyS0 quiet panic=-1 reboot=t machinen.net=1 machinen.hostname=machinen machinen.mtu=65520"
            ]
        )
    );
}

#[test]
fn passt_gets_the_fd_and_ipv4_only() {
    assert_eq!(
        passt_args(),
        [
            "--foreground",
            "--ipv4-only",
            "--no-map-gw",
            "--fd",
            "3",
            "--address",
            "10.0.2.15",
            "--netmask",
            "24",
            "--gateway",
            "10.0.2.2",
            "--dns-forward",
            "10.0.2.3",
            "--dns",
            "10.0.2.3",
            "--no-dhcpv6",
            "--no-ndp",
            "--no-ra"
        ]
    );
}

#[test]
fn tsc_frequency_from_cpuinfo() {
    let ok = "cpu MHz\t\t: 2596.122\nflags\t\t: fpu tsc constant_tsc nonstop_tsc\n";
    assert_eq!(tsc_khz_from_cpuinfo(ok), Some(2_596_122));
    assert_eq!(
        tsc_khz_from_cpuinfo("cpu MHz : 2596.1\nflags : fpu tsc\n"),
        None,
        "no constant_tsc"
    );
    assert_eq!(tsc_khz_from_cpuinfo("flags : constant_tsc\n"), None);
    assert_eq!(
        tsc_khz_from_cpuinfo("cpu MHz : junk\nflags : constant_tsc\n"),
        None
    );
}

#[test]
fn hostnames_are_valid() {
    assert_eq!(hostname_for("team/app/web"), "web");
    assert_eq!(hostname_for("a.b_c"), "a-b-c");
    assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    // A hostname of its own wins over the name's.
    let mut s = spec();
    s.hostname = Some("api.internal".into());
    let args = qemu_args(&s, &tcg());
    let append = args
        .iter()
        .skip_while(|a| *a != "-append")
        .nth(1)
        .expect("-append");
    assert!(
        append.contains("machinen.hostname=api.internal "),
        "{append}"
    );
}

#[test]
fn qemu_versions_parse() {
    assert_eq!(
        parse_qemu_version(
            "QEMU emulator version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright"
        ),
        Some((10, 0))
    );
    assert_eq!(
        parse_qemu_version("QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7+deb12u18)"),
        Some((7, 2))
    );
    assert_eq!(parse_qemu_version("garbage"), None);
}

#[test]
fn balloon_only_where_a_private_ram_file_can_be_opened_read_only() {
    let mut s = spec();
    s.balloon = true;
    let mut host = tcg();
    let args = qemu_args(&s, &host).join(" ");
    assert!(
        args.contains("virtio-balloon-device,free-page-reporting=on"),
        "{args}"
    );
    assert!(has_balloon(&s, host.qemu_version));
    host.qemu_version = Some((7, 2));
    assert!(!qemu_args(&s, &host).join(" ").contains("balloon"));
    assert!(!has_balloon(&s, host.qemu_version));
    s.balloon = false;
    host.qemu_version = Some((10, 0));
    assert!(!qemu_args(&s, &host).join(" ").contains("balloon"));
}

#[test]
fn a_restore_maps_the_bundle_ram_read_only_on_qemu_8_2_and_later() {
    let mut s = spec();
    s.restore = Some(crate::spec::RestoreSpec {
        bundle: "/b".into(),
        reset_tcp: false,
        ram: Some("/b/ram.img".into()),
        gate: false,
        disk_below: Vec::new(),
        link: None,
    });
    let host = tcg();
    let args = qemu_args(&s, &host).join(" ");
    assert!(
        args.contains("mem-path=/b/ram.img,share=off,readonly=on,rom=off"),
        "{args}"
    );
    let old = QemuHost {
        qemu_version: Some((7, 2)),
        ..tcg()
    };
    let args = qemu_args(&s, &old).join(" ");
    assert!(
        args.contains("mem-path=/b/ram.img,share=off ")
            || args.contains("mem-path=/b/ram.img,share=off\""),
        "{args}"
    );
}
