//! Running external commands with a deadline, errors that say what failed, and processes that
//! die with their guard.
//!
//! Every command runs in its own process group, so a timeout or a dropped [`ChildGuard`] kills
//! whatever the command started too.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{Read as _, Seek as _, SeekFrom, Write as _};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use rustix::process::{kill_process_group, Pid, Signal};

/// Deadline for one short configuration command.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// What a finished command printed.
#[derive(Clone, Debug)]
pub struct CmdOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status.
    pub status: ExitStatus,
    /// Standard output (lossy UTF-8).
    pub stdout: String,
    /// Standard error (lossy UTF-8).
    pub stderr: String,
}

impl CmdOutput {
    /// Whether the command exited with status 0.
    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// An error unless the command succeeded; the message carries the command, its status, its
    /// stderr and stdout.
    pub fn check(self) -> Result<CmdOutput> {
        if self.success() {
            return Ok(self);
        }
        let mut msg = format!("`{}` failed ({})", self.command, self.status);
        append_block(&mut msg, "stderr", &self.stderr);
        append_block(&mut msg, "stdout", &self.stdout);
        bail!(msg)
    }
}

fn append_block(msg: &mut String, title: &str, text: &str) {
    let text = text.trim_end();
    if !text.is_empty() {
        let _ = write!(msg, "\n--- {title} ---\n{text}");
    }
}

/// `program arg arg` with arguments quoted where a shell would need it.
pub fn describe(cmd: &Command) -> String {
    let mut s = quote(&cmd.get_program().to_string_lossy());
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&quote(&a.to_string_lossy()));
    }
    s
}

fn quote(a: &str) -> String {
    if !a.is_empty()
        && a.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b))
    {
        a.to_owned()
    } else {
        format!("'{}'", a.replace('\'', r"'\''"))
    }
}

/// Kill a whole process group; errors (already gone) are ignored.
pub(crate) fn kill_group(pid: u32, sig: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process_group(pid, sig);
    }
}

