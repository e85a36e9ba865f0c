//! `--exclude PATTERN` of directory transfers: glob patterns on paths
//! relative to the directory being copied, applied by the side that packs
//! the tar stream (the host for a push, the guest agent for a pull), so both
//! sides use this one matcher.
//!
//! Rules (those of `.gitignore` and `rsync --exclude`, the ones users know):
//!
//! * `*` matches any run of characters except `/`, `?` one character except
//!   `/`, `[abc]`, `[a-z]` and `[!a-z]` one character of (not of) a set.
//! * A pattern without a `/` matches a name at any depth: `*.o` leaves out
//!   every object file, `node_modules` every directory of that name.
//! * A pattern with a `/` matches the whole relative path: `build/*.log`,
//!   `/top-only` (a leading `/` only anchors), `**` matches any number of
//!   directories (`**/cache`; `logs/**` is what is inside `logs`).
//! * A trailing `/` matches directories only (`tmp/`).
//! * An excluded directory is left out with everything below it.

/// Most patterns accepted in one transfer.
pub const MAX_PATTERNS: usize = 256;
/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;

/// A set of exclude patterns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Excludes {
    pats: Vec<Pattern>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    /// Components, `**` kept as its own component.
    parts: Vec<String>,
    /// No `/` in the pattern: matched against the last name only.
    basename: bool,
    dir_only: bool,
}

impl Excludes {
    /// Check and compile `patterns`; the error says which one is bad.
    pub fn new(patterns: &[String]) -> Result<Excludes, String> {
        if patterns.len() > MAX_PATTERNS {
            return Err(format!(
                "{} exclude patterns; at most {MAX_PATTERNS} are accepted",
                patterns.len()
            ));
        }
        let mut pats = Vec::with_capacity(patterns.len());
        for p in patterns {
            if p.is_empty() || p.len() > MAX_PATTERN_LEN || p.contains('\0') {
                return Err(format!(
                    "exclude pattern {p:?} must be 1 to {MAX_PATTERN_LEN} bytes without NUL"
                ));
            }
            let dir_only = p.ends_with('/');
            let body = p.trim_end_matches('/');
            let anchored = body.starts_with('/');
            let body = body.trim_start_matches('/');
            if body.is_empty() {
                return Err(format!("exclude pattern {p:?} matches nothing"));
            }
            let basename = !anchored && !body.contains('/');
            let parts = body
                .split('/')
                .filter(|c| !c.is_empty() && *c != ".")
                .map(str::to_owned)
                .collect();
            pats.push(Pattern {
                parts,
                basename,
                dir_only,
            });
        }
        Ok(Excludes { pats })
    }

    pub fn is_empty(&self) -> bool {
        self.pats.is_empty()
    }

    /// Whether the entry at `rel` (relative, `/`-separated, no leading `/`)
    /// is left out. Callers skip an excluded directory's whole subtree.
    pub fn is_excluded(&self, rel: &str, is_dir: bool) -> bool {
        let comps: Vec<&str> = rel
            .split('/')
            .filter(|c| !c.is_empty() && *c != ".")
            .collect();
        let Some(last) = comps.last() else {
            return false;
        };
        self.pats.iter().any(|p| {
            if p.dir_only && !is_dir {
                return false;
            }
            if p.basename {
                component_matches(&p.parts[0], last)
            } else {
                path_matches(&p.parts, &comps)
            }
        })
    }
}

/// Match pattern components (with `**`) against path components.
fn path_matches(pat: &[String], path: &[&str]) -> bool {
    match pat.split_first() {
        None => path.is_empty(),
        // A trailing `**` matches what is inside, not the directory itself
        // (`logs/**` keeps an empty `logs`), as in .gitignore.
        Some((first, rest)) if first == "**" && rest.is_empty() => !path.is_empty(),
        Some((first, rest)) if first == "**" => {
            // `**` takes zero or more components.
            (0..=path.len()).any(|skip| path_matches(rest, &path[skip..]))
        }
        Some((first, rest)) => match path.split_first() {
            Some((name, tail)) => component_matches(first, name) && path_matches(rest, tail),
            None => false,
        },
    }
}

