//! QUIC over a byte stream: the TCP fallback for sites whose networks block outbound UDP.
//!
//! The QUIC packets themselves ride the stream, each as a 2-byte big-endian length and the
//! packet, and a [`CarrierSocket`] gives quinn an `AsyncUdpSocket` whose "datagrams" come from
//! and go to such streams. Everything above (the mutual TLS handshake and its identity checks,
//! the control protocol, proxied streams with their own flow control, VXLAN frames as QUIC
//! datagrams, the pre-authentication limits, Retry) is the same code as over UDP; only the
//! packets' path differs. Why this encapsulation and not a framed multiplexer of our own, or
//! HTTP/2 CONNECT-UDP: the first would duplicate the session, stream and flow-control logic
//! QUIC already has (and its tests); the second adds an HTTP/2 layer whose only job here would
//! be to frame packets, which two length bytes do. The price is QUIC's congestion control on top
//! of TCP's (a lost TCP segment stalls every stream for one round trip): acceptable for a
//! fallback that exists so that something works at all.
//!
//! Each stream is one "peer address" (a made-up one, from [`CarrierSocket::attach`]), so quinn
//! keeps one connection per stream. Sending never blocks quinn: a stream whose writer is behind
//! by [`SEND_QUEUE`] packets loses the packet, like a full UDP socket buffer, and QUIC
//! retransmits; the drop is counted. Frames longer than [`MAX_PACKET`] or of length 0 end the
//! stream (a peer speaking something else).

use std::collections::HashMap;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// The largest QUIC packet carried (quinn's packets stay under 1,500 bytes; MTU discovery
/// probes at most 1,452 by default).
pub const MAX_PACKET: usize = 2048;
/// Packets waiting for one stream's writer before further ones are dropped.
pub const SEND_QUEUE: usize = 256;
/// Packets from all streams waiting for quinn.
pub const RECV_QUEUE: usize = 1024;

/// Counters of a carrier socket.
#[derive(Debug, Default)]
pub struct CarrierStats {
    pub packets_in: AtomicU64,
    pub packets_out: AtomicU64,
    /// Sent to a stream whose writer was full or gone.
    pub dropped_out: AtomicU64,
    /// Read from a stream while quinn was behind.
    pub dropped_in: AtomicU64,
    /// Streams ended by a frame that is no QUIC packet (length 0 or over [`MAX_PACKET`]).
    pub bad_frames: AtomicU64,
}

/// An `AsyncUdpSocket` over any number of byte streams.
pub struct CarrierSocket {
    local: SocketAddr,
    incoming_tx: mpsc::Sender<(SocketAddr, Bytes)>,
    incoming: Mutex<mpsc::Receiver<(SocketAddr, Bytes)>>,
    routes: Mutex<HashMap<SocketAddr, mpsc::Sender<Bytes>>>,
    next: AtomicU64,
    pub stats: CarrierStats,
}

impl fmt::Debug for CarrierSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CarrierSocket")
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

/// The made-up address of the `n`th stream: a unique-local IPv6 address (never routed), so it
/// can be told from a real peer in logs.
fn stream_address(n: u64) -> SocketAddr {
    let b = n.to_be_bytes();
    let word = |i: usize| u16::from_be_bytes([b[i], b[i + 1]]);
    SocketAddr::new(
        IpAddr::V6(Ipv6Addr::new(
            0xfd70,
            0x6574,
            0x7463,
            0x7000,
            word(0),
            word(2),
            word(4),
            word(6),
        )),
        443,
    )
}

/// Whether `addr` is a carried stream's made-up address (a tunnel over the TCP fallback).
pub fn is_carried(addr: SocketAddr) -> bool {
    match addr.ip() {
        IpAddr::V6(v6) => v6.segments()[..4] == [0xfd70, 0x6574, 0x7463, 0x7000],
        IpAddr::V4(_) => false,
    }
}

