//! Enrolment: one bi stream on an `petrel-enrol/1` connection carries an [`EnrolRequest`] (join
//! token, node name, CSR) and gets an [`EnrolResponse`] (the node certificate and the CA, or a
//! coded refusal with a sentence for the operator). The device's key never leaves it; the name in
//! the certificate is the one the token was bound to, checked against the inventory.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use petrel_proto::{
    CertBundle, EnrolError, EnrolErrorCode, EnrolMessage, EnrolRequest, EnrolResponse,
};
use petrel_transport::close_code;
use petrel_transport::control_stream::read_enrol_request;
use tracing::{debug, info, warn};

use super::admission::PreAuthState;
use super::memory::MemoryGate;
use super::signer::NodeSigner;
use crate::hub_store::HubStore;
use crate::inventory_store::InventoryReader;
use crate::log_budget::LogBudget;
use crate::metrics::HubMetrics;
use crate::pki_store::{StoreError, TokenError, TokenStore};
use crate::revocation::Revocations;

/// What enrolment uses of the hub: the pre-authentication budgets (an enrolling device has no
/// certificate yet), the memory gate, the token store, the revocation list, the inventory, the
/// signer, the counters and the log budget.
#[derive(Debug)]
pub struct EnrolParts {
    pub pre_auth: Arc<PreAuthState>,
    pub memory: Arc<MemoryGate>,
    pub store: HubStore,
    pub revocations: Arc<Revocations>,
    pub inventory: InventoryReader,
    pub signer: Arc<NodeSigner>,
    pub metrics: Arc<HubMetrics>,
    pub log_budget: Arc<LogBudget>,
}

/// Aborts a task when dropped (on every return path of the session).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Failure inside the token-redeem closure, mapped onto the wire code.
#[derive(Debug)]
struct Refusal(EnrolErrorCode, String);

impl From<TokenError> for Refusal {
    fn from(e: TokenError) -> Self {
        let code = match e {
            TokenError::Invalid => EnrolErrorCode::InvalidToken,
            TokenError::Expired(_) => EnrolErrorCode::ExpiredToken,
            TokenError::AlreadyUsed => EnrolErrorCode::TokenAlreadyUsed,
            TokenError::WrongNode { .. } | TokenError::WrongPool { .. } => {
                EnrolErrorCode::WrongNode
            }
            TokenError::NodeAlreadyEnrolled(_) | TokenError::UsedUp(_) => {
                EnrolErrorCode::TokenAlreadyUsed
            }
        };
        Refusal(code, e.to_string())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        Refusal(EnrolErrorCode::Internal, format!("hub storage error: {e}"))
    }
}

fn outcome_label(code: EnrolErrorCode) -> &'static str {
    match code {
        EnrolErrorCode::InvalidToken => "invalid_token",
        EnrolErrorCode::ExpiredToken => "expired_token",
        EnrolErrorCode::TokenAlreadyUsed => "token_already_used",
        EnrolErrorCode::WrongNode => "wrong_node",
        EnrolErrorCode::UnknownNode => "unknown_node",
        EnrolErrorCode::BadCsr => "bad_csr",
        EnrolErrorCode::UnsupportedVersion => "unsupported_version",
        EnrolErrorCode::Internal => "internal",
        EnrolErrorCode::Other(_) => "other",
    }
}

