//! The command-line traps a new operator fell into (issue 12), each checked against the real
//! binaries: `token create` checks the inventory it is given and refuses a node the hub would
//! refuse unless `--force`; `node --config F` uses the inventory F names; `run` and `node` say
//! loudly when they fall back to the embedded demo inventory, and log which inventory, state
//! directory and hooks they use; `join` gives up on a silent hub after 3 s; `status` with
//! nothing running prints its error once; a bad egress value is a configuration error (64) even
//! when a port is also taken.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use petrel_e2e::procs::{bin, free_port, run, Hub, Proc};

fn gateway(args: &[&str]) -> Output {
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args(args)
        .env_remove("PETREL_INVENTORY")
        .env_remove("PETREL_GATEWAY_CONFIG")
        .env_remove("PETREL_INVENTORY_SOURCE");
    run(c, Duration::from_secs(30)).unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A real cluster's inventory: none of its names is in the embedded demo inventory.
const SHOP_INVENTORY: &str = r#"
[[sites]]
name = "vpc"
kind = "cloud"

[[sites]]
name = "shop-17"
kind = "public"

[[nodes]]
name = "vpc-gw"
site = "vpc"
addresses = ["172.16.0.20"]
pod_cidrs = ["10.244.1.0/24"]
vtep_mac = "8e:11:0a:00:00:02"
gateway = true

[[nodes]]
name = "shop-17-pos"
site = "shop-17"
addresses = ["192.168.1.50"]
pod_cidrs = ["10.244.10.0/24"]
vtep_mac = "8e:11:0a:00:00:10"
"#;

fn write_inventory(dir: &Path) -> String {
    let p = dir.join("inventory.toml");
    std::fs::write(&p, SHOP_INVENTORY).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn token_create_checks_the_inventory_it_is_given() {
    let tmp = tempfile::tempdir().unwrap();
    let inv = write_inventory(tmp.path());
    let state = tmp.path().join("state");
    let state = state.to_str().unwrap();
    let base = [
        "token",
        "create",
        "--node",
        "shop-17-pos",
        "--state-dir",
        state,
        "--server",
        "203.0.113.10:7443",
    ];
    // With the hub's inventory: made, no warning.
    let mut args = base.to_vec();
    args.extend(["--inventory", &inv]);
    let out = gateway(&args);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("petrel-edge-agent join --server 203.0.113.10:7443 --node-name shop-17-pos"),
        "{}",
        text(&out)
    );
    assert!(!stderr(&out).contains("refuse"), "{}", text(&out));
    // The token is printed for the environment, never on the join command line (`ps`).
    let (token, _) = petrel_e2e::procs::parse_token_create(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(!token.is_empty());
    // The inventory named by --config works the same.
    let conf = tmp.path().join("gateway.toml");
    std::fs::write(&conf, format!("inventory = {inv:?}\n")).unwrap();
    let mut args = vec!["--config", conf.to_str().unwrap()];
    args.extend(base);
    let out = gateway(&args);
    assert!(out.status.success(), "{}", text(&out));
    // Without an inventory the node is checked against the embedded demo inventory, which does
    // not know it: refused, and the message says which inventory was used and what to do.
    let out = gateway(&base);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = stderr(&out);
    assert!(
        err.contains("EMBEDDED DEMO INVENTORY")
            && err.contains("--inventory")
            && err.contains("--force"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "{}", text(&out));
}

#[test]
fn token_create_refuses_a_node_the_hub_would_refuse_unless_forced() {
    let tmp = tempfile::tempdir().unwrap();
    let inv = write_inventory(tmp.path());
    let state = tmp.path().join("state");
    let state = state.to_str().unwrap();
    let list = || {
        let out = gateway(&["token", "list", "--state-dir", state]);
        assert!(out.status.success(), "{}", text(&out));
        String::from_utf8_lossy(&out.stdout).lines().count() - 1
    };
    for (node, why) in [
        ("vpc-gw", "only nodes in public-network sites"),
        ("shop-99", "not in the inventory"),
    ] {
        let out = gateway(&[
            "token",
            "create",
            "--node",
            node,
            "--inventory",
            &inv,
            "--state-dir",
            state,
            "--server",
            "203.0.113.10:7443",
        ]);
        assert_eq!(out.status.code(), Some(1), "{node}: {}", text(&out));
        assert!(
            stderr(&out).contains(why) && stderr(&out).contains("--force"),
            "{node}: {}",
            text(&out)
        );
        assert!(out.stdout.is_empty(), "{node}: {}", text(&out));
    }
    assert_eq!(list(), 0, "a refused node got a token");
    let out = gateway(&[
        "token",
        "create",
        "--node",
        "vpc-gw",
        "--inventory",
        &inv,
        "--state-dir",
        state,
        "--server",
        "203.0.113.10:7443",
        "--force",
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(stderr(&out).contains("warning:"), "{}", text(&out));
    assert_eq!(list(), 1);
}

#[test]
fn token_create_without_a_server_says_the_command_is_local() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let out = gateway(&[
        "token",
        "create",
        "--node",
        "edge-a1",
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no --server given") && stderr(&out).contains("this machine only"),
        "{}",
        text(&out)
    );
}

/// `node --config F` with F naming an inventory: that inventory, not the demo one (which does
/// not know `vpc-gw`). The node role then stops at the missing Flannel device, which is only
/// looked up: nothing on the host changes.
#[test]
fn node_uses_the_inventory_its_config_file_names() {
    let tmp = tempfile::tempdir().unwrap();
    let inv = write_inventory(tmp.path());
    let conf = tmp.path().join("gateway.toml");
    std::fs::write(&conf, format!("inventory = {inv:?}\n")).unwrap();
    let admin = format!("127.0.0.1:{}", free_port());
    let out = gateway(&[
        "--config",
        conf.to_str().unwrap(),
        "node",
        "--node-name",
        "vpc-gw",
        "--flannel-dev",
        "ptmissing0",
        "--admin-addr",
        &admin,
    ]);
    let err = stderr(&out);
    assert!(
        !err.contains("not in the inventory") && !err.contains("EMBEDDED DEMO"),
        "{}",
        text(&out)
    );
    assert!(
        err.contains(&format!("inventory=file {inv}")),
        "{}",
        text(&out)
    );
    assert!(err.contains("ptmissing0 not found"), "{}", text(&out));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    // A node the file's inventory does not know is a configuration error naming it.
    let out = gateway(&[
        "--config",
        conf.to_str().unwrap(),
        "node",
        "--node-name",
        "cloud-1",
        "--admin-addr",
        &admin,
    ]);
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(
        stderr(&out).contains("not in the inventory"),
        "{}",
        text(&out)
    );
}

#[test]
fn run_and_node_without_an_inventory_say_so_loudly_and_log_their_sources() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"), &[]).unwrap();
    let log = hub.proc.log();
    assert!(log.contains("EMBEDDED DEMO INVENTORY"), "{log}");
    let config_line = log
        .lines()
        .find(|l| l.contains("hub configuration"))
        .unwrap_or_else(|| panic!("no configuration line:\n{log}"));
    assert!(
        config_line.contains("inventory=embedded demo inventory")
            && config_line.contains(&format!("state_dir={}", tmp.path().join("hub").display()))
            && config_line.contains("state_dir_from=\"configured\""),
        "{config_line}"
    );
    drop(hub);
    // With a file: named, and no warning.
    let inv = write_inventory(tmp.path());
    let hub = Hub::start(
        &tmp.path().join("hub2"),
        &["--inventory", &inv, "--node-name", "vpc-gw"],
    )
    .unwrap();
    let log = hub.proc.log();
    assert!(!log.contains("EMBEDDED DEMO"), "{log}");
    assert!(log.contains(&format!("inventory=file {inv}")), "{log}");
    drop(hub);
    // The node role too, with its hooks.
    let admin = format!("127.0.0.1:{}", free_port());
    let out = gateway(&[
        "node",
        "--node-name",
        "cloud-1",
        "--flannel-dev",
        "ptmissing0",
        "--hooks",
        "portable",
        "--admin-addr",
        &admin,
    ]);
    let err = stderr(&out);
    assert!(err.contains("EMBEDDED DEMO INVENTORY"), "{}", text(&out));
    assert!(
        err.contains("node role configuration") && err.contains("hooks=portable"),
        "{}",
        text(&out)
    );
}

/// Nothing answers on the port (a hub that is not there, or UDP filtered): `join` says so after
/// 3 s, not after its 15 s overall timeout.
#[test]
fn join_to_a_closed_port_gives_up_after_3s() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut c = Command::new(bin("petrel-edge-agent").unwrap());
    c.args([
        "join",
        "--server",
        &format!("127.0.0.1:{port}"),
        "--node-name",
        "edge-a1",
        "--token",
        "abcdef.0123456789abcdef",
        "--ca-sha256",
        &"ab".repeat(32),
    ])
    .arg("--state-dir")
    .arg(tmp.path().join("agent"));
    let started = Instant::now();
    let out = run(c, Duration::from_secs(30)).unwrap();
    let took = started.elapsed();
    assert!(!out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("no answer within 3s"),
        "{}",
        text(&out)
    );
    assert!(
        // 3 s plus process start-up on a busy machine; the old bound was 15 s.
        took >= Duration::from_secs(3) && took < Duration::from_secs(10),
        "join took {took:?}"
    );
}

#[test]
fn status_with_nothing_running_prints_its_error_once() {
    let port = free_port();
    for binary in ["petrel-gateway", "petrel-edge-agent"] {
        let mut c = Command::new(bin(binary).unwrap());
        c.args(["status", "--admin-addr", &format!("127.0.0.1:{port}")]);
        let out = run(c, Duration::from_secs(10)).unwrap();
        assert_eq!(out.status.code(), Some(1), "{binary}: {}", text(&out));
        let err = stderr(&out);
        assert_eq!(
            err.matches("Connection refused").count(),
            1,
            "{binary}: {err}"
        );
        assert!(err.contains("is the process running"), "{binary}: {err}");
    }
}

/// A bad egress value with the hub's port also taken: the configuration error (64, naming the
/// setting) comes first, not the bind error (1).
#[test]
fn a_bad_egress_setting_exits_64_before_any_port_is_bound() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let admin = format!("127.0.0.1:{}", free_port());
    let mut c = Command::new(bin("petrel-gateway").unwrap());
    c.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--admin-addr",
        &admin,
        "--relay-listen",
        "off",
        "--egress-node-ports",
        "10250,nope",
    ])
    .arg("--state-dir")
    .arg(tmp.path().join("hub"));
    let mut p = Proc::spawn("hub-bad-egress", c).unwrap();
    let status = p.wait_exit(Duration::from_secs(10)).unwrap();
    let log = p.log();
    assert_eq!(status.code(), Some(64), "{log}");
    assert!(
        log.contains("configuration error") && log.contains("node-ports"),
        "{log}"
    );
    drop(taken);
}

/// The join command names `petrel-edge-agent`: when it is not on PATH here, `token create` says
/// where the agent binary is (next to the gateway in a build tree); when it is, nothing.
#[test]
fn token_create_says_where_the_agent_is_when_it_is_not_on_path() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let create = |path: &str| {
        let mut c = Command::new(bin("petrel-gateway").unwrap());
        c.args([
            "token",
            "create",
            "--node",
            "edge-a1",
            "--server",
            "127.0.0.1:7443",
        ])
        .arg("--state-dir")
        .arg(&state)
        .env("PATH", path)
        .env_remove("PETREL_INVENTORY");
        run(c, Duration::from_secs(30)).unwrap()
    };
    let agent = bin("petrel-edge-agent").unwrap();
    let out = create("/usr/bin:/bin");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        stderr(&out).contains("not on this machine's PATH")
            && stderr(&out).contains(&agent.display().to_string()),
        "{}",
        text(&out)
    );
    let out = create(&format!(
        "{}:/usr/bin:/bin",
        agent.parent().unwrap().display()
    ));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!stderr(&out).contains("PATH"), "{}", text(&out));
}
