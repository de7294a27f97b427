//! A seconds-long run of `petrel-bench` (the smoke configuration: one 1-second iperf3 run per
//! figure, 50/10,000 streams, 10/20 simulated agents, one failover sample, one kill and one graceful
//! stop of an active-active hub, a few seconds of each attack of issue 11): every code path of the bench runs and the report has every row without
//! errors. It checks shape, not performance; the full bench (`make bench`) is run by hand and its
//! numbers go to docs/performance.md.
//!
//! Needs what the bench needs: iperf3, ethtool, wireguard-tools (`wg`) and `boringtun-cli`
//! (`cargo install boringtun-cli`); `.ci/run` installs them, and a missing one fails the test with
//! the command that installs it rather than hiding a row.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use petrel_bench::{self as bench, util::have, BenchConfig, PATH_IDS};

#[test]
fn bench_smoke_has_every_row() {
    petrel_e2e::lab::require_root().unwrap();
    for (tool, install) in [
        ("iperf3", "apt-get install iperf3"),
        ("ethtool", "apt-get install ethtool"),
        ("wg", "apt-get install wireguard-tools"),
        ("boringtun-cli", "cargo install boringtun-cli --locked"),
    ] {
        assert!(have(tool), "{tool} is not installed ({install})");
    }
    let cfg = BenchConfig::smoke();
    let work = tempfile::tempdir().unwrap();
    let report = bench::run(&cfg, work.path()).unwrap();
    eprintln!("{}", bench::render(&report));
    let json = serde_json::to_value(&report).unwrap();

    // Every packet-path row, in order, with every figure.
    let ids: Vec<&str> = report.paths.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, PATH_IDS, "path rows");
    for p in &report.paths {
        assert!(p.error.is_none(), "{}: {:?}", p.id, p.error);
        let single = p.single_gbit.as_ref().expect("single-flow figure");
        assert!(single.median > 0.0, "{}: no throughput", p.id);
        assert!(
            p.multi_gbit.as_ref().is_some_and(|m| m.median > 0.0),
            "{}",
            p.id
        );
        assert!(p.retransmits_single.is_some() && p.retransmits_multi.is_some());
        let rr = p.rr.as_ref().expect("latency");
        assert!(
            rr.n == cfg.rr_n && rr.p50_us > 0.0 && rr.p99_us >= rr.p50_us,
            "{}",
            p.id
        );
        assert!(p.machine_cpu_s_per_gbit.is_some(), "{}", p.id);
        assert!(p.single_vs_kernel.is_some(), "{}", p.id);
        if p.id != "kernel-vxlan" {
            assert!(p.tunnel_cpu_s_per_gbit.is_some_and(|c| c > 0.0), "{}", p.id);
        }
        assert!(p.single_vs_boringtun.is_some(), "{}", p.id);
    }

    // Streams.
    let st = &report.streams;
    assert!(st.errors.is_empty(), "stream errors: {:?}", st.errors);
    let setup = st.setup.as_ref().expect("setup row");
    assert_eq!(setup.connect_via_proxy.n, cfg.setup_n);
    assert_eq!(setup.direct_tcp.n, cfg.setup_n);
    let one = st.single_stream.as_ref().expect("single stream row");
    assert!(one.to_target_mbit > 0.0 && one.from_target_mbit > 0.0);
    let counts: Vec<usize> = st.concurrent.iter().map(|c| c.streams).collect();
    assert_eq!(counts, cfg.concurrent);
    for c in &st.concurrent {
        assert_eq!(
            c.echoed, c.streams,
            "{} streams: {:?}",
            c.streams, c.first_error
        );
    }
    let hol = st.head_of_line.as_ref().expect("head-of-line row");
    assert!(hol.bulk_alone_mbit > 0.0 && hol.bulk_with_stalled_mbit > 0.0);

    // WAN, scale, failover.
    let w = &report.wan;
    assert!(w.error.is_none(), "wan: {:?}", w.error);
    assert!(
        w.ping_rtt_ms.is_some_and(|r| r >= 90.0),
        "RTT {:?}",
        w.ping_rtt_ms
    );
    assert!(w.direct_tcp_mbit.is_some());
    let ccs: Vec<&str> = w.variants.iter().map(|v| v.congestion.as_str()).collect();
    assert_eq!(ccs, ["cubic", "bbr"]);
    for v in &w.variants {
        assert!(v.error.is_none(), "wan {}: {:?}", v.congestion, v.error);
        assert!(v.stream_mbit.is_some() && v.packet_path_mbit.is_some());
    }
    let scale: Vec<usize> = report.scale.iter().map(|s| s.agents).collect();
    assert_eq!(scale, cfg.scale);
    for s in &report.scale {
        assert!(s.error.is_none(), "scale {}: {:?}", s.agents, s.error);
        assert!(s.connect_all_s.is_some() && s.kib_per_agent.is_some());
        assert!(s.hub_cpu_idle_pct.is_some() && s.reconnect_all_s.is_some());
    }
    let fo = &report.failover;
    assert!(fo.error.is_none(), "failover: {:?}", fo.error);
    assert_eq!(fo.samples_s.len(), cfg.failover_samples);

    // Direct paths: the RTT both ways, every break sample, the path back each time.
    let d = &report.direct;
    assert!(d.error.is_none(), "direct: {:?}", d.error);
    assert!(d.icmp_rtt_via_hub_ms.is_some() && d.icmp_rtt_direct_ms.is_some());
    assert_eq!(d.break_gap_ms.len(), cfg.failover_samples.max(1));
    assert_eq!(d.back_direct_after_s.len(), d.break_gap_ms.len());
    assert!(d.break_gap_median_ms.is_some());

    // Active-active hubs: every figure present.
    let aa = &report.active_active;
    assert!(aa.error.is_none(), "active-active: {:?}", aa.error);
    assert_eq!(aa.gap_samples_s.len(), cfg.failover_samples.max(1));
    assert_eq!(aa.survivor_silence_ms.len(), aa.gap_samples_s.len());
    assert!(aa.gap_median_s.is_some() && aa.graceful_silence_ms.is_some());
    assert!(aa.one_hub_gbit.is_some_and(|g| g > 0.0) && aa.two_hubs_gbit.is_some_and(|g| g > 0.0));
    assert!(aa.two_vs_one.is_some());
    assert!(
        aa.one_hub_capped_gbit.is_some_and(|g| g > 0.0)
            && aa.two_hubs_capped_gbit.is_some_and(|g| g > 0.0)
            && aa.two_vs_one_capped.is_some()
    );

    // The attack rows (tiny: a few connections, a short flood), each beside its goal.
    let a = &report.attack;
    assert!(a.errors.is_empty(), "attack errors: {:?}", a.errors);
    let junk = a.unauthenticated.as_ref().expect("unauthenticated row");
    assert_eq!(junk.connections, usize::from(cfg.unauth_connections));
    assert!(a.unauthenticated_vs_goal.is_some());
    let flood = a.initial_flood.as_ref().expect("spoofed Initials row");
    assert!(flood.initials > 0 && flood.handshakes > 0);
    assert!(a.initial_flood_vs_goal.is_some());
    let relay = a.relay_flood.as_ref().expect("relay flood row");
    assert!(relay.frames_sent > 0);
    assert_eq!(relay.tunnels.len(), 2);
    for t in &relay.tunnels {
        assert!(t.idle.n > 0 || t.idle_lost > 0, "{}: no idle pings", t.node);
        assert!(t.flood.n > 0 || t.flood_lost > 0, "{}: no pings", t.node);
    }

    // The JSON has the same rows.
    for key in [
        "machine", "config", "paths", "streams", "wan", "scale", "failover", "direct", "attack",
    ] {
        assert!(json.get(key).is_some(), "JSON lacks {key}");
    }
    assert_eq!(json["paths"].as_array().map(Vec::len), Some(PATH_IDS.len()));
    // The table has a line for every row: a path or a scale row begins with its id (or agent
    // count); a bare substring would not do ("boringtun" is in the header, "10" anywhere).
    let table = bench::render(&report);
    let first_cells: Vec<&str> = table
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    for p in &report.paths {
        assert!(first_cells.contains(&p.id.as_str()), "table lacks {}", p.id);
    }
    for c in &st.concurrent {
        assert!(
            table.contains(&format!("  {} concurrent streams", c.streams)),
            "table lacks streams-{}",
            c.streams
        );
    }
    for s in &report.scale {
        assert!(
            first_cells.contains(&s.agents.to_string().as_str()),
            "table lacks scale-{}",
            s.agents
        );
    }
    for line in [
        "unauthenticated enrolment connections held",
        "spoofed Initials at",
        "relay flood:",
        "edge-b1",
    ] {
        assert!(table.contains(line), "table lacks {line:?}");
    }
}
