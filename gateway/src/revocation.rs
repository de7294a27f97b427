//! Revocation: which nodes' Petrel certificates the hubs refuse, where that list is kept, and
//! how a running hub follows it.
//!
//! A revocation names a node and a time: every certificate for that node issued at or before
//! that time is refused from then on (tunnels and renewals), and the node may not enrol again
//! (join token, fleet token or CertificateSigningRequest) until the revocation is lifted. Lifting
//! lets it enrol again; the certificates issued before the revocation stay refused, so a stolen
//! key is useless even after the device is back. Petrel's CA keeps no list of what it issued, so
//! "issued at" is read from the certificate itself (`notBefore` plus the CA's fixed backdating).
//!
//! The list lives with the CA: `revocations.json` in the state directory (file mode) or the
//! Secret `petrel-revocations` next to the CA Secret (Kubernetes mode), so a restarted hub, and
//! every hub candidate, refuses the same certificates. `petrel-gateway revoke` runs in another
//! process than the hub; each hub re-reads the list every [`POLL`] and closes the tunnels it now
//! refuses (the hub applies it: `crate::hub::revoked`). Until a hub has read the list once it
//! refuses every tunnel (fail closed).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use petrel_transport::pki::{CertInfo, BACKDATE};
use petrel_transport::private_files::{
    ensure_private_dir, read_optional, write_private, PrivateFileError,
};
use serde::{Deserialize, Serialize};

use crate::pki_store::StoreError;

/// How often a hub re-reads the revocation list.
pub const POLL: Duration = Duration::from_secs(1);
/// The file in the state directory.
pub const FILE: &str = "revocations.json";
/// Longest reason kept (it is shown in refusals and logs).
pub const MAX_REASON: usize = 200;
/// Most revocations a list may hold: a list from storage beyond it is refused as corrupt rather
/// than parsed into unbounded memory. Far above any fleet (a revoked node is one entry).
pub const MAX_ENTRIES: usize = 100_000;
/// Largest stored list read (bytes), checked before parsing.
pub const MAX_BYTES: usize = 32 << 20;

/// One node's revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    /// Certificates of the node issued at or before this time (Unix seconds) are refused.
    pub revoked_unix: u64,
    /// Why (for operators; shown in refusals).
    #[serde(default)]
    pub reason: String,
    /// Set by `revoke --lift`: the node may enrol again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifted_unix: Option<u64>,
}

/// Node name -> revocation.
pub type RevocationList = BTreeMap<String, Revocation>;

/// Why a certificate or an enrolment is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("the certificate of node {node:?} was revoked at {at} ({reason}); the node must enrol again once the revocation is lifted")]
    Certificate {
        node: String,
        at: String,
        reason: String,
    },
    #[error("node {node:?} is revoked since {at} ({reason}); `petrel-gateway revoke --node {node} --lift` lets it enrol again")]
    Node {
        node: String,
        at: String,
        reason: String,
    },
    #[error("this hub has not read its revocation list yet; retry in a few seconds")]
    NotLoaded,
}

