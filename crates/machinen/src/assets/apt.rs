//! What install needs from the host's apt: which suite the host runs, which
//! real package the cloud kernel meta package points at, the host's package
//! sources (handed to mmdebstrap so that no archive host is ever named by
//! machinen itself) and the host's proxy settings.

use std::path::Path;

/// The Debian suite to build guests from when the host does not say.
pub(crate) const DEFAULT_SUITE: &str = "bookworm";

/// The suite codename of a Debian host from `/etc/os-release` text, if the
/// host is Debian. Derivatives (Ubuntu …) have codenames Debian's archive
/// does not know, so they get `None` and the caller falls back.
pub(crate) fn debian_codename(os_release: &str) -> Option<String> {
    let mut id = None;
    let mut codename = None;
    for line in os_release.lines() {
        let Some((k, v)) = line.trim().split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches(|c| c == '"' || c == '\'').to_string();
        match k.trim() {
            "ID" => id = Some(v),
            "VERSION_CODENAME" => codename = Some(v),
            _ => {}
        }
    }
    match (id.as_deref(), codename) {
        (Some("debian"), Some(c))
            if !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '-') =>
        {
            Some(c)
        }
        _ => None,
    }
}

/// The host's suite: `/etc/os-release`'s codename on Debian, else bookworm.
pub(crate) fn host_suite() -> String {
    ["/etc/os-release", "/usr/lib/os-release"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| debian_codename(&t))
        .unwrap_or_else(|| DEFAULT_SUITE.to_string())
}

/// The meta package that always points at the current cloud kernel.
pub(crate) fn kernel_meta_package(arch: &str) -> String {
    format!("linux-image-cloud-{arch}")
}

/// The real kernel package from `apt-cache depends linux-image-cloud-<arch>`
/// output (the candidate's dependencies), e.g.
/// `  Depends: linux-image-6.1.0-56-cloud-amd64`.
pub(crate) fn kernel_package_from_depends(output: &str, arch: &str) -> Option<String> {
    let suffix = format!("-cloud-{arch}");
    output.lines().find_map(|line| {
        let line = line.trim().trim_start_matches('|');
        let dep = line.strip_prefix("Depends:")?.trim();
        let dep = dep.trim_start_matches('<').trim_end_matches('>');
        let name = dep.split_whitespace().next()?;
        (name.starts_with("linux-image-")
            && name.ends_with(&suffix)
            && name != kernel_meta_package(arch))
        .then(|| name.to_string())
    })
}

/// The kernel release (`uname -r`) a kernel image package is named after:
/// `linux-image-6.1.0-56-cloud-amd64` → `6.1.0-56-cloud-amd64`. Debian
/// names its signed/unsigned twins `…-unsigned`; that suffix is not part of
/// the release.
pub(crate) fn kernel_release_from_package(pkg: &str) -> Option<&str> {
    let rel = pkg.strip_prefix("linux-image-")?;
    let rel = rel.strip_suffix("-unsigned").unwrap_or(rel);
    (!rel.is_empty() && rel.starts_with(|c: char| c.is_ascii_digit())).then_some(rel)
}

/// Whether apt's answer means it has no package lists at all (a fresh
/// machine where `apt-get update` never ran), as opposed to a real error.
pub(crate) fn looks_like_missing_lists(stderr: &str) -> bool {
    stderr.contains("No packages found")
        || stderr.contains("Unable to locate package")
        || stderr.contains("has no installation candidate")
        || stderr.contains("Couldn't find any package")
}

/// One `deb` source: URI, one suite, components and one-line options
/// (`[signed-by=…]`), as apt's one-line format carries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub uri: String,
    pub suite: String,
    pub components: Vec<String>,
    /// Content of the `[...]` option block, without brackets; may be empty.
    pub options: String,
}

impl Source {
    /// The entry as a one-line `sources.list` line, the form mmdebstrap
    /// accepts as a MIRROR argument.
    pub fn one_line(&self) -> String {
        let opts = if self.options.is_empty() {
            String::new()
        } else {
            format!("[{}] ", self.options)
        };
        format!(
            "deb {opts}{} {} {}",
            self.uri,
            self.suite,
            self.components.join(" ")
        )
    }
}

/// `deb` entries of a one-line format `sources.list`.
pub(crate) fn parse_one_line_sources(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let Some(rest) = line
            .strip_prefix("deb ")
            .or_else(|| line.strip_prefix("deb\t"))
        else {
            continue;
        };
        let rest = rest.trim_start();
        let (options, rest) = match rest.strip_prefix('[') {
            Some(r) => match r.split_once(']') {
                Some((o, r)) => (o.trim().to_string(), r),
                None => continue,
            },
            None => (String::new(), rest),
        };
        let mut words = rest.split_whitespace();
        let (Some(uri), Some(suite)) = (words.next(), words.next()) else {
            continue;
        };
        out.push(Source {
            uri: uri.to_string(),
            suite: suite.to_string(),
            components: words.map(str::to_string).collect(),
            options,
        });
    }
    out
}

