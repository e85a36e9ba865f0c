//! The build context: the host directory COPY and ADD read from, confined
//! to itself, with `.dockerignore` applied as Docker applies it.
//!
//! A source is cleaned lexically (`..` may not climb out), expanded when it
//! holds wildcards (`*`, `?`, `[…]`, one path component at a time, as
//! Docker's `filepath.Match`), and its real path must still be inside the
//! context: a symlink in the context that points outside is refused, not
//! followed. Inside a copied directory, symlinks are copied as symlinks and
//! files `.dockerignore` excludes are left out.

use std::fs::{self, Metadata};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

use globset::{Glob, GlobBuilder, GlobMatcher};

use super::dockerfile::invalid;
use crate::error::{fail, ErrorCode, Failure};
use crate::provision::copy::{append_as, Attrs};

/// Bound on `.dockerignore` (patterns, not data).
const MAX_IGNORE_BYTES: u64 = 1 << 20;

fn context_err(line: usize, message: impl std::fmt::Display) -> Failure {
    fail(
        ErrorCode::BuildContextInvalid,
        format!("Dockerfile line {line}: {message}"),
    )
    .hint("COPY and ADD read files inside the build context (the directory given to `machinen build`, default .) that .dockerignore does not exclude")
}

/// One `.dockerignore` line.
#[derive(Debug)]
struct Pattern {
    matcher: GlobMatcher,
    /// `!pattern`: includes again what an earlier line excluded.
    negated: bool,
}

/// The build context.
#[derive(Debug)]
pub struct Context {
    /// Canonical path of the context directory.
    pub root: PathBuf,
    ignore: Vec<Pattern>,
}

/// A file, directory or symlink to copy: where it is and the tar member
/// name it gets.
#[derive(Debug, Clone)]
pub struct Entry {
    pub path: PathBuf,
    pub member: PathBuf,
}

