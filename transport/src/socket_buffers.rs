//! Kernel buffer sizes of Petrel's UDP sockets (QUIC endpoints, the data plane's capture,
//! injection and relay sockets). One place, so that every socket asks the same way and an
//! operator sees the same warning when the kernel grants less.

/// Asks for `bytes` of kernel buffer in each direction: SO_RCVBUFFORCE/SO_SNDBUFFORCE where the
/// process has CAP_NET_ADMIN, else the plain options, which the kernel caps at
/// `net.core.rmem_max`/`wmem_max`. Best effort: a smaller buffer is a performance problem, not
/// an error, and what was granted is logged (the kernel reports twice the usable size).
pub fn request(socket: &std::net::UdpSocket, bytes: usize) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt};
    if setsockopt(socket, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(socket, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(socket, sockopt::SndBuf, &bytes);
    }
    let rcv = getsockopt(socket, sockopt::RcvBuf).unwrap_or(0);
    let snd = getsockopt(socket, sockopt::SndBuf).unwrap_or(0);
    if rcv < bytes {
        tracing::warn!(
            wanted = bytes,
            granted = rcv / 2,
            "UDP receive buffer smaller than asked (raise net.core.rmem_max or grant CAP_NET_ADMIN)"
        );
    } else {
        tracing::debug!(rcv, snd, "UDP socket buffers");
    }
}
