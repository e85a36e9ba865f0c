//! `--copy HOST:GUEST`: a tar stream made on the host, unpacked by `tar -x`
//! in the guest over one exec's stdin. Files keep their modes and mtimes and
//! become root-owned (like `COPY` in a Dockerfile); symlinks inside a copied
//! directory stay symlinks.

use std::fs::{self, File, Metadata};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::ProvisionError;
use crate::error::Result;
use crate::vm::{ExecOptions, Vm};

/// One host → guest copy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CopySpec {
    /// A file or a directory on the host.
    pub host: PathBuf,
    /// Absolute guest path. A directory's *contents* go into it (created
    /// when missing); a file becomes it, or goes into it when it ends with
    /// `/` or is an existing guest directory.
    pub guest: String,
}

impl CopySpec {
    /// Parse `HOST:GUEST`. GUEST must be absolute; the split is at the last
    /// `:` followed by `/`, so host paths may contain colons.
    pub fn parse(s: &str) -> Result<CopySpec, ProvisionError> {
        let invalid = |m: String| ProvisionError::InvalidArgs {
            message: m,
            hint: "write --copy HOST:GUEST with an absolute GUEST, e.g. --copy ./app:/app".into(),
        };
        let Some(i) = s.rfind(":/") else {
            return Err(match s.rfind(':') {
                Some(_) => invalid(format!("--copy {s:?}: the guest path is not absolute")),
                None => invalid(format!("--copy {s:?} is not HOST:GUEST")),
            });
        };
        let (host, guest) = (&s[..i], &s[i + 1..]);
        if host.is_empty() {
            return Err(invalid(format!("--copy {s:?} names no host path")));
        }
        CopySpec::new(host, guest)
    }

    pub fn new(
        host: impl Into<PathBuf>,
        guest: impl Into<String>,
    ) -> Result<CopySpec, ProvisionError> {
        let guest = guest.into();
        if !guest.starts_with('/') || guest.contains('\0') {
            return Err(ProvisionError::InvalidArgs {
                message: format!("guest path {guest:?} is not absolute"),
                hint: "give the destination as an absolute guest path, e.g. /app".into(),
            });
        }
        Ok(CopySpec {
            host: host.into(),
            guest,
        })
    }
}

fn dirname(p: &str) -> String {
    match p.trim_end_matches('/').rsplit_once('/') {
        Some(("", _)) | None => "/".into(),
        Some((d, _)) => d.into(),
    }
}

fn basename(p: &str) -> String {
    p.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// What goes where: the guest directory to unpack in, and for a single file
/// the member name.
fn plan(spec: &CopySpec, host_is_dir: bool, guest_is_dir: bool) -> (String, Option<String>) {
    if host_is_dir {
        return (spec.guest.clone(), None);
    }
    let file_name = spec
        .host
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    if spec.guest.ends_with('/') || guest_is_dir || spec.guest == "/" {
        (spec.guest.clone(), Some(file_name))
    } else {
        (dirname(&spec.guest), Some(basename(&spec.guest)))
    }
}

/// Copy `spec.host` into the guest (see [`CopySpec`]).
pub async fn copy_into(vm: &Vm, spec: &CopySpec) -> Result<()> {
    let host_meta = fs::metadata(&spec.host).map_err(|source| ProvisionError::CopySource {
        path: spec.host.clone(),
        source,
    })?;
    if !host_meta.is_dir() && !host_meta.is_file() {
        return Err(ProvisionError::CopySource {
            path: spec.host.clone(),
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "not a regular file or directory",
            ),
        }
        .into());
    }
    let guest_is_dir = if host_meta.is_dir() || spec.guest.ends_with('/') {
        false
    } else {
        let probe = ExecOptions {
            argv: vec!["test".into(), "-d".into(), spec.guest.clone()],
            ..Default::default()
        };
        vm.exec(probe).await?.status.code == Some(0)
    };
    let (dir, member) = plan(spec, host_meta.is_dir(), guest_is_dir);

    let src = spec.host.clone();
    tar_into_guest(vm, &dir, &[], &spec.host, &spec.guest, move |w| {
        write_tar(w, &src, member.as_deref())
    })
    .await
}