pub(super) async fn serve(ctx: Arc<EnrolParts>, conn: quinn::Connection) {
    let remote = conn.remote_address();
    // Nothing on this connection is authenticated until the token is: it gets one stream and a
    // tiny window (transport), a slot among few (here), a per-address attempt budget, and a
    // short deadline. Datagrams it sends are read and discarded, so they cannot pile up.
    if ctx.memory.is_over() {
        HubMetrics::inc_outcome(&ctx.metrics.enrolments, "memory_budget");
        conn.close(
            close_code::GOING_AWAY.into(),
            b"the hub is over its memory budget; retry later",
        );
        return;
    }
    let _slot = match ctx.pre_auth.enrol_slots.clone().try_acquire_owned() {
        Ok(s) => s,
        Err(_) => {
            HubMetrics::inc_outcome(&ctx.metrics.enrolments, "busy");
            conn.close(
                close_code::GOING_AWAY.into(),
                b"the hub is serving too many enrolments; retry in a few seconds",
            );
            return;
        }
    };
    if let Err(r) = ctx.pre_auth.spend_enrolment(remote.ip()) {
        HubMetrics::inc_outcome(&ctx.metrics.enrolments, r.label());
        conn.close(
            close_code::GOING_AWAY.into(),
            b"too many enrolment attempts from this address; retry later",
        );
        return;
    }
    let deadline = ctx.pre_auth.budget.enrol_deadline;
    let exchange = async {
        let (send, mut recv) = conn.accept_bi().await?;
        let msg = read_enrol_request(&mut recv).await;
        Ok::<_, quinn::ConnectionError>((send, msg))
    };
    // An enrolling client has no use for datagrams: the first one ends the connection, so a
    // peer cannot make the hub receive more of them (quinn's datagram buffer is fixed at the
    // handshake, before the ALPN is known: the tunnels' 8 MiB). For the whole life of the
    // connection, not only while the request is read: the answer and the wait for the peer's
    // close come after.
    let watch = tokio::spawn({
        let (ctx, conn) = (ctx.clone(), conn.clone());
        async move { refuse_datagrams(&ctx.metrics, &conn).await }
    });
    let _watch = AbortOnDrop(watch);
    let outcome = tokio::time::timeout(deadline, exchange).await;
    let Ok(Ok((mut send, msg))) = outcome else {
        if matches!(
            conn.close_reason(),
            Some(quinn::ConnectionError::LocallyClosed)
        ) {
            // Closed here already (a datagram), and counted.
            return;
        }
        debug!(%remote, "enrolment connection sent no request in time");
        HubMetrics::inc_outcome(&ctx.metrics.enrolments, "no_request");
        conn.close(
            close_code::PROTOCOL_ERROR.into(),
            format!("no enrolment request within {deadline:?}").as_bytes(),
        );
        return;
    };
    let req = match msg {
        Ok(Some(EnrolMessage::Request(req))) => req,
        Ok(other) => {
            let what = if other.is_some() {
                "an enrolment response"
            } else {
                "an incomplete request"
            };
            if ctx.log_budget.allow("enrolment refused") {
                warn!(%remote, "enrolment refused: peer sent {what}");
            }
            HubMetrics::inc_outcome(&ctx.metrics.enrolments, "malformed");
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                b"expected an enrolment request",
            );
            return;
        }
        Err(e) => {
            if ctx.log_budget.allow("enrolment refused") {
                warn!(%remote, error = %e, "enrolment refused: malformed request");
            }
            HubMetrics::inc_outcome(&ctx.metrics.enrolments, "malformed");
            conn.close(
                close_code::PROTOCOL_ERROR.into(),
                format!("malformed enrolment request: {e}").as_bytes(),
            );
            return;
        }
    };
    let node = req.node_name.clone();
    let ctx2 = ctx.clone();
    let result = tokio::task::spawn_blocking(move || decide(&ctx2, &req))
        .await
        .unwrap_or_else(|e| {
            Err(Refusal(
                EnrolErrorCode::Internal,
                format!("enrolment task failed: {e}"),
            ))
        });
    let response = match result {
        Ok(bundle) => {
            info!(%remote, node = %node, "enrolled node; certificate issued");
            HubMetrics::inc_outcome(&ctx.metrics.enrolments, "ok");
            EnrolResponse { result: Ok(bundle) }
        }
        Err(Refusal(code, message)) => {
            // Counted always; logged at most a few times a second, so a stream of wrong
            // tokens costs a counter, not the log.
            if ctx.log_budget.allow("enrolment refused") {
                warn!(%remote, node = %node, reason = %message, "enrolment refused");
            }
            HubMetrics::inc_outcome(&ctx.metrics.enrolments, outcome_label(code));
            EnrolResponse {
                result: Err(EnrolError { code, message }),
            }
        }
    };
    let mut buf = Vec::new();
    if let Err(e) = petrel_proto::encode_enrol_response(&response, &mut buf) {
        warn!(%remote, error = %e, "cannot encode enrolment response");
        conn.close(close_code::PROTOCOL_ERROR.into(), b"internal error");
        return;
    }
    if send.write_all(&buf).await.is_ok() {
        let _ = send.finish();
        // Let the agent read the response and close; do not hold the connection for long.
        let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
    }
    conn.close(close_code::ENROL_DONE.into(), b"enrolment finished");
}

/// The token is checked before anything about the node: a caller without a valid token learns
/// nothing about which nodes exist or where they are. The token is consumed only if the node is
/// admitted and a certificate is issued.
fn decide(ctx: &EnrolParts, req: &EnrolRequest) -> Result<CertBundle, Refusal> {
    petrel_proto::check_protocol_version(req.protocol_version)
        .map_err(|e| Refusal(EnrolErrorCode::UnsupportedVersion, e.to_string()))?;
    let now = SystemTime::now();
    // A fleet token admits nodes of its pool: the node's site, read before the token is checked
    // but only used once the token's secret matched, so it reveals nothing to a caller without
    // one.
    let inv = ctx.inventory.snapshot();
    let site = inv.node(&req.node_name).map(|n| n.site.clone());
    ctx.store
        .redeem(&req.token, &req.node_name, site.as_deref(), now, || {
            ctx.revocations
                .check_enrolment(&req.node_name)
                .map_err(|e| Refusal(EnrolErrorCode::UnknownNode, e.to_string()))?;
            inv.admit_agent(&req.node_name)
                .map_err(|e| Refusal(EnrolErrorCode::UnknownNode, e.to_string()))?;
            ctx.signer
                .bundle(&req.csr_der, &req.node_name, now)
                .map_err(|e| Refusal(EnrolErrorCode::BadCsr, e.to_string()))
        })
}

/// Ends an enrolment connection at its first datagram, counted as the `datagram` outcome.
async fn refuse_datagrams(metrics: &HubMetrics, conn: &quinn::Connection) {
    super::first_datagram(conn.clone()).await;
    HubMetrics::inc_outcome(&metrics.enrolments, "datagram");
    conn.close(
        close_code::PROTOCOL_ERROR.into(),
        b"datagrams are not allowed on an enrolment connection",
    );
}
