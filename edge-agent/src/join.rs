//! `petrel-edge-agent join`: make a key on this device, send a CSR with the join token over a
//! connection that trusts only the CA whose fingerprint the operator pasted, and store what comes
//! back. A refusal stores nothing.

use std::time::Duration;

use petrel_proto::{EnrolMessage, EnrolRequest, ALPN_ENROL};
use petrel_transport::control_stream::read_enrol_message;
use petrel_transport::pki::{fingerprint_sha256, CertInfo, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{quic, tls, HUB_SERVER_NAME};

use crate::config::JoinConfig;
use crate::identity::AgentState;

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("this device is already enrolled as node {0:?}; pass --force to enrol again")]
    AlreadyEnrolled(String),
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, String),
    #[error("cannot reach the hub at {addr}: {message}")]
    Connect { addr: String, message: String },
    #[error("the hub at {0} did not answer within {1:?}")]
    Timeout(String, Duration),
    #[error("the hub refused enrolment ({code:?}): {message}")]
    Refused {
        code: petrel_proto::EnrolErrorCode,
        message: String,
    },
    #[error("the hub sent an invalid answer: {0}")]
    BadAnswer(String),
    #[error(transparent)]
    Identity(#[from] crate::identity::IdentityError),
    #[error(transparent)]
    Pki(#[from] petrel_transport::pki::PkiError),
    #[error(transparent)]
    Tls(#[from] petrel_transport::tls::TlsConfigError),
}

/// How long `join` waits for the hub's first answer (the agent's default connect timeout);
/// `--timeout` bounds the whole exchange once the hub has answered.
pub const ANSWER_WITHIN: Duration = Duration::from_secs(3);

/// What a successful join produced.
#[derive(Debug)]
pub struct Joined {
    pub node_name: String,
    pub not_after: std::time::SystemTime,
    pub already: bool,
}

pub async fn join(cfg: &JoinConfig) -> Result<Joined, JoinError> {
    let state = AgentState::new(&cfg.state_dir);
    if state.is_enrolled() && !cfg.force {
        let id = state.load()?;
        if id.node_name() == cfg.node_name && fingerprint_sha256(&id.ca_der) == cfg.ca_sha256 {
            // Re-running an install is not an error.
            remember_endpoint(&state, cfg)?;
            return Ok(Joined {
                node_name: cfg.node_name.clone(),
                not_after: id.info.not_after,
                already: true,
            });
        }
        return Err(JoinError::AlreadyEnrolled(id.node_name().to_string()));
    }
    let key = NodeKey::generate()?;
    let csr = key.csr_der(&cfg.node_name)?;
    let label = format!("{}:{}", cfg.server.0, cfg.server.1);
    let bundle = tokio::time::timeout(cfg.timeout, exchange(cfg, &label, csr))
        .await
        .map_err(|_| JoinError::Timeout(label.clone(), cfg.timeout))??;
    // The hub must hand back the CA we pinned and a certificate for our key and our name.
    if fingerprint_sha256(&bundle.ca_der) != cfg.ca_sha256 {
        return Err(JoinError::BadAnswer(
            "the returned CA does not match --ca-sha256".into(),
        ));
    }
    if !key.matches(&bundle.cert_der) {
        return Err(JoinError::BadAnswer(
            "the returned certificate is not for this device's key".into(),
        ));
    }
    let info = CertInfo::parse(&bundle.cert_der)?;
    if info.node_name != cfg.node_name {
        return Err(JoinError::BadAnswer(format!(
            "the certificate names {:?}, not {:?}",
            info.node_name, cfg.node_name
        )));
    }
    state.store(&key, &bundle.cert_der, &bundle.ca_der)?;
    remember_endpoint(&state, cfg)?;
    Ok(Joined {
        node_name: info.node_name,
        not_after: info.not_after,
        already: false,
    })
}

fn remember_endpoint(state: &AgentState, cfg: &JoinConfig) -> Result<(), JoinError> {
    let mut eps = state.known_endpoints();
    eps.insert(format!("{}:{}", cfg.server.0, cfg.server.1));
    state.save_endpoints(&eps)?;
    Ok(())
}

async fn exchange(
    cfg: &JoinConfig,
    label: &str,
    csr_der: Vec<u8>,
) -> Result<petrel_proto::CertBundle, JoinError> {
    let addr = tokio::net::lookup_host((cfg.server.0.as_str(), cfg.server.1))
        .await
        .map_err(|e| JoinError::Resolve(label.to_string(), e.to_string()))?
        .next()
        .ok_or_else(|| JoinError::Resolve(label.to_string(), "no addresses".into()))?;
    let tls_cfg = tls::enrol_client_tls(&cfg.ca_sha256, ALPN_ENROL)?;
    let client = quic::client_config(tls_cfg, &TransportTuning::default())?;
    let bind = if addr.is_ipv4() {
        "0.0.0.0:0"
    } else {
        "[::]:0"
    };
    let connect_err = |message: String| JoinError::Connect {
        addr: label.to_string(),
        message,
    };
    let endpoint = quic::client_endpoint(bind.parse().map_err(|_| connect_err("bad bind".into()))?)
        .map_err(|e| connect_err(e.to_string()))?;
    let mut connecting = endpoint
        .connect_with(client, addr, HUB_SERVER_NAME)
        .map_err(|e| connect_err(e.to_string()))?;
    // A hub that is there answers its first flight at once; nothing within ANSWER_WITHIN means
    // a closed port, a firewall or a wrong address, so say so then instead of at --timeout.
    quic::await_answer(&mut connecting, ANSWER_WITHIN.min(cfg.timeout))
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let conn = connecting.await.map_err(|e| connect_err(e.to_string()))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let mut buf = Vec::new();
    let req = EnrolRequest {
        protocol_version: petrel_proto::PROTOCOL_VERSION,
        token: cfg.token.clone(),
        node_name: cfg.node_name.clone(),
        csr_der,
    };
    petrel_proto::encode_enrol_request(&req, &mut buf)
        .map_err(|e| JoinError::BadAnswer(format!("cannot encode the request: {e}")))?;
    send.write_all(&buf)
        .await
        .map_err(|e| connect_err(e.to_string()))?;
    let _ = send.finish();
    let answer = read_enrol_message(&mut recv).await;
    conn.close(0u32.into(), b"enrolment done");
    endpoint.wait_idle().await;
    match answer {
        Ok(Some(EnrolMessage::Response(resp))) => resp.result.map_err(|e| JoinError::Refused {
            code: e.code,
            message: e.message,
        }),
        Ok(Some(EnrolMessage::Request(_) | EnrolMessage::Unknown { .. })) => Err(
            JoinError::BadAnswer("the hub sent no enrolment response".into()),
        ),
        Ok(None) => Err(JoinError::BadAnswer(match conn.close_reason() {
            Some(reason) => format!("the hub closed the connection: {reason}"),
            None => "the hub closed the stream without an answer".into(),
        })),
        Err(e) => Err(JoinError::BadAnswer(e.to_string())),
    }
}
