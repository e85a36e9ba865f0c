//! `machinen pull IMAGE`, `machinen pull REF DIR` and `machinen push BUNDLE REF`

use machinen::progress::ProgressMode;
use machinen::Result;

use crate::cli::{PullArgs, PushArgs};
use crate::output::print_json;

fn progress(json: bool) -> ProgressMode {
    if json {
        ProgressMode::Quiet
    } else {
        ProgressMode::Auto
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(|e| {
        machinen::error::fail(machinen::ErrorCode::Io, "the registry task failed").source(e)
    })?
}

pub async fn run(a: PullArgs) -> Result<i32> {
    let progress = progress(a.json);
    let paths = machinen::paths::Paths::from_env()?;
    let image = a.image.clone();
    if let Some(dir) = a.dir {
        let r = blocking(move || machinen::transport::pull(&paths, &image, &dir, progress)).await?;
        if a.json {
            print_json(&r);
        } else {
            crate::outln!(
                "{} -> {} ({} bundle{}, {} of {} chunks downloaded, {:.1} MiB)",
                r.reference,
                r.dir.display(),
                r.bundles,
                if r.bundles == 1 { "" } else { "s" },
                r.downloaded_chunks,
                r.chunks,
                r.downloaded_bytes as f64 / 1048576.0
            );
        }
        return Ok(0);
    }
    let pulled = blocking(move || Ok(machinen::oci::pull(&paths, &image, progress)?)).await?;
    if a.json {
        print_json(&pulled);
    } else {
        crate::outln!("{} -> {}", pulled.reference, pulled.tarball.display());
    }
    Ok(0)
}

pub async fn push(a: PushArgs) -> Result<i32> {
    let progress = progress(a.json);
    let (bundle, reference) = (a.bundle.clone(), a.reference.clone());
    let r = blocking(move || machinen::transport::push(&bundle, &reference, progress)).await?;
    if a.json {
        print_json(&r);
    } else {
        crate::outln!(
            "{} -> {}@{} ({} bundle{}; {} of {} chunks uploaded, {:.1} of {:.1} MiB)",
            a.bundle.display(),
            r.reference,
            r.digest,
            r.bundles,
            if r.bundles == 1 { "" } else { "s" },
            r.uploaded_chunks,
            r.chunks,
            r.uploaded_bytes as f64 / 1048576.0,
            r.bytes as f64 / 1048576.0
        );
    }
    Ok(0)
}
