//! Frame capture ([`FrameSource`]): the frames the kernel hands Petrel's hook for the relay, as
//! *VXLAN payloads* (the 8-byte VXLAN header, flags `0x08` and a 24-bit VNI, then the inner
//! Ethernet frame: byte for byte what `flannel.1` sends on UDP 8472). The fast hook receives them
//! from the kernel's own VXLAN device over UDP (batched with `recvmmsg`, see
//! [`petrel_transport::udp_batch`]); the portable hook reads IP packets from the TUN device and
//! encapsulates them in place ([`EncapTable`]). Injection, the other direction, is
//! [`crate::inject`]; the wire format is `petrel_proto::datagram`'s.

use std::fs::File;
use std::io::{self, Read};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};

use ipnet::Ipv4Net;
use petrel_proto::datagram::{encode_vxlan_header, vxlan_vni, ETHERTYPE_IPV4, VXLAN_OVERHEAD};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;
use tokio::sync::watch;

use crate::error::DatapathError;

/// A receive buffer of this size never truncates a frame (largest UDP payload / IP packet).
pub const FRAME_BUF_LEN: usize = 65536;

/// Socket buffers asked for the capture and injection sockets.
pub(crate) const SOCKET_BUF: usize = 4 << 20;

/// What the portable encapsulation needs: VNI, our VtepMAC and the peers' CIDRs and VtepMACs,
/// longest prefix first.
#[derive(Clone, Default)]
pub(crate) struct EncapTable {
    pub vni: u32,
    pub src_mac: [u8; 6],
    peers: Vec<(u32, u32, [u8; 6])>,
    /// The TUN device to read from (portable hook); replaced if `apply` had to recreate it.
    pub tun: Option<Arc<AsyncFd<File>>>,
}

impl EncapTable {
    pub(crate) fn new(vni: u32, src_mac: [u8; 6], peers: &[(Ipv4Net, [u8; 6])]) -> Self {
        let mut sorted: Vec<(Ipv4Net, [u8; 6])> = peers.to_vec();
        sorted.sort_by_key(|p| std::cmp::Reverse(p.0.prefix_len()));
        EncapTable {
            vni,
            src_mac,
            peers: sorted
                .into_iter()
                .map(|(net, mac)| (u32::from(net.network()), u32::from(net.netmask()), mac))
                .collect(),
            tun: None,
        }
    }

    pub(crate) fn with_tun(mut self, tun: Option<Arc<AsyncFd<File>>>) -> Self {
        self.tun = tun;
        self
    }

    /// The VtepMAC of the peer whose CIDR contains `dst` (longest prefix).
    pub(crate) fn lookup(&self, dst: Ipv4Addr) -> Option<[u8; 6]> {
        let d = u32::from(dst);
        self.peers
            .iter()
            .find(|(net, mask, _)| d & mask == *net)
            .map(|(_, _, mac)| *mac)
    }

    /// Wraps the IPv4 packet at `buf[VXLAN_OVERHEAD..VXLAN_OVERHEAD + len]` in place. Returns
    /// the payload length, or why it cannot be sent.
    pub(crate) fn encapsulate(&self, buf: &mut [u8], len: usize) -> Result<usize, Drop> {
        let pkt = buf
            .get(VXLAN_OVERHEAD..VXLAN_OVERHEAD + len)
            .ok_or(Drop::Malformed)?;
        if pkt.len() < 20 || pkt[0] >> 4 != 4 {
            return Err(Drop::Malformed);
        }
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        let dst_mac = self.lookup(dst).ok_or(Drop::NoPeer)?;
        buf[..8].copy_from_slice(&encode_vxlan_header(self.vni));
        buf[8..14].copy_from_slice(&dst_mac);
        buf[14..20].copy_from_slice(&self.src_mac);
        buf[20..22].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        Ok(VXLAN_OVERHEAD + len)
    }
}

/// Why the portable source skipped a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Drop {
    Malformed,
    NoPeer,
}

