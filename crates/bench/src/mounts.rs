//! Host directories in the guest: file I/O on a copy-once mount and on a
//! live mount (virtio-fs) of the same host tree next to the guest's own
//! root disk, in one VM, timed inside the guest (so exec's
//! round trip is not counted): sequential write and read of one large file
//! (page cache dropped before the read), `stat` of every file of a
//! 10,000-file tree (cold, like a first `git status`), and creating then
//! deleting 1,000 small files.

use anyhow::{bail, Context as _, Result};
use machinen::mounts::Mount;

use crate::ctx::{sh, stop, Ctx};
use crate::stats::Section;

/// Where each target lives in the guest.
const TARGETS: &[(&str, &str)] = &[
    ("root", "/root/bench-root"),
    ("copy", "/work/copy"),
    ("live", "/work/live"),
];

pub async fn run(ctx: &Ctx, sec: &mut Section) -> Result<()> {
    let (dirs, per_dir) = if ctx.cfg.quick { (10, 100) } else { (100, 100) };
    let big_mib = if ctx.cfg.quick { 16 } else { 256 };
    let small = if ctx.cfg.quick { 100 } else { 1000 };
    let host = ctx.path("mount-tree");
    let tree = host.join("tree");
    for d in 0..dirs {
        let dir = tree.join(format!("d{d:03}"));
        std::fs::create_dir_all(&dir).context("creating the tree")?;
        for f in 0..per_dir {
            std::fs::write(dir.join(format!("f{f:03}.txt")), format!("file {d} {f}\n"))
                .context("creating the tree")?;
        }
    }
    let mut opts = ctx.boot_options("mounts");
    opts.mounts = vec![Mount {
        host: host.clone(),
        guest: "/work/copy".into(),
    }];
    opts.mount_upper_size = Some((u64::from(big_mib) + 512) << 20);
    opts.live_mounts = vec![machinen::live_mounts::LiveMountArg {
        host: host.clone(),
        guest: "/work/live".into(),
        readonly: None,
    }];
    let vm = machinen::boot(opts).await.context("booting with a mount")?;
    let r = measure(&vm, sec, ctx.cfg.runs, big_mib, small, dirs * per_dir).await;
    stop(vm).await?;
    r
}

/// A shell function timing its arguments in ns, inside the guest.
const TIMED: &str = r#"t() { s=$(date +%s%N); "$@" >/dev/null 2>&1 || exit 9; e=$(date +%s%N); echo $((e - s)); }
drop() { sync; echo 3 > /proc/sys/vm/drop_caches; }"#;

async fn measure(
    vm: &machinen::Vm,
    sec: &mut Section,
    runs: usize,
    big_mib: u32,
    small: u32,
    files: u32,
) -> Result<()> {
    // The same tree on the root disk, copied from the mount.
    sh(
        vm,
        "mkdir -p /root/bench-root && cp -a /work/copy/tree /root/bench-root/ && sync",
    )
    .await?;
    for (name, dir) in TARGETS {
        let got = sh(vm, &format!("find {dir}/tree -type f | wc -l")).await?;
        if got.trim().parse::<u32>().ok() != Some(files) {
            bail!("{dir}/tree has {} files, not {files}", got.trim());
        }
        let (mut write, mut read, mut stat, mut churn) = (vec![], vec![], vec![], vec![]);
        for _ in 0..runs {
            let script = format!(
                "{TIMED}
cd {dir}
drop; t dd if=/dev/zero of=big bs=1M count={big_mib} conv=fsync
drop; t dd if=big of=/dev/null bs=1M
rm big; drop
t find tree -type f -printf '%s\\n'
drop; t sh -c 'mkdir cd && i=0; while [ $i -lt {small} ]; do echo x > cd/f$i; i=$((i+1)); done; rm -r cd; sync'"
            );
            let out = sh(vm, &script).await?;
            let ns: Vec<f64> = out
                .split_whitespace()
                .map(|w| w.parse::<f64>())
                .collect::<Result<_, _>>()
                .with_context(|| format!("timings from the guest: {out:?}"))?;
            let [w, r, s, c] = ns[..] else {
                bail!("timings from the guest: {out:?}");
            };
            let mib_s = |ns: f64| f64::from(big_mib) / (ns / 1e9);
            write.push(mib_s(w));
            read.push(mib_s(r));
            stat.push(s / 1e6);
            churn.push(c / 1e6);
        }
        let what = match *name {
            "root" => "root disk",
            "copy" => "copy-once mount",
            _ => "live mount",
        };
        sec.add(
            &format!("{name}_write_mib_s"),
            &format!("{what}: sequential write, {big_mib} MiB, fsync"),
            "MiB/s",
            write,
        );
        sec.add(
            &format!("{name}_read_mib_s"),
            &format!("{what}: sequential read, {big_mib} MiB, cold"),
            "MiB/s",
            read,
        );
        sec.add(
            &format!("{name}_stat_ms"),
            &format!("{what}: stat {files} files, cold"),
            "ms",
            stat,
        );
        sec.add(
            &format!("{name}_create_delete_ms"),
            &format!("{what}: create and delete {small} files"),
            "ms",
            churn,
        );
    }
    Ok(())
}
