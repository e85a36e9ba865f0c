//! `provision()` with an async JS install hook. The library calls the hook
//! with the live install VM and awaits it; JS cannot be called from here
//! and awaited, so the hook hands JS a handle through a channel
//! (`installVm()`), then waits for JS to say it is done (`installDone()`).

use std::sync::Arc;

use machinen::ErrorCode;
use napi::bindgen_prelude::*;
use napi_derive::napi;
use tokio::sync::{oneshot, Mutex};

use crate::handle::VmHandle;
use crate::options::ProvisionOpts;
use crate::{js_error, to_value};

/// A bake in progress, from `provisionStart`.
#[napi]
pub struct Provisioning {
    vm: Arc<Mutex<Option<oneshot::Receiver<machinen::Vm>>>>,
    done: Arc<std::sync::Mutex<Option<oneshot::Sender<Option<String>>>>>,
    result:
        Arc<Mutex<Option<tokio::task::JoinHandle<machinen::Result<machinen::ProvisionResult>>>>>,
}

/// Start baking an image; with `install`, the bake waits in the install VM
/// for `installVm()` and `installDone()`.
#[napi]
pub async fn provision_start(opts: ProvisionOpts, install: bool) -> Result<Provisioning> {
    let mut opts = opts.into_lib()?;
    let (vm_tx, vm_rx) = oneshot::channel::<machinen::Vm>();
    let (done_tx, done_rx) = oneshot::channel::<Option<String>>();
    if install {
        opts.install = Some(Box::new(move |vm: &machinen::Vm, _| {
            let name = vm.name().to_owned();
            Box::pin(async move {
                let handle = machinen::attach(&name).await?;
                if vm_tx.send(handle).is_err() {
                    return Err(machinen::error::fail(
                        ErrorCode::ProvisionStepFailed,
                        "the install hook's caller went away",
                    )
                    .into());
                }
                match done_rx.await {
                    Ok(None) => Ok(()),
                    Ok(Some(message)) => Err(machinen::error::fail(
                        ErrorCode::ProvisionStepFailed,
                        format!("the install hook failed: {message}"),
                    )
                    .hint("the error the hook threw is this error's cause")
                    .into()),
                    Err(_) => Err(machinen::error::fail(
                        ErrorCode::ProvisionStepFailed,
                        "the install hook never finished",
                    )
                    .into()),
                }
            })
        }));
    }
    let task = tokio::spawn(machinen::provision(opts));
    Ok(Provisioning {
        vm: Arc::new(Mutex::new(Some(vm_rx))),
        done: Arc::new(std::sync::Mutex::new(Some(done_tx))),
        result: Arc::new(Mutex::new(Some(task))),
    })
}

#[napi]
impl Provisioning {
    /// The install VM once it is up; `null` when the bake failed before
    /// (`result()` says why).
    #[napi]
    pub async fn install_vm(&self) -> Result<Option<VmHandle>> {
        let Some(rx) = self.vm.lock().await.take() else {
            return Ok(None);
        };
        Ok(rx.await.ok().map(VmHandle::attached))
    }

    /// The hook ended: `error` is its failure's message, `null` on success.
    #[napi]
    pub fn install_done(&self, error: Option<String>) {
        let tx = self
            .done
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(error);
        }
    }

    /// Give the bake up: its future is dropped, which stops the install VM
    /// and removes the half-written image; `result()` then rejects.
    #[napi]
    pub fn abort(&self) {
        if let Ok(g) = self.result.try_lock() {
            if let Some(task) = g.as_ref() {
                task.abort();
            }
        }
        self.install_done(Some("aborted".into()));
    }

    /// What the bake made (as `machinen provision --json` shows it).
    #[napi]
    pub async fn result(&self) -> Result<serde_json::Value> {
        let Some(task) = self.result.lock().await.take() else {
            return Err(napi::Error::from_reason("result() was already taken"));
        };
        let r = match task.await {
            Ok(r) => r.map_err(js_error)?,
            Err(e) if e.is_cancelled() => return Err(napi::Error::from_reason(crate::ABORT_MARK)),
            Err(e) => {
                return Err(napi::Error::from_reason(format!(
                    "the provision task failed: {e}"
                )))
            }
        };
        to_value(&r)
    }
}

