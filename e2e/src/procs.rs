//! Running Petrel's real binaries in tests: locate them, give each its own temporary state,
//! capture its log to a file (shown when a test fails), and kill it on drop so a failing test
//! never leaves a hub or an agent behind.

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Path of a workspace binary (`petrel-gateway`, `petrel-edge-agent`). Integration tests of this
/// crate cannot make cargo build other packages' binaries, so the test command builds them first
/// (`cargo build --bins`); a missing binary is reported with that hint.
pub fn bin(name: &str) -> Result<PathBuf> {
    if let Ok(dir) = std::env::var("PETREL_BIN_DIR") {
        return Ok(PathBuf::from(dir).join(name));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/deps/<test-binary>, or target/<profile>/<binary> for the e2e binaries.
    let dir = exe
        .parent()
        .ok_or_else(|| anyhow!("unexpected binary location {}", exe.display()))?;
    let candidates = [Some(dir), dir.parent()];
    for d in candidates.into_iter().flatten() {
        let path = d.join(name);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("{name} is missing next to {}: build the binaries first (`cargo build --workspace --bins`, which the README's commands do)", exe.display())
}

/// A free loopback port for UDP and TCP alike (bound, read, released: good enough for tests).
pub fn free_port() -> u16 {
    loop {
        let Ok(udp) = UdpSocket::bind("127.0.0.1:0") else {
            continue;
        };
        let Ok(port) = udp.local_addr().map(|a| a.port()) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A running process whose stderr+stdout go to a shared buffer and a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    output: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Proc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Proc {
    pub fn spawn(name: &str, mut cmd: Command) -> Result<Self> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        cmd.env(
            "PETREL_LOG",
            std::env::var("PETREL_TEST_LOG").unwrap_or_else(|_| "info".into()),
        );
        let mut child = cmd
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let out = output.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("PETREL_TEST_ECHO").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    if let Ok(mut o) = out.lock() {
                        o.push_str(&line);
                        o.push('\n');
                    }
                }
            });
        }
        Ok(Self {
            name: name.to_string(),
            child,
            output,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> Result<()> {
        wait_until(
            timeout,
            &format!("{:?} in the log of {}", needle, self.name),
            || self.log().contains(needle).then_some(()),
        )
        .with_context(|| format!("log of {}:\n{}", self.name, self.log()))
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.try_wait() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- log of {} ----\n{}", self.name, self.log());
        }
    }
}

/// Runs a command to completion with a timeout.
pub fn run(mut cmd: Command, timeout: Duration) -> Result<Output> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().context("cannot start command")?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            bail!("command timed out after {timeout:?}: {cmd:?}")
        }
    }
}

/// A hub process with its own state directory and ports.
pub struct Hub {
    pub proc: Proc,
    pub port: u16,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
    pub extra_args: Vec<String>,
}

impl Hub {
    pub fn start(state_dir: &Path, extra_args: &[&str]) -> Result<Self> {
        Self::start_on(state_dir, free_port(), free_port(), extra_args)
    }

