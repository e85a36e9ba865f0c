//! `Request::PushDir` and `Request::PullDir`: directory trees in and out
//! of the guest as one tar stream over one protocol stream.
//!
//! ```text
//! -> Request(PushDir { path, mode })      (read by the dispatcher)
//! -> Data* Eof                            (one tar stream)
//! <- Response(DirWritten { entries, bytes }) | Error { code: FILES_*, .. }
//!
//! -> Request(PullDir { path, exclude })
//! <- Response(DirInfo { mode, entries, bytes }) Data* Eof | Error
//! ```
//!
//! The agent is root in its own VM and confines nothing beyond what the
//! `tar` crate's `unpack_in` does (no `..`, nothing written through a
//! symlink out of the directory); the host confines what it unpacks from
//! a guest. Packing never follows a symlink: links travel as links. All
//! file I/O runs on the blocking pool at a lower priority, like
//! [`crate::files`].

use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use machinen_proto::chan::{ChanReader, ChanWriter};
use machinen_proto::exclude::Excludes;
use machinen_proto::tree::{self, Kind};
use machinen_proto::{
    read_frame, send, DirInfo, Frame, PullDirRequest, PushDirRequest, Response, WireError,
    MAX_CHUNK,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::files::{blocking, code, err, fail, io_error, Background, QUEUE};
use crate::log::debug;

/// Check a guest directory path from the host: absolute, no NUL (`/` is
/// allowed: the agent is root in its own VM).
fn check_dir(path: &str) -> Result<PathBuf, WireError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(err(
            code::PATH_INVALID,
            format!("{path:?}: the guest directory must be an absolute path without NUL"),
        ));
    }
    Ok(PathBuf::from(path))
}

/// Create `dir` (and its parents) unless it exists; it must be a directory.
fn prepare_dest(dir: &Path, mode: Option<u32>) -> Result<(), WireError> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => return Ok(()),
        Ok(_) => {
            return Err(err(
                code::NOT_A_DIRECTORY,
                format!("{}: exists and is not a directory", dir.display()),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error(dir, "cannot stat", &e)),
    }
    std::fs::create_dir_all(dir).map_err(|e| io_error(dir, "cannot create the directory", &e))?;
    if let Some(m) = mode {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(m & 0o7777))
            .map_err(|e| io_error(dir, "cannot set the mode", &e))?;
    }
    Ok(())
}

/// Unpack one tar stream into `dest`: entries and regular-file bytes.
fn unpack(reader: ChanReader, dest: &Path) -> Result<(u64, u64), WireError> {
    let _nice = Background::enter();
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_preserve_mtime(true);
    ar.set_overwrite(true);
    ar.set_unpack_xattrs(false);
    let (mut entries, mut bytes) = (0u64, 0u64);
    // Directory mtimes change as their entries are written: set them last.
    let mut dir_times = Vec::new();
    let bad = |e: io::Error| io_error(dest, "unpacking the tar stream failed", &e);
    for entry in ar.entries().map_err(bad)? {
        let mut e = entry.map_err(bad)?;
        let kind = e.header().entry_type();
        let rel = e.path().map_err(bad)?.into_owned();
        if kind.is_file() {
            bytes += e.size();
        }
        if kind.is_dir() {
            if let Ok(t) = e.header().mtime() {
                dir_times.push((dest.join(&rel), t));
            }
        }
        if !e
            .unpack_in(dest)
            .map_err(|x| io_error(&dest.join(&rel), "cannot unpack", &x))?
        {
            debug!(
                "dirs: {}: skipped (it would leave the directory)",
                rel.display()
            );
            continue;
        }
        entries += 1;
    }
    for (dir, t) in dir_times.into_iter().rev() {
        let ts = nix::sys::time::TimeSpec::new(t as i64, 0);
        let _ = nix::sys::stat::utimensat(
            None,
            &dir,
            &ts,
            &ts,
            nix::sys::stat::UtimensatFlags::NoFollowSymlink,
        );
    }
    Ok((entries, bytes))
}

