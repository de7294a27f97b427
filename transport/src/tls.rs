//! rustls configuration for both ends of the tunnel, all on one crypto provider (ring).
//!
//! The hub listens on one UDP port for two ALPNs: `petrel/1` (the tunnel; a client certificate
//! from Petrel's CA is mandatory, enforced after the handshake because rustls decides whether to
//! ask for one before it knows the ALPN) and `petrel-enrol/1` (enrolment; no client certificate,
//! the agent instead pins the CA by fingerprint). Any client certificate that is presented is
//! verified against the CA during the handshake, so a foreign or expired certificate fails the
//! handshake with a TLS alert both sides can log.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::pki::{fingerprint_sha256, CertInfo};

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("TLS configuration rejected: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("QUIC cannot use this TLS configuration: {0}")]
    Quic(String),
}

/// The TLS alert that ended a QUIC handshake, if one did: ours (our rustls refused the peer's
/// certificate or handshake) or the peer's (its rustls refused ours). QUIC carries a TLS alert as
/// the transport error code `0x100 + alert` (RFC 9001, section 4.8), so failures are told apart on
/// rustls's [`rustls::AlertDescription`] variants (`BadCertificate`, `UnknownCA`,
/// `CertificateExpired`, ...), never on display text.
pub fn tls_alert(e: &quinn::ConnectionError) -> Option<rustls::AlertDescription> {
    let code = match e {
        quinn::ConnectionError::TransportError(t) => t.code,
        quinn::ConnectionError::ConnectionClosed(c) => c.error_code,
        _ => return None,
    };
    alert_of_code(u64::from(code))
}

/// The TLS alert a QUIC transport error code carries (`0x100..=0x1ff`).
fn alert_of_code(code: u64) -> Option<rustls::AlertDescription> {
    let alert = code.checked_sub(0x100).filter(|a| *a <= 0xff)?;
    u8::try_from(alert).ok().map(rustls::AlertDescription::from)
}

/// The workspace's one crypto provider, with AES-128-GCM/SHA-256 as the first TLS 1.3 suite
/// (ring's default puts AES-256-GCM/SHA-384 first). Both ends are Petrel, so this decides what
/// every tunnel uses: SHA-256 has hardware support on current x86 and ARM CPUs where ring's
/// SHA-384 does not (it was 3% of the hub's CPU in a reconnect storm, in key derivation
/// alone), AES-128 takes 10 rounds to AES-256's 14 for every datagram, and the key exchange
/// (X25519) is what bounds the tunnel's strength, not the 128-bit key. Every other suite of
/// the default stays acceptable, in its order (the egress listener also speaks TLS 1.2).
pub fn crypto_provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider
        .cipher_suites
        .sort_by_key(|s| s.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    Arc::new(provider)
}

/// Installs ring as the process default, for libraries (kube, hyper clients) that ask for the
/// default rather than taking a provider. Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A root store holding only Petrel's CA.
pub(crate) fn roots(
    ca_der: &CertificateDer<'static>,
) -> Result<Arc<RootCertStore>, TlsConfigError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    Ok(Arc::new(roots))
}

/// The hub's rustls server configuration (TLS 1.3 only, as QUIC requires).
pub fn hub_server_tls(
    ca_der: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpns: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = alpns.iter().map(|a| a.to_vec()).collect();
    cfg.max_early_data_size = 0;
    no_resumption_server(&mut cfg);
    Ok(cfg)
}

/// Every handshake is a full one: a server that issues no session tickets and keeps no session
/// cache. A resumed TLS 1.3 session skips certificate verification, so a node certificate that
/// has expired since the first handshake would still get a tunnel. What resumption would save
/// (one signature each way) matters least where agents reconnect most, after a hub restart,
/// whose cache is gone anyway; while tickets cost every handshake two encrypted messages and a
/// write to a locked cache, which a fleet reconnecting at once pays 10,000 times over.
pub(crate) fn no_resumption_server(cfg: &mut rustls::ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.send_tls13_tickets = 0;
}

/// The client side of [`no_resumption_server`]: no ticket is stored or offered.
pub(crate) fn no_resumption_client(cfg: &mut rustls::ClientConfig) {
    cfg.resumption = rustls::client::Resumption::disabled();
}

/// The agent's tunnel configuration: trusts only the CA, presents its node certificate.
pub fn agent_client_tls(
    ca_der: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let mut cfg = rustls::ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca_der)?)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![alpn.to_vec()];
    no_resumption_client(&mut cfg);
    Ok(cfg)
}

