//! Bidirectional copy between a byte stream (a TCP connection, a Unix socket) and a QUIC
//! stream, with half-close in both directions: EOF on one side becomes a QUIC FIN (or a
//! `shutdown(Write)`) toward the other, and the copy ends when both directions have. An error on
//! either side aborts both (QUIC reset and stop-sending). There is no idle timeout: `logs -f` and
//! idle `exec` sessions last as long as their ends want. Shared by the hub's egress proxy and the
//! agent's dialer, which are the two ends of one proxied connection.

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tracing::debug;

/// QUIC application error code for an aborted proxied stream.
pub const STREAM_ABORTED: u32 = 0x01;
const COPY_BUF: usize = 32 * 1024;
const MAX_CHUNK: usize = 64 * 1024;

/// What a finished splice carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SpliceStats {
    /// Bytes read from the byte stream and sent on QUIC (including `prefix_to_stream`).
    pub io_to_stream: u64,
    /// Bytes received on QUIC and written to the byte stream (including `prefix_to_io`).
    pub stream_to_io: u64,
    /// Whether an error aborted the copy (rather than both sides closing cleanly).
    pub aborted: bool,
}

/// Byte stream (`rd`/`wr`) <-> QUIC stream (`send`/`recv`). `prefix_to_io` is written to `wr`
/// first (bytes that arrived on the stream right after its header), `prefix_to_stream` is sent
/// on the stream first (bytes the client sent right after its request head).
pub async fn splice_quic<R, W>(
    mut rd: R,
    mut wr: W,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    prefix_to_io: Bytes,
    prefix_to_stream: Bytes,
) -> SpliceStats
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut stats = SpliceStats::default();
    let aborted = {
        let up = async {
            let mut n = 0u64;
            if !prefix_to_stream.is_empty() {
                if let Err(e) = send.write_all(&prefix_to_stream).await {
                    return (n, Err(e.to_string()));
                }
                n += prefix_to_stream.len() as u64;
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
            if !prefix_to_io.is_empty() {
                if let Err(e) = wr.write_all(&prefix_to_io).await {
                    return (n, Err(e.to_string()));
                }
                n += prefix_to_io.len() as u64;
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
                    stats.io_to_stream = n;
                    if let Err(e) = r { aborted = Some(e); break; }
                }
                (n, r) = &mut down, if !down_done => {
                    down_done = true;
                    stats.stream_to_io = n;
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
