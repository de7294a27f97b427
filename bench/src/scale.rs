//! Hub scale: one real hub on loopback, `petrel-loadgen` with N simulated agents against it.
//! Measures the time for all N to connect, the hub's memory per idle agent (RSS delta / N), its
//! CPU at idle (keepalives only), and the time for all N to be back after `kill -9` of the hub
//! and an immediate restart with the same state.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use serde::Serialize;

use super::loadgen;
use super::util::{meminfo_kib, proc_cpu_secs, proc_rss_kib};
use petrel_e2e::apiserver::metric;
use petrel_e2e::procs::{bin, free_port, Hub, Proc};

/// One scale run.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ScaleRow {
    pub agents: usize,
    /// From the loadgen's first connect attempt to all N connected.
    pub connect_all_s: Option<f64>,
    /// From the loadgen's start to every agent's first route snapshot sent (paced by the hub);
    /// memory and CPU per idle agent are measured after it.
    pub routes_synced_s: Option<f64>,
    pub hub_rss_base_kib: Option<u64>,
    /// RSS at the end of the idle window.
    pub hub_rss_kib: Option<u64>,
    /// (RSS with N idle agents - RSS before) / N, at the end of the idle window (the hub gives
    /// freed heap back every 10 s, so this is its steady state).
    pub kib_per_agent: Option<f64>,
    /// The same 2 s after the last snapshot was sent (the reading before session 15), when the
    /// sync wave's freed heap may not have been given back yet.
    pub kib_per_agent_after_sync: Option<f64>,
    /// Hub CPU over the idle window, % of one core.
    pub hub_cpu_idle_pct: Option<f64>,
    pub idle_window_s: u64,
    /// From `kill -9` of the hub (restarted at once) to all N connected again. Includes the time
    /// agents need to notice (their next packet: keepalive every 5 s, or traffic).
    pub reconnect_all_s: Option<f64>,
    pub loadgen_rss_kib: Option<u64>,
    /// Every simulated agent is a routable node of the inventory: the route table has N entries.
    /// Encoded size of a Welcome (the view, without routes).
    pub welcome_bytes: Option<u64>,
    /// Route-table bytes each agent was sent on its first connect (the snapshot).
    pub snapshot_bytes_per_agent: Option<f64>,
    /// Route-table bytes each agent was sent for an inventory change touching one node.
    pub change_bytes_per_agent: Option<f64>,
    /// Route-table bytes each agent was sent on its reconnect after the hub restart (it holds
    /// the current table: the digest only).
    pub reconnect_bytes_per_agent: Option<f64>,
    pub failures: Option<u64>,
    /// The load generator's failures during the reconnect storm, by kind: each agent's lost
    /// session ("reset by peer", or "hub silent" for one that heard no reset) and every connect
    /// attempt that failed ("no answer within", an expired Retry token, ...).
    pub storm_failure_kinds: Option<std::collections::BTreeMap<String, u64>>,
    pub error: Option<String>,
}

fn last_line(p: &Proc) -> Option<serde_json::Value> {
    p.log()
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
}

fn field(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or(0)
}

/// The route table (hex digest) that all `n` agents hold, per the loadgen's status line.
fn table_held_by(v: &serde_json::Value, n: usize) -> Option<String> {
    v["tables"]
        .as_object()?
        .iter()
        .find(|(_, count)| count.as_u64() == Some(n as u64))
        .map(|(digest, _)| digest.clone())
}

/// MemAvailable in KiB (unknown: no limit).
fn mem_available_kib() -> u64 {
    meminfo_kib("MemAvailable:").unwrap_or(u64::MAX)
}

/// Below this the run stops rather than push the machine into the OOM killer.
const MIN_AVAILABLE_KIB: u64 = 2 << 20;

