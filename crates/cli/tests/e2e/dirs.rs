//! `machinen cp -r`: directory trees into and out of a live VM as one
//! streamed tar, with modes, symlinks and excludes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::{sha256_hex, Env};

/// A tree of 1000 files in nested directories, modes 0755/0600/0640/0644,
/// symlinks (relative, absolute, to a directory, dangling), an empty
/// directory and a larger file.
fn make_tree(root: &Path) {
    let modes = [0o755, 0o600, 0o640, 0o644];
    let mut n = 0u32;
    for a in 0..10 {
        for b in 0..10 {
            let dir = root.join(format!("d{a}")).join(format!("sub{b}"));
            std::fs::create_dir_all(&dir).expect("mkdir");
            for c in 0..10 {
                let ext = if c == 9 { "log" } else { "txt" };
                let p = dir.join(format!("f{c}.{ext}"));
                let len = (n as usize * 37) % 3000;
                let data: Vec<u8> = (0..len).map(|i| (i as u32 ^ n) as u8).collect();
                std::fs::write(&p, data).expect("write");
                std::fs::set_permissions(
                    &p,
                    std::fs::Permissions::from_mode(modes[n as usize % 4]),
                )
                .expect("chmod");
                n += 1;
            }
        }
    }
    assert_eq!(n, 1000);
    // One bigger file spans many stream chunks.
    let big: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    std::fs::write(root.join("d0/big.bin"), big).expect("big");
    std::fs::create_dir(root.join("empty")).expect("empty dir");
    std::fs::set_permissions(root.join("d1"), std::fs::Permissions::from_mode(0o750))
        .expect("chmod dir");
    std::os::unix::fs::symlink("sub0/f0.txt", root.join("d2/rel-link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/hostname", root.join("abs-link")).expect("symlink");
    std::os::unix::fs::symlink("d3", root.join("dir-link")).expect("symlink");
    std::os::unix::fs::symlink("/nonexistent/target", root.join("d4/dangling")).expect("symlink");
}

/// `path|type|mode|link target|sha256` of every entry below `root`,
/// sorted: what `find -printf '%P|%y|%m|%l'` and `sha256sum` say in the guest.
fn listing(root: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).expect("ls").flatten() {
            let p = e.path();
            let m = std::fs::symlink_metadata(&p).expect("meta");
            let rel = p
                .strip_prefix(root)
                .expect("rel")
                .to_string_lossy()
                .into_owned();
            let ft = m.file_type();
            let (kind, link, sum) = if ft.is_symlink() {
                (
                    "l",
                    std::fs::read_link(&p)
                        .expect("link")
                        .to_string_lossy()
                        .into_owned(),
                    String::new(),
                )
            } else if ft.is_dir() {
                stack.push(p.clone());
                ("d", String::new(), String::new())
            } else {
                (
                    "f",
                    String::new(),
                    sha256_hex(&std::fs::read(&p).expect("read")),
                )
            };
            out.push(format!("{rel}|{kind}|{:o}|{link}|{sum}", m.mode() & 0o7777));
        }
    }
    out.sort();
    out
}

/// The same listing, taken in the guest.
fn guest_listing(env: &Env, vm: &str, dir: &str) -> Vec<String> {
    let script = format!(
        r#"cd {dir} && find . -mindepth 1 -printf '%P|%y|%m|%l|\n' && echo --- && find . -type f -printf '%P\0' | xargs -0 -r sha256sum"#
    );
    let out = env.run_ok(&["exec", vm, "--", "sh", "-c", &script]);
    let (list, sums) = out.split_once("---\n").expect("separator");
    // `HASH  PATH` lines.
    let sums: std::collections::HashMap<&str, &str> = sums
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p, h))
        .collect();
    let mut v: Vec<String> = list
        .lines()
        .map(|l| {
            let path = l.split('|').next().expect("path");
            format!("{l}{}", sums.get(path).copied().unwrap_or(""))
        })
        .collect();
    v.sort();
    v
}

