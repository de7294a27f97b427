//! `petrel-loadgen`: N simulated agents (real QUIC connections, real node certificates signed
//! with the hub's CA, one UDP socket each) against one hub, in one process. Prints one JSON line
//! per report interval: `{"t_s","connected","connects","failures","last_error"}`.
//!
//! ```text
//! petrel-loadgen --server 127.0.0.1:7443 --hub-state /var/lib/petrel --count 10000
//!     [--prefix load] [--parallel 256] [--report-every-ms 1000] [--run-for-s N] [--bind 127.0.0.1:0]
//! ```
//! `petrel-loadgen targets --ip IP` instead serves the bench's stream targets (hello/echo on
//! 7101, sink on 7102, source on 7103) until killed; run it inside a pod's namespace.
//!
//! The hub's inventory must know the node names `<prefix>-00000`.. as public-site nodes
//! (`petrel_bench::loadgen::inventory_toml` writes one).

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context as _, Result};
use petrel_bench::loadgen::{self, LoadgenOpts};

fn main() -> Result<()> {
    // Every connect attempt makes a quinn endpoint with a 3 MB receive buffer (calloc, mostly
    // never touched). glibc raises its mmap threshold after the first such buffer is freed and
    // then serves the next ones from the heap, zeroing (and so keeping resident) all 3 MB: a
    // reconnect storm of 10,000 simulated agents grew this process by 20 GB. A fixed threshold
    // keeps them on demand-zero pages. glibc reads it only at start-up, hence the re-exec.
    if std::env::var_os("MALLOC_MMAP_THRESHOLD_").is_none() {
        use std::os::unix::process::CommandExt as _;
        let err = std::process::Command::new("/proc/self/exe")
            .args(std::env::args_os().skip(1))
            .env("MALLOC_MMAP_THRESHOLD_", "262144")
            .exec();
        eprintln!("petrel-loadgen: cannot re-exec with a fixed malloc mmap threshold: {err}");
    }
    let mut opts = LoadgenOpts {
        server: "127.0.0.1:7443".parse()?,
        hub_state: PathBuf::from("/var/lib/petrel"),
        count: 1000,
        prefix: "load".into(),
        parallel: 256,
        report_every: Duration::from_secs(1),
        run_for: None,
        bind: "127.0.0.1:0".parse()?,
        cert_not_before_offset: Duration::ZERO,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("targets") {
        return targets(&args[1..]);
    }
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .with_context(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--server" => opts.server = val()?.parse()?,
            "--hub-state" => opts.hub_state = PathBuf::from(val()?),
            "--count" => opts.count = val()?.parse()?,
            "--prefix" => opts.prefix = val()?,
            "--parallel" => opts.parallel = val()?.parse()?,
            "--report-every-ms" => opts.report_every = Duration::from_millis(val()?.parse()?),
            "--run-for-s" => opts.run_for = Some(Duration::from_secs(val()?.parse()?)),
            "--bind" => opts.bind = val()?.parse()?,
            other => bail!("unknown argument {other:?}"),
        }
    }
    // One socket per simulated agent.
    petrel_bench::util::raise_nofile(opts.count as u64 + 1024)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(loadgen::run(opts, |l| {
        if let Ok(s) = serde_json::to_string(l) {
            println!("{s}");
        }
    }))
}

fn targets(args: &[String]) -> Result<()> {
    let ip = match args {
        [flag, ip] if flag == "--ip" => ip.parse()?,
        _ => bail!("usage: petrel-loadgen targets --ip IP"),
    };
    petrel_bench::util::raise_nofile(65536)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(petrel_e2e::egress_streams::serve_targets(ip))
}
