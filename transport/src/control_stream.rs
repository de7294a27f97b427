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
        self.next_with(petrel_proto::control::decode_body).await
    }

    /// The next frame through `decode` (see [`FrameDecoder::next_with`]). Cancel-safe, like
    /// [`next`](Self::next): bytes read are buffered before the next await.
    pub async fn next_with<T>(
        &mut self,
        mut decode: impl FnMut(petrel_proto::codec::RawFrame<'_>) -> Result<T, DecodeError>,
    ) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.next_with(&mut decode)? {
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

/// Frames a writer's queue keeps room for once it is empty again.
const IDLE_QUEUE_CAPACITY: usize = 4;

/// Writes control messages to a stream.
///
/// Two ways to write: [`send`](Self::send) writes a message and waits until quinn has taken it;
/// a session loop that must keep reading while a large message drains instead
/// [`enqueue`](Self::enqueue)s frames and polls [`write_pending`](Self::write_pending) in its
/// `select!`, which is cancel-safe: frames go out whole and in order, whatever branch wins.
#[derive(Debug)]
pub struct ControlWriter {
    send: quinn::SendStream,
    /// Encoded frames not yet (fully) taken by quinn; the front one may be partly written.
    pending: std::collections::VecDeque<bytes::Bytes>,
    pending_bytes: usize,
}

impl ControlWriter {
    pub fn new(send: quinn::SendStream) -> Self {
        Self {
            send,
            pending: std::collections::VecDeque::new(),
            pending_bytes: 0,
        }
    }

    pub async fn send(&mut self, msg: &ControlMessage) -> Result<(), StreamError> {
        self.send_counted(msg).await.map(|_| ())
    }

    /// [`send`](Self::send), returning the bytes written (for metrics). Frames queued before it
    /// go first.
    pub async fn send_counted(&mut self, msg: &ControlMessage) -> Result<usize, StreamError> {
        let n = self.enqueue(msg)?;
        self.flush().await?;
        Ok(n)
    }

    /// Queues a message behind the pending frames; returns its encoded size.
    pub fn enqueue(&mut self, msg: &ControlMessage) -> Result<usize, EncodeError> {
        // Encoded into its own buffer, which the queue then owns: no copy, and nothing a large
        // message (a view, a route chunk) leaves behind in a session that lives for days.
        let frame = bytes::Bytes::from(petrel_proto::control::encode_to_vec(msg)?);
        Ok(self.enqueue_encoded(frame))
    }

    /// Queues a frame that is already encoded (shared by many sessions: quinn keeps a
    /// reference, not a copy, until it is acknowledged); returns its size.
    pub fn enqueue_encoded(&mut self, frame: bytes::Bytes) -> usize {
        let n = frame.len();
        if n > 0 {
            self.pending_bytes += n;
            self.pending.push_back(frame);
        }
        n
    }

    /// Bytes queued and not yet taken by quinn.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Hands quinn as much of the queue as its flow control takes now, waiting only until it
    /// takes something. Cancel-safe: if it does not resolve, nothing was written. Never resolves
    /// with an empty queue (guard the branch with [`has_pending`](Self::has_pending)).
    pub async fn write_pending(&mut self) -> Result<usize, StreamError> {
        if self.pending.is_empty() {
            return std::future::pending().await;
        }
        let written = self
            .send
            .write_chunks(self.pending.make_contiguous())
            .await?;
        self.pending_bytes -= written.bytes;
        // Fully written chunks are left empty by quinn; a partly written one keeps its suffix.
        while self.pending.front().is_some_and(bytes::Bytes::is_empty) {
            self.pending.pop_front();
        }
        if self.pending.is_empty() && self.pending.capacity() > IDLE_QUEUE_CAPACITY {
            // A burst (a route table in chunks) grew the queue; a session that lives for days
            // mostly queues one pong at a time, so the room goes back.
            self.pending.shrink_to(IDLE_QUEUE_CAPACITY);
        }
        Ok(written.bytes)
    }

    /// Writes the whole queue.
    pub async fn flush(&mut self) -> Result<(), StreamError> {
        while self.has_pending() {
            self.write_pending().await?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::quic::TransportTuning;
    use crate::test_pki;
    use petrel_proto::routes::{RouteEntry, RouteTable};
    use petrel_proto::{IpCidr, MacAddr, Ping};
    use std::time::Duration;

    /// A hub-side writer and an agent-side reader over a real QUIC connection on loopback; the
    /// agent's stream window is small, so a large queue is written in many partial steps.
    struct Pair {
        writer: ControlWriter,
        reader: ControlReader,
        // Kept alive for the test: dropping a connection closes it.
        _conns: [quinn::Connection; 2],
        _endpoints: [quinn::Endpoint; 2],
    }

    async fn pair() -> Pair {
        let ca = test_pki::ca("test");
        let hub = test_pki::hub(&ca);
        let tls = crate::tls::hub_server_tls(ca.cert_der(), hub.chain, hub.key, &[b"t"]).unwrap();
        let server_cfg = crate::quic::server_config(tls, &TransportTuning::default()).unwrap();
        let server =
            crate::quic::server_endpoint("127.0.0.1:0".parse().unwrap(), server_cfg, b"s").unwrap();
        let node = test_pki::node(&ca, "n1");
        let tls = crate::tls::agent_client_tls(ca.cert_der(), node.chain, node.key, b"t").unwrap();
        let client_cfg = crate::quic::client_config(
            tls,
            &TransportTuning {
                stream_receive_window: 4096,
                ..TransportTuning::default()
            },
        )
        .unwrap();
        let client = crate::quic::client_endpoint("127.0.0.1:0".parse().unwrap()).unwrap();
        let connecting = client
            .connect_with(
                client_cfg,
                server.local_addr().unwrap(),
                crate::HUB_SERVER_NAME,
            )
            .unwrap();
        let accept = async { server.accept().await.unwrap().await };
        let (conn, hub_conn) = tokio::join!(connecting, accept);
        let (conn, hub_conn) = (conn.unwrap(), hub_conn.unwrap());
        // The agent opens the control stream; the hub writes on it.
        let (agent_send, agent_recv) = conn.open_bi().await.unwrap();
        let mut hello = ControlWriter::new(agent_send);
        hello
            .send(&ControlMessage::Ping(Ping {
                nonce: 0,
                sent_at_micros: 0,
            }))
            .await
            .unwrap();
        let (hub_send, mut hub_recv) = hub_conn.accept_bi().await.unwrap();
        let mut d = FrameDecoder::new();
        while d.next_message().unwrap().is_none() {
            let c = hub_recv.read_chunk(64, true).await.unwrap().unwrap();
            d.push(&c.bytes).unwrap();
        }
        Pair {
            writer: ControlWriter::new(hub_send),
            reader: ControlReader::new(agent_recv),
            _conns: [hub_conn, conn],
            _endpoints: [server, client],
        }
    }

    fn route_chunks(n: u32) -> Vec<bytes::Bytes> {
        let table = RouteTable::from_entries((0..n).map(|i| RouteEntry {
            node_name: format!("node-{i}"),
            site: "s".into(),
            pod_cidrs: vec![IpCidr::new(
                std::net::IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + (i << 8))),
                24,
            )
            .unwrap()],
            vtep_mac: MacAddr([2, 0, 0, 0, (i >> 8) as u8, i as u8]),
            underlay: std::net::IpAddr::V4([192, 0, 2, 1].into()),
            mtu: 0,
        }));
        table
            .snapshot()
            .unwrap()
            .into_iter()
            .map(|c| {
                bytes::Bytes::from(
                    petrel_proto::control::encode_to_vec(&ControlMessage::Routes(c)).unwrap(),
                )
            })
            .collect()
    }

    /// Cancelled writes (the session loop's `select!` picked another branch) lose nothing and
    /// never split a frame: the reader decodes every queued message, whole and in order.
    #[tokio::test]
    async fn a_queue_drains_in_order_however_often_its_writes_are_cancelled() {
        let mut p = pair().await;
        let (writer, reader) = (&mut p.writer, &mut p.reader);
        let chunks = route_chunks(3000);
        assert!(chunks.len() >= 2, "several chunks: {}", chunks.len());
        let total: usize = chunks.iter().map(bytes::Bytes::len).sum();
        for c in &chunks {
            assert_eq!(writer.enqueue_encoded(c.clone()), c.len());
        }
        assert_eq!(writer.pending_bytes(), total);
        // The agent does not read yet: quinn takes only its window, the rest stays queued, and
        // every write that cannot go on is cancelled by the timeout.
        let mut cancelled = 0;
        for seq in 1..=20u64 {
            match tokio::time::timeout(Duration::from_millis(2), writer.write_pending()).await {
                Ok(r) => {
                    r.unwrap();
                }
                Err(_) => cancelled += 1,
            }
            writer
                .enqueue(&ControlMessage::Ping(Ping {
                    nonce: seq,
                    sent_at_micros: 0,
                }))
                .unwrap();
        }
        assert!(cancelled > 0, "the small window must stall some writes");
        assert!(writer.pending_bytes() > 0 && writer.pending_bytes() < total + 20 * 64);
        // Now the agent reads while the hub flushes.
        let flush = async {
            let peak = writer.pending.capacity();
            writer.flush().await.unwrap();
            assert_eq!(writer.pending_bytes(), 0);
            assert!(!writer.has_pending());
            // The burst's room went back once the queue was empty.
            assert!(peak > IDLE_QUEUE_CAPACITY, "peak {peak}");
            assert!(writer.pending.capacity() <= IDLE_QUEUE_CAPACITY);
        };
        let read = async {
            let mut routes = 0;
            let mut pings = Vec::new();
            while routes < chunks.len() || pings.len() < 20 {
                match reader.next().await.unwrap().unwrap() {
                    ControlMessage::Routes(_) => {
                        assert!(pings.is_empty(), "a ping overtook a route chunk");
                        routes += 1;
                    }
                    ControlMessage::Ping(p) => pings.push(p.nonce),
                    other => panic!("unexpected {}", other.name()),
                }
            }
            assert_eq!(pings, (1..=20).collect::<Vec<_>>());
        };
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(flush, read) })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn send_goes_after_what_is_queued() {
        let mut p = pair().await;
        let (writer, reader) = (&mut p.writer, &mut p.reader);
        writer
            .enqueue(&ControlMessage::Ping(Ping {
                nonce: 1,
                sent_at_micros: 0,
            }))
            .unwrap();
        let n = writer
            .send_counted(&ControlMessage::Ping(Ping {
                nonce: 2,
                sent_at_micros: 0,
            }))
            .await
            .unwrap();
        assert!(n > 0);
        assert!(!writer.has_pending());
        for want in [1, 2] {
            match reader.next().await.unwrap().unwrap() {
                ControlMessage::Ping(p) => assert_eq!(p.nonce, want),
                other => panic!("unexpected {}", other.name()),
            }
        }
    }
}