fn err_text(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cp_r_round_trips_a_tree_of_1000_files_with_modes_links_and_excludes() {
    let env = Env::new();
    let work = tempfile::tempdir().expect("tmp");
    let src = work.path().join("tree");
    make_tree(&src);
    let want = listing(&src);
    assert_eq!(want.iter().filter(|l| l.contains("|f|")).count(), 1001);

    env.run_ok(&["boot", "--name", "files", "--detached"]);
    let s = src.to_str().expect("path");

    // A directory without -r is refused like cp(1), with the way out.
    let out = env.run(&["cp", s, "files:/srv/tree"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        err_text(&out).contains("FILES_IS_DIRECTORY") && err_text(&out).contains("-r"),
        "{}",
        err_text(&out)
    );

    // In: the guest sees exactly the host tree.
    let json = env.json(&["cp", "-r", s, "files:/srv/tree", "--json"]);
    assert_eq!(json["entries"].as_u64(), Some(want.len() as u64), "{json}");
    assert_eq!(guest_listing(&env, "files", "/srv/tree"), want);
    assert_eq!(
        env.run_ok(&["exec", "files", "--", "stat", "-c", "%a", "/srv/tree"])
            .trim(),
        format!(
            "{:o}",
            std::fs::metadata(&src).expect("meta").mode() & 0o777
        )
    );

    // Into a guest path that is a file: refused, nothing changes.
    let out = env.run(&["cp", "-r", s, "files:/etc/hostname"]);
    assert!(
        err_text(&out).contains("FILES_NOT_A_DIRECTORY"),
        "{}",
        err_text(&out)
    );

    // Out: back on the host, identical again.
    let back = work.path().join("back");
    let out = env.run(&["cp", "files:/srv/tree", back.to_str().expect("path")]);
    assert!(err_text(&out).contains("FILES_IS_DIRECTORY") && err_text(&out).contains("-r"));
    env.run_ok(&["cp", "-r", "files:/srv/tree", back.to_str().expect("path")]);
    assert_eq!(listing(&back), want);
    // mtimes travel both ways (whole seconds).
    for f in ["d0/big.bin", "d7/sub3/f5.txt", "d1"] {
        let mt = |p: &Path| std::fs::metadata(p).expect("meta").mtime();
        assert_eq!(mt(&back.join(f)), mt(&src.join(f)), "{f}");
    }
    // Into an existing directory: under the source's name; an existing
    // target is never merged into.
    let into = work.path().join("into");
    std::fs::create_dir(&into).expect("mkdir");
    env.run_ok(&[
        "cp",
        "-r",
        "files:/srv/tree/d1",
        into.to_str().expect("path"),
    ]);
    assert_eq!(listing(&into.join("d1")), listing(&src.join("d1")));
    let out = env.run(&["cp", "-r", "files:/srv/tree", back.to_str().expect("path")]);
    // `back` exists: the tree would go to back/tree, which is new.
    assert!(out.status.success(), "{}", err_text(&out));
    let out = env.run(&["cp", "-r", "files:/srv/tree", back.to_str().expect("path")]);
    assert!(
        err_text(&out).contains("FILES_EXISTS"),
        "{}",
        err_text(&out)
    );
    assert!(
        !std::fs::read_dir(work.path())
            .expect("ls")
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with(".machinen-cp-")),
        "no temporary directory is left behind"
    );

    // --exclude on the way in (the host packs) and on the way out (the guest packs).
    env.run_ok(&[
        "cp",
        "-r",
        "--exclude",
        "*.log",
        "--exclude",
        "d3",
        "--exclude",
        "d0/sub1/**",
        s,
        "files:/srv/ex",
    ]);
    let guest = guest_listing(&env, "files", "/srv/ex");
    let keep = |l: &&String| {
        let p = l.split('|').next().expect("path");
        !p.ends_with(".log") && p != "d3" && !p.starts_with("d3/") && !p.starts_with("d0/sub1/")
    };
    let want_ex: Vec<String> = want.iter().filter(keep).cloned().collect();
    assert_eq!(guest, want_ex);
    assert!(
        want_ex.len() < want.len() - 100,
        "the patterns left things out"
    );
    let out_ex = work.path().join("out-ex");
    env.run_ok(&[
        "cp",
        "-r",
        "--exclude",
        "sub[1-9]",
        "--exclude",
        "big.bin",
        "files:/srv/tree",
        out_ex.to_str().expect("path"),
    ]);
    let got = listing(&out_ex);
    assert!(!got.is_empty());
    assert!(got
        .iter()
        .all(|l| !l.contains("sub1/") && !l.contains("sub9") && !l.starts_with("d0/big.bin")));
    assert!(got.iter().any(|l| l.starts_with("d5/sub0/f3.txt|f|")));
    assert!(got
        .iter()
        .any(|l| l.starts_with("d4/dangling|l|777|/nonexistent/target|")));

    // Interrupted (SIGINT) in the middle of a pull: exit 130, nothing left,
    // not even the hidden directory it was unpacking into.
    env.run_ok(&[
        "exec",
        "files",
        "--",
        "sh",
        "-c",
        "mkdir -p /srv/big && dd if=/dev/zero of=/srv/big/zeros bs=1M count=256 status=none",
    ]);
    let landing = work.path().join("landing");
    std::fs::create_dir(&landing).expect("mkdir");
    let c = env
        .cmd(&[
            "cp",
            "-r",
            "files:/srv/big",
            landing.join("big").to_str().expect("path"),
        ])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("cp");
    let pid = c.id();
    let present = || std::fs::read_dir(&landing).expect("ls").count();
    super::wait_until(
        "the pull to be under way",
        std::time::Duration::from_secs(120),
        || present() > 0,
    );
    // SAFETY: kill(2) on the pid of our own child, which we have not
    // waited for, so it cannot have been reused.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGINT) }, 0);
    let out = c.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(130), "{}", err_text(&out));
    assert!(err_text(&out).contains("INTERRUPTED"), "{}", err_text(&out));
    assert_eq!(present(), 0, "an interrupted pull leaves nothing");
    env.run_ok(&["stop", "--force", "files"]);
}
