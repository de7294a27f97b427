//! UDP batching for the data plane, shared by the hub's relay and the agent's injection: many
//! payloads to one destination in one UDP GSO send ([`UdpBatch`], `UDP_SEGMENT`) and many
//! datagrams in one `recvmmsg` ([`recv_mmsg`]). Plain sockets only: no netlink, no devices (that
//! is `petrel-datapath`), so the hub sends with GSO without the kernel-programming crate.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use nix::errno::Errno;
use tokio::net::UdpSocket;

/// One `recvmmsg` (non-blocking) into `slots` slots of `slot_len` bytes of `buf`; records
/// (offset, length) of each datagram that fit and counts those that did not (MSG_TRUNC). Call it
/// from the socket's readiness (`async_io`); `WouldBlock` means nothing was waiting.
pub fn recv_mmsg(
    sock: &UdpSocket,
    buf: &mut [u8],
    slot_len: usize,
    slots: usize,
    frames: &mut Vec<(usize, usize)>,
    oversize: &mut usize,
) -> io::Result<()> {
    use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders};
    use std::os::fd::AsRawFd;
    let mut headers = MultiHeaders::<()>::preallocate(slots, None);
    let mut iovs: Vec<[io::IoSliceMut<'_>; 1]> = buf
        .chunks_mut(slot_len)
        .take(slots)
        .map(|c| [io::IoSliceMut::new(c)])
        .collect();
    let results = recvmmsg(
        sock.as_raw_fd(),
        &mut headers,
        iovs.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(io::Error::from)?;
    for (i, r) in results.enumerate() {
        if r.flags.contains(MsgFlags::MSG_TRUNC) {
            *oversize += 1;
        } else {
            frames.push((i * slot_len, r.bytes));
        }
    }
    Ok(())
}

/// Most payloads in one UDP GSO send (the kernel allows 64 or, since 5.x, 128).
const GSO_MAX_SEGMENTS: usize = 64;
/// Most bytes in one GSO send (it is one UDP datagram before segmentation).
const GSO_MAX_BYTES: usize = 65_000;

/// Consecutive UDP payloads for one destination, sent with as few system calls as the kernel
/// allows: payloads of one size (the last may be shorter) go out as a single UDP GSO send
/// (`UDP_SEGMENT`), which the kernel cuts into exactly the datagrams separate sends would have
/// made, after routing, filtering and bridging them once instead of once per payload. Where GSO
/// is unavailable (`EIO` without checksum offload on the route's device, old kernels) the batch
/// falls back to one send per payload, for good.
///
/// The batch holds the payloads themselves (reference-counted slices of the tunnel datagrams),
/// not a copy: the GSO send gathers them with one iovec each. A hub keeps one batch per agent, so
/// an idle one must cost next to nothing; a 64 KiB copy buffer each was most of the hub's memory
/// at 10,000 agents.
#[derive(Debug)]
pub struct UdpBatch {
    payloads: Vec<Bytes>,
    bytes: usize,
    seg: usize,
    dest: Option<SocketAddr>,
    /// A shorter payload ended the batch.
    closed: bool,
    gso: bool,
}

/// What [`UdpBatch::flush`] did.
#[derive(Debug, Default)]
pub struct Flushed {
    /// Payloads handed to the kernel.
    pub sent: usize,
    /// Payloads that could not be sent.
    pub failed: usize,
    /// The first error, if any.
    pub error: Option<io::Error>,
}

impl Default for UdpBatch {
    fn default() -> Self {
        UdpBatch {
            payloads: Vec::new(),
            bytes: 0,
            seg: 0,
            dest: None,
            closed: false,
            gso: true,
        }
    }
}

impl UdpBatch {
    pub fn new() -> Self {
        Self::default()
    }

    /// Payloads waiting.
    pub fn len(&self) -> usize {
        self.payloads.len()
    }

    pub fn is_empty(&self) -> bool {
        self.payloads.is_empty()
    }

    /// Whether a payload of `len` bytes to `dest` (`None`: a connected socket) can join.
    pub fn accepts(&self, len: usize, dest: Option<SocketAddr>) -> bool {
        self.payloads.is_empty()
            || (!self.closed
                && dest == self.dest
                && len <= self.seg
                && len > 0
                && self.payloads.len() < GSO_MAX_SEGMENTS
                && self.bytes + len <= GSO_MAX_BYTES)
    }

    /// Adds a payload; the caller checked [`UdpBatch::accepts`] (otherwise it flushes first).
    pub fn push(&mut self, payload: Bytes, dest: Option<SocketAddr>) {
        if self.payloads.is_empty() {
            self.seg = payload.len();
            self.dest = dest;
            self.closed = false;
        } else if payload.len() < self.seg {
            self.closed = true;
        }
        self.bytes += payload.len();
        self.payloads.push(payload);
    }

    fn clear(&mut self) {
        self.payloads.clear();
        self.bytes = 0;
        self.closed = false;
    }

    /// Sends everything waiting on `sock` and empties the batch.
    pub async fn flush(&mut self, sock: &UdpSocket) -> Flushed {
        let mut out = Flushed::default();
        if self.payloads.is_empty() {
            return out;
        }
        if self.payloads.len() > 1 && self.gso {
            match send_gso(sock, &self.payloads, self.seg, self.dest).await {
                Ok(()) => {
                    out.sent = self.payloads.len();
                    self.clear();
                    return out;
                }
                Err(e) => {
                    if matches!(
                        e.raw_os_error().map(Errno::from_raw),
                        Some(Errno::EIO | Errno::EOPNOTSUPP | Errno::ENOPROTOOPT)
                    ) {
                        tracing::debug!(error = %e, "UDP GSO unavailable; one send per frame from now on");
                        self.gso = false;
                    }
                    // Otherwise (e.g. EINVAL for a size the route cannot take) try one by one
                    // this time: each send then reports its own error.
                }
            }
        }
        for payload in &self.payloads {
            let r = match self.dest {
                Some(d) => sock.send_to(payload, d).await,
                None => sock.send(payload).await,
            };
            match r {
                Ok(_) => out.sent += 1,
                Err(e) => {
                    out.failed += 1;
                    out.error.get_or_insert(e);
                }
            }
        }
        self.clear();
        out
    }
}

async fn send_gso(
    sock: &UdpSocket,
    payloads: &[Bytes],
    seg: usize,
    dest: Option<SocketAddr>,
) -> io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, SockaddrStorage};
    use std::os::fd::AsRawFd;
    let seg = u16::try_from(seg).map_err(|_| io::Error::from(Errno::EINVAL))?;
    if payloads.len() > GSO_MAX_SEGMENTS {
        // Only a push past `accepts` gets here; the caller then sends one by one.
        return Err(io::Error::from(Errno::EINVAL));
    }
    let dest = dest.map(SockaddrStorage::from);
    sock.async_io(tokio::io::Interest::WRITABLE, || {
        // One datagram for the kernel, gathered from the payloads in place. The iovecs live on
        // this stack frame only, not in the (per-agent, long-lived) future that awaits the send.
        let mut iov = [io::IoSlice::new(&[]); GSO_MAX_SEGMENTS];
        for (slot, p) in iov.iter_mut().zip(payloads) {
            *slot = io::IoSlice::new(p);
        }
        let iov = iov.get(..payloads.len()).unwrap_or_default();
        let cmsg = [ControlMessage::UdpGsoSegments(&seg)];
        sendmsg(
            sock.as_raw_fd(),
            iov,
            &cmsg,
            MsgFlags::empty(),
            dest.as_ref(),
        )
        .map(drop)
        .map_err(io::Error::from)
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn udp_batch_sends_the_same_datagrams() {
        let rx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let tx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut b = UdpBatch::new();
        let payloads: Vec<Vec<u8>> = (0..5u8)
            .map(|i| vec![i; if i == 4 { 100 } else { 1400 }])
            .collect();
        for p in &payloads {
            assert!(b.accepts(p.len(), Some(to)));
            b.push(Bytes::copy_from_slice(p), Some(to));
        }
        // A shorter payload closed the batch; another destination never joins.
        assert!(!b.accepts(100, Some(to)));
        let f = b.flush(&tx).await;
        assert_eq!((f.sent, f.failed), (5, 0), "{:?}", f.error);
        assert!(b.is_empty());
        let mut buf = [0u8; 2000];
        for p in &payloads {
            let n = rx.recv(&mut buf).unwrap();
            assert_eq!(&buf[..n], &p[..]);
        }
    }

    #[tokio::test]
    async fn recv_mmsg_fills_slots_and_counts_truncated() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let to = rx.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        tx.send_to(&[1; 10], to).unwrap();
        tx.send_to(&[2; 40], to).unwrap(); // longer than a slot
        tx.send_to(&[3; 20], to).unwrap();
        let (mut buf, mut frames, mut oversize) = (vec![0u8; 4 * 32], Vec::new(), 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while frames.len() + oversize < 3 && std::time::Instant::now() < deadline {
            rx.readable().await.unwrap();
            match recv_mmsg(&rx, &mut buf, 32, 4, &mut frames, &mut oversize) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(oversize, 1);
        let got: Vec<&[u8]> = frames.iter().map(|&(o, l)| &buf[o..o + l]).collect();
        assert_eq!(got, vec![&[1u8; 10][..], &[3u8; 20][..]]);
    }
}
