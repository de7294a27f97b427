//! `exec` and `attach` over SPDY: the kubelet's remote-command stream protocol
//! (`channel.k8s.io`, `v2`, `v3` and `v4.channel.k8s.io`) and a tiny command interpreter.
//!
//! The client opens one stream per channel, each with a `streamType` header
//! (`error`, `stdin`, `stdout`, `stderr`, `resize`); the kubelet replies to each and, once all
//! expected streams exist, runs the command. At the end stdout/stderr are half-closed, the
//! result goes on the error stream (v4: a JSON `metav1.Status` carrying the exit code; v1-v3:
//! the failure message, nothing on success), and the connection is closed with GOAWAY.
//!
//! Commands: `cat` (stdin to stdout until EOF; with a TTY, `^D` also ends it and `^C` exits 130), `echo [-n] ARGS`, `true`, `false`,
//! `sleep SECONDS`, `seq [FIRST] LAST`, `exit [N]`, and `sh -c SCRIPT` where SCRIPT is a list of
//! those joined by `;`, `&&`, `||` or newlines, with shell quoting. Anything else writes
//! `standin-kubelet: NAME: command not found` to stderr and exits 127. `attach` behaves like
//! `exec cat`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use crate::query::Query;
use crate::spdy::{Incoming, Session, SessionError, Stream, StreamReader, StreamWriter};
use crate::state::{ExecRecord, GaugeKind, State, TerminalSize};

/// Exec/attach protocols, newest first.
pub const EXEC_PROTOCOLS: &[&str] = &[
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// A negotiated remote-command protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `channel.k8s.io`
    V1,
    /// `v2.channel.k8s.io`
    V2,
    /// `v3.channel.k8s.io` (adds the resize stream)
    V3,
    /// `v4.channel.k8s.io` (JSON status with the exit code)
    V4,
}

impl Protocol {
    /// Maps a protocol name to a version.
    pub fn from_name(name: &str) -> Option<Protocol> {
        match name {
            "v4.channel.k8s.io" => Some(Protocol::V4),
            "v3.channel.k8s.io" => Some(Protocol::V3),
            "v2.channel.k8s.io" => Some(Protocol::V2),
            "channel.k8s.io" | "" => Some(Protocol::V1),
            _ => None,
        }
    }

    fn supports_resize(self) -> bool {
        matches!(self, Protocol::V3 | Protocol::V4)
    }
}

/// exec or attach.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Run a command.
    Exec,
    /// Attach to the container's main process (here: `cat`).
    Attach,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Exec => "exec",
            Kind::Attach => "attach",
        }
    }
}

/// Which channels the client asked for (`input`, `output`, `error`, `tty` query flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamOptions {
    /// stdin
    pub stdin: bool,
    /// stdout
    pub stdout: bool,
    /// stderr (forced off with a TTY, as the kubelet does)
    pub stderr: bool,
    /// TTY
    pub tty: bool,
}

impl StreamOptions {
    /// Reads the flags like the kubelet's `NewOptions`.
    pub fn from_query(q: &Query) -> Result<StreamOptions, &'static str> {
        let tty = q.flag("tty");
        let stdin = q.flag("input");
        let stdout = q.flag("output");
        let stderr = q.flag("error") && !tty;
        if !stdin && !stdout && !stderr {
            return Err("you must specify at least 1 of stdin, stdout, stderr");
        }
        Ok(StreamOptions {
            stdin,
            stdout,
            stderr,
            tty,
        })
    }
}

/// Everything about one exec/attach request.
#[derive(Debug, Clone)]
pub struct ExecRequest {
    /// exec or attach.
    pub kind: Kind,
    /// Namespace.
    pub namespace: String,
    /// Pod.
    pub pod: String,
    /// Container.
    pub container: String,
    /// argv (exec only).
    pub command: Vec<String>,
    /// Requested channels.
    pub options: StreamOptions,
    /// Negotiated protocol name.
    pub protocol_name: String,
}

/// Timeouts for one session.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// How long the client has to open all expected streams.
    pub stream_creation: Duration,
    /// How long to wait for the client to close after GOAWAY.
    pub linger: Duration,
}

