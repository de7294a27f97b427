//! Petrel running in the network-namespace lab: the hub on gw-1, the node role on every cloud
//! and Express Connect node, an enrolled agent on every public-site node, all real processes
//! started the way an operator would, and stopped (gracefully, so they remove what they added)
//! when the test is done.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::lab::{ChildGuard, Lab, SiteKind};
use crate::procs::{bin, wait_until};

pub const HUB_PORT: u16 = 7443;
pub const HUB_ADMIN: &str = "127.0.0.1:9470";
pub const AGENT_ADMIN: &str = "127.0.0.1:9471";
/// The node role's admin address (its default).
pub const NODE_ADMIN: &str = "127.0.0.1:9472";

/// Petrel's processes in a lab.
pub struct PetrelLab<'a> {
    pub lab: &'a Lab,
    pub hooks: String,
    pub dir: PathBuf,
    pub hub: ChildGuard,
    pub node_roles: Vec<(String, ChildGuard)>,
    pub agents: Vec<(String, ChildGuard)>,
    /// The commands the hub and the agents were started with, and the arguments the last
    /// [`PetrelLab::restart_with`] added: every respawn runs the same command again.
    hub_argv: Vec<String>,
    agent_argv: Vec<Vec<String>>,
    hub_extra: Vec<String>,
    agent_extra: Vec<String>,
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .ok_or_else(|| anyhow!("non-UTF-8 path {}", p.display()))
}

impl<'a> PetrelLab<'a> {
    /// Starts the hub, the node roles and the agents (enrolling each with a fresh token), and
    /// waits until every agent is connected and has applied its routes at the full site MTU.
    pub fn start(lab: &'a Lab, hooks: &str, dir: &Path) -> Result<Self> {
        Self::start_with(lab, hooks, dir, &[])
    }

    /// [`PetrelLab::start`] with extra arguments for `petrel-gateway run` (e.g. egress flags).
    pub fn start_with(lab: &'a Lab, hooks: &str, dir: &Path, hub_args: &[&str]) -> Result<Self> {
        Self::start_with_roles(lab, hooks, dir, hub_args, &[])
    }

