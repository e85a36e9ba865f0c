//! `Request::Connect`: one host port-forward connection, carried to the
//! guest's `127.0.0.1:<port>`.

use machinen_proto::timeouts;

use machinen_proto::{send, Frame, Response, WireError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::log::debug;

pub const PORT_FORWARD_REFUSED: &str = machinen_proto::ErrorCode::PortForwardRefused.as_str();

/// Connect, answer `Connected`, then splice raw bytes until either side
/// closes. A refused or timed-out connect is answered with an error and the
/// stream closed, so the host closes its client connection cleanly.
pub async fn serve<S>(mut s: S, port: u16)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let conn = tokio::time::timeout(
        timeouts::FORWARD_CONNECT,
        TcpStream::connect(("127.0.0.1", port)),
    )
    .await;
    let mut tcp = match conn {
        Ok(Ok(tcp)) => tcp,
        Ok(Err(e)) => {
            let msg = format!("connecting to 127.0.0.1:{port} in the guest: {e}");
            let _ = send(
                &mut s,
                &Frame::Error(WireError {
                    code: PORT_FORWARD_REFUSED.into(),
                    message: msg,
                }),
            )
            .await;
            let _ = s.shutdown().await;
            return;
        }
        Err(_) => {
            let msg = format!("connecting to 127.0.0.1:{port} in the guest timed out");
            let _ = send(
                &mut s,
                &Frame::Error(WireError {
                    code: PORT_FORWARD_REFUSED.into(),
                    message: msg,
                }),
            )
            .await;
            let _ = s.shutdown().await;
            return;
        }
    };
    let _ = tcp.set_nodelay(true);
    if send(&mut s, &Frame::Response(Response::Connected))
        .await
        .is_err()
    {
        return;
    }
    if let Err(e) = tokio::io::copy_bidirectional(&mut s, &mut tcp).await {
        debug!("forward to port {port} ended: {e}");
    }
}