#[derive(Default)]
struct Channels {
    error: Option<Stream>,
    stdin: Option<Stream>,
    stdout: Option<Stream>,
    stderr: Option<Stream>,
    resize: Option<Stream>,
}

/// Serves one upgraded exec/attach connection to the end.
pub async fn serve(
    session: Session,
    mut incoming: Incoming,
    req: ExecRequest,
    state: Arc<State>,
    timeouts: Timeouts,
) {
    let _gauge = state.open(GaugeKind::Exec);
    let protocol = Protocol::from_name(&req.protocol_name).unwrap_or(Protocol::V1);
    let opts = req.options;
    let expected = 1
        + usize::from(opts.stdin)
        + usize::from(opts.stdout)
        + usize::from(opts.stderr)
        + usize::from(opts.tty && protocol.supports_resize());

    let mut ch = Channels::default();
    let deadline = Instant::now() + timeouts.stream_creation;
    let mut received = 0;
    while received < expected {
        let stream = match tokio::time::timeout_at(deadline, incoming.recv()).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                tracing::debug!("client closed before creating all streams");
                session.abort();
                return;
            }
            Err(_) => {
                tracing::warn!(
                    expected,
                    received,
                    "timed out waiting for client to create streams"
                );
                session.abort();
                return;
            }
        };
        if stream.reply(false).await.is_err() {
            session.abort();
            return;
        }
        let slot = match stream.headers().get("streamtype").unwrap_or("") {
            "error" => &mut ch.error,
            "stdin" => &mut ch.stdin,
            "stdout" => &mut ch.stdout,
            "stderr" => &mut ch.stderr,
            "resize" => &mut ch.resize,
            other => {
                tracing::warn!(stream_type = other, "unexpected stream type");
                drain_in_background(stream);
                continue;
            }
        };
        *slot = Some(stream);
        received += 1;
    }

    // Streams opened later are accepted and ignored, so the reader never blocks on them.
    tokio::spawn(async move {
        while let Some(s) = incoming.recv().await {
            if s.reply(false).await.is_err() {
                return;
            }
            drain_in_background(s);
        }
    });

    if let Some(resize) = ch.resize.take() {
        let state = state.clone();
        tokio::spawn(async move { read_resizes(resize.split().0, &state).await });
    }
    if protocol == Protocol::V1 {
        if let Some(stdin) = &ch.stdin {
            let _ = stdin.writer().close().await;
        }
    }

    let writer_of = |s: Option<Stream>| s.map(|s| s.split().1);
    let error_stream = writer_of(ch.error.take());
    let mut io = CmdIo {
        stdin: ch.stdin.take().map(|s| s.split().0),
        stdout: writer_of(ch.stdout.take()),
        stderr: writer_of(ch.stderr.take()),
        tty: opts.tty,
        stdin_bytes: 0,
        stdout_bytes: 0,
        stderr_bytes: 0,
    };
    let argv = match req.kind {
        Kind::Exec => req.command.clone(),
        Kind::Attach => vec!["cat".to_string()],
    };

    let outcome = tokio::select! {
        r = run(&argv, &mut io, 0) => r.ok(),
        _ = session.closed() => None,
    };
    if let Some(code) = outcome {
        let _ = finish_streams(&mut io, error_stream.as_ref(), protocol, code).await;
    }
    // Record before lingering, so the history is visible as soon as the client has the status.
    state.record_exec(ExecRecord {
        kind: req.kind.as_str().to_string(),
        namespace: req.namespace,
        pod: req.pod,
        container: req.container,
        command: req.command,
        protocol: req.protocol_name,
        exit_code: outcome,
        stdin_bytes: io.stdin_bytes,
        stdout_bytes: io.stdout_bytes,
        stderr_bytes: io.stderr_bytes,
    });
    if outcome.is_some() {
        session.finish(timeouts.linger).await;
    } else {
        session.abort();
    }
}

fn drain_in_background(stream: Stream) {
    let (mut r, _w) = stream.split();
    tokio::spawn(async move {
        let _ = r.drain().await;
    });
}

