//! Pod-to-pod traffic through the datapath, for both hooks. Two nodes A and B (network
//! namespaces) with flannel.1 programmed as Flannel would, B's underlay unreachable from A, a
//! pod behind a cni0 bridge on each. In each node a Datapath (Relay::Local) lists the other's
//! CIDR as a via-hub peer (MTU 1400). The test plays the hub: frames from A's FrameSource go
//! to B's Injector and vice versa (two node threads, each in its namespace with its own
//! current-thread runtime, joined by channels). Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use common::*;
use petrel_datapath::{
    Datapath, DesiredState, HookChoice, HookMode, Relay, FRAME_BUF_LEN, VXLAN_OVERHEAD,
};
use tokio::sync::{mpsc, oneshot};

const SITE_MTU: u16 = 1400;

struct NodeRun {
    ready: std_mpsc::Receiver<Result<HookMode, String>>,
    stop: Option<oneshot::Sender<()>>,
    done: std_mpsc::Receiver<Result<HubCounters, String>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct HubCounters {
    to_hub: u64,
    injected: u64,
    inject_errors: u64,
    /// Frames whose VXLAN/Ethernet headers were not what flannel.1 would send.
    malformed: u64,
    /// Frames whose inner IPv4 header or TCP/UDP/ICMP checksum is wrong (e.g. left to an
    /// offload that never happens): a real remote VTEP would drop them.
    bad_checksum: u64,
}

fn fold(mut sum: u32) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

/// Whether the IPv4 packet's header and (unfragmented) L4 checksums verify.
fn checksums_ok(ip: &[u8]) -> bool {
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip.len() < total || total < ihl || fold(ones_sum(&ip[..ihl], 0)) != 0xffff {
        return false;
    }
    let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff;
    if frag != 0 {
        return true;
    }
    let l4 = &ip[ihl..total];
    match ip[9] {
        1 => fold(ones_sum(l4, 0)) == 0xffff,
        6 | 17 => {
            if ip[9] == 17 && l4.len() >= 8 && l4[6] == 0 && l4[7] == 0 {
                return true; // UDP without checksum
            }
            let mut pseudo = ones_sum(&ip[12..20], 0);
            pseudo += u32::from(ip[9]) + l4.len() as u32;
            fold(ones_sum(l4, pseudo)) == 0xffff
        }
        _ => true,
    }
}

/// Starts a node's datapath + its half of the hub on a thread inside `ns`.
fn start_node(
    ns: String,
    cfg: petrel_datapath::DatapathConfig,
    own: u8,
    remote: u8,
    to_hub: mpsc::Sender<Vec<u8>>,
    mut from_hub: mpsc::Receiver<Vec<u8>>,
) -> NodeRun {
    let (ready_tx, ready) = std_mpsc::channel();
    let (done_tx, done) = std_mpsc::channel();
    let (stop, mut stop_rx) = oneshot::channel::<()>();
    std::thread::spawn(move || {
        enter(&ns);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let result = rt.block_on(async move {
            let setup = async {
                let mut dp = Datapath::open(cfg).await?;
                dp.apply(&DesiredState {
                    peers: vec![peer(remote, SITE_MTU)],
                    relay: Relay::Local,
                })
                .await?;
                let src = dp.frame_source()?;
                let inj = dp.injector()?;
                Ok::<_, petrel_datapath::DatapathError>((dp, src, inj))
            };
            let (mut dp, mut src, inj) = match setup.await {
                Ok(x) => x,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return Err(e.to_string());
                }
            };
            let _ = ready_tx.send(Ok(dp.mode()));
            let mut c = HubCounters::default();
            let mut buf = vec![0u8; FRAME_BUF_LEN];
            loop {
                tokio::select! {
                    r = src.recv(&mut buf) => {
                        let n = r.map_err(|e| format!("frame source: {e}"))?;
                        // What flannel.1 would send: VXLAN I flag + VNI 1, inner src = our
                        // VtepMAC, inner dst = the peer's, IPv4.
                        let f = &buf[..n];
                        if n < VXLAN_OVERHEAD || f[..8] != [8, 0, 0, 0, 0, 0, 1, 0]
                            || f[8..14] != mac(remote) || f[14..20] != mac(own) || f[20..22] != [8, 0] {
                            c.malformed += 1;
                        }
                        else if !checksums_ok(&f[VXLAN_OVERHEAD..]) {
                            c.bad_checksum += 1;
                        }
                        c.to_hub += 1;
                        let _ = to_hub.try_send(f.to_vec());
                    }
                    Some(frame) = from_hub.recv() => {
                        match inj.send(&frame).await {
                            Ok(()) => c.injected += 1,
                            Err(_) => c.inject_errors += 1,
                        }
                    }
                    _ = &mut stop_rx => break,
                }
            }
            dp.cleanup().await.map_err(|e| e.to_string())?;
            Ok(c)
        });
        let _ = done_tx.send(result);
    });
    NodeRun {
        ready,
        stop: Some(stop),
        done,
    }
}

