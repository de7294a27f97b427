//! rustls server configuration (ring provider only) and client-certificate inspection.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

use crate::config::{PemSource, TlsSettings};
use crate::Error;

fn read(src: &PemSource) -> Result<(String, Vec<u8>), Error> {
    match src {
        PemSource::File(path) => std::fs::read(path)
            .map(|b| (path.display().to_string(), b))
            .map_err(|source| Error::Read {
                path: path.display().to_string(),
                source,
            }),
        PemSource::Inline(text) => Ok(("inline PEM".to_string(), text.as_bytes().to_vec())),
    }
}

/// Parses every certificate in `src`.
pub fn load_certs(src: &PemSource) -> Result<Vec<CertificateDer<'static>>, Error> {
    let (what, bytes) = read(src)?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Error::Pem {
            what: what.clone(),
            detail: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(Error::NoCertificate(what));
    }
    Ok(certs)
}

/// Parses the first private key in `src`.
pub fn load_key(src: &PemSource) -> Result<PrivateKeyDer<'static>, Error> {
    let (what, bytes) = read(src)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| Error::Pem {
        what,
        detail: e.to_string(),
    })
}

/// The HTTPS server configuration: HTTP/1.1 only, client certificates required when a client
/// CA is configured.
pub fn server_config(tls: &TlsSettings) -> Result<Arc<rustls::ServerConfig>, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = load_certs(&tls.cert)?;
    let key = load_key(&tls.key)?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let builder = match &tls.client_ca {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in load_certs(ca)? {
                roots.add(cert)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| Error::ClientCa(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The subject common name of the first certificate the peer presented.
pub fn peer_common_name(conn: &rustls::ServerConnection) -> Option<String> {
    let cert = conn.peer_certificates()?.first()?;
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
