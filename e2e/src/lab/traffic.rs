//! Traffic probes, all bounded in time: ICMP via `ping`, a checksummed TCP bulk transfer and UDP
//! probes implemented in-process (sockets opened by threads that entered the namespaces), raw
//! VXLAN frames for injection tests, and interface counters.

use std::io::{ErrorKind, Read as _, Write as _};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rustix::event::{poll, PollFd, PollFlags, Timespec};
use serde::Serialize;

use super::cmd::{command, run};
use super::netns::spawn_in_netns;

/// How [`crate::lab::Lab::ping_with`] pings.
#[derive(Clone, Debug)]
pub struct PingOpts {
    /// Echo requests to send.
    pub count: u32,
    /// Interval between them.
    pub interval: Duration,
    /// How long to wait for each reply (`ping -W`).
    pub reply_timeout: Duration,
    /// ICMP payload size (`ping -s`); `None` = ping's default 56.
    pub payload: Option<u32>,
    /// Set DF and never fragment locally (`ping -M do`).
    pub dont_fragment: bool,
}

impl Default for PingOpts {
    fn default() -> Self {
        PingOpts {
            count: 3,
            interval: Duration::from_millis(200),
            reply_timeout: Duration::from_secs(1),
            payload: None,
            dont_fragment: false,
        }
    }
}

/// What `ping` reported.
#[derive(Clone, Debug, Serialize)]
pub struct PingReport {
    /// Echo requests sent.
    pub transmitted: u32,
    /// Replies received.
    pub received: u32,
    /// Average round-trip time, if any reply came back.
    pub rtt_avg_ms: Option<f64>,
    /// ping's full output (stdout and stderr), for messages.
    pub output: String,
}

impl PingReport {
    /// At least one reply.
    pub fn reachable(&self) -> bool {
        self.received > 0
    }
}

/// Runs `ping` inside `ns`; never takes longer than count*interval + reply timeout + 5 s.
pub(crate) fn ping(ns: &str, to: Ipv4Addr, opts: &PingOpts) -> Result<PingReport> {
    let mut args: Vec<String> = vec![
        "netns".into(),
        "exec".into(),
        ns.into(),
        "ping".into(),
        "-n".into(),
        "-c".into(),
        opts.count.to_string(),
        "-i".into(),
        format!("{:.3}", opts.interval.as_secs_f64()),
        "-W".into(),
        format!("{:.3}", opts.reply_timeout.as_secs_f64().max(0.001)),
    ];
    if let Some(p) = opts.payload {
        args.extend(["-s".into(), p.to_string()]);
    }
    if opts.dont_fragment {
        args.extend(["-M".into(), "do".into()]);
    }
    args.push(to.to_string());
    let budget = opts.interval * opts.count + opts.reply_timeout + Duration::from_secs(5);
    let out = run(command("ip", &args), None, budget)?;
    let output = format!("{}{}", out.stdout, out.stderr);
    let mut report = PingReport {
        transmitted: 0,
        received: 0,
        rtt_avg_ms: None,
        output,
    };
    for line in report.output.lines() {
        if let Some((tx, rest)) = line.split_once(" packets transmitted, ") {
            report.transmitted = tx.trim().parse().unwrap_or(0);
            report.received = rest
                .split_whitespace()
                .next()
                .and_then(|r| r.parse().ok())
                .unwrap_or(0);
        }
        if let Some(stats) = line.strip_prefix("rtt min/avg/max/mdev = ") {
            report.rtt_avg_ms = stats.split('/').nth(1).and_then(|a| a.parse().ok());
        }
    }
    let setup_failure = [
        "Cannot open network namespace",
        "exec of",
        "No such file",
        "Usage:",
        "invalid",
    ];
    if !report.output.contains("packets transmitted")
        && setup_failure.iter().any(|m| report.output.contains(m))
    {
        // ping could not run at all (bad namespace, missing binary, bad option): an error, not
        // "unreachable". "Network is unreachable" and "message too long" are results.
        bail!(
            "`{}` failed ({}): {}",
            out.command,
            out.status,
            report.output.trim()
        );
    }
    Ok(report)
}

/// How [`crate::lab::Lab::tcp_transfer_with`] moves data.
#[derive(Clone, Debug)]
pub struct TransferOpts {
    /// Bytes to send.
    pub bytes: u64,
    /// Seed of the pseudo-random payload.
    pub seed: u64,
    /// Listening port; 0 picks a free one.
    pub port: u16,
    /// Limit for the TCP handshake.
    pub connect_timeout: Duration,
    /// Longest time without progress on either end.
    pub idle_timeout: Duration,
    /// Limit for the whole transfer.
    pub total_timeout: Duration,
}

