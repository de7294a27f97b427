//! Frame injection ([`Injector`]): VXLAN payloads from the hub handed to this node's kernel over
//! UDP, where `flannel.1` decapsulates them; one at a time or as a GSO batch
//! ([`petrel_transport::udp_batch::UdpBatch`]). Capture, the other direction, is
//! [`crate::capture`].

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::sync::Arc;

use petrel_proto::datagram::{vxlan_vni, VXLAN_OVERHEAD};
use petrel_transport::udp_batch::{Flushed, UdpBatch};
use tokio::net::UdpSocket;

use crate::capture::SOCKET_BUF;
use crate::error::DatapathError;

/// Hands VXLAN payloads from the hub to this node's kernel: UDP to `127.0.0.1:<flannel_port>`,
/// where `flannel.1` decapsulates them (it checks the VNI, that the inner destination MAC is
/// its own and the inner source MAC is not; anything else is dropped silently by the kernel).
/// Cheap to clone (one shared socket).
#[derive(Clone)]
pub struct Injector {
    sock: Arc<UdpSocket>,
    vni: u32,
    dst: SocketAddrV4,
}

impl std::fmt::Debug for Injector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Injector")
            .field("dst", &self.dst)
            .field("vni", &self.vni)
            .finish()
    }
}

impl Injector {
    pub(crate) fn new(flannel_port: u16, vni: u32) -> Result<Self, DatapathError> {
        let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, flannel_port);
        let what = || format!("udp -> {dst} (injection)");
        let std_sock = std::net::UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0))
            .and_then(|s| s.connect(dst).map(|()| s))
            .map_err(|source| DatapathError::Socket {
                what: what(),
                source,
            })?;
        // Larger buffers absorb bursts (a datapath has CAP_NET_ADMIN, so the kernel grants them).
        petrel_transport::socket_buffers::request(&std_sock, SOCKET_BUF);
        let sock = std_sock
            .set_nonblocking(true)
            .and_then(|()| UdpSocket::from_std(std_sock))
            .map_err(|source| DatapathError::Socket {
                what: what(),
                source,
            })?;
        Ok(Injector {
            sock: Arc::new(sock),
            vni,
            dst,
        })
    }

    /// Sends one VXLAN payload to `flannel.1`. Rejects (InvalidData) payloads that are too short,
    /// lack the VXLAN I flag or carry another VNI, since the kernel would drop them silently.
    /// `ConnectionRefused` means nothing listened on the port (flannel.1 down) at the last send.
    pub async fn send(&self, vxlan_payload: &[u8]) -> io::Result<()> {
        self.validate(vxlan_payload)?;
        self.sock.send(vxlan_payload).await.map(|_| ())
    }

    /// The checks [`Injector::send`] makes, for a payload about to join a [`UdpBatch`].
    pub fn validate(&self, vxlan_payload: &[u8]) -> io::Result<()> {
        if vxlan_payload.len() < VXLAN_OVERHEAD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "VXLAN payload shorter than 22 bytes",
            ));
        }
        match vxlan_vni(vxlan_payload) {
            Some(vni) if vni == self.vni => Ok(()),
            Some(vni) => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("VNI {vni}, flannel uses {}", self.vni),
            )),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a VXLAN payload (I flag clear)",
            )),
        }
    }

    /// Sends a batch of payloads (each checked with [`Injector::validate`], destination `None`)
    /// to `flannel.1`, and empties it.
    pub async fn send_batch(&self, batch: &mut UdpBatch) -> Flushed {
        batch.flush(&self.sock).await
    }

    /// Where payloads go (`127.0.0.1:<flannel_port>`).
    pub fn destination(&self) -> SocketAddrV4 {
        self.dst
    }
}
