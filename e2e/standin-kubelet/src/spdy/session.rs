//! A SPDY/3.1 session over any byte stream, in the style of the `spdystream` library that
//! kubectl, the API server and the kubelet use.
//!
//! One reader task decodes frames and routes them to per-stream channels; one writer task owns
//! the write half and the header compressor, so frames hit the wire in the order they were
//! queued. Like `spdystream`, the session does not enforce SPDY flow control (it neither waits
//! for nor sends WINDOW_UPDATE): Kubernetes peers do not send window updates either, so a
//! sender that honoured the 64 KiB initial window would stall.
//!
//! Back-pressure: a stream's inbound channel is bounded; when its consumer is slow the reader
//! waits, which stalls the whole connection (the same as `spdystream`). A consumer that does not
//! want a stream's data must drop the [`Stream`] (or its [`StreamReader`]); data for a dropped
//! stream is discarded.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::frame::{
    goaway_status, rst_status, Frame, FrameDecoder, FrameEncoder, FrameError, HeaderBlock, Limits,
};

/// Which end of the connection this session is (decides stream and ping id parity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Opens odd-numbered streams (kubectl, the API server).
    Client,
    /// Opens even-numbered streams (the kubelet).
    Server,
}

/// Session tuning.
#[derive(Debug, Clone, Copy)]
pub struct SessionConfig {
    /// Decoder caps.
    pub limits: Limits,
    /// Inbound events buffered per stream before the reader waits.
    pub stream_buffer: usize,
    /// Outbound frames queued before writers wait.
    pub outbound_queue: usize,
    /// Largest data frame written.
    pub max_write_chunk: usize,
    /// How long [`Session::open_stream`] waits for SYN_REPLY.
    pub reply_timeout: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            limits: Limits::default(),
            stream_buffer: 64,
            outbound_queue: 256,
            max_write_chunk: 32 * 1024,
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// Errors seen by users of a session.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The connection is gone (peer closed, I/O error, or protocol error).
    #[error("SPDY connection closed")]
    Closed,
    /// The peer reset the stream.
    #[error("stream reset by peer (status {0})")]
    Reset(u32),
    /// The peer did not answer SYN_STREAM in time.
    #[error("timed out waiting for SYN_REPLY")]
    ReplyTimeout,
    /// Stream ids are exhausted.
    #[error("stream ids exhausted")]
    StreamIdsExhausted,
    /// The peer sent GOAWAY; no new streams.
    #[error("peer sent GOAWAY")]
    GoneAway,
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// Socket I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// What the reader hands to a stream.
#[derive(Debug)]
enum StreamEvent {
    Reply { fin: bool },
    Data(Bytes),
    Fin,
    Reset(u32),
}

enum Outbound {
    Frame(Frame),
    Shutdown,
}

struct Inner {
    role: Role,
    config: SessionConfig,
    out_tx: mpsc::Sender<Outbound>,
    streams: Mutex<HashMap<u32, mpsc::Sender<StreamEvent>>>,
    next_stream_id: AtomicU32,
    last_peer_stream: AtomicU32,
    peer_gone_away: AtomicBool,
    we_went_away: AtomicBool,
    closed: CancellationToken,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Inner {
    fn lock_streams(&self) -> std::sync::MutexGuard<'_, HashMap<u32, mpsc::Sender<StreamEvent>>> {
        // A poisoned map only means a task panicked mid-update; the map itself is still usable.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A handle to a running session; cheap to clone.
#[derive(Clone)]
pub struct Session {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("role", &self.inner.role)
            .field("closed", &self.inner.closed.is_cancelled())
            .finish()
    }
}

/// Streams opened by the peer, in arrival order.
pub type Incoming = mpsc::Receiver<Stream>;

impl Session {
    /// Starts reader and writer tasks on `io`. Returns the session and the peer-opened streams.
    pub fn start<IO>(
        io: IO,
        role: Role,
        config: SessionConfig,
    ) -> Result<(Session, Incoming), SessionError>
    where
        IO: AsyncRead + AsyncWrite + Send + 'static,
    {
        let encoder = FrameEncoder::new()?;
        let (read_half, write_half) = tokio::io::split(io);
        let (out_tx, out_rx) = mpsc::channel(config.outbound_queue.max(1));
        let (incoming_tx, incoming_rx) = mpsc::channel(16);
        let inner = Arc::new(Inner {
            role,
            config,
            out_tx,
            streams: Mutex::new(HashMap::new()),
            next_stream_id: AtomicU32::new(if role == Role::Client { 1 } else { 2 }),
            last_peer_stream: AtomicU32::new(0),
            peer_gone_away: AtomicBool::new(false),
            we_went_away: AtomicBool::new(false),
            closed: CancellationToken::new(),
            tasks: Mutex::new(Vec::new()),
        });
        let session = Session {
            inner: inner.clone(),
        };

        let reader_inner = inner.clone();
        let reader = tokio::spawn(async move {
            match read_loop(read_half, &reader_inner, incoming_tx).await {
                Ok(()) => tracing::debug!("SPDY reader stopped: end of input"),
                Err(e) => tracing::debug!(error = %e, "SPDY reader stopped"),
            }
            reader_inner.lock_streams().clear();
            reader_inner.closed.cancel();
        });
        let writer_closed = inner.closed.clone();
        let writer = tokio::spawn(async move {
            if let Err(e) = write_loop(write_half, out_rx, encoder).await {
                tracing::debug!(error = %e, "SPDY writer stopped");
                // A dead writer makes the session useless.
                writer_closed.cancel();
            }
        });
        if let Ok(mut tasks) = inner.tasks.lock() {
            tasks.push(reader);
            tasks.push(writer);
        }
        Ok((session, incoming_rx))
    }

