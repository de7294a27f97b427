//! Rendering `petrel-gateway status`: the hub's `/status` JSON as a table an operator can read
//! at a glance.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::agent_registry::AgentStatus;

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn since(unix: u64, now: SystemTime) -> String {
    let t = UNIX_EPOCH + Duration::from_secs(unix);
    let age = now.duration_since(t).unwrap_or_default();
    format!(
        "{} ({} ago)",
        humantime::format_rfc3339_seconds(t),
        humantime::format_duration(Duration::from_secs(age.as_secs()))
    )
}

/// Renders the `/status` document.
pub fn render(status: &serde_json::Value, now: SystemTime) -> String {
    let mut out = String::new();
    if let Some(hub) = status.get("hub") {
        out.push_str(&format!(
            "hub {} listening on {} (ready: {}), CA sha256 {}\n",
            hub.get("name").and_then(|v| v.as_str()).unwrap_or("?"),
            hub.get("listen").and_then(|v| v.as_str()).unwrap_or("?"),
            hub.get("ready").and_then(|v| v.as_bool()).unwrap_or(false),
            hub.get("ca_sha256").and_then(|v| v.as_str()).unwrap_or("?"),
        ));
    }
    let agents: Vec<AgentStatus> = status
        .get("agents")
        .cloned()
        .and_then(|a| serde_json::from_value(a).ok())
        .unwrap_or_default();
    let header = [
        "NODE",
        "SITE",
        "REMOTE",
        "CONNECTED SINCE",
        "RTT",
        "BYTES IN",
        "BYTES OUT",
        "DROPPED",
        "STREAMS",
    ];
    let rows: Vec<[String; 9]> = agents
        .iter()
        .map(|a| {
            let dropped = if a.datagrams_dropped.is_empty() {
                "0".to_string()
            } else {
                a.datagrams_dropped
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(",")
            };
            [
                a.node.clone(),
                a.site.clone(),
                a.remote.clone(),
                since(a.connected_since_unix, now),
                a.rtt_ms
                    .map(|r| format!("{r:.1}ms"))
                    .unwrap_or_else(|| "-".into()),
                human_bytes(a.bytes_in),
                human_bytes(a.bytes_out),
                dropped,
                a.open_streams.to_string(),
            ]
        })
        .collect();
    out.push_str(&petrel_transport::admin::render_table(&header, &rows));
    if rows.is_empty() {
        out.push_str("(no agents connected)\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_agents_with_rtt_and_drops() {
        let doc = serde_json::json!({
            "hub": {"name": "gw-1", "listen": "0.0.0.0:7443", "ready": true, "ca_sha256": "ab"},
            "agents": [{
                "node": "edge-a1", "site": "site-a", "remote": "203.0.113.2:40000", "connected_since_unix": 0,
                "rtt_ms": 1.25, "bytes_in": 2048, "bytes_out": 10, "datagrams_dropped": {"spoofed_source": 3},
                "open_streams": 2, "agent_version": "0.1.0", "datapath": "none"
            }]
        });
        let text = render(&doc, UNIX_EPOCH + Duration::from_secs(90));
        assert!(
            text.contains("edge-a1") && text.contains("1.2ms") && text.contains("2.0 KiB"),
            "{text}"
        );
        assert!(
            text.contains("spoofed_source=3") && text.contains("1m 30s ago"),
            "{text}"
        );
        let empty = render(&serde_json::json!({"agents": []}), SystemTime::now());
        assert!(empty.contains("no agents connected"));
    }
}
