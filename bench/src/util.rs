//! Measuring helpers: process CPU and memory from /proc, whole-machine CPU, summary statistics,
//! iperf3 runs, a TCP request/response latency probe and small byte servers that run inside lab
//! namespaces.

use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use serde::Serialize;

use petrel_e2e::lab::{spawn_in_netns, ChildGuard, Lab};
use petrel_e2e::measure::{percentile_sorted, StopFlag};

/// Clock ticks per second of /proc/*/stat (USER_HZ; 100 on every Linux we run on).
const CLK_TCK: f64 = 100.0;

/// utime + stime of `pid`, in seconds (0 if it is gone).
pub fn proc_cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    // After "(comm)": field 3 is the state; utime and stime are fields 14 and 15.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    (ticks(11) + ticks(12)) as f64 / CLK_TCK
}

/// Sum of [`proc_cpu_secs`] over `pids`.
pub fn pids_cpu_secs(pids: &[u32]) -> f64 {
    pids.iter().map(|p| proc_cpu_secs(*p)).sum()
}

/// Resident set size of `pid` in KiB (0 if it is gone).
pub use petrel_e2e::apiserver::rss_kib as proc_rss_kib;

/// A `/proc/meminfo` field (`key` with its colon, e.g. `"MemAvailable:"`) in KiB.
pub fn meminfo_kib(key: &str) -> Option<u64> {
    std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    })
}

/// Busy CPU seconds of the whole machine (all cores: user, nice, system, irq, softirq, steal).
pub fn machine_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| v.get(*i)).sum();
    busy as f64 / CLK_TCK
}

/// Median, spread and the samples of one figure.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Stat {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub samples: Vec<f64>,
}

impl Stat {
    pub fn of(samples: Vec<f64>) -> Stat {
        if samples.is_empty() {
            return Stat::default();
        }
        let mut s = samples.clone();
        s.sort_by(f64::total_cmp);
        Stat {
            median: percentile_sorted(&s, 50.0),
            min: s[0],
            max: s[s.len() - 1],
            samples,
        }
    }
}

/// p50 and p99 of durations, in microseconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Latency {
    pub n: usize,
    pub p50_us: f64,
    pub p99_us: f64,
}

impl Latency {
    pub fn of(d: &[Duration]) -> Latency {
        let mut v: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        Latency {
            n: v.len(),
            p50_us: percentile_sorted(&v, 50.0),
            p99_us: percentile_sorted(&v, 99.0),
        }
    }
}

/// One iperf3 client run.
#[derive(Clone, Debug, Serialize)]
pub struct IperfRun {
    pub gbit_per_s: f64,
    pub retransmits: u64,
    /// CPU seconds of the tunnel processes during the run.
    pub tunnel_cpu_s: f64,
    /// Busy CPU seconds of the whole machine during the run.
    pub machine_cpu_s: f64,
    /// Gbit received.
    pub gbit: f64,
}

/// An iperf3 server in `ns`; dropped = killed.
pub fn iperf_server(lab: &Lab, ns: &str, port: u16) -> Result<ChildGuard> {
    let port_s = port.to_string();
    let ip_ns = lab.endpoint_ns(ns)?;
    let g = lab.spawn(&ip_ns, &["iperf3", "-s", "-p", &port_s])?;
    // Wait until it listens.
    petrel_e2e::lab::wait_until("iperf3 server listening", Duration::from_secs(5), || {
        let out = petrel_e2e::lab::cmd::run(
            petrel_e2e::lab::cmd::command("ip", &["netns", "exec", &ip_ns, "ss", "-Hltn"]),
            None,
            Duration::from_secs(5),
        )?;
        Ok(out.stdout.contains(&format!(":{port} ")))
    })?;
    Ok(g)
}

/// The iperf3 server of one measurement (a bench row): started for it and killed, with its
/// process group, when it is dropped, on success and failure alike. An iperf3 server runs one
/// test at a time and stays "busy" after a client that gave up mid-test (a warm-up through a
/// tunnel still coming up, a run killed by its timeout) until its 120 s receive timeout; a
/// server shared across rows once failed the next row with "the server is busy running a
/// test". [`IperfServer::run`] restarts it when that happens.
pub struct IperfServer {
    node: String,
    port: u16,
    guard: Option<ChildGuard>,
}

impl IperfServer {
    /// Starts `iperf3 -s -p port` in the pod of `node` and waits until it listens.
    pub fn start(lab: &Lab, node: &str, port: u16) -> Result<IperfServer> {
        Ok(IperfServer {
            node: node.to_string(),
            port,
            guard: Some(iperf_server(lab, node, port)?),
        })
    }

    /// Kills the server (waiting until it is gone, so its port is free) and starts a new one.
    fn restart(&mut self, lab: &Lab) -> Result<()> {
        drop(self.guard.take());
        self.guard = Some(iperf_server(lab, &self.node, self.port)?);
        Ok(())
    }

    /// [`iperf_client`] from `from` to this server at `to`; if the server is still busy with a
    /// test that will not finish, it is restarted and the run tried again (twice at most).
    pub fn run(
        &mut self,
        lab: &Lab,
        from: &str,
        to: Ipv4Addr,
        flows: u32,
        secs: u32,
        pids: &[u32],
    ) -> Result<IperfRun> {
        let mut attempt = 0;
        loop {
            match iperf_client(lab, from, to, self.port, flows, secs, pids) {
                Err(e) if attempt < 2 && format!("{e:#}").contains("busy") => {
                    attempt += 1;
                    eprintln!(
                        "petrel-bench: iperf3 server in {} busy ({e:#}); restarting it",
                        self.node
                    );
                    self.restart(lab)?;
                }
                r => return r,
            }
        }
    }
}