async fn read_resizes(mut r: StreamReader, state: &State) {
    let mut buf: Vec<u8> = Vec::new();
    while let Ok(Some(chunk)) = r.read().await {
        buf.extend_from_slice(&chunk);
        let mut consumed = 0;
        let mut iter = serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
        for item in iter.by_ref() {
            match item {
                Ok(size) => state.record_terminal_size(size),
                Err(e) if e.is_eof() => break,
                Err(_) => {
                    // Not a size: drop what we have and carry on.
                    consumed = buf.len();
                    break;
                }
            }
        }
        consumed = consumed.max(iter.byte_offset());
        buf.drain(..consumed.min(buf.len()));
        if buf.len() > 64 * 1024 {
            buf.clear();
        }
    }
}

#[derive(Serialize)]
struct Empty {}

#[derive(Serialize)]
struct Cause {
    reason: &'static str,
    message: String,
}

#[derive(Serialize)]
struct Details {
    causes: Vec<Cause>,
}

/// The JSON `metav1.Status` that protocol v4 sends on the error stream.
#[derive(Serialize)]
struct Status {
    metadata: Empty,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<Details>,
}

/// The v4 error-stream payload for an exit code.
pub fn v4_status_json(code: i32) -> String {
    let status = if code == 0 {
        Status {
            metadata: Empty {},
            status: "Success",
            message: None,
            reason: None,
            details: None,
        }
    } else {
        Status {
            metadata: Empty {},
            status: "Failure",
            message: Some(failure_message(code)),
            reason: Some("NonZeroExitCode"),
            details: Some(Details {
                causes: vec![Cause {
                    reason: "ExitCode",
                    message: code.to_string(),
                }],
            }),
        }
    };
    serde_json::to_string(&status).unwrap_or_default()
}

fn failure_message(code: i32) -> String {
    format!("command terminated with non-zero exit code: exit status {code}")
}

async fn finish_streams(
    io: &mut CmdIo,
    error_stream: Option<&StreamWriter>,
    protocol: Protocol,
    code: i32,
) -> Result<(), SessionError> {
    if let Some(w) = &io.stdout {
        w.close().await?;
    }
    if let Some(w) = &io.stderr {
        w.close().await?;
    }
    if let Some(w) = error_stream {
        let payload = match protocol {
            Protocol::V4 => v4_status_json(code),
            _ if code == 0 => String::new(),
            _ => failure_message(code),
        };
        w.write(payload.as_bytes()).await?;
        w.close().await?;
    }
    Ok(())
}

/// The command's standard streams.
struct CmdIo {
    stdin: Option<StreamReader>,
    stdout: Option<StreamWriter>,
    stderr: Option<StreamWriter>,
    tty: bool,
    stdin_bytes: u64,
    stdout_bytes: u64,
    stderr_bytes: u64,
}

impl CmdIo {
    async fn out(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if let Some(w) = &self.stdout {
            w.write(data).await?;
            self.stdout_bytes += data.len() as u64;
        }
        Ok(())
    }

    async fn err(&mut self, data: &[u8]) -> Result<(), SessionError> {
        if let Some(w) = &self.stderr {
            w.write(data).await?;
            self.stderr_bytes += data.len() as u64;
        } else if self.tty {
            self.out(data).await?;
        }
        Ok(())
    }

    /// Copies stdin to stdout until the client half-closes stdin.
    async fn cat(&mut self) -> Result<i32, SessionError> {
        let Some(mut stdin) = self.stdin.take() else {
            return Ok(0);
        };
        let result = loop {
            match stdin.read().await {
                Ok(Some(mut chunk)) => {
                    self.stdin_bytes += chunk.len() as u64;
                    // With a TTY, stand in for the line discipline: ^D ends input, ^C interrupts.
                    let control = if self.tty {
                        chunk.iter().position(|b| *b == 0x04 || *b == 0x03)
                    } else {
                        None
                    };
                    let code = control.map(|i| if chunk[i] == 0x04 { 0 } else { 130 });
                    if let Some(i) = control {
                        chunk.truncate(i);
                    }
                    if let Some(w) = &self.stdout {
                        self.stdout_bytes += chunk.len() as u64;
                        w.write_bytes(chunk).await?;
                    }
                    if let Some(code) = code {
                        break Ok(code);
                    }
                }
                Ok(None) => break Ok(0),
                // A reset stdin is an EOF for our purposes; a dead connection is not.
                Err(SessionError::Reset(_)) => break Ok(0),
                Err(e) => break Err(e),
            }
        };
        self.stdin = Some(stdin);
        result
    }
}

