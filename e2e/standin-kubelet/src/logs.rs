//! Container logs: a per-container line store, `GET /containerLogs/...` with `tailLines`,
//! `timestamps`, `limitBytes`, `sinceSeconds` and `follow`, and lines pushed by tests.
//!
//! Every container starts with `initial_lines` deterministic lines
//! `standin-kubelet log line N for ns/pod/container`. Lines pushed with
//! `POST /standin/log/{ns}/{pod}/{container}` are appended to the log and sent to every open
//! follower of that container at once. A follower additionally gets a generated line (numbered
//! on from the log's length when it started) every follow interval; generated lines are per
//! follower and are not stored.

use std::collections::HashMap;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::state::{FollowGuard, State};

/// Lines kept per container (oldest dropped first).
const MAX_LINES: usize = 100_000;

/// One log line (without its newline).
#[derive(Debug, Clone)]
pub struct LogLine {
    /// When it was written.
    pub time: SystemTime,
    /// Text.
    pub text: String,
}

struct ContainerLog {
    lines: Vec<LogLine>,
    tx: broadcast::Sender<LogLine>,
}

/// All containers' logs.
pub struct LogStore {
    initial_lines: usize,
    containers: Mutex<HashMap<String, ContainerLog>>,
}

impl std::fmt::Debug for LogStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogStore")
            .field("initial_lines", &self.initial_lines)
            .finish_non_exhaustive()
    }
}

/// `ns/pod/container`.
pub fn container_key(ns: &str, pod: &str, container: &str) -> String {
    format!("{ns}/{pod}/{container}")
}

/// The deterministic line number `n` (1-based) of a container.
pub fn standard_line(n: usize, key: &str) -> String {
    format!("standin-kubelet log line {n} for {key}")
}

