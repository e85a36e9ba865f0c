//! Applying an image's layers into one rootfs tarball.
//!
//! Two passes over the layers. The first checks each blob (digest, size,
//! uncompressed bound) and each entry (see the module docs of `oci`), and
//! works out which entry of which layer is the final one for each path:
//! a later layer replaces an earlier entry, `.wh.NAME` removes NAME (and
//! what is below it) from the layers beneath, `.wh..wh..opq` empties its
//! directory of what the layers beneath put there. The second pass writes
//! the surviving entries, in layer order, after machinen's image config.

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::Path;

use super::{invalid, too_large, Checked, Compression, Image, Layer};
use crate::error::{fail, ErrorCode, Failure};
use crate::provision::IMAGE_CONFIG_PATH;

const WHITEOUT: &str = ".wh.";
const OPAQUE: &str = ".wh..wh..opq";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    Symlink,
    Other,
}

/// The final entry at a path: which layer and which entry of it.
#[derive(Debug, Clone, Copy)]
struct Final {
    layer: usize,
    entry: usize,
    kind: Kind,
}

/// A layer entry's path as a list of plain components; refused when it is
/// absolute or climbs with `..`.
fn components(raw: &[u8], layer: usize) -> Result<Vec<String>, Failure> {
    let s = std::str::from_utf8(raw)
        .map_err(|_| invalid(format!("layer {layer}: an entry's path is not UTF-8")))?;
    if s.starts_with('/') {
        return Err(invalid(format!(
            "layer {layer}: entry {s:?} is an absolute path"
        )));
    }
    let mut out = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                return Err(invalid(format!(
                    "layer {layer}: entry {s:?} climbs out with `..`"
                )))
            }
            c => out.push(c.to_string()),
        }
    }
    Ok(out)
}

fn key(parts: &[String]) -> String {
    parts.join("/")
}

/// Open a layer's tar stream: the blob, checked as read, decompressed.
fn open(layer: &Layer) -> Result<Box<dyn Read>, Failure> {
    let f = fs::File::open(&layer.path).map_err(|e| {
        fail(
            ErrorCode::ImageInvalid,
            format!("layer blob {} is missing", layer.path.display()),
        )
        .source(e)
    })?;
    let compression = match layer.compression {
        Compression::Sniff => {
            let mut magic = [0u8; 4];
            let mut g = fs::File::open(&layer.path)
                .map_err(|e| fail(ErrorCode::Io, "cannot read a layer").source(e))?;
            let n = g.read(&mut magic).unwrap_or(0);
            match &magic[..n] {
                [0x1f, 0x8b, ..] => Compression::Gzip,
                [0x28, 0xb5, 0x2f, 0xfd] => Compression::Zstd,
                _ => Compression::None,
            }
        }
        c => c,
    };
    Ok(match compression {
        Compression::Gzip => Box::new(flate2::read::GzDecoder::new(f)),
        Compression::Zstd => Box::new(ruzstd::decoding::StreamingDecoder::new(f).map_err(|e| {
            invalid(format!("layer {} is not zstd", layer.path.display())).source(e)
        })?),
        _ => Box::new(f),
    })
}

/// Check the blob digest and size of a layer (OCI layouts) by reading it.
fn check_blob(layer: &Layer, n: usize) -> Result<(), Failure> {
    let Some((digest, size)) = &layer.digest else {
        return Ok(());
    };
    let f = fs::File::open(&layer.path)
        .map_err(|e| invalid(format!("layer {n}'s blob {digest} is missing")).source(e))?;
    let mut c = Checked::new(f, u64::MAX);
    io::copy(&mut c, &mut io::sink())
        .map_err(|e| fail(ErrorCode::Io, "cannot read a layer").source(e))?;
    let got = c.count;
    if got != *size || format!("sha256:{}", c.hex()) != *digest {
        return Err(invalid(format!(
            "layer {n}'s blob does not match its digest {digest} or size {size} ({got} bytes)"
        )));
    }
    Ok(())
}

/// Pass 1: the final entry of every path.
fn plan(image: &Image, limit: u64) -> Result<BTreeMap<String, Final>, Failure> {
    let mut map: BTreeMap<String, Final> = BTreeMap::new();
    let mut total = 0u64;
    for (li, layer) in image.layers.iter().enumerate() {
        check_blob(layer, li)?;
        let left = limit.saturating_sub(total);
        let mut un = Checked::new(open(layer)?, left);
        let read = (|| -> Result<(), Failure> {
            let mut ar = tar::Archive::new(&mut un);
            let entries = ar
                .entries()
                .map_err(|e| invalid(format!("layer {li} is not a tar archive")).source(e))?;
            for (ei, e) in entries.enumerate() {
                let e = e.map_err(|e| invalid(format!("layer {li} is damaged")).source(e))?;
                plan_entry(&mut map, &e, li, ei)?;
            }
            Ok(())
        })();
        // The rest of the stream (the end blocks) counts for the diff_id.
        let read = read.and_then(|()| {
            io::copy(&mut un, &mut io::sink())
                .map(|_| ())
                .map_err(|e| invalid(format!("layer {li} is damaged")).source(e))
        });
        if un.count > left {
            return Err(too_large(limit));
        }
        read?;
        total += un.count;
        if let Some(want) = &layer.diff_id {
            if format!("sha256:{}", un.hex()) != *want {
                return Err(invalid(format!(
                    "layer {li} does not match its diff_id {want}"
                )));
            }
        }
    }
    Ok(map)
}

