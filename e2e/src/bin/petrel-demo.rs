//! `petrel-demo`: the README's first command. Starts a hub on loopback with a throw-away state
//! directory and the embedded inventory, creates a join token, enrols an agent for `edge-a1`,
//! runs it, prints both `status` tables, and stops everything.

use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};
use petrel_e2e::procs::{bin, join, run, wait_until, Agent, Hub};

fn main() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    println!(
        "== starting a hub on loopback (state in {})",
        tmp.path().display()
    );
    let hub = Hub::start(&tmp.path().join("hub"), &[])?;
    println!("== petrel-gateway token create --node edge-a1");
    let (token, fp) = hub.token("edge-a1", &[])?;
    println!("   token {token}, CA sha256 {fp}");
    println!("== petrel-edge-agent join --server {} --node-name edge-a1 --token {token} --ca-sha256 {fp}", hub.server());
    let state = tmp.path().join("agent");
    let joined = join(&hub.server(), "edge-a1", &token, &fp, &state)?;
    print!("{}", joined.stdout);
    if !joined.success {
        bail!("join failed: {}", joined.stderr);
    }
    println!("== petrel-edge-agent run");
    let agent = Agent::start("agent", &state, &[], &[])?;
    wait_until(
        Duration::from_secs(5),
        "the agent to connect with an RTT",
        || {
            hub.agent("edge-a1")
                .filter(|a| a.get("rtt_ms").and_then(|r| r.as_f64()).is_some())
        },
    )?;
    std::thread::sleep(Duration::from_millis(1500)); // let a few pings refine the RTT for the table
    println!("== petrel-gateway status");
    let mut cmd = Command::new(bin("petrel-gateway")?);
    cmd.args(["status", "--admin-addr", &hub.admin.to_string()]);
    print!(
        "{}",
        String::from_utf8_lossy(&run(cmd, Duration::from_secs(10))?.stdout)
    );
    println!("== petrel-edge-agent status");
    let mut cmd = Command::new(bin("petrel-edge-agent")?);
    cmd.args(["status", "--admin-addr", &agent.admin.to_string()]);
    print!(
        "{}",
        String::from_utf8_lossy(&run(cmd, Duration::from_secs(10))?.stdout)
    );
    println!("== stopping (the hub sends going-away, the agent leaves)");
    Ok(())
}