/// Unpack the tar `produce` writes (on a blocking thread) into the guest
/// directory `dir` (created when missing) with GNU tar, as root; `flags`
/// go to `tar -x` (e.g. `-z` for a gzip stream). `host` and `guest` name
/// the copy in errors.
pub(crate) async fn tar_into_guest<F>(
    vm: &Vm,
    dir: &str,
    flags: &[&str],
    host: &Path,
    guest: &str,
    produce: F,
) -> Result<()>
where
    F: FnOnce(io::BufWriter<std::os::unix::net::UnixStream>) -> io::Result<()> + Send + 'static,
{
    let source_err = |source: io::Error| ProvisionError::CopySource {
        path: host.to_path_buf(),
        source,
    };
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().map_err(source_err)?;
    theirs.set_nonblocking(true).map_err(source_err)?;
    let stdin = tokio::net::UnixStream::from_std(theirs).map_err(source_err)?;
    let producer = tokio::task::spawn_blocking(move || -> io::Result<()> {
        produce(io::BufWriter::with_capacity(1 << 20, ours))
    });
    let script = r#"d=$1; shift; mkdir -p -- "$d" && cd -- "$d" && exec tar -x -p --no-overwrite-dir "$@" -f -"#;
    let mut argv: Vec<String> = ["sh", "-c", script, "sh", dir].map(String::from).to_vec();
    argv.extend(flags.iter().map(|f| f.to_string()));
    let mut stdout = Vec::new();
    let mut stderr = Vec::new();
    let status = vm
        .exec_stream(
            ExecOptions {
                argv,
                ..Default::default()
            },
            stdin,
            &mut stdout,
            &mut stderr,
        )
        .await;
    let produced = producer
        .await
        .map_err(|e| source_err(io::Error::other(e)))?;
    let status = status?;
    if status.code != Some(0) {
        return Err(ProvisionError::CopyFailed {
            host: host.to_path_buf(),
            guest: guest.to_string(),
            status,
            stderr: crate::assets::tool::stderr_tail(&stderr),
        }
        .into());
    }
    produced.map_err(source_err)?;
    Ok(())
}

/// Write a tar of `src` to `w`: the single file `src` named `member`, or
/// (`member` = `None`) the contents of the directory `src`.
pub(crate) fn write_tar(w: impl Write, src: &Path, member: Option<&str>) -> io::Result<()> {
    let mut b = tar::Builder::new(w);
    match member {
        Some(name) => {
            let meta = fs::metadata(src)?;
            append(&mut b, src, Path::new(name), &meta)?;
        }
        None => walk(&mut b, src, Path::new(""))?,
    }
    b.into_inner()?.flush()
}

fn walk<W: Write>(b: &mut tar::Builder<W>, dir: &Path, rel: &Path) -> io::Result<()> {
    let mut entries: Vec<_> = fs::read_dir(dir)?.collect::<io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        let name = rel.join(e.file_name());
        let meta = fs::symlink_metadata(&path)?;
        append(b, &path, &name, &meta)?;
        if meta.is_dir() {
            walk(b, &path, &name)?;
        }
    }
    Ok(())
}

fn append<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    meta: &Metadata,
) -> io::Result<()> {
    append_as(b, path, name, meta, &Attrs::default())
}

/// Who owns what a copy writes and with which mode (`COPY --chown`,
/// `--chmod`); root with the host's modes by default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Attrs {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits for every file and directory copied.
    pub mode: Option<u32>,
}

/// Append `path` (file, directory or symlink; not followed) as `name`.
pub(crate) fn append_as<W: Write>(
    b: &mut tar::Builder<W>,
    path: &Path,
    name: &Path,
    meta: &Metadata,
    attrs: &Attrs,
) -> io::Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(meta, tar::HeaderMode::Complete);
    h.set_uid(attrs.uid.into());
    h.set_gid(attrs.gid.into());
    // GNU tar prefers names it finds in the guest over the ids; root's
    // are everywhere, other ids go by number.
    if attrs.uid == 0 {
        h.set_username("root")?;
    }
    if attrs.gid == 0 {
        h.set_groupname("root")?;
    }
    let ft = meta.file_type();
    if let Some(mode) = attrs.mode.filter(|_| !ft.is_symlink()) {
        h.set_mode(mode & 0o7777);
    }
    if ft.is_dir() {
        h.set_size(0);
        b.append_data(&mut h, name, io::empty())
    } else if ft.is_file() {
        let size = meta.len();
        let mut f = File::open(path)?.take(size);
        let mut counted = CountingReader {
            inner: &mut f,
            n: 0,
        };
        b.append_data(&mut h, name, &mut counted)?;
        if counted.n != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{} changed size while being copied", path.display()),
            ));
        }
        Ok(())
    } else if ft.is_symlink() {
        let target = fs::read_link(path)?;
        h.set_size(0);
        b.append_link(&mut h, name, target)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} is not a file, directory or symlink", path.display()),
        ))
    }
}

