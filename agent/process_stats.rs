//! The agent's own process metrics, read from `/proc/self` at scrape time.
//!
//! Named `tunnel_agent_process_*`, not the conventional `process_*`: `/metrics` also re-exports
//! cloudflared's metrics, and cloudflared (Go's Prometheus client) already exports
//! `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_open_fds`,
//! `process_start_time_seconds` for *its* process. Two series with one name would be one
//! ambiguous metric to Prometheus; prefixed, a dashboard can show both processes side by side.

use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::prom_text::{self, Kind};

/// When `main` began, for the start time where `/proc/stat` (boot time) is hidden: the unit's
/// `ProcSubset=pid` hides it.
static STARTED: OnceLock<SystemTime> = OnceLock::new();

/// Records the process start; `main` calls it first thing.
pub fn mark_start() {
    let _ = STARTED.set(SystemTime::now());
}

/// One reading of this process's resource use. Each field is `None` when `/proc` does not
/// answer (not Linux, or `/proc` not mounted), and its series is then left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProcessStats {
    /// User + system CPU time, seconds.
    pub cpu_seconds: Option<f64>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    /// Unix time the process started, seconds.
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads `/proc/self/stat`, `/proc/self/status`, `/proc/self/fd` and `/proc/stat`.
    pub fn read() -> ProcessStats {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .filter(|t| *t > 0)
            .map(|t| t as f64);
        let stat = std::fs::read_to_string("/proc/self/stat").ok();
        let fields = stat.as_deref().and_then(stat_fields);
        let field = |i: usize| {
            fields
                .as_ref()
                .and_then(|f| f.get(i))
                .and_then(|v| v.parse::<u64>().ok())
        };
        // proc(5): after `(comm)`, field 3 is index 0, so utime (14) is 11, stime (15) is 12
        // and starttime (22, clock ticks after boot) is 19.
        let cpu_seconds = match (field(11), field(12), ticks) {
            (Some(u), Some(s), Some(t)) => Some((u + s) as f64 / t),
            _ => None,
        };
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<u64>().ok())
        });
        let start_time_seconds = match (field(19), ticks, boot_time) {
            (Some(start), Some(t), Some(boot)) => Some(boot as f64 + start as f64 / t),
            _ => STARTED
                .get()
                .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
                .map(|d| d.as_secs_f64()),
        };
        let resident_bytes = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        });
        let open_fds = std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64)
            // read_dir itself holds one descriptor open on the directory while counting.
            .map(|n| n.saturating_sub(1));
        ProcessStats {
            cpu_seconds,
            resident_bytes,
            open_fds,
            start_time_seconds,
        }
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self, out: &mut String) {
        let series: [(&str, Kind, &str, Option<f64>); 4] = [
            (
                "tunnel_agent_process_cpu_seconds_total",
                Kind::Counter,
                "CPU time (user + system) of the agent process itself, not cloudflared's.",
                self.cpu_seconds,
            ),
            (
                "tunnel_agent_process_resident_memory_bytes",
                Kind::Gauge,
                "Resident memory of the agent process itself.",
                self.resident_bytes.map(|v| v as f64),
            ),
            (
                "tunnel_agent_process_open_fds",
                Kind::Gauge,
                "Open file descriptors of the agent process itself.",
                self.open_fds.map(|v| v as f64),
            ),
            (
                "tunnel_agent_process_start_time_seconds",
                Kind::Gauge,
                "Start time of the agent process, seconds since the Unix epoch.",
                self.start_time_seconds,
            ),
        ];
        for (name, kind, help, value) in series {
            if let Some(v) = value {
                prom_text::single(out, name, kind, help, v);
            }
        }
    }
}

/// The fields of `/proc/PID/stat` after `(comm)`. `comm` may hold spaces and parentheses, so
/// the split is at the *last* `)`.
fn stat_fields(stat: &str) -> Option<Vec<&str>> {
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_ascii_whitespace().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comm_with_spaces_and_parentheses_does_not_shift_fields() {
        let stat = "42 (tun (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 4 0 1234 0 0";
        let f = stat_fields(stat).unwrap();
        assert_eq!(f[0], "S");
        assert_eq!((f[11], f[12], f[19]), ("7", "3", "1234"));
    }

    #[test]
    fn reads_this_process_and_renders_every_series() {
        let s = ProcessStats::read();
        let rss = s.resident_bytes.expect("VmRSS in /proc/self/status");
        assert!(rss > 1024 * 1024, "a test binary uses more than 1 MiB: {rss}");
        assert!(
            s.open_fds.expect("/proc/self/fd") >= 3,
            "stdin, stdout, stderr at least"
        );
        let start = s.start_time_seconds.expect("start time");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
        assert!(
            start <= now + 1.0 && start > now - 86_400.0,
            "started {start}, now {now}"
        );
        assert!(s.cpu_seconds.is_some());
        let mut out = String::new();
        s.render(&mut out);
        for name in [
            "tunnel_agent_process_cpu_seconds_total ",
            "tunnel_agent_process_resident_memory_bytes ",
            "tunnel_agent_process_open_fds ",
            "tunnel_agent_process_start_time_seconds ",
        ] {
            assert!(out.contains(&format!("\n{name}")), "{name} missing in:\n{out}");
        }
        assert!(!out.contains("\nprocess_"), "never cloudflared's names:\n{out}");
    }
}
