//! Where the hub keeps its trust: the CA, join tokens and the hub secret. Storage sits behind
//! traits ([`CaStore`], [`TokenStore`]) so the state-directory backend here and the Kubernetes
//! Secret backend (`k8s::pki`) fit the same hub; `hub_store` picks one of the two.
//!
//! Join tokens look like Kubernetes bootstrap tokens (`abcdef.0123456789abcdef`): a public id and
//! a secret. Only the secret's SHA-256 is stored. A token is bound to one node name, expires, and
//! is single-use unless created reusable. A **fleet token** is bound to a node pool (a site)
//! instead: any edge node of that pool may enrol with it, each node once, up to a use limit,
//! until it expires; the nodes it enrolled are recorded with it. `token create` runs in another process than the hub, so
//! every read-modify-write of the token file happens under an exclusive file lock.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use petrel_transport::pki::{CertificateAuthority, PkiError};
use petrel_transport::private_files::{
    ensure_private_dir, read_optional, write_private, PrivateFileError,
};
use rand::Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long the hub CA lives.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 86400);
/// Expired tokens are kept this long so that a late `join` is told "expired", not "invalid".
const EXPIRED_TOKEN_RETENTION: Duration = Duration::from_secs(86400);

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    File(#[from] PrivateFileError),
    #[error("{path}: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("Kubernetes: {0}")]
    Kube(String),
}

/// Why a join token was refused. Each maps to an enrolment error code the agent prints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the join token is not valid (unknown or mistyped; tokens look like abcdef.0123456789abcdef)")]
    Invalid,
    #[error("the join token expired at {0} (create a new one with `petrel-gateway token create`)")]
    Expired(String),
    #[error(
        "the join token was already used (tokens are single-use unless created with --reusable)"
    )]
    AlreadyUsed,
    #[error("the join token is bound to node {bound:?}, not {asked:?}")]
    WrongNode { bound: String, asked: String },
    #[error("the fleet token is for node pool {pool:?}; node {node:?} is {}", site.as_ref().map_or_else(|| "not a node the hub knows".to_string(), |s| format!("in pool {s:?}")))]
    WrongPool {
        pool: String,
        node: String,
        site: Option<String>,
    },
    #[error("the fleet token already enrolled node {0:?} (each node once; make a node token with `petrel-gateway token create --node` to enrol it again)")]
    NodeAlreadyEnrolled(String),
    #[error("the fleet token reached its limit of {0} nodes")]
    UsedUp(u32),
}

