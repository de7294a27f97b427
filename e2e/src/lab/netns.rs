//! Network namespaces: running Rust code inside one (a fresh thread that `setns(2)`s into it, so
//! sockets it opens belong to that namespace), sysctls, and the registry of labs that lets
//! [`crate::lab::Lab::cleanup_stale`] tell a crashed run's namespaces from a live lab's.
//!
//! Registry: `/run/petrel-lab/<prefix>.json` records the owning process (pid + start time, so
//! a reused pid is not mistaken for the owner) and whether the lab was left up on purpose
//! (`petrel-lab up`). The record is created atomically (hard link of a complete file) before any
//! namespace exists and removed after the last one is gone; `/run/petrel-lab/<prefix>/` is the
//! lab's work directory (logs, inventory).

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context as _, Result};
use rustix::process::{kill_process, Pid, Signal};
use rustix::thread::{move_into_link_name_space, LinkNameSpaceType};
use serde::{Deserialize, Serialize};

use super::cmd::{command, run, wait_until, DEFAULT_TIMEOUT};
use super::layout::prefix_of_namespace;

/// Where `ip netns add` puts namespace handles.
pub const NETNS_DIR: &str = "/run/netns";
/// Where the lab registry and work directories live.
pub const STATE_DIR: &str = "/run/petrel-lab";

/// Whether this process runs as root (needed to create namespaces).
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// An error explaining that lab tests need root, unless we are root.
pub fn require_root() -> Result<()> {
    if is_root() {
        return Ok(());
    }
    bail!(
        "the network-namespace lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to create namespaces, \
         veths and nftables rules); run the lab tests as root, as CI does, e.g. \
         `sudo -E cargo test -p petrel-e2e --test lab_baseline`"
    )
}

/// `/run/netns/<ns>`.
pub fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Names of all named network namespaces.
pub fn list_netns() -> Result<Vec<String>> {
    let mut v = Vec::new();
    match fs::read_dir(NETNS_DIR) {
        Ok(rd) => {
            for e in rd {
                v.push(e?.file_name().to_string_lossy().into_owned());
            }
        }
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(e) => return Err(anyhow!(e).context(format!("listing {NETNS_DIR}"))),
    }
    v.sort();
    Ok(v)
}

/// Names of the namespaces belonging to lab `prefix`.
pub fn lab_namespaces(prefix: &str) -> Result<Vec<String>> {
    Ok(list_netns()?
        .into_iter()
        .filter(|n| prefix_of_namespace(n) == Some(prefix))
        .collect())
}

/// Code running on its own thread inside a network namespace; see [`spawn_in_netns`].
#[derive(Debug)]
pub struct NetnsTask<T> {
    rx: mpsc::Receiver<Result<T>>,
    what: String,
}

impl<T> NetnsTask<T> {
    /// The task's result, waiting at most `timeout`. On timeout the thread is left to finish on
    /// its own, so the closure must bound its own blocking calls (socket timeouts).
    pub fn wait(self, timeout: Duration) -> Result<T> {
        match self.rx.recv_timeout(timeout) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("{} did not finish within {timeout:?}", self.what)
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("{} panicked", self.what),
        }
    }
}

/// Runs `f` on a new thread that first enters network namespace `ns` (a name under
/// `/run/netns`, or any path to a netns file). Sockets `f` creates live in that namespace.
/// Only the network namespace changes: the thread still sees the host's files and /proc.
pub fn spawn_in_netns<T, F>(ns: &str, what: &str, f: F) -> Result<NetnsTask<T>>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    let path = if ns.contains('/') {
        PathBuf::from(ns)
    } else {
        netns_path(ns)
    };
    let file = File::open(&path)
        .with_context(|| format!("opening network namespace {}", path.display()))?;
    let what = format!("{what} (in netns {ns})");
    let (tx, rx) = mpsc::channel();
    let ctx = what.clone();
    thread::Builder::new()
        .name(format!("netns:{}", ns.rsplit('/').next().unwrap_or(ns)))
        .spawn(move || {
            let r = move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .map_err(|e| anyhow!(e).context(format!("setns into {}", path.display())))
                .and_then(|()| {
                    drop(file);
                    f()
                })
                .with_context(|| ctx);
            let _ = tx.send(r);
        })
        .context("spawning a namespace thread")?;
    Ok(NetnsTask { rx, what })
}