/// Serve one `PushDir`.
pub async fn push_dir<S>(stream: S, req: PushDirRequest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let dest = match check_dir(&req.path) {
        Ok(d) => d,
        Err(e) => return fail(&mut wr, e).await,
    };
    let (d2, mode) = (dest.clone(), req.mode);
    if let Err(e) = blocking(&dest, move || prepare_dest(&d2, mode)).await {
        return fail(&mut wr, e).await;
    }
    let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
    let d2 = dest.clone();
    let worker = tokio::task::spawn_blocking(move || unpack(ChanReader::new(rx), &d2));
    let mut tx = Some(tx);
    loop {
        match read_frame(&mut rd).await {
            Ok(Some(Frame::Data(b))) => {
                // A closed channel: the unpacker stopped on an error, which
                // its result names.
                let Some(t) = &tx else { continue };
                if t.send(b).await.is_err() {
                    tx = None;
                    break;
                }
            }
            Ok(Some(Frame::Eof)) => break,
            Ok(Some(other)) => {
                drop(tx);
                let _ = worker.await;
                let e = err(
                    machinen_proto::ErrorCode::ProtocolError.as_str(),
                    format!(
                        "expected Data or Eof during a directory push, got {}",
                        crate::exec::frame_name(&other)
                    ),
                );
                return fail(&mut wr, e).await;
            }
            Ok(None) | Err(_) => {
                drop(tx);
                let _ = worker.await;
                debug!("dirs: {}: the host went away mid-transfer", req.path);
                return;
            }
        }
    }
    drop(tx);
    let res = worker.await.unwrap_or_else(|e| {
        Err(err(
            code::IO,
            format!("{}: the unpack worker failed: {e}", dest.display()),
        ))
    });
    match res {
        Ok((entries, bytes)) => {
            let _ = send(
                &mut wr,
                &Frame::Response(Response::DirWritten { entries, bytes }),
            )
            .await;
            let _ = wr.shutdown().await;
        }
        Err(e) => fail(&mut wr, e).await,
    }
}

/// Pack the walked `tree` into `out`; an entry that vanished since the
/// walk is left out.
fn pack(tree: tree::Tree, out: ChanWriter, root: &Path) -> Result<(), WireError> {
    let _nice = Background::enter();
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    for e in &tree.entries {
        let r = match e.kind {
            Kind::Dir | Kind::Symlink => b.append_path_with_name(&e.full, &e.rel),
            Kind::File => append_file(&mut b, &e.full, &e.rel),
        };
        match r {
            Ok(()) => {}
            Err(x) if x.kind() == io::ErrorKind::NotFound => {
                debug!("dirs: {}: vanished while packing", e.full.display());
            }
            Err(x) if x.kind() == io::ErrorKind::BrokenPipe => {
                return Err(io_error(root, "the host went away", &x))
            }
            Err(x) => return Err(io_error(&e.full, "cannot pack", &x)),
        }
    }
    let mut out = b
        .into_inner()
        .map_err(|x| io_error(root, "cannot finish the tar stream", &x))?;
    out.flush()
        .map_err(|x| io_error(root, "the host went away", &x))?;
    Ok(())
}

/// Append a regular file with exactly the size its header announces, even
/// when it grows or shrinks meanwhile (a stream must stay well-formed).
fn append_file<W: Write>(b: &mut tar::Builder<W>, full: &Path, rel: &Path) -> io::Result<()> {
    let file = std::fs::File::open(full)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        // Replaced by something else since the walk.
        return Err(io::Error::from(io::ErrorKind::NotFound));
    }
    let mut h = tar::Header::new_gnu();
    h.set_metadata_in_mode(&meta, tar::HeaderMode::Complete);
    let size = meta.len();
    let data = file.take(size).chain(io::repeat(0).take(size));
    b.append_data(&mut h, rel, data.take(size))
}