impl TransferOpts {
    /// Defaults for `bytes`: 3 s to connect, 3 s idle, 30 s plus 1 s per 100 MiB in total.
    pub fn new(bytes: u64) -> Self {
        TransferOpts {
            bytes,
            seed: 0x0005_e7e1_u64 ^ bytes,
            port: 0,
            connect_timeout: Duration::from_secs(3),
            idle_timeout: Duration::from_secs(3),
            total_timeout: Duration::from_secs(30 + bytes / (100 << 20)),
        }
    }
}

/// Outcome of a successful checksummed transfer.
#[derive(Clone, Debug, Serialize)]
pub struct TransferReport {
    /// Sender namespace.
    pub from_ns: String,
    /// Receiver namespace.
    pub to_ns: String,
    /// Where the receiver listened.
    pub to: SocketAddrV4,
    /// The address the receiver saw the connection come from.
    pub peer_seen: SocketAddr,
    /// Bytes written by the sender.
    pub bytes_sent: u64,
    /// Bytes read by the receiver.
    pub bytes_received: u64,
    /// Checksum of what was sent.
    pub sent_checksum: u64,
    /// Checksum of what was received.
    pub received_checksum: u64,
    /// From connect to the receiver seeing end-of-stream.
    pub elapsed: Duration,
}

impl TransferReport {
    /// Goodput in Mbit/s.
    pub fn mbit_per_s(&self) -> f64 {
        self.bytes_received as f64 * 8.0 / self.elapsed.as_secs_f64().max(1e-9) / 1e6
    }
}

/// A streaming, order-sensitive 64-bit checksum (not cryptographic; it detects corruption,
/// loss, duplication and reordering of bytes).
#[derive(Clone, Debug, Default)]
pub struct StreamChecksum {
    state: u64,
    tail: [u8; 8],
    tail_len: usize,
    len: u64,
}

impl StreamChecksum {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;

    fn mix(&mut self, w: u64) {
        self.state = (self.state ^ w).wrapping_mul(Self::K).rotate_left(29) ^ 0xd6e8_feb8_6659_fd93;
    }

    /// Feeds bytes.
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if self.tail_len > 0 {
            let take = (8 - self.tail_len).min(data.len());
            self.tail[self.tail_len..self.tail_len + take].copy_from_slice(&data[..take]);
            self.tail_len += take;
            data = &data[take..];
            if self.tail_len < 8 {
                return;
            }
            let w = u64::from_le_bytes(self.tail);
            self.mix(w);
            self.tail_len = 0;
        }
        let mut chunks = data.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.mix(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        self.tail[..rest.len()].copy_from_slice(rest);
        self.tail_len = rest.len();
    }

    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u64 {
        let mut c = self.clone();
        let mut w = [0u8; 8];
        w[..c.tail_len].copy_from_slice(&c.tail[..c.tail_len]);
        c.mix(u64::from_le_bytes(w));
        c.mix(c.len);
        let mut x = c.state;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^ (x >> 33)
    }
}