/// Options of `build()` (see `machinen build`).
#[napi(object)]
pub struct BuildOpts {
    pub context: String,
    pub dockerfile: Option<String>,
    pub out: String,
    pub build_args: Option<std::collections::HashMap<String, String>>,
    pub no_cache: Option<bool>,
    pub memory_mib: Option<u32>,
    pub cpus: Option<u32>,
    pub network: Option<String>,
    pub boot_timeout_ms: Option<u32>,
}

/// Bake a Dockerfile into a rootfs tarball (as `machinen build --json`
/// reports it). Steps' output is discarded; a failing RUN rejects with
/// `PROVISION_STEP_FAILED`.
#[napi]
pub async fn build(opts: BuildOpts, cancel: Option<u32>) -> Result<serde_json::Value> {
    let d = machinen::build::BuildOptions::default();
    let mut build_args: Vec<(String, String)> =
        opts.build_args.unwrap_or_default().into_iter().collect();
    build_args.sort();
    let lib = machinen::build::BuildOptions {
        context: opts.context.into(),
        dockerfile: opts.dockerfile.map(Into::into),
        out: opts.out.into(),
        build_args,
        no_cache: opts.no_cache.unwrap_or(false),
        memory_mib: opts.memory_mib,
        cpus: opts.cpus.unwrap_or(d.cpus),
        network: crate::options::network(opts.network)?,
        boot_timeout: opts
            .boot_timeout_ms
            .map(|ms| std::time::Duration::from_millis(ms.into()))
            .unwrap_or(d.boot_timeout),
        progress: machinen::progress::ProgressMode::Quiet,
        step_output: machinen::build::StepOutput::Discard,
        show_steps: false,
        on_phase: Default::default(),
    };
    let r = crate::cancel::cancellable(cancel, machinen::build::build(lib)).await?;
    to_value(&r)
}

/// An image's settings and origin (`machinen images inspect --json`).
#[napi]
pub async fn inspect_image(image: String) -> Result<serde_json::Value> {
    let r = tokio::task::spawn_blocking(move || {
        let paths = machinen::Paths::from_env()?;
        machinen::oci::inspect(
            &paths,
            std::path::Path::new(&image),
            machinen::progress::ProgressMode::Quiet,
        )
    })
    .await
    .map_err(|e| napi::Error::from_reason(format!("the inspect task failed: {e}")))?
    .map_err(js_error)?;
    to_value(&r)
}

/// How this host would restore a native process image, or why not
/// (`machinen image check --json`; refusals are data, not an error).
#[napi]
pub async fn check_process_image(
    dir: String,
    target_arch: Option<String>,
) -> Result<serde_json::Value> {
    let r = tokio::task::spawn_blocking(move || {
        machinen::procimage::check_named(std::path::Path::new(&dir), target_arch.as_deref())
    })
    .await
    .map_err(|e| napi::Error::from_reason(format!("the check task failed: {e}")))?
    .map_err(|e| js_error(e.into()))?;
    to_value(&r)
}

/// Push an image to a registry as a container image (`machinen images push --json`).
#[napi]
pub async fn push_image(image: String, reference: String) -> Result<serde_json::Value> {
    let r = tokio::task::spawn_blocking(move || -> machinen::Result<_> {
        let paths = machinen::Paths::from_env()?;
        Ok(machinen::oci::push::push(
            &paths,
            std::path::Path::new(&image),
            &reference,
            machinen::progress::ProgressMode::Quiet,
        )?)
    })
    .await
    .map_err(|e| napi::Error::from_reason(format!("the push task failed: {e}")))?
    .map_err(js_error)?;
    to_value(&r)
}