type CmdFuture<'a> = Pin<Box<dyn Future<Output = Result<i32, SessionError>> + Send + 'a>>;

/// Runs argv; `Err` only when the connection is gone.
fn run<'a>(argv: &'a [String], io: &'a mut CmdIo, depth: usize) -> CmdFuture<'a> {
    Box::pin(async move {
        let Some(first) = argv.first() else {
            io.err(b"standin-kubelet: no command given\n").await?;
            return Ok(127);
        };
        let name = first.rsplit('/').next().unwrap_or(first);
        let args = &argv[1..];
        match name {
            "cat" => {
                if args.is_empty() || args == ["-"] {
                    io.cat().await
                } else {
                    for a in args.iter().filter(|a| *a != "-") {
                        io.err(format!("cat: {a}: No such file or directory\n").as_bytes())
                            .await?;
                    }
                    Ok(1)
                }
            }
            "echo" => {
                let (newline, words) = match args.first() {
                    Some(f) if f == "-n" => (false, &args[1..]),
                    _ => (true, args),
                };
                let mut line = words.join(" ");
                if newline {
                    line.push('\n');
                }
                io.out(line.as_bytes()).await?;
                Ok(0)
            }
            "true" => Ok(0),
            "false" => Ok(1),
            "exit" => Ok(args
                .first()
                .and_then(|a| a.parse::<i32>().ok())
                .unwrap_or(0)
                & 0xff),
            "sleep" => {
                let arg = args.first().map(String::as_str).unwrap_or("");
                match arg.trim_end_matches('s').parse::<f64>() {
                    Ok(secs) if secs.is_finite() && secs >= 0.0 => {
                        tokio::time::sleep(Duration::from_secs_f64(secs.min(1.0e6))).await;
                        Ok(0)
                    }
                    _ => {
                        io.err(format!("sleep: invalid time interval '{arg}'\n").as_bytes())
                            .await?;
                        Ok(1)
                    }
                }
            }
            "seq" => {
                let nums: Vec<i64> = args.iter().filter_map(|a| a.parse().ok()).collect();
                let (from, to) = match nums.as_slice() {
                    [last] => (1, *last),
                    [first, last] => (*first, *last),
                    _ => {
                        io.err(b"seq: usage: seq [FIRST] LAST\n").await?;
                        return Ok(1);
                    }
                };
                let mut chunk = String::new();
                for n in from..=to {
                    chunk.push_str(&n.to_string());
                    chunk.push('\n');
                    if chunk.len() >= 32 * 1024 {
                        io.out(chunk.as_bytes()).await?;
                        chunk.clear();
                    }
                }
                io.out(chunk.as_bytes()).await?;
                Ok(0)
            }
            "sh" | "bash" | "ash" | "dash" => match args {
                [flag, script, ..] if flag == "-c" => {
                    if depth > 8 {
                        io.err(b"sh: nesting too deep\n").await?;
                        return Ok(2);
                    }
                    run_script(script, io, depth + 1).await
                }
                _ => {
                    io.err(b"standin-kubelet: only `sh -c SCRIPT` is supported\n")
                        .await?;
                    Ok(2)
                }
            },
            _ => {
                io.err(format!("standin-kubelet: {first}: command not found\n").as_bytes())
                    .await?;
                Ok(127)
            }
        }
    })
}

/// A token of the tiny shell language.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    Word(String),
    Seq,
    And,
    Or,
}

