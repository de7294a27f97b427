//! A minimal client side of the Kubernetes SPDY upgrade: send the HTTP/1.1 request with
//! `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version`, read the response head byte by byte
//! (so nothing after it is consumed), and on `101 Switching Protocols` start a client
//! [`Session`] on the same connection. Tests use it to drive the stand-in kubelet without
//! kubectl; it is also handy for driving any kubelet-like endpoint through a tunnel.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::session::{Incoming, Role, Session, SessionConfig, SessionError};

/// Most bytes accepted in a response head or an error body.
const MAX_HEAD: usize = 64 * 1024;

/// Why an upgrade did not happen.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Socket I/O failed.
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    /// The server answered with something other than 101.
    #[error("upgrade refused with HTTP {status}: {body}")]
    Refused {
        /// HTTP status.
        status: u16,
        /// Response headers (names lower-cased).
        headers: Vec<(String, String)>,
        /// Response body (at most 64 KiB).
        body: String,
    },
    /// The response could not be parsed or lacked the upgrade headers.
    #[error("bad upgrade response: {0}")]
    BadResponse(String),
    /// Starting the session failed.
    #[error(transparent)]
    Session(#[from] SessionError),
}

/// A parsed response head.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
}

impl ResponseHead {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A successful upgrade.
#[derive(Debug)]
pub struct Upgraded {
    /// The client session.
    pub session: Session,
    /// Streams the server opens (none, for exec and port-forward).
    pub incoming: Incoming,
    /// The `X-Stream-Protocol-Version` the server chose (empty if none).
    pub protocol: String,
}

/// Sends an upgrade request on `io` and starts a SPDY client session on success.
pub async fn upgrade<IO>(
    mut io: IO,
    method: &str,
    path_and_query: &str,
    host: &str,
    protocols: &[&str],
    config: SessionConfig,
) -> Result<Upgraded, UpgradeError>
where
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut req = format!(
        "{method} {path_and_query} HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: SPDY/3.1\r\n"
    );
    for p in protocols {
        req.push_str("X-Stream-Protocol-Version: ");
        req.push_str(p);
        req.push_str("\r\n");
    }
    req.push_str("Content-Length: 0\r\n\r\n");
    io.write_all(req.as_bytes()).await?;
    io.flush().await?;

    let head = read_response_head(&mut io).await?;
    if head.status != 101 {
        let body = read_body(&mut io, &head).await.unwrap_or_default();
        return Err(UpgradeError::Refused {
            status: head.status,
            headers: head.headers,
            body,
        });
    }
    let upgrade_ok = head
        .header("upgrade")
        .is_some_and(|v| v.to_ascii_lowercase().contains("spdy/3.1"));
    let conn_ok = head
        .header("connection")
        .is_some_and(|v| v.to_ascii_lowercase().contains("upgrade"));
    if !upgrade_ok || !conn_ok {
        return Err(UpgradeError::BadResponse(format!(
            "101 without SPDY upgrade headers: {:?}",
            head.headers
        )));
    }
    let protocol = head
        .header("x-stream-protocol-version")
        .unwrap_or("")
        .to_string();
    let (session, incoming) = Session::start(io, Role::Client, config)?;
    Ok(Upgraded {
        session,
        incoming,
        protocol,
    })
}

/// Reads an HTTP/1.1 response head without reading past it.
pub async fn read_response_head<IO: AsyncRead + Unpin>(
    io: &mut IO,
) -> Result<ResponseHead, UpgradeError> {
    let mut raw = Vec::with_capacity(256);
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        if raw.len() >= MAX_HEAD {
            return Err(UpgradeError::BadResponse("response head too long".into()));
        }
        let n = io.read(&mut byte).await?;
        if n == 0 {
            return Err(UpgradeError::BadResponse(
                "connection closed in response head".into(),
            ));
        }
        raw.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&raw);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(UpgradeError::BadResponse(format!(
            "status line {status_line:?}"
        )));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| UpgradeError::BadResponse(format!("status line {status_line:?}")))?;
    let headers = lines
        .filter(|l| !l.is_empty())
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(ResponseHead { status, headers })
}

async fn read_body<IO: AsyncRead + Unpin>(
    io: &mut IO,
    head: &ResponseHead,
) -> Result<String, std::io::Error> {
    let mut body = Vec::new();
    match head
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(len) => {
            let mut limited = io.take(len.min(MAX_HEAD) as u64);
            limited.read_to_end(&mut body).await?;
        }
        None => {
            let mut limited = io.take(MAX_HEAD as u64);
            limited.read_to_end(&mut body).await?;
        }
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}