/// `deb` entries of a deb822 `.sources` file, one per (URI, suite).
/// `Signed-By` is carried when it names a keyring file; an inline key block
/// cannot be expressed in the one-line format, so it is dropped and
/// mmdebstrap falls back to the host's trusted keyrings.
pub(crate) fn parse_deb822_sources(text: &str) -> Vec<Source> {
    let mut out = Vec::new();
    for stanza in deb822_stanzas(text) {
        let get = |k: &str| {
            stanza
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
        };
        if !get("Types")
            .unwrap_or("")
            .split_whitespace()
            .any(|t| t == "deb")
        {
            continue;
        }
        if get("Enabled").is_some_and(|v| v.trim().eq_ignore_ascii_case("no")) {
            continue;
        }
        let mut opts = Vec::new();
        if let Some(sb) = get("Signed-By") {
            let sb = sb.trim();
            if !sb.contains('\n') && sb.starts_with('/') {
                opts.push(format!("signed-by={sb}"));
            }
        }
        if let Some(a) = get("Architectures") {
            opts.push(format!(
                "arch={}",
                a.split_whitespace().collect::<Vec<_>>().join(",")
            ));
        }
        let components: Vec<String> = get("Components")
            .unwrap_or("")
            .split_whitespace()
            .map(str::to_string)
            .collect();
        for uri in get("URIs").unwrap_or("").split_whitespace() {
            for suite in get("Suites").unwrap_or("").split_whitespace() {
                out.push(Source {
                    uri: uri.to_string(),
                    suite: suite.to_string(),
                    components: components.clone(),
                    options: opts.join(" "),
                });
            }
        }
    }
    out
}

/// deb822 paragraphs as (field, value) lists; continuation lines are joined
/// with newlines, comments skipped.
fn deb822_stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut stanzas = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !cur.is_empty() {
                stanzas.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some((_, v)) = cur.last_mut() {
                v.push('\n');
                v.push_str(line.trim());
            }
            continue;
        }
        if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        stanzas.push(cur);
    }
    stanzas
}

/// Whether `suite` belongs to the release `codename` (the release itself,
/// its updates and its security suites).
pub(crate) fn suite_belongs_to(suite: &str, codename: &str) -> bool {
    let suite = suite.trim_end_matches('/');
    suite == codename
        || suite.strip_prefix(codename).is_some_and(|rest| {
            matches!(
                rest,
                "-updates" | "-security" | "/updates" | "-proposed-updates"
            )
        })
}

/// The host's enabled `deb` sources for `codename`, from `/etc/apt`
/// (`sources.list` and `sources.list.d/*.list|*.sources`), in apt's order.
/// Local-media sources (`cdrom:`) are left out: they are not reachable from
/// inside mmdebstrap's chroot.
pub(crate) fn host_sources(etc_apt: &Path, codename: &str) -> Vec<Source> {
    let mut all = Vec::new();
    if let Ok(t) = std::fs::read_to_string(etc_apt.join("sources.list")) {
        all.extend(parse_one_line_sources(&t));
    }
    let mut parts: Vec<_> = std::fs::read_dir(etc_apt.join("sources.list.d"))
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    parts.sort();
    for p in parts {
        let Ok(t) = std::fs::read_to_string(&p) else {
            continue;
        };
        match p.extension().and_then(|e| e.to_str()) {
            Some("list") => all.extend(parse_one_line_sources(&t)),
            Some("sources") => all.extend(parse_deb822_sources(&t)),
            _ => {}
        }
    }
    let mut out: Vec<Source> = Vec::new();
    for s in all {
        if suite_belongs_to(&s.suite, codename) && !s.uri.starts_with("cdrom:") && !out.contains(&s)
        {
            out.push(s);
        }
    }
    out
}

