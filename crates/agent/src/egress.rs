//! The guest's end of the egress proxy (see `machinen_proto::egress`): a
//! listener on the guest's loopback whose connections the supervisor takes
//! one `EgressAccept` stream at a time, the per-VM CA the guest's clients
//! trust, and the variables every command gets.

use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use machinen_proto::egress::EgressSetup;
use machinen_proto::{send, ErrorCode, Frame, Response, WireError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::log::{debug, info};

/// Where the CA goes: a tmpfs-backed directory of ours, so the guest's own
/// trust store is not rewritten.
const DIR: &str = "/run/machinen/egress";
/// The guest's system bundle, which ours extends.
const SYSTEM_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Default)]
struct State {
    listener: Option<Arc<TcpListener>>,
    env: Vec<(String, String)>,
}

fn state() -> &'static Mutex<State> {
    static S: OnceLock<Mutex<State>> = OnceLock::new();
    S.get_or_init(Mutex::default)
}

fn lock() -> std::sync::MutexGuard<'static, State> {
    state().lock().unwrap_or_else(|p| p.into_inner())
}

/// The variables the egress proxy adds to every command's environment
/// (before the command's own, which win).
pub fn env() -> Vec<(String, String)> {
    lock().env.clone()
}

fn error(code: ErrorCode, message: String) -> Frame {
    Frame::Error(WireError {
        code: code.as_str().into(),
        message,
    })
}

/// `EgressSetup`: listen (once; a repeat after a restore keeps the
/// listener), write the CA files, set the variables.
pub async fn serve_setup<S>(mut s: S, setup: EgressSetup)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let answer = match setup_inner(&setup).await {
        Ok(()) => Frame::Response(Response::EgressReady),
        Err(e) => error(ErrorCode::NetworkUnavailable, e),
    };
    let _ = send(&mut s, &answer).await;
    let _ = s.shutdown().await;
}

async fn setup_inner(setup: &EgressSetup) -> Result<(), String> {
    let ca = format!("{DIR}/ca.pem");
    let bundle = format!("{DIR}/ca-bundle.pem");
    let pem = setup.ca_pem.clone();
    let (ca2, bundle2) = (ca.clone(), bundle.clone());
    tokio::task::spawn_blocking(move || write_ca(&pem, &ca2, &bundle2))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("writing the egress CA under {DIR}: {e}"))?;
    let listener = {
        let existing = lock().listener.clone();
        match existing {
            Some(l) => l,
            None => {
                let l = TcpListener::bind(("127.0.0.1", setup.port))
                    .await
                    .map_err(|e| format!("listening on 127.0.0.1:{}: {e}", setup.port))?;
                Arc::new(l)
            }
        }
    };
    let proxy = format!("http://127.0.0.1:{}", setup.port);
    let mut env = setup.env.clone();
    for k in ["HTTPS_PROXY", "https_proxy"] {
        env.push((k.into(), proxy.clone()));
    }
    for k in ["NO_PROXY", "no_proxy"] {
        env.push((k.into(), "localhost,127.0.0.1,::1".into()));
    }
    // What the common clients read for their trust store: OpenSSL and
    // curl, Python's requests, Node (which adds to its own).
    for k in ["SSL_CERT_FILE", "CURL_CA_BUNDLE", "REQUESTS_CA_BUNDLE"] {
        env.push((k.into(), bundle.clone()));
    }
    env.push(("NODE_EXTRA_CA_CERTS".into(), ca));
    let mut st = lock();
    st.listener = Some(listener);
    st.env = env;
    info!("egress proxy on 127.0.0.1:{}", setup.port);
    Ok(())
}

fn write_ca(pem: &str, ca: &str, bundle: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(DIR)?;
    let mut all = std::fs::read(SYSTEM_BUNDLE).unwrap_or_default();
    if !all.is_empty() && !all.ends_with(b"\n") {
        all.push(b'\n');
    }
    all.extend_from_slice(pem.as_bytes());
    for (path, bytes) in [(ca, pem.as_bytes()), (bundle, &all[..])] {
        let tmp = format!("{path}.tmp");
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, Path::new(path))?;
    }
    Ok(())
}

/// `EgressAccept`: the next guest connection to the proxy, spliced onto
/// this stream.
pub async fn serve_accept<S>(mut s: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let listener = lock().listener.clone();
    let Some(listener) = listener else {
        let _ = send(
            &mut s,
            &error(
                ErrorCode::NetworkUnavailable,
                "this VM has no egress proxy".into(),
            ),
        )
        .await;
        let _ = s.shutdown().await;
        return;
    };
    let mut conn = match listener.accept().await {
        Ok((c, _)) => c,
        Err(e) => {
            let _ = send(
                &mut s,
                &error(ErrorCode::NetworkUnavailable, format!("accept: {e}")),
            )
            .await;
            let _ = s.shutdown().await;
            return;
        }
    };
    let _ = conn.set_nodelay(true);
    if send(&mut s, &Frame::Response(Response::Connected))
        .await
        .is_err()
    {
        // The host went away (a snapshot's session ended): this guest
        // connection gets a reset, as from any dead proxy.
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut s, &mut conn).await {
        debug!("egress proxy connection ended: {e}");
    }
}
