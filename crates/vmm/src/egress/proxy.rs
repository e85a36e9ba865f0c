//! One guest connection to the egress proxy: HTTP/1.1 `CONNECT` only.
//!
//! The target is judged by the VM's egress policy (names and addresses, as
//! the filter judges packets) and refused with `403`, or connected. To a
//! host without secrets the tunnel carries the guest's bytes untouched
//! (its TLS is end to end). To a host with secrets the proxy answers the
//! guest's TLS with a certificate from the VM's CA, reads each request,
//! replaces the placeholders of the secrets for that host in its headers
//! (nowhere else: not the body, not the URL), and sends it on over TLS to
//! the real host, whose certificate is checked against the host's trust
//! store.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use machinen_proto::timeouts;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::Egress;
use crate::agent::AgentStream;

type Body = BoxBody<Bytes, hyper::Error>;

fn text(status: StatusCode, msg: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(msg + "\n"))
            .map_err(|never: Infallible| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn empty() -> Body {
    Full::new(Bytes::new())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// Serve one guest connection (after the agent's `Connected`).
pub async fn serve(egress: Arc<Egress>, stream: AgentStream) {
    let io = TokioIo::new(stream);
    let svc = service_fn(move |req| {
        let egress = egress.clone();
        async move { Ok::<_, Infallible>(connect(egress, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, svc)
        .with_upgrades()
        .await
    {
        tracing::debug!("egress proxy connection: {e}");
    }
}

async fn connect(egress: Arc<Egress>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::CONNECT {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "this proxy only tunnels HTTPS (CONNECT); plain HTTP goes out directly".into(),
        );
    }
    let Some(auth) = req.uri().authority().cloned() else {
        return text(StatusCode::BAD_REQUEST, "CONNECT needs HOST:PORT".into());
    };
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_ascii_lowercase();
    let port = auth.port_u16().unwrap_or(443);
    let addrs: Vec<IpAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![ip],
        Err(_) => match tokio::net::lookup_host((host.as_str(), port)).await {
            Ok(a) => a.map(|s| s.ip()).collect(),
            Err(e) => {
                return text(
                    StatusCode::BAD_GATEWAY,
                    format!("cannot resolve {host}: {e}"),
                )
            }
        },
    };
    let allowed = match egress.net.judge_proxied(&host, &addrs, port) {
        Ok(a) => a,
        Err(rule) => {
            return text(
                StatusCode::FORBIDDEN,
                format!("egress to {host}:{port} refused by {rule}"),
            )
        }
    };
    let targets: Vec<SocketAddr> = allowed
        .iter()
        .map(|ip| SocketAddr::new(*ip, port))
        .collect();
    let upstream = match tokio::time::timeout(
        timeouts::EGRESS_UPSTREAM_CONNECT,
        TcpStream::connect(&targets[..]),
    )
    .await
    {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("connecting to {host}:{port}: {e}"),
            )
        }
        Err(_) => {
            return text(
                StatusCode::GATEWAY_TIMEOUT,
                format!("connecting to {host}:{port} timed out"),
            )
        }
    };
    let _ = upstream.set_nodelay(true);
    egress.net.count_proxied_connection();
    tokio::spawn(async move {
        let upgraded = match hyper::upgrade::on(req).await {
            Ok(u) => TokioIo::new(u),
            Err(e) => {
                tracing::debug!("egress proxy upgrade: {e}");
                return;
            }
        };
        let counted = Counted::new(upstream);
        let (out, back) = (counted.out.clone(), counted.back.clone());
        if egress.intercepts(&host) {
            intercept(&egress, upgraded, counted, &host).await;
        } else {
            let mut guest = upgraded;
            let mut up = counted;
            let _ = tokio::io::copy_bidirectional(&mut guest, &mut up).await;
        }
        egress
            .net
            .count_proxied(out.load(Ordering::Relaxed), back.load(Ordering::Relaxed));
    });
    Response::new(empty())
}

/// Terminate the guest's TLS and forward its requests with the secrets put
/// in.
async fn intercept<G>(egress: &Arc<Egress>, guest: G, upstream: Counted, host: &str)
where
    G: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let server_cfg = match egress.leaf_config(host) {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("egress proxy: certificate for {host}: {e}");
            return;
        }
    };
    let guest_tls = match tokio_rustls::TlsAcceptor::from(server_cfg)
        .accept(guest)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(
                "egress proxy: the guest's TLS to {host} failed (does it trust the VM's CA?): {e}"
            );
            return;
        }
    };
    let name = match rustls::pki_types::ServerName::try_from(host.to_string()) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("egress proxy: {host}: {e}");
            return;
        }
    };
    let up_tls = match tokio_rustls::TlsConnector::from(egress.client_tls.clone())
        .connect(name, upstream)
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("egress proxy: TLS to {host}: {e}");
            // The guest's request gets a 502 saying so.
            let msg = format!("TLS to {host} failed: {e}");
            let svc = service_fn(move |_req: Request<Incoming>| {
                let msg = msg.clone();
                async move { Ok::<_, Infallible>(text(StatusCode::BAD_GATEWAY, msg)) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(guest_tls), svc)
                .await;
            return;
        }
    };
    let (sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(up_tls)).await {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!("egress proxy: HTTP to {host}: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("egress proxy upstream connection: {e}");
        }
    });
    let sender = Arc::new(tokio::sync::Mutex::new(sender));
    let for_svc = host.to_string();
    let egress = egress.clone();
    let svc = service_fn(move |req: Request<Incoming>| {
        let (sender, egress, host) = (sender.clone(), egress.clone(), for_svc.clone());
        async move { Ok::<_, Infallible>(forward(&egress, &sender, &host, req).await) }
    });
    if let Err(e) = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(guest_tls), svc)
        .await
    {
        tracing::debug!("egress proxy: requests to {host}: {e}");
    }
}

