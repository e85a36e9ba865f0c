//! The native half of the `@machinen/runtime` Node.js package.
//!
//! Thin by design: each function maps JS options onto the library's, runs
//! the library's operation on napi's tokio runtime (never on Node's event
//! loop; blocking registry work goes to `spawn_blocking`), and turns a
//! library error into a JS error whose message carries the error's JSON
//! after [`ERROR_MARK`]. `index.js` turns that into a `MachinenError` and
//! gives the API the reference runtime's shape (argv or shell string,
//! output callbacks, `AbortSignal`, camelCase results).

mod cancel;
mod exec;
mod handle;
mod options;
mod provision;

use napi::bindgen_prelude::*;
use napi_derive::napi;

pub use cancel::{cancel, new_cancel, release_cancel};
pub use handle::{attach, boot, restore, VmHandle};
pub use provision::{
    build, check_process_image, inspect_image, provision_start, push_image, Provisioning,
};

/// Prefix of the message of every error raised by the library: the rest is
/// `{"code","message","causes","hint","retryable"}`.
pub const ERROR_MARK: &str = "machinen-error:";

/// The message of an operation given up because its `AbortSignal` fired.
pub const ABORT_MARK: &str = "machinen-aborted";

pub(crate) fn js_error(e: machinen::Error) -> napi::Error {
    let json = e.to_json()["error"].clone();
    napi::Error::new(Status::GenericFailure, format!("{ERROR_MARK}{json}"))
}

pub(crate) fn invalid(code: machinen::ErrorCode, message: String, hint: &str) -> napi::Error {
    js_error(machinen::error::fail(code, message).hint(hint).into())
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<serde_json::Value> {
    serde_json::to_value(v).map_err(|e| napi::Error::from_reason(e.to_string()))
}

/// Run blocking library work (registry files) off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> machinen::Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| napi::Error::from_reason(format!("a blocking task failed: {e}")))?
        .map_err(js_error)
}

/// One entry of [`error_codes`].
#[napi(object)]
pub struct ErrorCodeInfo {
    pub code: String,
    pub retryable: bool,
}

/// Every error code the library can raise: `ErrorCode` in `index.js` is
/// built from this list, so the two cannot drift.
#[napi]
pub fn error_codes() -> Vec<ErrorCodeInfo> {
    machinen::error::ALL
        .iter()
        .map(|c| ErrorCodeInfo {
            code: c.as_str().to_owned(),
            retryable: c.retryable(),
        })
        .collect()
}

/// Where the package keeps `machinen-vmm` and `machinen-agent`: searched
/// before the running program's directory (which is Node's).
#[napi]
pub fn set_bin_dir(dir: String) {
    machinen::binaries::set_search_dir(dir);
}

/// The library's version.
#[napi]
pub fn version() -> String {
    env!("CARGO_PKG_VERSION").to_owned()
}

/// Live VMs (`all`: and those that ended without being stopped), as
/// `machinen ls --json` shows them.
#[napi]
pub async fn list(all: bool) -> Result<serde_json::Value> {
    let vms = blocking(move || {
        if all {
            machinen::list_all()
        } else {
            machinen::list()
        }
    })
    .await?;
    to_value(&vms)
}

/// Clean up after VMs that crashed or whose supervisor died.
#[napi]
pub async fn run_gc(dry_run: bool) -> Result<serde_json::Value> {
    let report = blocking(move || machinen::gc(dry_run)).await?;
    to_value(&report)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_code_is_listed_once() {
        let codes = super::error_codes();
        assert_eq!(codes.len(), machinen::error::ALL.len());
        let mut names: Vec<_> = codes.iter().map(|c| c.code.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), codes.len());
        assert!(names.contains(&"EXEC_NONZERO_EXIT"));
        assert!(codes
            .iter()
            .any(|c| c.code == "EXEC_VSOCK_UNAVAILABLE" && c.retryable));
    }

    #[test]
    fn library_errors_travel_as_json_after_the_mark() {
        let e = super::js_error(
            machinen::error::fail(machinen::ErrorCode::FilesNotFound, "no /x")
                .hint("look elsewhere")
                .into(),
        );
        let json = e.reason.strip_prefix(super::ERROR_MARK).expect("marked");
        let v: serde_json::Value = serde_json::from_str(json).expect("JSON");
        assert_eq!(v["code"], "FILES_NOT_FOUND");
        assert_eq!(v["message"], "no /x");
        assert_eq!(v["hint"], "look elsewhere");
        assert_eq!(v["retryable"], false);
    }
}
