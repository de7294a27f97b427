//! Bidirectional copy between a client connection and its upstream, with half-close in both
//! directions: EOF from one side becomes a QUIC FIN (or a TCP `shutdown(Write)`) toward the
//! other, and the connection ends when both directions have. An error on either side aborts
//! both (QUIC reset and stop-sending, connection dropped). Established connections have no idle
//! timeout: `logs -f` and idle `exec` sessions last as long as their ends want.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// QUIC application error code for an aborted proxied stream (same as the agent's).
pub const STREAM_ABORTED: u32 = petrel_transport::splice::STREAM_ABORTED;

/// What a finished splice carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpliceStats {
    /// Bytes written toward the target.
    pub to_target: u64,
    /// Bytes written toward the client.
    pub from_target: u64,
    pub aborted: bool,
}

/// Client (`rd`/`wr`) <-> QUIC stream (`send`/`recv`); see [`petrel_transport::splice`].
/// `to_client` is written to the client first, `to_target` is sent on the stream first.
pub async fn splice_quic<R, W>(
    rd: R,
    wr: W,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    to_client: Bytes,
    to_target: Bytes,
) -> SpliceStats
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let s = petrel_transport::splice::splice_quic(rd, wr, send, recv, to_client, to_target).await;
    SpliceStats {
        to_target: s.io_to_stream,
        from_target: s.stream_to_io,
        aborted: s.aborted,
    }
}

/// Client <-> a TCP connection the hub dialed itself.
pub async fn splice_tcp<C>(
    client: &mut C,
    target: &mut tokio::net::TcpStream,
    to_target: Bytes,
) -> SpliceStats
where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let mut stats = SpliceStats::default();
    if !to_target.is_empty() {
        if let Err(e) = target.write_all(&to_target).await {
            debug!(error = %e, "target closed before the first bytes");
            stats.aborted = true;
            return stats;
        }
        stats.to_target = to_target.len() as u64;
    }
    match tokio::io::copy_bidirectional(client, target).await {
        Ok((up, down)) => {
            stats.to_target += up;
            stats.from_target = down;
        }
        Err(e) => {
            debug!(error = %e, "proxied connection aborted");
            stats.aborted = true;
        }
    }
    stats
}