impl LogStore {
    /// A store whose containers start with `initial_lines` lines.
    pub fn new(initial_lines: usize) -> Self {
        LogStore {
            initial_lines,
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, ContainerLog>> {
        self.containers.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn entry<'a>(
        &self,
        map: &'a mut HashMap<String, ContainerLog>,
        key: &str,
    ) -> &'a mut ContainerLog {
        map.entry(key.to_string()).or_insert_with(|| {
            let now = SystemTime::now();
            ContainerLog {
                lines: (1..=self.initial_lines)
                    .map(|n| LogLine {
                        time: now,
                        text: standard_line(n, key),
                    })
                    .collect(),
                tx: broadcast::channel(4096).0,
            }
        })
    }

    /// Appends `text` (split on newlines) to a container's log and pushes each line to its
    /// followers. Returns the number of lines appended.
    pub fn append(&self, key: &str, text: &str) -> usize {
        let now = SystemTime::now();
        let mut map = self.lock();
        let log = self.entry(&mut map, key);
        let mut n = 0;
        let text = text.strip_suffix('\n').unwrap_or(text);
        for line in text.split('\n') {
            let line = LogLine {
                time: now,
                text: line.strip_suffix('\r').unwrap_or(line).to_string(),
            };
            if log.lines.len() >= MAX_LINES {
                log.lines.remove(0);
            }
            log.lines.push(line.clone());
            // No receivers is fine.
            let _ = log.tx.send(line);
            n += 1;
        }
        n
    }

    /// The current lines plus a subscription to later ones, taken atomically.
    pub fn snapshot_and_subscribe(
        &self,
        key: &str,
    ) -> (Vec<LogLine>, broadcast::Receiver<LogLine>) {
        let mut map = self.lock();
        let log = self.entry(&mut map, key);
        (log.lines.clone(), log.tx.subscribe())
    }

    /// Keys of every container that has a log.
    pub fn containers(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

/// Parsed `containerLogs` query.
#[derive(Debug, Clone, Default)]
pub struct LogOptions {
    /// `follow`
    pub follow: bool,
    /// `tailLines`
    pub tail_lines: Option<usize>,
    /// `timestamps`
    pub timestamps: bool,
    /// `limitBytes`
    pub limit_bytes: Option<usize>,
    /// `sinceSeconds`
    pub since_seconds: Option<u64>,
}

/// Formats a time like Go's RFC3339Nano with all nine digits (UTC).
pub fn rfc3339_nano(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = if month <= 2 { y + 1 } else { y };
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_nanos()
    )
}

fn format_line(line: &LogLine, timestamps: bool) -> String {
    if timestamps {
        format!("{} {}\n", rfc3339_nano(line.time), line.text)
    } else {
        format!("{}\n", line.text)
    }
}

/// The non-follow part of a response: selected lines, formatted, limited.
pub fn render(lines: &[LogLine], opts: &LogOptions) -> String {
    let now = SystemTime::now();
    let mut selected: Vec<&LogLine> = lines
        .iter()
        .filter(|l| match opts.since_seconds {
            Some(s) => now
                .duration_since(l.time)
                .map(|age| age <= Duration::from_secs(s))
                .unwrap_or(true),
            None => true,
        })
        .collect();
    if let Some(n) = opts.tail_lines {
        let skip = selected.len().saturating_sub(n);
        selected.drain(..skip);
    }
    let mut out = String::new();
    for l in selected {
        out.push_str(&format_line(l, opts.timestamps));
    }
    if let Some(limit) = opts.limit_bytes {
        truncate_at_char_boundary(&mut out, limit);
    }
    out
}

fn truncate_at_char_boundary(s: &mut String, limit: usize) {
    if s.len() > limit {
        let mut cut = limit;
        while cut > 0 && !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// A streaming response body fed by a producer task; holds the follow counter while alive.
pub struct FollowBody {
    rx: mpsc::Receiver<Bytes>,
    _guard: FollowGuard,
}

impl std::fmt::Debug for FollowBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FollowBody").finish_non_exhaustive()
    }
}

impl Body for FollowBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|b| Ok(Frame::data(b))))
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// Starts a follow stream for `key`: the initial lines, then pushed lines and (if `interval`
/// is non-zero) a generated line every `interval`, until the body is dropped or `shutdown`.
pub fn follow(
    store: &LogStore,
    state: &Arc<State>,
    key: &str,
    opts: LogOptions,
    interval: Duration,
    shutdown: CancellationToken,
) -> FollowBody {
    let (lines, mut sub) = store.snapshot_and_subscribe(key);
    let initial = render(&lines, &opts);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    let guard = state.open_follow(key);
    let key = key.to_string();
    let mut next_n = lines.len() + 1;
    tokio::spawn(async move {
        let mut budget = opts.limit_bytes.map(|l| l.saturating_sub(initial.len()));
        if !initial.is_empty() && tx.send(Bytes::from(initial)).await.is_err() {
            return;
        }
        let mut ticker = tokio::time::interval(if interval.is_zero() {
            Duration::from_secs(3600)
        } else {
            interval
        });
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            let line = tokio::select! {
                _ = tx.closed() => return,
                _ = shutdown.cancelled() => return,
                _ = ticker.tick(), if !interval.is_zero() => {
                    let text = standard_line(next_n, &key);
                    next_n += 1;
                    LogLine { time: SystemTime::now(), text }
                }
                r = sub.recv() => match r {
                    Ok(line) => line,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(container = %key, skipped = n, "follower lagged");
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                },
            };
            let mut chunk = format_line(&line, opts.timestamps);
            if let Some(left) = budget.as_mut() {
                truncate_at_char_boundary(&mut chunk, *left);
                *left -= chunk.len();
            }
            if !chunk.is_empty() && tx.send(Bytes::from(chunk)).await.is_err() {
                return;
            }
            if budget == Some(0) {
                return;
            }
        }
    });
    FollowBody { rx, _guard: guard }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339_nano(UNIX_EPOCH), "1970-01-01T00:00:00.000000000Z");
        let t = UNIX_EPOCH + Duration::new(951_782_400, 5); // 2000-02-29
        assert_eq!(rfc3339_nano(t), "2000-02-29T00:00:00.000000005Z");
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(rfc3339_nano(t), "2023-11-14T22:13:20.000000000Z");
    }

    #[test]
    fn tail_and_limit() {
        let store = LogStore::new(5);
        store.append("a/b/c", "pushed one\npushed two\n");
        let (lines, _) = store.snapshot_and_subscribe("a/b/c");
        assert_eq!(lines.len(), 7);
        let all = render(&lines, &LogOptions::default());
        assert!(all.starts_with("standin-kubelet log line 1 for a/b/c\n"));
        assert!(all.ends_with("pushed one\npushed two\n"));
        let tail = render(
            &lines,
            &LogOptions {
                tail_lines: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(tail, "pushed one\npushed two\n");
        let limited = render(
            &lines,
            &LogOptions {
                limit_bytes: Some(10),
                ..Default::default()
            },
        );
        assert_eq!(limited, "standin-ku");
        let ts = render(
            &lines,
            &LogOptions {
                tail_lines: Some(1),
                timestamps: true,
                ..Default::default()
            },
        );
        assert!(ts.ends_with("Z pushed two\n"), "{ts}");
    }
}
