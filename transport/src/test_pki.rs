//! Certificates for this crate's tests: a CA, a hub's serving certificate and node certificates
//! from it, each valid from now for a day. One place, so the TLS, QUIC, control-stream and
//! direct-path tests do not each spell out CSR signing.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime};

use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::pki::{CertificateAuthority, NodeKey};

const VALIDITY: Duration = Duration::from_secs(86_400);

/// A certificate chain and its key.
pub(crate) struct Issued {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

pub(crate) fn ca(name: &str) -> CertificateAuthority {
    CertificateAuthority::generate(name, SystemTime::now(), VALIDITY).unwrap()
}

/// The hub's serving certificate (leaf and CA).
pub(crate) fn hub(ca: &CertificateAuthority) -> Issued {
    let (chain, key) = ca
        .issue_hub_certificate(&[], SystemTime::now(), VALIDITY)
        .unwrap();
    Issued { chain, key }
}

/// A node certificate for `name`, signed from a CSR as the hub signs an agent's.
pub(crate) fn node(ca: &CertificateAuthority, name: &str) -> Issued {
    let key = NodeKey::generate().unwrap();
    let cert = ca
        .sign_node_csr(
            &key.csr_der(name).unwrap(),
            name,
            SystemTime::now(),
            VALIDITY,
        )
        .unwrap();
    Issued {
        chain: vec![cert],
        key: key.private_key_der(),
    }
}
