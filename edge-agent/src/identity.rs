//! The device's identity on disk: `node.pem` (its private key and certificate, in one file so a
//! renewal replaces both atomically), `ca.crt` (the hub CA), and `endpoints.json` (the hubs it
//! knows, so a restarted agent reconnects even when it cannot reach the API server). The state
//! directory is 0700 and every file 0600.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use petrel_transport::pki::{der_to_pem, pem_to_der, CertInfo, NodeKey, PkiError};
use petrel_transport::private_files::{
    ensure_private_dir, read_optional, write_private, PrivateFileError,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("this device is not enrolled (no {0}); run `petrel-edge-agent join` first")]
    NotEnrolled(PathBuf),
    #[error(transparent)]
    File(#[from] PrivateFileError),
    #[error("{path}: {source}")]
    Pki { path: PathBuf, source: PkiError },
    #[error("{path}: the key and the certificate do not belong together")]
    Mismatch { path: PathBuf },
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
}

/// A loaded identity.
#[derive(Debug)]
pub struct Identity {
    pub key: NodeKey,
    pub cert_der: CertificateDer<'static>,
    pub ca_der: CertificateDer<'static>,
    pub info: CertInfo,
}

impl Identity {
    pub fn node_name(&self) -> &str {
        &self.info.node_name
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        self.key.private_key_der()
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.info.not_after
    }
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct AgentState {
    dir: PathBuf,
}

impl AgentState {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn node_pem(&self) -> PathBuf {
        self.dir.join("node.pem")
    }

    fn ca_crt(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    fn endpoints(&self) -> PathBuf {
        self.dir.join("endpoints.json")
    }

    pub fn is_enrolled(&self) -> bool {
        self.node_pem().exists() && self.ca_crt().exists()
    }

    pub fn load(&self) -> Result<Identity, IdentityError> {
        let (node_path, ca_path) = (self.node_pem(), self.ca_crt());
        let node = read_optional(&node_path)?
            .ok_or_else(|| IdentityError::NotEnrolled(node_path.clone()))?;
        let ca =
            read_optional(&ca_path)?.ok_or_else(|| IdentityError::NotEnrolled(ca_path.clone()))?;
        let node = String::from_utf8(node).map_err(|_| IdentityError::Corrupt {
            path: node_path.clone(),
            message: "not PEM".into(),
        })?;
        let ca = String::from_utf8(ca).map_err(|_| IdentityError::Corrupt {
            path: ca_path.clone(),
            message: "not PEM".into(),
        })?;
        let pki = |path: &Path| {
            let path = path.to_path_buf();
            move |source| IdentityError::Pki { path, source }
        };
        let key = NodeKey::from_pem(&node).map_err(pki(&node_path))?;
        let cert = pem_to_der(&node, "CERTIFICATE").map_err(pki(&node_path))?;
        let ca_der = pem_to_der(&ca, "CERTIFICATE").map_err(pki(&ca_path))?;
        if !key.matches(&cert) {
            return Err(IdentityError::Mismatch { path: node_path });
        }
        let info = CertInfo::parse(&cert).map_err(pki(&node_path))?;
        Ok(Identity {
            key,
            cert_der: CertificateDer::from(cert),
            ca_der: CertificateDer::from(ca_der),
            info,
        })
    }

    /// Stores a new identity: CA first, then key and certificate together.
    pub fn store(
        &self,
        key: &NodeKey,
        cert_der: &[u8],
        ca_der: &[u8],
    ) -> Result<(), IdentityError> {
        ensure_private_dir(&self.dir)?;
        write_private(&self.ca_crt(), der_to_pem(ca_der, "CERTIFICATE").as_bytes())?;
        let mut pem = key.to_pem();
        pem.push_str(&der_to_pem(cert_der, "CERTIFICATE"));
        write_private(&self.node_pem(), pem.as_bytes())?;
        Ok(())
    }

    /// Hubs this agent knows, as `host:port`.
    pub fn known_endpoints(&self) -> BTreeSet<String> {
        read_optional(&self.endpoints())
            .ok()
            .flatten()
            .and_then(|b| serde_json::from_slice::<BTreeSet<String>>(&b).ok())
            .unwrap_or_default()
    }

    pub fn save_endpoints(&self, endpoints: &BTreeSet<String>) -> Result<(), IdentityError> {
        ensure_private_dir(&self.dir)?;
        let body = serde_json::to_vec_pretty(endpoints).map_err(|e| IdentityError::Corrupt {
            path: self.endpoints(),
            message: e.to_string(),
        })?;
        Ok(write_private(&self.endpoints(), &body)?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use petrel_transport::pki::CertificateAuthority;
    use std::os::unix::fs::PermissionsExt;
    use std::time::Duration;

    #[test]
    fn stores_and_loads_with_private_permissions() {
        let tmp = tempfile::tempdir().unwrap();
        let state = AgentState::new(tmp.path().join("agent"));
        assert!(matches!(state.load(), Err(IdentityError::NotEnrolled(_))));
        let now = SystemTime::now();
        let ca = CertificateAuthority::generate("ca", now, Duration::from_secs(3600)).unwrap();
        let key = NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(
                &key.csr_der("edge-a1").unwrap(),
                "edge-a1",
                now,
                Duration::from_secs(600),
            )
            .unwrap();
        state.store(&key, &cert, ca.cert_der()).unwrap();
        let id = state.load().unwrap();
        assert_eq!(id.node_name(), "edge-a1");
        assert!(!id.is_expired(now));
        assert!(id.is_expired(now + Duration::from_secs(601)));
        for f in ["node.pem", "ca.crt"] {
            let mode = std::fs::metadata(tmp.path().join("agent").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        assert_eq!(
            std::fs::metadata(tmp.path().join("agent"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o700
        );
        // A key that does not match the certificate is refused, not used.
        let other = NodeKey::generate().unwrap();
        state.store(&other, &cert, ca.cert_der()).unwrap();
        assert!(matches!(state.load(), Err(IdentityError::Mismatch { .. })));
        let eps: BTreeSet<String> = ["a:1".to_string()].into();
        state.save_endpoints(&eps).unwrap();
        assert_eq!(state.known_endpoints(), eps);
    }
}
