//! `machinen cp SRC DST`: one side on the host (or `-`), the other
//! `TARGET:/guest/path`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use machinen::error::fail;
use machinen::{ErrorCode, Result, WriteFileOptions};
use serde::Serialize;

use crate::cli::CpArgs;
use crate::output::print_json;

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A host path.
    Host(PathBuf),
    /// Standard input or output.
    Stdio,
    /// A path in a VM.
    Guest { target: String, path: String },
}

/// `TARGET:/abs` is a guest location; `-` is stdio; anything else (and
/// anything starting with `/`, `./` or `../`) is a host path. VM names never
/// contain `:`, and a guest path is absolute, so the first `:` followed by
/// `/` splits.
pub fn parse_location(s: &str) -> Location {
    if s == "-" {
        return Location::Stdio;
    }
    if s.starts_with('/') || s.starts_with("./") || s.starts_with("../") {
        return Location::Host(PathBuf::from(s));
    }
    match s.split_once(':') {
        Some((target, path)) if !target.is_empty() && path.starts_with('/') => Location::Guest {
            target: target.to_owned(),
            path: path.to_owned(),
        },
        _ => Location::Host(PathBuf::from(s)),
    }
}

fn parse_mode(s: &str) -> Result<u32> {
    match u32::from_str_radix(s.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => Ok(m),
        _ => Err(fail(
            ErrorCode::BootArgsInvalid,
            format!("--mode {s:?} is not an octal permission mode"),
        )
        .hint("e.g. --mode 644 or --mode 0755")
        .into()),
    }
}

fn base_name(p: &str) -> Option<&str> {
    Path::new(p).file_name().and_then(|n| n.to_str())
}

#[derive(Serialize)]
struct CpJson {
    from: String,
    to: String,
    bytes: u64,
    mode: Option<String>,
}

fn host_err(path: &Path, what: &str, e: std::io::Error) -> machinen::Error {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => ErrorCode::FilesNotFound,
        std::io::ErrorKind::PermissionDenied => ErrorCode::FilesPermissionDenied,
        _ if e.raw_os_error() == Some(libc_eisdir()) => ErrorCode::FilesIsDirectory,
        _ => ErrorCode::FilesIo,
    };
    fail(code, format!("{}: {what}", path.display()))
        .source(e)
        .into()
}

const fn libc_eisdir() -> i32 {
    21 // EISDIR on Linux and macOS
}

pub async fn run(a: CpArgs) -> Result<i32> {
    let src = parse_location(&a.src);
    let dst = parse_location(&a.dst);
    let mode = a.mode.as_deref().map(parse_mode).transpose()?;
    let (bytes, shown_mode) = match (&src, &dst) {
        (Location::Guest { .. }, Location::Guest { .. }) => {
            return Err(fail(ErrorCode::BootArgsInvalid, "both sides are in a VM")
                .hint("copy via the host: `machinen cp a:/x ./x && machinen cp ./x b:/x`")
                .into())
        }
        (Location::Host(_) | Location::Stdio, Location::Host(_) | Location::Stdio) => {
            return Err(fail(ErrorCode::BootArgsInvalid, "neither side is in a VM")
                .hint("write one side as TARGET:/guest/path, e.g. `machinen cp ./f web:/tmp/f`")
                .into())
        }
        (from, Location::Guest { target, path }) => {
            let vm = machinen::attach(target).await?;
            match from {
                Location::Host(p) => {
                    let file = tokio::fs::File::open(p)
                        .await
                        .map_err(|e| host_err(p, "cannot open", e))?;
                    let meta = file
                        .metadata()
                        .await
                        .map_err(|e| host_err(p, "cannot stat", e))?;
                    if meta.is_dir() {
                        return Err(fail(
                            ErrorCode::FilesIsDirectory,
                            format!("{}: is a directory; cp copies one file", p.display()),
                        )
                        .hint("pack it first, e.g. `tar czf d.tgz DIR`, then copy d.tgz")
                        .into());
                    }
                    let guest = if path.ends_with('/') {
                        format!(
                            "{path}{}",
                            base_name(&p.to_string_lossy()).unwrap_or("file")
                        )
                    } else {
                        path.clone()
                    };
                    let mode = mode.or(Some(meta.permissions().mode() & 0o7777));
                    let n = vm
                        .write_file_from(
                            &guest,
                            file,
                            WriteFileOptions {
                                mode,
                                append: a.append,
                            },
                        )
                        .await?;
                    (n, mode)
                }
                _ => {
                    if path.ends_with('/') {
                        return Err(fail(
                            ErrorCode::FilesPathInvalid,
                            format!("{path}: name the guest file when copying from stdin"),
                        )
                        .into());
                    }
                    let n = vm
                        .write_file_from(
                            path,
                            tokio::io::stdin(),
                            WriteFileOptions {
                                mode,
                                append: a.append,
                            },
                        )
                        .await?;
                    (n, mode)
                }
            }
        }
        (Location::Guest { target, path }, to) => {
            let vm = machinen::attach(target).await?;
            match to {
                Location::Host(p) => {
                    let mut dest = p.clone();
                    if a.dst.ends_with('/') || p.is_dir() {
                        dest = p.join(base_name(path).unwrap_or("file"));
                    }
                    let n = copy_out(&vm, path, &dest, mode).await?;
                    (n.0, Some(n.1))
                }
                _ => {
                    let mut out = tokio::io::stdout();
                    let mut counter = Counter {
                        inner: &mut out,
                        n: 0,
                    };
                    let info = vm.read_file_to(path, &mut counter, u64::MAX).await?;
                    (counter.n, Some(info.mode))
                }
            }
        }
    };
    if a.json {
        print_json(&CpJson {
            from: a.src.clone(),
            to: a.dst.clone(),
            bytes,
            mode: shown_mode.map(|m| format!("{m:04o}")),
        });
    } else if dst != Location::Stdio {
        eprintln!("copied {bytes} bytes: {} -> {}", a.src, a.dst);
    }
    Ok(0)
}

