//! `machinen install [--force]`

use machinen::assets::{self, InstallOptions};
use machinen::error::fail;
use machinen::progress::ProgressMode;
use machinen::{ErrorCode, Paths, Result};

use crate::cli::InstallArgs;
use crate::output::print_json;

pub async fn run(a: InstallArgs) -> Result<i32> {
    let paths = Paths::from_env()?;
    let opts = InstallOptions {
        force: a.force,
        progress: if a.json {
            ProgressMode::Quiet
        } else {
            ProgressMode::Auto
        },
    };
    let criu = a.criu;
    let (report, criu) = tokio::task::spawn_blocking(move || -> Result<_> {
        let report = assets::install(&paths, &opts)?;
        let criu = if !criu {
            None
        } else if let (false, Some(c)) = (
            opts.force,
            assets::criu::installed(&paths.assets, &report.assets),
        ) {
            Some(c)
        } else {
            Some(assets::criu::install(
                &paths.assets,
                &report.assets,
                opts.progress,
            )?)
        };
        Ok((report, criu))
    })
    .await
    .map_err(|e| fail(ErrorCode::Io, "the install task failed").source(e))??;
    if a.json {
        let mut v = serde_json::to_value(&report).unwrap_or_default();
        if let Some(c) = &criu {
            v["criu"] = serde_json::to_value(c).unwrap_or_default();
        }
        print_json(&v);
    } else if report.already_installed {
        crate::outln!(
            "already installed: kernel {} and base rootfs in {}",
            report.assets.kernel_version,
            report
                .assets
                .rootfs
                .parent()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
    } else {
        crate::outln!(
            "installed kernel {} and base rootfs {} in {:.1} s",
            report.assets.kernel_version,
            report.assets.rootfs.display(),
            report.elapsed_ms as f64 / 1000.0
        );
    }
    if let (Some(c), false) = (&criu, a.json) {
        crate::outln!(
            "CRIU {} for the guest in {} (modules: {})",
            c.version,
            c.dir.display(),
            c.modules.join(", ")
        );
    }
    Ok(0)
}
