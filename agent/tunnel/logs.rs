//! cloudflared's output in the agent's log: each line read with a ceiling, its level parsed
//! (text `INF`/`WRN`/`ERR` or JSON `level`), and re-emitted through the rate limit of
//! [`super::log_limit`].

use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// Longest cloudflared log line kept; the rest of a longer line is dropped.
const MAX_LINE: usize = 16 * 1024;

/// Reads one line (without the newline) of at most `MAX_LINE` bytes; the excess is consumed
/// and dropped. Returns false at EOF.
async fn read_line_capped<R: AsyncRead + Unpin>(r: &mut BufReader<R>, out: &mut Vec<u8>) -> std::io::Result<bool> {
    out.clear();
    let mut any = false;
    loop {
        let buf = r.fill_buf().await?;
        if buf.is_empty() {
            return Ok(any);
        }
        any = true;
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..i], Some(i + 1)),
            None => (buf, None),
        };
        let room = MAX_LINE.saturating_sub(out.len());
        out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        let consumed = done.unwrap_or(buf.len());
        r.consume(consumed);
        if done.is_some() {
            return Ok(true);
        }
    }
}

/// Sends each line `reader` yields to `lines` until EOF, or until `stop` turns true (a hand-
/// over: the pipe stays open for the next image's reader). Stopped, it first sends what it had
/// read past the last full line, so no line is lost; only a line cut at that point arrives as
/// two. A `stop` whose sender is gone never stops it.
pub(super) async fn read_lines<R: AsyncRead + Unpin>(
    reader: R,
    lines: mpsc::Sender<Vec<u8>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut r = BufReader::new(reader);
    let mut line = Vec::with_capacity(256);
    let stopped = async {
        if stop.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            biased;
            _ = &mut stopped => break,
            more = read_line_capped(&mut r, &mut line) => match more {
                Ok(true) => {
                    if lines.send(std::mem::take(&mut line)).await.is_err() {
                        return;
                    }
                }
                _ => return,
            },
        }
    }
    // `read_line_capped` is cancelled between reads: `line` holds what it took of the current
    // line, the reader's buffer what it read beyond.
    line.extend_from_slice(r.buffer());
    for piece in line.split(|&b| b == b'\n').filter(|p| !p.is_empty()) {
        if lines.send(piece.to_vec()).await.is_err() {
            return;
        }
    }
}

/// Re-emits cloudflared's lines (stdout and stderr) into the agent's log at their own level,
/// through the rate limit of `log_limit`, until both streams end.
pub(super) async fn emit_logs(mut lines: mpsc::Receiver<Vec<u8>>, pid: u32) {
    use crate::tunnel::log_limit::{Emit, LogLimiter};
    let mut limiter = LogLimiter::new(Instant::now());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mut closed = false;
        let (emits, line) = tokio::select! {
            line = lines.recv() => match line {
                Some(line) => {
                    let text = String::from_utf8_lossy(&line).into_owned();
                    let (level, message) = parse_log_line(text.trim_end_matches('\r'));
                    (limiter.offer(&message, Instant::now()), Some((level, message)))
                }
                // Both streams closed: whatever the last window counted is said now.
                None => {
                    closed = true;
                    (limiter.flush(crate::deadline::from_now(crate::tunnel::log_limit::WINDOW)), None)
                }
            },
            _ = tick.tick() => (limiter.flush(Instant::now()), None),
        };
        for e in emits {
            match e {
                Emit::Line => {
                    if let Some((level, message)) = &line {
                        match level {
                            LogLevel::Debug => tracing::debug!(target: "cloudflared", pid, "{message}"),
                            LogLevel::Info => tracing::info!(target: "cloudflared", pid, "{message}"),
                            LogLevel::Warn => tracing::warn!(target: "cloudflared", pid, "{message}"),
                            LogLevel::Error => tracing::error!(target: "cloudflared", pid, "{message}"),
                        }
                    }
                }
                Emit::Repeated { message, count } => tracing::info!(
                    pid,
                    repeated = count,
                    window_s = crate::tunnel::log_limit::WINDOW.as_secs(),
                    "cloudflared repeated a line {count} more times in {}s: {message}",
                    crate::tunnel::log_limit::WINDOW.as_secs()
                ),
                Emit::Dropped { count } => tracing::warn!(
                    pid,
                    dropped = count,
                    window_s = crate::tunnel::log_limit::WINDOW.as_secs(),
                    "cloudflared logged faster than {} lines/s; {count} of its lines in the last {}s were dropped",
                    crate::tunnel::log_limit::PER_SEC,
                    crate::tunnel::log_limit::WINDOW.as_secs()
                ),
            }
        }
        if closed {
            return;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Debug,
    Info,
    Warn,
    Error,
}

fn level_from(word: &str) -> Option<LogLevel> {
    Some(match word.to_ascii_lowercase().as_str() {
        "dbg" | "debug" | "trace" | "trc" => LogLevel::Debug,
        "inf" | "info" => LogLevel::Info,
        "wrn" | "warn" | "warning" => LogLevel::Warn,
        "err" | "error" | "ftl" | "fatal" | "panic" | "pnc" => LogLevel::Error,
        _ => return None,
    })
}

/// Splits a cloudflared log line into its level and the rest. Text format (zerolog console):
/// `2024-05-01T12:00:00Z INF Registered tunnel connection connIndex=0 …`. JSON format
/// (`--logformat json`): `{"level":"info","time":"…","message":"…",…}`. Anything else is info.
pub fn parse_log_line(line: &str) -> (LogLevel, String) {
    if line.starts_with('{') {
        if let Ok(serde_json::Value::Object(mut obj)) = serde_json::from_str::<serde_json::Value>(line) {
            let level = obj
                .remove("level")
                .and_then(|l| l.as_str().and_then(level_from))
                .unwrap_or(LogLevel::Info);
            obj.remove("time");
            let message = obj
                .remove("message")
                .or_else(|| obj.remove("msg"))
                .and_then(|m| m.as_str().map(str::to_owned))
                .unwrap_or_default();
            let rest: Vec<String> = obj.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let message = if rest.is_empty() {
                message
            } else {
                format!("{message} {}", rest.join(" "))
            };
            return (level, message);
        }
    }
    let mut words = line.splitn(3, ' ');
    if let (Some(_time), Some(level), rest) = (words.next(), words.next(), words.next()) {
        if let Some(level) = level_from(level) {
            return (level, rest.unwrap_or("").to_owned());
        }
    }
    (LogLevel::Info, line.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_text_and_json_lines() {
        assert_eq!(
            parse_log_line("2024-05-01T12:00:00Z INF Registered tunnel connection connIndex=0"),
            (LogLevel::Info, "Registered tunnel connection connIndex=0".to_owned())
        );
        assert_eq!(
            parse_log_line("2024-05-01T12:00:00Z ERR failed to serve").0,
            LogLevel::Error
        );
        assert_eq!(parse_log_line("2024-05-01T12:00:00Z WRN retrying").0, LogLevel::Warn);
        let (l, m) = parse_log_line(r#"{"level":"warn","time":"x","message":"lost","connIndex":1}"#);
        assert_eq!(l, LogLevel::Warn);
        assert_eq!(m, "lost connIndex=1");
        assert_eq!(parse_log_line("plain text"), (LogLevel::Info, "plain text".to_owned()));
    }
}