/// Polls the loadgen's last status line until `pred` holds, watching the machine's memory and
/// the loadgen itself (one that died is not waited for until the timeout).
fn wait_line(
    lg: &mut Proc,
    hub_pid: u32,
    timeout: Duration,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> Result<serde_json::Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(l) = last_line(lg) {
            if pred(&l) {
                return Ok(l);
            }
        }
        if let Some(status) = lg.try_wait() {
            bail!(
                "the loadgen exited ({status}) while waiting for {what}: {}",
                lg.log()
                    .lines()
                    .rev()
                    .take(3)
                    .collect::<Vec<_>>()
                    .join(" | ")
            );
        }
        let avail = mem_available_kib();
        if avail < MIN_AVAILABLE_KIB {
            bail!(
                "stopped waiting for {what}: only {} MiB of memory left (hub RSS {} MiB, loadgen RSS {} MiB)",
                avail / 1024,
                proc_rss_kib(hub_pid) / 1024,
                proc_rss_kib(lg.pid()) / 1024
            );
        }
        if Instant::now() >= deadline {
            bail!(
                "timed out after {timeout:?} waiting for {what}; loadgen: {:?}",
                last_line(lg)
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs one scale measurement with `n` agents; errors end up in the row.
pub fn run(n: usize, idle_secs: u64, dir: &Path) -> ScaleRow {
    let mut row = ScaleRow {
        agents: n,
        idle_window_s: idle_secs,
        ..Default::default()
    };
    if let Err(e) = measure(n, idle_secs, dir, &mut row) {
        row.error = Some(format!("{e:#}"));
    }
    row
}

fn measure(n: usize, idle_secs: u64, dir: &Path, row: &mut ScaleRow) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let state = dir.join("hub");
    let inv = dir.join("inventory.toml");
    std::fs::write(&inv, loadgen::inventory_toml("load", n))?;
    let inv_s = inv.display().to_string();
    let extra = ["--inventory", inv_s.as_str()];
    let (port, admin) = (free_port(), free_port());
    let mut hub = Hub::start_on(&state, port, admin, &extra)?;
    // The hub listens (start_on waited for that); let its start-up allocations settle before
    // the baseline RSS.
    std::thread::sleep(Duration::from_millis(500));
    let base = proc_rss_kib(hub.proc.pid());
    row.hub_rss_base_kib = Some(base);
    let mut cmd = Command::new(bin("petrel-loadgen")?);
    cmd.args([
        "--server",
        &format!("127.0.0.1:{port}"),
        "--hub-state",
        &state.display().to_string(),
        "--count",
        &n.to_string(),
        "--report-every-ms",
        "100",
    ]);
    let mut lg = Proc::spawn("loadgen", cmd)?;
    let t_connect = Instant::now();
    let connect_budget = Duration::from_secs(60 + n as u64 / 50);
    let connected = wait_line(
        &mut lg,
        hub.proc.pid(),
        connect_budget,
        "all simulated agents connected",
        |l| field(l, "connected") == n as u64,
    )
    .map_err(|e| {
        anyhow!(
            "{e}; hub log tail: {}",
            hub.proc
                .log()
                .lines()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
                .join(" | ")
        )
    })?;
    row.connect_all_s = connected["t_s"].as_f64();
    // Connected is not idle: the hub paces each agent's first route snapshot (see
    // route_sync::SyncPacer), so the last ones are still going out when the last agent
    // connects. Memory and CPU "per idle agent" are measured once every agent holds the table.
    let synced_budget = Duration::from_secs(120 + n as u64 / 50);
    let synced_at = Instant::now() + synced_budget;
    loop {
        let m = hub.metrics()?;
        if metric(
            &m,
            "petrel_hub_route_sync_batches_total{outcome=\"snapshot\"}",
        ) >= n as f64
        {
            row.routes_synced_s = Some(t_connect.elapsed().as_secs_f64());
            break;
        }
        if Instant::now() >= synced_at {
            bail!("not every agent was sent its route snapshot within {synced_budget:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Idle: let allocations settle, then measure CPU over the window and memory at its end.
    std::thread::sleep(Duration::from_secs(2));
    let pid = hub.proc.pid();
    let per_agent = |rss: u64| (rss as f64 - base as f64) / n as f64;
    row.kib_per_agent_after_sync = Some(per_agent(proc_rss_kib(pid)));
    let c0 = proc_cpu_secs(pid);
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_secs));
    row.hub_cpu_idle_pct = Some((proc_cpu_secs(pid) - c0) / t0.elapsed().as_secs_f64() * 100.0);
    let rss = proc_rss_kib(pid);
    row.hub_rss_kib = Some(rss);
    row.kib_per_agent = Some(per_agent(rss));
    row.loadgen_rss_kib = Some(proc_rss_kib(lg.pid()));
    let m = hub.metrics()?;
    row.welcome_bytes = Some(metric(&m, "petrel_hub_welcome_bytes") as u64);
    row.snapshot_bytes_per_agent = Some(
        metric(
            &m,
            "petrel_hub_route_sync_bytes_total{outcome=\"snapshot\"}",
        ) / n as f64,
    );
    // One node's public IP changes: every agent is sent that node's entry.
    let old_table = last_line(&lg).and_then(|l| table_held_by(&l, n));
    let delta0 = metric(&m, "petrel_hub_route_sync_bytes_total{outcome=\"delta\"}");
    let batches0 = metric(&m, "petrel_hub_route_sync_batches_total{outcome=\"delta\"}");
    std::fs::write(&inv, loadgen::inventory_toml_with("load", n, Some(0)))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let m = hub.metrics()?;
        if metric(&m, "petrel_hub_route_sync_batches_total{outcome=\"delta\"}")
            >= batches0 + n as f64
        {
            row.change_bytes_per_agent = Some(
                (metric(&m, "petrel_hub_route_sync_bytes_total{outcome=\"delta\"}") - delta0)
                    / n as f64,
            );
            break;
        }
        if Instant::now() >= deadline {
            bail!("the inventory change did not reach every agent within 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    // The hub has sent every agent its delta; the kill below must not race the last of them
    // being read, or those agents come back with the old table and are sent a snapshot (the
    // reconnect row read 19 to 347 bytes per agent before).
    wait_line(
        &mut lg,
        hub.proc.pid(),
        Duration::from_secs(30),
        "every agent holding the changed route table",
        |l| table_held_by(l, n).is_some_and(|d| Some(d) != old_table),
    )?;
    let before = last_line(&lg).ok_or_else(|| anyhow!("loadgen printed nothing"))?;
    if field(&before, "connected") != n as u64 {
        bail!("agents dropped while idle: {before}");
    }
    let connects0 = field(&before, "connects");
    // kill -9 and restart at once.
    let t_kill = Instant::now();
    hub.proc.kill();
    drop(hub);
    let hub = Hub::start_on(&state, port, admin, &extra)?;
    wait_line(
        &mut lg,
        hub.proc.pid(),
        Duration::from_secs(120 + n as u64 / 50),
        "all simulated agents back after the hub restart",
        |l| field(l, "connected") == n as u64 && field(l, "connects") >= connects0 + n as u64,
    )?;
    row.reconnect_all_s = Some(t_kill.elapsed().as_secs_f64());
    let m = hub.metrics()?;
    row.reconnect_bytes_per_agent = Some(
        (metric(&m, "petrel_hub_route_sync_bytes_total{outcome=\"current\"}")
            + metric(
                &m,
                "petrel_hub_route_sync_bytes_total{outcome=\"snapshot\"}",
            )
            + metric(&m, "petrel_hub_route_sync_bytes_total{outcome=\"delta\"}"))
            / n as f64,
    );
    row.failures = last_line(&lg).map(|l| field(&l, "failures"));
    let kinds = |l: &serde_json::Value| -> std::collections::BTreeMap<String, u64> {
        l["failure_kinds"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default()
    };
    row.storm_failure_kinds = last_line(&lg).map(|after| {
        let before = kinds(&before);
        kinds(&after)
            .into_iter()
            .map(|(k, n)| {
                let was = before.get(&k).copied().unwrap_or(0);
                (k, n.saturating_sub(was))
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    });
    drop(lg);
    drop(hub);
    Ok(())
}
