//! Support for the API-server egress tests: a hub with its egress listeners and agents on
//! loopback (node addresses and pod CIDRs are 127.x addresses, so an agent really dials them),
//! a raw CONNECT client, small TCP targets (checksum, firehose, a backlog-0 "blackhole"), a
//! throw-away PKI for the mutual-TLS listener, and a wrapper around `e2e/k8s/control-plane.sh`
//! (a real kube-apiserver 1.20 with an `EgressSelectorConfiguration`).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::procs::{free_port, join, run, wait_until, Agent, Hub};

/// The loopback inventory of the egress tests. `kubelet_ports` overrides nodes' kubelet ports.
///
/// | node    | site   | kind            | address   | pod CIDR     |
/// |---------|--------|-----------------|-----------|--------------|
/// | cloud-1 | vpc    | cloud           | 127.0.9.1 | 127.9.1.0/24 |
/// | edge-a1 | site-a | public          | 127.0.1.1 | 127.1.1.0/24, 198.18.1.0/24 |
/// | edge-a2 | site-a | public          | 127.0.1.2 | 127.1.2.0/24 |
/// | edge-b1 | site-b | public          | 127.0.2.1 | 127.2.1.0/24 |
/// | edge-c1 | site-c | public          | 127.0.4.1 | 127.4.1.0/24 |
/// | x1      | site-x | express-connect | 127.0.2.1 | 127.3.1.0/24 |
///
/// x1 reuses edge-b1's address on purpose (overlapping private addresses across data centres).
/// 198.18.1.0/24 (a benchmarking range) is for pods the API server must proxy to: it refuses
/// loopback pod IPs, so tests put such an address on `lo` with [`LoopbackAlias`].
pub fn loopback_inventory(kubelet_ports: &[(&str, u16)]) -> String {
    let nodes = [
        ("cloud-1", "vpc", "127.0.9.1", "127.9.1.0/24"),
        (
            "edge-a1",
            "site-a",
            "127.0.1.1",
            "127.1.1.0/24\", \"198.18.1.0/24",
        ),
        ("edge-a2", "site-a", "127.0.1.2", "127.1.2.0/24"),
        ("edge-b1", "site-b", "127.0.2.1", "127.2.1.0/24"),
        ("edge-c1", "site-c", "127.0.4.1", "127.4.1.0/24"),
        ("x1", "site-x", "127.0.2.1", "127.3.1.0/24"),
    ];
    let mut out = String::from(
        "[[sites]]\nname = \"vpc\"\nkind = \"cloud\"\n\n[[sites]]\nname = \"site-a\"\nkind = \"public\"\n\n\
         [[sites]]\nname = \"site-b\"\nkind = \"public\"\n\n[[sites]]\nname = \"site-c\"\nkind = \"public\"\n\n\
         [[sites]]\nname = \"site-x\"\nkind = \"express-connect\"\n",
    );
    for (name, site, addr, cidr) in nodes {
        out.push_str(&format!(
            "\n[[nodes]]\nname = \"{name}\"\nsite = \"{site}\"\naddresses = [\"{addr}\"]\npod_cidrs = [\"{cidr}\"]\n"
        ));
        if let Some((_, p)) = kubelet_ports.iter().find(|(n, _)| *n == name) {
            out.push_str(&format!("kubelet_port = {p}\n"));
        }
    }
    out
}

/// Starts a hub with `inventory` and `extra` flags (egress flags).
pub fn start_hub(dir: &Path, inventory: &str, extra: &[&str]) -> Result<Hub> {
    std::fs::create_dir_all(dir)?;
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, inventory)?;
    let inv = inv.display().to_string();
    // Each hub gets its own VXLAN relay port, so tests can run side by side.
    let relay = format!("127.0.0.1:{}", free_port());
    let mut args = vec![
        "--inventory",
        inv.as_str(),
        "--relay-listen",
        relay.as_str(),
    ];
    args.extend_from_slice(extra);
    Hub::start(&dir.join("hub"), &args)
}

/// Enrols `node`, starts its agent and waits until the hub lists it.
pub fn start_agent(hub: &Hub, node: &str, dir: &Path) -> Result<Agent> {
    start_agent_with(hub, node, dir, &[])
}

