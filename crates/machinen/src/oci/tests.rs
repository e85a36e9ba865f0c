//! OCI layouts built here, byte by byte (hostile ones included, which no
//! well-behaved tool writes), flattened and checked.

use super::*;

/// One layer entry: path, and what it is.
enum E<'a> {
    Dir(&'a str),
    File(&'a str, &'a str),
    Symlink(&'a str, &'a str),
    Hard(&'a str, &'a str),
}

/// A tar header with `name` written raw (the tar crate refuses `..` and
/// absolute paths, which is what these tests need to write).
fn header(name: &str, kind: tar::EntryType, size: u64) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(kind);
    h.set_size(size);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_mtime(1);
    let bytes = h.as_mut_bytes();
    bytes[..100].fill(0);
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    h.set_cksum();
    h
}

fn layer_tar(entries: &[E]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for e in entries {
        match e {
            E::Dir(p) => b.append(&header(p, tar::EntryType::Directory, 0), io::empty()),
            E::File(p, data) => b.append(
                &header(p, tar::EntryType::Regular, data.len() as u64),
                data.as_bytes(),
            ),
            E::Symlink(p, t) | E::Hard(p, t) => {
                let kind = if matches!(e, E::Symlink(..)) {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                };
                let mut h = header(p, kind, 0);
                let bytes = h.as_mut_bytes();
                bytes[157..257].fill(0);
                bytes[157..157 + t.len()].copy_from_slice(t.as_bytes());
                h.set_cksum();
                b.append(&h, io::empty())
            }
        }
        .expect("append");
    }
    b.into_inner().expect("tar")
}

fn put_blob(dir: &Path, bytes: &[u8]) -> (String, u64) {
    let hex = hex::encode(Sha256::digest(bytes));
    fs::create_dir_all(dir.join("blobs/sha256")).expect("blobs");
    fs::write(dir.join("blobs/sha256").join(&hex), bytes).expect("blob");
    (format!("sha256:{hex}"), bytes.len() as u64)
}

struct Opts<'a> {
    arch: &'a str,
    layer_type: &'a str,
}

impl Default for Opts<'_> {
    fn default() -> Self {
        Opts {
            arch: host_arch(),
            layer_type: "application/vnd.oci.image.layer.v1.tar",
        }
    }
}

/// Write an OCI layout of `layers` tagged `t`; returns its directory.
fn layout(layers: &[Vec<u8>], o: Opts) -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tmp");
    fs::write(
        d.path().join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .expect("layout");
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            let (digest, size) = put_blob(d.path(), l);
            serde_json::json!({"mediaType": o.layer_type, "digest": digest, "size": size})
        })
        .collect();
    let config = serde_json::json!({
        "architecture": o.arch, "os": "linux",
        "config": {"Entrypoint": ["/bin/app"], "Cmd": ["--flag"], "Env": ["A=1", "PATH=/bin"], "WorkingDir": "/srv", "User": "app:staff"},
        "rootfs": {"type": "layers", "diff_ids": []}
    });
    let (cd, cs) = put_blob(d.path(), config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs
    });
    let (md, ms) = put_blob(d.path(), manifest.to_string().as_bytes());
    let index = serde_json::json!({"schemaVersion": 2, "manifests": [{
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
        "annotations": {"org.opencontainers.image.ref.name": "t"}}]});
    fs::write(d.path().join("index.json"), index.to_string()).expect("index");
    d
}

fn convert(dir: &Path, limit: u64) -> (Result<PathBuf, Failure>, tempfile::TempDir) {
    let out = tempfile::tempdir().expect("out");
    let dest = out.path().join("img.tar");
    let r = from_layout(dir, Some("t")).and_then(|img| {
        flatten::write(&img, &dest, limit)?;
        Ok(dest.clone())
    });
    (r, out)
}

/// The output tarball's entries: path → content (files) or `->target`.
fn listing(tar_path: &Path) -> BTreeMap<String, String> {
    let mut ar = tar::Archive::new(fs::File::open(tar_path).expect("open"));
    let mut out = BTreeMap::new();
    for e in ar.entries().expect("entries") {
        let mut e = e.expect("entry");
        let p = e.path().expect("path").display().to_string();
        let v = match e.header().entry_type() {
            tar::EntryType::Symlink | tar::EntryType::Link => format!(
                "->{}",
                e.link_name().expect("link").expect("some").display()
            ),
            tar::EntryType::Directory => "/".into(),
            _ => {
                let mut s = String::new();
                e.read_to_string(&mut s).expect("read");
                s
            }
        };
        out.insert(p, v);
    }
    out
}

#[test]
fn sources_parse() {
    assert_eq!(
        Source::parse(Path::new("oci:/a/b:c")),
        Some(Source::Layout {
            dir: "/a/b".into(),
            tag: Some("c".into())
        })
    );
    assert_eq!(
        Source::parse(Path::new("oci:./x")),
        Some(Source::Layout {
            dir: "./x".into(),
            tag: None
        })
    );
    assert_eq!(
        Source::parse(Path::new("docker-archive:/t/x.tar")),
        Some(Source::DockerArchive {
            file: "/t/x.tar".into()
        })
    );
    assert_eq!(Source::parse(Path::new("/some/rootfs.tar.gz")), None);
}

