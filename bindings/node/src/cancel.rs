//! Cancellation of long calls from JS (`AbortSignal`): `index.js` asks for
//! an id, cancels it when the signal fires, and passes the id to the call.
//! Ids rather than objects, so the calls' futures stay `Send + 'static`.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

use napi_derive::napi;
use tokio_util::sync::CancellationToken;

fn tokens() -> &'static Mutex<HashMap<u32, CancellationToken>> {
    static TOKENS: OnceLock<Mutex<HashMap<u32, CancellationToken>>> = OnceLock::new();
    TOKENS.get_or_init(Default::default)
}

fn lock() -> std::sync::MutexGuard<'static, HashMap<u32, CancellationToken>> {
    tokens()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A new cancellation id (release it with [`release_cancel`]).
#[napi]
pub fn new_cancel() -> u32 {
    static NEXT: AtomicU32 = AtomicU32::new(1);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    lock().insert(id, CancellationToken::new());
    id
}

/// Give up the calls that were passed `id`.
#[napi]
pub fn cancel(id: u32) {
    if let Some(t) = lock().get(&id) {
        t.cancel();
    }
}

/// Forget `id` (its call ended).
#[napi]
pub fn release_cancel(id: u32) {
    lock().remove(&id);
}

fn token(id: Option<u32>) -> CancellationToken {
    id.and_then(|id| lock().get(&id).cloned())
        .unwrap_or_default()
}

/// Run `fut` unless `id` is cancelled first; the future is then dropped,
/// which closes its connections (the guest command is killed, a
/// foreground VM being started stops).
pub async fn cancellable<T>(
    id: Option<u32>,
    fut: impl Future<Output = machinen::Result<T>>,
) -> napi::Result<T> {
    let token = token(id);
    tokio::select! {
        r = fut => r.map_err(crate::js_error),
        _ = token.cancelled() => Err(napi::Error::from_reason(crate::ABORT_MARK)),
    }
}