async fn forward(
    egress: &Egress,
    sender: &tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Incoming>>,
    host: &str,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let secrets = egress.for_host(host).await;
    for (spec, value) in &secrets {
        let uses = req
            .headers()
            .values()
            .any(|v| contains(v.as_bytes(), spec.placeholder.as_bytes()));
        if !uses {
            continue;
        }
        let Some(value) = value else {
            return text(
                StatusCode::FORBIDDEN,
                format!(
                    "egress secret {} has no value in this VM (a restore or fork takes it again: --egress-secret {}@{}=VALUE)",
                    spec.name,
                    spec.name,
                    spec.hosts.join(",")
                ),
            );
        };
        for v in req.headers_mut().values_mut() {
            if let Some(new) = replace(v.as_bytes(), spec.placeholder.as_bytes(), &value.0) {
                match HeaderValue::from_bytes(&new) {
                    Ok(mut h) => {
                        h.set_sensitive(true);
                        *v = h;
                    }
                    Err(_) => {
                        return text(
                            StatusCode::BAD_REQUEST,
                            format!("egress secret {}: not a valid header value", spec.name),
                        )
                    }
                }
            }
        }
    }
    let mut s = sender.lock().await;
    if s.ready().await.is_err() {
        return text(
            StatusCode::BAD_GATEWAY,
            format!("the connection to {host} closed"),
        );
    }
    match s.send_request(req).await {
        Ok(resp) => resp.map(|b| b.boxed()),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("{host}: {e}")),
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// `hay` with every `needle` replaced, or `None` when it has none.
fn replace(hay: &[u8], needle: &[u8], with: &[u8]) -> Option<Vec<u8>> {
    if !contains(hay, needle) {
        return None;
    }
    let mut out = Vec::with_capacity(hay.len() + with.len());
    let mut i = 0;
    while i < hay.len() {
        if hay[i..].starts_with(needle) {
            out.extend_from_slice(with);
            i += needle.len();
        } else {
            out.push(hay[i]);
            i += 1;
        }
    }
    Some(out)
}

/// A TCP stream that counts what goes each way.
struct Counted {
    inner: TcpStream,
    out: Arc<AtomicU64>,
    back: Arc<AtomicU64>,
}

impl Counted {
    fn new(inner: TcpStream) -> Counted {
        Counted {
            inner,
            out: Arc::default(),
            back: Arc::default(),
        }
    }
}

impl AsyncRead for Counted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.back.fetch_add(n as u64, Ordering::Relaxed);
        r
    }
}

impl AsyncWrite for Counted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.out.fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_wherever_they_occur_in_a_value() {
        assert_eq!(
            replace(b"Bearer PH", b"PH", b"sk-1").as_deref(),
            Some(&b"Bearer sk-1"[..])
        );
        assert_eq!(replace(b"PH:PH", b"PH", b"v").as_deref(), Some(&b"v:v"[..]));
        assert_eq!(replace(b"nothing here", b"PH", b"v"), None);
        assert!(!contains(b"abc", b""));
    }
}