    /// [`PetrelLab::start_with`] with extra arguments for every `petrel-gateway node` too.
    pub fn start_with_roles(
        lab: &'a Lab,
        hooks: &str,
        dir: &Path,
        hub_args: &[&str],
        node_args: &[&str],
    ) -> Result<Self> {
        let gw = bin("petrel-gateway")?;
        let agent_bin = bin("petrel-edge-agent")?;
        let (gw_s, agent_s) = (
            path_str(&gw)?.to_string(),
            path_str(&agent_bin)?.to_string(),
        );
        let inventory = dir.join("inventory.toml");
        lab.write_inventory(&inventory)?;
        let inv = path_str(&inventory)?.to_string();
        let hub_state = dir.join("hub");
        let hub_state_s = path_str(&hub_state)?.to_string();
        let public = lab.gateway_public_ip().to_string();
        let gw_node = lab.gateway().name.clone();
        let listen = format!("0.0.0.0:{HUB_PORT}");
        let advertise = format!("{public}:{HUB_PORT}");
        let mut hub_cmd: Vec<&str> = vec![
            &gw_s,
            "run",
            "--listen",
            &listen,
            "--admin-addr",
            HUB_ADMIN,
            "--state-dir",
            &hub_state_s,
            "--inventory",
            &inv,
            "--node-name",
            &gw_node,
            "--hub-name",
            &gw_node,
            "--advertise",
            &advertise,
        ];
        hub_cmd.extend_from_slice(hub_args);
        let hub_argv: Vec<String> = hub_cmd.iter().map(|s| s.to_string()).collect();
        let mut hub = lab.spawn(&gw_node, &hub_cmd)?;
        hub.wait_for_log("hub listening", Duration::from_secs(10))?;
        let mut node_roles = Vec::new();
        for n in lab
            .nodes()
            .iter()
            .filter(|n| n.site_kind != SiteKind::Public)
        {
            let mut argv = vec![
                gw_s.as_str(),
                "node",
                "--node-name",
                &n.name,
                "--inventory",
                &inv,
                "--hooks",
                hooks,
            ];
            argv.extend_from_slice(node_args);
            let mut g = lab.spawn(&n.name, &argv)?;
            g.wait_for_log("node role starting", Duration::from_secs(10))
                .with_context(|| format!("node role on {}", n.name))?;
            node_roles.push((n.name.clone(), g));
        }
        let mut agents = Vec::new();
        let mut agent_argv = Vec::new();
        for n in lab
            .nodes()
            .iter()
            .filter(|n| n.site_kind == SiteKind::Public)
        {
            let out = crate::lab::cmd::run_checked(
                crate::lab::cmd::command(
                    &gw_s,
                    &[
                        "token",
                        "create",
                        "--node",
                        &n.name,
                        "--state-dir",
                        &hub_state_s,
                        "--server",
                        &format!("{public}:{HUB_PORT}"),
                        "--inventory",
                        &inv,
                    ],
                ),
                None,
                Duration::from_secs(10),
            )?;
            let join = out
                .stdout
                .lines()
                .find(|l| l.starts_with("petrel-edge-agent join"))
                .ok_or_else(|| anyhow!("no join command: {}", out.stdout))?;
            // The token comes on its own `export` line, never on the join command line.
            let (token, _) = crate::procs::parse_token_create(&out.stdout)?;
            let state = dir.join(&n.name);
            let mut args: Vec<String> = join
                .split_whitespace()
                .skip(1)
                .map(str::to_string)
                .collect();
            args.extend(["--state-dir".to_string(), path_str(&state)?.to_string()]);
            let mut cmd = lab.command(&n.name, &agent_s)?;
            cmd.args(&args).env("PETREL_JOIN_TOKEN", &token);
            crate::lab::cmd::run_checked(cmd, None, crate::lab::cmd::DEFAULT_TIMEOUT)
                .with_context(|| format!("join on {}", n.name))?;
            let argv = [
                &agent_s,
                "run",
                "--state-dir",
                path_str(&state)?,
                "--admin-addr",
                AGENT_ADMIN,
                "--hooks",
                hooks,
            ];
            let g = lab.spawn(&n.name, &argv)?;
            agent_argv.push(argv.iter().map(|s| s.to_string()).collect());
            agents.push((n.name.clone(), g));
        }
        let me = Self {
            lab,
            hooks: hooks.to_string(),
            dir: dir.to_path_buf(),
            hub,
            node_roles,
            agents,
            hub_argv,
            agent_argv,
            hub_extra: Vec::new(),
            agent_extra: Vec::new(),
        };
        me.wait_ready()?;
        Ok(me)
    }