/// Serve one `PullDir`.
pub async fn pull_dir<S>(stream: S, req: PullDirRequest)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut s = stream;
    let root = match check_dir(&req.path) {
        Ok(d) => d,
        Err(e) => return fail(&mut s, e).await,
    };
    let excludes = match Excludes::new(&req.exclude) {
        Ok(x) => x,
        Err(m) => return fail(&mut s, err(code::PATH_INVALID, m)).await,
    };
    let r2 = root.clone();
    let walked = blocking(&root, move || {
        let _nice = Background::enter();
        tree::walk(&r2, &excludes).map_err(|e| io_error(&r2, "cannot read the directory", &e))
    })
    .await;
    let tree = match walked {
        Ok(t) => t,
        Err(e) => return fail(&mut s, e).await,
    };
    let info = DirInfo {
        mode: tree.root_mode,
        entries: tree.entries.len() as u64,
        bytes: tree.bytes,
    };
    if send(&mut s, &Frame::Response(Response::DirInfo(info)))
        .await
        .is_err()
    {
        return;
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE);
    let r2 = root.clone();
    // Dropping the receiver (the host went away) ends the packer at its
    // next chunk.
    let worker =
        tokio::task::spawn_blocking(move || pack(tree, ChanWriter::new(tx, MAX_CHUNK), &r2));
    while let Some(b) = rx.recv().await {
        if send(&mut s, &Frame::Data(b)).await.is_err() {
            debug!("dirs: {}: the host went away mid-transfer", req.path);
            return;
        }
    }
    match worker.await {
        Ok(Ok(())) => {
            let _ = send(&mut s, &Frame::Eof).await;
            let _ = s.shutdown().await;
        }
        Ok(Err(e)) => fail(&mut s, e).await,
        Err(e) => {
            fail(
                &mut s,
                err(
                    code::IO,
                    format!("{}: the pack worker failed: {e}", root.display()),
                ),
            )
            .await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "machinen-agent-dirs-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    /// Pull a tree, push the stream elsewhere: the same files, modes and links.
    #[tokio::test]
    async fn a_tree_round_trips_through_pull_and_push() {
        let src = tempdir("src");
        std::fs::create_dir_all(src.join("a/b")).expect("mkdir");
        std::fs::create_dir_all(src.join("empty")).expect("mkdir");
        std::fs::write(src.join("a/b/f"), b"data").expect("write");
        std::fs::set_permissions(src.join("a/b/f"), std::fs::Permissions::from_mode(0o640))
            .expect("chmod");
        std::fs::write(src.join("skip.o"), b"x").expect("write");
        std::os::unix::fs::symlink("/nowhere", src.join("dangling")).expect("symlink");

        let (mut c, server) = tokio::io::duplex(1 << 16);
        tokio::spawn(pull_dir(
            server,
            PullDirRequest {
                path: src.to_string_lossy().into_owned(),
                exclude: vec!["*.o".into()],
            },
        ));
        let Ok(Some(Frame::Response(Response::DirInfo(info)))) = read_frame(&mut c).await else {
            panic!("no info")
        };
        assert_eq!((info.entries, info.bytes), (5, 4));
        let mut tar_bytes = Vec::new();
        loop {
            match read_frame(&mut c).await.expect("frame") {
                Some(Frame::Data(b)) => tar_bytes.extend_from_slice(&b),
                Some(Frame::Eof) => break,
                other => panic!("unexpected {other:?}"),
            }
        }

        let dst = tempdir("dst").join("new");
        let (client, server) = tokio::io::duplex(1 << 16);
        let srv = tokio::spawn(push_dir(
            server,
            PushDirRequest {
                path: dst.to_string_lossy().into_owned(),
                mode: Some(0o750),
            },
        ));
        let (mut crd, mut cwr) = tokio::io::split(client);
        for ch in tar_bytes.chunks(MAX_CHUNK) {
            send(&mut cwr, &Frame::Data(ch.to_vec()))
                .await
                .expect("send");
        }
        send(&mut cwr, &Frame::Eof).await.expect("eof");
        let f = read_frame(&mut crd).await.expect("read").expect("frame");
        assert_eq!(
            f,
            Frame::Response(Response::DirWritten {
                entries: 5,
                bytes: 4
            })
        );
        srv.await.expect("join");
        assert_eq!(std::fs::read(dst.join("a/b/f")).expect("read"), b"data");
        assert_eq!(
            std::fs::metadata(dst.join("a/b/f")).expect("meta").mode() & 0o7777,
            0o640
        );
        assert_eq!(
            std::fs::read_link(dst.join("dangling")).expect("link"),
            PathBuf::from("/nowhere")
        );
        assert!(dst.join("empty").is_dir() && !dst.join("skip.o").exists());
        assert_eq!(
            std::fs::metadata(&dst).expect("meta").mode() & 0o7777,
            0o750
        );
        let _ = std::fs::remove_dir_all(&src);
        let _ = std::fs::remove_dir_all(dst.parent().expect("parent"));
    }
}
