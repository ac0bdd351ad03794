//! What the election tests share: a sampler of `/active` on every node every 10 ms (never two
//! 200s at once is the election's promise), and the median/max of measured durations.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use tokio::time::Instant;

use super::eventually;

/// `/active` answered 200 (a dead or hung node counts as not active).
pub async fn is_active(http: &reqwest::Client, addr: SocketAddr) -> bool {
    match http.get(format!("http://{addr}/active")).send().await {
        Ok(r) => r.status() == StatusCode::OK,
        Err(_) => false,
    }
}

/// Each change of which nodes answer `/active` 200, with when it was sampled.
pub type Timeline = Arc<Mutex<Vec<(Instant, Vec<bool>)>>>;

/// Samples `/active` on every node every 10 ms; counts rounds where more than one answered 200.
pub struct Sampler {
    /// Node i's health address (a restarted agent listens on a new port).
    addrs: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    samples: Arc<AtomicU64>,
    overlaps: Arc<Mutex<Vec<String>>>,
    /// (when, which nodes were active) at each change.
    pub timeline: Timeline,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    pub fn start(addrs: Vec<SocketAddr>) -> Sampler {
        let addrs = Arc::new(Mutex::new(addrs));
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(AtomicU64::new(0));
        let overlaps: Arc<Mutex<Vec<String>>> = Arc::default();
        let timeline: Timeline = Arc::default();
        let task = {
            let (stop, samples, overlaps, timeline) =
                (stop.clone(), samples.clone(), overlaps.clone(), timeline.clone());
            let addrs = addrs.clone();
            tokio::spawn(async move {
                let http = reqwest::Client::builder()
                    .no_proxy()
                    .timeout(Duration::from_millis(500))
                    .build()
                    .expect("client");
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                let mut last: Vec<bool> = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let at = Instant::now();
                    let mut now = Vec::new();
                    let current = addrs.lock().unwrap().clone();
                    for a in &current {
                        now.push(is_active(&http, *a).await);
                    }
                    samples.fetch_add(1, Ordering::SeqCst);
                    if now.iter().filter(|a| **a).count() > 1 {
                        overlaps.lock().unwrap().push(format!("{now:?}"));
                    }
                    if now != last {
                        timeline.lock().unwrap().push((at, now.clone()));
                        last = now;
                    }
                }
            })
        };
        Sampler {
            addrs,
            stop,
            samples,
            overlaps,
            timeline,
            task,
        }
    }

    pub fn set_addr(&self, i: usize, addr: SocketAddr) {
        self.addrs.lock().unwrap()[i] = addr;
    }

    /// Waits until exactly node `i` is active in the samples; returns when it was first seen.
    pub async fn wait_only(&self, i: usize, since: Instant, within: Duration) -> Instant {
        eventually(within, &format!("node {i} alone active"), || async {
            self.timeline
                .lock()
                .unwrap()
                .iter()
                .find(|(t, v)| *t >= since && v.iter().enumerate().all(|(j, a)| *a == (j == i)))
                .map(|(t, _)| *t)
        })
        .await
    }

    /// When node `i` was last seen turning inactive at or after `since`.
    pub fn went_inactive(&self, i: usize, since: Instant) -> Option<Instant> {
        let tl = self.timeline.lock().unwrap();
        let mut prev = true;
        for (t, v) in tl.iter() {
            let a = v.get(i).copied().unwrap_or(false);
            if *t >= since && prev && !a {
                return Some(*t);
            }
            prev = a;
        }
        None
    }

    pub async fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = self.task.await;
        let overlaps = self.overlaps.lock().unwrap().clone();
        (self.samples.load(Ordering::SeqCst), overlaps)
    }
}

pub fn stats(label: &str, mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let median = v[v.len() / 2];
    let max = *v.last().unwrap_or(&Duration::ZERO);
    println!(
        "{label}: n={} median {:.0} ms, max {:.0} ms",
        v.len(),
        median.as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
    (median, max)
}