/// Fills `buf` with xorshift64* output.
fn fill_pseudo_random(state: &mut u64, buf: &mut [u8]) {
    for chunk in buf.chunks_mut(8) {
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        let v = x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// Waits until `fd` is readable or `timeout` passes; `Ok(false)` on timeout.
fn wait_readable(fd: &impl std::os::fd::AsFd, timeout: Duration) -> Result<bool> {
    let ts = Timespec {
        tv_sec: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
        tv_nsec: i64::from(timeout.subsec_nanos()),
    };
    let mut fds = [PollFd::new(fd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&ts)) {
            Ok(n) => return Ok(n > 0),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(anyhow!(e).context("poll")),
        }
    }
}

struct Received {
    bytes: u64,
    checksum: u64,
    peer: SocketAddr,
    done: Instant,
}

/// Sends `opts.bytes` pseudo-random bytes from `from_ns` to a receiver in `to_ns` listening on
/// `to_ip`, and compares checksums computed on both ends. Fails fast on a broken path (connect
/// timeout) and never outlives `opts.total_timeout` (+1 s).
pub(crate) fn tcp_transfer(
    from_ns: &str,
    to_ns: &str,
    to_ip: Ipv4Addr,
    opts: &TransferOpts,
) -> Result<TransferReport> {
    let start = Instant::now();
    let deadline = start + opts.total_timeout;
    let (ready_tx, ready_rx) = mpsc::channel::<u16>();
    let o = opts.clone();
    let receiver = spawn_in_netns(to_ns, "TCP receiver", move || {
        let listener = TcpListener::bind((to_ip, o.port))
            .with_context(|| format!("binding {to_ip}:{}", o.port))?;
        let port = listener.local_addr()?.port();
        let _ = ready_tx.send(port);
        let accept_within = (o.connect_timeout + Duration::from_secs(1))
            .min(deadline.saturating_duration_since(Instant::now()));
        if !wait_readable(&listener, accept_within)? {
            bail!("no connection to {to_ip}:{port} within {accept_within:?}");
        }
        let (mut s, peer) = listener.accept().context("accept")?;
        drop(listener);
        s.set_read_timeout(Some(o.idle_timeout))?;
        let mut sum = StreamChecksum::default();
        let mut buf = vec![0u8; 256 * 1024];
        let mut bytes = 0u64;
        loop {
            if Instant::now() > deadline {
                bail!(
                    "receiver: transfer exceeded {:?} after {bytes} bytes",
                    o.total_timeout
                );
            }
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    sum.update(&buf[..n]);
                    bytes += n as u64;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(anyhow!(e).context(format!(
                        "receiver: read failed after {bytes} bytes (idle limit {:?})",
                        o.idle_timeout
                    )))
                }
            }
        }
        Ok(Received {
            bytes,
            checksum: sum.finish(),
            peer,
            done: Instant::now(),
        })
    })?;
    let port = match ready_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(p) => p,
        Err(_) => {
            // The receiver failed before listening; its error says why.
            return Err(receiver
                .wait(Duration::from_secs(1))
                .err()
                .unwrap_or_else(|| anyhow!("receiver did not start")));
        }
    };
    let to = SocketAddrV4::new(to_ip, port);
    let o = opts.clone();
    let sender = spawn_in_netns(from_ns, "TCP sender", move || {
        let mut s = TcpStream::connect_timeout(&SocketAddr::V4(to), o.connect_timeout)
            .with_context(|| format!("connecting to {to} (limit {:?})", o.connect_timeout))?;
        s.set_write_timeout(Some(o.idle_timeout))?;
        let connected = Instant::now();
        let mut sum = StreamChecksum::default();
        let mut state = o.seed | 1;
        let mut buf = vec![0u8; 256 * 1024];
        let mut left = o.bytes;
        while left > 0 {
            if Instant::now() > deadline {
                bail!(
                    "sender: transfer exceeded {:?} with {left} bytes left",
                    o.total_timeout
                );
            }
            let n = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
            fill_pseudo_random(&mut state, &mut buf[..n]);
            s.write_all(&buf[..n]).with_context(|| {
                format!(
                    "sender: write failed with {left} of {} bytes left (idle limit {:?})",
                    o.bytes, o.idle_timeout
                )
            })?;
            sum.update(&buf[..n]);
            left -= n as u64;
        }
        s.shutdown(Shutdown::Write).context("sender: shutdown")?;
        Ok((o.bytes, sum.finish(), connected))
    })?;
    let budget = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let (sent, sent_sum, connected) = sender
        .wait(budget)
        .with_context(|| format!("TCP transfer {from_ns} -> {to}"))?;
    let budget = deadline.saturating_duration_since(Instant::now()) + Duration::from_secs(1);
    let got = receiver
        .wait(budget)
        .with_context(|| format!("TCP transfer {from_ns} -> {to}"))?;
    let report = TransferReport {
        from_ns: from_ns.into(),
        to_ns: to_ns.into(),
        to,
        peer_seen: got.peer,
        bytes_sent: sent,
        bytes_received: got.bytes,
        sent_checksum: sent_sum,
        received_checksum: got.checksum,
        elapsed: got.done.saturating_duration_since(connected),
    };
    if report.bytes_sent != report.bytes_received
        || report.sent_checksum != report.received_checksum
    {
        bail!(
            "TCP transfer {from_ns} -> {to} corrupted: sent {} bytes (checksum {:016x}), received {} bytes (checksum {:016x})",
            report.bytes_sent,
            report.sent_checksum,
            report.bytes_received,
            report.received_checksum
        );
    }
    Ok(report)
}