/// Runs `iperf3 -c to -P flows -t secs -J` from endpoint `from`, sampling the CPU of `pids`.
pub fn iperf_client(
    lab: &Lab,
    from: &str,
    to: Ipv4Addr,
    port: u16,
    flows: u32,
    secs: u32,
    pids: &[u32],
) -> Result<IperfRun> {
    let ns = lab.endpoint_ns(from)?;
    let (cpu0, m0) = (pids_cpu_secs(pids), machine_cpu_secs());
    let out = petrel_e2e::lab::cmd::run(
        petrel_e2e::lab::cmd::command(
            "ip",
            &[
                "netns",
                "exec",
                &ns,
                "iperf3",
                "-c",
                &to.to_string(),
                "-p",
                &port.to_string(),
                "-P",
                &flows.to_string(),
                "-t",
                &secs.to_string(),
                "-J",
                // Mbit/s-range paths (the WAN emulation) need a little longer to connect.
                "--connect-timeout",
                "5000",
            ],
        ),
        None,
        Duration::from_secs(u64::from(secs) + 30),
    )?;
    let (cpu1, m1) = (pids_cpu_secs(pids), machine_cpu_secs());
    let j: serde_json::Value = serde_json::from_str(&out.stdout).with_context(|| {
        format!(
            "iperf3 printed no JSON (exit {}): {}{}",
            out.status, out.stdout, out.stderr
        )
    })?;
    if let Some(e) = j["error"].as_str() {
        bail!("iperf3 {from} -> {to}: {e}");
    }
    let bps = j["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .ok_or_else(|| anyhow!("iperf3 JSON without end.sum_received"))?;
    let bytes = j["end"]["sum_received"]["bytes"].as_f64().unwrap_or(0.0);
    Ok(IperfRun {
        gbit_per_s: bps / 1e9,
        retransmits: j["end"]["sum_sent"]["retransmits"].as_u64().unwrap_or(0),
        tunnel_cpu_s: cpu1 - cpu0,
        machine_cpu_s: m1 - m0,
        gbit: bytes * 8.0 / 1e9,
    })
}

/// Request/response echo server (fixed-size messages) in namespace `ns`, one thread per
/// connection; stops when the flag is dropped.
pub fn rr_server(ns: &str, port: u16) -> Result<StopFlag> {
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _task = spawn_in_netns(ns, "rr server", move || {
        let l = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        l.set_nonblocking(true)?;
        let _ = ready_tx.send(());
        while !s2.load(Ordering::SeqCst) {
            match l.accept() {
                Ok((mut c, _)) => {
                    let s3 = s2.clone();
                    std::thread::spawn(move || {
                        let _ = c.set_nonblocking(false);
                        let _ = c.set_nodelay(true);
                        let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut b = [0u8; 64];
                        while !s3.load(Ordering::SeqCst) {
                            if c.read_exact(&mut b).is_err() || c.write_all(&b).is_err() {
                                return;
                            }
                        }
                    });
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        }
        Ok(())
    })?;
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .map_err(|_| anyhow!("rr server in {ns} did not start"))?;
    Ok(StopFlag(stop))
}

/// `n` 64-byte request/response round trips from namespace `ns` to `to`, after 20 warm-up ones.
pub fn rr_client(ns: &str, to: SocketAddr, n: usize) -> Result<Latency> {
    spawn_in_netns(ns, "rr client", move || {
        let mut c = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut b = [7u8; 64];
        let mut v = Vec::with_capacity(n);
        for i in 0..n + 20 {
            let t = Instant::now();
            c.write_all(&b)?;
            c.read_exact(&mut b)?;
            if i >= 20 {
                v.push(t.elapsed());
            }
        }
        Ok(Latency::of(&v))
    })?
    .wait(Duration::from_secs(60 + n as u64 / 100))
}

/// Raises RLIMIT_NOFILE (soft and hard) to at least `want`; children inherit it.
pub fn raise_nofile(want: u64) -> Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let cur = getrlimit(Resource::Nofile);
    if cur.current.unwrap_or(u64::MAX) >= want {
        return Ok(cur.current.unwrap_or(u64::MAX));
    }
    // Raise the hard limit too where allowed (root with CAP_SYS_RESOURCE); otherwise up to it.
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(want),
            maximum: Some(cur.maximum.map_or(want, |h| h.max(want))),
        },
    );
    if raised.is_ok() {
        return Ok(want);
    }
    let hard = cur.maximum.unwrap_or(want).min(want);
    setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(hard),
            maximum: cur.maximum,
        },
    )
    .with_context(|| format!("raising the open-file limit to {hard}"))?;
    Ok(hard)
}

/// Whether `program` is on PATH.
pub fn have(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|p| {
        std::env::split_paths(&p).any(|d| {
            let f = d.join(program);
            f.is_file()
        })
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stat::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert_eq!(Stat::of(vec![1.0, 2.0, 3.0, 4.0]).median, 2.5);
        let l = Latency::of(&(1..=100).map(Duration::from_micros).collect::<Vec<_>>());
        assert_eq!((l.p50_us.round(), l.p99_us.round()), (51.0, 99.0));
        assert!(proc_cpu_secs(std::process::id()) >= 0.0);
        assert!(proc_rss_kib(std::process::id()) > 0);
        assert!(machine_cpu_secs() > 0.0);
        assert!(meminfo_kib("MemAvailable:").is_some_and(|k| k > 0));
    }
}