#[test]
fn layers_apply_in_order_with_whiteouts_and_opaque_directories() {
    let l1 = layer_tar(&[
        E::Dir("opt/"),
        E::Dir("opt/d/"),
        E::File("opt/d/a", "a"),
        E::File("opt/d/b", "b"),
        E::File("opt/gone", "x"),
        E::File("./etc/keep", "v1"),
        E::Symlink("opt/link", "/etc/keep"),
        E::Hard("opt/hard", "etc/keep"),
    ]);
    let l2 = layer_tar(&[
        E::File("opt/d/.wh..wh..opq", ""),
        E::File("opt/d/c", "c"),
        E::File("opt/.wh.gone", ""),
        E::File("etc/keep", "v2"),
        E::File("etc/machinen/image.json", "{\"not\": \"ours\"}"),
    ]);
    let d = layout(&[l1, l2], Opts::default());
    let (r, _out) = convert(d.path(), MAX_BYTES);
    let l = listing(&r.expect("converted"));
    let paths: Vec<&str> = l.keys().map(String::as_str).collect();
    assert!(
        paths.contains(&"opt/d/c") && !paths.contains(&"opt/d/a") && !paths.contains(&"opt/d/b"),
        "{paths:?}"
    );
    assert!(
        !paths
            .iter()
            .any(|p| p.contains("gone") || p.contains(".wh.")),
        "{paths:?}"
    );
    assert_eq!(l["etc/keep"], "v2");
    assert_eq!(l["opt/link"], "->/etc/keep");
    assert!(l["opt/hard"].starts_with("->") && l["opt/hard"].ends_with("etc/keep"));
    // Machinen's config, from the image's: Entrypoint + Cmd, Env, WorkingDir.
    let c: ImageConfig = serde_json::from_str(&l["etc/machinen/image.json"]).expect("config");
    assert_eq!(
        c.cmd.as_deref(),
        Some(&["/bin/app".to_string(), "--flag".into()][..])
    );
    assert_eq!(c.entrypoint.as_deref(), Some(&["/bin/app".to_string()][..]));
    assert_eq!(c.env["A"], "1");
    assert_eq!(c.cwd.as_deref(), Some("/srv"));
    assert_eq!(c.user.as_deref(), Some("app:staff"));
    // The same image flattens to the same bytes (its sha256 names it).
    let (r2, _out2) = convert(d.path(), MAX_BYTES);
    assert_eq!(
        fs::read(r2.expect("again")).expect("read"),
        fs::read(_out.path().join("img.tar")).expect("read")
    );
}

fn refused(layers: &[Vec<u8>], o: Opts, code: ErrorCode, says: &str) {
    let d = layout(layers, o);
    let (r, out) = convert(d.path(), 1 << 20);
    let e = r.expect_err(says);
    assert_eq!(e.code, code, "{says}: {}", e.message);
    assert!(e.message.contains(says), "{says:?} in {}", e.message);
    assert_eq!(
        fs::read_dir(out.path()).expect("dir").count(),
        0,
        "nothing left behind"
    );
}

#[test]
fn hostile_layers_are_refused_and_leave_nothing() {
    let inv = ErrorCode::ImageInvalid;
    refused(
        &[layer_tar(&[E::File("../evil", "x")])],
        Opts::default(),
        inv,
        "climbs out",
    );
    refused(
        &[layer_tar(&[E::File("a/../../evil", "x")])],
        Opts::default(),
        inv,
        "climbs out",
    );
    refused(
        &[layer_tar(&[E::File("/etc/evil", "x")])],
        Opts::default(),
        inv,
        "absolute",
    );
    // Through a symlink an earlier layer made, and one of the same layer.
    refused(
        &[
            layer_tar(&[E::Symlink("s", "/etc")]),
            layer_tar(&[E::File("s/passwd", "x")]),
        ],
        Opts::default(),
        inv,
        "not a directory",
    );
    refused(
        &[layer_tar(&[E::Symlink("s", "../.."), E::File("s/x", "x")])],
        Opts::default(),
        inv,
        "not a directory",
    );
    refused(
        &[layer_tar(&[E::Hard("h", "etc/passwd")])],
        Opts::default(),
        inv,
        "not a file of the image",
    );
    refused(
        &[layer_tar(&[E::File("a", "x"), E::Hard("h", "../a")])],
        Opts::default(),
        inv,
        "climbs out",
    );
    refused(
        &[layer_tar(&[E::File("a", "x")])],
        Opts {
            layer_type: "application/vnd.example.layer",
            ..Opts::default()
        },
        inv,
        "unknown layer media type",
    );
    refused(
        &[layer_tar(&[E::File("a", "x")])],
        Opts {
            arch: if host_arch() == "amd64" {
                "arm64"
            } else {
                "amd64"
            },
            ..Opts::default()
        },
        ErrorCode::ImagePlatformMismatch,
        "this host runs",
    );
    // Over the size bound (1 MiB in these tests): a bomb.
    let big = "z".repeat(2 << 20);
    refused(
        &[layer_tar(&[E::File("big", &big)])],
        Opts::default(),
        inv,
        "more than 1 MiB",
    );
}

#[test]
fn a_blob_that_does_not_match_its_digest_is_refused() {
    let d = layout(&[layer_tar(&[E::File("a", "x")])], Opts::default());
    // Change one layer blob's bytes (the largest blob is the layer).
    let blobs = d.path().join("blobs/sha256");
    let layer = fs::read_dir(&blobs)
        .expect("dir")
        .flatten()
        .max_by_key(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
        .expect("blob")
        .path();
    let mut bytes = fs::read(&layer).expect("read");
    bytes[600] ^= 1;
    fs::write(&layer, bytes).expect("write");
    let (r, _out) = convert(d.path(), MAX_BYTES);
    let e = r.expect_err("tampered");
    assert_eq!(e.code, ErrorCode::ImageInvalid);
    assert!(
        e.message.contains("does not match its digest"),
        "{}",
        e.message
    );
    // A tag that is not there names the ones that are.
    let e = from_layout(d.path(), Some("nope")).expect_err("no tag");
    assert!(e.hint.as_deref().unwrap_or("").contains('t'));
}