/// [`start_agent`] with extra arguments for `petrel-edge-agent run`.
pub fn start_agent_with(hub: &Hub, node: &str, dir: &Path, extra: &[&str]) -> Result<Agent> {
    let (token, fp) = hub.token(node, &[])?;
    let state = dir.join(format!("agent-{node}"));
    let out = join(&hub.server(), node, &token, &fp, &state)?;
    if !out.success {
        bail!("join {node} failed: {}\n{}", out.stdout, out.stderr);
    }
    let agent = Agent::start(node, &state, &[], extra)?;
    wait_until(
        Duration::from_secs(10),
        &format!("{node} connected"),
        || hub.agent(node).map(|_| ()),
    )?;
    Ok(agent)
}

/// Sends `CONNECT target` and reads the response head byte by byte (so nothing after it is
/// consumed). Returns the status code and the whole status line.
pub fn connect_on<S: Read + Write>(s: &mut S, target: &str) -> Result<(u16, String)> {
    write!(s, "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n")?;
    read_response_head(s)
}

/// Reads an HTTP response head; returns (status, status line).
pub fn read_response_head<S: Read>(s: &mut S) -> Result<(u16, String)> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 16 * 1024 {
            bail!("response head too long");
        }
        match s.read(&mut b)? {
            0 => bail!(
                "connection closed in the response head: {:?}",
                String::from_utf8_lossy(&head)
            ),
            _ => head.push(b[0]),
        }
    }
    let text = String::from_utf8_lossy(&head).into_owned();
    let line = text.lines().next().unwrap_or_default().to_string();
    let code = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad status line {line:?}"))?;
    Ok((code, line))
}

/// CONNECT over the hub's Unix socket.
pub fn uds_connect(path: &Path, target: &str) -> Result<(u16, String, UnixStream)> {
    let mut s = UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let (code, line) = connect_on(&mut s, target)?;
    Ok((code, line, s))
}

/// The value of one series in a Prometheus text (`name{labels}` exactly as exposed), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

/// Deterministic bytes (xorshift), so both ends can check a stream without holding it.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A TCP target on `ip`: reads until EOF (the client's half-close), answers
/// `"<sha256 hex> <len>\n"`, then `reply_len` bytes of `pattern(7, ..)`, then closes.
pub fn checksum_server(ip: IpAddr, reply_len: usize) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut h = Sha256::new();
                let mut n = 0usize;
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match c.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => {
                            h.update(&buf[..k]);
                            n += k;
                        }
                        Err(_) => return,
                    }
                }
                let _ = writeln!(c, "{} {n}", hex::encode(h.finalize()));
                let _ = c.write_all(&pattern(7, reply_len));
            });
        }
    });
    Ok(addr)
}

/// Sends `up` bytes of `pattern(3, ..)`, half-closes, and checks the checksum server's answer
/// and its `down` reply bytes. Works on any stream; `shutdown` half-closes it.
pub fn checksum_exchange<S: Read + Write>(
    s: &mut S,
    up: usize,
    down: usize,
    shutdown: impl FnOnce(&mut S) -> std::io::Result<()>,
) -> Result<()> {
    let data = pattern(3, up);
    let want = format!("{} {up}\n", hex::encode(Sha256::digest(&data)));
    // Write in a helper thread's absence: the server reads everything before answering, so a
    // plain write_all cannot deadlock.
    s.write_all(&data)?;
    shutdown(s)?;
    let mut got = Vec::new();
    s.read_to_end(&mut got)?;
    if got.len() < want.len() || got[..want.len()] != *want.as_bytes() {
        bail!(
            "checksum answer {:?}, want {want:?}",
            String::from_utf8_lossy(&got[..got.len().min(100)])
        );
    }
    if got[want.len()..] != pattern(7, down)[..] {
        bail!(
            "reply: {} bytes, want {down} bytes of the pattern",
            got.len() - want.len()
        );
    }
    Ok(())
}

/// A target that writes endlessly to every client (a reader that stops reading backs it up).
pub fn firehose_server(ip: IpAddr) -> Result<SocketAddr> {
    let l = TcpListener::bind((ip, 0))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let chunk = vec![0x5au8; 64 * 1024];
                while c.write_all(&chunk).is_ok() {}
            });
        }
    });
    Ok(addr)
}