    /// This end's role.
    pub fn role(&self) -> Role {
        self.inner.role
    }

    /// Resolves once the reader has stopped (peer closed, error, or [`Session::abort`]).
    pub async fn closed(&self) {
        self.inner.closed.cancelled().await;
    }

    /// True once the reader has stopped.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.is_cancelled()
    }

    /// Opens a stream (SYN_STREAM) and waits for the peer's SYN_REPLY.
    pub async fn open_stream(&self, headers: HeaderBlock) -> Result<Stream, SessionError> {
        if self.inner.peer_gone_away.load(Ordering::SeqCst) {
            return Err(SessionError::GoneAway);
        }
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        let id = self.inner.next_stream_id.fetch_add(2, Ordering::SeqCst);
        if id > 0x7fff_ffff {
            return Err(SessionError::StreamIdsExhausted);
        }
        let (tx, mut rx) = mpsc::channel(self.inner.config.stream_buffer.max(2));
        self.inner.lock_streams().insert(id, tx);
        self.send(Frame::SynStream {
            stream_id: id,
            associated_to: 0,
            priority: 0,
            slot: 0,
            fin: false,
            unidirectional: false,
            headers: headers.clone(),
        })
        .await?;
        let first = tokio::time::timeout(self.inner.config.reply_timeout, rx.recv()).await;
        let remote_closed = match first {
            Err(_) => {
                self.inner.lock_streams().remove(&id);
                let _ = self
                    .send(Frame::RstStream {
                        stream_id: id,
                        status: rst_status::CANCEL,
                    })
                    .await;
                return Err(SessionError::ReplyTimeout);
            }
            Ok(None) => return Err(SessionError::Closed),
            Ok(Some(StreamEvent::Reset(status))) => return Err(SessionError::Reset(status)),
            Ok(Some(StreamEvent::Reply { fin })) => fin,
            // Data before the reply is a peer bug; accept the stream anyway.
            Ok(Some(_)) => false,
        };
        Ok(Stream {
            headers,
            reader: StreamReader {
                id,
                rx,
                done: remote_closed,
            },
            writer: StreamWriter {
                id,
                session: self.clone(),
            },
        })
    }

