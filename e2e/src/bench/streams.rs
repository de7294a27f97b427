//! The egress proxy's streams (HTTP CONNECT over the hub's Unix socket, one QUIC stream per
//! connection to the agent): setup time, throughput, many concurrent streams, head-of-line
//! isolation. Targets are small servers in an edge pod, run by a tokio runtime on a thread that
//! entered the pod's namespace.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream, UnixStream};

use super::util::{Latency, StopFlag};
use crate::lab::spawn_in_netns;

/// Target ports in the edge pod.
pub const PORT_HELLO: u16 = 7101; // writes "H" on accept, then echoes
pub const PORT_SINK: u16 = 7102; // reads to EOF, then writes the byte count (u64 BE)
pub const PORT_SOURCE: u16 = 7103; // writes until the peer goes away

/// Serves the three targets on `ip` until the process is killed (run by `petrel-loadgen targets`
/// inside a pod's namespace: 10,000 streams need 10,000 sockets there, more than one process may
/// hold beside the clients' under this sandbox's open-file limit).
pub async fn serve_targets(ip: Ipv4Addr) -> Result<()> {
    let bind = |p| TcpListener::bind(SocketAddrV4::new(ip, p));
    let (h, k, s) = (
        bind(PORT_HELLO).await?,
        bind(PORT_SINK).await?,
        bind(PORT_SOURCE).await?,
    );
    println!("targets listening on {ip}");
    loop {
        tokio::select! {
            r = h.accept() => if let Ok((mut c, _)) = r {
                let _ = c.set_nodelay(true);
                tokio::spawn(async move {
                    if c.write_all(b"H").await.is_err() { return; }
                    let mut b = [0u8; 256];
                    loop {
                        match c.read(&mut b).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => if c.write_all(&b[..n]).await.is_err() { return },
                        }
                    }
                });
            },
            r = k.accept() => if let Ok((mut c, _)) = r {
                tokio::spawn(async move {
                    let mut b = vec![0u8; 256 * 1024];
                    let mut total = 0u64;
                    loop {
                        match c.read(&mut b).await {
                            Ok(0) => break,
                            Ok(n) => total += n as u64,
                            Err(_) => return,
                        }
                    }
                    let _ = c.write_all(&total.to_be_bytes()).await;
                    let _ = c.shutdown().await;
                });
            },
            r = s.accept() => if let Ok((mut c, _)) = r {
                tokio::spawn(async move {
                    let b = vec![0x5au8; 256 * 1024];
                    while c.write_all(&b).await.is_ok() {}
                });
            },
        }
    }
}

/// Starts `petrel-loadgen targets` in the pod of `node` (its pod IP): the hello/echo, sink and
/// source servers the stream measurements dial. Killed when the guard drops.
pub fn target_servers(lab: &crate::lab::Lab, node: &str) -> Result<crate::lab::ChildGuard> {
    let n = lab.try_node(node)?;
    let bin = crate::procs::bin("petrel-loadgen")?;
    let mut g = lab.spawn(
        &n.pod_ns,
        &[
            &bin.display().to_string(),
            "targets",
            "--ip",
            &n.pod_ip.to_string(),
        ],
    )?;
    g.wait_for_log("targets listening", Duration::from_secs(10))?;
    Ok(g)
}

/// Opens a CONNECT tunnel to `target` through the hub's Unix socket; returns the stream after
/// the `200` (and nothing of what follows). Gives up after 30 s.
pub async fn connect_via(uds: &Path, target: SocketAddrV4) -> Result<UnixStream> {
    tokio::time::timeout(Duration::from_secs(30), connect_via_inner(uds, target))
        .await
        .map_err(|_| anyhow!("CONNECT {target}: no answer within 30 s"))?
}

async fn connect_via_inner(uds: &Path, target: SocketAddrV4) -> Result<UnixStream> {
    let mut s = UnixStream::connect(uds)
        .await
        .with_context(|| format!("connecting to {}", uds.display()))?;
    s.write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n").as_bytes())
        .await?;
    // Read the response head byte by byte: nothing after it may be consumed.
    let mut head = Vec::with_capacity(128);
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).await? == 0 {
            bail!(
                "proxy closed during the response head: {:?}",
                String::from_utf8_lossy(&head)
            );
        }
        head.push(b[0]);
        if head.len() > 8192 {
            bail!("response head too long");
        }
    }
    let line = String::from_utf8_lossy(&head);
    if !line.starts_with("HTTP/1.1 200") && !line.starts_with("HTTP/1.0 200") {
        bail!(
            "CONNECT {target}: {}",
            line.lines().next().unwrap_or_default()
        );
    }
    Ok(s)
}

async fn first_byte<S: AsyncRead + Unpin>(s: &mut S) -> Result<()> {
    let mut b = [0u8; 1];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .map_err(|_| anyhow!("no first byte within 10 s"))??;
    if b[0] != b'H' {
        bail!("unexpected first byte {}", b[0]);
    }
    Ok(())
}

/// Setup time to first byte, through the proxy and by a direct TCP connect from `direct_ns`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Setup {
    pub connect_via_proxy: Latency,
    pub direct_tcp: Latency,
    pub direct_from: String,
}