/// A listener with a full accept queue: SYNs to it are dropped, so connects hang (a blackholed
/// target without firewall rules). Keep the returned values alive.
pub fn blackhole(ip: IpAddr) -> Result<(SocketAddr, socket2::Socket, Vec<TcpStream>)> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    s.bind(&SocketAddr::new(ip, 0).into())?;
    s.listen(0)?;
    let addr = s
        .local_addr()?
        .as_socket()
        .ok_or_else(|| anyhow!("no address"))?;
    let mut fill = Vec::new();
    for _ in 0..2 {
        if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(300)) {
            fill.push(c);
        }
    }
    if TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok() {
        bail!("backlog-0 listener still accepts connections");
    }
    Ok((addr, s, fill))
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A throw-away CA for the mutual-TLS listener tests.
pub struct TestPki {
    pub ca_pem: String,
    ca_der: Vec<u8>,
    key: rcgen::KeyPair,
}

impl TestPki {
    pub fn new(cn: &str) -> Result<Self> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key)?;
        Ok(Self {
            ca_pem: cert.pem(),
            ca_der: cert.der().to_vec(),
            key,
        })
    }

    /// A leaf for `names` (DNS names or IP literals); `server` picks the EKU. Returns PEMs.
    pub fn leaf(&self, cn: &str, names: &[&str], server: bool) -> Result<(String, String)> {
        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params.extended_key_usages = vec![if server {
            rcgen::ExtendedKeyUsagePurpose::ServerAuth
        } else {
            rcgen::ExtendedKeyUsagePurpose::ClientAuth
        }];
        let issuer = rcgen::Issuer::from_ca_cert_der(&self.ca_der.clone().into(), &self.key)?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }
}

/// A rustls client trusting `ca_pem`, with an optional client certificate (PEMs).
pub fn tls_client(
    ca_pem: &str,
    client: Option<&(String, String)>,
) -> Result<Arc<rustls::ClientConfig>> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let builder =
        rustls::ClientConfig::builder_with_provider(petrel_transport::tls::crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
    let cfg = match client {
        Some((cert, key)) => builder.with_client_auth_cert(
            CertificateDer::pem_slice_iter(cert.as_bytes()).collect::<Result<Vec<_>, _>>()?,
            PrivateKeyDer::from_pem_slice(key.as_bytes())?,
        )?,
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(cfg))
}

/// A TLS connection to `addr` verifying `server_name`.
pub fn tls_connect(
    cfg: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    server_name: &str,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    tcp.set_read_timeout(Some(Duration::from_secs(30)))?;
    let name = rustls_pki_types::ServerName::try_from(server_name.to_string())?;
    let conn = rustls::ClientConnection::new(cfg, name)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A running kube-apiserver + etcd from `e2e/k8s/control-plane.sh`, stopped on drop.
pub struct ControlPlane {
    pub dir: PathBuf,
    pub env: HashMap<String, String>,
    script: PathBuf,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .finish()
    }
}

fn k8s_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("k8s/control-plane.sh")
}

impl ControlPlane {
    /// `control-plane.sh up DIR` with `env` (e.g. `EGRESS_SELECTOR_CONFIG`,
    /// `KUBELET_SERVING_SANS`, `APISERVER_EXTRA_FLAGS`); `wrap` runs the script under another
    /// command (e.g. `unshare -m ...`) when given.
    pub fn up(dir: &Path, env: &[(&str, String)], wrap: Option<Vec<String>>) -> Result<Self> {
        let script = k8s_script();
        let mut cmd = match &wrap {
            Some(w) => {
                let mut c = Command::new(&w[0]);
                c.args(&w[1..]).arg(&script);
                c
            }
            None => Command::new(&script),
        };
        cmd.arg("up").arg(dir);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut cp = Self {
            dir: dir.to_path_buf(),
            env: HashMap::new(),
            script: script.clone(),
        };
        // Builds kube-apiserver first when it is not cached (minutes, once per machine).
        let out = run(cmd, Duration::from_secs(900))?;
        if !out.status.success() {
            bail!(
                "control-plane up failed:\n{}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(dir.join("logs/kube-apiserver.log")).unwrap_or_default()
            );
        }
        let text = std::fs::read_to_string(dir.join("paths.env"))?;
        let mut env = HashMap::new();
        for line in text.lines() {
            let line = line.trim().trim_start_matches("export ");
            if let Some((k, v)) = line.split_once('=') {
                env.insert(
                    k.to_string(),
                    v.trim_matches(|c| c == '"' || c == '\'').to_string(),
                );
            }
        }
        cp.env = env;
        Ok(cp)
    }