impl Context {
    /// Open `dir` as a context and read its `.dockerignore`.
    pub fn open(dir: &Path) -> Result<Context, Failure> {
        let root = fs::canonicalize(dir).map_err(|e| {
            fail(
                ErrorCode::BuildContextInvalid,
                format!("build context {} cannot be opened", dir.display()),
            )
            .source(e)
            .hint("give an existing directory as the build context")
        })?;
        if !root.is_dir() {
            return Err(fail(
                ErrorCode::BuildContextInvalid,
                format!("build context {} is not a directory", dir.display()),
            )
            .hint("give a directory as the build context"));
        }
        let mut ignore = Vec::new();
        let path = root.join(".dockerignore");
        if let Ok(f) = fs::File::open(&path) {
            let mut text = String::new();
            f.take(MAX_IGNORE_BYTES)
                .read_to_string(&mut text)
                .map_err(|e| {
                    fail(
                        ErrorCode::BuildContextInvalid,
                        format!("cannot read {}", path.display()),
                    )
                    .source(e)
                })?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                let (negated, pat) = match line.strip_prefix('!') {
                    Some(p) => (true, p.trim()),
                    None => (false, line),
                };
                let cleaned = clean(pat).map(|p| p.to_string_lossy().into_owned());
                let Some(cleaned) = cleaned.filter(|p| !p.is_empty()) else {
                    continue;
                };
                let glob = GlobBuilder::new(&cleaned)
                    .literal_separator(true)
                    .build()
                    .map_err(|e| {
                        fail(
                            ErrorCode::BuildContextInvalid,
                            format!(".dockerignore line {}: {line:?} is not a pattern", i + 1),
                        )
                        .source(e)
                    })?;
                ignore.push(Pattern {
                    matcher: glob.compile_matcher(),
                    negated,
                });
            }
        }
        Ok(Context { root, ignore })
    }

    /// Whether `rel` (relative to the root) is excluded: the last pattern
    /// that matches it or one of its parent directories decides.
    pub fn ignored(&self, rel: &Path) -> bool {
        let mut excluded = false;
        for p in &self.ignore {
            let hit = rel
                .ancestors()
                .filter(|a| !a.as_os_str().is_empty())
                .any(|a| p.matcher.is_match(a));
            if hit {
                excluded = !p.negated;
            }
        }
        excluded
    }

    /// The context paths (relative) `src` names: itself, or what its
    /// wildcards match, sorted. Missing, escaping or excluded sources are
    /// refused naming `line`.
    pub fn expand(&self, src: &str, line: usize) -> Result<Vec<PathBuf>, Failure> {
        let rel = clean(src)
            .ok_or_else(|| context_err(line, format!("{src:?} is outside the build context")))?;
        let wild = |c: &str| c.contains(['*', '?', '[']);
        let mut found: Vec<PathBuf> = vec![PathBuf::new()];
        for comp in rel.components() {
            let comp = comp.as_os_str().to_string_lossy().into_owned();
            let mut next = Vec::new();
            for base in &found {
                if wild(&comp) {
                    let m = Glob::new(&comp)
                        .map_err(|e| invalid(line, format!("{src:?} is not a valid pattern: {e}")))?
                        .compile_matcher();
                    let dir = self.root.join(base);
                    let Ok(rd) = fs::read_dir(&dir) else { continue };
                    let mut names: Vec<_> = rd
                        .flatten()
                        .map(|e| e.file_name())
                        .filter(|n| m.is_match(Path::new(n)))
                        .collect();
                    names.sort();
                    next.extend(names.into_iter().map(|n| base.join(n)));
                } else {
                    next.push(base.join(&comp));
                }
            }
            found = next;
        }
        let mut out = Vec::new();
        for rel in found {
            let abs = self.root.join(&rel);
            if fs::symlink_metadata(&abs).is_err()
                || (!rel.as_os_str().is_empty() && self.ignored(&rel))
            {
                continue;
            }
            self.confined(&rel, line)?;
            out.push(rel);
        }
        if out.is_empty() {
            return Err(context_err(
                line,
                format!("{src:?} is not in the build context (or .dockerignore excludes it)"),
            ));
        }
        Ok(out)
    }

    /// The real path of `rel` must be inside the root.
    fn confined(&self, rel: &Path, line: usize) -> Result<PathBuf, Failure> {
        let real = fs::canonicalize(self.root.join(rel)).map_err(|e| {
            context_err(line, format!("{} cannot be read", rel.display())).source(e)
        })?;
        if !real.starts_with(&self.root) {
            return Err(context_err(
                line,
                format!(
                    "{} leads outside the build context (to {})",
                    rel.display(),
                    real.display()
                ),
            ));
        }
        Ok(real)
    }

    /// What copying `rel` takes: a file as itself (named `name`), a
    /// directory as its contents (members relative to it), without what
    /// `.dockerignore` excludes. A top-level symlink is followed (inside
    /// the context); symlinks below it are copied as they are.
    pub fn entries(&self, rel: &Path, name: &str, line: usize) -> Result<Vec<Entry>, Failure> {
        let real = self.confined(rel, line)?;
        let meta = fs::metadata(&real).map_err(|e| {
            context_err(line, format!("{} cannot be read", rel.display())).source(e)
        })?;
        if !meta.is_dir() {
            return Ok(vec![Entry {
                path: real,
                member: PathBuf::from(name),
            }]);
        }
        let mut out = Vec::new();
        self.walk(&real, rel, Path::new(""), &mut out)
            .map_err(|e| context_err(line, format!("reading {}", rel.display())).source(e))?;
        Ok(out)
    }

    fn walk(&self, dir: &Path, rel: &Path, member: &Path, out: &mut Vec<Entry>) -> io::Result<()> {
        let mut names: Vec<_> = fs::read_dir(dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for n in names {
            let (path, rel, member) = (dir.join(&n), rel.join(&n), member.join(&n));
            if self.ignored(&rel) {
                continue;
            }
            let meta = fs::symlink_metadata(&path)?;
            out.push(Entry {
                path: path.clone(),
                member: member.clone(),
            });
            if meta.is_dir() {
                self.walk(&path, &rel, &member, out)?;
            }
        }
        Ok(())
    }
}

/// `p` cleaned lexically and made relative (a leading `/` means the
/// context's root, as in Docker); `None` when `..` climbs above the root.
pub fn clean(p: &str) -> Option<PathBuf> {
    let mut out: Vec<&std::ffi::OsStr> = Vec::new();
    for c in Path::new(p).components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                out.pop()?;
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Some(out.iter().collect())
}

/// Write `entries` as a tar to `w` with `attrs`.
pub fn write_tar(w: impl Write, entries: &[Entry], attrs: &Attrs) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    for e in entries {
        let meta: Metadata = fs::symlink_metadata(&e.path)?;
        append_as(&mut b, &e.path, &e.member, &meta, attrs)?;
    }
    b.into_inner()?.flush()
}

