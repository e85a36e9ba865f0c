//! Native process images (the portable engine's format): reading one from
//! a directory and deciding whether this host can restore it. The format,
//! its documents, schemas and refusal vocabulary live in the
//! `machinen-procimage` crate, re-exported here as [`format`].

use std::path::Path;

pub use machinen_procimage as format;
use machinen_procimage::{CheckOptions, Plan};

use crate::error::{fail, ErrorCode, Failure};

/// Read the image in `dir` and check it against `opts`: the plan, whether
/// it is restorable or not (its `refusals` say). An image whose documents
/// are missing, malformed or inconsistent is `PORTABLE_IMAGE_INVALID`,
/// naming every problem.
pub fn check(dir: &Path, opts: CheckOptions) -> Result<Plan, Failure> {
    if !dir.is_dir() {
        return Err(fail(
            ErrorCode::PortableImageInvalid,
            format!("{} is not a directory", dir.display()),
        )
        .hint("give the directory that holds native-process.json and its companions"));
    }
    let image = machinen_procimage::read_dir(dir).map_err(|e| {
        fail(
            ErrorCode::PortableImageInvalid,
            format!(
                "{} is not a valid native process image ({} problems)",
                dir.display(),
                e.errors.len()
            ),
        )
        .hint(e.errors.join("\n"))
    })?;
    Ok(machinen_procimage::check(&image, opts))
}

/// The error for a plan with refusals: `BOOT_PORTABLE_UNSUPPORTED`, its
/// codes in the message, each refusal in the hint.
pub fn unsupported(dir: &Path, plan: &Plan) -> Failure {
    let mut codes: Vec<&str> = plan.refusals.iter().map(|r| r.code.as_str()).collect();
    codes.dedup();
    fail(
        ErrorCode::BootPortableUnsupported,
        format!(
            "{} cannot be restored on {}: {}",
            dir.display(),
            plan.target_arch,
            codes.join(", ")
        ),
    )
    .hint(
        plan.refusals
            .iter()
            .map(|r| format!("{}: {}", r.code, r.message))
            .collect::<Vec<_>>()
            .join("\n"),
    )
}
