//! `machinen images [rm IMAGE… | prune | export IMAGE TARGET | inspect IMAGE | push IMAGE REF]`

use machinen::paths::Paths;
use machinen::Result;

use crate::cli::{ImagesAction, ImagesArgs};
use crate::output::print_json;

pub async fn run(a: ImagesArgs) -> Result<i32> {
    let paths = Paths::from_env()?;
    let json = a.json;
    let progress = if json {
        machinen::progress::ProgressMode::Quiet
    } else {
        machinen::progress::ProgressMode::Auto
    };
    let work = move || -> Result<i32> {
        match a.action {
            None => {
                let l = machinen::oci::cache::list(&paths);
                if json {
                    print_json(&l);
                    return Ok(0);
                }
                crate::outln!("{:<56} DIGEST", "PULLED");
                for p in &l.pulled {
                    crate::outln!("{:<56} {}", p.reference, short(&p.digest));
                }
                crate::outln!("\n{:<20} {:>11}  CONVERTED", "IMAGE", "SIZE");
                for c in &l.converted {
                    crate::outln!(
                        "{:<20} {:>7} MiB  {}",
                        short(&c.digest),
                        c.size_bytes >> 20,
                        c.path.display()
                    );
                }
                crate::outln!("\npulled blobs: {} MiB", l.blob_bytes >> 20);
            }
            Some(ImagesAction::Rm { names }) => {
                let removed = machinen::oci::cache::remove(&paths, &names)?;
                if json {
                    print_json(&removed);
                } else {
                    for r in removed {
                        crate::outln!("removed {r}");
                    }
                }
            }
            Some(ImagesAction::Export { image, target }) => {
                let exported = export(&paths, &image, &target)?;
                if json {
                    print_json(&exported);
                } else {
                    crate::outln!("{} {}", exported.target, exported.manifest_digest);
                }
            }
            Some(ImagesAction::Inspect { image }) => {
                let i = machinen::oci::inspect(&paths, &image, progress)?;
                if json {
                    print_json(&i);
                } else {
                    crate::outln!("image   {}", i.image);
                    if let Some(s) = &i.source {
                        crate::outln!("source  {s}");
                    }
                    crate::outln!(
                        "rootfs  {} ({:.1} MiB)",
                        i.tarball.display(),
                        i.size_bytes as f64 / 1048576.0
                    );
                    print_config(&i.config);
                }
            }
            Some(ImagesAction::Push { image, reference }) => {
                let p = machinen::oci::push::push(&paths, &image, &reference, progress)?;
                if json {
                    print_json(&p);
                } else {
                    crate::outln!("{}@{}", p.reference, p.digest);
                }
            }
            Some(ImagesAction::Prune { all }) => {
                let grace = if all {
                    std::time::Duration::ZERO
                } else {
                    machinen::oci::cache::PULL_GRACE
                };
                let freed = machinen::oci::cache::prune_all(&paths, grace)?;
                if json {
                    print_json(&serde_json::json!({ "freed_bytes": freed }));
                } else {
                    crate::outln!("freed {} MiB", freed >> 20);
                }
            }
        }
        Ok(0)
    };
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        machinen::error::fail(machinen::ErrorCode::Io, "the images task failed").source(e)
    })?
}

/// Export `image` (a tarball, or a reference resolved to its converted
/// tarball) to `target` (`oci:…` or `docker-archive:…`).
pub fn export(
    paths: &Paths,
    image: &std::path::Path,
    target: &str,
) -> Result<machinen::oci::export::Exported> {
    let Some(t) = machinen::oci::export::Target::parse(target) else {
        return Err(machinen::error::fail(
            machinen::ErrorCode::ProvisionArgsInvalid,
            format!("{target:?} is not an export target"),
        )
        .hint("oci:DIR[:TAG] or docker-archive:FILE[:REPO[:TAG]]")
        .into());
    };
    let tarball = machinen::oci::resolve(paths, image, machinen::progress::ProgressMode::Quiet)?;
    Ok(machinen::oci::export::export(&tarball, &t)?)
}

/// An image's settings, one per line (what `images inspect`, `build` and
/// `provision` print).
pub fn print_config(c: &machinen::provision::ImageConfig) {
    let j = |v: &Vec<String>| serde_json::to_string(v).unwrap_or_default();
    match &c.cmd {
        Some(cmd) => crate::outln!("  cmd         {}", j(cmd)),
        None => crate::outln!("  cmd         (none: a command must be given at boot)"),
    }
    if let Some(ep) = &c.entrypoint {
        crate::outln!("  entrypoint  {}", j(ep));
    }
    if let Some(cwd) = &c.cwd {
        crate::outln!("  cwd         {cwd}");
    }
    if let Some(u) = &c.user {
        crate::outln!("  user        {u}");
    }
    for (k, v) in &c.env {
        crate::outln!("  env         {k}={v}");
    }
    if !c.exposed_ports.is_empty() {
        crate::outln!("  ports       {}", c.exposed_ports.join(" "));
    }
    for (k, v) in &c.labels {
        crate::outln!("  label       {k}={v}");
    }
}

/// `sha256:` and the first 12 hex digits.
fn short(digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    hex.get(..12).unwrap_or(hex).to_string()
}
