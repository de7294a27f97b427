//! Peeking the server name of a TLS ClientHello, sans-IO and bounded, for the passthrough
//! listener: the hub reads the first TLS records, finds the SNI (the node name), and forwards
//! the bytes it read unchanged. It never terminates TLS: the kubelet's certificate and the API
//! server's client identity pass end to end.

/// Most handshake bytes collected for one ClientHello (they can span several records).
pub const MAX_CLIENT_HELLO: usize = 16 * 1024;
/// Most bytes read from the client while looking for its ClientHello.
pub const MAX_PEEK: usize = MAX_CLIENT_HELLO + 64 * 5;

const RECORD_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;

/// Why no server name could be taken from the first bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SniError {
    #[error("not a TLS handshake")]
    NotTls,
    #[error("ClientHello larger than {MAX_CLIENT_HELLO} bytes")]
    TooLong,
    #[error("malformed ClientHello: {0}")]
    Malformed(&'static str),
    #[error("the ClientHello has no server name (SNI)")]
    NoServerName,
}

struct Cursor<'a> {
    buf: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], SniError> {
        if self.buf.len() < n {
            return Err(SniError::Malformed(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn u8(&mut self, what: &'static str) -> Result<usize, SniError> {
        Ok(usize::from(
            self.take(1, what)?.first().copied().unwrap_or(0),
        ))
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, SniError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([
            b.first().copied().unwrap_or(0),
            b.get(1).copied().unwrap_or(0),
        ])))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u8(what)?;
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], SniError> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

/// Looks for the server name in the first bytes of a TLS connection: `Ok(None)` until the
/// whole ClientHello has arrived, then the lowercase host name (trailing dot removed).
pub fn peek_server_name(buf: &[u8]) -> Result<Option<String>, SniError> {
    let mut handshake: Vec<u8> = Vec::new();
    let mut pos = 0usize;
    loop {
        let Some(header) = buf.get(pos..pos + 5) else {
            if buf.len() > MAX_PEEK {
                return Err(SniError::TooLong);
            }
            if buf.first().is_some_and(|&b| b != RECORD_HANDSHAKE) {
                return Err(SniError::NotTls);
            }
            return Ok(None);
        };
        if header.first() != Some(&RECORD_HANDSHAKE) || header.get(1) != Some(&3) {
            return Err(if pos == 0 {
                SniError::NotTls
            } else {
                SniError::Malformed("record after the first is not a handshake record")
            });
        }
        let len = usize::from(u16::from_be_bytes([
            header.get(3).copied().unwrap_or(0),
            header.get(4).copied().unwrap_or(0),
        ]));
        if len == 0 || len > 16_384 {
            return Err(SniError::Malformed("bad record length"));
        }
        let Some(body) = buf.get(pos + 5..pos + 5 + len) else {
            if buf.len() > MAX_PEEK {
                return Err(SniError::TooLong);
            }
            return Ok(None);
        };
        if handshake.len() + body.len() > MAX_CLIENT_HELLO + 4 {
            return Err(SniError::TooLong);
        }
        handshake.extend_from_slice(body);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake.first() != Some(&HANDSHAKE_CLIENT_HELLO) {
                return Err(SniError::Malformed(
                    "first handshake message is not a ClientHello",
                ));
            }
            let hlen = (usize::from(handshake.get(1).copied().unwrap_or(0)) << 16)
                | (usize::from(handshake.get(2).copied().unwrap_or(0)) << 8)
                | usize::from(handshake.get(3).copied().unwrap_or(0));
            if hlen > MAX_CLIENT_HELLO {
                return Err(SniError::TooLong);
            }
            if let Some(hello) = handshake.get(4..4 + hlen) {
                return parse_hello(hello).map(Some);
            }
        }
        if pos > MAX_PEEK {
            return Err(SniError::TooLong);
        }
    }
}

fn parse_hello(hello: &[u8]) -> Result<String, SniError> {
    let c = &mut Cursor { buf: hello };
    c.take(2, "version")?;
    c.take(32, "random")?;
    c.vec8("session id")?;
    c.vec16("cipher suites")?;
    c.vec8("compression methods")?;
    if c.buf.is_empty() {
        return Err(SniError::NoServerName);
    }
    let exts = &mut Cursor {
        buf: c.vec16("extensions")?,
    };
    while !exts.buf.is_empty() {
        let kind = exts.u16("extension type")?;
        let data = exts.vec16("extension data")?;
        if kind != usize::from(EXT_SERVER_NAME) {
            continue;
        }
        let list = &mut Cursor {
            buf: Cursor { buf: data }.vec16("server name list")?,
        };
        while !list.buf.is_empty() {
            let name_type = list.u8("server name type")?;
            let name = list.vec16("server name")?;
            if name_type != 0 {
                continue;
            }
            let name = std::str::from_utf8(name)
                .map_err(|_| SniError::Malformed("server name is not ASCII"))?;
            let name = name.trim_end_matches('.');
            let valid = !name.is_empty()
                && name.len() <= 253
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
            if !valid {
                return Err(SniError::Malformed("server name is not a DNS name"));
            }
            return Ok(name.to_ascii_lowercase());
        }
        return Err(SniError::NoServerName);
    }
    Err(SniError::NoServerName)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::sync::Arc;

    fn client_hello(name: &str) -> Vec<u8> {
        petrel_transport::tls::install_default_provider();
        let roots = rustls::RootCertStore::empty();
        let cfg =
            rustls::ClientConfig::builder_with_provider(petrel_transport::tls::crypto_provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
        let server = rustls_pki_types::ServerName::try_from(name.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), server).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn real_client_hello_yields_the_node_name() {
        let hello = client_hello("Edge-A1");
        assert_eq!(peek_server_name(&hello).unwrap(), Some("edge-a1".into()));
        for cut in 0..hello.len() {
            assert_eq!(peek_server_name(&hello[..cut]).unwrap(), None, "cut {cut}");
        }
        // Split into two records: still found.
        let body = &hello[5..];
        let (a, b) = body.split_at(40);
        let mut two = vec![22, 3, 1];
        two.extend_from_slice(&u16::try_from(a.len()).unwrap().to_be_bytes());
        two.extend_from_slice(a);
        two.extend_from_slice(&[22, 3, 1]);
        two.extend_from_slice(&u16::try_from(b.len()).unwrap().to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(peek_server_name(&two).unwrap(), Some("edge-a1".into()));
    }

    #[test]
    fn no_sni_and_garbage() {
        // An IP literal: rustls sends no SNI.
        let hello = client_hello("10.0.1.2");
        assert_eq!(peek_server_name(&hello), Err(SniError::NoServerName));
        assert_eq!(
            peek_server_name(b"GET / HTTP/1.1\r\n"),
            Err(SniError::NotTls)
        );
        assert_eq!(
            peek_server_name(&[22, 3, 1, 0, 0]),
            Err(SniError::Malformed("bad record length"))
        );
        // A handshake that claims to be enormous is refused before it is collected.
        let mut big = vec![22, 3, 1, 0x40, 0x00, 1, 0xff, 0xff, 0xff];
        big.resize(5 + 0x4000, 0);
        assert_eq!(peek_server_name(&big), Err(SniError::TooLong));
        // Endless small records.
        let mut endless = Vec::new();
        while endless.len() <= MAX_PEEK + 10 {
            endless.extend_from_slice(&[22, 3, 1, 0, 1, 1]);
        }
        assert!(peek_server_name(&endless).is_err());
    }
}

#[cfg(test)]
#[path = "sni_tests.rs"]
mod mutant_tests;
