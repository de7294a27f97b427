//! A tunnel client built from the library, for tests that need to do what the real agent
//! never would: present another node's name, spoof frames, hold two sessions for one node.

use petrel_proto::{ControlMessage, Hello, ALPN_TUNNEL};
use petrel_transport::control_stream::{ControlReader, ControlWriter};
use petrel_transport::pki::{CertificateAuthority, NodeKey};
use petrel_transport::quic::TransportTuning;
use petrel_transport::{quic, tls, HUB_SERVER_NAME};

/// A session held by a test.
pub struct RawSession {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
    pub writer: ControlWriter,
    pub reader: ControlReader,
    pub first: ControlMessage,
}

pub fn hello(node: &str) -> Hello {
    Hello::tunnel(node, "test")
}

/// Connects with `cert`/`key`, says hello as `node`, and returns the hub's first answer. In TLS
/// 1.3 the client finishes its handshake before the hub has checked the client certificate, so a
/// refused certificate shows up here as the connection's close reason.
pub async fn session_as(
    server: &str,
    ca: &[u8],
    cert: &[u8],
    key: &NodeKey,
    node: &str,
) -> anyhow::Result<RawSession> {
    session_with_hello(server, ca, cert, key, hello(node)).await
}

/// [`session_as`] with a hello of the test's own (a route digest, say). A failure after the
/// handshake carries the connection's close reason (the hub's refusal) in its context.
pub async fn session_with_hello(
    server: &str,
    ca: &[u8],
    cert: &[u8],
    key: &NodeKey,
    hello: Hello,
) -> anyhow::Result<RawSession> {
    use anyhow::Context as _;
    let (endpoint, conn) = connect(server, ca, cert, key).await?;
    let why = |conn: &quinn::Connection| {
        format!(
            "close reason: {:?}",
            conn.close_reason().map(|r| r.to_string())
        )
    };
    let (send, recv) = conn.open_bi().await.with_context(|| why(&conn))?;
    let mut writer = ControlWriter::new(send);
    let mut reader = ControlReader::new(recv);
    writer
        .send(&ControlMessage::Hello(hello))
        .await
        .with_context(|| why(&conn))?;
    let first = match reader.next().await {
        Ok(Some(m)) => m,
        Ok(None) => anyhow::bail!("stream ended; {}", why(&conn)),
        Err(e) => return Err(anyhow::Error::new(e).context(why(&conn))),
    };
    Ok(RawSession {
        endpoint,
        conn,
        writer,
        reader,
        first,
    })
}

/// A tunnel connection with `cert`/`key`: the QUIC handshake only, nothing said yet.
pub async fn connect(
    server: &str,
    ca: &[u8],
    cert: &[u8],
    key: &NodeKey,
) -> anyhow::Result<(quinn::Endpoint, quinn::Connection)> {
    let cfg = tls::agent_client_tls(
        &ca.to_vec().into(),
        vec![cert.to_vec().into()],
        key.private_key_der(),
        ALPN_TUNNEL,
    )?;
    let client = quic::client_config(cfg, &TransportTuning::default())?;
    let endpoint = quic::client_endpoint("127.0.0.1:0".parse()?)?;
    let conn = endpoint
        .connect_with(client, server.parse()?, HUB_SERVER_NAME)?
        .await?;
    Ok((endpoint, conn))
}

/// The agent's check of a hub's certificate (webpki against the hub's CA, the provider the
/// agent uses), for a test or the load generator to wrap in a verifier of its own.
pub fn hub_certificate_check(
    ca_der: &rustls::pki_types::CertificateDer<'static>,
) -> anyhow::Result<std::sync::Arc<rustls::client::WebPkiServerVerifier>> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone())?;
    Ok(rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        tls::crypto_provider(),
    )
    .build()?)
}

/// The CA of a hub started by [`crate::procs::Hub`], read from its state directory, so a test can
/// mint certificates the real agent would never hold.
pub fn hub_ca(hub: &crate::procs::Hub) -> anyhow::Result<CertificateAuthority> {
    let crt = std::fs::read_to_string(hub.state_dir.join("ca.crt"))?;
    let key = std::fs::read_to_string(hub.state_dir.join("ca.key"))?;
    Ok(CertificateAuthority::from_pem(&crt, &key)?)
}

/// A certificate for `node` from `ca`, valid for a day, with a fresh key.
pub fn node_identity(ca: &CertificateAuthority, node: &str) -> anyhow::Result<(Vec<u8>, NodeKey)> {
    let key = NodeKey::generate()?;
    let now = std::time::SystemTime::now();
    let cert = ca.sign_node_csr(
        &key.csr_der(node)?,
        node,
        now,
        std::time::Duration::from_secs(86400),
    )?;
    Ok((cert.to_vec(), key))
}