/// Runs `cmd` (stdin from `stdin`, if any), waiting at most `timeout`. Returns the output
/// whatever the exit status; errors only if it could not run or timed out (then it is killed).
pub fn run(mut cmd: Command, stdin: Option<&str>, timeout: Duration) -> Result<CmdOutput> {
    let desc = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start `{desc}`"))?;
    let pid = child.id();
    let writer = match (stdin, child.stdin.take()) {
        (Some(input), Some(mut pipe)) => {
            let input = input.to_owned();
            Some(thread::spawn(move || pipe.write_all(input.as_bytes())))
        }
        _ => None,
    };
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(r) => r.with_context(|| format!("waiting for `{desc}`"))?,
        Err(_) => {
            kill_group(pid, Signal::KILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("`{desc}` did not finish within {timeout:?}; killed it");
        }
    };
    if let Some(w) = writer {
        if let Ok(Err(e)) = w.join() {
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(anyhow!(e).context(format!("writing stdin of `{desc}`")));
            }
        }
    }
    Ok(CmdOutput {
        command: desc,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Like [`run`] but a non-zero exit is an error. When `stdin` is a batch script the error lists
/// it with line numbers, so `Command failed -:7` can be matched to its line.
pub fn run_checked(cmd: Command, stdin: Option<&str>, timeout: Duration) -> Result<CmdOutput> {
    let out = run(cmd, stdin, timeout)?;
    match (out.success(), stdin) {
        (true, _) => Ok(out),
        (false, None) => out.check(),
        (false, Some(script)) => {
            let numbered: String = script
                .lines()
                .enumerate()
                .map(|(i, l)| format!("{:>3}  {l}\n", i + 1))
                .collect();
            Err(out
                .check()
                .err()
                .unwrap_or_else(|| anyhow!("command failed"))
                .context(format!("batch input:\n{numbered}")))
        }
    }
}

/// Shorthand: a [`Command`] for `program args...`.
pub fn command<S: AsRef<str>>(program: &str, args: &[S]) -> Command {
    let mut c = Command::new(program);
    c.args(args.iter().map(AsRef::as_ref));
    c
}

/// Polls `cond` until it returns `Ok(true)`, backing off from 5 ms to 100 ms between tries.
/// Errors after `timeout`, naming `what` and the last error `cond` returned.
pub fn wait_until<F>(what: &str, timeout: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + timeout;
    let mut delay = Duration::from_millis(5);
    loop {
        let last = match cond() {
            Ok(true) => return Ok(()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        let now = Instant::now();
        if now >= deadline {
            return Err(match last {
                Some(e) => e.context(format!("timed out after {timeout:?} waiting for {what}")),
                None => anyhow!("timed out after {timeout:?} waiting for {what}"),
            });
        }
        thread::sleep(delay.min(deadline - now));
        delay = (delay * 2).min(Duration::from_millis(100));
    }
}

/// Checks `cond` for the whole `window` (every 20 ms) and succeeds only if it never returned
/// `Ok(true)`: how to prove that something does *not* happen. An error from `cond` is returned
/// at once, so a broken probe never passes as "did not happen".
pub fn never_within<F>(what: &str, window: Duration, mut cond: F) -> Result<()>
where
    F: FnMut() -> Result<bool>,
{
    let deadline = Instant::now() + window;
    loop {
        if cond().with_context(|| format!("probing whether {what}"))? {
            bail!("{what} happened, but must not");
        }
        let now = Instant::now();
        if now >= deadline {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(20).min(deadline - now));
    }
}

/// A running process that is killed (with its whole process group) and reaped when dropped.
/// Its stdout and stderr go to a log file; if the thread is panicking when the guard drops, the
/// log's tail is printed so a failing test shows what the process said.
pub struct ChildGuard {
    child: Child,
    description: String,
    log_path: PathBuf,
    status: Option<ExitStatus>,
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("pid", &self.child.id())
            .field("command", &self.description)
            .field("log", &self.log_path)
            .finish()
    }
}

impl ChildGuard {
    /// Starts `cmd` in a new process group with stdin from /dev/null and stdout+stderr appended
    /// to `log_path` (created, with parent directories).
    pub fn spawn(mut cmd: Command, log_path: impl Into<PathBuf>) -> Result<ChildGuard> {
        let log_path = log_path.into();
        let description = describe(&cmd);
        if let Some(dir) = log_path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .with_context(|| format!("opening log {}", log_path.display()))?;
        let log2 = log.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("cannot start `{description}`"))?;
        Ok(ChildGuard {
            child,
            description,
            log_path,
            status: None,
        })
    }

    /// Process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line.
    pub fn description(&self) -> &str {
        &self.description
    }

    /// Where stdout and stderr go.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process printed so far.
    pub fn log(&self) -> String {
        std::fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last `lines` lines of the log.
    pub fn log_tail(&self, lines: usize) -> String {
        let mut f = match File::open(&self.log_path) {
            Ok(f) => f,
            Err(_) => return String::new(),
        };
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
        let mut buf = Vec::new();
        let _ = f.read_to_end(&mut buf);
        let text = String::from_utf8_lossy(&buf);
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Exit status if it has exited (reaps it).
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("waiting for `{}`", self.description))?;
        }
        Ok(self.status)
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_status(), Ok(None))
    }

    /// Waits up to `timeout` for it to exit on its own.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let mut status = None;
        wait_until(&format!("`{}` to exit", self.description), timeout, || {
            status = self.try_status()?;
            Ok(status.is_some())
        })?;
        status.ok_or_else(|| anyhow!("`{}` has no exit status", self.description))
    }

    /// Polls its log until it contains `needle` (e.g. a "listening" line). Fails early, with the
    /// log tail, if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let what = format!("`{}` to log {needle:?}", self.description);
        wait_until(&what, timeout, || {
            if self.log().contains(needle) {
                return Ok(true);
            }
            if let Some(st) = self.try_status()? {
                bail!(
                    "`{}` exited ({st}) before logging {needle:?}; log tail:\n{}",
                    self.description,
                    self.log_tail(30)
                );
            }
            Ok(false)
        })
    }

    /// Sends SIGTERM to the process group, waits up to `grace`, then SIGKILL. Returns the status.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(st) = self.try_status()? {
            return Ok(st);
        }
        kill_group(self.pid(), Signal::TERM);
        match self.wait_timeout(grace) {
            Ok(st) => Ok(st),
            Err(_) => self.kill(),
        }
    }

    /// SIGKILLs the process group and reaps the process.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.try_status()? {
            kill_group(self.pid(), Signal::KILL); // stragglers in its group
            return Ok(st);
        }
        kill_group(self.pid(), Signal::KILL);
        self.wait_timeout(Duration::from_secs(10))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("petrel-lab: could not kill `{}`: {e:#}", self.description);
        }
        if thread::panicking() {
            eprintln!(
                "petrel-lab: ---- last lines of `{}` ({}) ----\n{}\n---- end ----",
                self.description,
                self.log_path.display(),
                self.log_tail(40)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_reports_failure_with_stderr() {
        let err = run_checked(
            command("sh", &["-c", "echo oops >&2; exit 3"]),
            None,
            DEFAULT_TIMEOUT,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(
            err.contains("oops") && err.contains("exit status: 3") && err.contains("sh -c"),
            "{err}"
        );
    }

    #[test]
    fn run_times_out() {
        let t = Instant::now();
        let r = run(
            command("sh", &["-c", "sleep 30"]),
            None,
            Duration::from_millis(200),
        );
        assert!(r.is_err());
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn batch_errors_are_numbered() {
        let err = run_checked(
            command("sh", &["-c", "cat >/dev/null; exit 1"]),
            Some("a\nb\n"),
            DEFAULT_TIMEOUT,
        )
        .err()
        .map(|e| format!("{e:#}"))
        .unwrap_or_default();
        assert!(err.contains("  2  b"), "{err}");
    }

    #[test]
    fn guard_kills_on_drop() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let mut g = ChildGuard::spawn(
            command("sh", &["-c", "echo ready; exec sleep 30"]),
            dir.path().join("x.log"),
        )?;
        g.wait_for_log("ready", Duration::from_secs(5))?;
        let pid = g.pid();
        drop(g);
        assert!(!Path::new(&format!("/proc/{pid}")).exists());
        Ok(())
    }

    #[test]
    fn never_within_proves_negatives_and_propagates_errors() {
        assert!(never_within("x", Duration::from_millis(50), || Ok(false)).is_ok());
        assert!(never_within("x", Duration::from_millis(50), || Ok(true)).is_err());
        assert!(never_within("x", Duration::from_millis(50), || bail!("probe broke")).is_err());
    }

    #[test]
    fn quoting() {
        assert_eq!(
            describe(&command("ip", &["-n", "a b", "x'y"])),
            r"ip -n 'a b' 'x'\''y'"
        );
    }
}
