//! Turning off transmit checksum offload on `petrel.1`, with the legacy `SIOCETHTOOL`
//! `ETHTOOL_STXCSUM` ioctl (the second and last unsafe spot in the crate, beside `tun.rs`).
//!
//! Why: a pod's TCP segment reaches `petrel.1` with `CHECKSUM_PARTIAL` (only the pseudo-header
//! sum filled in; some device further on is to finish it). The VXLAN device encapsulates it as
//! is, and when the relay is a userspace process (the hub, or the agent) the bytes it reads carry
//! that unfinished inner checksum, which the far kernel then rejects: pings work, TCP does not.
//! With checksum offload off on our own device, the kernel completes the inner checksum before
//! encapsulating (and segments TSO packets in software, which a per-packet relay needs anyway).
//! Flannel's device is never touched.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GTXCSUM: u32 = 0x16;
const ETHTOOL_STXCSUM: u32 = 0x17;

#[repr(C)]
struct EthtoolValue {
    cmd: u32,
    data: u32,
}

/// `struct ifreq` with `ifr_data` (a pointer in the union), padded to the kernel's 40 bytes.
#[repr(C)]
struct IfReqData {
    name: [libc::c_char; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

fn ethtool_value(dev: &str, cmd: u32, data: u32) -> io::Result<u32> {
    if dev.is_empty() || dev.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must have 1 to 15 bytes",
        ));
    }
    // SAFETY: plain socket(2) call; the returned descriptor is checked and then owned.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh, valid descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut value = EthtoolValue { cmd, data };
    let mut req = IfReqData {
        name: [0; libc::IFNAMSIZ],
        data: (&mut value as *mut EthtoolValue).cast(),
        _pad: [0; 16],
    };
    for (dst, src) in req.name.iter_mut().zip(dev.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: SIOCETHTOOL reads one `struct ifreq` whose `ifr_data` points at a `struct
    // ethtool_value` (two u32); both are repr(C), initialised, and outlive the call. The kernel
    // writes back only `value.data` (for the GET command).
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), SIOCETHTOOL, &mut req as *mut IfReqData) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.data)
}

/// Turns transmit checksum offload off on `dev` if it is on. Returns whether it changed.
pub(crate) fn disable_tx_checksum(dev: &str) -> io::Result<bool> {
    if ethtool_value(dev, ETHTOOL_GTXCSUM, 0)? == 0 {
        return Ok(false);
    }
    ethtool_value(dev, ETHTOOL_STXCSUM, 0)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_kernel_size() {
        assert_eq!(std::mem::size_of::<IfReqData>(), 40);
    }

    #[test]
    fn bad_names_are_refused_without_a_syscall() {
        assert!(disable_tx_checksum("").is_err());
        assert!(disable_tx_checksum("a-name-that-is-too-long").is_err());
    }
}