/// The enrolment configuration: no client certificate; the server chain must contain a CA whose
/// SHA-256 is `ca_sha256`, and the leaf must verify against that CA.
pub fn enrol_client_tls(
    ca_sha256: &str,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier = Arc::new(PinnedCaVerifier {
        fingerprint: ca_sha256.to_ascii_lowercase(),
        provider: provider.clone(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    no_resumption_client(&mut cfg);
    Ok(cfg)
}

/// Verifies a server chain against the CA the operator pinned by fingerprint: the only trust an
/// enrolling device has before it holds the CA certificate.
#[derive(Debug)]
struct PinnedCaVerifier {
    fingerprint: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(ca) = intermediates
            .iter()
            .find(|c| fingerprint_sha256(c) == self.fingerprint)
        else {
            let seen: Vec<String> = intermediates
                .iter()
                .map(|c| fingerprint_sha256(c))
                .collect();
            return Err(rustls::Error::General(format!(
                "CA fingerprint mismatch: the hub presented CA sha256 {}, but --ca-sha256 pins {}",
                if seen.is_empty() {
                    "(none)".to_string()
                } else {
                    seen.join(", ")
                },
                self.fingerprint
            )));
        };
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone().into_owned())?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(format!("pinned CA is unusable: {e}")))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The verified certificate chain a QUIC peer presented, if any.
pub fn peer_certificates(conn: &quinn::Connection) -> Option<Vec<CertificateDer<'static>>> {
    conn.peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()
        .map(|b| *b)
}

/// The node name in the verified leaf certificate of a QUIC peer, if it presented one.
pub fn peer_node_name(conn: &quinn::Connection) -> Option<String> {
    let certs = peer_certificates(conn)?;
    CertInfo::parse(certs.first()?).ok().map(|i| i.node_name)
}

/// The ALPN a QUIC connection negotiated.
pub fn negotiated_alpn(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()?
        .protocol
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use rustls::AlertDescription;

    #[test]
    fn alerts_are_read_from_the_crypto_error_range() {
        let code = |alert: u8| u64::from(quinn_proto::TransportErrorCode::crypto(alert));
        assert_eq!(
            alert_of_code(code(42)),
            Some(AlertDescription::BadCertificate)
        );
        assert_eq!(alert_of_code(code(48)), Some(AlertDescription::UnknownCA));
        assert_eq!(
            alert_of_code(code(45)),
            Some(AlertDescription::CertificateExpired)
        );
        assert_eq!(alert_of_code(code(255)), Some(AlertDescription::from(255)));
        // Not a crypto error: a protocol violation, an application's code.
        assert_eq!(
            alert_of_code(u64::from(
                quinn_proto::TransportErrorCode::PROTOCOL_VIOLATION
            )),
            None
        );
        assert_eq!(alert_of_code(0x200), None);
        assert_eq!(tls_alert(&quinn::ConnectionError::TimedOut), None);
    }

    /// Runs one TLS 1.3 handshake in memory (no QUIC: the resumption decision is rustls's) and
    /// returns how the client saw it.
    fn handshake(
        client: &Arc<rustls::ClientConfig>,
        server: &Arc<rustls::ServerConfig>,
    ) -> rustls::HandshakeKind {
        let name = ServerName::try_from(crate::HUB_SERVER_NAME).unwrap();
        let mut c = rustls::ClientConnection::new(client.clone(), name).unwrap();
        let mut s = rustls::ServerConnection::new(server.clone()).unwrap();
        // Pump both ways until neither has anything left to say; the server's tickets (if any)
        // travel after the handshake, so a few rounds past it.
        for _ in 0..8 {
            let mut buf = Vec::new();
            while c.wants_write() {
                c.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                s.read_tls(&mut rd).unwrap();
            }
            s.process_new_packets().unwrap();
            let mut buf = Vec::new();
            while s.wants_write() {
                s.write_tls(&mut buf).unwrap();
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                c.read_tls(&mut rd).unwrap();
            }
            c.process_new_packets().unwrap();
        }
        assert!(!c.is_handshaking() && !s.is_handshaking());
        assert_eq!(
            c.negotiated_cipher_suite().map(|s| s.suite()),
            Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
        );
        c.handshake_kind().unwrap()
    }

    #[test]
    fn every_tunnel_handshake_is_a_full_one() {
        use crate::test_pki;
        use rustls::HandshakeKind::{Full, Resumed};
        let ca = test_pki::ca("resume-ca");
        let (hub_cert, node) = (test_pki::hub(&ca), test_pki::node(&ca, "edge-a1"));
        let hub =
            hub_server_tls(ca.cert_der(), hub_cert.chain, hub_cert.key, &[b"petrel/1"]).unwrap();
        let agent = agent_client_tls(ca.cert_der(), node.chain, node.key, b"petrel/1").unwrap();
        // The same two configurations with rustls's defaults for resumption: such a pair
        // resumes its second handshake, and then the server does not verify the client
        // certificate again.
        let mut resuming_client = agent.clone();
        resuming_client.resumption = rustls::client::Resumption::default();
        let mut ticketing_server = hub.clone();
        ticketing_server.session_storage = rustls::server::ServerSessionMemoryCache::new(256);
        ticketing_server.send_tls13_tickets = 2;
        let (hub, agent) = (Arc::new(hub), Arc::new(agent));
        let (resuming_client, ticketing_server) =
            (Arc::new(resuming_client), Arc::new(ticketing_server));
        let twice = |c: &Arc<rustls::ClientConfig>, s: &Arc<rustls::ServerConfig>| {
            [handshake(c, s), handshake(c, s)]
        };
        // The defaults together do resume: the test can tell.
        assert_eq!(twice(&resuming_client, &ticketing_server), [Full, Resumed]);
        // The hub offers no resumption to a client that would take it, and the agent asks for
        // none from a server that would grant it.
        assert_eq!(twice(&resuming_client, &hub), [Full, Full]);
        assert_eq!(twice(&agent, &ticketing_server), [Full, Full]);
    }
}