impl EncapTable {
    /// Same peers, VNI, MAC and TUN descriptor.
    fn same_as(&self, o: &EncapTable) -> bool {
        self.vni == o.vni
            && self.src_mac == o.src_mac
            && self.peers == o.peers
            && match (&self.tun, &o.tun) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// The encapsulation table shared between the [`crate::Datapath`] (writer, on apply) and the
/// portable [`FrameSource`] (reader: one atomic load per packet unless it changed). The watch
/// also wakes a reader blocked on a TUN descriptor that was replaced (the kernel does not wake
/// readers of a deleted TUN device).
pub(crate) struct EncapShared {
    version: watch::Sender<u64>,
    table: Mutex<Arc<EncapTable>>,
}

impl Default for EncapShared {
    fn default() -> Self {
        EncapShared {
            version: watch::Sender::new(0),
            table: Mutex::new(Arc::new(EncapTable::default())),
        }
    }
}

impl EncapShared {
    /// Installs `table`; readers notice only if it differs from the current one.
    pub(crate) fn publish(&self, table: EncapTable) {
        {
            let mut t = match self.table.lock() {
                Ok(t) => t,
                Err(poisoned) => poisoned.into_inner(),
            };
            if t.same_as(&table) {
                return;
            }
            *t = Arc::new(table);
        }
        self.version.send_modify(|v| *v += 1);
    }

    fn current(&self) -> Arc<EncapTable> {
        match self.table.lock() {
            Ok(t) => Arc::clone(&t),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }
}

/// Counters of a [`FrameSource`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    /// Frames returned by `recv`.
    pub frames: u64,
    /// Bytes returned by `recv` (VXLAN payload bytes).
    pub bytes: u64,
    /// Packets whose destination is in no peer CIDR (portable; e.g. a peer just removed).
    pub dropped_no_peer: u64,
    /// Datagrams that are not VXLAN / packets that are not IPv4.
    pub dropped_malformed: u64,
}

enum SourceInner {
    /// Fast hook: the kernel's VXLAN datagrams to `127.0.0.1:<relay_port>`.
    Udp(UdpSocket),
    /// Portable hook: IP packets from the TUN device, encapsulated here.
    Tun {
        shared: Arc<EncapShared>,
        version: watch::Receiver<u64>,
        table: Arc<EncapTable>,
    },
}

/// Frames the kernel sends toward the relay, one VXLAN payload per [`FrameSource::recv`].
///
/// Fast hook: a UDP socket bound to `127.0.0.1:<relay_port>` receiving what `petrel.1` sends
/// (only meaningful with [`crate::Relay::Local`]). Portable hook: reads from `petrel0` and
/// encapsulates in place (with [`crate::Relay::Remote`] the caller forwards the payloads to the
/// hub itself). No allocation per frame. Use one `FrameSource` per datapath at a time.
pub struct FrameSource {
    inner: SourceInner,
    stats: FrameStats,
}

impl std::fmt::Debug for FrameSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.inner {
            SourceInner::Udp(_) => "udp",
            SourceInner::Tun { .. } => "tun",
        };
        f.debug_struct("FrameSource")
            .field("kind", &kind)
            .field("stats", &self.stats)
            .finish()
    }
}