impl CarrierSocket {
    /// A socket with no streams yet. Its own address is made up like its streams' (IPv6: quinn
    /// refuses IPv6 peers on an IPv4 socket).
    pub fn new() -> Arc<Self> {
        let local = stream_address(0);
        let (incoming_tx, incoming) = mpsc::channel(RECV_QUEUE);
        Arc::new(Self {
            local,
            incoming_tx,
            incoming: Mutex::new(incoming),
            routes: Mutex::new(HashMap::new()),
            next: AtomicU64::new(1),
            stats: CarrierStats::default(),
        })
    }

    /// Carries packets over `stream` until it ends (or is malformed); returns the address quinn
    /// knows this stream's peer by, and the task that pumps it (ends when the stream does, and
    /// then forgets the address).
    pub fn attach<S>(self: &Arc<Self>, stream: S) -> (SocketAddr, tokio::task::JoinHandle<()>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        self.attach_with_idle(stream, None)
    }

    /// [`attach`](Self::attach), ending the stream when no packet arrives for `idle` (a peer
    /// that vanished without closing it; QUIC keepalives keep a live one busy).
    pub fn attach_with_idle<S>(
        self: &Arc<Self>,
        stream: S,
        idle: Option<std::time::Duration>,
    ) -> (SocketAddr, tokio::task::JoinHandle<()>)
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let addr = stream_address(self.next.fetch_add(1, Ordering::Relaxed));
        let (tx, rx) = mpsc::channel(SEND_QUEUE);
        if let Ok(mut r) = self.routes.lock() {
            r.insert(addr, tx);
        }
        let me = self.clone();
        let task = tokio::spawn(async move {
            let (rd, wr) = tokio::io::split(stream);
            tokio::select! {
                _ = me.read_half(addr, rd, idle) => {}
                _ = write_half(rx, wr) => {}
            }
            if let Ok(mut r) = me.routes.lock() {
                r.remove(&addr);
            }
        });
        (addr, task)
    }

    async fn read_half<R: AsyncRead + Unpin>(
        &self,
        addr: SocketAddr,
        mut rd: R,
        idle: Option<std::time::Duration>,
    ) {
        loop {
            // The deadline covers the whole frame: a peer that sends a length and then stalls
            // is as idle as one that sends nothing.
            let frame = self.read_frame(&mut rd);
            let read = match idle {
                Some(d) => tokio::time::timeout(d, frame).await.ok(),
                None => Some(frame.await),
            };
            let Some(Some(packet)) = read else {
                return;
            };
            self.stats.packets_in.fetch_add(1, Ordering::Relaxed);
            if self.incoming_tx.try_send((addr, packet)).is_err() {
                self.stats.dropped_in.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// One frame's packet, or `None` when the stream ended or the frame is no QUIC packet
    /// (counted).
    async fn read_frame<R: AsyncRead + Unpin>(&self, rd: &mut R) -> Option<Bytes> {
        let mut len = [0u8; 2];
        rd.read_exact(&mut len).await.ok()?;
        let n = usize::from(u16::from_be_bytes(len));
        if n == 0 || n > MAX_PACKET {
            self.stats.bad_frames.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let mut buf = vec![0u8; n];
        rd.read_exact(&mut buf).await.ok()?;
        Some(Bytes::from(buf))
    }

    /// Streams attached now.
    pub fn streams(&self) -> usize {
        self.routes.lock().map(|r| r.len()).unwrap_or(0)
    }
}

async fn write_half<W: AsyncWrite + Unpin>(mut rx: mpsc::Receiver<Bytes>, mut wr: W) {
    let mut out = Vec::with_capacity(16 * 1024);
    while let Some(p) = rx.recv().await {
        out.clear();
        push_frame(&mut out, &p);
        // Whatever else is queued goes in the same write.
        while out.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(p) => push_frame(&mut out, &p),
                Err(_) => break,
            }
        }
        if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
            return;
        }
    }
}

