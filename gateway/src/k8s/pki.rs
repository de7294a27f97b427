//! The hub's trust in the cluster: the CA in a Secret (`kubernetes.io/tls`, `tls.crt` and
//! `tls.key`; every hub candidate shares it, the first to start creates it), and join tokens as
//! Secrets like bootstrap tokens: `petrel-token-<id>` of type `petrel.io/join-token`, bound to a
//! node name, with an expiry, single-use unless created reusable. Only the secret's SHA-256 is
//! stored. A single-use token is consumed with a resourceVersion precondition, so two hubs
//! redeeming it at once cannot both succeed.
//!
//! The [`crate::pki_store`] traits are synchronous (enrolment runs them on a blocking thread);
//! this store runs its API calls on the runtime it was created on. The CA is loaded (or
//! created) asynchronously before the hub binds, with [`KubeStore::load_or_create_ca`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, PostParams};
use petrel_transport::pki::CertificateAuthority;
use tracing::{info, warn};

use super::{bounded, keys, KubeError};
use crate::pki_store::{
    random_token_part, sha256_hex, split_token, NewToken, StoreError, TokenError, TokenRecord,
    CA_VALIDITY,
};

const CALL: Duration = Duration::from_secs(10);
/// Expired tokens are kept this long so that a late `join` is told "expired", not "invalid".
const EXPIRED_TOKEN_RETENTION: Duration = Duration::from_secs(86400);

/// CA and join tokens in Secrets of one namespace.
#[derive(Clone)]
pub struct KubeStore {
    secrets: kube::Api<Secret>,
    namespace: String,
    ca_secret: String,
    ca_pem: Arc<Mutex<Option<(String, String)>>>,
    handle: tokio::runtime::Handle,
}

impl std::fmt::Debug for KubeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeStore")
            .field("namespace", &self.namespace)
            .field("ca_secret", &self.ca_secret)
            .finish()
    }
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn data_str(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .and_then(|b| String::from_utf8(b.0.clone()).ok())
}

fn kube_err(e: KubeError) -> StoreError {
    StoreError::Kube(e.to_string())
}

/// Most nodes a fleet token records (its `used-by`); a larger limit is refused at creation.
pub const MAX_FLEET_USES: u32 = 10_000;

