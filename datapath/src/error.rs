//! Typed errors: every variant names the object involved and carries the kernel's answer.

use std::io;
use std::path::PathBuf;

/// What went wrong while programming or reading the kernel.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The configuration or the desired state is not usable.
    #[error("invalid datapath configuration: {0}")]
    Config(String),
    /// Flannel's VXLAN device is missing.
    #[error(
        "{dev} not found in this network namespace (is flanneld running with the VXLAN backend?)"
    )]
    FlannelMissing { dev: String },
    /// Flannel's device exists but is not usable as a VXLAN template.
    #[error("{dev} is not usable: {why}")]
    FlannelUnusable { dev: String, why: String },
    /// A netlink request failed.
    #[error("netlink {op} {object}: {source}")]
    Netlink {
        op: &'static str,
        object: String,
        #[source]
        source: io::Error,
    },
    /// The fast hook with a local relay needs `IFLA_VXLAN_LOCALBYPASS` (Linux >= 6.6).
    #[error(
        "{dev}: the fast hook with a local relay needs IFLA_VXLAN_LOCALBYPASS (Linux >= 6.6), \
         which this kernel does not support; use hook = portable (or auto)"
    )]
    LocalBypassUnsupported { dev: String },
    /// A sysctl could not be read or written.
    #[error("sysctl {path}: {source}")]
    Sysctl {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The state file (saved sysctl values) could not be read or written.
    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The TUN device could not be created or configured.
    #[error("TUN device {dev}: {source}")]
    Tun {
        dev: String,
        #[source]
        source: io::Error,
    },
    /// A socket (UDP, netlink) could not be created or bound.
    #[error("socket {what}: {source}")]
    Socket {
        what: String,
        #[source]
        source: io::Error,
    },
    /// Something async was called outside a tokio runtime.
    #[error("{what} needs a tokio runtime (call it from within one)")]
    NoRuntime { what: &'static str },
}

impl DatapathError {
    pub(crate) fn netlink(op: &'static str, object: impl Into<String>, source: io::Error) -> Self {
        DatapathError::Netlink {
            op,
            object: object.into(),
            source,
        }
    }

    /// The OS error number of the underlying failure, if any (e.g. `EEXIST`, `EPERM`).
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            DatapathError::Netlink { source, .. }
            | DatapathError::Sysctl { source, .. }
            | DatapathError::State { source, .. }
            | DatapathError::Tun { source, .. }
            | DatapathError::Socket { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}