impl FrameSource {
    pub(crate) fn udp(port: u16) -> Result<Self, DatapathError> {
        let addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port));
        let std_sock = std::net::UdpSocket::bind(addr).map_err(|source| DatapathError::Socket {
            what: format!("udp {addr} (relay capture)"),
            source,
        })?;
        // Larger buffers absorb bursts (a datapath has CAP_NET_ADMIN, so the kernel grants them).
        petrel_transport::socket_buffers::request(&std_sock, SOCKET_BUF);
        std_sock
            .set_nonblocking(true)
            .and_then(|()| UdpSocket::from_std(std_sock))
            .map(|s| FrameSource {
                inner: SourceInner::Udp(s),
                stats: FrameStats::default(),
            })
            .map_err(|source| DatapathError::Socket {
                what: format!("udp {addr} (relay capture)"),
                source,
            })
    }

    pub(crate) fn tun(shared: Arc<EncapShared>) -> Self {
        let mut version = shared.version.subscribe();
        version.mark_unchanged();
        let table = shared.current();
        FrameSource {
            inner: SourceInner::Tun {
                shared,
                version,
                table,
            },
            stats: FrameStats::default(),
        }
    }

    /// Receives one VXLAN payload into `buf` and returns its length. `buf` should have
    /// [`FRAME_BUF_LEN`] bytes (at least the hook device's MTU + [`VXLAN_OVERHEAD`]); longer
    /// frames are truncated by the kernel. Cancel-safe: dropping the future loses no frame that
    /// was not returned.
    pub async fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.len() < VXLAN_OVERHEAD + 20 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "frame buffer too small",
            ));
        }
        loop {
            match &mut self.inner {
                SourceInner::Udp(sock) => {
                    let n = sock.recv(buf).await?;
                    if n < VXLAN_OVERHEAD || vxlan_vni(&buf[..n]).is_none() {
                        self.stats.dropped_malformed += 1;
                        continue;
                    }
                    self.stats.frames += 1;
                    self.stats.bytes += n as u64;
                    return Ok(n);
                }
                SourceInner::Tun {
                    shared,
                    version,
                    table,
                } => {
                    if version.has_changed().unwrap_or(false) {
                        version.mark_unchanged();
                        *table = shared.current();
                    }
                    let Some(fd) = table.tun.clone() else {
                        return Err(io::Error::new(
                            io::ErrorKind::NotConnected,
                            "the TUN device was removed (datapath cleaned up)",
                        ));
                    };
                    let event = tokio::select! {
                        biased;
                        read = read_tun(&fd, &mut buf[VXLAN_OVERHEAD..]) => TunEvent::Read(read),
                        // New table (peers changed, or a new TUN descriptor after the device
                        // was deleted from outside and `apply` recreated it; the kernel does
                        // not wake readers of a deleted TUN device).
                        _ = version.changed() => TunEvent::Changed,
                    };
                    let n = match event {
                        TunEvent::Read(Ok(n)) => n,
                        TunEvent::Changed => {
                            *table = shared.current();
                            continue;
                        }
                        // A detached descriptor: wait for `apply` to publish a new device.
                        TunEvent::Read(Err(e)) if e.raw_os_error() == Some(libc::EBADFD) => {
                            if version.changed().await.is_ok() {
                                *table = shared.current();
                                continue;
                            }
                            return Err(e);
                        }
                        TunEvent::Read(Err(e)) => return Err(e),
                    };
                    match table.encapsulate(buf, n) {
                        Ok(len) => {
                            self.stats.frames += 1;
                            self.stats.bytes += len as u64;
                            return Ok(len);
                        }
                        Err(Drop::NoPeer) => self.stats.dropped_no_peer += 1,
                        Err(Drop::Malformed) => self.stats.dropped_malformed += 1,
                    }
                }
            }
        }
    }

    /// Counters since this source was created.
    pub fn stats(&self) -> FrameStats {
        self.stats
    }
}

/// Frames received by one [`FrameSource::recv_batch`]: up to `slots` VXLAN payloads of at most
/// `slot_len` bytes each, in one reusable buffer (no allocation per call).
#[derive(Debug)]
pub struct FrameBatch {
    buf: Vec<u8>,
    slot_len: usize,
    /// (offset, length) of each frame received, in order.
    frames: Vec<(usize, usize)>,
    /// Frames the last call dropped because they did not fit `slot_len`.
    oversize: usize,
    /// Whole-frame buffer for a TUN read (portable hook), allocated on first use.
    scratch: Vec<u8>,
}

impl FrameBatch {
    /// `slots` frames of up to `slot_len` bytes per call (at least one frame, and room for a
    /// minimal frame). Larger frames are dropped and counted ([`FrameBatch::oversize`]): pick a
    /// `slot_len` above anything the caller could forward (for a QUIC datagram, its maximum).
    pub fn new(slots: usize, slot_len: usize) -> Self {
        let slots = slots.max(1);
        let slot_len = slot_len.max(VXLAN_OVERHEAD + 20);
        FrameBatch {
            buf: vec![0; slots * slot_len],
            slot_len,
            frames: Vec::with_capacity(slots),
            oversize: 0,
            scratch: Vec::new(),
        }
    }