/// Reads a token Secret into the record the file backend keeps. A fleet token has `node-pool`,
/// `usage: fleet`, `max-uses` and `used-by` (the nodes it enrolled, comma-separated) instead of
/// `node-name`.
fn record_of(s: &Secret) -> Option<TokenRecord> {
    let expires = data_str(s, "expiration")?;
    let expires = humantime::parse_rfc3339(expires.trim()).ok()?;
    let pool = data_str(s, "node-pool");
    let used_by: Vec<String> = data_str(s, "used-by")
        .map(|u| {
            u.split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .take(MAX_FLEET_USES as usize)
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Some(TokenRecord {
        node: match &pool {
            Some(_) => data_str(s, "node-name").unwrap_or_default(),
            None => data_str(s, "node-name")?,
        },
        secret_sha256: data_str(s, "token-secret-sha256")?,
        expires_unix: unix(expires),
        single_use: pool.is_none() && data_str(s, "usage").as_deref() != Some("reusable"),
        used_unix: data_str(s, "used-at")
            .and_then(|u| humantime::parse_rfc3339(u.trim()).ok())
            .map(unix),
        max_uses: match &pool {
            Some(_) => Some(data_str(s, "max-uses")?.trim().parse().ok()?),
            None => None,
        },
        pool,
        used_by,
    })
}

impl KubeStore {
    /// Must be called inside a tokio runtime (its handle runs the synchronous trait methods).
    pub fn new(client: kube::Client, namespace: &str, ca_secret: &str) -> Self {
        Self {
            secrets: kube::Api::namespaced(client, namespace),
            namespace: namespace.into(),
            ca_secret: ca_secret.into(),
            ca_pem: Arc::new(Mutex::new(None)),
            handle: tokio::runtime::Handle::current(),
        }
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The runtime the synchronous trait methods block on.
    pub fn handle(&self) -> &tokio::runtime::Handle {
        &self.handle
    }

    /// Reads the CA Secret, creating it (and the CA) if it does not exist. Two hubs starting at
    /// once agree: the second one's create fails with AlreadyExists and it reads the first's.
    pub async fn load_or_create_ca(
        &self,
        now: SystemTime,
    ) -> Result<CertificateAuthority, StoreError> {
        let name = self.ca_secret.as_str();
        for _ in 0..3 {
            if let Some(s) = bounded(CALL, self.secrets.get_opt(name))
                .await
                .map_err(kube_err)?
            {
                let crt = data_str(&s, "tls.crt");
                let key = data_str(&s, "tls.key");
                let (Some(crt), Some(key)) = (crt, key) else {
                    return Err(StoreError::Kube(format!(
                        "Secret {}/{name} has no tls.crt and tls.key",
                        self.namespace
                    )));
                };
                let ca = CertificateAuthority::from_pem(&crt, &key)?;
                if let Ok(mut c) = self.ca_pem.lock() {
                    *c = Some((crt, key));
                }
                return Ok(ca);
            }
            let ca = CertificateAuthority::generate("petrel-ca", now, CA_VALIDITY)?;
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([(
                        "app.kubernetes.io/name".to_string(),
                        "petrel".to_string(),
                    )])),
                    ..Default::default()
                },
                type_: Some("kubernetes.io/tls".into()),
                data: Some(BTreeMap::from([
                    (
                        "tls.crt".to_string(),
                        ByteString(ca.cert_pem().into_bytes()),
                    ),
                    ("tls.key".to_string(), ByteString(ca.key_pem().into_bytes())),
                ])),
                ..Default::default()
            };
            match bounded(CALL, self.secrets.create(&PostParams::default(), &secret)).await {
                Ok(_) => {
                    info!(secret = %format!("{}/{name}", self.namespace), ca_sha256 = %ca.fingerprint(), "created the hub CA");
                    if let Ok(mut c) = self.ca_pem.lock() {
                        *c = Some((ca.cert_pem(), ca.key_pem()));
                    }
                    return Ok(ca);
                }
                Err(e) if e.status() == Some(409) => continue,
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(StoreError::Kube(format!(
            "Secret {}/{name} keeps appearing and disappearing",
            self.namespace
        )))
    }

    /// The CA loaded by [`Self::load_or_create_ca`].
    pub fn loaded_ca(&self) -> Result<CertificateAuthority, StoreError> {
        let pem = self.ca_pem.lock().ok().and_then(|c| c.clone());
        match pem {
            Some((crt, key)) => Ok(CertificateAuthority::from_pem(&crt, &key)?),
            None => Err(StoreError::Kube(
                "the CA Secret has not been loaded yet".into(),
            )),
        }
    }

    fn token_name(id: &str) -> String {
        format!("{}{id}", keys::TOKEN_SECRET_PREFIX)
    }

    pub async fn create_token(
        &self,
        node: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        self.create_token_secret(
            TokenKind::Node {
                node: node.into(),
                single_use,
            },
            ttl,
            now,
        )
        .await
    }

    /// A fleet token for node pool `pool` (see [`crate::pki_store`]).
    pub async fn create_fleet_token(
        &self,
        pool: &str,
        ttl: Duration,
        max_uses: u32,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        if max_uses == 0 || max_uses > MAX_FLEET_USES {
            return Err(StoreError::Kube(format!(
                "a fleet token enrols 1 to {MAX_FLEET_USES} nodes, not {max_uses}"
            )));
        }
        self.create_token_secret(
            TokenKind::Fleet {
                pool: pool.into(),
                max_uses,
            },
            ttl,
            now,
        )
        .await
    }

    async fn create_token_secret(
        &self,
        kind: TokenKind,
        ttl: Duration,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        self.prune_expired(now).await;
        for _ in 0..5 {
            let id = random_token_part(6);
            let secret = random_token_part(16);
            let expires = now + ttl;
            let mut data = BTreeMap::from([
                ("token-id".to_string(), id.clone()),
                ("token-secret-sha256".to_string(), sha256_hex(&secret)),
                ("expiration".to_string(), super::rfc3339(expires)),
            ]);
            match &kind {
                TokenKind::Node { node, single_use } => {
                    data.insert("node-name".into(), node.clone());
                    data.insert(
                        "usage".into(),
                        if *single_use {
                            "single-use"
                        } else {
                            "reusable"
                        }
                        .into(),
                    );
                }
                TokenKind::Fleet { pool, max_uses } => {
                    data.insert("node-pool".into(), pool.clone());
                    data.insert("usage".into(), "fleet".into());
                    data.insert("max-uses".into(), max_uses.to_string());
                }
            }
            let obj = Secret {
                metadata: ObjectMeta {
                    name: Some(Self::token_name(&id)),
                    namespace: Some(self.namespace.clone()),
                    labels: Some(BTreeMap::from([
                        (keys::TOKEN_LABEL.to_string(), "true".to_string()),
                        ("app.kubernetes.io/name".to_string(), "petrel".to_string()),
                    ])),
                    ..Default::default()
                },
                type_: Some(keys::TOKEN_SECRET_TYPE.into()),
                data: Some(
                    std::mem::take(&mut data)
                        .into_iter()
                        .map(|(k, v)| (k, ByteString(v.into_bytes())))
                        .collect(),
                ),
                ..Default::default()
            };
            match bounded(CALL, self.secrets.create(&PostParams::default(), &obj)).await {
                Ok(_) => {
                    return Ok(match &kind {
                        TokenKind::Node { node, single_use } => NewToken {
                            token: format!("{id}.{secret}"),
                            node: node.clone(),
                            expires,
                            single_use: *single_use,
                            fleet: None,
                        },
                        TokenKind::Fleet { pool, max_uses } => NewToken {
                            token: format!("{id}.{secret}"),
                            node: String::new(),
                            expires,
                            single_use: false,
                            fleet: Some((pool.clone(), *max_uses)),
                        },
                    })
                }
                Err(e) if e.status() == Some(409) => continue,
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(StoreError::Kube("could not find a free token id".into()))
    }

    /// Deletes tokens that expired more than a day ago.
    async fn prune_expired(&self, now: SystemTime) {
        let Ok(list) = self.list_token_secrets().await else {
            return;
        };
        for s in list {
            let Some(rec) = record_of(&s) else { continue };
            if rec.expires_unix + EXPIRED_TOKEN_RETENTION.as_secs() <= unix(now) {
                if let Some(name) = s.metadata.name.as_deref() {
                    let _ =
                        bounded(CALL, self.secrets.delete(name, &DeleteParams::default())).await;
                }
            }
        }
    }

    async fn list_token_secrets(&self) -> Result<Vec<Secret>, StoreError> {
        let lp = ListParams::default().labels(&format!("{}=true", keys::TOKEN_LABEL));
        Ok(bounded(CALL, self.secrets.list(&lp))
            .await
            .map_err(kube_err)?
            .items)
    }

    pub async fn list_tokens(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        Ok(self
            .list_token_secrets()
            .await?
            .iter()
            .filter_map(|s| Some((data_str(s, "token-id")?, record_of(s)?)))
            .collect())
    }

    /// Checks a token; on success returns its Secret (for the consume step).
    async fn check(
        &self,
        token: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
    ) -> Result<Result<Secret, TokenError>, StoreError> {
        let Some((id, secret)) = split_token(token) else {
            return Ok(Err(TokenError::Invalid));
        };
        let Some(s) = bounded(CALL, self.secrets.get_opt(&Self::token_name(id)))
            .await
            .map_err(kube_err)?
        else {
            return Ok(Err(TokenError::Invalid));
        };
        let Some(rec) = record_of(&s) else {
            warn!(secret = ?s.metadata.name, "malformed join-token Secret");
            return Ok(Err(TokenError::Invalid));
        };
        if let Err(e) = rec.admit(secret, node, site, now) {
            return Ok(Err(e));
        }
        Ok(Ok(s))
    }

    /// Marks a single-use token used, or adds `node` to a fleet token's nodes. A concurrent use
    /// (the Secret changed since it was read) fails with [`TokenError::AlreadyUsed`].
    async fn consume(
        &self,
        mut s: Secret,
        node: &str,
        now: SystemTime,
    ) -> Result<Result<(), TokenError>, StoreError> {
        let Some(name) = s.metadata.name.clone() else {
            return Ok(Err(TokenError::Invalid));
        };
        let used_by = record_of(&s).filter(|r| r.pool.is_some()).map(|mut r| {
            r.consume(node, now);
            r.used_by.join(",")
        });
        let data = s.data.get_or_insert_with(BTreeMap::new);
        data.insert(
            "used-at".into(),
            ByteString(super::rfc3339(now).into_bytes()),
        );
        if let Some(u) = used_by {
            data.insert("used-by".into(), ByteString(u.into_bytes()));
        }
        match bounded(
            CALL,
            self.secrets.replace(&name, &PostParams::default(), &s),
        )
        .await
        {
            Ok(_) => Ok(Ok(())),
            Err(e) if e.status() == Some(409) => Ok(Err(TokenError::AlreadyUsed)),
            Err(e) => Err(kube_err(e)),
        }
    }

    /// The synchronous redeem of [`crate::pki_store::TokenStore`]: call from a blocking thread
    /// (`spawn_blocking`), never from async code.
    pub fn redeem_blocking<T, E: From<TokenError> + From<StoreError>>(
        &self,
        token: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
        issue: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        let secret = self.handle.block_on(self.check(token, node, site, now))??;
        let record = record_of(&secret);
        let consumed = record.as_ref().is_none_or(|r| r.consumed_by_use());
        let fleet = record.as_ref().is_some_and(|r| r.pool.is_some());
        let issued = issue()?;
        if consumed {
            let mut secret = secret;
            // A fleet token is shared by many nodes enrolling at once: a conflicting write is
            // another node's use, so re-read and check again; a node token's conflict is a
            // second use of the same token.
            for attempt in 0..5 {
                match self.handle.block_on(self.consume(secret, node, now))? {
                    Ok(()) => break,
                    Err(TokenError::AlreadyUsed) if fleet && attempt < 4 => {
                        secret = self.handle.block_on(self.check(token, node, site, now))??;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(issued)
    }

    pub fn create_blocking(
        &self,
        node: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        self.handle
            .block_on(self.create_token(node, ttl, single_use, now))
    }

    pub fn list_blocking(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        self.handle.block_on(self.list_tokens())
    }
}

/// The revocation list's Secret (see [`crate::revocation`]): next to the CA, one JSON document
/// under [`REVOCATIONS_KEY`]. A Secret rather than a ConfigMap because the hub's Role already
/// covers Secrets in its namespace; nothing in it is secret.
pub const REVOCATIONS_SECRET: &str = "petrel-revocations";
pub const REVOCATIONS_KEY: &str = "revocations.json";
const REVOCATIONS_TYPE: &str = "petrel.io/revocations";

impl KubeStore {
    fn revocations_origin(&self) -> std::path::PathBuf {
        std::path::PathBuf::from(format!("Secret {}/{REVOCATIONS_SECRET}", self.namespace))
    }

    /// The revocation list (empty when the Secret does not exist).
    pub async fn load_revocations(&self) -> Result<crate::revocation::RevocationList, StoreError> {
        Ok(self.read_revocations().await?.0)
    }

    async fn read_revocations(
        &self,
    ) -> Result<(crate::revocation::RevocationList, Option<Secret>), StoreError> {
        let s = bounded(CALL, self.secrets.get_opt(REVOCATIONS_SECRET))
            .await
            .map_err(kube_err)?;
        let Some(s) = s else {
            return Ok((Default::default(), None));
        };
        let list = match s.data.as_ref().and_then(|d| d.get(REVOCATIONS_KEY)) {
            Some(b) => crate::revocation::parse(&b.0, &self.revocations_origin())?,
            None => Default::default(),
        };
        Ok((list, Some(s)))
    }

    /// Read-modify-write of the list, with the Secret's resourceVersion as precondition (two
    /// `revoke` commands at once both land).
    pub async fn update_revocations<T>(
        &self,
        mut f: impl FnMut(&mut crate::revocation::RevocationList) -> T,
    ) -> Result<(T, crate::revocation::RevocationList), StoreError> {
        for _ in 0..5 {
            let (mut list, existing) = self.read_revocations().await?;
            let out = f(&mut list);
            let data = BTreeMap::from([(
                REVOCATIONS_KEY.to_string(),
                ByteString(crate::revocation::encode(&list)),
            )]);
            let result = match existing {
                Some(mut s) => {
                    s.data = Some(data);
                    bounded(
                        CALL,
                        self.secrets
                            .replace(REVOCATIONS_SECRET, &PostParams::default(), &s),
                    )
                    .await
                }
                None => {
                    let s = Secret {
                        metadata: ObjectMeta {
                            name: Some(REVOCATIONS_SECRET.into()),
                            namespace: Some(self.namespace.clone()),
                            labels: Some(BTreeMap::from([(
                                "app.kubernetes.io/name".to_string(),
                                "petrel".to_string(),
                            )])),
                            ..Default::default()
                        },
                        type_: Some(REVOCATIONS_TYPE.into()),
                        data: Some(data),
                        ..Default::default()
                    };
                    bounded(CALL, self.secrets.create(&PostParams::default(), &s)).await
                }
            };
            match result {
                Ok(_) => return Ok((out, list)),
                Err(e) if e.status() == Some(409) => continue,
                Err(e) => return Err(kube_err(e)),
            }
        }
        Err(StoreError::Kube(format!(
            "Secret {}/{REVOCATIONS_SECRET} kept changing; try again",
            self.namespace
        )))
    }
}

/// What a token Secret is bound to.
enum TokenKind {
    Node { node: String, single_use: bool },
    Fleet { pool: String, max_uses: u32 },
}
