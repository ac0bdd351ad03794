//! `[role_follow]`: the role follows a local health check, e.g. Patroni's `GET /primary` (200
//! on the primary, 503 elsewhere), pg_auto_failover's or an application's own: the check passes
//! while `url` answers 2xx. `rise` consecutive passes switch it to passing, `fall` consecutive
//! failures (any other status, no answer within `timeout`) to failing, so one slow answer does
//! not flap the tunnel. Alone it decides the role; with `[role_election]` it gates the election
//! (campaign only while passing, resign when failing).

use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::sync::mpsc;

use crate::config::roles::RoleFollowSection;

/// The check's counting, pure so it can be tested without a clock or a server.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verdict {
    /// `None` until `rise` or `fall` answers in a row were seen: treated as failing.
    pub passing: Option<bool>,
    /// Answers in a row that disagree with `passing` (or, before a verdict, agree with each other).
    streak: u32,
    streak_of: bool,
}

impl Verdict {
    /// Counts one answer; returns the new verdict when it changed.
    pub fn next(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if self.passing == Some(ok) {
            self.streak = 0;
            return None;
        }
        if self.streak_of == ok {
            self.streak += 1;
        } else {
            self.streak_of = ok;
            self.streak = 1;
        }
        let needed = if ok { rise } else { fall };
        if self.streak >= needed {
            self.passing = Some(ok);
            self.streak = 0;
            return Some(ok);
        }
        None
    }
}

/// What `/status` shows.
#[derive(Debug, Clone, Default)]
pub struct FollowState {
    pub url: String,
    pub verdict: Verdict,
    /// The last answer: an HTTP status, or why there was none.
    pub last: String,
    pub checks: u64,
}

#[derive(Clone, Debug)]
pub struct Follow {
    state: Arc<Mutex<FollowState>>,
}

impl Follow {
    pub fn passing(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).verdict.passing == Some(true)
    }

    pub fn status_json(&self) -> serde_json::Value {
        let s = self.state.lock().unwrap_or_else(|e| e.into_inner()).clone();
        json!({
            "url": s.url,
            "passing": s.verdict.passing,
            "last": s.last,
            "checks": s.checks,
        })
    }

    pub fn render_metrics(&self, out: &mut String) {
        let help = "1 while the [role_follow] check passes.";
        let passing = u8::from(self.passing());
        use crate::prom_text::{single, Kind};
        single(out, "tunnel_agent_follow_passing", Kind::Gauge, help, passing);
    }
}

/// Starts polling; sends the verdict on every change (the first one included).
pub fn start(
    section: &RoleFollowSection,
    changes: mpsc::Sender<bool>,
) -> anyhow::Result<(Follow, tokio::task::JoinHandle<()>)> {
    let http = reqwest::Client::builder()
        .no_proxy()
        .timeout(section.timeout)
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    // What /status and the log show: the URL without the credentials it may carry.
    let shown = crate::secret::redact_url(&section.url);
    let state = Arc::new(Mutex::new(FollowState {
        url: shown.clone(),
        ..FollowState::default()
    }));
    let follow = Follow { state: state.clone() };
    let s = section.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let (ok, last) = match http.get(&s.url).send().await {
                Ok(r) => (r.status().is_success(), format!("HTTP {}", r.status().as_u16())),
                Err(e) => (false, crate::secret::redact_urls_in(&crate::gcp::error_chain(&e))),
            };
            let changed = {
                let mut st = state.lock().unwrap_or_else(|e| e.into_inner());
                st.checks += 1;
                st.last = last.clone();
                st.verdict.next(ok, s.rise, s.fall)
            };
            if let Some(passing) = changed {
                tracing::info!(url = %shown, passing, last = %last, "role_follow check changed: {shown} now {} (last: {last})", if passing { "passing" } else { "failing" });
                if changes.send(passing).await.is_err() {
                    return;
                }
            }
        }
    });
    Ok((follow, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn switches_only_after_consecutive_answers() {
        let mut v = Verdict::default();
        // rise 2, fall 3.
        assert_eq!(v.next(true, 2, 3), None);
        assert_eq!(v.next(true, 2, 3), Some(true));
        assert_eq!(v.next(false, 2, 3), None);
        assert_eq!(v.next(false, 2, 3), None);
        // A pass in between resets the failure streak.
        assert_eq!(v.next(true, 2, 3), None);
        assert_eq!(v.next(false, 2, 3), None);
        assert_eq!(v.next(false, 2, 3), None);
        assert_eq!(v.next(false, 2, 3), Some(false));
        assert_eq!(v.passing, Some(false));
        assert_eq!(v.next(false, 2, 3), None);
        assert_eq!(v.next(true, 2, 3), None);
        assert_eq!(v.next(true, 2, 3), Some(true));
    }

    #[test]
    fn failures_at_start_give_a_failing_verdict() {
        let mut v = Verdict::default();
        assert_eq!(v.next(false, 1, 2), None);
        assert_eq!(v.passing, None);
        assert_eq!(v.next(false, 1, 2), Some(false));
    }
}