    /// Sends GOAWAY naming the last peer stream processed. Idempotent.
    pub async fn go_away(&self) -> Result<(), SessionError> {
        if self.inner.we_went_away.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        let last = self.inner.last_peer_stream.load(Ordering::SeqCst);
        self.send(Frame::GoAway {
            last_good_stream_id: last,
            status: goaway_status::OK,
        })
        .await
    }

    /// Graceful end: GOAWAY, flush and half-close our side, then wait up to `linger` for the
    /// peer to close (so unread input does not turn our close into a TCP reset that could
    /// destroy data the peer has not read yet), then stop both tasks.
    pub async fn finish(&self, linger: Duration) {
        let _ = self.go_away().await;
        let _ = self.inner.out_tx.send(Outbound::Shutdown).await;
        let _ = tokio::time::timeout(linger, self.closed()).await;
        self.abort();
    }

    /// Stops both tasks at once; the connection is dropped.
    pub fn abort(&self) {
        self.inner.closed.cancel();
        if let Ok(tasks) = self.inner.tasks.lock() {
            for t in tasks.iter() {
                t.abort();
            }
        }
        self.inner.lock_streams().clear();
    }

    async fn send(&self, frame: Frame) -> Result<(), SessionError> {
        self.inner
            .out_tx
            .send(Outbound::Frame(frame))
            .await
            .map_err(|_| SessionError::Closed)
    }
}

/// A stream: its opening headers plus a reading and a writing half.
#[derive(Debug)]
pub struct Stream {
    headers: HeaderBlock,
    reader: StreamReader,
    writer: StreamWriter,
}

impl Stream {
    /// Stream id.
    pub fn id(&self) -> u32 {
        self.reader.id
    }

    /// Headers of the SYN_STREAM that opened it.
    pub fn headers(&self) -> &HeaderBlock {
        &self.headers
    }

    /// Accepts a peer-opened stream (SYN_REPLY with no headers); `fin` half-closes our side.
    pub async fn reply(&self, fin: bool) -> Result<(), SessionError> {
        self.writer
            .session
            .send(Frame::SynReply {
                stream_id: self.reader.id,
                fin,
                headers: HeaderBlock::new(),
            })
            .await
    }

    /// Reads the next chunk; `Ok(None)` at the peer's FIN.
    pub async fn read(&mut self) -> Result<Option<Bytes>, SessionError> {
        self.reader.read().await
    }

    /// A clone of the writing half.
    pub fn writer(&self) -> StreamWriter {
        self.writer.clone()
    }

    /// Splits into halves that can be used from different tasks.
    pub fn split(self) -> (StreamReader, StreamWriter) {
        (self.reader, self.writer)
    }
}

/// The receiving half of a stream.
#[derive(Debug)]
pub struct StreamReader {
    id: u32,
    rx: mpsc::Receiver<StreamEvent>,
    done: bool,
}

impl StreamReader {
    /// Reads the next chunk; `Ok(None)` at the peer's FIN, an error on reset or connection loss.
    pub async fn read(&mut self) -> Result<Option<Bytes>, SessionError> {
        if self.done {
            return Ok(None);
        }
        loop {
            match self.rx.recv().await {
                Some(StreamEvent::Data(b)) => return Ok(Some(b)),
                Some(StreamEvent::Fin) => {
                    self.done = true;
                    return Ok(None);
                }
                Some(StreamEvent::Reset(status)) => {
                    self.done = true;
                    return Err(SessionError::Reset(status));
                }
                Some(StreamEvent::Reply { fin }) => {
                    if fin {
                        self.done = true;
                        return Ok(None);
                    }
                }
                None => {
                    self.done = true;
                    return Err(SessionError::Closed);
                }
            }
        }
    }

    /// Reads until FIN, discarding data; returns the byte count.
    pub async fn drain(&mut self) -> Result<u64, SessionError> {
        let mut n = 0u64;
        while let Some(b) = self.read().await? {
            n += b.len() as u64;
        }
        Ok(n)
    }