    fn slots(&self) -> usize {
        self.buf.len() / self.slot_len
    }

    /// Frames received by the last call.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of all frames received by the last call.
    pub fn bytes(&self) -> usize {
        self.frames.iter().map(|(_, l)| l).sum()
    }

    /// The frames received by the last call (VXLAN payloads).
    pub fn frames(&self) -> impl Iterator<Item = &[u8]> + '_ {
        self.frames
            .iter()
            .filter_map(|&(off, len)| self.buf.get(off..off + len))
    }

    /// Frames the last call dropped as longer than the slot length.
    pub fn oversize(&self) -> usize {
        self.oversize
    }
}

impl FrameSource {
    /// Receives every frame that is ready (at least one, waiting for it if none is), up to the
    /// batch's size, with one system call (`recvmmsg`) on the fast hook. Same checks and counters
    /// as [`FrameSource::recv`]; cancel-safe in the same way.
    pub async fn recv_batch(&mut self, batch: &mut FrameBatch) -> io::Result<usize> {
        batch.frames.clear();
        batch.oversize = 0;
        loop {
            match &mut self.inner {
                SourceInner::Udp(sock) => {
                    let slot_len = batch.slot_len;
                    let slots = batch.slots();
                    let FrameBatch {
                        buf,
                        frames,
                        oversize,
                        ..
                    } = batch;
                    sock.async_io(tokio::io::Interest::READABLE, || {
                        petrel_transport::udp_batch::recv_mmsg(
                            sock, buf, slot_len, slots, frames, oversize,
                        )
                    })
                    .await?;
                    let mut kept = 0;
                    for i in 0..batch.frames.len() {
                        let (off, len) = batch.frames[i];
                        let ok = batch
                            .buf
                            .get(off..off + len)
                            .is_some_and(|f| len >= VXLAN_OVERHEAD && vxlan_vni(f).is_some());
                        if ok {
                            batch.frames[kept] = (off, len);
                            kept += 1;
                            self.stats.frames += 1;
                            self.stats.bytes += len as u64;
                        } else {
                            self.stats.dropped_malformed += 1;
                        }
                    }
                    batch.frames.truncate(kept);
                    if kept > 0 || batch.oversize > 0 {
                        return Ok(kept);
                    }
                }
                SourceInner::Tun { .. } => {
                    if batch.scratch.len() < FRAME_BUF_LEN {
                        batch.scratch = vec![0; FRAME_BUF_LEN];
                    }
                    let n = self.recv(&mut batch.scratch).await?;
                    if n > batch.slot_len {
                        batch.oversize = 1;
                        return Ok(0);
                    }
                    let (Some(dst), Some(src)) = (batch.buf.get_mut(..n), batch.scratch.get(..n))
                    else {
                        return Ok(0);
                    };
                    dst.copy_from_slice(src);
                    batch.frames.push((0, n));
                    return Ok(1);
                }
            }
        }
    }
}

enum TunEvent {
    Read(io::Result<usize>),
    Changed,
}

