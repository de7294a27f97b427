//! TLS between two agents, for direct site-to-site paths (issue 15): both present their node
//! certificates from Petrel's CA, and each checks that the other is the node it expects.
//!
//! Node certificates are client certificates (extended key usage `clientAuth` only; they can
//! never pass as a hub, whose certificate is `serverAuth`), so the dialing agent cannot use the
//! ordinary server verification on the listening agent's certificate: [`ExpectedPeer`] verifies
//! it as rustls verifies a client certificate (chain to the CA, validity, `clientAuth`) and then
//! requires its node name to be the peer the hub offered. The listening side demands a client
//! certificate from the same CA and checks the dialer's name after the handshake
//! ([`crate::tls::peer_node_name`]) against the peers it was offered. A certificate for another
//! node, a hub's certificate or one from another CA fails the handshake.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::ClientCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::pki::CertInfo;
use crate::tls::{
    crypto_provider, no_resumption_client, no_resumption_server, roots, TlsConfigError,
};

/// ALPN of a direct connection between two agents.
pub const ALPN_PEER: &[u8] = b"petrel-peer/1";

/// The server name a dialing agent puts in its ClientHello (the listener's certificate is
/// checked by [`ExpectedPeer`], not by this name).
pub const PEER_SERVER_NAME: &str = "petrel-peer";

/// How often an idle direct connection sends a PING: each end watches that the other answers,
/// and falls back to the hub within a few of these when it does not (the break gap).
pub const PEER_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_millis(200);

/// Transport settings of a direct connection: datagrams only (no streams either way: proxied
/// streams always come from the hub), a small stream window, keepalives often enough to notice
/// a dead path in well under a second.
pub fn peer_tuning(congestion: crate::quic::CongestionControl) -> crate::quic::TransportTuning {
    crate::quic::TransportTuning {
        keep_alive: PEER_KEEP_ALIVE,
        idle_timeout: std::time::Duration::from_secs(5),
        stream_receive_window: 16 << 10,
        connection_receive_window: 16 << 10,
        max_concurrent_bidi_streams: 0,
        max_concurrent_uni_streams: 0,
        congestion,
        ..crate::quic::TransportTuning::default()
    }
}

/// The listening agent's configuration: its node certificate, and a client certificate from
/// the CA required of whoever dials.
pub fn peer_listener_tls(
    ca_der: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<rustls::ServerConfig, TlsConfigError> {
    let provider = crypto_provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone()).build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_PEER.to_vec()];
    cfg.max_early_data_size = 0;
    no_resumption_server(&mut cfg);
    Ok(cfg)
}

/// The dialing agent's configuration: its node certificate, and the listener must present a
/// node certificate from the CA naming `expected`.
pub fn peer_dialer_tls(
    ca_der: &CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    expected: &str,
) -> Result<rustls::ClientConfig, TlsConfigError> {
    let provider = crypto_provider();
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone()).build()?;
    let verifier = Arc::new(ExpectedPeer {
        inner,
        expected: expected.to_string(),
    });
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![ALPN_PEER.to_vec()];
    no_resumption_client(&mut cfg);
    Ok(cfg)
}

/// Verifies the listening agent's node certificate (see the module docs). Handshake
/// signatures are checked by the inner client-certificate verifier, on the same provider.
#[derive(Debug)]
pub struct ExpectedPeer {
    inner: Arc<dyn ClientCertVerifier>,
    expected: String,
}

impl ServerCertVerifier for ExpectedPeer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        let name = CertInfo::parse(end_entity)
            .map_err(|e| rustls::Error::General(format!("peer certificate: {e}")))?
            .node_name;
        if name != self.expected {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName,
            ));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::pki::CertificateAuthority;
    use crate::quic::TransportTuning;
    use crate::test_pki::{ca, node, Issued as Node};
    use std::time::Duration;

    /// `dialer` dials `listener` (a QUIC endpoint on loopback) expecting `expected`; returns
    /// the name the listener saw, or the handshake's error.
    async fn dial(
        listener_ca: &CertificateAuthority,
        listener: Node,
        dialer_ca: &CertificateAuthority,
        dialer: Node,
        expected: &str,
    ) -> Result<String, String> {
        let tuning = TransportTuning::default();
        let server = crate::quic::server_config(
            peer_listener_tls(listener_ca.cert_der(), listener.chain, listener.key).unwrap(),
            &tuning,
        )
        .unwrap();
        let ep_l = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = ep_l.local_addr().unwrap();
        let accepted = tokio::spawn(async move {
            let conn = ep_l.accept().await?.await.ok()?;
            crate::tls::peer_node_name(&conn)
        });
        let client = crate::quic::client_config(
            peer_dialer_tls(dialer_ca.cert_der(), dialer.chain, dialer.key, expected).unwrap(),
            &tuning,
        )
        .unwrap();
        let ep_d = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            ep_d.connect_with(client, addr, "peer").unwrap(),
        )
        .await
        .map_err(|_| "timeout".to_string())?;
        match r {
            Ok(_conn) => Ok(tokio::time::timeout(Duration::from_secs(5), accepted)
                .await
                .map_err(|_| "listener timeout".to_string())?
                .unwrap()
                .unwrap_or_default()),
            Err(e) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn agents_authenticate_each_other_by_node_name() {
        crate::tls::install_default_provider();
        let ca1 = ca("petrel test ca");
        // The expected peer, and each side sees the other's node name.
        let seen = dial(
            &ca1,
            node(&ca1, "edge-a1"),
            &ca1,
            node(&ca1, "edge-b1"),
            "edge-a1",
        )
        .await
        .unwrap();
        assert_eq!(seen, "edge-b1");
        // The listener holds a certificate for another node than the hub offered: refused.
        let e = dial(
            &ca1,
            node(&ca1, "edge-a2"),
            &ca1,
            node(&ca1, "edge-b1"),
            "edge-a1",
        )
        .await
        .unwrap_err();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        // A certificate from another CA, on either side: refused.
        let ca2 = ca("another ca");
        assert!(dial(
            &ca2,
            node(&ca2, "edge-a1"),
            &ca1,
            node(&ca1, "edge-b1"),
            "edge-a1"
        )
        .await
        .is_err());
        assert!(dial(
            &ca1,
            node(&ca1, "edge-a1"),
            &ca2,
            node(&ca2, "edge-b1"),
            "edge-a1"
        )
        .await
        .is_err());
    }

    #[tokio::test]
    async fn a_hub_certificate_cannot_pass_as_a_peer() {
        crate::tls::install_default_provider();
        let ca1 = ca("petrel test ca");
        let hub = crate::test_pki::hub(&ca1);
        // Whatever name the dialer expects, a serverAuth-only hub certificate is no node's.
        let e = dial(
            &ca1,
            hub,
            &ca1,
            node(&ca1, "edge-b1"),
            crate::HUB_SERVER_NAME,
        )
        .await
        .unwrap_err();
        assert!(!e.is_empty());
    }
}