/// A digest of what `entries` hold (names, types, modes, sizes, contents,
/// link targets): the build cache's key for a COPY.
pub fn digest(entries: &[Entry], hasher: &mut blake3::Hasher) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for e in entries {
        let meta = fs::symlink_metadata(&e.path)?;
        hasher.update(e.member.as_os_str().as_encoded_bytes());
        hasher.update(&[0]);
        hasher.update(&meta.permissions().mode().to_le_bytes());
        if meta.file_type().is_symlink() {
            hasher.update(fs::read_link(&e.path)?.as_os_str().as_encoded_bytes());
        } else if meta.is_file() {
            hasher.update(&meta.len().to_le_bytes());
            hasher.update_reader(fs::File::open(&e.path)?)?;
        }
        hasher.update(&[0xff]);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(files: &[&str], ignore: &str) -> (tempfile::TempDir, Context) {
        let d = tempfile::tempdir().expect("tmp");
        for f in files {
            let p = d.path().join(f);
            fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            fs::write(&p, f.as_bytes()).expect("write");
        }
        fs::write(d.path().join(".dockerignore"), ignore).expect("ignore");
        let c = Context::open(d.path()).expect("open");
        (d, c)
    }

    #[test]
    fn clean_confines_lexically() {
        assert_eq!(clean("a/./b/../c"), Some(PathBuf::from("a/c")));
        assert_eq!(clean("/etc/x"), Some(PathBuf::from("etc/x")));
        assert_eq!(clean("."), Some(PathBuf::new()));
        assert_eq!(clean("../x"), None);
        assert_eq!(clean("a/../../x"), None);
    }

    #[test]
    fn dockerignore_last_match_wins_and_covers_directories() {
        let (_d, c) = ctx(
            &[
                "src/a.rs",
                "src/gen/b.rs",
                "target/x",
                "README.md",
                "notes/keep.md",
                "notes/drop.md",
            ],
            "# comment\ntarget\n**/*.md\n!notes/keep.md\nsrc/gen\n",
        );
        assert!(c.ignored(Path::new("target/x")));
        assert!(c.ignored(Path::new("README.md")));
        assert!(c.ignored(Path::new("notes/drop.md")));
        assert!(!c.ignored(Path::new("notes/keep.md")));
        assert!(c.ignored(Path::new("src/gen/b.rs")));
        assert!(!c.ignored(Path::new("src/a.rs")));
        let names: Vec<String> = c
            .entries(Path::new(""), "", 1)
            .expect("entries")
            .iter()
            .map(|e| e.member.to_string_lossy().into_owned())
            .collect();
        assert!(names.contains(&"src/a.rs".to_string()), "{names:?}");
        assert!(names.contains(&"notes/keep.md".to_string()), "{names:?}");
        for gone in [
            "target",
            "target/x",
            "README.md",
            "src/gen",
            "notes/drop.md",
        ] {
            assert!(!names.contains(&gone.to_string()), "{gone} in {names:?}");
        }
    }

    #[test]
    fn wildcards_expand_per_component_and_sources_stay_inside() {
        let (d, c) = ctx(&["a/one.py", "a/two.py", "a/three.txt", "b/one.py"], "b\n");
        let got = c.expand("a/*.py", 3).expect("glob");
        assert_eq!(got, [PathBuf::from("a/one.py"), PathBuf::from("a/two.py")]);
        assert_eq!(
            c.expand("*/one.py", 3).expect("glob"),
            [PathBuf::from("a/one.py")]
        );
        let e = c.expand("b/one.py", 4).expect_err("refused");
        assert_eq!(e.code, ErrorCode::BuildContextInvalid);
        assert!(e.message.contains("line 4"), "{}", e.message);
        assert_eq!(
            c.expand("../etc/passwd", 5).expect_err("refused").code,
            ErrorCode::BuildContextInvalid
        );
        assert!(c.expand("missing", 5).is_err());
        // A symlink out of the context is refused; one inside is fine.
        std::os::unix::fs::symlink("/etc", d.path().join("out")).expect("symlink");
        std::os::unix::fs::symlink("a", d.path().join("in")).expect("symlink");
        let e = c.expand("out/passwd", 6).expect_err("refused");
        assert!(
            e.message.contains("outside the build context"),
            "{}",
            e.message
        );
        assert!(c.entries(Path::new("out"), "out", 6).is_err());
        assert_eq!(c.expand("in/one.py", 7).expect("inside").len(), 1);
        let inner = c.entries(Path::new("in"), "in", 7).expect("entries");
        assert_eq!(inner.len(), 3);
    }

    #[test]
    fn tar_carries_owner_and_mode_and_the_digest_sees_content() {
        let (_d, c) = ctx(&["x/f"], "");
        let entries = c.entries(Path::new("x"), "x", 1).expect("entries");
        let mut buf = Vec::new();
        write_tar(
            &mut buf,
            &entries,
            &Attrs {
                uid: 1000,
                gid: 1001,
                mode: Some(0o640),
            },
        )
        .expect("tar");
        let mut a = tar::Archive::new(&buf[..]);
        let e = a
            .entries()
            .expect("entries")
            .next()
            .expect("one")
            .expect("entry");
        let h = e.header();
        assert_eq!(
            (h.uid().ok(), h.gid().ok(), h.mode().ok()),
            (Some(1000), Some(1001), Some(0o640))
        );
        assert_eq!(e.path().expect("path").to_string_lossy(), "f");
        let key = |c: &Context| {
            let mut h = blake3::Hasher::new();
            digest(&c.entries(Path::new("x"), "x", 1).expect("e"), &mut h).expect("digest");
            h.finalize()
        };
        let before = key(&c);
        fs::write(c.root.join("x/f"), b"changed").expect("write");
        assert_ne!(before, key(&c));
    }
}