/// Runs `f` inside `ns` (see [`spawn_in_netns`]) and waits at most `timeout` for it.
pub fn in_netns<T, F>(ns: &str, timeout: Duration, f: F) -> Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T> + Send + 'static,
{
    spawn_in_netns(ns, "namespace task", f)?.wait(timeout)
}

/// `sysctl -w` inside `ns`, with sysctl(8) key syntax (`net.ipv4.ip_forward`,
/// `net.ipv6.conf.flannel/1.accept_ra`).
pub fn write_sysctls(ns: &str, settings: &[(&str, &str)]) -> Result<()> {
    let settings: Vec<(String, String)> = settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    in_netns(ns, DEFAULT_TIMEOUT, move || {
        for (key, value) in &settings {
            let rel: String = key
                .chars()
                .map(|c| {
                    if c == '.' {
                        '/'
                    } else if c == '/' {
                        '.'
                    } else {
                        c
                    }
                })
                .collect();
            let path = Path::new("/proc/sys").join(rel);
            fs::write(&path, value)
                .with_context(|| format!("sysctl {key}={value} ({})", path.display()))?;
        }
        Ok(())
    })
    .with_context(|| format!("setting sysctls in {ns}"))
}

/// Kills every process inside the given namespaces (never this process) and waits until they
/// are gone, so deleting the namespaces really frees their interfaces.
pub fn kill_namespace_processes(namespaces: &[String]) -> Result<()> {
    if namespaces.is_empty() {
        return Ok(());
    }
    let script: String = namespaces
        .iter()
        .map(|n| format!("netns pids {n}\n"))
        .collect();
    let out = run(
        command("ip", &["-force", "-batch", "-"]),
        Some(&script),
        DEFAULT_TIMEOUT,
    )?;
    let me = std::process::id();
    let pids: BTreeSet<u32> = out
        .stdout
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .filter(|p| *p != me)
        .collect();
    for pid in &pids {
        if let Some(p) = i32::try_from(*pid).ok().and_then(Pid::from_raw) {
            let _ = kill_process(p, Signal::KILL);
        }
    }
    wait_until(
        "processes in lab namespaces to exit",
        Duration::from_secs(10),
        || Ok(pids.iter().all(|p| !process_alive(*p))),
    )
}

/// Deletes the namespaces (tolerating ones already gone) and checks they are gone.
pub fn delete_namespaces(namespaces: &[String]) -> Result<()> {
    if namespaces.is_empty() {
        return Ok(());
    }
    let script: String = namespaces
        .iter()
        .map(|n| format!("netns del {n}\n"))
        .collect();
    let out = run(
        command("ip", &["-force", "-batch", "-"]),
        Some(&script),
        DEFAULT_TIMEOUT,
    )?;
    let left: Vec<String> = namespaces
        .iter()
        .filter(|n| netns_path(n).exists())
        .cloned()
        .collect();
    if !left.is_empty() {
        bail!(
            "namespaces still present after `ip netns del`: {left:?}\n{}",
            out.stderr.trim_end()
        );
    }
    Ok(())
}

/// Whether `pid` is a live (non-zombie) process.
fn process_alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// Start time (clock ticks since boot) of `pid`, to tell it from a later process with its pid.
fn process_start_time(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm)": state is field 3, starttime field 22.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .parse()
        .ok()
}

/// The registry record of one lab.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct LabRecord {
    /// Namespace prefix.
    pub prefix: String,
    /// Process that built it.
    pub owner_pid: u32,
    /// The owner's start time, in clock ticks since boot.
    pub owner_start_time: Option<u64>,
    /// Left up on purpose (`petrel-lab up`): only `petrel-lab down` removes it.
    pub persistent: bool,
    /// Creation time, seconds since the epoch.
    pub created_unix: u64,
}

impl LabRecord {
    /// Whether the owning process still runs.
    pub fn owner_alive(&self) -> bool {
        process_alive(self.owner_pid) && process_start_time(self.owner_pid) == self.owner_start_time
    }
}

/// What `petrel-lab list` shows for one lab.
#[derive(Clone, Debug)]
pub struct LabStatus {
    /// Namespace prefix.
    pub prefix: String,
    /// Registry record, if any.
    pub record: Option<LabRecord>,
    /// Its namespaces.
    pub namespaces: Vec<String>,
}

