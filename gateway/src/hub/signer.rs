//! Signs node certificates: the hub's CA and the lifetime of what it issues to agents. Enrolment,
//! in-tunnel renewal and (Kubernetes mode) CertificateSigningRequests all sign through it, so
//! they issue the same certificates; none of them needs anything else of the hub to do so.

use std::time::{Duration, SystemTime};

use petrel_proto::CertBundle;
use petrel_transport::pki::{CertificateAuthority, PkiError};
use rustls_pki_types::CertificateDer;

#[derive(Debug)]
pub struct NodeSigner {
    ca: CertificateAuthority,
    ttl: Duration,
}

impl NodeSigner {
    /// Signs with `ca` for `ttl` (the agent certificate lifetime).
    pub fn new(ca: CertificateAuthority, ttl: Duration) -> Self {
        Self { ca, ttl }
    }

    /// A certificate for `node` from its CSR, valid from `now` for the configured lifetime.
    pub fn sign(
        &self,
        csr_der: &[u8],
        node: &str,
        now: SystemTime,
    ) -> Result<CertificateDer<'static>, PkiError> {
        self.ca.sign_node_csr(csr_der, node, now, self.ttl)
    }

    /// [`Self::sign`] with the CA, as enrolment and renewal answer.
    pub fn bundle(
        &self,
        csr_der: &[u8],
        node: &str,
        now: SystemTime,
    ) -> Result<CertBundle, PkiError> {
        Ok(CertBundle {
            cert_der: self.sign(csr_der, node, now)?.to_vec(),
            ca_der: self.ca.cert_der().to_vec(),
        })
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        self.ca.cert_der()
    }

    /// The CA's SHA-256 fingerprint (what agents pin).
    pub fn fingerprint(&self) -> String {
        self.ca.fingerprint()
    }

    /// How long the certificates it signs are valid.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}
