//! Rendering `petrel-edge-agent status`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::links::LinkStatus;

pub fn render(status: &serde_json::Value, now: SystemTime) -> String {
    let mut out = String::new();
    let node = status.get("node").and_then(|v| v.as_str()).unwrap_or("?");
    let not_after = status
        .get("certificate_not_after_unix")
        .and_then(|v| v.as_u64())
        .unwrap_or(0);
    out.push_str(&format!(
        "node {node}, certificate valid until {}\n",
        humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(not_after))
    ));
    let dp = &status["dataplane"];
    if dp.is_object() {
        let hooks = dp["hooks"].as_str().unwrap_or("?");
        if dp["ready"].as_bool() == Some(false) {
            out.push_str(&format!(
                "data plane NOT READY (hooks: {hooks}): {}\n",
                dp["error"].as_str().unwrap_or("unknown reason")
            ));
        } else {
            let dropped: u64 = dp["dropped"]
                .as_object()
                .map(|d| d.values().filter_map(serde_json::Value::as_u64).sum())
                .unwrap_or(0);
            out.push_str(&format!(
                "data plane ready (hooks: {hooks}): {} peers, MTU {}, frames to hub {}, from hub {}, dropped {dropped}\n",
                dp["peers"].as_u64().unwrap_or(0),
                dp["mtu"].as_u64().map_or_else(|| "-".to_string(), |m| m.to_string()),
                dp["frames_to_hub"].as_u64().unwrap_or(0),
                dp["frames_from_hub"].as_u64().unwrap_or(0),
            ));
        }
    } else {
        out.push_str("data plane: none (--hooks none)\n");
    }
    let links: Vec<LinkStatus> = status
        .get("links")
        .cloned()
        .and_then(|l| serde_json::from_value(l).ok())
        .unwrap_or_default();
    let header = [
        "ENDPOINT",
        "STATE",
        "HUB",
        "REMOTE",
        "CONNECTED FOR",
        "RTT",
        "ATTEMPTS",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 8]> = links
        .iter()
        .map(|l| {
            let age = l.connected_since_unix.map(|s| {
                let d = now
                    .duration_since(UNIX_EPOCH + Duration::from_secs(s))
                    .unwrap_or_default();
                humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
            });
            [
                l.endpoint.clone(),
                l.state.to_string(),
                l.hub.clone().unwrap_or_else(|| "-".into()),
                l.remote.clone().unwrap_or_else(|| "-".into()),
                age.unwrap_or_else(|| "-".into()),
                l.rtt_ms
                    .map(|r| format!("{r:.1}ms"))
                    .unwrap_or_else(|| "-".into()),
                l.attempts.to_string(),
                l.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    out.push_str(&petrel_transport::admin::render_table(&header, &rows));
    let peers: Vec<crate::direct_paths::PeerPathStatus> = status
        .get("peers")
        .cloned()
        .and_then(|p| serde_json::from_value(p).ok())
        .unwrap_or_default();
    if !peers.is_empty() {
        let share = dp["direct_share"]
            .as_f64()
            .map_or_else(|| "-".to_string(), |s| format!("{:.0}%", s * 100.0));
        out.push_str(&format!(
            "\npeers of other sites (direct share of bytes sent to them: {share})\n"
        ));
        let header = [
            "PEER",
            "PATH",
            "OFFERED ADDRESS",
            "RTT",
            "SENT",
            "RECEIVED",
            "FAILURES",
        ];
        let rows: Vec<[String; 7]> = peers
            .iter()
            .map(|p| {
                [
                    p.peer.clone(),
                    p.path.clone(),
                    p.offered_addr.clone(),
                    p.rtt_ms
                        .map(|r| format!("{r:.1}ms"))
                        .unwrap_or_else(|| "-".into()),
                    p.bytes_sent.to_string(),
                    p.bytes_received.to_string(),
                    p.failures.to_string(),
                ]
            })
            .collect();
        out.push_str(&petrel_transport::admin::render_table(&header, &rows));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_links() {
        let doc = serde_json::json!({"node": "edge-a1", "certificate_not_after_unix": 0, "links": [
            {"endpoint": "127.0.0.1:7443", "state": "connected", "hub": "gw-1", "remote": "127.0.0.1:7443",
             "connected_since_unix": 0, "rtt_ms": 0.5, "last_error": null, "attempts": 1}]});
        let text = render(&doc, UNIX_EPOCH + Duration::from_secs(61));
        assert!(text.contains("data plane: none"), "{text}");
        assert!(
            text.contains("edge-a1")
                && text.contains("connected")
                && text.contains("1m 1s")
                && text.contains("0.5ms"),
            "{text}"
        );
    }

    #[test]
    fn a_failed_data_plane_is_shown_with_its_reason() {
        let doc = serde_json::json!({"node": "edge-a1", "certificate_not_after_unix": 0, "links": [],
            "dataplane": {"hooks": "auto", "ready": false,
                          "error": "data plane not ready: flannel.1 not found"}});
        let text = render(&doc, UNIX_EPOCH);
        assert!(
            text.contains("NOT READY (hooks: auto): data plane not ready: flannel.1 not found"),
            "{text}"
        );
        let doc = serde_json::json!({"node": "edge-a1", "certificate_not_after_unix": 0, "links": [],
            "dataplane": {"hooks": "fast", "ready": true, "peers": 3, "mtu": 1380,
                          "frames_to_hub": 5, "frames_from_hub": 7, "dropped": {"no_hub": 2}}});
        let text = render(&doc, UNIX_EPOCH);
        assert!(
            text.contains("ready (hooks: fast): 3 peers, MTU 1380") && text.contains("dropped 2"),
            "{text}"
        );
    }
}
