//! The list of entries a directory transfer packs: walked without
//! following symlinks, in a stable (sorted) order, with the excluded
//! subtrees left out. The host (push) and the guest agent (pull) both pack
//! from this list, with the `tar` crate, so a tree looks the same whichever
//! way it travels.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::exclude::Excludes;

/// What an entry is; everything else (sockets, FIFOs, devices) is skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// One entry to pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where it is.
    pub full: PathBuf,
    /// Its name in the stream, relative to the root.
    pub rel: PathBuf,
    pub kind: Kind,
    /// Regular-file size when walked.
    pub size: u64,
}

/// A walked tree.
#[derive(Debug, Clone, Default)]
pub struct Tree {
    /// Permission bits of the root directory.
    pub root_mode: u32,
    pub entries: Vec<Entry>,
    /// Sum of the regular files' sizes.
    pub bytes: u64,
    /// Entries of other kinds, left out.
    pub skipped: u64,
}

/// Walk the directory `root` (itself followed if it is a symlink; nothing
/// below it is). Errors of the root are returned; an entry that vanishes
/// while walking is skipped.
pub fn walk(root: &Path, exclude: &Excludes) -> io::Result<Tree> {
    let meta = std::fs::metadata(root)?;
    if !meta.is_dir() {
        return Err(io::Error::from_raw_os_error(20)); // ENOTDIR
    }
    let mut tree = Tree {
        root_mode: meta.mode() & 0o7777,
        ..Tree::default()
    };
    // Each directory's entries sorted by name, then its subdirectories'
    // (depth first): a directory always comes before what it holds, so an
    // unpacker has created it (with its mode) when its entries arrive.
    let mut stack: Vec<(PathBuf, PathBuf)> = vec![(root.to_path_buf(), PathBuf::new())];
    while let Some((dir, rel_dir)) = stack.pop() {
        let mut names: Vec<_> = match std::fs::read_dir(&dir) {
            Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.file_name())).collect(),
            Err(e) if dir != root && e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        names.sort();
        let mut subdirs = Vec::new();
        for name in names {
            let full = dir.join(&name);
            let rel = rel_dir.join(&name);
            let Ok(m) = std::fs::symlink_metadata(&full) else {
                continue;
            };
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                Kind::Dir
            } else if ft.is_file() {
                Kind::File
            } else if ft.is_symlink() {
                Kind::Symlink
            } else {
                debug_assert!(
                    ft.is_fifo() || ft.is_socket() || ft.is_char_device() || ft.is_block_device()
                );
                tree.skipped += 1;
                continue;
            };
            if exclude.is_excluded(&rel.to_string_lossy(), kind == Kind::Dir) {
                continue;
            }
            let size = if kind == Kind::File { m.len() } else { 0 };
            tree.bytes = tree.bytes.saturating_add(size);
            tree.entries.push(Entry {
                full: full.clone(),
                rel: rel.clone(),
                kind,
                size,
            });
            if kind == Kind::Dir {
                subdirs.push((full, rel));
            }
        }
        // Reversed so the first subdirectory is walked next.
        stack.extend(subdirs.into_iter().rev());
    }
    Ok(tree)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_sorted_without_following_links_and_excludes() {
        let d = std::env::temp_dir().join(format!("machinen-proto-tree-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join("b/sub")).expect("mkdir");
        std::fs::create_dir_all(d.join("a")).expect("mkdir");
        std::fs::write(d.join("a/x.o"), b"obj").expect("write");
        std::fs::write(d.join("b/sub/f"), b"hello").expect("write");
        std::os::unix::fs::symlink("/etc", d.join("link")).expect("symlink");
        let ex = Excludes::new(&["*.o".to_string()]).expect("ex");
        let t = walk(&d, &ex).expect("walk");
        let rels: Vec<_> = t
            .entries
            .iter()
            .map(|e| (e.rel.to_string_lossy().into_owned(), e.kind))
            .collect();
        assert_eq!(
            rels,
            vec![
                ("a".to_string(), Kind::Dir),
                ("b".to_string(), Kind::Dir),
                ("link".to_string(), Kind::Symlink),
                ("b/sub".to_string(), Kind::Dir),
                ("b/sub/f".to_string(), Kind::File),
            ]
        );
        assert_eq!(t.bytes, 5);
        let _ = std::fs::remove_dir_all(&d);
    }
}
