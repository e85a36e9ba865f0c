//! A directory tree a guest sends (`cp -r VM:/dir HOST`): arbitrary bytes
//! through `dirs::unpack::unpack_confined`. No panic, errors carry a
//! FILES_* code, and nothing appears beside the destination.
#![no_main]

use std::os::unix::fs::PermissionsExt;

use libfuzzer_sys::fuzz_target;
use machinen::dirs::unpack::unpack_confined;
use machinen::ErrorCode;

fuzz_target!(|data: &[u8]| {
    let outer = tempfile::tempdir().expect("tmp");
    let dest = outer.path().join("dest");
    std::fs::create_dir(&dest).expect("mkdir");
    if let Err(e) = unpack_confined(data, &dest, 1 << 20) {
        assert!(
            matches!(
                e.code,
                ErrorCode::FilesPathEscape
                    | ErrorCode::FilesIo
                    | ErrorCode::FilesTooLarge
                    | ErrorCode::FilesPermissionDenied
                    | ErrorCode::FilesHostDiskReserve
            ),
            "{e}"
        );
    }
    let names: Vec<_> = std::fs::read_dir(outer.path())
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("dest")]);
    // The stream's directory modes may forbid removal: open them up first.
    let mut stack = vec![dest];
    while let Some(d) = stack.pop() {
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(e.path());
            }
        }
    }
});