/// A freshly created token (the only time its secret is visible).
#[derive(Debug, Clone)]
pub struct NewToken {
    pub token: String,
    /// Empty for a fleet token.
    pub node: String,
    pub expires: SystemTime,
    pub single_use: bool,
    /// A fleet token's pool and use limit.
    pub fleet: Option<(String, u32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenRecord {
    pub node: String,
    pub secret_sha256: String,
    pub expires_unix: u64,
    pub single_use: bool,
    #[serde(default)]
    pub used_unix: Option<u64>,
    /// A fleet token: the node pool (site) it enrols, instead of `node`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// A fleet token's limit of nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_uses: Option<u32>,
    /// The nodes a fleet token enrolled (each once).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub used_by: Vec<String>,
}

impl TokenRecord {
    /// A node token bound to `node`.
    pub fn for_node(node: &str, secret: &str, expires: SystemTime, single_use: bool) -> Self {
        Self {
            node: node.into(),
            secret_sha256: sha256_hex(secret),
            expires_unix: unix(expires),
            single_use,
            used_unix: None,
            pool: None,
            max_uses: None,
            used_by: Vec::new(),
        }
    }

    /// A fleet token for node pool `pool`.
    pub fn for_pool(pool: &str, secret: &str, expires: SystemTime, max_uses: u32) -> Self {
        Self {
            node: String::new(),
            secret_sha256: sha256_hex(secret),
            expires_unix: unix(expires),
            single_use: false,
            used_unix: None,
            pool: Some(pool.into()),
            max_uses: Some(max_uses),
            used_by: Vec::new(),
        }
    }

    /// Whether `secret` redeems this token for `node` (whose site the inventory says is
    /// `site`) at `now`. Both backends (state directory and Kubernetes Secrets) decide with
    /// this one function. The secret is checked first: without it nothing about the node or
    /// the token's scope is revealed.
    pub fn admit(
        &self,
        secret: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        if !ct_eq(&self.secret_sha256, &sha256_hex(secret)) {
            return Err(TokenError::Invalid);
        }
        if let Some(pool) = &self.pool {
            if unix(now) >= self.expires_unix {
                return Err(TokenError::Expired(fmt_unix(self.expires_unix)));
            }
            if site != Some(pool.as_str()) {
                return Err(TokenError::WrongPool {
                    pool: pool.clone(),
                    node: node.to_string(),
                    site: site.map(str::to_string),
                });
            }
            if self.used_by.iter().any(|n| n == node) {
                return Err(TokenError::NodeAlreadyEnrolled(node.to_string()));
            }
            let max = self.max_uses.unwrap_or(0);
            if self.used_by.len() >= max as usize {
                return Err(TokenError::UsedUp(max));
            }
            return Ok(());
        }
        if self.node != node {
            return Err(TokenError::WrongNode {
                bound: self.node.clone(),
                asked: node.to_string(),
            });
        }
        if unix(now) >= self.expires_unix {
            return Err(TokenError::Expired(fmt_unix(self.expires_unix)));
        }
        if self.single_use && self.used_unix.is_some() {
            return Err(TokenError::AlreadyUsed);
        }
        Ok(())
    }

    /// Records a use by `node` (after [`Self::admit`] and a successful issuance).
    pub fn consume(&mut self, node: &str, now: SystemTime) {
        self.used_unix = Some(unix(now));
        if self.pool.is_some() && !self.used_by.iter().any(|n| n == node) {
            self.used_by.push(node.to_string());
        }
    }

    /// Whether redeeming this token changes what is stored.
    pub fn consumed_by_use(&self) -> bool {
        self.single_use || self.pool.is_some()
    }
}

/// Storage for the CA.
pub trait CaStore: Send + Sync {
    /// Returns the CA, creating and persisting one on first use.
    fn load_or_create(&self, now: SystemTime) -> Result<CertificateAuthority, StoreError>;
}

/// Storage for join tokens.
pub trait TokenStore: Send + Sync {
    fn create(
        &self,
        node: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<NewToken, StoreError>;
    /// A fleet token for node pool `pool`, for at most `max_uses` nodes.
    fn create_fleet(
        &self,
        pool: &str,
        ttl: Duration,
        max_uses: u32,
        now: SystemTime,
    ) -> Result<NewToken, StoreError>;
    /// Checks `token` for `node` (in site `site`), runs `issue` (signing), and consumes the
    /// token only if `issue` succeeded, all under one lock: a failed enrolment never burns the
    /// token and two concurrent enrolments can never both use it.
    fn redeem<T, E: From<TokenError> + From<StoreError>>(
        &self,
        token: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
        issue: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E>
    where
        Self: Sized;
    fn list(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError>;
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn fmt_unix(secs: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(secs)).to_string()
}

/// The state-directory backend: `ca.crt`, `ca.key`, `tokens.json`, `hub.secret`.
#[derive(Debug, Clone)]
pub struct StateDir {
    dir: PathBuf,
}

impl StateDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    pub fn ensure(&self) -> Result<(), StoreError> {
        Ok(ensure_private_dir(&self.dir)?)
    }

    /// A 32-byte secret kept across restarts (the QUIC stateless-reset key).
    pub fn hub_secret(&self) -> Result<Vec<u8>, StoreError> {
        self.ensure()?;
        let path = self.dir.join("hub.secret");
        if let Some(b) = read_optional(&path)? {
            if b.len() == 32 {
                return Ok(b);
            }
            return Err(StoreError::Corrupt {
                path,
                message: format!("expected 32 bytes, found {}", b.len()),
            });
        }
        let mut secret = vec![0u8; 32];
        rand::rng().fill(&mut secret[..]);
        write_private(&path, &secret)?;
        Ok(secret)
    }

    fn with_token_lock<T>(
        &self,
        f: impl FnOnce(&Path) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.ensure()?;
        with_file_lock(&self.dir.join("tokens.lock"), || {
            f(&self.dir.join("tokens.json"))
        })
    }

    /// Adds a token made by `record` (from its fresh secret) under a fresh id, dropping tokens
    /// long expired; returns the token string `id.secret`.
    fn insert_token(
        &self,
        now: SystemTime,
        record: impl FnOnce(&str) -> TokenRecord,
    ) -> Result<String, StoreError> {
        self.with_token_lock(|path| {
            let mut tokens = Self::read_tokens(path)?;
            let now_s = unix(now);
            tokens.retain(|_, t| t.expires_unix + EXPIRED_TOKEN_RETENTION.as_secs() > now_s);
            let mut id = random_token_part(6);
            while tokens.contains_key(&id) {
                id = random_token_part(6);
            }
            let secret = random_token_part(16);
            tokens.insert(id.clone(), record(&secret));
            Self::write_tokens(path, &tokens)?;
            Ok(format!("{id}.{secret}"))
        })
    }

    fn read_tokens(path: &Path) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        match read_optional(path)? {
            None => Ok(BTreeMap::new()),
            Some(b) => serde_json::from_slice(&b).map_err(|e| StoreError::Corrupt {
                path: path.to_path_buf(),
                message: e.to_string(),
            }),
        }
    }

    fn write_tokens(path: &Path, tokens: &BTreeMap<String, TokenRecord>) -> Result<(), StoreError> {
        let body = serde_json::to_vec_pretty(tokens).map_err(|e| StoreError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(write_private(path, &body)?)
    }
}

impl CaStore for StateDir {
    fn load_or_create(&self, now: SystemTime) -> Result<CertificateAuthority, StoreError> {
        self.ensure()?;
        let (crt, key) = (self.dir.join("ca.crt"), self.dir.join("ca.key"));
        match (read_optional(&crt)?, read_optional(&key)?) {
            (Some(c), Some(k)) => {
                let text = |b: Vec<u8>, p: &Path| {
                    String::from_utf8(b).map_err(|_| StoreError::Corrupt {
                        path: p.to_path_buf(),
                        message: "not UTF-8 PEM".into(),
                    })
                };
                Ok(CertificateAuthority::from_pem(
                    &text(c, &crt)?,
                    &text(k, &key)?,
                )?)
            }
            (None, None) => {
                let ca = CertificateAuthority::generate("petrel-ca", now, CA_VALIDITY)?;
                // Key first: a crash between the two writes leaves a key without a certificate,
                // which the next start reports instead of silently minting a second CA.
                write_private(&key, ca.key_pem().as_bytes())?;
                write_private(&crt, ca.cert_pem().as_bytes())?;
                Ok(ca)
            }
            (Some(_), None) => Err(StoreError::Corrupt {
                path: key,
                message: "CA certificate exists but its key is missing".into(),
            }),
            (None, Some(_)) => Err(StoreError::Corrupt {
                path: crt,
                message: "CA key exists but its certificate is missing".into(),
            }),
        }
    }
}

pub(crate) fn random_token_part(len: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// `(id, secret)` of a well-formed token (`abcdef.0123456789abcdef`).
pub(crate) fn split_token(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.trim().split_once('.')?;
    let ok = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

pub(crate) fn sha256_hex(s: &str) -> String {
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// Constant-time comparison: the hash is not secret, but there is no reason to leak timing.
fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

/// Runs `f` holding an exclusive lock on `lock_path` (created 0600 if missing): the state
/// directory's read-modify-write files (tokens, revocations) are changed by several processes.
pub(crate) fn with_file_lock<T>(
    lock_path: &Path,
    f: impl FnOnce() -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    let lock_err = |source| StoreError::Lock {
        path: lock_path.to_path_buf(),
        source,
    };
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(lock_path)
        .map_err(lock_err)?;
    lock.lock().map_err(lock_err)?;
    let result = f();
    let _ = lock.unlock();
    result
}

impl TokenStore for StateDir {
    fn create(
        &self,
        node: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        let expires = now + ttl;
        let token = self.insert_token(now, |secret| {
            TokenRecord::for_node(node, secret, expires, single_use)
        })?;
        Ok(NewToken {
            token,
            node: node.to_string(),
            expires,
            single_use,
            fleet: None,
        })
    }

    fn create_fleet(
        &self,
        pool: &str,
        ttl: Duration,
        max_uses: u32,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        let expires = now + ttl;
        let token = self.insert_token(now, |secret| {
            TokenRecord::for_pool(pool, secret, expires, max_uses)
        })?;
        Ok(NewToken {
            token,
            node: String::new(),
            expires,
            single_use: false,
            fleet: Some((pool.to_string(), max_uses)),
        })
    }

    fn redeem<T, E: From<TokenError> + From<StoreError>>(
        &self,
        token: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
        issue: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let mut outcome: Option<Result<T, E>> = None;
        let locked = self.with_token_lock(|path| {
            let mut tokens = Self::read_tokens(path)?;
            let check = (|| {
                let (id, secret) = split_token(token).ok_or(TokenError::Invalid)?;
                tokens
                    .get(id)
                    .ok_or(TokenError::Invalid)?
                    .admit(secret, node, site, now)?;
                Ok::<_, TokenError>(id.to_string())
            })();
            let id = match check {
                Ok(id) => id,
                Err(e) => {
                    outcome = Some(Err(e.into()));
                    return Ok(());
                }
            };
            let issued = issue();
            if issued.is_ok() {
                if let Some(rec) = tokens.get_mut(&id) {
                    rec.consume(node, now);
                }
                Self::write_tokens(path, &tokens)?;
            }
            outcome = Some(issued);
            Ok(())
        });
        match (locked, outcome) {
            (Err(e), _) => Err(e.into()),
            (Ok(()), Some(o)) => o,
            (Ok(()), None) => Err(StoreError::Corrupt {
                path: self.dir.join("tokens.json"),
                message: "token check did not run".into(),
            }
            .into()),
        }
    }

    fn list(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        self.with_token_lock(Self::read_tokens)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Err {
        Token(TokenError),
        Store(String),
        Sign,
    }
    impl From<TokenError> for Err {
        fn from(e: TokenError) -> Self {
            Err::Token(e)
        }
    }
    impl From<StoreError> for Err {
        fn from(e: StoreError) -> Self {
            Err::Store(e.to_string())
        }
    }

    #[test]
    fn tokens_are_bound_expire_and_are_single_use() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        let now = SystemTime::now();
        let t = store
            .create("edge-a1", Duration::from_secs(3600), true, now)
            .unwrap();
        let ok = || Ok::<_, Err>(42);
        assert_eq!(
            store.redeem(
                "zzzzzz.0000000000000000",
                "edge-a1",
                Some("site-a"),
                now,
                ok
            ),
            Err(Err::Token(TokenError::Invalid))
        );
        assert_eq!(
            store.redeem("garbage", "edge-a1", Some("site-a"), now, ok),
            Err(Err::Token(TokenError::Invalid))
        );
        let wrong_secret = format!("{}.0000000000000000", &t.token[..6]);
        assert_eq!(
            store.redeem(&wrong_secret, "edge-a1", Some("site-a"), now, ok),
            Err(Err::Token(TokenError::Invalid))
        );
        assert!(matches!(
            store.redeem(&t.token, "edge-b1", Some("site-a"), now, ok),
            Err(Err::Token(TokenError::WrongNode { .. }))
        ));
        assert!(matches!(
            store.redeem(
                &t.token,
                "edge-a1",
                Some("site-a"),
                now + Duration::from_secs(3601),
                ok
            ),
            Err(Err::Token(TokenError::Expired(_)))
        ));
        // A failed issuance does not burn the token.
        assert_eq!(
            store.redeem(&t.token, "edge-a1", Some("site-a"), now, || Err::<i32, _>(
                Err::Sign
            )),
            Err(Err::Sign)
        );
        assert_eq!(
            store.redeem(&t.token, "edge-a1", Some("site-a"), now, ok),
            Ok(42)
        );
        assert_eq!(
            store.redeem(&t.token, "edge-a1", Some("site-a"), now, ok),
            Err(Err::Token(TokenError::AlreadyUsed))
        );

        let r = store
            .create("edge-a2", Duration::from_secs(60), false, now)
            .unwrap();
        assert_eq!(
            store.redeem(&r.token, "edge-a2", Some("site-a"), now, ok),
            Ok(42)
        );
        assert_eq!(
            store.redeem(&r.token, "edge-a2", Some("site-a"), now, ok),
            Ok(42)
        );
        // secrets are not stored
        let raw = std::fs::read_to_string(tmp.path().join("state/tokens.json")).unwrap();
        assert!(!raw.contains(&t.token[7..]));
    }

    #[test]
    fn fleet_tokens_enrol_each_node_of_their_pool_once_up_to_a_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path().join("state"));
        let now = SystemTime::now();
        let t = store
            .create_fleet("site-a", Duration::from_secs(3600), 2, now)
            .unwrap();
        assert_eq!(t.fleet, Some(("site-a".to_string(), 2)));
        let ok = || Ok::<_, Err>(1);
        let a = Some("site-a");
        // Another pool, or a node the inventory does not know.
        assert!(matches!(
            store.redeem(&t.token, "edge-b1", Some("site-b"), now, ok),
            Err(Err::Token(TokenError::WrongPool { .. }))
        ));
        assert!(matches!(
            store.redeem(&t.token, "ghost", None, now, ok),
            Err(Err::Token(TokenError::WrongPool { site: None, .. }))
        ));
        // A wrong secret says nothing about pools.
        let wrong = format!("{}.0000000000000000", &t.token[..6]);
        assert_eq!(
            store.redeem(&wrong, "edge-b1", Some("site-b"), now, ok),
            Err(Err::Token(TokenError::Invalid))
        );
        // A failed issuance does not count as a use.
        assert_eq!(
            store.redeem(&t.token, "edge-a1", a, now, || Err::<i32, _>(Err::Sign)),
            Err(Err::Sign)
        );
        assert_eq!(store.redeem(&t.token, "edge-a1", a, now, ok), Ok(1));
        assert_eq!(
            store.redeem(&t.token, "edge-a1", a, now, ok),
            Err(Err::Token(TokenError::NodeAlreadyEnrolled(
                "edge-a1".into()
            )))
        );
        assert_eq!(store.redeem(&t.token, "edge-a2", a, now, ok), Ok(1));
        assert_eq!(
            store.redeem(&t.token, "edge-a3", a, now, ok),
            Err(Err::Token(TokenError::UsedUp(2)))
        );
        assert!(matches!(
            store.redeem(&t.token, "edge-a3", a, now + Duration::from_secs(3601), ok),
            Err(Err::Token(TokenError::Expired(_)))
        ));
        let listed = store.list().unwrap();
        let rec = listed.get(&t.token[..6]).unwrap();
        assert_eq!(rec.used_by, vec!["edge-a1", "edge-a2"]);
        assert_eq!(rec.pool.as_deref(), Some("site-a"));
    }

    #[test]
    fn ca_is_created_once_and_reloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let store = StateDir::new(tmp.path());
        let a = store.load_or_create(SystemTime::now()).unwrap();
        let b = store.load_or_create(SystemTime::now()).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        std::fs::remove_file(tmp.path().join("ca.key")).unwrap();
        assert!(matches!(
            store.load_or_create(SystemTime::now()),
            Err(StoreError::Corrupt { .. })
        ));
        assert_eq!(store.hub_secret().unwrap(), store.hub_secret().unwrap());
    }
}