fn plan_entry<R: Read>(
    map: &mut BTreeMap<String, Final>,
    e: &tar::Entry<R>,
    li: usize,
    ei: usize,
) -> Result<(), Failure> {
    let parts = components(&e.path_bytes(), li)?;
    let Some(name) = parts.last() else {
        return Ok(()); // the root itself
    };
    let parent = &parts[..parts.len() - 1];
    // Nothing may be reached through a symlink or below a non-directory
    // (a symlink an earlier layer made included): extraction would follow
    // it out of the root.
    for i in 1..=parent.len() {
        if let Some(f) = map.get(&key(&parent[..i])) {
            if f.kind != Kind::Dir {
                return Err(invalid(format!(
                    "layer {li}: entry {:?} lies below {:?}, which is not a directory",
                    key(&parts),
                    key(&parent[..i])
                )));
            }
        }
    }
    if name == OPAQUE {
        let dir = key(parent);
        let prefix = if dir.is_empty() {
            String::new()
        } else {
            format!("{dir}/")
        };
        map.retain(|k, f| f.layer == li || !k.starts_with(&prefix) || *k == dir);
        return Ok(());
    }
    if let Some(target) = name.strip_prefix(WHITEOUT) {
        let mut t = parent.to_vec();
        t.push(target.to_string());
        let k = key(&t);
        let prefix = format!("{k}/");
        map.retain(|p, f| f.layer == li || (*p != k && !p.starts_with(&prefix)));
        return Ok(());
    }
    use tar::EntryType as T;
    let kind = match e.header().entry_type() {
        T::Directory => Kind::Dir,
        T::Symlink => Kind::Symlink,
        T::Regular | T::Continuous | T::Char | T::Block | T::Fifo => Kind::Other,
        T::Link => {
            let target = e.link_name_bytes().ok_or_else(|| {
                invalid(format!(
                    "layer {li}: hard link {:?} has no target",
                    key(&parts)
                ))
            })?;
            let t = components(&target, li)?;
            match map.get(&key(&t)) {
                Some(f) if f.kind == Kind::Other => {}
                _ => {
                    return Err(invalid(format!(
                    "layer {li}: hard link {:?} points at {:?}, which is not a file of the image",
                    key(&parts),
                    key(&t)
                )))
                }
            }
            Kind::Other
        }
        other => {
            return Err(invalid(format!(
                "layer {li}: entry {:?} has an unsupported type ({other:?})",
                key(&parts)
            )))
        }
    };
    let k = key(&parts);
    if kind != Kind::Dir {
        // A file replacing a directory replaces what was below it too.
        let prefix = format!("{k}/");
        map.retain(|p, _| !p.starts_with(&prefix));
    }
    map.insert(
        k,
        Final {
            layer: li,
            entry: ei,
            kind,
        },
    );
    Ok(())
}

/// Flatten `image` into the tarball `dest` (written whole, then renamed).
pub(super) fn write(image: &Image, dest: &Path, limit: u64) -> Result<(), Failure> {
    let map = plan(image, limit)?;
    let config_key = IMAGE_CONFIG_PATH.trim_start_matches('/');
    let tmp = crate::assets::fsutil::temp_sibling(dest, "tmp");
    let result = (|| -> Result<(), Failure> {
        let out = {
            use std::os::unix::fs::OpenOptionsExt;
            fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&tmp)
        }
        .map_err(|e| fail(ErrorCode::Io, format!("cannot write {}", tmp.display())).source(e))?;
        let mut w = io::BufWriter::new(out);
        let io_fail =
            |e: io::Error| fail(ErrorCode::Io, "cannot write the image tarball").source(e);
        w.write_all(&crate::provision::config_tar_member(&image.config, 0).map_err(io_fail)?)
            .map_err(io_fail)?;
        let mut b = tar::Builder::new(w);
        for (li, layer) in image.layers.iter().enumerate() {
            let mut ar = tar::Archive::new(open(layer)?);
            let entries = ar
                .entries()
                .map_err(|e| invalid(format!("layer {li} is not a tar archive")).source(e))?;
            for (ei, e) in entries.enumerate() {
                let mut e = e.map_err(|e| invalid(format!("layer {li} is damaged")).source(e))?;
                let parts = components(&e.path_bytes(), li)?;
                let k = key(&parts);
                if k.is_empty() || k == config_key {
                    continue;
                }
                if !map.get(&k).is_some_and(|f| f.layer == li && f.entry == ei) {
                    continue;
                }
                let mut h = e.header().clone();
                let path = format!("./{k}");
                match h.entry_type() {
                    tar::EntryType::Symlink | tar::EntryType::Link => {
                        let target = e
                            .link_name_bytes()
                            .map(|t| t.into_owned())
                            .unwrap_or_default();
                        let target = String::from_utf8(target)
                            .map_err(|_| invalid("a link target is not UTF-8"))?;
                        let target = if h.entry_type() == tar::EntryType::Link {
                            format!("./{}", key(&components(target.as_bytes(), li)?))
                        } else {
                            target
                        };
                        b.append_link(&mut h, &path, &target).map_err(io_fail)?;
                    }
                    _ => {
                        b.append_data(&mut h, &path, &mut e).map_err(io_fail)?;
                    }
                }
            }
        }
        let w = b.into_inner().map_err(io_fail)?;
        let f = w.into_inner().map_err(|e| io_fail(e.into_error()))?;
        f.sync_all().map_err(io_fail)?;
        drop(f);
        crate::assets::fsutil::persist(&tmp, dest).map_err(io_fail)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
