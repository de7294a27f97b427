//! Bidirectional copy between a client connection and its upstream, with half-close in both
//! directions: EOF from one side becomes a QUIC FIN (or a TCP `shutdown(Write)`) toward the
//! other, and the connection ends when both directions have. An error on either side aborts
//! both (QUIC reset and stop-sending, connection dropped). Established connections have no idle
//! timeout: `logs -f` and idle `exec` sessions last as long as their ends want.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// QUIC application error code for an aborted proxied stream (same as the agent's).
pub const STREAM_ABORTED: u32 = 0x01;
const COPY_BUF: usize = 32 * 1024;
const MAX_CHUNK: usize = 64 * 1024;

/// What a finished splice carried.
#[derive(Debug, Default, Clone, Copy)]
pub struct SpliceStats {
    /// Bytes written toward the target.
    pub to_target: u64,
    /// Bytes written toward the client.
    pub from_target: u64,
    pub aborted: bool,
}

/// Client (`rd`/`wr`) <-> QUIC stream (`send`/`recv`). `to_client` is written to the client
/// first (bytes the agent sent right after its result), `to_target` is sent on the stream
/// first (bytes the client sent right after its request head).
pub async fn splice_quic<R, W>(
    mut rd: R,
    mut wr: W,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    to_client: Bytes,
    to_target: Bytes,
) -> SpliceStats
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut stats = SpliceStats::default();
    let aborted = {
        let up = async {
            let mut n = 0u64;
            if !to_target.is_empty() {
                if let Err(e) = send.write_all(&to_target).await {
                    return (n, Err(e.to_string()));
                }
                n += to_target.len() as u64;
            }
            let mut buf = vec![0u8; COPY_BUF];
            loop {
                match rd.read(&mut buf).await {
                    Ok(0) => {
                        let _ = send.finish();
                        return (n, Ok(()));
                    }
                    Ok(k) => {
                        if let Err(e) = send.write_all(buf.get(..k).unwrap_or_default()).await {
                            return (n, Err(e.to_string()));
                        }
                        n += k as u64;
                    }
                    Err(e) => return (n, Err(e.to_string())),
                }
            }
        };
        let down = async {
            let mut n = 0u64;
            if !to_client.is_empty() {
                if let Err(e) = wr.write_all(&to_client).await {
                    return (n, Err(e.to_string()));
                }
                n += to_client.len() as u64;
            }
            loop {
                match recv.read_chunk(MAX_CHUNK, true).await {
                    Ok(Some(chunk)) => {
                        if let Err(e) = wr.write_all(&chunk.bytes).await {
                            return (n, Err(e.to_string()));
                        }
                        n += chunk.bytes.len() as u64;
                    }
                    Ok(None) => {
                        let _ = wr.shutdown().await;
                        return (n, Ok(()));
                    }
                    Err(e) => return (n, Err(e.to_string())),
                }
            }
        };
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        let mut aborted = None;
        while !(up_done && down_done) {
            tokio::select! {
                (n, r) = &mut up, if !up_done => {
                    up_done = true;
                    stats.to_target = n;
                    if let Err(e) = r { aborted = Some(e); break; }
                }
                (n, r) = &mut down, if !down_done => {
                    down_done = true;
                    stats.from_target = n;
                    if let Err(e) = r { aborted = Some(e); break; }
                }
            }
        }
        aborted
    };
    if let Some(why) = aborted {
        debug!(error = %why, "proxied connection aborted");
        stats.aborted = true;
        let _ = send.reset(STREAM_ABORTED.into());
        let _ = recv.stop(STREAM_ABORTED.into());
    }
    stats
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