    /// Reads until FIN, collecting at most `limit` bytes (the rest is discarded).
    pub async fn read_to_end(&mut self, limit: usize) -> Result<Vec<u8>, SessionError> {
        let mut out = Vec::new();
        while let Some(b) = self.read().await? {
            let room = limit.saturating_sub(out.len());
            out.extend_from_slice(&b[..b.len().min(room)]);
        }
        Ok(out)
    }
}

/// The sending half of a stream; cheap to clone.
#[derive(Debug, Clone)]
pub struct StreamWriter {
    id: u32,
    session: Session,
}

impl StreamWriter {
    /// Stream id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Queues `data` as one or more data frames.
    pub async fn write(&self, data: &[u8]) -> Result<(), SessionError> {
        let chunk = self.session.inner.config.max_write_chunk.max(1);
        for part in data.chunks(chunk) {
            self.write_bytes(Bytes::copy_from_slice(part)).await?;
        }
        Ok(())
    }

    /// Queues one data frame carrying `data` (must fit one frame).
    pub async fn write_bytes(&self, data: Bytes) -> Result<(), SessionError> {
        if data.is_empty() {
            return Ok(());
        }
        self.session
            .send(Frame::Data {
                stream_id: self.id,
                fin: false,
                data,
            })
            .await
    }

    /// Half-closes: an empty data frame with FIN.
    pub async fn close(&self) -> Result<(), SessionError> {
        self.session
            .send(Frame::Data {
                stream_id: self.id,
                fin: true,
                data: Bytes::new(),
            })
            .await
    }

