//! Zero-touch enrolment: the agent on a Kubernetes edge node gets its certificate through the
//! API server instead of a join token.
//!
//! It makes its key here (the key never leaves the node), creates a `certificates.k8s.io/v1`
//! CertificateSigningRequest for its node name with signer `petrel.io/edge-tunnel` using the
//! node's own kubelet credentials (so the API server records the requester as
//! `system:node:<name>`, which only this node can be), and waits for the active hub to approve
//! and sign it, or to deny it with a reason, which it reports. `status.certificate` holds the
//! node certificate followed by Petrel's CA; the CA is trusted because it came from the API
//! server the kubelet's kubeconfig authenticates, and only Petrel's hubs may sign for the
//! signer. The kubelet's kubeconfig names the API server address the kubelet itself uses, so
//! this works from behind NAT wherever the kubelet does.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::PostParams;
use petrel_transport::pki::{der_to_pem, pem_to_der, CertInfo, NodeKey};
use tracing::{info, warn};

use crate::config::KubeEnrolConfig;
use crate::identity::AgentState;

/// Petrel's signer name (the hub's `k8s::csr::SIGNER_NAME`).
pub const SIGNER_NAME: &str = "petrel.io/edge-tunnel";
/// How often the CSR is read while waiting.
const POLL: Duration = Duration::from_secs(1);
/// How often the wait is logged.
const LOG_EVERY: Duration = Duration::from_secs(30);
/// Bound of one API call.
const CALL: Duration = Duration::from_secs(10);
/// Largest `status.certificate` read (two certificates are ~2 KiB).
const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum KubeEnrolError {
    #[error("kubelet kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("the API server refused the CertificateSigningRequest: {0}")]
    Create(String),
    #[error("the hub denied CertificateSigningRequest {name} ({reason}): {message}")]
    Denied {
        name: String,
        reason: String,
        message: String,
    },
    #[error("CertificateSigningRequest {name} failed ({reason}): {message}")]
    Failed {
        name: String,
        reason: String,
        message: String,
    },
    #[error("CertificateSigningRequest {0} was deleted before it was signed")]
    Gone(String),
    #[error("CertificateSigningRequest {name} was not signed within {timeout:?}: is a Petrel hub active (petrel-gateway run in Kubernetes mode, with the signer's RBAC from deploy/rbac.yaml)?")]
    Timeout { name: String, timeout: Duration },
    #[error("the signed certificate is unusable: {0}")]
    BadAnswer(String),
    #[error("this device is enrolled as node {0:?}, not as this node; remove its state directory to enrol it again")]
    OtherNode(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Pki(#[from] petrel_transport::pki::PkiError),
}

/// Whether the state directory needs a (new) certificate for `node`: none, or an expired one.
/// A certificate for another node is an error, never silently replaced.
pub fn needs_enrolment(
    state: &AgentState,
    node: &str,
    now: SystemTime,
) -> Result<bool, KubeEnrolError> {
    if !state.is_enrolled() {
        return Ok(true);
    }
    let id = state.load()?;
    if id.node_name() != node {
        return Err(KubeEnrolError::OtherNode(id.node_name().to_string()));
    }
    Ok(id.is_expired(now))
}

/// A client from the kubelet's kubeconfig (its server address, CA and client certificate).
async fn client(path: &Path) -> Result<kube::Client, KubeEnrolError> {
    let err = |message: String| KubeEnrolError::Kubeconfig {
        path: path.display().to_string(),
        message,
    };
    let kc = kube::config::Kubeconfig::read_from(path).map_err(|e| err(e.to_string()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
            .await
            .map_err(|e| err(e.to_string()))?;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(CALL);
    kube::Client::try_from(config).map_err(|e| err(e.to_string()))
}

/// Every PEM certificate in `pem`, in order.
fn certificates(pem: &str) -> Result<Vec<Vec<u8>>, KubeEnrolError> {
    const BEGIN: &str = "-----BEGIN CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find(BEGIN) {
        let block = &rest[start..];
        let end = block
            .find("-----END CERTIFICATE-----")
            .ok_or_else(|| KubeEnrolError::BadAnswer("unterminated PEM block".into()))?
            + "-----END CERTIFICATE-----".len();
        out.push(pem_to_der(&block[..end], "CERTIFICATE")?);
        rest = &block[end..];
    }
    Ok(out)
}

/// What the hub put in `status.certificate`, checked against our key and name: (leaf, CA).
pub fn check_issued(
    key: &NodeKey,
    node: &str,
    certificate: &[u8],
) -> Result<(Vec<u8>, Vec<u8>), KubeEnrolError> {
    if certificate.len() > MAX_CERTIFICATE_BYTES {
        return Err(KubeEnrolError::BadAnswer(format!(
            "{} bytes of certificates, more than {MAX_CERTIFICATE_BYTES}",
            certificate.len()
        )));
    }
    let pem = std::str::from_utf8(certificate)
        .map_err(|_| KubeEnrolError::BadAnswer("status.certificate is not PEM".into()))?;
    let mut chain = certificates(pem)?;
    if chain.len() < 2 {
        return Err(KubeEnrolError::BadAnswer(
            "status.certificate must hold the node certificate and Petrel's CA".into(),
        ));
    }
    let ca = chain.pop().unwrap_or_default();
    let leaf = chain.swap_remove(0);
    if !key.matches(&leaf) {
        return Err(KubeEnrolError::BadAnswer(
            "the certificate is not for this node's key".into(),
        ));
    }
    let info = CertInfo::parse(&leaf)?;
    if info.node_name != node {
        return Err(KubeEnrolError::BadAnswer(format!(
            "the certificate names {:?}, not {node:?}",
            info.node_name
        )));
    }
    if !CertInfo::parse(&ca)?.is_ca {
        return Err(KubeEnrolError::BadAnswer(
            "the last certificate is not a CA".into(),
        ));
    }
    Ok((leaf, ca))
}

/// What the CSR's status says now.
enum Progress {
    Pending,
    Issued(Vec<u8>),
}

fn progress(name: &str, csr: &CertificateSigningRequest) -> Result<Progress, KubeEnrolError> {
    let status = csr.status.as_ref();
    for c in status
        .and_then(|s| s.conditions.as_ref())
        .into_iter()
        .flatten()
    {
        if c.status == "False" {
            continue;
        }
        let (reason, message) = (
            c.reason.clone().unwrap_or_default(),
            c.message.clone().unwrap_or_default(),
        );
        match c.type_.as_str() {
            "Denied" => {
                return Err(KubeEnrolError::Denied {
                    name: name.into(),
                    reason,
                    message,
                })
            }
            "Failed" => {
                return Err(KubeEnrolError::Failed {
                    name: name.into(),
                    reason,
                    message,
                })
            }
            _ => {}
        }
    }
    Ok(match status.and_then(|s| s.certificate.as_ref()) {
        Some(c) if !c.0.is_empty() => Progress::Issued(c.0.clone()),
        _ => Progress::Pending,
    })
}

/// Enrols through a CertificateSigningRequest and stores the identity. Returns the
/// certificate's expiry.
pub async fn enrol(
    cfg: &KubeEnrolConfig,
    state: &AgentState,
) -> Result<SystemTime, KubeEnrolError> {
    let client = client(&cfg.kubeconfig).await?;
    let api: kube::Api<CertificateSigningRequest> = kube::Api::all(client);
    let key = NodeKey::generate()?;
    let request = der_to_pem(&key.csr_der(&cfg.node_name)?, "CERTIFICATE REQUEST");
    // Object names are at most 253 characters; node names may be that long themselves.
    let prefix: String = cfg.node_name.chars().take(200).collect();
    let csr = CertificateSigningRequest {
        metadata: ObjectMeta {
            generate_name: Some(format!("petrel-{prefix}-")),
            ..Default::default()
        },
        spec: CertificateSigningRequestSpec {
            request: ByteString(request.into_bytes()),
            signer_name: SIGNER_NAME.into(),
            usages: Some(vec!["client auth".into(), "digital signature".into()]),
            ..Default::default()
        },
        status: None,
    };
    let created = tokio::time::timeout(CALL, api.create(&PostParams::default(), &csr))
        .await
        .map_err(|_| KubeEnrolError::Create(format!("no answer within {CALL:?}")))?
        .map_err(|e| KubeEnrolError::Create(e.to_string()))?;
    let name = created.metadata.name.clone().unwrap_or_default();
    info!(csr = %name, node = %cfg.node_name, signer = SIGNER_NAME, "created a CertificateSigningRequest with the kubelet's credentials; waiting for a Petrel hub to sign it");
    let start = Instant::now();
    let mut logged = Instant::now();
    let mut current = created;
    loop {
        if let Progress::Issued(certificate) = progress(&name, &current)? {
            let (leaf, ca) = check_issued(&key, &cfg.node_name, &certificate)?;
            state.store(&key, &leaf, &ca)?;
            let not_after = CertInfo::parse(&leaf)?.not_after;
            info!(csr = %name, node = %cfg.node_name, "enrolled from the node's cluster identity; certificate stored");
            return Ok(not_after);
        }
        if start.elapsed() >= cfg.timeout {
            return Err(KubeEnrolError::Timeout {
                name,
                timeout: cfg.timeout,
            });
        }
        if logged.elapsed() >= LOG_EVERY {
            info!(csr = %name, "still waiting for a Petrel hub to sign the CertificateSigningRequest");
            logged = Instant::now();
        }
        tokio::time::sleep(POLL).await;
        match tokio::time::timeout(CALL, api.get_opt(&name)).await {
            Ok(Ok(Some(c))) => current = c,
            Ok(Ok(None)) => return Err(KubeEnrolError::Gone(name)),
            Ok(Err(e)) => {
                warn!(csr = %name, error = %e, "cannot read the CertificateSigningRequest; retrying")
            }
            Err(_) => warn!(csr = %name, "the API server did not answer; retrying"),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_transport::pki::CertificateAuthority;

    #[test]
    fn issued_chain_must_match_key_name_and_end_with_the_ca() {
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("ca", now, Duration::from_secs(3600)).unwrap();
        let key = NodeKey::generate().unwrap();
        let sign = |name: &str, key: &NodeKey| {
            ca.sign_node_csr(
                &key.csr_der(name).unwrap(),
                name,
                now,
                Duration::from_secs(600),
            )
            .unwrap()
        };
        let chain = |leaf: &[u8]| {
            let mut s = der_to_pem(leaf, "CERTIFICATE");
            s.push_str(&ca.cert_pem());
            s.into_bytes()
        };
        let leaf = sign("edge-a1", &key);
        let (l, c) = check_issued(&key, "edge-a1", &chain(&leaf)).unwrap();
        assert_eq!(l, leaf.to_vec());
        assert_eq!(c, ca.cert_der().to_vec());
        // Another node's name, another key, no CA, junk, oversize.
        let e = check_issued(&key, "edge-a2", &chain(&leaf)).unwrap_err();
        assert!(e.to_string().contains("names"), "{e}");
        let other = NodeKey::generate().unwrap();
        assert!(check_issued(&other, "edge-a1", &chain(&leaf)).is_err());
        let alone = der_to_pem(&leaf, "CERTIFICATE").into_bytes();
        assert!(check_issued(&key, "edge-a1", &alone).is_err());
        let mut two_leaves = der_to_pem(&leaf, "CERTIFICATE");
        two_leaves.push_str(&der_to_pem(&leaf, "CERTIFICATE"));
        assert!(check_issued(&key, "edge-a1", two_leaves.as_bytes()).is_err());
        assert!(check_issued(&key, "edge-a1", b"\xff\xfe").is_err());
        assert!(check_issued(&key, "edge-a1", &vec![b'a'; MAX_CERTIFICATE_BYTES + 1]).is_err());
    }

    #[test]
    fn denial_and_failure_carry_the_hubs_reason() {
        use k8s_openapi::api::certificates::v1::{
            CertificateSigningRequestCondition, CertificateSigningRequestStatus,
        };
        let mut csr = CertificateSigningRequest::default();
        assert!(matches!(progress("x", &csr), Ok(Progress::Pending)));
        csr.status = Some(CertificateSigningRequestStatus {
            conditions: Some(vec![CertificateSigningRequestCondition {
                type_: "Denied".into(),
                status: "True".into(),
                reason: Some("WrongNode".into()),
                message: Some("a node may only ask for its own name".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        let e = progress("x", &csr).err().unwrap().to_string();
        assert!(e.contains("WrongNode") && e.contains("its own name"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let state = AgentState::new(tmp.path());
        assert!(needs_enrolment(&state, "edge-a1", SystemTime::now()).unwrap());
    }
}