fn ping(pod: &str, dst: &str, extra: &[&str]) -> (bool, String) {
    let mut args = vec!["ping", "-c", "3", "-i", "0.2", "-W", "2", "-w", "8"];
    args.extend_from_slice(extra);
    args.push(dst);
    let o = nsexec(pod, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

/// Sends `size` bytes from `client_pod` to `server_pod` (`dst`:7000) over TCP; the server
/// answers with the byte count and a checksum. Bounded by socket timeouts.
fn tcp_transfer(client_pod: &str, server_pod: &str, dst: &str, size: usize) {
    let addr: SocketAddr = format!("{dst}:7000").parse().unwrap();
    let (bound_tx, bound_rx) = std_mpsc::channel();
    let server_ns = server_pod.to_string();
    let server = std::thread::spawn(move || {
        enter(&server_ns);
        let l = TcpListener::bind(addr).unwrap();
        bound_tx.send(()).unwrap();
        l.set_nonblocking(true).unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        let (mut s, _) = loop {
            match l.accept() {
                Ok(x) => break x,
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut total, mut sum) = (0u64, 0u64);
        loop {
            let n = s.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            for b in &buf[..n] {
                sum = sum.wrapping_mul(31).wrapping_add(u64::from(*b));
            }
            total += n as u64;
        }
        s.write_all(&total.to_be_bytes()).unwrap();
        s.write_all(&sum.to_be_bytes()).unwrap();
    });
    bound_rx.recv_timeout(Duration::from_secs(5)).unwrap();
    let client_ns = client_pod.to_string();
    let client = std::thread::spawn(move || {
        enter(&client_ns);
        let data: Vec<u8> = (0..size).map(|i| (i * 7 + i / 251) as u8).collect();
        let mut expect = 0u64;
        for b in &data {
            expect = expect.wrapping_mul(31).wrapping_add(u64::from(*b));
        }
        let started = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = [0u8; 16];
        s.read_exact(&mut answer).unwrap();
        let total = u64::from_be_bytes(answer[..8].try_into().unwrap());
        let sum = u64::from_be_bytes(answer[8..].try_into().unwrap());
        assert_eq!(total, size as u64, "bytes received");
        assert_eq!(sum, expect, "payload checksum");
        started.elapsed()
    });
    let took = client
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    server
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    eprintln!("tcp {size} bytes {client_pod} -> {dst}: {took:?}");
}

fn pod_to_pod(hook: HookChoice) {
    let mut lab = Lab::new();
    let a = Node {
        ns: lab.netns("na"),
        idx: 1,
        ip: "192.168.50.1".into(),
    };
    let b = Node {
        ns: lab.netns("nb"),
        idx: 2,
        ip: "10.0.60.2".into(),
    };
    for n in [&a, &b] {
        node_sysctls(&n.ns);
        underlay(n);
        flannel_device(n);
    }
    flannel_peer(&a, 2, &b.ip);
    flannel_peer(&b, 1, &a.ip);
    let pod_a = cni_pod(&mut lab, &a);
    let pod_b = cni_pod(&mut lab, &b);
    settle(&a.ns);
    settle(&b.ns);

    // Plain Flannel VXLAN cannot reach B: its underlay address is unreachable from A.
    let (ok, out) = ping(&pod_a, "10.244.2.2", &["-c", "1"]);
    assert!(!ok, "A's pod must not reach B's pod without Petrel: {out}");

    let (a_tx, a_rx) = mpsc::channel(4096);
    let (b_tx, b_rx) = mpsc::channel(4096);
    // The hub: A's frames go to B's injector and B's to A's.
    let mut node_a = start_node(a.ns.clone(), lab.config(hook), 1, 2, b_tx, a_rx);
    let mut node_b = start_node(b.ns.clone(), lab.config(hook), 2, 1, a_tx, b_rx);
    let want = if hook == HookChoice::Fast {
        HookMode::Fast
    } else {
        HookMode::Portable
    };
    for n in [&node_a, &node_b] {
        let mode = n
            .ready
            .recv_timeout(Duration::from_secs(20))
            .expect("node ready")
            .expect("datapath setup");
        assert_eq!(mode, want);
    }

    let (ok, out) = ping(&pod_a, "10.244.2.2", &[]);
    assert!(ok, "A pod -> B pod through the datapath: {out}");
    let (ok, out) = ping(&pod_b, "10.244.1.2", &[]);
    assert!(ok, "B pod -> A pod through the datapath: {out}");

    // Measured need for loose rp_filter: with strict rp_filter back on B's flannel.1, the
    // decapsulated echo requests (source 10.244.1.2, routed back via petrel.1/petrel0) die.
    assert_eq!(sysctl_get(&b.ns, "net.ipv4.conf.flannel/1.rp_filter"), "2");
    sysctl_set(&b.ns, "net.ipv4.conf.flannel/1.rp_filter", "1");
    let (ok, out) = ping(&pod_a, "10.244.2.2", &["-c", "1"]);
    assert!(
        !ok,
        "strict rp_filter on flannel.1 must drop injected traffic: {out}"
    );
    sysctl_set(&b.ns, "net.ipv4.conf.flannel/1.rp_filter", "2");
    let (ok, out) = ping(&pod_a, "10.244.2.2", &[]);
    assert!(ok, "loose rp_filter again: {out}");

    // A full-size (1450-byte) DF packet meets the site MTU: the node answers "frag needed".
    let payload = (1450 - 28).to_string();
    let (ok, out) = ping(
        &pod_a,
        "10.244.2.2",
        &["-M", "do", "-s", &payload, "-c", "2"],
    );
    assert!(
        !ok,
        "1450-byte DF ping must not pass a 1400 site MTU: {out}"
    );
    assert!(
        out.contains("Frag needed") && out.contains("mtu = 1400"),
        "expected ICMP frag-needed with mtu 1400: {out}"
    );
    // And 1400 bytes pass.
    let payload = (1400 - 28).to_string();
    let (ok, out) = ping(&pod_a, "10.244.2.2", &["-M", "do", "-s", &payload]);
    assert!(ok, "1400-byte DF ping must pass: {out}");

    tcp_transfer(&pod_a, &pod_b, "10.244.2.2", 4 << 20);
    tcp_transfer(&pod_b, &pod_a, "10.244.1.2", 4 << 20);

    for n in [&mut node_a, &mut node_b] {
        let _ = n.stop.take().map(|s| s.send(()));
    }
    let ca = node_a
        .done
        .recv_timeout(Duration::from_secs(20))
        .expect("node A stops")
        .expect("node A");
    let cb = node_b
        .done
        .recv_timeout(Duration::from_secs(20))
        .expect("node B stops")
        .expect("node B");
    eprintln!("{hook}: A {ca:?}, B {cb:?}");
    assert_eq!(
        (ca.malformed, cb.malformed),
        (0, 0),
        "frames must look like flannel.1's"
    );
    assert_eq!(
        (ca.bad_checksum, cb.bad_checksum),
        (0, 0),
        "inner checksums must be complete"
    );
    assert!(ca.to_hub > 1000 && cb.injected > 1000, "{ca:?} {cb:?}");
    assert_eq!((ca.inject_errors, cb.inject_errors), (0, 0));

    // Cleaned up: traffic is back to (broken) plain Flannel.
    let (ok, _) = ping(&pod_a, "10.244.2.2", &["-c", "1"]);
    assert!(!ok);
    for n in [&a, &b] {
        assert_eq!(sysctl_get(&n.ns, "net.ipv4.conf.flannel/1.rp_filter"), "1");
        assert!(!ip(&n.ns, &["rule"]).contains("7473"));
    }
}

#[test]
fn checksum_checker_detects_corruption() {
    // ICMP echo 10.0.0.1 -> 10.0.0.2 with correct checksums.
    let mut p = vec![
        0x45, 0, 0, 28, 0, 1, 0, 0, 64, 1, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2, 8, 0, 0, 0, 0x12, 0x34,
        0, 1,
    ];
    let h = !fold(ones_sum(&p[..20], 0));
    p[10..12].copy_from_slice(&h.to_be_bytes());
    let c = !fold(ones_sum(&p[20..], 0));
    p[22..24].copy_from_slice(&c.to_be_bytes());
    assert!(checksums_ok(&p));
    p[27] ^= 1;
    assert!(!checksums_ok(&p));
}

#[test]
fn fast_hook_carries_pod_traffic() {
    pod_to_pod(HookChoice::Fast);
}

#[test]
fn portable_hook_carries_pod_traffic() {
    pod_to_pod(HookChoice::Portable);
}
