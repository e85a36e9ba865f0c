//! `machinen cp SRC DST`: one side on the host (or `-`), the other
//! `TARGET:/guest/path`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use machinen::error::fail;
use machinen::{DiskReserve, ErrorCode, ReadFileOptions, Result, WriteFileOptions};
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
    /// Entries of a directory copy (`-r`).
    #[serde(skip_serializing_if = "Option::is_none")]
    entries: Option<u64>,
}

fn dir_needs_r(what: &str) -> machinen::Error {
    fail(
        ErrorCode::FilesIsDirectory,
        format!("{what} is a directory (not copied)"),
    )
    .hint("add -r to copy a directory tree, e.g. `machinen cp -r ./src web:/srv/src`")
    .into()
}

/// The name a copy keeps when its destination is a directory.
fn keep_name(p: &Path) -> String {
    base_name(&p.to_string_lossy())
        .map(str::to_owned)
        .or_else(|| {
            std::fs::canonicalize(p)
                .ok()
                .and_then(|c| c.file_name().map(|n| n.to_string_lossy().into_owned()))
        })
        .unwrap_or_else(|| "dir".to_owned())
}

/// `cp -r` of a directory: `Some((entries, bytes))`, or `None` when SRC
/// turned out to be a file (then the file copy runs, as `cp -r FILE` does).
async fn copy_dir(
    a: &CpArgs,
    src: &Location,
    dst: &Location,
    max_bytes: u64,
) -> Result<Option<(u64, u64)>> {
    match (src, dst) {
        (Location::Host(p), Location::Guest { target, path }) => {
            let meta = tokio::fs::metadata(p)
                .await
                .map_err(|e| host_err(p, "cannot stat", e))?;
            if !meta.is_dir() {
                return Ok(None);
            }
            let guest = if path.ends_with('/') {
                format!("{path}{}", keep_name(p))
            } else {
                path.clone()
            };
            let vm = machinen::attach(target).await?;
            let opts = machinen::PushDirOptions {
                exclude: a.exclude.clone(),
            };
            let r = interruptible(vm.push_dir(p, &guest, opts)).await?;
            Ok(Some((r.entries, r.bytes)))
        }
        (Location::Guest { target, path }, Location::Host(p)) => {
            let vm = machinen::attach(target).await?;
            let mut dest = p.clone();
            if a.dst.ends_with('/') || p.is_dir() {
                dest = p.join(base_name(path.trim_end_matches('/')).unwrap_or("dir"));
            }
            let opts = machinen::PullDirOptions {
                exclude: a.exclude.clone(),
                max_bytes,
                reserve: DiskReserve::from_env()?,
            };
            match interruptible(vm.pull_dir(path, &dest, opts)).await {
                Ok(r) => Ok(Some((r.entries, r.bytes))),
                Err(e) if e.code() == ErrorCode::FilesNotADirectory => Ok(None),
                Err(e) => Err(e),
            }
        }
        (Location::Stdio, _) | (_, Location::Stdio) => Err(fail(
            ErrorCode::BootArgsInvalid,
            "a directory copy (-r) needs a path on both sides, not `-`",
        )
        .hint("e.g. `machinen cp -r ./dir web:/srv/dir`")
        .into()),
        _ => Ok(None),
    }
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
    let max_bytes = match &a.max_size {
        Some(s) => machinen::hostfile::parse_max_size(s)?,
        None => machinen::hostfile::DEFAULT_MAX_BYTES,
    };
    let guest_sides = matches!(
        (&src, &dst),
        (Location::Guest { .. }, Location::Host(_) | Location::Stdio)
            | (Location::Host(_) | Location::Stdio, Location::Guest { .. })
    );
    if a.recursive && guest_sides {
        if let Some((entries, bytes)) = copy_dir(&a, &src, &dst, max_bytes).await? {
            if a.json {
                print_json(&CpJson {
                    from: a.src.clone(),
                    to: a.dst.clone(),
                    bytes,
                    mode: None,
                    entries: Some(entries),
                });
            } else {
                eprintln!(
                    "copied {entries} entries, {bytes} bytes of file data: {} -> {}",
                    a.src, a.dst
                );
            }
            return Ok(0);
        }
    }
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
                        return Err(dir_needs_r(&p.display().to_string()));
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
                    let opts = ReadFileOptions {
                        max_bytes,
                        reserve: DiskReserve::from_env()?,
                        mode,
                    };
                    let (n, mode) = interruptible(vm.read_file_to_path(path, &dest, opts))
                        .await
                        .map_err(|e| match e.code() {
                            ErrorCode::FilesIsDirectory if !a.recursive => {
                                dir_needs_r(&format!("{target}:{path}"))
                            }
                            _ => e,
                        })?;
                    (n, Some(mode))
                }
                _ => {
                    let mut out = tokio::io::stdout();
                    let mut counter = Counter {
                        inner: &mut out,
                        n: 0,
                    };
                    let info =
                        interruptible(vm.read_file_to(path, &mut counter, max_bytes)).await?;
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
            entries: None,
        });
    } else if dst != Location::Stdio {
        eprintln!("copied {bytes} bytes: {} -> {}", a.src, a.dst);
    }
    Ok(0)
}

/// Run `copy` unless SIGINT, SIGTERM or SIGHUP arrives first: then it is
/// dropped, which removes its unfinished file (the default action of those
/// signals would end the process before any cleanup).
async fn interruptible<T>(copy: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    use tokio::signal::unix::{signal, SignalKind};
    let watch = |k: SignalKind| {
        signal(k).map_err(|e| {
            machinen::Error::from(fail(ErrorCode::Io, "cannot watch for signals").source(e))
        })
    };
    let (mut int, mut term, mut hup) = (
        watch(SignalKind::interrupt())?,
        watch(SignalKind::terminate())?,
        watch(SignalKind::hangup())?,
    );
    let name = tokio::select! {
        r = copy => return r,
        _ = int.recv() => "SIGINT",
        _ = term.recv() => "SIGTERM",
        _ = hup.recv() => "SIGHUP",
    };
    Err(fail(
        ErrorCode::Interrupted,
        format!("the copy was interrupted by {name}; nothing was written"),
    )
    .hint("run it again to copy the file")
    .into())
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
