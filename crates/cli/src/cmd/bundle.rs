//! `machinen bundle ls|verify|flatten`

use std::path::{Path, PathBuf};

use machinen::chain::{self, Summary};
use machinen::paths::Paths;
use machinen::Result;

use crate::cli::{BundleAction, BundleArgs};
use crate::output::print_json;

/// The bundles under `path`: itself, or the bundles directly inside it.
fn bundles_in(path: &Path) -> Vec<PathBuf> {
    if path.join(machinen::bundle::META).is_file() {
        return vec![path.to_path_buf()];
    }
    let mut out: Vec<PathBuf> = std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join(machinen::bundle::META).is_file())
        .collect();
    out.sort();
    out
}

fn print_summaries(list: &[Summary]) {
    crate::outln!(
        "{:<32} {:<6} {:>4} {:>10}  PARENT",
        "BUNDLE",
        "KIND",
        "SEQ",
        "ON DISK"
    );
    for s in list {
        let kind = match (s.kind, s.ram_delta) {
            ("delta", true) => "delta",
            ("delta", false) => "delta*",
            (k, _) => k,
        };
        crate::outln!(
            "{:<32} {:<6} {:>4} {:>6} MiB  {}",
            s.path.display(),
            kind,
            s.chain_seq,
            s.disk_bytes >> 20,
            s.parent
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "-".into())
        );
    }
    if list.iter().any(|s| s.kind == "delta" && !s.ram_delta) {
        crate::outln!("delta*: the disk is a delta, the RAM is whole");
    }
}

pub async fn run(a: BundleArgs) -> Result<i32> {
    let json = a.json;
    let work = move || -> Result<i32> {
        match a.action {
            BundleAction::Ls { paths } => {
                let mut list = Vec::new();
                for p in &paths {
                    for b in bundles_in(p) {
                        list.push(chain::summary(&b)?);
                    }
                }
                if json {
                    print_json(&list);
                } else {
                    print_summaries(&list);
                }
            }
            BundleAction::Verify { bundle } => {
                let dir = std::fs::canonicalize(&bundle)?;
                let links = chain::resolve(&dir)?;
                chain::verify_links(&links)?;
                if let Some(tip) = links.last() {
                    machinen::bundle::verify_files(
                        &tip.dir,
                        &tip.manifest,
                        machinen::bundle::LARGE_FILES,
                    )?;
                }
                let list = links
                    .iter()
                    .map(|l| chain::summary(&l.dir))
                    .collect::<Result<Vec<_>, _>>()?;
                if json {
                    print_json(&serde_json::json!({ "ok": true, "chain": list }));
                } else {
                    print_summaries(&list);
                    crate::outln!(
                        "{}: verified ({} bundle{} in its chain)",
                        dir.display(),
                        list.len(),
                        if list.len() == 1 { "" } else { "s" }
                    );
                }
            }
            BundleAction::Flatten { tip, out } => {
                let paths = Paths::from_env()?;
                let dir = std::fs::canonicalize(&tip)?;
                let out = if out.is_absolute() {
                    out
                } else {
                    std::env::current_dir()?.join(out)
                };
                let done = chain::flatten_bundle(&paths, &dir, &out)?;
                let s = chain::summary(&done)?;
                if json {
                    print_json(&s);
                } else {
                    crate::outln!(
                        "{} -> {} (self-contained, {} MiB on disk)",
                        dir.display(),
                        done.display(),
                        s.disk_bytes >> 20
                    );
                }
            }
        }
        Ok(0)
    };
    tokio::task::spawn_blocking(work).await.map_err(|e| {
        machinen::error::fail(machinen::ErrorCode::Io, "the bundle task failed").source(e)
    })?
}
