//! Streams through the hub's egress proxy, the client side and the far end: small target
//! servers in an edge pod (hello/echo, sink, source; `petrel-loadgen targets` serves them from
//! inside the pod's namespace), an HTTP CONNECT client over the hub's Unix socket, and one
//! stream's throughput. The fault tests (`e2e/tests/faults.rs`) and the bench's stream and WAN
//! rows (`bench/src/streams.rs`, `bench/src/lib.rs`) both drive them.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpListener, UnixStream};

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

/// The runtime the stream clients run on (two workers).
pub fn rt() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?)
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
