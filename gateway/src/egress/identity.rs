//! Who may use the mutual-TLS CONNECT listener. Chaining to the client CA is not enough: the CA
//! operators point it at is usually the cluster CA, which also signs every kubelet's client
//! certificate, and a kubelet must not be able to reach other sites' kubelets or cloud pods
//! through the hub. A client is admitted by name (an allowlist of CNs / DNS names, by default
//! what a kube-apiserver presents for egress); kubelet identities and Petrel's own node
//! certificates are refused whatever the list says.

use std::sync::Arc;

use petrel_transport::pki::CertNames;
use rustls::server::danger::ClientCertVerifier;
use rustls_pki_types::{CertificateDer, UnixTime};

/// Why a verified client certificate may still not use the listener.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityRefusal {
    #[error("{0} is a kubelet's identity; kubelets may not use the egress proxy")]
    Kubelet(String),
    #[error("{0} is a Petrel node certificate; agents may not use the egress proxy")]
    PetrelNode(String),
    #[error("{0} is not an allowed egress client (egress-client-names)")]
    NotAllowed(String),
    #[error("the client certificate cannot be read: {0}")]
    Unreadable(String),
}

impl IdentityRefusal {
    pub fn outcome(&self) -> &'static str {
        match self {
            IdentityRefusal::Kubelet(_) => "client_kubelet",
            IdentityRefusal::PetrelNode(_) => "client_petrel_node",
            IdentityRefusal::NotAllowed(_) | IdentityRefusal::Unreadable(_) => "client_not_allowed",
        }
    }
}

/// Decides by name: the identity to log, or why not. Pure.
pub fn authorize(names: &CertNames, allowed: &[String]) -> Result<String, IdentityRefusal> {
    let shown = names.display();
    let kubelet_name = |n: &String| n.starts_with("system:node:");
    if names.organizations.iter().any(|o| o == "system:nodes")
        || names.common_name.iter().any(kubelet_name)
        || names.dns_names.iter().any(kubelet_name)
    {
        return Err(IdentityRefusal::Kubelet(shown));
    }
    let listed = |n: &String| allowed.iter().any(|a| a == n);
    if names.common_name.iter().any(listed) || names.dns_names.iter().any(listed) {
        Ok(shown)
    } else {
        Err(IdentityRefusal::NotAllowed(shown))
    }
}

/// Recognises certificates issued by Petrel's own CA (node certificates).
pub struct PetrelIssued {
    verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for PetrelIssued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PetrelIssued")
    }
}

impl PetrelIssued {
    pub fn new(
        petrel_ca: &CertificateDer<'static>,
    ) -> Result<Self, petrel_transport::tls::TlsConfigError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(petrel_ca.clone())?;
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            petrel_transport::tls::crypto_provider(),
        )
        .build()?;
        Ok(Self { verifier })
    }

    /// Whether `chain` (leaf first) verifies against Petrel's CA.
    pub fn issued(&self, chain: &[CertificateDer<'static>]) -> bool {
        let Some((leaf, rest)) = chain.split_first() else {
            return false;
        };
        self.verifier
            .verify_client_cert(leaf, rest, UnixTime::now())
            .is_ok()
    }
}

/// The whole check for an authenticated TLS client: its chain as the handshake verified it.
pub fn check_client(
    chain: &[CertificateDer<'static>],
    allowed: &[String],
    petrel: Option<&PetrelIssued>,
) -> Result<String, IdentityRefusal> {
    let leaf = chain
        .first()
        .ok_or_else(|| IdentityRefusal::Unreadable("no certificate".into()))?;
    let names = CertNames::parse(leaf).map_err(|e| IdentityRefusal::Unreadable(e.to_string()))?;
    if petrel.is_some_and(|p| p.issued(chain)) {
        return Err(IdentityRefusal::PetrelNode(names.display()));
    }
    authorize(&names, allowed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn names(cn: Option<&str>, dns: &[&str], orgs: &[&str]) -> CertNames {
        CertNames {
            common_name: cn.map(String::from),
            dns_names: dns.iter().map(|s| s.to_string()).collect(),
            organizations: orgs.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn allowed() -> Vec<String> {
        vec!["kube-apiserver".into(), "kube-apiserver-egress".into()]
    }

    #[test]
    fn allowlisted_cn_or_dns_name_is_admitted() {
        assert_eq!(
            authorize(&names(Some("kube-apiserver-egress"), &[], &[]), &allowed()),
            Ok("kube-apiserver-egress".into())
        );
        assert_eq!(
            authorize(&names(Some("proxy"), &["kube-apiserver"], &[]), &allowed()),
            Ok("proxy".into())
        );
    }

    #[test]
    fn kubelets_are_refused_even_if_listed() {
        let kubelet = names(Some("system:node:edge-a1"), &[], &["system:nodes"]);
        let mut list = allowed();
        list.push("system:node:edge-a1".into());
        assert_eq!(
            authorize(&kubelet, &list),
            Err(IdentityRefusal::Kubelet("system:node:edge-a1".into()))
        );
        // The group alone is enough.
        assert!(matches!(
            authorize(
                &names(Some("kube-apiserver"), &[], &["system:nodes"]),
                &list
            ),
            Err(IdentityRefusal::Kubelet(_))
        ));
    }

    #[test]
    fn other_names_are_refused() {
        assert_eq!(
            authorize(
                &names(Some("admin"), &["admin.local"], &["system:masters"]),
                &allowed()
            ),
            Err(IdentityRefusal::NotAllowed("admin".into()))
        );
        assert!(authorize(&names(None, &[], &[]), &allowed()).is_err());
    }

    #[test]
    fn petrel_node_certificates_are_recognised() {
        use petrel_transport::pki::{CertificateAuthority, NodeKey};
        let now = std::time::SystemTime::now();
        let ca = CertificateAuthority::generate(
            "petrel test",
            now,
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
        let other =
            CertificateAuthority::generate("other", now, std::time::Duration::from_secs(3600))
                .unwrap();
        let key = NodeKey::generate().unwrap();
        let csr = key.csr_der("kube-apiserver").unwrap();
        let cert = ca
            .sign_node_csr(
                &csr,
                "kube-apiserver",
                now,
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        let chain = vec![cert.clone()];
        let petrel = PetrelIssued::new(ca.cert_der()).unwrap();
        // Named like an allowed client, but a Petrel node certificate: refused.
        assert!(matches!(
            check_client(&chain, &["kube-apiserver".to_string()], Some(&petrel)),
            Err(IdentityRefusal::PetrelNode(_))
        ));
        let stranger = PetrelIssued::new(other.cert_der()).unwrap();
        assert!(!stranger.issued(&chain));
    }
}