async fn read_tun(fd: &AsyncFd<File>, out: &mut [u8]) -> io::Result<usize> {
    loop {
        let mut guard = fd.readable().await?;
        match guard.try_io(|inner| {
            let mut f: &File = inner.get_ref();
            f.read(out)
        }) {
            Ok(result) => return result,
            Err(_would_block) => continue,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn net(s: &str) -> Ipv4Net {
        s.parse().unwrap()
    }

    #[test]
    fn encapsulates_in_place_with_longest_prefix() {
        let a = [2, 0xfa, 0, 0, 0, 2];
        let b = [2, 0xfa, 0, 0, 0, 3];
        let me = [2, 0xfa, 0, 0, 0, 1];
        let t = EncapTable::new(
            1,
            me,
            &[(net("10.244.0.0/16"), a), (net("10.244.3.0/24"), b)],
        );
        let mut buf = vec![0u8; 128];
        // minimal IPv4 header 10.244.1.2 -> 10.244.3.7
        let ip = [
            0x45, 0, 0, 20, 0, 0, 0x40, 0, 64, 1, 0, 0, 10, 244, 1, 2, 10, 244, 3, 7,
        ];
        buf[VXLAN_OVERHEAD..VXLAN_OVERHEAD + 20].copy_from_slice(&ip);
        let n = t.encapsulate(&mut buf, 20).unwrap();
        assert_eq!(n, 42);
        assert_eq!(&buf[..8], &[8, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&buf[8..14], &b);
        assert_eq!(&buf[14..20], &me);
        assert_eq!(&buf[20..22], &[8, 0]);
        assert_eq!(&buf[22..42], &ip);
        // 10.244.2.x falls back to the /16
        buf[VXLAN_OVERHEAD + 18] = 2;
        t.encapsulate(&mut buf, 20).unwrap();
        assert_eq!(&buf[8..14], &a);
        // outside every peer
        buf[VXLAN_OVERHEAD + 16] = 192;
        assert_eq!(t.encapsulate(&mut buf, 20), Err(Drop::NoPeer));
        // IPv6 / short packets
        buf[VXLAN_OVERHEAD] = 0x60;
        assert_eq!(t.encapsulate(&mut buf, 20), Err(Drop::Malformed));
        assert_eq!(t.encapsulate(&mut buf, 10), Err(Drop::Malformed));
    }

    #[tokio::test]
    async fn recv_batch_takes_what_is_ready() {
        let mut src = FrameSource::udp(0).unwrap();
        let SourceInner::Udp(sock) = &src.inner else {
            unreachable!()
        };
        let to = sock.local_addr().unwrap();
        let tx = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let frame = |n: usize, b: u8| {
            let mut f = vec![b; n];
            f[..8].copy_from_slice(&encode_vxlan_header(1));
            f
        };
        tx.send_to(&frame(100, 1), to).unwrap();
        tx.send_to(&[0u8; 30], to).unwrap(); // not VXLAN: dropped as malformed
        tx.send_to(&frame(300, 2), to).unwrap(); // longer than a slot: oversize
        tx.send_to(&frame(200, 3), to).unwrap();
        tx.send_to(&frame(50, 4), to).unwrap();
        // However the datagrams arrive (one call may see all five or fewer), every call takes at
        // most three slots, keeps the VXLAN frames that fit in order, counts the one too long
        // and drops the malformed one.
        let mut b = FrameBatch::new(3, 256);
        let (mut kept, mut oversize, mut bytes) = (Vec::new(), 0, 0);
        let deadline = std::time::Duration::from_secs(5);
        while kept.len() < 3 {
            let n = tokio::time::timeout(deadline, src.recv_batch(&mut b))
                .await
                .expect("frames within 5 s")
                .unwrap();
            assert!(n <= 3 && n == b.len());
            oversize += b.oversize();
            bytes += b.bytes();
            kept.extend(b.frames().map(<[u8]>::to_vec));
        }
        assert_eq!(kept, vec![frame(100, 1), frame(200, 3), frame(50, 4)]);
        assert_eq!((oversize, bytes), (1, 350));
        let st = src.stats();
        assert_eq!((st.frames, st.dropped_malformed), (3, 1));
    }

    #[test]
    fn shared_table_versions() {
        let s = EncapShared::default();
        let mut rx = s.version.subscribe();
        assert!(s.current().lookup(Ipv4Addr::new(10, 0, 0, 1)).is_none());
        let t = EncapTable::new(1, [0; 6], &[(net("10.0.0.0/8"), [1; 6])]);
        s.publish(t.clone());
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        assert_eq!(s.current().lookup(Ipv4Addr::new(10, 0, 0, 1)), Some([1; 6]));
        // The same table again: readers are not disturbed.
        s.publish(t);
        assert!(!rx.has_changed().unwrap());
    }
}
