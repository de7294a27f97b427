//! The hub's CA and token store ([`HubStore`]): the state directory ([`StateDir`], file mode) or
//! Secrets in the cluster ([`KubeStore`], Kubernetes mode), behind the same [`CaStore`] and
//! [`TokenStore`] traits. Its own module so that neither backend knows the other: `pki_store`
//! (the traits and the file backend) sits below `k8s::pki`, and this sits above both.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use petrel_transport::pki::CertificateAuthority;

use crate::k8s::pki::KubeStore;
use crate::pki_store::{
    CaStore, NewToken, StateDir, StoreError, TokenError, TokenRecord, TokenStore,
};
use crate::revocation::{FileRevocations, RevocationList};

/// Where a hub keeps its CA and join tokens: the state directory, or Secrets in the cluster.
#[derive(Debug, Clone)]
pub enum HubStore {
    Dir(StateDir),
    /// The CA must have been loaded with [`crate::k8s::pki::KubeStore::load_or_create_ca`].
    Kube(Box<KubeStore>),
}

impl CaStore for HubStore {
    fn load_or_create(&self, now: SystemTime) -> Result<CertificateAuthority, StoreError> {
        match self {
            HubStore::Dir(d) => d.load_or_create(now),
            HubStore::Kube(k) => k.loaded_ca(),
        }
    }
}

impl TokenStore for HubStore {
    fn create(
        &self,
        node: &str,
        ttl: Duration,
        single_use: bool,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        match self {
            HubStore::Dir(d) => d.create(node, ttl, single_use, now),
            HubStore::Kube(k) => k.create_blocking(node, ttl, single_use, now),
        }
    }

    fn create_fleet(
        &self,
        pool: &str,
        ttl: Duration,
        max_uses: u32,
        now: SystemTime,
    ) -> Result<NewToken, StoreError> {
        match self {
            HubStore::Dir(d) => d.create_fleet(pool, ttl, max_uses, now),
            HubStore::Kube(k) => k
                .handle()
                .block_on(k.create_fleet_token(pool, ttl, max_uses, now)),
        }
    }

    fn redeem<T, E: From<TokenError> + From<StoreError>>(
        &self,
        token: &str,
        node: &str,
        site: Option<&str>,
        now: SystemTime,
        issue: impl FnOnce() -> Result<T, E>,
    ) -> Result<T, E> {
        match self {
            HubStore::Dir(d) => d.redeem(token, node, site, now, issue),
            HubStore::Kube(k) => k.redeem_blocking(token, node, site, now, issue),
        }
    }

    fn list(&self) -> Result<BTreeMap<String, TokenRecord>, StoreError> {
        match self {
            HubStore::Dir(d) => d.list(),
            HubStore::Kube(k) => k.list_blocking(),
        }
    }
}

impl HubStore {
    /// Reads the revocation list from wherever this store keeps it (see [`crate::revocation`]).
    pub async fn load_revocations(&self) -> Result<RevocationList, StoreError> {
        match self {
            HubStore::Dir(d) => {
                let f = FileRevocations::new(d.path());
                tokio::task::spawn_blocking(move || f.load())
                    .await
                    .map_err(|e| StoreError::Kube(format!("revocation read task failed: {e}")))?
            }
            HubStore::Kube(k) => k.load_revocations().await,
        }
    }
}