    pub fn var(&self, k: &str) -> Result<String> {
        self.env
            .get(k)
            .cloned()
            .ok_or_else(|| anyhow!("{k} missing from paths.env"))
    }

    /// A `kubectl` command against this cluster (the system kubectl; it falls back from
    /// WebSocket to SPDY against this 1.20 server).
    pub fn kubectl(&self) -> Result<Command> {
        let mut c = Command::new("kubectl");
        c.env("KUBECONFIG", self.var("KUBECONFIG")?);
        Ok(c)
    }

    /// Runs kubectl with `stdin` text, returns the output (not checked).
    pub fn kubectl_run(
        &self,
        args: &[&str],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Output> {
        let mut c = self.kubectl()?;
        c.args(args);
        if let Some(input) = stdin {
            let mut child = c
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()?;
            let mut sin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
            let data = input.to_vec();
            let writer = std::thread::spawn(move || {
                let _ = sin.write_all(&data);
            });
            let pid = child.id();
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                let _ = tx.send(child.wait_with_output());
            });
            let out = match rx.recv_timeout(timeout) {
                Ok(o) => o?,
                Err(_) => {
                    let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
                    bail!("kubectl {args:?} timed out after {timeout:?}");
                }
            };
            let _ = writer.join();
            return Ok(out);
        }
        run(c, timeout)
    }

    /// kubectl that must succeed; returns stdout.
    pub fn kubectl_ok(&self, args: &[&str], stdin: Option<&[u8]>) -> Result<String> {
        let out = self.kubectl_run(args, stdin, Duration::from_secs(60))?;
        if !out.status.success() {
            bail!(
                "kubectl {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a Node with `addresses` ((type, address)) and kubelet port, and a running Pod
    /// on it with IP `pod_ip` and container `c1`.
    pub fn create_node_and_pod(
        &self,
        node: &str,
        addresses: &[(&str, &str)],
        kubelet_port: u16,
        pod: &str,
        pod_ip: &str,
    ) -> Result<()> {
        let addrs: Vec<String> = addresses
            .iter()
            .map(|(t, a)| format!("{{\"type\":\"{t}\",\"address\":\"{a}\"}}"))
            .collect();
        let node_json = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{{\"name\":\"{node}\"}},\
             \"status\":{{\"addresses\":[{}],\"daemonEndpoints\":{{\"kubeletEndpoint\":{{\"Port\":{kubelet_port}}}}}}}}}",
            addrs.join(",")
        );
        self.kubectl_ok(&["create", "-f", "-"], Some(node_json.as_bytes()))?;
        // Nodes keep their status on create; make sure, since that is what routes the test.
        let status = format!(
            "{{\"status\":{{\"addresses\":[{}],\"daemonEndpoints\":{{\"kubeletEndpoint\":{{\"Port\":{kubelet_port}}}}}}}}}",
            addrs.join(",")
        );
        self.kubectl_ok(
            &[
                "patch",
                "node",
                node,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
            None,
        )?;
        let pod_json = format!(
            "{{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{{\"name\":\"{pod}\",\"namespace\":\"default\"}},\
             \"spec\":{{\"nodeName\":\"{node}\",\"automountServiceAccountToken\":false,\
             \"containers\":[{{\"name\":\"c1\",\"image\":\"standin\"}}]}}}}"
        );
        self.kubectl_ok(&["create", "-f", "-"], Some(pod_json.as_bytes()))?;
        let status = format!(
            "{{\"status\":{{\"phase\":\"Running\",\"podIP\":\"{pod_ip}\",\"podIPs\":[{{\"ip\":\"{pod_ip}\"}}],\
             \"conditions\":[{{\"type\":\"Ready\",\"status\":\"True\"}}],\
             \"containerStatuses\":[{{\"name\":\"c1\",\"image\":\"standin\",\"imageID\":\"\",\"ready\":true,\
             \"restartCount\":0,\"started\":true,\"state\":{{\"running\":{{\"startedAt\":\"2024-01-01T00:00:00Z\"}}}}}}]}}}}"
        );
        self.kubectl_ok(
            &[
                "patch",
                "pod",
                pod,
                "--subresource=status",
                "--type=merge",
                "-p",
                &status,
            ],
            None,
        )?;
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let mut c = Command::new(&self.script);
        c.arg("down").arg(&self.dir);
        let _ = run(c, Duration::from_secs(60));
        if std::thread::panicking() {
            eprintln!(
                "---- kube-apiserver log (tail) ----\n{}",
                std::fs::read_to_string(self.dir.join("logs/kube-apiserver.log"))
                    .map(|l| l
                        .lines()
                        .rev()
                        .take(40)
                        .collect::<Vec<_>>()
                        .into_iter()
                        .rev()
                        .collect::<Vec<_>>()
                        .join("\n"))
                    .unwrap_or_default()
            );
        }
    }
}

/// A stand-in kubelet process (`petrel-standin-kubelet`), killed on drop.
pub struct Standin {
    pub proc: crate::procs::Proc,
    pub https: SocketAddr,
    pub read_only: SocketAddr,
}

impl std::fmt::Debug for Standin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standin")
            .field("https", &self.https)
            .finish()
    }
}

impl Standin {
    /// Starts it on `ip` (ephemeral ports) with the cluster's kubelet serving cert, requiring
    /// client certificates from the cluster CA.
    pub fn start(cp: &ControlPlane, ip: &str) -> Result<Self> {
        let mut cmd = Command::new(crate::procs::bin("petrel-standin-kubelet")?);
        cmd.args([
            "--address",
            &format!("{ip}:0"),
            "--read-only-port",
            "0",
            "--follow-interval-ms",
            "0",
        ])
        .args(["--cert", &cp.var("K8S_KUBELET_SERVING_CERT")?])
        .args(["--key", &cp.var("K8S_KUBELET_SERVING_KEY")?])
        .args(["--client-ca", &cp.var("K8S_CA_CRT")?]);
        let proc = crate::procs::Proc::spawn("standin", cmd)?;
        proc.wait_for_log("listening read-only on", Duration::from_secs(10))?;
        let log = proc.log();
        let find = |prefix: &str| -> Result<SocketAddr> {
            log.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|a| a.trim().parse().ok())
                .ok_or_else(|| anyhow!("no {prefix:?} in the stand-in's output: {log}"))
        };
        let https = find("listening https on ")?;
        let ro = find("listening read-only on ")?;
        // The read-only listener binds all interfaces when given only a port.
        let read_only = if ro.ip().is_unspecified() {
            SocketAddr::new(IpAddr::from([127, 0, 0, 1]), ro.port())
        } else {
            ro
        };
        Ok(Self {
            proc,
            https,
            read_only,
        })
    }

    /// `GET /standin/state` as JSON.
    pub fn state(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&crate::procs::http_get(
            self.read_only,
            "/standin/state",
        )?)?)
    }

    /// Appends a line to a container's log (pushed to followers at once).
    pub fn push_log(&self, pod: &str, line: &str) -> Result<()> {
        let mut s = TcpStream::connect_timeout(&self.read_only, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let body = format!("{line}\n");
        write!(
            s,
            "POST /standin/log/default/{pod}/c1 HTTP/1.0\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        if !resp.starts_with("HTTP/1.1 2") && !resp.starts_with("HTTP/1.0 2") {
            bail!("push failed: {resp}");
        }
        Ok(())
    }
}

/// An extra address on the root namespace's `lo` (e.g. a pod IP the API server accepts),
/// removed on drop.
#[derive(Debug)]
pub struct LoopbackAlias(String);

impl LoopbackAlias {
    pub fn add(ip: &str) -> Result<Self> {
        let cidr = format!("{ip}/32");
        let mut c = Command::new("ip");
        c.args(["addr", "replace", &cidr, "dev", "lo"]);
        let out = run(c, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "ip addr add {cidr} dev lo: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(Self(cidr))
    }
}

impl Drop for LoopbackAlias {
    fn drop(&mut self) {
        let mut c = Command::new("ip");
        c.args(["addr", "del", &self.0, "dev", "lo"]);
        let _ = run(c, Duration::from_secs(10));
    }
}

/// Polls until `f` holds, returning the elapsed time.
pub fn within(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) -> Result<Duration> {
    let start = Instant::now();
    wait_until(timeout, what, || f().then_some(()))?;
    Ok(start.elapsed())
}

/// A free port (re-exported for tests).
pub fn port() -> u16 {
    free_port()
}