    /// Aborts the stream with RST_STREAM.
    pub async fn reset(&self, status: u32) -> Result<(), SessionError> {
        self.session.inner.lock_streams().remove(&self.id);
        self.session
            .send(Frame::RstStream {
                stream_id: self.id,
                status,
            })
            .await
    }
}

async fn read_loop<R>(
    mut rd: R,
    inner: &Arc<Inner>,
    incoming: mpsc::Sender<Stream>,
) -> Result<(), SessionError>
where
    R: AsyncRead + Unpin,
{
    let mut decoder = FrameDecoder::new(inner.config.limits);
    let mut buf = BytesMut::with_capacity(64 * 1024);
    loop {
        while let Some(frame) = match decoder.decode(&mut buf) {
            Ok(f) => f,
            Err(e) => {
                // Tell the peer why, then give up on the connection.
                let _ = inner.out_tx.try_send(Outbound::Frame(Frame::GoAway {
                    last_good_stream_id: inner.last_peer_stream.load(Ordering::SeqCst),
                    status: goaway_status::PROTOCOL_ERROR,
                }));
                return Err(e.into());
            }
        } {
            handle_frame(frame, inner, &incoming).await?;
        }
        if buf.capacity() - buf.len() < 8 * 1024 {
            buf.reserve(32 * 1024);
        }
        let n = tokio::select! {
            n = rd.read_buf(&mut buf) => n?,
            _ = inner.closed.cancelled() => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
    }
}

async fn handle_frame(
    frame: Frame,
    inner: &Arc<Inner>,
    incoming: &mpsc::Sender<Stream>,
) -> Result<(), SessionError> {
    let peer_parity = if inner.role == Role::Server { 1 } else { 0 };
    match frame {
        Frame::SynStream {
            stream_id,
            fin,
            headers,
            ..
        } => {
            let refuse = |status| Outbound::Frame(Frame::RstStream { stream_id, status });
            if stream_id % 2 != peer_parity
                || stream_id <= inner.last_peer_stream.load(Ordering::SeqCst)
            {
                let _ = inner.out_tx.send(refuse(rst_status::PROTOCOL_ERROR)).await;
                return Ok(());
            }
            inner.last_peer_stream.store(stream_id, Ordering::SeqCst);
            if inner.we_went_away.load(Ordering::SeqCst) {
                let _ = inner.out_tx.send(refuse(rst_status::REFUSED_STREAM)).await;
                return Ok(());
            }
            let (tx, rx) = mpsc::channel(inner.config.stream_buffer.max(2));
            if fin {
                let _ = tx.try_send(StreamEvent::Fin);
            } else {
                inner.lock_streams().insert(stream_id, tx);
            }
            let session = Session {
                inner: inner.clone(),
            };
            let stream = Stream {
                headers,
                reader: StreamReader {
                    id: stream_id,
                    rx,
                    done: false,
                },
                writer: StreamWriter {
                    id: stream_id,
                    session,
                },
            };
            if incoming.send(stream).await.is_err() {
                inner.lock_streams().remove(&stream_id);
                let _ = inner.out_tx.send(refuse(rst_status::REFUSED_STREAM)).await;
            }
        }
        Frame::SynReply { stream_id, fin, .. } => {
            deliver(inner, stream_id, StreamEvent::Reply { fin }, fin).await;
        }
        Frame::Data {
            stream_id,
            fin,
            data,
        } => {
            if !data.is_empty() {
                deliver(inner, stream_id, StreamEvent::Data(data), false).await;
            }
            if fin {
                deliver(inner, stream_id, StreamEvent::Fin, true).await;
            }
        }
        Frame::Headers { stream_id, fin, .. } => {
            if fin {
                deliver(inner, stream_id, StreamEvent::Fin, true).await;
            }
        }
        Frame::RstStream { stream_id, status } => {
            let tx = inner.lock_streams().remove(&stream_id);
            if let Some(tx) = tx {
                // If the consumer's buffer is full, dropping the sender still ends its reads.
                let _ = tx.try_send(StreamEvent::Reset(status));
            }
        }
        Frame::Ping { id } => {
            if id % 2 == peer_parity {
                let _ = inner.out_tx.send(Outbound::Frame(Frame::Ping { id })).await;
            }
        }
        Frame::GoAway { .. } => {
            inner.peer_gone_away.store(true, Ordering::SeqCst);
        }
        Frame::Settings { .. } | Frame::WindowUpdate { .. } | Frame::Ignored { .. } => {}
    }
    Ok(())
}

/// Routes an event to a stream's consumer. Unknown streams are ignored (as `spdystream` does);
/// a consumer that went away is forgotten.
async fn deliver(inner: &Arc<Inner>, stream_id: u32, event: StreamEvent, last: bool) {
    let tx = {
        let mut map = inner.lock_streams();
        if last {
            map.remove(&stream_id)
        } else {
            map.get(&stream_id).cloned()
        }
    };
    let Some(tx) = tx else { return };
    if tx.send(event).await.is_err() && !last {
        inner.lock_streams().remove(&stream_id);
    }
}

async fn write_loop<W>(
    mut wr: W,
    mut rx: mpsc::Receiver<Outbound>,
    mut encoder: FrameEncoder,
) -> Result<(), SessionError>
where
    W: AsyncWrite + Unpin,
{
    const BATCH: usize = 256 * 1024;
    let mut buf = BytesMut::with_capacity(64 * 1024);
    while let Some(first) = rx.recv().await {
        let mut shutdown = false;
        let mut item = Some(first);
        while let Some(next) = item.take() {
            match next {
                Outbound::Frame(f) => encoder.encode(&f, &mut buf)?,
                Outbound::Shutdown => {
                    shutdown = true;
                    break;
                }
            }
            if buf.len() < BATCH {
                item = rx.try_recv().ok();
            }
        }
        if !buf.is_empty() {
            wr.write_all(&buf).await?;
            buf.clear();
        }
        wr.flush().await?;
        if shutdown {
            wr.shutdown().await?;
            // Keep draining so senders do not block; nothing more is written.
            while rx.recv().await.is_some() {}
            return Ok(());
        }
    }
    let _ = wr.shutdown().await;
    Ok(())
}