/// Match one name against one pattern component (`*`, `?`, `[..]`).
fn component_matches(pat: &str, name: &str) -> bool {
    let p: Vec<char> = pat.chars().collect();
    let n: Vec<char> = name.chars().collect();
    // Iterative wildcard matching with one backtrack point for `*`:
    // linear in practice, never exponential.
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() {
            match p[pi] {
                '*' => {
                    star = Some((pi, ni));
                    pi += 1;
                    continue;
                }
                '?' => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, next)) = class_matches(&p, pi, n[ni]) {
                        if matched {
                            pi = next;
                            ni += 1;
                            continue;
                        }
                    } else if n[ni] == '[' {
                        // An unclosed `[` is a literal.
                        pi += 1;
                        ni += 1;
                        continue;
                    }
                }
                '\\' if pi + 1 < p.len() && p[pi + 1] == n[ni] => {
                    pi += 2;
                    ni += 1;
                    continue;
                }
                c if c == n[ni] => {
                    pi += 1;
                    ni += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some((sp, sn)) => {
                pi = sp + 1;
                ni = sn + 1;
                star = Some((sp, sn + 1));
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// A `[...]` class at `p[start]`: whether `c` is in it and the index after
/// it, or `None` when the class is not closed.
fn class_matches(p: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(p.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < p.len() {
        if p[i] == ']' && !first {
            return Some((matched != negate, i + 1));
        }
        first = false;
        if i + 2 < p.len() && p[i + 1] == '-' && p[i + 2] != ']' {
            if p[i] <= c && c <= p[i + 2] {
                matched = true;
            }
            i += 3;
        } else {
            if p[i] == c {
                matched = true;
            }
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ex(p: &[&str]) -> Excludes {
        Excludes::new(&p.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("patterns")
    }

    #[test]
    fn names_match_at_any_depth() {
        let e = ex(&["*.o", "node_modules"]);
        assert!(e.is_excluded("a.o", false));
        assert!(e.is_excluded("src/deep/b.o", false));
        assert!(!e.is_excluded("src/b.oo", false));
        assert!(e.is_excluded("web/node_modules", true));
        assert!(!e.is_excluded("web/node_modules_x", true));
    }

    #[test]
    fn paths_anchor_and_double_star() {
        let e = ex(&["build/*.log", "/top", "**/cache", "logs/**"]);
        assert!(e.is_excluded("build/x.log", false));
        assert!(!e.is_excluded("a/build/x.log", false));
        assert!(!e.is_excluded("build/sub/x.log", false));
        assert!(e.is_excluded("top", true));
        assert!(!e.is_excluded("a/top", true));
        assert!(e.is_excluded("cache", true));
        assert!(e.is_excluded("a/b/cache", true));
        assert!(e.is_excluded("logs/a/b", false));
        assert!(!e.is_excluded("logs", true), "logs/** leaves logs itself");
    }

    #[test]
    fn dir_only_classes_and_escapes() {
        let e = ex(&["tmp/", "f[0-9]", "g[!a]", "lit\\*"]);
        assert!(e.is_excluded("a/tmp", true));
        assert!(!e.is_excluded("a/tmp", false));
        assert!(e.is_excluded("f7", false) && !e.is_excluded("fx", false));
        assert!(e.is_excluded("gb", false) && !e.is_excluded("ga", false));
        assert!(e.is_excluded("lit*", false) && !e.is_excluded("litx", false));
        assert!(ex(&["a*b*c"]).is_excluded("aXXbYYc", false));
        assert!(!ex(&["a*b*c"]).is_excluded("aXXbYY", false));
        assert!(ex(&["[ab"]).is_excluded("[ab", false));
    }

    #[test]
    fn bad_patterns_are_refused() {
        for bad in ["", "/", "a\0b"] {
            assert!(Excludes::new(&[bad.to_string()]).is_err(), "{bad:?}");
        }
        assert!(Excludes::new(&vec!["x".to_string(); MAX_PATTERNS + 1]).is_err());
        assert!(ex(&[]).is_empty() && !ex(&[]).is_excluded("a", false));
    }
}
