//! `/proc/1/exe --criu DIR [ARGS…]`: run CRIU in this guest from the tree
//! the host staged in DIR (`machinen install --criu`): load the kernel
//! modules CRIU probes for (`DIR/modules.load`, paths relative to DIR;
//! already loaded is fine), then replace this process by
//! `DIR/root/usr/sbin/criu ARGS…` with the staged libraries first on the
//! loader's path. A process of its own, started by an exec, so CRIU's
//! children and the processes it restores are not the agent's.

use std::os::unix::process::CommandExt;
use std::path::Path;

/// The library directories of a Debian tree, multiarch and merged-/usr.
fn library_path(root: &Path) -> String {
    let triplet = if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else {
        "x86_64-linux-gnu"
    };
    [
        root.join("usr/lib").join(triplet),
        root.join("lib").join(triplet),
    ]
    .iter()
    .map(|p| p.display().to_string())
    .collect::<Vec<_>>()
    .join(":")
}

fn load_modules(dir: &Path) -> Result<(), String> {
    let list = dir.join("modules.load");
    let text = std::fs::read_to_string(&list).map_err(|e| format!("{}: {e}", list.display()))?;
    for rel in crate::init::parse_modules_load(&text) {
        // Only names inside DIR: the list comes with the tree.
        if rel.is_absolute() || rel.components().any(|c| c.as_os_str() == "..") {
            return Err(format!("{}: {} is outside", list.display(), rel.display()));
        }
        crate::init::load_module(&dir.join(&rel))?;
    }
    Ok(())
}

pub fn main(argv: &[String]) -> i32 {
    let Some(dir) = argv.first() else {
        eprintln!("usage: machinen-agent --criu DIR [CRIU ARGS…]");
        return 2;
    };
    let dir = Path::new(dir);
    if let Err(e) = load_modules(dir) {
        eprintln!("criu: {e}");
        return 125;
    }
    let root = dir.join("root");
    let criu = root.join("usr/sbin/criu");
    let err = std::process::Command::new(&criu)
        .args(&argv[1..])
        .env("LD_LIBRARY_PATH", library_path(&root))
        .exec();
    eprintln!("criu: cannot run {}: {err}", criu.display());
    126
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_path_names_both_multiarch_directories() {
        let p = library_path(Path::new("/run/c/root"));
        assert!(p.contains("/run/c/root/usr/lib/"), "{p}");
        assert!(p.contains(":/run/c/root/lib/"), "{p}");
    }

    #[test]
    fn modules_outside_the_tree_are_refused() {
        let d = std::env::temp_dir().join(format!("criu-test-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("test io");
        std::fs::write(d.join("modules.load"), "/lib/evil.ko\n").expect("test io");
        assert!(load_modules(&d).expect_err("refused").contains("outside"));
        std::fs::write(d.join("modules.load"), "../evil.ko\n").expect("test io");
        assert!(load_modules(&d).expect_err("refused").contains("outside"));
        std::fs::remove_dir_all(&d).expect("test io");
    }
}
