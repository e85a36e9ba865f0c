//! Host port forwards (`-p [ADDR:]HOST:GUEST`): the supervisor listens on
//! the host and carries each accepted connection over its own agent stream
//! to the guest's `127.0.0.1:GUEST`. Needs no host networking privileges and
//! works the same after restore and for forks.

use machinen_proto::timeouts;
use std::net::SocketAddr;
use std::sync::Arc;

use machinen::registry::PortForward;
use machinen_proto::{self as proto, Frame, Request, Response};
use tokio::net::{TcpListener, TcpStream};

use crate::control::Shared;

/// Bind every forward; the first failure is returned with the forward.
pub async fn bind_all(
    ports: &[PortForward],
) -> Result<Vec<(PortForward, TcpListener)>, (PortForward, std::io::Error)> {
    let mut out = Vec::new();
    for p in ports {
        let addr: SocketAddr = match machinen::ports::host_socket_addr(p) {
            Some(a) => a,
            None => {
                return Err((
                    p.clone(),
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidInput,
                        format!("{:?} is not an IP address", p.host_addr),
                    ),
                ))
            }
        };
        match TcpListener::bind(addr).await {
            Ok(l) => out.push((p.clone(), l)),
            Err(e) => return Err((p.clone(), e)),
        }
    }
    Ok(out)
}

/// Accept connections forever, forwarding each to the guest.
pub async fn serve(forward: PortForward, listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!("accept on {}:{}: {e}", forward.host_addr, forward.host_port);
                tokio::time::sleep(timeouts::FORWARD_ACCEPT_RETRY).await;
                continue;
            }
        };
        let shared = shared.clone();
        let guest_port = forward.guest_port;
        tokio::spawn(async move {
            if let Err(e) = forward_one(conn, guest_port, shared).await {
                tracing::debug!("forward from {peer} to guest port {guest_port}: {e}");
            }
        });
    }
}

async fn forward_one(
    mut conn: TcpStream,
    guest_port: u16,
    shared: Arc<Shared>,
) -> anyhow::Result<()> {
    let _ = conn.set_nodelay(true);
    let agent = shared.agent.lock().await.clone();
    // No agent (VM starting or stopping): closing the connection is the
    // honest answer; the client sees a reset/EOF, not a hang.
    let Some(agent) = agent else { return Ok(()) };
    let mut stream = agent.open().await?;
    proto::send(
        &mut stream,
        &Frame::Request(Request::Connect { port: guest_port }),
    )
    .await?;
    match proto::read_frame(&mut stream).await? {
        Some(Frame::Response(Response::Connected)) => {
            tokio::io::copy_bidirectional(&mut conn, &mut stream).await?;
        }
        Some(Frame::Error(e)) => {
            tracing::debug!("guest port {guest_port}: {}: {}", e.code, e.message)
        }
        other => tracing::warn!("unexpected answer to connect: {other:?}"),
    }
    Ok(())
}
