//! Drivers for Petrel's framed streams over quinn: the long-lived control stream (a
//! [`FrameDecoder`] fed from a `RecvStream`) and the one-shot enrolment exchange. The decoders in
//! `petrel-proto` do the parsing and enforce every cap; this module only moves bytes and turns
//! stream events into typed errors.

use petrel_proto::enrol::EnrolDecoder;
use petrel_proto::{ControlMessage, DecodeError, EncodeError, EnrolMessage, FrameDecoder};

/// Why a control or enrolment stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("peer sent a malformed message: {0}")]
    Decode(#[from] DecodeError),
    #[error("message could not be encoded: {0}")]
    Encode(#[from] EncodeError),
    #[error("stream read failed: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("stream write failed: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("peer closed the stream in the middle of a message")]
    TruncatedAtEnd,
}

/// Reads control messages from a stream.
#[derive(Debug)]
pub struct ControlReader {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl ControlReader {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::new(),
        }
    }

    /// The next message; `Ok(None)` when the peer finished the stream cleanly between messages.
    pub async fn next(&mut self) -> Result<Option<ControlMessage>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(16 * 1024, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes)?,
                None if self.decoder.buffered() == 0 => return Ok(None),
                None => return Err(StreamError::TruncatedAtEnd),
            }
        }
    }
}

/// What a writer keeps of its encoding buffer between messages.
const KEEP_CAPACITY: usize = 1024;

/// Writes control messages to a stream.
#[derive(Debug)]
pub struct ControlWriter {
    send: quinn::SendStream,
    buf: Vec<u8>,
}

impl ControlWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            buf: Vec::with_capacity(1024),
        }
    }

    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), StreamError> {
        self.send_counted(msg).await.map(|_| ())
    }

    /// [`send`](Self::send), returning the bytes written (for metrics).
    pub async fn send_counted(&mut self, msg: &ControlMessage) -> Result<usize, StreamError> {
        self.buf.clear();
        petrel_proto::encode(msg, &mut self.buf)?;
        self.send.write_all(&self.buf).await?;
        let n = self.buf.len();
        // A session lives for days and sends mostly pings: a large message (a view, a route
        // chunk) must not leave its 64 KiB behind in every session.
        if self.buf.capacity() > KEEP_CAPACITY {
            self.buf = Vec::with_capacity(KEEP_CAPACITY);
        }
        Ok(n)
    }

    /// Writes frames that are already encoded (shared by many sessions: quinn keeps a
    /// reference, not a copy, until they are acknowledged). Returns the bytes written.
    pub async fn send_encoded(&mut self, frames: &[bytes::Bytes]) -> Result<usize, StreamError> {
        let mut chunks: Vec<bytes::Bytes> = frames.to_vec();
        let n = chunks.iter().map(bytes::Bytes::len).sum();
        self.send.write_all_chunks(&mut chunks).await?;
        Ok(n)
    }

    /// Finishes the stream (the peer's reader sees a clean end).
    pub fn finish(&mut self) {
        let _ = self.send.finish();
    }
}

/// Reads exactly one enrolment message from `recv`; `Ok(None)` if the stream ended before a
/// whole message arrived.
pub async fn read_enrol_message(
    recv: &mut quinn::RecvStream,
) -> Result<Option<EnrolMessage>, StreamError> {
    read_with(recv, EnrolDecoder::new()).await
}

/// The hub's side: like [`read_enrol_message`], with the decoder capped at the largest
/// possible request, because the peer is not authenticated yet.
pub async fn read_enrol_request(
    recv: &mut quinn::RecvStream,
) -> Result<Option<EnrolMessage>, StreamError> {
    read_with(recv, EnrolDecoder::for_requests()).await
}

async fn read_with(
    recv: &mut quinn::RecvStream,
    mut decoder: EnrolDecoder,
) -> Result<Option<EnrolMessage>, StreamError> {
    loop {
        match decoder.next_message()? {
            // Optional messages this build does not know are skipped, per the version rules.
            Some(EnrolMessage::Unknown { .. }) => continue,
            Some(msg) => return Ok(Some(msg)),
            None => {}
        }
        match recv.read_chunk(4 * 1024, true).await? {
            Some(chunk) => decoder.push(&chunk.bytes)?,
            None => return Ok(None),
        }
    }
}
