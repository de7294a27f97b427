//! The TUN device of the portable hook: `open("/dev/net/tun")` + `ioctl(TUNSETIFF)` with
//! `IFF_TUN | IFF_NO_PI` (IP packets, no 4-byte packet-information prefix). This is the only
//! unsafe code in the crate. The device lives as long as the file descriptor (it is not made
//! persistent): if the process dies, the kernel deletes `petrel0` and its routes, and traffic
//! falls back to Flannel's main-table routes.
//!
//! No `IFF_VNET_HDR` and no `TUNSETOFFLOAD`: the kernel then segments GSO packets and completes
//! checksums before handing them to us, so every read is one complete IP packet with valid
//! checksums, ready to be wrapped as VXLAN.

#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags (`ifr_flags`, a short), padded
/// to the kernel's 40-byte size.
#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Creates (or attaches to) the TUN device `name`; the returned file is non-blocking.
pub(crate) fn create(name: &str) -> io::Result<File> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name must have 1 to 15 bytes",
        ));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = IfReqFlags {
        name: [0; libc::IFNAMSIZ],
        // IFF_TUN | IFF_NO_PI = 0x1001 fits a c_short.
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    for (dst, src) in req.name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: `file` is an open /dev/net/tun descriptor for the duration of the call, and
    // TUNSETIFF reads and writes one `struct ifreq`: `req` is a properly aligned, initialised
    // repr(C) value of the kernel's size (16-byte NUL-terminated name, then the flags union,
    // 40 bytes in total) that outlives the call. The kernel writes back at most the name.
    let rc = unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &mut req as *mut IfReqFlags,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(file)
}

/// [`create`], registered with the current tokio runtime for readability.
pub(crate) fn create_async(name: &str) -> io::Result<AsyncFd<File>> {
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(io::Error::other("no tokio runtime"));
    }
    let file = create(name)?;
    // SAFETY: `file` owns a valid, open descriptor and is moved into the AsyncFd, which owns
    // it until it is dropped; nothing else closes or replaces it, and `File::as_raw_fd` always
    // returns that same descriptor. A runtime context exists (checked above).
    unsafe { AsyncFd::register_with_interest(file, Interest::READABLE) }.map_err(io::Error::from)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    #[test]
    fn ifreq_has_kernel_size() {
        assert_eq!(std::mem::size_of::<super::IfReqFlags>(), 40);
    }
}
