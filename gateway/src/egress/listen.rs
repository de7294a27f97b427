//! The egress listeners: CONNECT over a Unix socket and over mutual TLS, SNI passthrough, and
//! Host-routed plain HTTP; each accepted connection goes to its handler in [`super::handle`]. Every listener binds before any
//! serves (so a bad address fails start-up), accept loops race shutdown, every connection runs
//! in its own task and tracing span, and the number handled at once is bounded.

use std::net::SocketAddr;
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::OwnedSemaphorePermit;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn, Instrument};

use super::handle::{handle_connect, handle_http, handle_sni, read_head, reply_error};
use super::http::{self};
use super::identity;
use super::{Egress, EgressError, EgressTlsError};

/// Binds every configured listener, then serves them until `shutdown`.
pub(super) async fn serve(eg: Arc<Egress>, shutdown: CancellationToken) -> Result<(), EgressError> {
    let cfg = eg.config().clone();
    let mut tasks = JoinSet::new();
    let mut uds_path = None;
    if let Some(path) = &cfg.uds {
        let listener = bind_uds(path, cfg.uds_mode)?;
        info!(path = %path.display(), mode = format!("{:04o}", cfg.uds_mode), "egress CONNECT listening on unix socket");
        uds_path = Some(path.clone());
        tasks.spawn(accept_uds(eg.clone(), listener, shutdown.clone()));
    }
    if let Some(tls) = &cfg.tls {
        let acceptor = tls_acceptor(&tls.cert, &tls.key, &tls.client_ca)?;
        let petrel = identity::PetrelIssued::new(&eg.parts.petrel_ca_der)
            .map_err(EgressTlsError::PetrelCa)?;
        let listener = bind_tcp("egress-listen", tls.listen).await?;
        info!(listen = %local(&listener), client_ca = %tls.client_ca.display(), clients = ?tls.client_names, "egress CONNECT listening with mutual TLS");
        tasks.spawn(accept_tls(
            eg.clone(),
            listener,
            acceptor,
            Arc::new(petrel),
            shutdown.clone(),
        ));
    }
    if let Some(addr) = cfg.sni_listen {
        let listener = bind_tcp("egress-sni-listen", addr).await?;
        info!(listen = %local(&listener), "egress TLS passthrough listening (routes by SNI)");
        tasks.spawn(accept_tcp(
            eg.clone(),
            listener,
            Kind::Sni,
            shutdown.clone(),
        ));
    }
    if let Some(addr) = cfg.http_listen {
        let listener = bind_tcp("egress-http-listen", addr).await?;
        info!(listen = %local(&listener), port = cfg.http_port, "egress plain HTTP listening (routes by Host)");
        tasks.spawn(accept_tcp(
            eg.clone(),
            listener,
            Kind::Http,
            shutdown.clone(),
        ));
    }
    while tasks.join_next().await.is_some() {}
    if let Some(p) = uds_path {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

async fn bind_tcp(what: &'static str, addr: SocketAddr) -> Result<TcpListener, EgressError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| EgressError::Listen {
            what,
            addr: addr.to_string(),
            source,
        })
}

/// Binds the socket under a temporary name, sets its mode, then renames it into place, so it
/// is never reachable with looser permissions. A stale socket at `path` is replaced; any other
/// kind of file there is an error.
fn bind_uds(path: &FsPath, mode: u32) -> Result<UnixListener, EgressError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = |source| EgressError::Listen {
        what: "egress-uds",
        addr: path.display().to_string(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "exists and is not a socket",
            )));
        }
    }
    let mut tmp = PathBuf::from(path);
    tmp.set_file_name(format!(
        ".{}.{}.tmp",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)?;
    Ok(listener)
}

