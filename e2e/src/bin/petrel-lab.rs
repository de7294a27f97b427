//! `petrel-lab`: bring Petrel's network-namespace lab up and down by hand.
//!
//! ```text
//! petrel-lab up [--prefix ptXXXX] [--mtu 1500] [--inventory PATH]
//! petrel-lab down [PREFIX...]     # no prefix: every lab started with `up`
//! petrel-lab cleanup              # labs left behind by crashed test runs
//! petrel-lab list
//! petrel-lab layout [--prefix ptXXXX] [--mtu 1500]   # print the plan, build nothing
//! ```

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use petrel_e2e::lab::{Lab, LabSpec, Layout};

const USAGE: &str = "usage: petrel-lab <command>
  up [--prefix ptXXXX] [--mtu N] [--inventory PATH]
                     build a lab and leave it running; prints the layout and writes the
                     Petrel inventory (default /run/petrel-lab/<prefix>/inventory.toml)
  down [PREFIX...]   tear down the given labs, or every lab started with `up`
  cleanup            tear down labs left behind by crashed test runs (owner process gone)
  list               show every lab on this machine
  layout [--prefix ptXXXX] [--mtu N]
                     print the address plan without building anything";

struct Opts {
    prefix: Option<String>,
    mtu: u32,
    inventory: Option<String>,
    rest: Vec<String>,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        prefix: None,
        mtu: 1500,
        inventory: None,
        rest: Vec::new(),
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value = |name: &str| {
            it.next()
                .cloned()
                .with_context(|| format!("{name} needs a value"))
        };
        match a.as_str() {
            "--prefix" => o.prefix = Some(value("--prefix")?),
            "--mtu" => o.mtu = value("--mtu")?.parse().context("--mtu must be a number")?,
            "--inventory" => o.inventory = Some(value("--inventory")?),
            "-h" | "--help" => bail!("{USAGE}"),
            s if s.starts_with('-') => bail!("unknown option {s}\n{USAGE}"),
            s => o.rest.push(s.to_owned()),
        }
    }
    Ok(o)
}

fn up(o: Opts) -> Result<()> {
    let spec = LabSpec {
        prefix: o.prefix,
        underlay_mtu: o.mtu,
        second_hub: false,
        third_site: false,
    };
    let lab = Lab::build(spec)?;
    let inventory = o
        .inventory
        .map_or_else(|| lab.workdir().join("inventory.toml"), Into::into);
    lab.write_inventory(&inventory)?;
    print!("{}", lab.layout().render_table());
    println!(
        "\nbuilt in {:?}; inventory: {}",
        lab.build_time(),
        inventory.display()
    );
    let p = lab.prefix().to_owned();
    println!("enter a pod:  ip netns exec {p}-cloud-1-pod bash");
    println!("tear down:    petrel-lab down {p}");
    lab.keep()?;
    Ok(())
}

fn down(o: Opts) -> Result<()> {
    let targets: Vec<String> = if o.rest.is_empty() {
        Lab::list()?
            .into_iter()
            .filter(|l| l.record.as_ref().is_some_and(|r| r.persistent))
            .map(|l| l.prefix)
            .collect()
    } else {
        o.rest
    };
    if targets.is_empty() {
        println!("no lab started with `petrel-lab up` is running");
    }
    for p in targets {
        Lab::destroy(&p).with_context(|| format!("tearing down {p}"))?;
        println!("removed lab {p}");
    }
    Ok(())
}

fn list() -> Result<()> {
    let labs = Lab::list()?;
    if labs.is_empty() {
        println!("no labs");
    }
    for l in labs {
        let state = match &l.record {
            None => "stale (no registry record)".to_owned(),
            Some(r) if r.persistent => format!("kept (petrel-lab up by pid {})", r.owner_pid),
            Some(r) if r.owner_alive() => format!("live (owner pid {})", r.owner_pid),
            Some(r) => format!("stale (owner pid {} gone)", r.owner_pid),
        };
        println!(
            "{}  {:>2} namespaces  {state}",
            l.prefix,
            l.namespaces.len()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = args.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let result = parse(rest).and_then(|o| match cmd.as_str() {
        "up" => up(o),
        "down" => down(o),
        "cleanup" => Lab::cleanup_stale().map(|removed| {
            if removed.is_empty() {
                println!("no stale labs");
            }
            for p in removed {
                println!("removed stale lab {p}");
            }
        }),
        "list" => list(),
        "layout" => {
            let layout = Layout::new(
                o.prefix.as_deref().unwrap_or("pt0000"),
                &LabSpec {
                    prefix: None,
                    underlay_mtu: o.mtu,
                    second_hub: false,
                    third_site: false,
                },
            )?;
            print!("{}\n{}", layout.render_table(), layout.inventory_toml());
            Ok(())
        }
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(())
        }
        other => bail!("unknown command {other:?}\n{USAGE}"),
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("petrel-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}
