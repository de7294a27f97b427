//! `petrel-bench` (`make bench`, as root): Petrel beside kernel VXLAN and userspace WireGuard
//! (boringtun) in one run in the network-namespace lab, plus streams, a WAN with delay and loss,
//! hub scale, failover and the hub under attack. Prints a table and writes the same numbers as
//! JSON.
//!
//! ```text
//! cargo build --release --workspace --bins
//! target/release/petrel-bench [--smoke] [--json PATH] [--secs N] [--reps N]
//!     [--skip paths,boringtun,streams,wan,failover,active-active,scale,attack] [--concurrent 1000,10000]
//!     [--scale 1000,10000] [--hooks fast|portable] [--congestion cubic|newreno|bbr]
//!     [--initial-rate 2000]
//! ```
//!
//! Needs iperf3, ethtool, `wg` (wireguard-tools) and `boringtun-cli` (cargo install
//! boringtun-cli). See docs/performance.md.

use std::path::PathBuf;

use anyhow::{bail, Context as _, Result};
use petrel_bench::{self as bench, BenchConfig};

fn list(v: &str) -> Result<Vec<usize>> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.trim()
                .parse()
                .with_context(|| format!("bad number {s:?}"))
        })
        .collect()
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut cfg = if args.iter().any(|a| a == "--smoke") {
        BenchConfig::smoke()
    } else {
        BenchConfig::full()
    };
    let mut json = bench::default_json_path();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--smoke" => {}
            "--json" => json = PathBuf::from(val()?),
            "--secs" => cfg.secs = val()?.parse()?,
            "--reps" => cfg.reps = val()?.parse()?,
            "--rr" => cfg.rr_n = val()?.parse()?,
            "--skip" => cfg.skip = val()?.split(',').map(str::to_string).collect(),
            "--concurrent" => cfg.concurrent = list(&val()?)?,
            "--scale" => cfg.scale = list(&val()?)?,
            "--hooks" => cfg.hooks = val()?,
            "--congestion" => cfg.congestion = Some(val()?),
            "--boringtun-threads" => cfg.boringtun_threads = val()?.parse()?,
            "--failover-samples" => cfg.failover_samples = val()?.parse()?,
            "--initial-rate" => cfg.initial_flood.rate_per_s = val()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "{}",
                    include_str!("petrel-bench.rs")
                        .lines()
                        .take(15)
                        .map(|l| l.trim_start_matches("//!").trim_start_matches(' '))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (see --help)"),
        }
    }
    // The workspace binaries sit next to this one.
    if std::env::var_os("PETREL_BIN_DIR").is_none() {
        if let Some(dir) = std::env::current_exe()?.parent() {
            std::env::set_var("PETREL_BIN_DIR", dir);
        }
    }
    let work = tempfile::Builder::new().prefix("petrel-bench").tempdir()?;
    let report = bench::run(&cfg, work.path())?;
    let table = bench::render(&report);
    println!("{table}");
    if let Some(dir) = json.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)
        .with_context(|| format!("writing {}", json.display()))?;
    println!("JSON: {}", json.display());
    Ok(())
}