struct CountingReader<'a, R> {
    inner: &'a mut R,
    n: u64,
}

impl<R: Read> Read for CountingReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n += k as u64;
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_copy_specs() {
        let c = CopySpec::parse("./app:/app").expect("ok");
        assert_eq!((c.host, c.guest.as_str()), (PathBuf::from("./app"), "/app"));
        let c = CopySpec::parse("a:b:/x/y").expect("colon in host");
        assert_eq!((c.host, c.guest.as_str()), (PathBuf::from("a:b"), "/x/y"));
        assert!(matches!(
            CopySpec::parse("a:rel"),
            Err(ProvisionError::InvalidArgs { .. })
        ));
        assert!(matches!(
            CopySpec::parse("nocolon"),
            Err(ProvisionError::InvalidArgs { .. })
        ));
        assert!(matches!(
            CopySpec::parse(":/x"),
            Err(ProvisionError::InvalidArgs { .. })
        ));
    }

    #[test]
    fn plans() {
        let f = CopySpec::new("/h/prog", "/usr/local/bin/tool").expect("ok");
        assert_eq!(
            plan(&f, false, false),
            ("/usr/local/bin".into(), Some("tool".into()))
        );
        assert_eq!(
            plan(&f, false, true),
            ("/usr/local/bin/tool".into(), Some("prog".into()))
        );
        let f = CopySpec::new("/h/prog", "/opt/").expect("ok");
        assert_eq!(
            plan(&f, false, false),
            ("/opt/".into(), Some("prog".into()))
        );
        let f = CopySpec::new("/h/prog", "/top").expect("ok");
        assert_eq!(plan(&f, false, false), ("/".into(), Some("top".into())));
        let d = CopySpec::new("/h/dir", "/app").expect("ok");
        assert_eq!(plan(&d, true, false), ("/app".into(), None));
    }

    #[test]
    fn tar_of_a_directory_keeps_modes_links_and_makes_root_owned() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let src = dir.path().join("src");
        fs::create_dir_all(src.join("sub")).expect("mkdir");
        fs::write(src.join("run.sh"), b"#!/bin/sh\necho hi\n").expect("write");
        fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o750)).expect("chmod");
        fs::write(src.join("sub/secret"), b"s").expect("write");
        fs::set_permissions(src.join("sub/secret"), fs::Permissions::from_mode(0o600))
            .expect("chmod");
        std::os::unix::fs::symlink("run.sh", src.join("link")).expect("symlink");
        let long = "n".repeat(150);
        fs::write(src.join("sub").join(&long), b"long").expect("write");

        let mut out = Vec::new();
        write_tar(&mut out, &src, None).expect("tar");
        let mut a = tar::Archive::new(out.as_slice());
        let mut seen = Vec::new();
        for e in a.entries().expect("entries") {
            let e = e.expect("entry");
            let h = e.header();
            assert_eq!((h.uid().expect("uid"), h.gid().expect("gid")), (0, 0));
            let name = e.path().expect("path").to_string_lossy().into_owned();
            let mode = h.mode().expect("mode") & 0o7777;
            match name.as_str() {
                "run.sh" => assert_eq!(mode, 0o750),
                "sub/secret" => assert_eq!(mode, 0o600),
                "link" => assert_eq!(
                    e.link_name().expect("link").expect("some").to_str(),
                    Some("run.sh")
                ),
                _ => {}
            }
            seen.push(name);
        }
        assert_eq!(
            seen,
            vec![
                "link".to_string(),
                "run.sh".into(),
                "sub".into(),
                format!("sub/{long}"),
                "sub/secret".into()
            ]
        );

        let mut one = Vec::new();
        write_tar(&mut one, &src.join("run.sh"), Some("tool")).expect("tar");
        let mut a = tar::Archive::new(one.as_slice());
        let names: Vec<String> = a
            .entries()
            .expect("e")
            .map(|e| {
                e.expect("e")
                    .path()
                    .expect("p")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        assert_eq!(names, vec!["tool"]);
    }
}