pub fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
}

/// `n` sequential CONNECT-to-first-byte times.
pub fn setup_via_proxy(uds: &Path, target: SocketAddrV4, n: usize) -> Result<Latency> {
    let uds = uds.to_path_buf();
    rt()?.block_on(async move {
        let mut v = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            let mut s = connect_via(&uds, target).await?;
            first_byte(&mut s).await?;
            v.push(t.elapsed());
        }
        Ok(Latency::of(&v))
    })
}

/// `n` sequential direct TCP connect-to-first-byte times from namespace `ns`.
pub fn setup_direct(ns: &str, target: SocketAddrV4, n: usize) -> Result<Latency> {
    spawn_in_netns(ns, "direct connects", move || {
        rt()?.block_on(async move {
            let mut v = Vec::with_capacity(n);
            for _ in 0..n {
                let t = Instant::now();
                let mut s = tokio::time::timeout(
                    Duration::from_secs(5),
                    TcpStream::connect(SocketAddr::V4(target)),
                )
                .await
                .map_err(|_| anyhow!("direct connect timed out"))??;
                first_byte(&mut s).await?;
                v.push(t.elapsed());
            }
            Ok(Latency::of(&v))
        })
    })?
    .wait(Duration::from_secs(60 + n as u64 / 10))
}

/// Throughput of one stream for `secs`: writing to the sink (`to_target`) or reading from the
/// source. Mbit/s.
pub async fn stream_throughput<S: AsyncRead + AsyncWrite + Unpin>(
    mut s: S,
    to_target: bool,
    secs: f64,
) -> Result<f64> {
    let t = Instant::now();
    let deadline = Duration::from_secs_f64(secs);
    if to_target {
        let b = vec![0xa5u8; 256 * 1024];
        let stalled = || anyhow!("sink stalled for 30 s");
        while t.elapsed() < deadline {
            tokio::time::timeout(Duration::from_secs(30), s.write_all(&b))
                .await
                .map_err(|_| stalled())??;
        }
        tokio::time::timeout(Duration::from_secs(30), s.shutdown())
            .await
            .map_err(|_| stalled())??;
        let mut n = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(30), s.read_exact(&mut n))
            .await
            .map_err(|_| anyhow!("sink did not report its count"))??;
        Ok(u64::from_be_bytes(n) as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6)
    } else {
        let mut b = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        while t.elapsed() < deadline {
            match tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await {
                Ok(Ok(0)) => bail!("source closed"),
                Ok(Ok(n)) => total += n as u64,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => bail!("source stalled for 10 s"),
            }
        }
        Ok(total as f64 * 8.0 / t.elapsed().as_secs_f64() / 1e6)
    }
}

/// Single-stream throughput through the proxy, both directions.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SingleStream {
    pub to_target_mbit: f64,
    pub from_target_mbit: f64,
}

pub fn single_stream(uds: &Path, ip: Ipv4Addr, secs: f64) -> Result<SingleStream> {
    let uds = uds.to_path_buf();
    rt()?.block_on(async move {
        let s = connect_via(&uds, SocketAddrV4::new(ip, PORT_SINK)).await?;
        let to = stream_throughput(s, true, secs).await?;
        let s = connect_via(&uds, SocketAddrV4::new(ip, PORT_SOURCE)).await?;
        let from = stream_throughput(s, false, secs).await?;
        Ok(SingleStream {
            to_target_mbit: to,
            from_target_mbit: from,
        })
    })
}

/// Many concurrent streams on one agent.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Concurrent {
    pub streams: usize,
    pub established: usize,
    /// Streams that answered an echo while all were open.
    pub echoed: usize,
    pub success_rate: f64,
    pub open_all_s: f64,
    pub agent_rss_delta_kib: i64,
    pub hub_rss_delta_kib: i64,
    pub agent_kib_per_stream: f64,
    pub hub_kib_per_stream: f64,
    pub first_error: Option<String>,
}

