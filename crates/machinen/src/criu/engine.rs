//! The `criu` snapshot engine: a bundle of a VM's workload (a process tree,
//! the main command by default) plus its disk, which any VM of the same
//! image resumes, whatever its accelerator, CPU model, QEMU, memory or CPU
//! count.
//!
//! ```text
//! <bundle>/meta.json        CriuMeta: engine "criu", the image, the tree
//! <bundle>/img/…            CRIU's images (and dump.log)
//! <bundle>/rootdisk.qcow2   the disk: every layer over the image, merged
//! <bundle>/main.log         the main command's log so far (service VMs)
//! <bundle>/manifest.json    size and sha256 of every other file
//! ```
//!
//! Snapshot: CRIU dumps the tree into the guest's tmpfs (it ends the tree),
//! the images come out through the agent, the supervisor copies the disk
//! with the guest paused for the copy only, then the source stops — or,
//! with keep-alive, the tree is restored in place and runs on. Any failure
//! after the dump restores the tree in place too: the workload is never
//! lost to a failed snapshot. The bundle is built in a temporary directory
//! beside its destination, synced, and renamed into place.
//!
//! Restore: the bundle is verified (every file against the manifest, no
//! file more or less, no link), a fresh VM boots from the same image with
//! the bundle's disk, and the agent restores the tree and adopts it as the
//! main command (its output goes on into the VM's log after the bundle's).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use machinen_proto::{timeouts, CriuDumpRequest, CriuDumped, CriuRestoreRequest};
use serde::{Deserialize, Serialize};

use crate::bundle::{self, ImageIdentity};
use crate::error::{fail, ErrorCode, Result};
use crate::spec::{files, NetworkMode, VmSpec};
use crate::vm::Vm;

/// `meta.json`'s `format` for this engine's bundles.
pub const FORMAT: &str = "machinen-criu-bundle";
/// Bumped on any change a reader must know about.
pub const VERSION: u32 = 1;
/// `meta.json`'s `engine`.
pub const ENGINE: &str = "criu";

const META: &str = "meta.json";
const MANIFEST: &str = "manifest.json";
const IMG: &str = "img";
/// Most files a bundle's manifest may list (CRIU writes a few per process).
const MAX_FILES: usize = 100_000;

/// What a CRIU bundle holds, in its `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CriuMeta {
    pub format: String,
    pub version: u32,
    pub engine: String,
    pub source_name: String,
    pub image: ImageIdentity,
    pub kernel_version: String,
    pub guest_arch: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub snapped_at_ms: u64,
    pub network: NetworkMode,
    /// The egress policy in force at the snapshot's start.
    #[serde(
        default,
        skip_serializing_if = "machinen_proto::netpolicy::NetPolicy::is_default"
    )]
    pub net_policy: machinen_proto::netpolicy::NetPolicy,
    /// The tree's root, as CRIU restores it (the same pid).
    pub pid: u32,
    pub comm: String,
    /// Its descriptors 0, 1 and 2 at the dump (see `CriuDumped::stdio`).
    pub stdio: Vec<String>,
    /// The main command, when the tree is the VM's main command (its
    /// environment left out, as in every bundle).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<crate::service::MainSpec>,
    /// The `criu.json` marker of the CRIU that dumped it.
    pub criu: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    size: u64,
    sha256: String,
}

/// The CRIU engine's snapshot settings.
#[derive(Debug, Clone, Default)]
pub struct SnapshotOptions {
    /// The bundle directory to create (must not exist).
    pub out: PathBuf,
    /// The VM and its tree run on (the tree is restored in place).
    pub keep_alive: bool,
    /// The tree's root; `None`: the main command.
    pub pid: Option<u32>,
    /// Bound on the disk copy (`0`: the snapshot default).
    pub timeout: Duration,
}

/// A completed CRIU snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct CriuReport {
    pub out: PathBuf,
    pub engine: &'static str,
    pub pid: u32,
    pub comm: String,
    pub elapsed_ms: u64,
    /// How long the guest was paused (for the disk copy).
    pub paused_ms: u64,
    /// Apparent and on-disk bytes of the bundle, and of its CRIU images.
    pub bytes: u64,
    pub disk_bytes: u64,
    pub images_bytes: u64,
}