fn tokenize(script: &str) -> Result<Vec<Tok>, &'static str> {
    let mut toks = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = script.chars().peekable();
    let flush = |toks: &mut Vec<Tok>, word: &mut String, in_word: &mut bool| {
        if *in_word {
            toks.push(Tok::Word(std::mem::take(word)));
            *in_word = false;
        }
    };
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => flush(&mut toks, &mut word, &mut in_word),
            ';' | '\n' => {
                flush(&mut toks, &mut word, &mut in_word);
                toks.push(Tok::Seq);
            }
            '&' if chars.peek() == Some(&'&') => {
                chars.next();
                flush(&mut toks, &mut word, &mut in_word);
                toks.push(Tok::And);
            }
            '|' if chars.peek() == Some(&'|') => {
                chars.next();
                flush(&mut toks, &mut word, &mut in_word);
                toks.push(Tok::Or);
            }
            '|' | '&' | '<' | '>' | '`' | '(' | ')' => {
                return Err("pipes, redirections and subshells are not supported")
            }
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated single quote"),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch @ ('"' | '\\' | '$' | '`')) => word.push(ch),
                            Some(ch) => {
                                word.push('\\');
                                word.push(ch);
                            }
                            None => return Err("unterminated double quote"),
                        },
                        Some(ch) => word.push(ch),
                        None => return Err("unterminated double quote"),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some('\n') | None => {}
                    Some(ch) => word.push(ch),
                }
            }
            ch => {
                in_word = true;
                word.push(ch);
            }
        }
    }
    flush(&mut toks, &mut word, &mut in_word);
    Ok(toks)
}

async fn run_script(script: &str, io: &mut CmdIo, depth: usize) -> Result<i32, SessionError> {
    let toks = match tokenize(script) {
        Ok(t) => t,
        Err(msg) => {
            io.err(format!("sh: {msg}\n").as_bytes()).await?;
            return Ok(2);
        }
    };
    let mut status = 0;
    let mut op = Tok::Seq;
    let mut words: Vec<String> = Vec::new();
    for t in toks.into_iter().chain(std::iter::once(Tok::Seq)) {
        match t {
            Tok::Word(w) => words.push(w),
            sep => {
                if !words.is_empty() {
                    let should_run = match op {
                        Tok::And => status == 0,
                        Tok::Or => status != 0,
                        _ => true,
                    };
                    if should_run {
                        if words[0] == "exit" {
                            let code = words
                                .get(1)
                                .and_then(|a| a.parse::<i32>().ok())
                                .map(|c| c & 0xff)
                                .unwrap_or(status);
                            return Ok(code);
                        }
                        status = run(&words, io, depth).await?;
                    }
                    words.clear();
                }
                op = sep;
            }
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_handles_quotes_and_operators() {
        let t = tokenize(r#"echo 'a b' "c \"d\"" e\ f; exit 3 && true || false"#).expect("ok");
        assert_eq!(
            t,
            vec![
                Tok::Word("echo".into()),
                Tok::Word("a b".into()),
                Tok::Word("c \"d\"".into()),
                Tok::Word("e f".into()),
                Tok::Seq,
                Tok::Word("exit".into()),
                Tok::Word("3".into()),
                Tok::And,
                Tok::Word("true".into()),
                Tok::Or,
                Tok::Word("false".into()),
            ]
        );
        assert!(tokenize("echo 'x").is_err());
        assert!(tokenize("a | b").is_err());
    }

    #[test]
    fn status_json_matches_kubelet_shape() {
        assert_eq!(v4_status_json(0), r#"{"metadata":{},"status":"Success"}"#);
        let v: serde_json::Value = serde_json::from_str(&v4_status_json(3)).expect("json");
        assert_eq!(v["status"], "Failure");
        assert_eq!(v["reason"], "NonZeroExitCode");
        assert_eq!(v["details"]["causes"][0]["reason"], "ExitCode");
        assert_eq!(v["details"]["causes"][0]["message"], "3");
    }

    #[test]
    fn options_follow_kubelet_rules() {
        let q = Query::parse(Some("input=1&output=1&error=1&tty=1"));
        let o = StreamOptions::from_query(&q).expect("ok");
        assert!(o.stdin && o.stdout && o.tty && !o.stderr);
        assert!(StreamOptions::from_query(&Query::parse(Some("tty=1"))).is_err());
    }
}
