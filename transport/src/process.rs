//! Metrics every Petrel process exports beside its own, appended by the admin server's
//! `/metrics`: `petrel_build_info` (binary, version and the git revision it was built from, when
//! the build knew it) and the usual `process_*` families read from `/proc/self` (resident and
//! virtual memory, open and maximum file descriptors, CPU seconds, start time).

use std::sync::OnceLock;

/// What `petrel_build_info` says about this binary.
#[derive(Debug, Clone)]
pub struct BuildInfo {
    pub binary: &'static str,
    pub version: &'static str,
    /// Git revision at build time; empty when the build did not run in a git checkout.
    pub revision: &'static str,
}

static BUILD_INFO: OnceLock<BuildInfo> = OnceLock::new();

/// Records this binary's build information (once, from `main`).
pub fn set_build_info(info: BuildInfo) {
    let _ = BUILD_INFO.set(info);
}

/// The build information recorded by [`set_build_info`], if any.
pub fn build_info() -> Option<&'static BuildInfo> {
    BUILD_INFO.get()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Clock ticks per second of `/proc/<pid>/stat` times. Linux fixes USER_HZ at 100 on every
/// architecture Petrel runs on.
const USER_HZ: f64 = 100.0;

/// A numeric field of `/proc/self/status` (`VmRSS:` and the like are in kB).
fn status_kib(status: &str, key: &str) -> Option<f64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|v| v.parse::<f64>().ok())
}

/// The fields of `/proc/self/stat` after the command name (field 3 onwards).
fn stat_fields(stat: &str) -> Vec<&str> {
    stat.rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default()
}

fn boot_time_seconds() -> Option<f64> {
    std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn max_fds() -> Option<f64> {
    std::fs::read_to_string("/proc/self/limits")
        .ok()?
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
}

/// The text exposition of `petrel_build_info` and the `process_*` families (OpenMetrics, no
/// `# EOF`). Families whose source cannot be read are left out.
pub fn render() -> String {
    let mut out = String::new();
    if let Some(b) = build_info() {
        out.push_str("# HELP petrel_build info Version and source revision of this binary.\n");
        out.push_str("# TYPE petrel_build info\n");
        out.push_str(&format!(
            "petrel_build_info{{binary=\"{}\",version=\"{}\",revision=\"{}\"}} 1\n",
            escape(b.binary),
            escape(b.version),
            escape(b.revision)
        ));
    }
    let mut gauge = |name: &str, help: &str, value: Option<f64>| {
        if let Some(v) = value {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}\n"
            ));
        }
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    gauge(
        "process_resident_memory_bytes",
        "Resident memory size in bytes.",
        status_kib(&status, "VmRSS:").map(|k| k * 1024.0),
    );
    gauge(
        "process_virtual_memory_bytes",
        "Virtual memory size in bytes.",
        status_kib(&status, "VmSize:").map(|k| k * 1024.0),
    );
    gauge(
        "process_open_fds",
        "Number of open file descriptors.",
        std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as f64),
    );
    gauge(
        "process_max_fds",
        "Maximum number of open file descriptors.",
        max_fds(),
    );
    gauge(
        "process_threads",
        "Number of OS threads in the process.",
        status_kib(&status, "Threads:"),
    );
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let fields = stat_fields(&stat);
    // Field 14 utime, 15 stime, 22 starttime (1-based in proc(5)); `fields` starts at field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
    gauge(
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch in seconds.",
        field(22)
            .zip(boot_time_seconds())
            .map(|(s, b)| b + s / USER_HZ),
    );
    if let (Some(u), Some(s)) = (field(14), field(15)) {
        out.push_str(&format!(
            "# HELP process_cpu_seconds Total user and system CPU time spent in seconds.\n\
             # TYPE process_cpu_seconds counter\nprocess_cpu_seconds_total {}\n",
            (u + s) / USER_HZ
        ));
    }
    out
}

/// `body` (a registry's exposition, possibly ending in `# EOF`) with [`render`] added before
/// the end marker.
pub fn append_to(body: String) -> String {
    let extra = render();
    match body.strip_suffix("# EOF\n") {
        Some(head) => format!("{head}{extra}# EOF\n"),
        None => format!("{body}{extra}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_build_info_and_process_families_before_eof() {
        set_build_info(BuildInfo {
            binary: "petrel-test",
            version: "1.2.3",
            revision: "abc\"def",
        });
        let text = append_to("# TYPE x gauge\nx 1\n# EOF\n".into());
        assert!(text.ends_with("# EOF\n"), "{text}");
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(
            text.contains(
                "petrel_build_info{binary=\"petrel-test\",version=\"1.2.3\",revision=\"abc\\\"def\"} 1"
            ),
            "{text}"
        );
        let value = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} missing:\n{text}"))
        };
        assert!(value("process_resident_memory_bytes") > 1_000_000.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_max_fds") >= value("process_open_fds"));
        assert!(value("process_cpu_seconds_total") >= 0.0);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
    }
}
