//! A rate limit for the cloudflared lines the agent re-emits into its own log.
//!
//! cloudflared retrying an unreachable edge in a tight loop wrote 185k journal lines in 45 s;
//! journald's per-unit limit (10000 messages per 30 s by default) then dropped everything the
//! unit logged, the agent's own lines included. So cloudflared's lines pass through two filters
//! before they reach the journal, counted per window of [`WINDOW`]:
//! - a line whose message (its text after the timestamp) was already emitted in this window is
//!   not emitted again but counted; at the window's end one summary per such message says how
//!   often it repeated;
//! - the lines that remain spend a token from a bucket of [`BURST`] refilled at [`PER_SEC`] per
//!   second; without a token a line is dropped and counted, and the window's end says how many.
//!
//! At most `BURST + PER_SEC * 30` = 1700 cloudflared lines plus a few summaries reach journald
//! in any 30 s, well under its 10000, so the agent's own lines are never suppressed.

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

/// Lines a quiet cloudflared may write at once (its start-up is about 20).
pub const BURST: u32 = 200;
/// Lines per second after the burst.
pub const PER_SEC: u32 = 50;
/// How long repeats and drops are counted before a summary is written.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Distinct messages remembered per window for the repeat count; beyond that only the bucket
/// applies.
const MAX_TRACKED: usize = 256;

/// What to write for a line, or at the end of a window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Emit {
    /// The line itself.
    Line,
    /// `message` was seen `count` more times in the window than it was written.
    Repeated { message: String, count: u64 },
    /// `count` lines were dropped by the rate limit in the window.
    Dropped { count: u64 },
}

#[derive(Debug)]
pub struct LogLimiter {
    tokens: f64,
    refilled: Instant,
    window_start: Option<Instant>,
    /// Messages written in this window, with how often each repeated since.
    seen: HashMap<String, u64>,
    dropped: u64,
}

impl LogLimiter {
    pub fn new(now: Instant) -> LogLimiter {
        LogLimiter {
            tokens: f64::from(BURST),
            refilled: now,
            window_start: None,
            seen: HashMap::new(),
            dropped: 0,
        }
    }

    /// Decides about one line whose message is `message`. Any summary of the window that
    /// ended before `now` comes first.
    pub fn offer(&mut self, message: &str, now: Instant) -> Vec<Emit> {
        let mut out = self.flush(now);
        self.window_start.get_or_insert(now);
        if let Some(count) = self.seen.get_mut(message) {
            *count += 1;
            return out;
        }
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * f64::from(PER_SEC)).min(f64::from(BURST));
        self.refilled = now;
        if self.tokens < 1.0 {
            self.dropped += 1;
            return out;
        }
        self.tokens -= 1.0;
        if self.seen.len() < MAX_TRACKED {
            self.seen.insert(message.to_owned(), 0);
        }
        out.push(Emit::Line);
        out
    }

    /// The summaries of the current window once it is over (nothing before).
    pub fn flush(&mut self, now: Instant) -> Vec<Emit> {
        match self.window_start {
            Some(start) if now.saturating_duration_since(start) >= WINDOW => {}
            _ => return Vec::new(),
        }
        self.window_start = None;
        let mut out: Vec<Emit> = self
            .seen
            .drain()
            .filter(|(_, count)| *count > 0)
            .map(|(message, count)| Emit::Repeated { message, count })
            .collect();
        out.sort_by(|a, b| match (a, b) {
            (Emit::Repeated { message: x, .. }, Emit::Repeated { message: y, .. }) => x.cmp(y),
            _ => std::cmp::Ordering::Equal,
        });
        if self.dropped > 0 {
            out.push(Emit::Dropped {
                count: std::mem::take(&mut self.dropped),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(out: &[Emit]) -> usize {
        out.iter().filter(|e| **e == Emit::Line).count()
    }

    #[test]
    fn a_repeated_message_is_written_once_then_summarised() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(t0);
        let mut written = 0;
        for i in 0..1000 {
            written += lines(&l.offer("Retrying connection", t0 + Duration::from_millis(i)));
        }
        assert_eq!(written, 1);
        let out = l.flush(t0 + WINDOW);
        assert_eq!(
            out,
            [Emit::Repeated {
                message: "Retrying connection".into(),
                count: 999
            }]
        );
        // A new window writes the message again.
        assert_eq!(lines(&l.offer("Retrying connection", t0 + WINDOW * 2)), 1);
    }

    #[test]
    fn a_flood_of_distinct_lines_is_capped_and_the_drops_counted() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(t0);
        let mut written = 0;
        let mut summaries = Vec::new();
        // 100k distinct lines over 20 s: 5000 per second.
        for i in 0..100_000u64 {
            let now = t0 + Duration::from_micros(i * 200);
            for e in l.offer(&format!("line {i}"), now) {
                match e {
                    Emit::Line => written += 1,
                    other => summaries.push(other),
                }
            }
        }
        summaries.extend(l.flush(t0 + Duration::from_secs(40)));
        let cap = u64::from(BURST) + 20 * u64::from(PER_SEC) + 1;
        assert!(written <= cap, "{written} lines written, cap {cap}");
        assert!(written >= cap - 10, "{written} lines written: the bucket refills");
        let dropped: u64 = summaries
            .iter()
            .map(|e| match e {
                Emit::Dropped { count } => *count,
                _ => 0,
            })
            .sum();
        assert_eq!(dropped + written, 100_000, "every line is written or counted");
        // One summary per window, not one per line.
        assert!(summaries.len() <= 3, "{summaries:?}");
    }

    #[test]
    fn a_quiet_cloudflared_is_not_limited() {
        let t0 = Instant::now();
        let mut l = LogLimiter::new(t0);
        for i in 0..2000u64 {
            let out = l.offer(&format!("line {i}"), t0 + Duration::from_millis(i * 50));
            assert!(out.contains(&Emit::Line), "line {i} dropped: {out:?}");
            assert!(!out.iter().any(|e| matches!(e, Emit::Dropped { .. })), "{out:?}");
        }
    }
}
