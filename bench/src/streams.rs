//! The egress proxy's streams (HTTP CONNECT over the hub's Unix socket, one QUIC stream per
//! connection to the agent): setup time, throughput, many concurrent streams, head-of-line
//! isolation. Targets are small servers in an edge pod, run by `petrel-loadgen targets` inside
//! the pod's namespace; they and the CONNECT client are `petrel_e2e::egress_streams`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use petrel_e2e::egress_streams::{connect_via, rt, stream_throughput, PORT_SINK, PORT_SOURCE};
use petrel_e2e::lab::spawn_in_netns;
use petrel_e2e::measure::StopFlag;

use super::util::Latency;

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