/// Guest file to host file: into a temporary file next to `dest`, then
/// renamed over it with the guest file's mode (or `mode`).
async fn copy_out(
    vm: &machinen::Vm,
    path: &str,
    dest: &Path,
    mode: Option<u32>,
) -> Result<(u64, u32)> {
    let parent = dest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .map_err(|e| host_err(parent, "cannot create the directory", e))?;
    let tmp = tempfile::Builder::new()
        .prefix(".machinen-cp-")
        .tempfile_in(parent)
        .map_err(|e| host_err(parent, "cannot create a temporary file", e))?;
    let std_file = tmp
        .reopen()
        .map_err(|e| host_err(tmp.path(), "cannot open the temporary file", e))?;
    let mut file = tokio::fs::File::from_std(std_file);
    let mut counter = Counter {
        inner: &mut file,
        n: 0,
    };
    let info = vm.read_file_to(path, &mut counter, u64::MAX).await?;
    let n = counter.n;
    use tokio::io::AsyncWriteExt;
    file.flush()
        .await
        .map_err(|e| host_err(dest, "write failed", e))?;
    file.sync_all()
        .await
        .map_err(|e| host_err(dest, "write failed", e))?;
    let mode = mode.unwrap_or(info.mode);
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(mode))
        .map_err(|e| host_err(dest, "cannot set the mode", e))?;
    tmp.persist(dest)
        .map_err(|e| host_err(dest, "cannot move the file into place", e.error))?;
    Ok((n, mode))
}

/// Counts what passes through.
struct Counter<'a, W> {
    inner: &'a mut W,
    n: u64,
}

impl<W: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counter<'_, W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut *self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.n += *n as u64;
        }
        r
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations() {
        assert_eq!(
            parse_location("web:/tmp/x"),
            Location::Guest {
                target: "web".into(),
                path: "/tmp/x".into()
            }
        );
        assert_eq!(
            parse_location("team/app/web:/x"),
            Location::Guest {
                target: "team/app/web".into(),
                path: "/x".into()
            }
        );
        assert_eq!(
            parse_location("1234:/x"),
            Location::Guest {
                target: "1234".into(),
                path: "/x".into()
            }
        );
        assert_eq!(parse_location("-"), Location::Stdio);
        assert_eq!(parse_location("./a:/b"), Location::Host("./a:/b".into()));
        assert_eq!(
            parse_location("/abs/file"),
            Location::Host("/abs/file".into())
        );
        assert_eq!(
            parse_location("file.txt"),
            Location::Host("file.txt".into())
        );
        assert_eq!(
            parse_location("c:relative"),
            Location::Host("c:relative".into())
        );
        assert_eq!(parse_mode("755").expect("mode"), 0o755);
        assert!(parse_mode("9").is_err() && parse_mode("77777").is_err());
    }
}
