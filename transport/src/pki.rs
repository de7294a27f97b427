//! Petrel's PKI primitives: a private CA made with rcgen, node certificates signed from a CSR the
//! device made itself (its private key never leaves it), hub serving certificates, and the
//! SHA-256 fingerprint an operator pastes into `join` to pin the CA before any trust exists.
//!
//! Identities: a hub certificate carries the SAN [`crate::HUB_SERVER_NAME`] and the serverAuth
//! EKU; a node certificate carries the node name (CN and DNS SAN) and only the clientAuth EKU, so
//! an enrolled device can never pose as a hub. What a CSR asks for is ignored except its key: the
//! name comes from the join token, which the hub bound to a node name.
//!
//! Time is passed in (`SystemTime`), so tests can sign in the past or the future.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

/// Allowance for clocks that run a little behind the hub's: certificates start this long before
/// they were signed.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);

/// Why a PKI operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the certificate signing request is malformed or its signature does not verify: {0}")]
    BadCsr(rcgen::Error),
    #[error("the certificate is malformed: {0}")]
    BadCertificate(String),
    #[error("the certificate has no node name (no DNS SAN and no CN)")]
    NoNodeName,
    #[error("the CA's private key does not match its certificate")]
    KeyMismatch,
    #[error("PEM input is invalid: {0}")]
    Pem(String),
}

/// Lowercase hex SHA-256 of a DER certificate: what `--ca-sha256` pins.
pub fn fingerprint_sha256(der: &[u8]) -> String {
    hex::encode(Sha256::digest(der))
}

/// Parses the fingerprint an operator typed: hex, optionally with `sha256:` prefix and colons.
pub fn normalize_fingerprint(input: &str) -> Option<String> {
    let s = input.trim();
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    let s: String = s
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    (s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit())).then_some(s)
}

/// A CA certificate plus its signing key.
pub struct CertificateAuthority {
    cert_der: CertificateDer<'static>,
    key: KeyPair,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("fingerprint", &self.fingerprint())
            .finish()
    }
}

impl CertificateAuthority {
    /// Makes a new self-signed CA (ECDSA P-256) valid from `now` for `validity`.
    pub fn generate(
        common_name: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Petrel");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_der: cert.der().clone(),
            key,
        })
    }

    /// Loads a CA from PEM (certificate, PKCS#8 key), checking that the key matches.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| PkiError::Pem(e.to_string()))?;
        let cert_der = pem_to_der(cert_pem, "CERTIFICATE")?;
        let (_, x509) = x509_parser::parse_x509_certificate(&cert_der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        if *x509.public_key().subject_public_key.data != *rcgen::PublicKeyData::der_bytes(&key) {
            return Err(PkiError::KeyMismatch);
        }
        Ok(Self {
            cert_der: CertificateDer::from(cert_der),
            key,
        })
    }

    pub fn cert_pem(&self) -> String {
        der_to_pem(&self.cert_der, "CERTIFICATE")
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn fingerprint(&self) -> String {
        fingerprint_sha256(&self.cert_der)
    }

    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, PkiError> {
        Ok(Issuer::from_ca_cert_der(&self.cert_der, &self.key)?)
    }

    /// Issues the hub's serving certificate: a fresh key, SAN [`crate::HUB_SERVER_NAME`] plus
    /// `extra_names`, serverAuth only. Returns the chain (leaf, CA) and the key; the CA travels in
    /// the chain so an enrolling agent can find the certificate its pinned fingerprint names.
    pub fn issue_hub_certificate(
        &self,
        extra_names: &[String],
        now: SystemTime,
        validity: Duration,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PkiError> {
        let key = KeyPair::generate()?;
        let mut names = vec![crate::HUB_SERVER_NAME.to_string()];
        names.extend(extra_names.iter().cloned());
        let mut params = CertificateParams::new(names)?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, crate::HUB_SERVER_NAME);
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer()?)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok((vec![cert.der().clone(), self.cert_der.clone()], key_der))
    }

    /// Signs a node certificate for `node_name` with the public key of `csr_der`. The CSR's
    /// signature must verify (proof the requester holds the key); everything else it asks for
    /// is ignored.
    pub fn sign_node_csr(
        &self,
        csr_der: &[u8],
        node_name: &str,
        now: SystemTime,
        validity: Duration,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(PkiError::BadCsr)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        dn.push(DnType::OrganizationName, "Petrel edge nodes");
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::DnsName(node_name.try_into()?)];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&csr.public_key, &self.issuer()?)?;
        Ok(cert.der().clone())
    }
}