fn tls_acceptor(
    cert: &FsPath,
    key: &FsPath,
    client_ca: &FsPath,
) -> Result<tokio_rustls::TlsAcceptor, EgressTlsError> {
    let pem = |field: &'static str, p: &FsPath| {
        let path = p.to_path_buf();
        move |source| EgressTlsError::Pem {
            field,
            path,
            source,
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(pem("egress-tls-cert", cert))?
        .collect::<Result<_, _>>()
        .map_err(pem("egress-tls-cert", cert))?;
    if chain.is_empty() {
        return Err(EgressTlsError::Empty {
            field: "egress-tls-cert",
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(pem("egress-tls-key", key))?;
    let mut roots = rustls::RootCertStore::empty();
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(client_ca)
        .map_err(pem("egress-client-ca", client_ca))?
        .collect::<Result<_, _>>()
        .map_err(pem("egress-client-ca", client_ca))?;
    for ca in cas {
        roots.add(ca).map_err(|source| EgressTlsError::ClientCa {
            path: client_ca.to_path_buf(),
            source,
        })?;
    }
    if roots.is_empty() {
        return Err(EgressTlsError::Empty {
            field: "egress-client-ca",
            path: client_ca.to_path_buf(),
            what: "CA certificate",
        });
    }
    let provider = petrel_transport::tls::crypto_provider();
    // A client certificate is required: no `allow_unauthenticated`.
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(EgressTlsError::Provider)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key_der)
        .map_err(EgressTlsError::KeyPair)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Which connection budget a listener draws from. The API server's listeners (Unix socket, and
/// mutual TLS once the client is authenticated) never share one with listeners anyone can
/// reach, so a flood there cannot lock the API server out.
#[derive(Debug, Clone, Copy)]
enum Pool {
    /// Unix socket and authenticated mutual-TLS connections (egress-max-connections).
    Api,
    /// Mutual-TLS handshakes in progress (egress-max-tls-handshakes).
    TlsHandshake,
    /// SNI passthrough and Host-routed HTTP (egress-max-unauthenticated).
    Unauthenticated,
}

/// A connection's place in its pool, released on drop: the pool's slot and, for the API
/// server's listeners, the descriptor of its client socket.
pub(super) struct Slot {
    _connection: OwnedSemaphorePermit,
    _descriptor: Option<OwnedSemaphorePermit>,
}

/// A connection slot from `pool`, or `None` when it is full (counted, and logged within the
/// log budget: anyone can fill the unauthenticated pools).
fn slot(eg: &Egress, listener: &'static str, pool: Pool) -> Option<Slot> {
    let (sem, flag, max) = match pool {
        Pool::Api => (
            &eg.connections,
            "egress-max-connections",
            eg.cfg.max_connections,
        ),
        Pool::TlsHandshake => (
            &eg.tls_handshakes,
            "egress-max-tls-handshakes",
            eg.cfg.max_tls_handshakes,
        ),
        Pool::Unauthenticated => (
            &eg.unauthenticated,
            "egress-max-unauthenticated",
            eg.cfg.max_unauthenticated,
        ),
    };
    let refused = |flag: &str, max: usize| {
        eg.parts.metrics.request(listener, "too_many_connections");
        if eg.parts.log_budget.allow("egress connection refused") {
            warn!(
                listener,
                max, "egress connection refused: too many connections ({flag})"
            );
        }
        None
    };
    let Ok(connection) = sem.clone().try_acquire_owned() else {
        return refused(flag, max);
    };
    let descriptor = match pool {
        Pool::Api => match eg.api_descriptors.clone().try_acquire_owned() {
            Ok(d) => Some(d),
            // Direct dials hold the rest: the open-file limit, not the connection cap.
            Err(_) => return refused("open-file limit", eg.cfg.api_descriptors),
        },
        Pool::TlsHandshake | Pool::Unauthenticated => None,
    };
    Some(Slot {
        _connection: connection,
        _descriptor: descriptor,
    })
}

/// Waits after a failed `accept` (typically out of file descriptors), doubling from 50 ms up
/// to 2 s while failures repeat, so a listener neither spins nor floods the log.
struct AcceptBackoff {
    next: std::time::Duration,
}

impl AcceptBackoff {
    const FIRST: std::time::Duration = std::time::Duration::from_millis(50);
    const MAX: std::time::Duration = std::time::Duration::from_secs(2);

    fn new() -> Self {
        Self { next: Self::FIRST }
    }

    async fn failed(&mut self, eg: &Egress, listener: &'static str, e: &std::io::Error) {
        eg.parts.metrics.request(listener, "accept_failed");
        if eg.parts.log_budget.allow("egress accept failed") {
            warn!(listener, error = %e, retry_in = ?self.next, "egress accept failed");
        }
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Self::MAX);
    }

    fn succeeded(&mut self) {
        self.next = Self::FIRST;
    }
}

async fn accept_uds(eg: Arc<Egress>, listener: UnixListener, shutdown: CancellationToken) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let stream = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => { backoff.succeeded(); s }
                Err(e) => { backoff.failed(&eg, "uds", &e).await; continue; }
            },
        };
        let Some(permit) = slot(&eg, "uds", Pool::Api) else {
            drop(stream);
            continue;
        };
        let id = eg.next_id();
        let peer = stream
            .peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .map(|p| format!("pid {p}"))
            .unwrap_or_else(|| "unix".into());
        let span = tracing::info_span!("egress", id, listener = "uds", peer = %peer);
        let eg = eg.clone();
        tokio::spawn(
            async move {
                handle_connect(&eg, stream, "uds").await;
                drop(permit);
            }
            .instrument(span),
        );
    }
}