/// What boot needs to resume a CRIU bundle (see
/// [`crate::vm::BootOptions::criu_resume`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Resume {
    /// The bundle's disk, copied to be the VM's.
    pub disk_layer: PathBuf,
    /// The bundle's main log, copied to be the VM's.
    pub main_log: Option<PathBuf>,
    /// The image the disk was made over (its cached ext4's sha256).
    pub image_sha256: String,
}

/// Whether `dir` holds a CRIU bundle (its `meta.json` says so).
pub fn is_bundle(dir: &Path) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        #[serde(default)]
        engine: String,
        #[serde(default)]
        format: String,
    }
    let Ok(bytes) = read_bounded(&dir.join(META), 1 << 20) else {
        return false;
    };
    serde_json::from_slice::<Probe>(&bytes)
        .map(|p| p.engine == ENGINE && p.format == FORMAT)
        .unwrap_or(false)
}

fn invalid(dir: &Path, why: impl std::fmt::Display) -> crate::Error {
    fail(
        ErrorCode::RestoreBundleInvalid,
        format!("{} is not a valid CRIU bundle: {why}", dir.display()),
    )
    .hint("take the snapshot again; a bundle is never repaired")
    .into()
}

fn read_bounded(path: &Path, max: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::symlink_metadata(path)?;
    if !meta.is_file() || meta.len() > max {
        return Err(std::io::Error::other("not a regular file of bounded size"));
    }
    let mut buf = Vec::new();
    std::fs::File::open(path)?.take(max).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Every regular file under `dir`, by its path relative to `dir`; refuses
/// links and anything but files and directories.
fn walk(dir: &Path) -> std::result::Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        let entries = std::fs::read_dir(dir.join(&rel)).map_err(|e| e.to_string())?;
        for e in entries {
            let e = e.map_err(|e| e.to_string())?;
            let name = rel.join(e.file_name());
            let t = e.file_type().map_err(|e| e.to_string())?;
            let shown = name.to_str().ok_or("a file name that is not UTF-8")?;
            if t.is_dir() {
                todo.push(name.clone());
            } else if t.is_file() {
                out.push(shown.to_string());
            } else {
                return Err(format!("{shown} is not a regular file"));
            }
            if out.len() > MAX_FILES {
                return Err(format!("more than {MAX_FILES} files"));
            }
        }
    }
    out.sort();
    Ok(out)
}

fn hash_all(dir: &Path) -> std::result::Result<BTreeMap<String, FileEntry>, String> {
    let mut m = BTreeMap::new();
    for rel in walk(dir)? {
        if rel == MANIFEST {
            continue;
        }
        let (size, sha256) = bundle::hash_file(&dir.join(&rel)).map_err(|e| e.to_string())?;
        m.insert(rel, FileEntry { size, sha256 });
    }
    Ok(m)
}