/// Proxy settings from `apt-config dump` output, as `--aptopt` values, so
/// that mmdebstrap's own apt reaches the archive the way the host's does.
pub(crate) fn proxy_options(apt_config_dump: &str) -> Vec<String> {
    apt_config_dump
        .lines()
        .map(str::trim)
        .filter(|l| {
            let key = l
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_lowercase();
            key.starts_with("acquire::http::proxy") || key.starts_with("acquire::https::proxy")
        })
        .filter(|l| !l.ends_with("\"\";"))
        .map(str::to_string)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn os_release_codename() {
        let deb = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION_CODENAME=bookworm\nID=debian\n";
        assert_eq!(debian_codename(deb).as_deref(), Some("bookworm"));
        let ubuntu = "ID=ubuntu\nID_LIKE=debian\nVERSION_CODENAME=jammy\n";
        assert_eq!(debian_codename(ubuntu), None);
        assert_eq!(debian_codename("ID=debian\n"), None);
        assert_eq!(
            debian_codename("ID=debian\nVERSION_CODENAME=\"trixie\"\n").as_deref(),
            Some("trixie")
        );
        assert_eq!(debian_codename("ID=debian\nVERSION_CODENAME=a;rm\n"), None);
    }

    #[test]
    fn kernel_package_from_apt_cache_depends() {
        let out = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            kernel_package_from_depends(out, "amd64").as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alt = "linux-image-cloud-arm64\n |Depends: <linux-image-6.12.1-cloud-arm64>\n  Depends: other\n";
        assert_eq!(
            kernel_package_from_depends(alt, "arm64").as_deref(),
            Some("linux-image-6.12.1-cloud-arm64")
        );
        assert_eq!(
            kernel_package_from_depends("linux-image-cloud-amd64\n", "amd64"),
            None
        );
        assert_eq!(
            kernel_package_from_depends("  Depends: linux-image-6.1.0-56-amd64\n", "amd64"),
            None
        );
    }

    #[test]
    fn kernel_release_names() {
        assert_eq!(
            kernel_release_from_package("linux-image-6.1.0-56-cloud-amd64"),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            kernel_release_from_package("linux-image-6.12.12+deb13-cloud-amd64-unsigned"),
            Some("6.12.12+deb13-cloud-amd64")
        );
        assert_eq!(kernel_release_from_package("linux-image-cloud-amd64"), None);
        assert_eq!(kernel_release_from_package("bash"), None);
    }

    #[test]
    fn one_line_sources() {
        let t = "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main contrib # tail\n\
                 deb-src http://a.example/debian bookworm main\n deb http://b.example/d bookworm-security main\ndeb broken\n";
        let s = parse_one_line_sources(t);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].options, "arch=amd64 signed-by=/k.gpg");
        assert_eq!(s[0].components, vec!["main", "contrib"]);
        assert_eq!(
            s[0].one_line(),
            "deb [arch=amd64 signed-by=/k.gpg] http://a.example/debian bookworm main contrib"
        );
        assert_eq!(
            s[1].one_line(),
            "deb http://b.example/d bookworm-security main"
        );
    }

    #[test]
    fn deb822_sources() {
        let t = "Types: deb deb-src\nURIs: http://a.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\
                 Signed-By: /usr/share/keyrings/k.gpg\n\n# c\nTypes: deb\nURIs: http://s.example/sec\nSuites: bookworm-security\n\
                 Components: main\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n abc\n\n\
                 Types: deb\nEnabled: no\nURIs: http://off.example\nSuites: bookworm\nComponents: main\n\n\
                 Types: deb-src\nURIs: http://src.example\nSuites: bookworm\nComponents: main\n";
        let s = parse_deb822_sources(t);
        assert_eq!(s.len(), 3, "{s:?}");
        assert_eq!(
            s[0].one_line(),
            "deb [signed-by=/usr/share/keyrings/k.gpg] http://a.example/debian bookworm main"
        );
        assert_eq!(s[1].suite, "bookworm-updates");
        assert_eq!(
            s[2].one_line(),
            "deb http://s.example/sec bookworm-security main"
        );
    }

    #[test]
    fn suites_of_a_release() {
        assert!(suite_belongs_to("bookworm", "bookworm"));
        assert!(suite_belongs_to("bookworm-security", "bookworm"));
        assert!(suite_belongs_to("bookworm-updates", "bookworm"));
        assert!(!suite_belongs_to("bookworm-backports", "bookworm"));
        assert!(!suite_belongs_to("trixie", "bookworm"));
        assert!(!suite_belongs_to("stable", "bookworm"));
    }

    #[test]
    fn host_sources_from_a_fake_etc_apt() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://x.example/debian bookworm main\n",
        )
        .expect("w");
        std::fs::create_dir(dir.path().join("sources.list.d")).expect("mkdir");
        std::fs::write(
            dir.path().join("sources.list.d/a.sources"),
            "Types: deb\nURIs: http://x.example/debian\nSuites: bookworm bookworm-backports\nComponents: main\n",
        )
        .expect("w");
        std::fs::write(
            dir.path().join("sources.list.d/b.list.disabled"),
            "deb http://y.example bookworm main\n",
        )
        .expect("w");
        std::fs::write(
            dir.path().join("sources.list.d/c.list"),
            "deb cdrom:[x]/ bookworm main\n",
        )
        .expect("w");
        let s = host_sources(dir.path(), "bookworm");
        assert_eq!(
            s.iter().map(Source::one_line).collect::<Vec<_>>(),
            vec!["deb http://x.example/debian bookworm main"]
        );
    }

    #[test]
    fn missing_lists_messages() {
        assert!(looks_like_missing_lists("E: No packages found\n"));
        assert!(looks_like_missing_lists(
            "E: Unable to locate package linux-image-cloud-amd64"
        ));
        assert!(!looks_like_missing_lists(
            "E: Could not get lock /var/lib/apt/lists/lock"
        ));
    }

    #[test]
    fn proxies_from_apt_config() {
        let dump = "Acquire::http::Proxy \"http://proxy.example:3128\";\nAcquire::Languages \"none\";\n\
                    Acquire::https::Proxy \"\";\nAcquire::http::Proxy::mirror.example \"DIRECT\";\n";
        assert_eq!(
            proxy_options(dump),
            vec![
                "Acquire::http::Proxy \"http://proxy.example:3128\";",
                "Acquire::http::Proxy::mirror.example \"DIRECT\";"
            ]
        );
    }
}