impl Revoked {
    /// The metric label.
    pub fn label(&self) -> &'static str {
        match self {
            Revoked::Certificate { .. } | Revoked::Node { .. } => "revoked",
            Revoked::NotLoaded => "revocations_not_loaded",
        }
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// When a Petrel certificate was issued: its `notBefore` is the signing time minus the CA's
/// backdating (whole seconds, rounded down), so this is at most the real signing time.
pub fn issued_at(info: &CertInfo) -> SystemTime {
    info.not_before + BACKDATE
}

/// Whether a certificate for `node` issued at `issued` is still accepted.
pub fn check_certificate(
    list: &RevocationList,
    node: &str,
    issued: SystemTime,
) -> Result<(), Revoked> {
    match list.get(node) {
        // At or before: a certificate signed in the second of the revocation is refused too.
        Some(r) if unix(issued) <= r.revoked_unix => Err(Revoked::Certificate {
            node: node.into(),
            at: fmt_unix(r.revoked_unix),
            reason: r.reason.clone(),
        }),
        _ => Ok(()),
    }
}

/// Whether `node` may enrol (get a new certificate).
pub fn check_enrolment(list: &RevocationList, node: &str) -> Result<(), Revoked> {
    match list.get(node) {
        Some(r) if r.lifted_unix.is_none() => Err(Revoked::Node {
            node: node.into(),
            at: fmt_unix(r.revoked_unix),
            reason: r.reason.clone(),
        }),
        _ => Ok(()),
    }
}

/// Revokes `node` at `now` (a second revocation moves the time forward and clears a lift).
pub fn revoke(list: &mut RevocationList, node: &str, reason: &str, now: SystemTime) {
    let mut reason = reason.replace(['\n', '\r'], " ");
    if reason.len() > MAX_REASON {
        let mut cut = MAX_REASON;
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        reason.truncate(cut);
    }
    let revoked_unix = list
        .get(node)
        .map_or(unix(now), |r| r.revoked_unix.max(unix(now)));
    list.insert(
        node.into(),
        Revocation {
            revoked_unix,
            reason,
            lifted_unix: None,
        },
    );
}

/// Lets a revoked node enrol again. `false` if it was not revoked.
pub fn lift(list: &mut RevocationList, node: &str, now: SystemTime) -> bool {
    match list.get_mut(node) {
        Some(r) => {
            r.lifted_unix = Some(unix(now));
            true
        }
        None => false,
    }
}

/// Parses a stored list, bounded.
pub fn parse(bytes: &[u8], origin: &Path) -> Result<RevocationList, StoreError> {
    let corrupt = |message: String| StoreError::Corrupt {
        path: origin.to_path_buf(),
        message,
    };
    if bytes.len() > MAX_BYTES {
        return Err(corrupt(format!(
            "{} bytes, more than the {MAX_BYTES} a revocation list may have",
            bytes.len()
        )));
    }
    let list: RevocationList = serde_json::from_slice(bytes).map_err(|e| corrupt(e.to_string()))?;
    if list.len() > MAX_ENTRIES {
        return Err(corrupt(format!(
            "{} entries, more than {MAX_ENTRIES}",
            list.len()
        )));
    }
    Ok(list)
}

pub fn encode(list: &RevocationList) -> Vec<u8> {
    serde_json::to_vec_pretty(list).unwrap_or_default()
}

/// The state-directory backend: `revocations.json`, changed under `revocations.lock`.
#[derive(Debug, Clone)]
pub struct FileRevocations {
    dir: PathBuf,
}

impl FileRevocations {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn load(&self) -> Result<RevocationList, StoreError> {
        let path = self.dir.join(FILE);
        match read_optional(&path)? {
            None => Ok(RevocationList::new()),
            Some(b) => parse(&b, &path),
        }
    }

    /// Read-modify-write under an exclusive lock (another `revoke` may run at the same time).
    pub fn update<T>(
        &self,
        f: impl FnOnce(&mut RevocationList) -> T,
    ) -> Result<(T, RevocationList), StoreError> {
        ensure_private_dir(&self.dir).map_err(StoreError::from)?;
        crate::pki_store::with_file_lock(&self.dir.join("revocations.lock"), || {
            let mut list = self.load()?;
            let out = f(&mut list);
            write_private(&self.dir.join(FILE), &encode(&list))
                .map_err(|e: PrivateFileError| StoreError::from(e))?;
            Ok((out, list))
        })
    }
}

/// The list a running hub enforces. `None` until first read: every tunnel is refused then.
#[derive(Debug, Default)]
pub struct Revocations {
    list: RwLock<Option<Arc<RevocationList>>>,
}

impl Revocations {
    /// A hub whose list was read at start-up.
    pub fn loaded(list: RevocationList) -> Self {
        Self {
            list: RwLock::new(Some(Arc::new(list))),
        }
    }

    /// The current list; `None` before it was first read.
    pub fn current(&self) -> Option<Arc<RevocationList>> {
        self.list.read().ok().and_then(|l| l.clone())
    }

    /// Replaces the list; `true` if it changed.
    pub fn set(&self, list: RevocationList) -> bool {
        let Ok(mut cur) = self.list.write() else {
            return false;
        };
        if cur.as_deref() == Some(&list) {
            return false;
        }
        *cur = Some(Arc::new(list));
        true
    }

    /// Whether a verified peer certificate chain for `node` is accepted.
    pub fn check_peer(&self, conn: &quinn::Connection, node: &str) -> Result<(), Revoked> {
        let list = self.current().ok_or(Revoked::NotLoaded)?;
        let issued = petrel_transport::tls::peer_certificates(conn)
            .and_then(|c| CertInfo::parse(c.first()?).ok())
            .map(|i| issued_at(&i))
            // A certificate that cannot be read was refused earlier; treat it as the oldest.
            .unwrap_or(UNIX_EPOCH);
        check_certificate(&list, node, issued)
    }

