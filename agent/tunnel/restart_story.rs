//! The restart defaults, the unit's start limit and the docs tell one story: a cloudflared that
//! fails at every start (the real one without a reachable edge exits 1 after ~0.6 s) fails
//! `/ready` within seconds, the agent gives up after `give_up_after_exits`, systemd restarts it,
//! and after `StartLimitBurst` runs within `StartLimitIntervalSec` the unit ends `failed`, as
//! its comment says. This checks the arithmetic against the shipped unit file.

use std::time::Duration;

use crate::config::CloudflaredSection;

const UNIT: &str = include_str!("../../systemd/tunnel-agent.service");

/// A systemd time span as the unit spells it here: `10min`, `2s`, `500ms`.
fn unit_duration(key: &str) -> Duration {
    let value = UNIT
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{key}= not in the unit"))
        .trim();
    let split = value.find(|c: char| !c.is_ascii_digit()).unwrap_or(value.len());
    let (n, unit) = value.split_at(split);
    let n: u64 = n.parse().unwrap_or_else(|_| panic!("{key}={value}"));
    match unit {
        "min" => Duration::from_secs(n * 60),
        "s" | "" => Duration::from_secs(n),
        "ms" => Duration::from_millis(n),
        other => panic!("{key}={value}: unit {other:?} not handled"),
    }
}

fn unit_number(key: &str) -> u64 {
    unit_duration(key).as_secs()
}

/// The longest one agent run can last with `cf` when cloudflared fails `crash` after each
/// start: every backoff delay at its ceiling, plus `boot` for the agent's own start.
fn worst_agent_run(cf: &CloudflaredSection, crash: Duration, boot: Duration) -> Duration {
    let mut total = boot + crash * cf.give_up_after_exits;
    for n in 0..cf.give_up_after_exits.saturating_sub(1) {
        let ceiling = cf
            .restart_backoff
            .saturating_mul(1u32.checked_shl(n).unwrap_or(u32::MAX))
            .min(cf.restart_backoff_max);
        total += ceiling;
    }
    total
}

#[test]
fn a_crash_looping_cloudflared_ends_the_unit_failed_within_the_start_limit() {
    let cf = CloudflaredSection::default();
    let interval = unit_duration("StartLimitIntervalSec");
    let burst = unit_number("StartLimitBurst") as u32;
    let restart_sec = unit_duration("RestartSec");
    assert!(UNIT.contains("\nRestart=on-failure\n"));
    assert!(
        cf.give_up_after_exits > 0,
        "the agent must give up for the unit to fail"
    );
    // /ready fails (autohealing's signal) well before the agent gives up.
    assert!(cf.crash_loop_exits < cf.give_up_after_exits);
    // The real cloudflared without an edge: exit 1 after ~0.6 s; allow 2 s on a slow host, and
    // 10 s for the agent's boot (secrets, routes, listeners).
    let run = worst_agent_run(&cf, Duration::from_secs(2), Duration::from_secs(10));
    // systemd refuses the (burst+1)-th start within the interval: `burst` runs and the restart
    // delays between them must fit.
    let to_failed = run * burst + restart_sec * burst;
    assert!(
        to_failed < interval,
        "{burst} agent runs of up to {run:?} (+{restart_sec:?} each) = {to_failed:?}, over StartLimitIntervalSec={interval:?}: the unit would never end failed"
    );
    println!("worst case: failed {to_failed:?} after the crash loop began (limit {interval:?})");
}
