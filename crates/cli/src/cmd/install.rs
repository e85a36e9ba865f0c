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
    let report = tokio::task::spawn_blocking(move || assets::install(&paths, &opts))
        .await
        .map_err(|e| fail(ErrorCode::Io, "the install task failed").source(e))??;
    if a.json {
        print_json(&report);
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
    Ok(0)
}