/// Sends `payloads` as UDP datagrams from `from_ns` (bound to `bind`, or any address) to `to`.
pub(crate) fn send_udp(
    from_ns: &str,
    bind: Option<SocketAddrV4>,
    to: SocketAddrV4,
    payloads: Vec<Vec<u8>>,
) -> Result<()> {
    spawn_in_netns(from_ns, "UDP sender", move || {
        let s = UdpSocket::bind(bind.unwrap_or(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0)))?;
        for p in &payloads {
            match s.send_to(p, to) {
                Ok(_) => {}
                // No route or an ICMP error from an earlier datagram: the packet did not go out
                // (or was refused), which callers observe at the receiving end.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused
                            | ErrorKind::NetworkUnreachable
                            | ErrorKind::HostUnreachable
                    ) => {}
                Err(e) => return Err(anyhow!(e).context(format!("sending UDP to {to}"))),
            }
        }
        Ok(())
    })?
    .wait(Duration::from_secs(5))
}

/// Whether a UDP datagram sent from `from_ns` to `to` arrives at a socket bound to `listen` in
/// `listen_ns` within `window`. Three datagrams are sent; `Ok(false)` means none arrived.
pub(crate) fn udp_delivered(
    from_ns: &str,
    to: SocketAddrV4,
    listen_ns: &str,
    listen: SocketAddrV4,
    window: Duration,
) -> Result<bool> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let listener = spawn_in_netns(listen_ns, "UDP listener", move || {
        let s = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
        let _ = ready_tx.send(());
        if !wait_readable(&s, window)? {
            return Ok(false);
        }
        let mut buf = [0u8; 2048];
        s.recv_from(&mut buf)?;
        Ok(true)
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
        return listener.wait(Duration::from_secs(1)).map(|_| false);
    }
    send_udp(from_ns, None, to, vec![b"petrel-lab probe".to_vec(); 3])?;
    listener.wait(window + Duration::from_secs(2))
}

/// One request/response over UDP, client first (the way NAT lets traffic through).
#[derive(Clone, Debug, Serialize)]
pub struct UdpExchange {
    /// The source address the server saw (after any NAT).
    pub seen_source: SocketAddrV4,
    /// Whether the server's reply reached the client.
    pub reply_received: bool,
}