    /// Whether `node` may enrol now.
    pub fn check_enrolment(&self, node: &str) -> Result<(), Revoked> {
        let list = self.current().ok_or(Revoked::NotLoaded)?;
        check_enrolment(&list, node)
    }
}

/// What `revoke` did, for its output.
pub fn describe(list: &RevocationList) -> String {
    let mut out = format!("{:<32} {:<22} {:<22} REASON\n", "NODE", "REVOKED", "LIFTED");
    for (node, r) in list {
        out.push_str(&format!(
            "{node:<32} {:<22} {:<22} {}\n",
            fmt_unix(r.revoked_unix),
            r.lifted_unix.map(fmt_unix).unwrap_or_else(|| "-".into()),
            r.reason
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn at(s: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(s)
    }

    #[test]
    fn certificates_issued_up_to_the_revocation_are_refused() {
        let mut list = RevocationList::new();
        assert_eq!(check_certificate(&list, "edge-a1", at(100)), Ok(()));
        revoke(&mut list, "edge-a1", "stolen", at(1000));
        for t in [100, 999, 1000] {
            let e = check_certificate(&list, "edge-a1", at(t)).unwrap_err();
            assert!(e.to_string().contains("stolen"), "{e}");
            assert_eq!(e.label(), "revoked");
        }
        assert_eq!(check_certificate(&list, "edge-a1", at(1001)), Ok(()));
        assert_eq!(check_certificate(&list, "edge-a2", at(10)), Ok(()));
        // Enrolment is refused until lifted; lifting keeps old certificates refused.
        assert!(check_enrolment(&list, "edge-a1")
            .unwrap_err()
            .to_string()
            .contains("--lift"));
        assert!(lift(&mut list, "edge-a1", at(2000)));
        assert!(!lift(&mut list, "nope", at(2000)));
        assert_eq!(check_enrolment(&list, "edge-a1"), Ok(()));
        assert!(check_certificate(&list, "edge-a1", at(999)).is_err());
        // Revoking again never moves the time back and clears the lift.
        revoke(&mut list, "edge-a1", "again", at(500));
        assert_eq!(list["edge-a1"].revoked_unix, 1000);
        assert!(check_enrolment(&list, "edge-a1").is_err());
    }

    #[test]
    fn issued_at_undoes_the_backdating() {
        let now = SystemTime::now();
        let ca = petrel_transport::pki::CertificateAuthority::generate(
            "ca",
            now,
            Duration::from_secs(3600),
        )
        .unwrap();
        let key = petrel_transport::pki::NodeKey::generate().unwrap();
        let cert = ca
            .sign_node_csr(
                &key.csr_der("edge-a1").unwrap(),
                "edge-a1",
                now,
                Duration::from_secs(600),
            )
            .unwrap();
        let issued = issued_at(&CertInfo::parse(&cert).unwrap());
        assert!(issued <= now && now.duration_since(issued).unwrap() < Duration::from_secs(1));
        let mut list = RevocationList::new();
        revoke(&mut list, "edge-a1", "x", now);
        assert!(check_certificate(&list, "edge-a1", issued).is_err());
    }

    #[test]
    fn reasons_are_bounded_and_lists_parsed_with_caps() {
        let mut list = RevocationList::new();
        revoke(&mut list, "n", &"x\n".repeat(500), at(1));
        assert!(list["n"].reason.len() <= MAX_REASON && !list["n"].reason.contains('\n'));
        let p = Path::new("r.json");
        assert_eq!(parse(&encode(&list), p).unwrap(), list);
        assert!(parse(b"{not json", p).is_err());
        assert!(parse(&vec![b' '; MAX_BYTES + 1], p).is_err());
    }

    #[test]
    fn file_store_round_trips_under_its_lock() {
        let tmp = tempfile::tempdir().unwrap();
        let f = FileRevocations::new(tmp.path().join("state"));
        assert!(f.load().unwrap().is_empty());
        f.update(|l| revoke(l, "edge-a1", "r", at(5))).unwrap();
        let (lifted, list) = f.update(|l| lift(l, "edge-a1", at(6))).unwrap();
        assert!(lifted);
        assert_eq!(f.load().unwrap(), list);
        let live = Revocations::default();
        assert_eq!(live.check_enrolment("x"), Err(Revoked::NotLoaded));
        assert!(live.set(list.clone()));
        assert!(!live.set(list));
        assert_eq!(live.check_enrolment("edge-a1"), Ok(()));
    }
}