    /// Waits until every agent is connected and has applied its routes at the full site MTU.
    pub fn wait_ready(&self) -> Result<()> {
        let names: Vec<String> = self.agents.iter().map(|(n, _)| n.clone()).collect();
        // A site whose router's WAN link a test narrowed cannot reach the full MTU: its agent
        // only has to have its routes applied.
        let narrow: Vec<String> = self
            .lab
            .routers()
            .iter()
            .filter(|r| {
                self.lab
                    .exec(&r.ns, &["cat", "/sys/class/net/wan0/mtu"])
                    .ok()
                    .and_then(|o| o.stdout.trim().parse::<u32>().ok())
                    .is_some_and(|m| m < self.lab.layout().underlay_mtu)
            })
            .map(|r| r.site.clone())
            .collect();
        wait_until(
            Duration::from_secs(15),
            "every agent connected with routes at the site MTU",
            || {
                let hub = self.hub_status().ok()?;
                let connected = hub["agents"].as_array()?.len() == names.len();
                let routed = names.iter().all(|n| {
                    let full = !narrow.contains(&self.lab.node(n).site);
                    self.agent_status(n).ok().is_some_and(|s| {
                        s["dataplane"]["peers"].as_u64().unwrap_or(0) > 0
                            && (!full || s["dataplane"]["mtu"].as_u64() == Some(1380))
                    })
                });
                (connected && routed).then_some(())
            },
        )
        .map_err(|e| {
            anyhow!(
                "{e}\nhub log:\n{}\n{}",
                self.hub.log_tail(30),
                self.agents
                    .iter()
                    .map(|(n, g)| format!("{n}:\n{}", g.log_tail(15)))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        })
    }

    /// Stops the agents and the hub (gracefully) and starts them again with the commands they
    /// were started with plus `hub_extra` / `agent_extra` (for instance `--congestion bbr`;
    /// empty slices restore the original commands); waits until the lab is ready again. The hub
    /// comes back first, so each agent connects once, and to the new hub.
    pub fn restart_with(&mut self, hub_extra: &[&str], agent_extra: &[&str]) -> Result<()> {
        for (name, g) in &mut self.agents {
            g.terminate(Duration::from_secs(15))
                .with_context(|| format!("stopping the agent on {name}"))?;
        }
        self.hub.terminate(Duration::from_secs(15))?;
        self.hub_extra = hub_extra.iter().map(|s| s.to_string()).collect();
        self.agent_extra = agent_extra.iter().map(|s| s.to_string()).collect();
        self.hub = self.spawn_hub("hub-restarted")?;
        self.hub
            .wait_for_log("hub listening", Duration::from_secs(10))?;
        for i in 0..self.agents.len() {
            self.agents[i].1 = self.spawn_agent(i, "agent-restarted")?;
        }
        self.wait_ready()
    }

    /// `kill -9` of the hub, started again at once with the same command (does not wait for it).
    pub fn kill_hub_and_respawn(&mut self) -> Result<()> {
        self.hub.kill()?;
        self.hub = self.spawn_hub("hub-restarted")?;
        Ok(())
    }

    /// `kill -9` of `node`'s agent, started again at once with the same command.
    pub fn kill_agent_and_respawn(&mut self, node: &str) -> Result<()> {
        let i = self
            .agents
            .iter()
            .position(|(n, _)| n == node)
            .ok_or_else(|| anyhow!("no agent on {node}"))?;
        self.agents[i].1.kill()?;
        self.agents[i].1 = self.spawn_agent(i, &format!("agent-{node}-restarted"))?;
        Ok(())
    }

    fn spawn_hub(&self, label: &str) -> Result<ChildGuard> {
        self.spawn_argv(
            &self.lab.gateway().name,
            &self.hub_argv,
            &self.hub_extra,
            label,
        )
    }

    fn spawn_agent(&self, i: usize, label: &str) -> Result<ChildGuard> {
        let (name, argv) = (&self.agents[i].0, &self.agent_argv[i]);
        self.spawn_argv(name, argv, &self.agent_extra, label)
    }

    fn spawn_argv(
        &self,
        node: &str,
        argv: &[String],
        extra: &[String],
        label: &str,
    ) -> Result<ChildGuard> {
        let (prog, args) = argv.split_first().ok_or_else(|| anyhow!("empty command"))?;
        let mut cmd = self.lab.command(node, prog)?;
        cmd.args(args).args(extra);
        self.lab.spawn_command(label, cmd)
    }

    fn json(&self, node: &str, bin_name: &str, admin: &str) -> Result<serde_json::Value> {
        let b = bin(bin_name)?;
        let out = self.lab.exec(
            node,
            &[path_str(&b)?, "status", "--json", "--admin-addr", admin],
        )?;
        Ok(serde_json::from_str(&out.stdout)?)
    }

    pub fn hub_status(&self) -> Result<serde_json::Value> {
        self.json(&self.lab.gateway().name, "petrel-gateway", HUB_ADMIN)
    }

    /// The hubs the node role on `node` takes as down (active-active: they do not answer its
    /// relay probes), from its `/status`.
    pub fn hubs_down(&self, node: &str) -> Result<serde_json::Value> {
        Ok(self.json(node, "petrel-gateway", NODE_ADMIN)?["hubs_down"].clone())
    }

    /// The status of a hub on `node` (another gateway than the first, with active-active hubs).
    pub fn hub_status_on(&self, node: &str) -> Result<serde_json::Value> {
        self.json(node, "petrel-gateway", HUB_ADMIN)
    }

    /// Frames the hub on `node` has switched, all paths together.
    pub fn frames_via_hub_on(&self, node: &str) -> Result<u64> {
        let s = self.hub_status_on(node)?;
        Ok(s["dataplane"]["frames_forwarded"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0))
    }

    pub fn agent_status(&self, node: &str) -> Result<serde_json::Value> {
        self.json(node, "petrel-edge-agent", AGENT_ADMIN)
    }

    /// `node`'s status row for its direct-path peer `peer` (`Null` if it has none).
    pub fn peer_row(&self, node: &str, peer: &str) -> serde_json::Value {
        self.agent_status(node)
            .ok()
            .and_then(|st| {
                st["peers"]
                    .as_array()
                    .and_then(|p| p.iter().find(|r| r["peer"] == peer).cloned())
            })
            .unwrap_or(serde_json::Value::Null)
    }

    /// `node`'s path to `peer` (`direct`, `punching`, `hub`), `none` if it has no row.
    pub fn peer_path(&self, node: &str, peer: &str) -> String {
        self.peer_row(node, peer)["path"]
            .as_str()
            .unwrap_or("none")
            .to_string()
    }

    /// Pings `a` -> `b` (traffic the hub relays, so it offers the pair) until both agents show
    /// their path direct, at most `within`; how long that took.
    pub fn wait_direct(&self, a: &str, b: &str, within: Duration) -> Result<Duration> {
        let t0 = std::time::Instant::now();
        crate::lab::wait_until(&format!("{a} and {b} go direct"), within, || {
            self.lab.ping(a, self.lab.node(b).pod_ip);
            Ok(self.peer_path(a, b) == "direct" && self.peer_path(b, a) == "direct")
        })?;
        Ok(t0.elapsed())
    }

    /// The agent's `/metrics` on `node` (its admin port, inside the node's namespace).
    pub fn agent_metrics(&self, node: &str) -> Result<String> {
        let ns = self.lab.ns(node)?;
        let addr: std::net::SocketAddr = AGENT_ADMIN.parse()?;
        crate::lab::in_netns(&ns, Duration::from_secs(10), move || {
            crate::procs::http_get(addr, "/metrics")
        })
    }

    /// Frames the hub has switched, all paths together.
    pub fn frames_via_hub(&self) -> Result<u64> {
        let s = self.hub_status()?;
        Ok(s["dataplane"]["frames_forwarded"]
            .as_object()
            .map(|m| m.values().filter_map(|v| v.as_u64()).sum())
            .unwrap_or(0))
    }

    /// Frames the hub dropped for `reason`.
    pub fn hub_drops(&self, reason: &str) -> u64 {
        self.hub_status()
            .ok()
            .and_then(|s| s["dataplane"]["frames_dropped"][reason].as_u64())
            .unwrap_or(0)
    }

    /// SIGTERM to every process (agents, node roles, hub) and wait for each to exit cleanly.
    pub fn stop(mut self) -> Result<()> {
        let mut failures = Vec::new();
        for (name, g) in self.agents.iter_mut().chain(self.node_roles.iter_mut()) {
            match g.terminate(Duration::from_secs(10)) {
                Ok(s) if s.success() => {}
                Ok(s) => failures.push(format!("{name} exited {s}: {}", g.log_tail(10))),
                Err(e) => failures.push(format!("{name}: {e}")),
            }
        }
        match self.hub.terminate(Duration::from_secs(15)) {
            Ok(s) if s.success() => {}
            Ok(s) => failures.push(format!("hub exited {s}")),
            Err(e) => failures.push(format!("hub: {e}")),
        }
        if !failures.is_empty() {
            bail!("unclean stop: {}", failures.join("; "));
        }
        Ok(())
    }
}

/// The second hub of a lab built with `LabSpec::second_hub` (`gw-3`), for active-active hubs:
/// its state is a copy of the first hub's (one CA, as an operator installs it on a second
/// gateway node) and it runs with the same hub list.
pub struct SecondHub {
    pub node: String,
    pub proc: ChildGuard,
    argv: Vec<String>,
}

/// The `--hubs` list of a lab with a second hub: every gateway node with its WAN address.
pub fn hub_list(lab: &Lab) -> String {
    lab.nodes()
        .iter()
        .filter(|n| n.gateway)
        .filter_map(|n| Some(format!("{}={}:{HUB_PORT}", n.name, n.wan_ip?)))
        .collect::<Vec<_>>()
        .join(",")
}

impl<'a> PetrelLab<'a> {
    /// Petrel with active-active hubs (file mode): the first hub, the node roles
    /// (`--active-active`) and the agents as [`PetrelLab::start_with_roles`] starts them, then
    /// the second hub on `gw-3`; returns once every agent holds a tunnel to both hubs.
    pub fn start_active_active(
        lab: &'a Lab,
        hooks: &str,
        dir: &Path,
        hub_args: &[&str],
    ) -> Result<(Self, SecondHub)> {
        Self::start_active_active_with(lab, hooks, dir, hub_args, hub_args)
    }

