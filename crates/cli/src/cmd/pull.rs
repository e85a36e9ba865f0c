//! `machinen pull IMAGE`

use machinen::progress::ProgressMode;
use machinen::Result;

use crate::cli::PullArgs;
use crate::output::print_json;

pub async fn run(a: PullArgs) -> Result<i32> {
    let progress = if a.json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    };
    let paths = machinen::paths::Paths::from_env()?;
    let image = a.image.clone();
    let pulled = tokio::task::spawn_blocking(move || machinen::oci::pull(&paths, &image, progress))
        .await
        .map_err(|e| {
            machinen::error::fail(machinen::ErrorCode::Io, "the pull task failed").source(e)
        })??;
    if a.json {
        print_json(&pulled);
    } else {
        println!("{} -> {}", pulled.reference, pulled.tarball.display());
    }
    Ok(0)
}