/// Classifies a failed TLS handshake for the log and the metric, on rustls's error variants
/// (tokio-rustls wraps them in the `io::Error`).
fn tls_failure(e: &std::io::Error) -> &'static str {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::NoCertificatesPresented) => "tls_no_client_cert",
        Some(rustls::Error::InvalidCertificate(_)) => "tls_bad_client_cert",
        _ => "tls_error",
    }
}

async fn accept_tls(
    eg: Arc<Egress>,
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    petrel: Arc<identity::PetrelIssued>,
    shutdown: CancellationToken,
) {
    let mut backoff = AcceptBackoff::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => { backoff.succeeded(); v }
                Err(e) => { backoff.failed(&eg, "tcp", &e).await; continue; }
            },
        };
        // Until its certificate is verified and its name allowed, a TLS client holds a
        // handshake slot, not one of the API server's.
        let Some(handshake_slot) = slot(&eg, "tcp", Pool::TlsHandshake) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let id = eg.next_id();
        let span = tracing::info_span!("egress", id, listener = "tcp", peer = %peer, client = tracing::field::Empty);
        let eg = eg.clone();
        let acceptor = acceptor.clone();
        let petrel = petrel.clone();
        tokio::spawn(
            async move {
                let timeout = eg.cfg.request_timeout;
                match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                    Ok(Ok(mut tls)) => {
                        drop(handshake_slot);
                        let allowed = eg
                            .cfg
                            .tls
                            .as_ref()
                            .map(|t| t.client_names.as_slice())
                            .unwrap_or_default();
                        let chain = tls
                            .get_ref()
                            .1
                            .peer_certificates()
                            .map(<[_]>::to_vec)
                            .unwrap_or_default();
                        match identity::check_client(&chain, allowed, Some(&petrel)) {
                            Ok(client) => {
                                tracing::Span::current().record("client", client.as_str());
                                let Some(permit) = slot(&eg, "tcp", Pool::Api) else {
                                    let r = super::Refusal::new(
                                        503,
                                        "too_many_connections",
                                        "too many egress connections (egress-max-connections)",
                                    );
                                    return reply_error(&mut tls, "tcp", &eg, &r).await;
                                };
                                handle_connect(&eg, tls, "tcp").await;
                                drop(permit);
                            }
                            Err(refusal) => {
                                // Take the request first (bounded like any head), so the client
                                // reads the 403 and its reason instead of a reset.
                                let _ = read_head(&mut tls, timeout, http::parse_connect).await;
                                let r = super::Refusal::new(
                                    403,
                                    refusal.outcome(),
                                    refusal.to_string(),
                                );
                                reply_error(&mut tls, "tcp", &eg, &r).await;
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        let outcome = tls_failure(&e);
                        eg.parts.metrics.request("tcp", outcome);
                        info!(outcome, "egress TLS handshake refused: {e}");
                    }
                    Err(_) => {
                        eg.parts.metrics.request("tcp", "timeout");
                        info!("egress TLS handshake not finished within {timeout:?}");
                    }
                }
            }
            .instrument(span),
        );
    }
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Sni,
    Http,
}

async fn accept_tcp(
    eg: Arc<Egress>,
    listener: TcpListener,
    kind: Kind,
    shutdown: CancellationToken,
) {
    let name = match kind {
        Kind::Sni => "sni",
        Kind::Http => "http",
    };
    let mut backoff = AcceptBackoff::new();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => { backoff.succeeded(); v }
                Err(e) => { backoff.failed(&eg, name, &e).await; continue; }
            },
        };
        let Some(permit) = slot(&eg, name, Pool::Unauthenticated) else {
            drop(tcp);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let id = eg.next_id();
        let span = tracing::info_span!("egress", id, listener = name, peer = %peer);
        let eg = eg.clone();
        tokio::spawn(
            async move {
                match kind {
                    Kind::Sni => handle_sni(&eg, tcp).await,
                    Kind::Http => handle_http(&eg, tcp).await,
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
}
