//! Parsing of the setting values both binaries accept (durations, `HOST:PORT` endpoints, the
//! congestion controller) and the
//! default state directory. Each binary wraps a [`BadValue`] into its own configuration error with
//! the field's name, so the message an operator sees names the flag and what is allowed.

use std::path::PathBuf;
use std::time::Duration;

use crate::quic::CongestionControl;

/// A value that does not parse, and what would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub value: String,
    pub allowed: String,
}

/// The longest duration any setting takes (ten years). Longer values are refused here, with the
/// field named by the caller, rather than accepted and then overflowing a clock computation
/// (a certificate's not-after) at the first enrolment.
pub const MAX_SETTING_DURATION: Duration = Duration::from_secs(10 * 365 * 86_400);

/// `500ms`, `10s`, `5m`, `1h`, `30d`; at most [`MAX_SETTING_DURATION`].
pub fn duration(value: &str) -> Result<Duration, BadValue> {
    let d = humantime::parse_duration(value).map_err(|e| BadValue {
        value: value.into(),
        allowed: format!("a duration such as 500ms, 10s, 5m, 1h, 30d ({e})"),
    })?;
    if d > MAX_SETTING_DURATION {
        return Err(BadValue {
            value: value.into(),
            allowed: "a duration of at most 10 years (3650d)".into(),
        });
    }
    Ok(d)
}

/// `HOST:PORT` where HOST is a DNS name, an IPv4 literal or a bracketed IPv6 literal.
pub fn host_port(value: &str) -> Result<(String, u16), BadValue> {
    let bad = || BadValue {
        value: value.into(),
        allowed: "HOST:PORT, e.g. gw.example.com:7443 or 203.0.113.1:7443".into(),
    };
    let (host, port) = value.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().map_err(|_| bad())?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host.to_string(), port))
}

/// `bbr`, `cubic` or `newreno` (case-insensitive; `reno` for NewReno).
pub fn congestion(value: &str) -> Result<CongestionControl, BadValue> {
    match value.to_ascii_lowercase().as_str() {
        "bbr" => Ok(CongestionControl::Bbr),
        "cubic" => Ok(CongestionControl::Cubic),
        "newreno" | "reno" => Ok(CongestionControl::NewReno),
        _ => Err(BadValue {
            value: value.into(),
            allowed: "bbr, cubic or newreno".into(),
        }),
    }
}

/// Where state lives when nobody says: systemd's `StateDirectory`, `/var/lib/petrel/<component>`
/// for root, else the user's state directory (so a developer can try Petrel without root).
pub fn default_state_dir(component: &str) -> PathBuf {
    if let Ok(d) = std::env::var("STATE_DIRECTORY") {
        if let Some(first) = d.split(':').next() {
            return PathBuf::from(first);
        }
    }
    let is_root = std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false);
    if is_root {
        return PathBuf::from(format!("/var/lib/petrel/{component}"));
    }
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("petrel").join(component)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses() {
        assert_eq!(duration("1m 30s"), Ok(Duration::from_secs(90)));
        assert!(duration("5 parsecs").is_err());
        assert_eq!(duration("3650d"), Ok(MAX_SETTING_DURATION));
        assert!(duration("3650d 1s").is_err_and(|b| b.allowed.contains("10 years")));
        assert!(duration("500000000y").is_err());
        assert_eq!(
            host_port("gw.example.com:7443"),
            Ok(("gw.example.com".into(), 7443))
        );
        assert_eq!(
            host_port("[2001:db8::1]:7443"),
            Ok(("2001:db8::1".into(), 7443))
        );
        for bad in ["host", ":7443", "host:0", "host:99999"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
        assert_eq!(congestion("BBR"), Ok(CongestionControl::Bbr));
        assert_eq!(congestion("reno"), Ok(CongestionControl::NewReno));
        assert!(congestion("vegas").is_err_and(|b| b.allowed.contains("cubic")));
    }
}