/// Read and verify a CRIU bundle: its meta, and every file against the
/// manifest (blocking: hashes every file).
pub fn check_bundle(dir: &Path) -> Result<CriuMeta> {
    let bytes = read_bounded(&dir.join(META), 1 << 20).map_err(|e| invalid(dir, e))?;
    let meta: CriuMeta = serde_json::from_slice(&bytes).map_err(|e| invalid(dir, e))?;
    if meta.format != FORMAT || meta.engine != ENGINE {
        return Err(invalid(dir, "meta.json is not a CRIU bundle's"));
    }
    if meta.version != VERSION {
        return Err(fail(
            ErrorCode::RestoreBundleIncompatible,
            format!(
                "{} is a CRIU bundle of format version {}; this machinen reads version {VERSION}",
                dir.display(),
                meta.version
            ),
        )
        .into());
    }
    let listed: BTreeMap<String, FileEntry> = serde_json::from_slice(
        &read_bounded(&dir.join(MANIFEST), 64 << 20).map_err(|e| invalid(dir, e))?,
    )
    .map_err(|e| invalid(dir, e))?;
    let found = hash_all(dir).map_err(|e| invalid(dir, e))?;
    for (name, want) in &listed {
        match found.get(name) {
            None => return Err(invalid(dir, format!("{name} is missing"))),
            Some(got) if got != want => {
                return Err(invalid(dir, format!("{name} differs from the manifest")))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = found.keys().find(|k| !listed.contains_key(*k)) {
        return Err(invalid(dir, format!("{extra} is not in the manifest")));
    }
    for need in [META, bundle::DISK] {
        if !listed.contains_key(need) {
            return Err(invalid(dir, format!("{need} is missing")));
        }
    }
    if meta.guest_arch != crate::paths::debian_arch() {
        return Err(fail(
            ErrorCode::RestoreBundleIncompatible,
            format!(
                "{} holds a {} process tree; this host runs {} guests",
                dir.display(),
                meta.guest_arch,
                crate::paths::debian_arch()
            ),
        )
        .into());
    }
    Ok(meta)
}

/// The disk of a VM resuming a CRIU bundle (boot calls it in place of a
/// fresh overlay): the bundle's layer, sanitised, and its log.
pub(crate) fn resume_disk(r: &Resume, disk: &Path, log: &Path) -> Result<()> {
    bundle::sparse_copy(&r.disk_layer, disk)?;
    crate::qcow2::sanitize_copy(disk).map_err(|source| bundle::BundleError::UnsafeDisk {
        file: r.disk_layer.clone(),
        source,
    })?;
    if let Some(src) = &r.main_log {
        std::fs::copy(src, log)
            .map_err(|e| fail(ErrorCode::Io, format!("copying {}", src.display())).source(e))?;
    }
    Ok(())
}

use machinen_proto::criu_top_pid_in as top_pid;

fn scratch_name(what: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("/run/machinen-criu-{what}-{nanos}")
}

async fn remove_in_guest(vm: &Vm, path: &str) {
    let _ = vm
        .exec(crate::vm::ExecOptions {
            argv: vec!["rm".into(), "-rf".into(), path.into()],
            ..Default::default()
        })
        .await;
}

/// Write `meta.json` and the manifest into `tmp`, sync everything, and
/// rename it to `out`.
fn seal(tmp: &Path, out: &Path, meta: &CriuMeta) -> Result<()> {
    let io = |what: &str, e: std::io::Error| -> crate::Error {
        fail(
            ErrorCode::SnapshotDumpFailed,
            format!("writing the bundle: {what}"),
        )
        .source(e)
        .into()
    };
    let meta_bytes =
        serde_json::to_vec_pretty(meta).map_err(|e| io("meta.json", std::io::Error::other(e)))?;
    std::fs::write(tmp.join(META), meta_bytes).map_err(|e| io("meta.json", e))?;
    let manifest = hash_all(tmp).map_err(|e| io("manifest", std::io::Error::other(e)))?;
    let bytes = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| io("manifest", std::io::Error::other(e)))?;
    std::fs::write(tmp.join(MANIFEST), bytes).map_err(|e| io("manifest", e))?;
    let mut dirs = vec![tmp.to_path_buf()];
    for rel in walk(tmp).map_err(|e| io("sync", std::io::Error::other(e)))? {
        let p = tmp.join(&rel);
        std::fs::File::open(&p)
            .and_then(|f| f.sync_all())
            .map_err(|e| io(&rel, e))?;
        if let Some(parent) = p.parent() {
            if !dirs.iter().any(|d| d == parent) {
                dirs.push(parent.to_path_buf());
            }
        }
    }
    for d in &dirs {
        std::fs::File::open(d)
            .and_then(|f| f.sync_all())
            .map_err(|e| io("sync", e))?;
    }
    std::fs::rename(tmp, out).map_err(|e| io("rename", e))?;
    if let Some(parent) = out.parent() {
        let _ = std::fs::File::open(parent).and_then(|f| f.sync_all());
    }
    Ok(())
}

/// Snapshot `vm`'s process tree with CRIU (see the module docs).
pub async fn snapshot(vm: &Vm, paths: &crate::Paths, o: &SnapshotOptions) -> Result<CriuReport> {
    let t0 = std::time::Instant::now();
    let st = vm.status().await?;
    if st.state != machinen_proto::VmState::Running {
        return Err(fail(
            ErrorCode::SnapshotStateInvalid,
            format!("{} is {}, not running", vm.name(), st.state),
        )
        .into());
    }
    let out = if o.out.is_absolute() {
        o.out.clone()
    } else {
        std::env::current_dir()?.join(&o.out)
    };
    if out.exists() {
        return Err(bundle::BundleError::Exists { path: out }.into());
    }
    let spec_path = vm
        .info()
        .control_socket
        .parent()
        .map(|d| d.join(files::SPEC))
        .unwrap_or_default();
    let spec = crate::vm::blocking(move || {
        VmSpec::load(&spec_path).map_err(|e| {
            fail(ErrorCode::Io, format!("reading {}", spec_path.display()))
                .source(e)
                .into()
        })
    })
    .await?;
    if spec.mounts.is_some() || spec.live_mounts.is_some() {
        return Err(fail(
            ErrorCode::SnapshotDumpFailed,
            format!(
                "{} has host directories mounted: a CRIU bundle carries the root disk only",
                vm.name()
            ),
        )
        .hint("snapshot it with the whole-VM engine (--engine vmstate), which keeps its mounts")
        .into());
    }
    let net_policy = vm
        .network()
        .await
        .map(|r| r.policy)
        .unwrap_or_else(|_| spec.net_policy.clone());
    let criu = super::installed(paths)?;
    super::stage(vm, &criu.dir).await?;
    let marker: serde_json::Value =
        serde_json::from_slice(&std::fs::read(criu.dir.join(crate::assets::criu::MARKER))?)
            .unwrap_or_default();

    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "bundle".into());
    let tmp = out
        .parent()
        .unwrap_or(Path::new("/"))
        .join(format!(".{name}.criu-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| {
        fail(
            ErrorCode::SnapshotDumpFailed,
            format!("creating {}", tmp.display()),
        )
        .source(e)
    })?;
    let guest = scratch_name("dump");
    let dumped = vm
        .call(
            machinen_proto::exchange::CriuDump {
                req: CriuDumpRequest {
                    criu: super::GUEST_DIR.into(),
                    images: guest.clone(),
                    pid: o.pid,
                    leave_running: false,
                },
            },
            timeouts::CRIU_ANSWER,
            ErrorCode::SnapshotTimeout,
        )
        .await;
    let dumped = match dumped {
        Ok(d) => d,
        Err(e) => {
            remove_in_guest(vm, &guest).await;
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    // From here the tree exists only as images: whatever fails, it is
    // restored in place before the error is returned.
    let built = async {
        let pulled = vm
            .pull_dir(&guest, &tmp.join(IMG), crate::PullDirOptions::default())
            .await?;
        let disk = vm
            .snapshot_to(&tmp, true, o.timeout, false, false, true)
            .await?;
        Ok::<_, crate::Error>((pulled, disk))
    }
    .await;
    let (pulled, disk) = match built {
        Ok(b) => b,
        Err(e) => {
            if let Err(again) = restore_in_place(vm, &guest, &dumped, &spec).await {
                tracing::error!("the dumped tree could not be restored in place: {again}");
            }
            remove_in_guest(vm, &guest).await;
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    let meta = CriuMeta {
        format: FORMAT.into(),
        version: VERSION,
        engine: ENGINE.into(),
        source_name: vm.name().to_string(),
        image: ImageIdentity {
            path: spec.image.clone().unwrap_or_default(),
            sha256: spec.image_sha256.clone().unwrap_or_default(),
            source: spec.image_source.clone(),
        },
        kernel_version: spec.kernel_version.clone(),
        guest_arch: crate::paths::debian_arch().into(),
        memory_mib: spec.memory_mib,
        cpus: spec.cpus,
        snapped_at_ms: crate::registry::now_ms(),
        network: spec.network,
        net_policy,
        pid: dumped.pid,
        comm: dumped.comm.clone(),
        stdio: dumped.stdio.clone(),
        main: dumped
            .main
            .then(|| {
                spec.main.clone().map(|mut m| {
                    m.env.clear();
                    m.cwd = None;
                    m.adopt = false;
                    m
                })
            })
            .flatten(),
        criu: marker,
    };
    let sealed = {
        let (tmp, out, meta) = (tmp.clone(), out.clone(), meta.clone());
        crate::vm::blocking(move || {
            let r = seal(&tmp, &out, &meta);
            if r.is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            r
        })
        .await
    };
    if o.keep_alive || sealed.is_err() {
        let again = restore_in_place(vm, &guest, &dumped, &spec).await;
        remove_in_guest(vm, &guest).await;
        sealed?;
        again?;
    } else {
        remove_in_guest(vm, &guest).await;
        sealed?;
        crate::vm::stop_entry(vm.info(), true, timeouts::SNAPSHOT_SOURCE_EXIT).await?;
    }
    let o2 = out.clone();
    let (bytes, disk_bytes) = crate::vm::blocking(move || Ok(bundle::dir_usage(&o2))).await?;
    Ok(CriuReport {
        out,
        engine: ENGINE,
        pid: dumped.pid,
        comm: dumped.comm,
        elapsed_ms: t0.elapsed().as_millis() as u64,
        paused_ms: disk.paused_ms,
        bytes,
        disk_bytes,
        images_bytes: pulled.bytes,
    })
}

/// Put a dumped tree back where it was (keep-alive, or a failed snapshot).
async fn restore_in_place(vm: &Vm, guest: &str, d: &CriuDumped, spec: &VmSpec) -> Result<u32> {
    vm.call(
        machinen_proto::exchange::CriuRestore {
            req: CriuRestoreRequest {
                criu: super::GUEST_DIR.into(),
                images: guest.into(),
                main: d.main.then(|| d.stdio.clone()),
                stdin: spec.main.as_ref().is_some_and(|m| m.stdin),
                tcp_close: false,
                first_seq: 0,
            },
        },
        timeouts::CRIU_ANSWER,
        ErrorCode::SnapshotTimeout,
    )
    .await
}

/// Resume a CRIU bundle in a fresh VM (see the module docs). Called by
/// [`crate::restore`] for the bundles [`is_bundle`] recognises.
pub async fn restore(o: crate::RestoreOptions, bundle_dir: PathBuf) -> Result<Vm> {
    let paths = crate::Paths::from_env()?;
    let dir = bundle_dir.clone();
    let meta = crate::vm::blocking(move || check_bundle(&dir)).await?;
    if !o.live_mounts.is_empty() || o.own_ram {
        return Err(fail(
            ErrorCode::RestoreBundleIncompatible,
            format!(
                "{} is a CRIU bundle: it has no live mounts to serve elsewhere and no RAM to own",
                bundle_dir.display()
            ),
        )
        .hint("drop --mount-live and --own-ram")
        .into());
    }
    let criu = super::installed(&paths)?;
    let main_log = bundle_dir.join(bundle::MAIN_LOG);
    let image = o
        .image
        .clone()
        .or_else(|| (!meta.image.path.as_os_str().is_empty()).then(|| meta.image.path.clone()));
    let image = match (&image, &meta.image.source) {
        (Some(p), Some(src)) if !p.exists() => Some(PathBuf::from(src)),
        _ => image,
    };
    let main = meta.main.clone();
    let opts = crate::vm::BootOptions {
        image,
        name: o.name.clone(),
        memory_mib: Some(o.memory_mib.unwrap_or(meta.memory_mib)),
        cpus: o.cpus.unwrap_or(meta.cpus),
        cpu_model: o.cpu_model.clone(),
        network: meta.network,
        net_policy: o
            .net_policy
            .clone()
            .unwrap_or_else(|| meta.net_policy.clone()),
        egress_secrets: o.egress_secrets.clone(),
        detached: o.detached,
        boot_timeout: o.boot_timeout,
        progress: o.progress,
        ports: o.ports.clone(),
        on_phase: o.on_phase.clone(),
        cmd: main.as_ref().map(|m| m.argv.clone()).unwrap_or_default(),
        user: main.as_ref().and_then(|m| m.user.clone()),
        main_stdin: main.as_ref().is_some_and(|m| m.stdin),
        keep_alive_on_exit: main.as_ref().is_some_and(|m| m.keep_alive_on_exit),
        criu_resume: Some(Resume {
            disk_layer: bundle_dir.join(bundle::DISK),
            main_log: main_log.is_file().then_some(main_log.clone()),
            image_sha256: meta.image.sha256.clone(),
        }),
        ..Default::default()
    };
    let top = top_pid(&bundle_dir.join(IMG));
    let vm = crate::vm::boot(opts).await?;
    let resumed = async {
        // Before anything else runs in the guest: its next pids above the
        // dumped ones, which CRIU gives back (the agent checks again).
        if top > 0 {
            let last = "/proc/sys/kernel/ns_last_pid";
            let script = format!("[ \"$(cat {last})\" -lt {top} ] && echo {top} > {last}; true");
            vm.exec(crate::vm::ExecOptions {
                argv: vec!["sh".into(), "-c".into(), script],
                ..Default::default()
            })
            .await?;
        }
        super::stage(&vm, &criu.dir).await?;
        let guest = scratch_name("restore");
        vm.push_dir(
            &bundle_dir.join(IMG),
            &guest,
            crate::PushDirOptions::default(),
        )
        .await?;
        let first_seq = if main_log.is_file() {
            let l = main_log.parent().map(Path::to_path_buf).unwrap_or_default();
            crate::vm::blocking(move || Ok(crate::service::next_seq(&l))).await?
        } else {
            0
        };
        let pid = vm
            .call(
                machinen_proto::exchange::CriuRestore {
                    req: CriuRestoreRequest {
                        criu: super::GUEST_DIR.into(),
                        images: guest.clone(),
                        main: main.is_some().then(|| meta.stdio.clone()),
                        stdin: main.as_ref().is_some_and(|m| m.stdin),
                        tcp_close: o.reset_tcp,
                        first_seq,
                    },
                },
                timeouts::CRIU_ANSWER,
                ErrorCode::RestoreBundleIncompatible,
            )
            .await;
        remove_in_guest(&vm, &guest).await;
        pid
    }
    .await;
    match resumed {
        Ok(pid) => {
            tracing::info!("{}: process tree {pid} restored with CRIU", vm.name());
            Ok(vm)
        }
        Err(e) => {
            let _ = vm.stop(true, timeouts::CLEANUP_STOP).await;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tempdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("criu-bundle-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(d.join(IMG)).expect("test io");
        d
    }

    fn meta() -> CriuMeta {
        CriuMeta {
            format: FORMAT.into(),
            version: VERSION,
            engine: ENGINE.into(),
            source_name: "svc".into(),
            image: ImageIdentity {
                path: "/img.tar".into(),
                sha256: "ab".into(),
                source: None,
            },
            kernel_version: "6.1".into(),
            guest_arch: crate::paths::debian_arch().into(),
            memory_mib: 512,
            cpus: 1,
            snapped_at_ms: 1,
            network: NetworkMode::default(),
            net_policy: Default::default(),
            pid: 84,
            comm: "sh".into(),
            stdio: vec!["pipe:[1]".into()],
            main: None,
            criu: serde_json::json!({"version": "3.17"}),
        }
    }

    #[test]
    fn a_sealed_bundle_checks_and_any_change_is_refused_by_name() {
        let tmp = tempdir("tmp");
        std::fs::write(tmp.join(bundle::DISK), b"disk").expect("test io");
        std::fs::write(tmp.join(IMG).join("core-84.img"), b"core").expect("test io");
        let out = tmp.with_extension("out");
        let _ = std::fs::remove_dir_all(&out);
        seal(&tmp, &out, &meta()).expect("sealed");
        assert!(is_bundle(&out));
        assert_eq!(check_bundle(&out).expect("valid").pid, 84);

        std::fs::write(out.join(IMG).join("core-84.img"), b"CORE").expect("test io");
        let e = check_bundle(&out).expect_err("altered").to_string();
        assert!(e.contains("img/core-84.img differs"), "{e}");
        std::fs::write(out.join(IMG).join("core-84.img"), b"core").expect("test io");

        std::fs::write(out.join("extra"), b"x").expect("test io");
        let e = check_bundle(&out).expect_err("extra").to_string();
        assert!(e.contains("extra is not in the manifest"), "{e}");
        std::fs::remove_file(out.join("extra")).expect("test io");

        std::os::unix::fs::symlink("/etc/passwd", out.join(IMG).join("link")).expect("test io");
        let e = check_bundle(&out).expect_err("link").to_string();
        assert!(e.contains("not a regular file"), "{e}");
        std::fs::remove_file(out.join(IMG).join("link")).expect("test io");

        std::fs::remove_file(out.join(bundle::DISK)).expect("test io");
        let e = check_bundle(&out).expect_err("missing").to_string();
        assert!(e.contains("rootdisk.qcow2 is missing"), "{e}");
        std::fs::remove_dir_all(&out).expect("test io");
    }

    #[test]
    fn other_bundles_are_not_taken_for_criu_ones() {
        let d = tempdir("other");
        assert!(!is_bundle(&d));
        std::fs::write(
            d.join(META),
            br#"{"format":"machinen-bundle","engine":"qemu"}"#,
        )
        .expect("test io");
        assert!(!is_bundle(&d));
        std::fs::write(d.join(META), b"not json").expect("test io");
        assert!(!is_bundle(&d));
        std::fs::remove_dir_all(&d).expect("test io");
    }
}