/// A node's own key pair, made on the device.
pub struct NodeKey {
    key: KeyPair,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    pub fn generate() -> Result<Self, PkiError> {
        Ok(Self {
            key: KeyPair::generate()?,
        })
    }

    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        Ok(Self {
            key: KeyPair::from_pem(pem).map_err(|e| PkiError::Pem(e.to_string()))?,
        })
    }

    pub fn to_pem(&self) -> String {
        self.key.serialize_pem()
    }

    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    /// A CSR naming `node_name`, signed with this key.
    pub fn csr_der(&self, node_name: &str) -> Result<Vec<u8>, PkiError> {
        let mut params = CertificateParams::new(vec![node_name.to_string()])?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, node_name);
        params.distinguished_name = dn;
        Ok(params.serialize_request(&self.key)?.der().to_vec())
    }

    /// Whether `cert_der` certifies this key.
    pub fn matches(&self, cert_der: &[u8]) -> bool {
        x509_parser::parse_x509_certificate(cert_der)
            .map(|(_, c)| {
                *c.public_key().subject_public_key.data
                    == *rcgen::PublicKeyData::der_bytes(&self.key)
            })
            .unwrap_or(false)
    }
}

/// The names a client certificate carries, for authorisation by name (the egress listener's
/// allowlist). Only a verified certificate's names mean anything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CertNames {
    pub common_name: Option<String>,
    pub dns_names: Vec<String>,
    /// Subject O values (Kubernetes groups: a kubelet's certificate says `system:nodes`).
    pub organizations: Vec<String>,
}

impl CertNames {
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let dns_names = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let common_name = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let organizations = cert
            .subject()
            .iter_organization()
            .filter_map(|o| o.as_str().ok().map(str::to_string))
            .collect();
        Ok(Self {
            common_name,
            dns_names,
            organizations,
        })
    }

    /// How the certificate is named in logs: its CN, else its first DNS name.
    pub fn display(&self) -> String {
        self.common_name
            .clone()
            .or_else(|| self.dns_names.first().cloned())
            .unwrap_or_else(|| "(unnamed)".into())
    }
}

/// What a certificate signing request asks for, read only after its signature verified (proof
/// that the requester holds the key).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CsrRequest {
    pub common_name: Option<String>,
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    /// SANs other than DNS names (IP addresses, e-mail, URIs, ...).
    pub other_sans: usize,
}

impl CsrRequest {
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::extensions::{GeneralName, ParsedExtension};
        use x509_parser::prelude::FromDer;
        // rcgen checks the signature; x509-parser reads the names.
        CertificateSigningRequestParams::from_der(&der.to_vec().into())
            .map_err(PkiError::BadCsr)?;
        let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let subject = &csr.certification_request_info.subject;
        let mut out = Self {
            common_name: subject
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok())
                .map(str::to_string),
            organizations: subject
                .iter_organization()
                .filter_map(|o| o.as_str().ok().map(str::to_string))
                .collect(),
            ..Default::default()
        };
        for ext in csr.requested_extensions().into_iter().flatten() {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(d) => out.dns_names.push(d.to_string()),
                        _ => out.other_sans += 1,
                    }
                }
            }
        }
        Ok(out)
    }
}

/// What Petrel needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    /// The first DNS SAN, else the CN.
    pub node_name: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub fingerprint: String,
}