    pub fn start_on(
        state_dir: &Path,
        port: u16,
        admin_port: u16,
        extra_args: &[&str],
    ) -> Result<Self> {
        let mut cmd = Command::new(bin("petrel-gateway")?);
        cmd.args([
            "run",
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--hub-name",
            "test-hub",
        ])
        .arg("--state-dir")
        .arg(state_dir)
        .args(extra_args);
        // Tests run hubs side by side: each gets its own relay port unless the test picks one.
        if !extra_args.contains(&"--relay-listen") {
            cmd.args(["--relay-listen", &format!("127.0.0.1:{}", free_port())]);
        }
        let proc = Proc::spawn("hub", cmd)?;
        proc.wait_for_log("hub listening", Duration::from_secs(10))?;
        let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
        Ok(Self {
            proc,
            port,
            admin,
            state_dir: state_dir.to_path_buf(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
        })
    }

    pub fn server(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `petrel-gateway status --json`, parsed.
    pub fn status(&self) -> Result<serde_json::Value> {
        let mut cmd = Command::new(bin("petrel-gateway")?);
        cmd.args(["status", "--json", "--admin-addr", &self.admin.to_string()]);
        let out = run(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!("status failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Connected agents by node name.
    pub fn agents(&self) -> Vec<serde_json::Value> {
        self.status()
            .ok()
            .and_then(|s| s.get("agents").and_then(|a| a.as_array().cloned()))
            .unwrap_or_default()
    }

    pub fn agent(&self, node: &str) -> Option<serde_json::Value> {
        self.agents()
            .into_iter()
            .find(|a| a.get("node").and_then(|n| n.as_str()) == Some(node))
    }

    /// `token create`, returning (token, ca fingerprint).
    pub fn token(&self, node: &str, extra: &[&str]) -> Result<(String, String)> {
        let mut cmd = Command::new(bin("petrel-gateway")?);
        cmd.args([
            "token",
            "create",
            "--node",
            node,
            "--server",
            &self.server(),
        ])
        .arg("--state-dir")
        .arg(&self.state_dir)
        .args(extra);
        let out = run(cmd, Duration::from_secs(10))?;
        if !out.status.success() {
            bail!(
                "token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        parse_token_create(&String::from_utf8_lossy(&out.stdout))
    }

    pub fn metrics(&self) -> Result<String> {
        http_get(self.admin, "/metrics")
    }
}

/// Result of `petrel-edge-agent join`.
#[derive(Debug)]
pub struct JoinOutcome {
    pub success: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

pub fn join(
    server: &str,
    node: &str,
    token: &str,
    fingerprint: &str,
    state_dir: &Path,
) -> Result<JoinOutcome> {
    let mut cmd = Command::new(bin("petrel-edge-agent")?);
    cmd.args([
        "join",
        "--server",
        server,
        "--node-name",
        node,
        "--token",
        token,
        "--ca-sha256",
        fingerprint,
        "--timeout",
        "10s",
    ])
    .arg("--state-dir")
    .arg(state_dir);
    let out = run(cmd, Duration::from_secs(20))?;
    Ok(JoinOutcome {
        success: out.status.success(),
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// An agent process.
pub struct Agent {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub state_dir: PathBuf,
}

impl Agent {
    pub fn start(name: &str, state_dir: &Path, servers: &[String], extra: &[&str]) -> Result<Self> {
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut cmd = Command::new(bin("petrel-edge-agent")?);
        cmd.args(["run", "--admin-addr", &admin.to_string()])
            .arg("--state-dir")
            .arg(state_dir)
            .args(extra);
        // Outside a lab there is no Flannel device: without a data plane unless the test asks
        // for one (an agent whose data plane cannot open is not ready).
        if !extra
            .iter()
            .any(|a| *a == "--hooks" || a.starts_with("--hooks="))
        {
            cmd.args(["--hooks", "none"]);
        }
        for s in servers {
            cmd.args(["--server", s]);
        }
        let proc = Proc::spawn(name, cmd)?;
        Ok(Self {
            proc,
            admin,
            state_dir: state_dir.to_path_buf(),
        })
    }

    pub fn status(&self) -> Result<serde_json::Value> {
        Ok(serde_json::from_str(&http_get(self.admin, "/status")?)?)
    }

    pub fn ready(&self) -> bool {
        http_status(self.admin, "/readyz")
            .map(|c| c == 200)
            .unwrap_or(false)
    }
}

/// A minimal HTTP/1.0 GET for admin endpoints.
pub fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let (code, body) = http(addr, path)?;
    if code != 200 {
        bail!("GET {path} answered {code}: {body}");
    }
    Ok(body)
}

pub fn http_status(addr: SocketAddr, path: &str) -> Result<u16> {
    Ok(http(addr, path)?.0)
}

fn http(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    use std::io::Write;
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let code = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow!("bad HTTP response"))?;
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((code, body))
}

/// The token and CA fingerprint out of `petrel-gateway token create`'s output: the token from
/// its `export PETREL_JOIN_TOKEN=` line (it is never on the join command line, where `ps` would
/// show it), the fingerprint from the join command.
pub fn parse_token_create(stdout: &str) -> Result<(String, String)> {
    let token = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export PETREL_JOIN_TOKEN="))
        .ok_or_else(|| anyhow!("no `export PETREL_JOIN_TOKEN=` line in {stdout}"))?;
    let line = stdout
        .lines()
        .find(|l| l.starts_with("petrel-edge-agent join"))
        .ok_or_else(|| anyhow!("no join command in {stdout}"))?;
    if line.split_whitespace().any(|w| w == "--token") {
        return Err(anyhow!("the join command carries the token: {line}"));
    }
    let mut words = line.split_whitespace();
    let fp = words
        .position(|w| w == "--ca-sha256")
        .and_then(|_| words.next())
        .ok_or_else(|| anyhow!("no fingerprint in {line}"))?;
    Ok((token.trim().to_string(), fp.to_string()))
}
