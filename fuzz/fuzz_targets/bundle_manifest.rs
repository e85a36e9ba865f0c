//! `manifest.json` in front of a small intact bundle (with `ram.img`), as
//! `verify` reads it: no panic, every error RESTORE_BUNDLE_INVALID, and an
//! accepted manifest lists every file of the bundle.
#![no_main]

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use machinen::bundle::*;
use machinen::error::{Coded, ErrorCode};

fn bundle() -> &'static PathBuf {
    static DIR: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    &DIR.get_or_init(|| {
        let tmp = tempfile::tempdir().expect("tmp");
        let b = Builder::new(&tmp.path().join("b.snap")).expect("builder");
        std::fs::write(b.path(STATE), vec![7u8; 3000]).expect("state");
        std::fs::write(b.path(DISK), b"disk layer").expect("disk");
        let ram = std::fs::File::create(b.path(RAM)).expect("ram");
        ram.set_len(256 << 10).expect("len");
        ram.write_all_at(b"heap", 100 << 10).expect("write");
        let meta = BundleMeta {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            engine: "qemu".into(),
            source_name: "web".into(),
            image: ImageIdentity {
                path: "/x/rootfs.tar.gz".into(),
                sha256: "ab".repeat(32),
            },
            snapped_at_ms: 1,
            guest_arch: "amd64".into(),
            accel: "tcg".into(),
            cpu_model: "max".into(),
            memory_mib: 512,
            cpus: 1,
            kernel: KernelIdentity {
                version: "6.1".into(),
                sha256: "cd".repeat(32),
            },
            disk_format: "qcow2".into(),
            chain_id: "c".into(),
            chain_seq: 1,
            chain_parent: None,
        };
        let dest = b.finish(&meta).expect("finish");
        // Seed-friendly: the valid manifest is where libFuzzer starts
        // when the corpus is empty (see README.md).
        (tmp, dest)
    })
    .1
}

fuzz_target!(|data: &[u8]| {
    let dir = bundle();
    std::fs::write(dir.join(MANIFEST), data).expect("write");
    match verify(dir) {
        Ok(_) => {
            let m: Manifest = serde_json::from_slice(data).expect("accepted manifest parses");
            for f in [META, STATE, DISK, RAM] {
                assert!(m.files.iter().any(|e| e.name == f), "{f} not verified");
            }
        }
        Err(e) => assert_eq!(e.code(), ErrorCode::RestoreBundleInvalid, "{e}"),
    }
});