impl LabStatus {
    /// Left over by a run that died: no live owner and not kept on purpose.
    pub fn is_stale(&self) -> bool {
        match &self.record {
            None => true,
            Some(r) => !r.persistent && !r.owner_alive(),
        }
    }
}

fn record_path(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{prefix}.json"))
}

/// The work directory of lab `prefix`.
pub fn workdir(prefix: &str) -> PathBuf {
    Path::new(STATE_DIR).join(prefix)
}

/// Reads the registry record of `prefix`.
pub fn read_record(prefix: &str) -> Option<LabRecord> {
    serde_json::from_slice(&fs::read(record_path(prefix)).ok()?).ok()
}

fn write_new_record(rec: &LabRecord) -> Result<bool> {
    fs::create_dir_all(STATE_DIR).with_context(|| format!("creating {STATE_DIR}"))?;
    let tmp = Path::new(STATE_DIR).join(format!(".{}.{}.tmp", rec.prefix, std::process::id()));
    fs::write(&tmp, serde_json::to_vec_pretty(rec)?)
        .with_context(|| format!("writing {}", tmp.display()))?;
    let linked = fs::hard_link(&tmp, record_path(&rec.prefix));
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => {
            Err(anyhow!(e).context(format!("creating {}", record_path(&rec.prefix).display())))
        }
    }
}

/// Atomically claims `prefix` for this process. `Ok(false)` if another lab holds it or
/// namespaces with that prefix exist.
pub fn claim_prefix(prefix: &str, persistent: bool) -> Result<bool> {
    if !lab_namespaces(prefix)?.is_empty() {
        return Ok(false);
    }
    let me = std::process::id();
    let rec = LabRecord {
        prefix: prefix.to_owned(),
        owner_pid: me,
        owner_start_time: process_start_time(me),
        persistent,
        created_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
    };
    write_new_record(&rec)
}

/// Marks `prefix` as kept on purpose (rewrites its record).
pub fn mark_persistent(prefix: &str) -> Result<()> {
    let mut rec =
        read_record(prefix).ok_or_else(|| anyhow!("lab {prefix} has no registry record"))?;
    rec.persistent = true;
    let tmp = Path::new(STATE_DIR).join(format!(".{prefix}.{}.tmp", std::process::id()));
    fs::write(&tmp, serde_json::to_vec_pretty(&rec)?)?;
    fs::rename(&tmp, record_path(prefix))
        .with_context(|| format!("updating {}", record_path(prefix).display()))
}

/// Every lab visible on this machine: from namespace names and registry records.
pub fn list_labs() -> Result<Vec<LabStatus>> {
    let mut prefixes: BTreeSet<String> = BTreeSet::new();
    let all = list_netns()?;
    prefixes.extend(
        all.iter()
            .filter_map(|n| prefix_of_namespace(n))
            .map(str::to_owned),
    );
    if let Ok(rd) = fs::read_dir(STATE_DIR) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".json").unwrap_or(&name);
            if super::layout::is_valid_prefix(stem) {
                prefixes.insert(stem.to_owned());
            }
        }
    }
    Ok(prefixes
        .into_iter()
        .map(|p| LabStatus {
            record: read_record(&p),
            namespaces: all
                .iter()
                .filter(|n| prefix_of_namespace(n) == Some(p.as_str()))
                .cloned()
                .collect(),
            prefix: p,
        })
        .collect())
}

/// Removes everything of lab `prefix`: processes in its namespaces, the namespaces, its work
/// directory and finally its registry record.
pub fn destroy_lab(prefix: &str) -> Result<()> {
    let namespaces = lab_namespaces(prefix)?;
    kill_namespace_processes(&namespaces)
        .with_context(|| format!("stopping processes of lab {prefix}"))?;
    delete_namespaces(&namespaces)
        .with_context(|| format!("deleting namespaces of lab {prefix}"))?;
    match fs::remove_dir_all(workdir(prefix)) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(anyhow!(e).context(format!("removing {}", workdir(prefix).display())))
        }
        _ => {}
    }
    match fs::remove_file(record_path(prefix)) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            Err(anyhow!(e).context(format!("removing {}", record_path(prefix).display())))
        }
        _ => Ok(()),
    }
}