    /// [`PetrelLab::start_active_active`] with different extra arguments for the second hub
    /// (each hub its own egress socket, say: the namespaces share one filesystem).
    pub fn start_active_active_with(
        lab: &'a Lab,
        hooks: &str,
        dir: &Path,
        hub_args: &[&str],
        second_hub_args: &[&str],
    ) -> Result<(Self, SecondHub)> {
        let list = hub_list(lab);
        let mut args = vec!["--hubs", list.as_str()];
        args.extend_from_slice(hub_args);
        let petrel = Self::start_with_roles(lab, hooks, dir, &args, &["--active-active"])?;
        let second = lab
            .nodes()
            .iter()
            .filter(|n| n.gateway && n.name != lab.gateway().name)
            .find_map(|n| Some((n.name.clone(), n.wan_ip?)))
            .ok_or_else(|| anyhow!("the lab has no second gateway (LabSpec::second_hub)"))?;
        let state = dir.join("hub-second");
        let out = std::process::Command::new("cp")
            .arg("-a")
            .arg(dir.join("hub"))
            .arg(&state)
            .output()?;
        if !out.status.success() {
            bail!("copying the hub state: {out:?}");
        }
        let gw = bin("petrel-gateway")?;
        let mut argv: Vec<String> = [
            path_str(&gw)?,
            "run",
            "--listen",
            &format!("0.0.0.0:{HUB_PORT}"),
            "--admin-addr",
            HUB_ADMIN,
            "--state-dir",
            path_str(&state)?,
            "--inventory",
            path_str(&dir.join("inventory.toml"))?,
            "--node-name",
            &second.0,
            "--hub-name",
            &second.0,
            "--advertise",
            &format!("{}:{HUB_PORT}", second.1),
            "--hubs",
            &list,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        argv.extend(second_hub_args.iter().map(|s| s.to_string()));
        let mut cmd = lab.command(&second.0, &argv[0])?;
        cmd.args(&argv[1..]);
        let mut hub = SecondHub {
            node: second.0,
            proc: lab.spawn_command("hub-second", cmd)?,
            argv,
        };
        hub.proc
            .wait_for_log("hub listening", Duration::from_secs(10))?;
        petrel.wait_both_hubs(&hub)?;
        Ok((petrel, hub))
    }

    /// Waits until every agent is connected to both hubs.
    pub fn wait_both_hubs(&self, second: &SecondHub) -> Result<()> {
        let n = self.agents.len();
        wait_until(
            Duration::from_secs(30),
            "every agent connected to both hubs",
            || {
                let on = |s: Result<serde_json::Value>| {
                    s.ok()
                        .and_then(|s| s["agents"].as_array().map(Vec::len))
                        .unwrap_or(0)
                };
                (on(self.hub_status()) == n && on(self.hub_status_on(&second.node)) == n)
                    .then_some(())
            },
        )
    }
}

impl SecondHub {
    /// Starts it again with the same command (after a kill or a stop); waits until it listens.
    pub fn respawn(&mut self, lab: &Lab) -> Result<()> {
        let mut c = lab.command(&self.node, &self.argv[0])?;
        c.args(&self.argv[1..]);
        self.proc = lab.spawn_command("hub-second-restarted", c)?;
        self.proc
            .wait_for_log("hub listening", Duration::from_secs(10))
    }
}