impl CertInfo {
    pub fn parse(der: &[u8]) -> Result<Self, PkiError> {
        use x509_parser::extensions::GeneralName;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| PkiError::BadCertificate(e.to_string()))?;
        let san_name = cert
            .subject_alternative_name()
            .ok()
            .flatten()
            .and_then(|san| {
                san.value.general_names.iter().find_map(|n| match n {
                    GeneralName::DNSName(d) => Some(d.to_string()),
                    _ => None,
                })
            });
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .map(str::to_string);
        let node_name = san_name.or(cn).ok_or(PkiError::NoNodeName)?;
        let to_sys = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(Self {
            node_name,
            not_before: to_sys(cert.validity().not_before),
            not_after: to_sys(cert.validity().not_after),
            is_ca: cert.is_ca(),
            fingerprint: fingerprint_sha256(der),
        })
    }

    /// When a certificate with this validity should be renewed: two thirds into its life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or_default();
        self.not_before + life * 2 / 3
    }
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // ring's SystemRandom cannot fail on Linux in practice; a zero serial would still be a valid
    // (if less unique) certificate, so we do not fail issuance over it.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    bytes[0] &= 0x7f; // positive INTEGER
    SerialNumber::from_slice(&bytes)
}

/// PEM-encodes DER with the given label.
pub fn der_to_pem(der: &[u8], label: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Extracts the first PEM block with `label`.
pub fn pem_to_der(pem: &str, label: &str) -> Result<Vec<u8>, PkiError> {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let start = pem
        .find(&begin)
        .ok_or_else(|| PkiError::Pem(format!("no {label} block")))?
        + begin.len();
    let stop = pem[start..]
        .find(&end)
        .ok_or_else(|| PkiError::Pem(format!("unterminated {label} block")))?
        + start;
    let body: String = pem[start..stop]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(body.as_bytes())
        .map_err(|_| PkiError::Pem(format!("{label} block is not valid base64")))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn ca_round_trips_through_pem_and_signs_csrs_for_the_token_name() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("petrel-ca", now, 3650 * DAY).unwrap();
        let ca2 = CertificateAuthority::from_pem(&ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.fingerprint(), ca2.fingerprint());
        let node = NodeKey::generate().unwrap();
        // The CSR asks for "evil"; the certificate names what the hub decided.
        let csr = node.csr_der("evil").unwrap();
        let cert = ca2.sign_node_csr(&csr, "edge-a1", now, DAY).unwrap();
        let info = CertInfo::parse(&cert).unwrap();
        assert_eq!(info.node_name, "edge-a1");
        assert!(!info.is_ca);
        assert!(node.matches(&cert));
        assert!(!NodeKey::generate().unwrap().matches(&cert));
        assert!(info.renew_at() > now && info.renew_at() < now + DAY);
    }

    #[test]
    fn mismatched_key_and_garbage_csr_are_refused() {
        let now = SystemTime::now();
        let a = CertificateAuthority::generate("a", now, DAY).unwrap();
        let b = CertificateAuthority::generate("b", now, DAY).unwrap();
        assert!(matches!(
            CertificateAuthority::from_pem(&a.cert_pem(), &b.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
        assert!(matches!(
            a.sign_node_csr(b"not a csr", "n", now, DAY),
            Err(PkiError::BadCsr(_))
        ));
        let mut csr = NodeKey::generate().unwrap().csr_der("n").unwrap();
        let last = csr.len() - 1;
        csr[last] ^= 0xff; // break the signature
        assert!(a.sign_node_csr(&csr, "n", now, DAY).is_err());
    }

    #[test]
    fn fingerprints_normalize() {
        let fp = "AB".repeat(32);
        assert_eq!(normalize_fingerprint(&fp), Some("ab".repeat(32)));
        let colons = fp
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{colons}")),
            Some("ab".repeat(32))
        );
        assert_eq!(normalize_fingerprint("abc"), None);
        assert_eq!(normalize_fingerprint(&"zz".repeat(32)), None);
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..70 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = der_to_pem(&data, "X");
            assert_eq!(pem_to_der(&pem, "X").unwrap(), data);
        }
    }
}