/// The client in `client_ns` sends to `server` (a socket in `server_ns`), retrying every 200 ms
/// until a reply or `timeout`; the server answers the source it saw.
pub(crate) fn udp_exchange(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddrV4,
    timeout: Duration,
) -> Result<UdpExchange> {
    let (ready_tx, ready_rx) = mpsc::channel::<()>();
    let srv = spawn_in_netns(server_ns, "UDP echo server", move || {
        let s = UdpSocket::bind(server).with_context(|| format!("binding {server}"))?;
        let _ = ready_tx.send(());
        if !wait_readable(&s, timeout)? {
            bail!("nothing reached {server} within {timeout:?}");
        }
        let mut buf = [0u8; 2048];
        let (n, from) = s.recv_from(&mut buf)?;
        s.send_to(&buf[..n], from)?;
        match from {
            SocketAddr::V4(a) => Ok(a),
            SocketAddr::V6(a) => bail!("unexpected IPv6 source {a}"),
        }
    })?;
    if ready_rx.recv_timeout(Duration::from_secs(5)).is_err() {
        return Err(srv
            .wait(Duration::from_secs(1))
            .err()
            .unwrap_or_else(|| anyhow!("UDP server did not start")));
    }
    let client = spawn_in_netns(client_ns, "UDP client", move || {
        let s = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
        let end = Instant::now() + timeout;
        let mut buf = [0u8; 2048];
        while Instant::now() < end {
            let _ = s.send_to(b"petrel-lab exchange", server);
            if wait_readable(
                &s,
                Duration::from_millis(200).min(end.saturating_duration_since(Instant::now())),
            )? {
                if let Ok((_, from)) = s.recv_from(&mut buf) {
                    if from == SocketAddr::V4(server) {
                        return Ok(true);
                    }
                }
            }
        }
        Ok(false)
    })?;
    let reply_received = client.wait(timeout + Duration::from_secs(2))?;
    let seen_source = srv.wait(timeout + Duration::from_secs(2))?;
    Ok(UdpExchange {
        seen_source,
        reply_received,
    })
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(mac: &str) -> Result<[u8; 6]> {
    let mut out = [0u8; 6];
    let parts: Vec<&str> = mac.split(':').collect();
    if parts.len() != 6 {
        bail!("bad MAC address {mac:?}");
    }
    for (o, p) in out.iter_mut().zip(parts) {
        *o = u8::from_str_radix(p, 16).with_context(|| format!("bad MAC address {mac:?}"))?;
    }
    Ok(out)
}

fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A VXLAN payload (8-byte header + inner Ethernet frame) carrying an ICMP echo request, exactly
/// as flannel.1 would emit it; send it to a node's UDP 8472 to inject a packet.
pub fn vxlan_icmp_echo(
    vni: u32,
    inner_dst_mac: &str,
    inner_src_mac: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
) -> Result<Vec<u8>> {
    let mut p = vec![0x08, 0, 0, 0];
    p.extend_from_slice(&(vni << 8).to_be_bytes());
    p.extend_from_slice(&parse_mac(inner_dst_mac)?);
    p.extend_from_slice(&parse_mac(inner_src_mac)?);
    p.extend_from_slice(&[0x08, 0x00]);
    let mut icmp = vec![8, 0, 0, 0, 0x50, 0x54, 0, 1];
    icmp.extend_from_slice(b"petrel-lab probe");
    let c = inet_checksum(&icmp).to_be_bytes();
    icmp[2..4].copy_from_slice(&c);
    let total = u16::try_from(20 + icmp.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes();
    let mut ip = vec![
        0x45, 0, total[0], total[1], 0x12, 0x34, 0x40, 0, 64, 1, 0, 0,
    ];
    ip.extend_from_slice(&src.octets());
    ip.extend_from_slice(&dst.octets());
    let c = inet_checksum(&ip).to_be_bytes();
    ip[10..12].copy_from_slice(&c);
    p.extend_from_slice(&ip);
    p.extend_from_slice(&icmp);
    Ok(p)
}

/// Interface counters (`ip -s link`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LinkStats {
    /// Packets received.
    pub rx_packets: u64,
    /// Bytes received.
    pub rx_bytes: u64,
    /// Receive errors.
    pub rx_errors: u64,
    /// Receive drops.
    pub rx_dropped: u64,
    /// Packets sent.
    pub tx_packets: u64,
    /// Bytes sent.
    pub tx_bytes: u64,
    /// Transmit errors.
    pub tx_errors: u64,
    /// Transmit drops.
    pub tx_dropped: u64,
}

pub(crate) fn link_stats(ns: &str, dev: &str) -> Result<LinkStats> {
    let out = run(
        command("ip", &["-n", ns, "-s", "-j", "link", "show", "dev", dev]),
        None,
        super::cmd::DEFAULT_TIMEOUT,
    )?
    .check()?;
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).with_context(|| format!("parsing `{}`", out.command))?;
    let s = &v[0]["stats64"];
    let g = |dir: &str, k: &str| s[dir][k].as_u64().unwrap_or(0);
    if s.is_null() {
        bail!("`{}` printed no stats64: {}", out.command, out.stdout);
    }
    Ok(LinkStats {
        rx_packets: g("rx", "packets"),
        rx_bytes: g("rx", "bytes"),
        rx_errors: g("rx", "errors"),
        rx_dropped: g("rx", "dropped"),
        tx_packets: g("tx", "packets"),
        tx_bytes: g("tx", "bytes"),
        tx_errors: g("tx", "errors"),
        tx_dropped: g("tx", "dropped"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksum_is_split_independent_and_order_sensitive() {
        let mut st = 7u64;
        let mut data = vec![0u8; 100_003];
        fill_pseudo_random(&mut st, &mut data);
        let mut a = StreamChecksum::default();
        a.update(&data);
        let mut b = StreamChecksum::default();
        for c in data.chunks(13) {
            b.update(c);
        }
        assert_eq!(a.finish(), b.finish());
        data.swap(10, 11);
        let mut c = StreamChecksum::default();
        c.update(&data);
        assert_ne!(a.finish(), c.finish());
        let mut d = StreamChecksum::default();
        d.update(&data[..data.len() - 1]);
        assert_ne!(c.finish(), d.finish());
    }

    #[test]
    fn vxlan_frame_layout() -> Result<()> {
        let f = vxlan_icmp_echo(
            1,
            "02:fa:00:00:00:03",
            "02:fa:00:00:00:01",
            Ipv4Addr::new(10, 244, 1, 2),
            Ipv4Addr::new(10, 244, 3, 2),
        )?;
        assert_eq!(&f[..8], &[0x08, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&f[8..14], &[2, 0xfa, 0, 0, 0, 3]);
        assert_eq!(
            inet_checksum(&f[22..42]),
            0,
            "IPv4 header checksum verifies"
        );
        assert_eq!(inet_checksum(&f[42..]), 0, "ICMP checksum verifies");
        Ok(())
    }
}