/// Opens `n` streams (at most `parallel` dials at a time, below the hub's per-agent pending
/// limit), keeps them all open, echoes once on each, and reports memory of the agent and hub.
pub fn concurrent(
    uds: &Path,
    target: SocketAddrV4,
    n: usize,
    parallel: usize,
    agent_pid: u32,
    hub_pid: u32,
) -> Result<Concurrent> {
    use super::util::proc_rss_kib;
    let uds: PathBuf = uds.to_path_buf();
    let (a0, h0) = (proc_rss_kib(agent_pid) as i64, proc_rss_kib(hub_pid) as i64);
    rt()?.block_on(async move {
        let t = Instant::now();
        let sem = Arc::new(tokio::sync::Semaphore::new(parallel));
        let mut tasks = Vec::with_capacity(n);
        for _ in 0..n {
            let (uds, sem) = (uds.clone(), sem.clone());
            tasks.push(tokio::spawn(async move {
                let permit = sem.acquire_owned().await;
                let r = tokio::time::timeout(Duration::from_secs(30), async {
                    let mut s = connect_via(&uds, target).await?;
                    first_byte(&mut s).await?;
                    Ok::<_, anyhow::Error>(s)
                })
                .await
                .map_err(|_| anyhow!("stream setup timed out"))
                .and_then(|r| r);
                drop(permit);
                r
            }));
        }
        let mut open = Vec::with_capacity(n);
        let mut first_error = None;
        for t in tasks {
            match t.await {
                Ok(Ok(s)) => open.push(s),
                Ok(Err(e)) => {
                    first_error.get_or_insert(format!("{e:#}"));
                }
                Err(e) => {
                    first_error.get_or_insert(e.to_string());
                }
            }
        }
        let open_all_s = t.elapsed().as_secs_f64();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (a1, h1) = (proc_rss_kib(agent_pid) as i64, proc_rss_kib(hub_pid) as i64);
        // One echo on every open stream, all still open.
        let established = open.len();
        let mut echoes = Vec::with_capacity(established);
        for mut s in open {
            echoes.push(tokio::spawn(async move {
                let ok = tokio::time::timeout(Duration::from_secs(30), async {
                    s.write_all(b"0123456789abcdef").await?;
                    let mut b = [0u8; 16];
                    s.read_exact(&mut b).await?;
                    Ok::<_, std::io::Error>(&b == b"0123456789abcdef")
                })
                .await
                .ok()
                .and_then(|r| r.ok())
                .unwrap_or(false);
                (ok, s)
            }));
        }
        let mut echoed = 0;
        let mut keep = Vec::with_capacity(established);
        for e in echoes {
            if let Ok((ok, s)) = e.await {
                echoed += usize::from(ok);
                keep.push(s);
            }
        }
        drop(keep);
        let per = |d: i64| {
            if established > 0 {
                d as f64 / established as f64
            } else {
                0.0
            }
        };
        Ok(Concurrent {
            streams: n,
            established,
            echoed,
            success_rate: if n > 0 { echoed as f64 / n as f64 } else { 0.0 },
            open_all_s,
            agent_rss_delta_kib: a1 - a0,
            hub_rss_delta_kib: h1 - h0,
            agent_kib_per_stream: per(a1 - a0),
            hub_kib_per_stream: per(h1 - h0),
            first_error,
        })
    })
}

/// Head-of-line: a bulk stream's throughput alone and next to a stream whose reader stalls.
#[derive(Clone, Debug, Default, Serialize)]
pub struct HeadOfLine {
    pub bulk_alone_mbit: f64,
    pub bulk_with_stalled_mbit: f64,
    pub ratio: f64,
}

pub fn head_of_line(uds: &Path, ip: Ipv4Addr, secs: f64) -> Result<HeadOfLine> {
    let uds = uds.to_path_buf();
    rt()?.block_on(async move {
        let alone = {
            let s = connect_via(&uds, SocketAddrV4::new(ip, PORT_SINK)).await?;
            stream_throughput(s, true, secs).await?
        };
        // The stalled one: the target writes without end, we never read.
        let stalled = connect_via(&uds, SocketAddrV4::new(ip, PORT_SOURCE)).await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let with = {
            let s = connect_via(&uds, SocketAddrV4::new(ip, PORT_SINK)).await?;
            stream_throughput(s, true, secs).await?
        };
        drop(stalled);
        Ok(HeadOfLine {
            bulk_alone_mbit: alone,
            bulk_with_stalled_mbit: with,
            ratio: if alone > 0.0 { with / alone } else { 0.0 },
        })
    })
}

/// A direct TCP transfer for the WAN comparison, in the direction the edge can open: a client
/// in `client_ns` connects to a receiver in `server_ns` on `listen` and writes; the receiver
/// counts what arrives in `secs` after the connection is accepted. Mbit/s.
pub fn direct_tcp_upload(
    server_ns: &str,
    listen: SocketAddrV4,
    client_ns: &str,
    secs: f64,
) -> Result<f64> {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let _guard = StopFlag(stop);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    let server = spawn_in_netns(server_ns, "direct receiver", move || {
        rt()?.block_on(async move {
            let l = match TcpListener::bind(listen).await {
                Ok(l) => l,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    bail!("bind {listen}: {e}");
                }
            };
            let _ = ready_tx.send(Ok(()));
            let (c, _) = tokio::time::timeout(Duration::from_secs(15), l.accept())
                .await
                .map_err(|_| anyhow!("no connection from the edge within 15 s"))??;
            stream_throughput(c, false, secs).await
        })
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("direct receiver did not start"))?
        .map_err(|e| anyhow!("direct receiver: {e}"))?;
    spawn_in_netns(client_ns, "direct sender", move || {
        rt()?.block_on(async move {
            let mut c = tokio::time::timeout(
                Duration::from_secs(10),
                TcpStream::connect(SocketAddr::V4(listen)),
            )
            .await
            .map_err(|_| anyhow!("direct connect timed out"))??;
            let b = vec![0xa5u8; 64 * 1024];
            while !s2.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_secs(1), c.write_all(&b)).await {
                    Ok(Ok(())) | Err(_) => {}
                    Ok(Err(_)) => break,
                }
            }
            Ok(())
        })
    })?;
    server.wait(Duration::from_secs_f64(secs + 30.0))
}