/// Appends one frame: the packet's length (at most [`MAX_PACKET`], checked when it was queued)
/// and the packet.
fn push_frame(out: &mut Vec<u8>, p: &[u8]) {
    out.extend_from_slice(&u16::try_from(p.len()).unwrap_or(u16::MAX).to_be_bytes());
    out.extend_from_slice(p);
}

/// Always writable: sends never wait (a full stream loses the packet, see the module docs).
#[derive(Debug)]
struct AlwaysWritable;

impl UdpPoller for AlwaysWritable {
    fn poll_writable(self: Pin<&mut Self>, _cx: &mut Context) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncUdpSocket for CarrierSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(AlwaysWritable)
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        // `try_send` never waits, so the lock is held only for the lookup and the queueing
        // (no clone of the sender per packet).
        let routes = self.routes.lock();
        let Some(tx) = routes
            .as_ref()
            .ok()
            .and_then(|r| r.get(&transmit.destination))
        else {
            self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        let step = transmit
            .segment_size
            .unwrap_or(transmit.contents.len())
            .max(1);
        for seg in transmit.contents.chunks(step) {
            if seg.len() > MAX_PACKET || tx.try_send(Bytes::copy_from_slice(seg)).is_err() {
                self.stats.dropped_out.fetch_add(1, Ordering::Relaxed);
            } else {
                self.stats.packets_out.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let Ok(mut rx) = self.incoming.lock() else {
            return Poll::Ready(Err(io::Error::other("carrier socket lock poisoned")));
        };
        let mut n = 0;
        while n < bufs.len().min(meta.len()) {
            let next = if n == 0 {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(p)) => p,
                    Poll::Ready(None) => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
                    Poll::Pending => return Poll::Pending,
                }
            } else {
                match rx.try_recv() {
                    Ok(p) => p,
                    Err(_) => break,
                }
            };
            let (from, packet) = next;
            let (Some(buf), Some(m)) = (bufs.get_mut(n), meta.get_mut(n)) else {
                break;
            };
            // quinn's receive buffers hold a full datagram (64 KiB); a packet is at most
            // MAX_PACKET, so it always fits.
            let len = packet.len().min(buf.len());
            if let (Some(dst), Some(src)) = (buf.get_mut(..len), packet.get(..len)) {
                dst.copy_from_slice(src);
            }
            *m = RecvMeta {
                addr: from,
                len,
                stride: len,
                ecn: None,
                dst_ip: None,
            };
            n += 1;
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn may_fragment(&self) -> bool {
        // The stream never fragments, and quinn's MTU discovery then finds the largest packet
        // (capped by its own upper bound, under MAX_PACKET).
        false
    }
}

/// A quinn endpoint over carrier streams (a server if `server` is given).
pub fn endpoint(
    socket: Arc<CarrierSocket>,
    config: quinn::EndpointConfig,
    server: Option<quinn::ServerConfig>,
) -> io::Result<quinn::Endpoint> {
    let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime"))?;
    quinn::Endpoint::new_with_abstract_socket(config, server, socket, runtime)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::time::Duration;

    /// A QUIC server and client whose only path is an in-memory byte stream.
    fn pair() -> (
        quinn::Endpoint,
        quinn::Endpoint,
        SocketAddr,
        Arc<CarrierSocket>,
    ) {
        let cert = rcgen::generate_simple_self_signed(vec!["hub.test".into()]).unwrap();
        let der = cert.cert.der().clone();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(
            rustls_pki_types::PrivatePkcs8KeyDer::from(cert.signing_key.serialize_der()),
        );
        let mut server = quinn::ServerConfig::with_single_cert(vec![der.clone()], key).unwrap();
        let mut t = quinn::TransportConfig::default();
        t.datagram_receive_buffer_size(Some(1 << 20));
        server.transport_config(Arc::new(t));
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).unwrap();
        let client_cfg = quinn::ClientConfig::with_root_certificates(Arc::new(roots)).unwrap();
        let hub_sock = CarrierSocket::new();
        let agent_sock = CarrierSocket::new();
        let (a, b) = tokio::io::duplex(64 * 1024);
        let _ = hub_sock.attach(a);
        let (hub_addr, _) = agent_sock.attach(b);
        let hub = endpoint(
            hub_sock.clone(),
            quinn::EndpointConfig::default(),
            Some(server),
        )
        .unwrap();
        let mut agent = endpoint(agent_sock, quinn::EndpointConfig::default(), None).unwrap();
        agent.set_default_client_config(client_cfg);
        (hub, agent, hub_addr, hub_sock)
    }

    #[tokio::test]
    async fn quic_streams_and_datagrams_cross_a_byte_stream() {
        let (hub, agent, hub_addr, hub_sock) = pair();
        let server = tokio::spawn(async move {
            let conn = hub.accept().await.unwrap().await.unwrap();
            let (mut send, mut recv) = conn.accept_bi().await.unwrap();
            let data = recv.read_to_end(4 << 20).await.unwrap();
            send.write_all(&data).await.unwrap();
            send.finish().unwrap();
            let d = conn.read_datagram().await.unwrap();
            conn.send_datagram(d).unwrap();
            // Keep the connection until the client has read everything.
            conn.closed().await;
        });
        let conn = agent.connect(hub_addr, "hub.test").unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let payload: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 251) as u8).collect();
        send.write_all(&payload).await.unwrap();
        send.finish().unwrap();
        let back = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(4 << 20))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, payload);
        conn.send_datagram(Bytes::from_static(b"a vxlan frame"))
            .unwrap();
        let d = tokio::time::timeout(Duration::from_secs(5), conn.read_datagram())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&d[..], b"a vxlan frame");
        conn.close(0u32.into(), b"done");
        server.await.unwrap();
        assert!(hub_sock.stats.packets_in.load(Ordering::Relaxed) > 700);
        assert_eq!(hub_sock.stats.bad_frames.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_frame_that_is_no_quic_packet_ends_the_stream() {
        let sock = CarrierSocket::new();
        for bad in [[0u8, 0], [0xff, 0xff]] {
            let (a, mut b) = tokio::io::duplex(1024);
            let (_, task) = sock.attach(a);
            assert_eq!(sock.streams(), 1);
            b.write_all(&bad).await.unwrap();
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .unwrap()
                .unwrap();
            assert_eq!(sock.streams(), 0);
        }
        assert_eq!(sock.stats.bad_frames.load(Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn a_frame_that_stalls_after_its_length_ends_at_the_idle_deadline() {
        let sock = CarrierSocket::new();
        let (a, mut b) = tokio::io::duplex(1024);
        let (_, task) = sock.attach_with_idle(a, Some(Duration::from_millis(200)));
        // A length, half the packet, then nothing (the writer stays open).
        b.write_all(&[0, 100]).await.unwrap();
        b.write_all(&[0u8; 50]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("the stream was not closed at its idle deadline")
            .unwrap();
        assert_eq!(sock.streams(), 0);
        assert_eq!(sock.stats.packets_in.load(Ordering::Relaxed), 0);
        drop(b);
    }

    #[test]
    fn stream_addresses_are_unique_local_and_distinct() {
        let a = stream_address(1);
        assert_ne!(a, stream_address(2));
        assert!(is_carried(a) && is_carried(stream_address(u64::MAX)));
        assert!(!is_carried("127.0.0.1:443".parse().unwrap()));
        assert!(!is_carried("[fd70::1]:443".parse().unwrap()));
        match a.ip() {
            IpAddr::V6(v6) => assert_eq!(v6.segments()[0], 0xfd70),
            IpAddr::V4(_) => panic!("{a}"),
        }
    }
}
