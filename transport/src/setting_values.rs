//! The one value-parsing layer of both binaries' configuration: durations, `HOST:PORT`
//! endpoints, `IP:PORT` listen addresses, sizes, the congestion controller, the default state
//! directory, and the [`ConfigError`] both binaries' configurations return (`main` exits 64 on
//! it). The bare parsers return a [`BadValue`] (the value and what would parse); the `parse_*`
//! functions name the field too and return an [`InvalidSetting`], which converts into a
//! [`ConfigError`] (`?`), so the message an operator sees names the flag and what is allowed,
//! worded the same way in both binaries.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::quic::CongestionControl;

/// A value that does not parse, and what would.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub value: String,
    pub allowed: String,
}

impl BadValue {
    /// This value given for `field`.
    pub fn for_field(self, field: &'static str) -> InvalidSetting {
        InvalidSetting {
            field,
            value: self.value,
            allowed: self.allowed,
        }
    }
}

/// A setting that cannot be used: the field (its long flag's name), the value given, and what
/// is allowed. Both binaries' configuration errors convert from it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {field}: {value:?}: {allowed}")]
pub struct InvalidSetting {
    pub field: &'static str,
    pub value: String,
    pub allowed: String,
}

/// A configuration value that cannot be used: `main` prints it and exits 64 (EX_USAGE).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid {field}: {value:?}: {allowed}")]
    Invalid {
        field: &'static str,
        value: String,
        allowed: String,
    },
    #[error("missing {field}: {hint}")]
    Missing {
        field: &'static str,
        hint: &'static str,
    },
    #[error("config file {path}: {message}")]
    File { path: PathBuf, message: String },
}

impl From<InvalidSetting> for ConfigError {
    fn from(e: InvalidSetting) -> Self {
        Self::Invalid {
            field: e.field,
            value: e.value,
            allowed: e.allowed,
        }
    }
}

/// [`duration`] for `field`.
pub fn parse_duration(field: &'static str, value: &str) -> Result<Duration, InvalidSetting> {
    duration(value).map_err(|b| b.for_field(field))
}

/// [`host_port`] for `field`.
pub fn parse_host_port(field: &'static str, value: &str) -> Result<(String, u16), InvalidSetting> {
    host_port(value).map_err(|b| b.for_field(field))
}

/// [`congestion`] for `field`.
pub fn parse_congestion(
    field: &'static str,
    value: &str,
) -> Result<CongestionControl, InvalidSetting> {
    congestion(value).map_err(|b| b.for_field(field))
}

/// An `IP:PORT` socket address (a listen or admin address) for `field`.
pub fn parse_socket_addr(field: &'static str, value: &str) -> Result<SocketAddr, InvalidSetting> {
    value.parse().map_err(|_| InvalidSetting {
        field,
        value: value.into(),
        allowed: "an IP:PORT such as 0.0.0.0:7443 or [::]:7443".into(),
    })
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

/// `400MiB`, `2GiB`, `512M`, `1G`, `64K` or plain bytes; `None` for anything else (the caller
/// says what its field allows, such as `off` or a minimum).
pub fn size(value: &str) -> Option<u64> {
    let v = value.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (n, unit) = v.split_at(split);
    let n: u64 = n.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        _ => return None,
    };
    n.checked_mul(mult)
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
    #![allow(clippy::unwrap_used)]
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
        assert_eq!(size("400MiB"), Some(400 << 20));
        assert_eq!(size("2G"), Some(2 << 30));
        assert_eq!(size("4096"), Some(4096));
        for bad in ["lots", "5TiB", "-1", ""] {
            assert_eq!(size(bad), None, "{bad}");
        }
    }

    #[test]
    fn named_errors_say_field_value_and_what_is_allowed() {
        let e = parse_duration("keepalive", "5 parsecs").unwrap_err();
        assert_eq!(e.field, "keepalive");
        assert!(e
            .to_string()
            .starts_with("invalid keepalive: \"5 parsecs\": a duration"));
        let e = parse_socket_addr("listen", "nope").unwrap_err();
        assert!(e.to_string().contains("IP:PORT"), "{e}");
        assert_eq!(
            parse_socket_addr("listen", "127.0.0.1:1"),
            Ok(SocketAddr::from(([127, 0, 0, 1], 1)))
        );
        assert_eq!(parse_host_port("server", "h:1"), Ok(("h".into(), 1)));
        assert!(parse_congestion("congestion", "vegas").is_err_and(|e| e.field == "congestion"));
    }
}
