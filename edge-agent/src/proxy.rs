//! Proxied streams: the hub opens one QUIC bidirectional stream per TCP connection the API
//! server asked for; the agent reads the `StreamOpen` header, dials the target if it lies inside
//! its own site, answers with a `StreamResult`, and then copies bytes both ways with half-close.
//!
//! Not built yet: every stream is refused with `NotAllowed` so the hub gets a clear answer.

use std::sync::Arc;

use petrel_proto::{DialError, DialErrorCode, StreamResult};

use crate::agent::AgentShared;

pub async fn serve_stream(
    _shared: Arc<AgentShared>,
    mut send: quinn::SendStream,
    _recv: quinn::RecvStream,
) {
    let mut buf = Vec::new();
    let refusal = StreamResult {
        result: Err(DialError {
            code: DialErrorCode::NotAllowed,
            message: "this agent does not serve proxied streams yet".into(),
        }),
    };
    if petrel_proto::encode_stream_result(&refusal, &mut buf).is_ok() {
        let _ = send.write_all(&buf).await;
    }
    let _ = send.finish();
}
