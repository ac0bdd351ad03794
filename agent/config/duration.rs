//! Durations from input (the TOML file, a pushed table), bounded where they are read.
//!
//! `Instant + Duration` panics on overflow, and the release build aborts on a panic: a duration
//! of `"300000000000y"` that reached a deadline would crash the agent at the first request that
//! used it, and a persisted push would bring the crash back at every start. So every duration
//! field is deserialized through [`at_most`] with the longest value that makes sense for it
//! (docs/config.md lists them), and anything longer is refused with the key and the bound, by
//! the parser that already names the file, line and column (TOML) or the key path (JSON).

use std::time::Duration;

use serde::Deserializer;

/// One minute, in seconds: the unit of the bounds below.
pub const MINUTE: u64 = 60;
/// The bound of waits and intervals of the agent's own machinery (a probe, a connect, a grace).
pub const HOUR: u64 = 60 * MINUTE;
/// The bound of anything a request, a connection or a refresh may last.
pub const DAY: u64 = 24 * HOUR;

/// A duration field read as humantime (`"10s"`, `"1m30s"`, `"500ms"`), at most `MAX_SECS`.
///
/// `T` is `Duration` or `Option<Duration>` (with `#[serde(default)]`), so one helper serves
/// every field: `#[serde(deserialize_with = "duration::at_most::<_, _, { duration::DAY }>")]`.
pub fn at_most<'de, T, D, const MAX_SECS: u64>(d: D) -> Result<T, D::Error>
where
    T: Bounded,
    D: Deserializer<'de>,
    humantime_serde::Serde<T>: serde::Deserialize<'de>,
{
    let value: T = humantime_serde::deserialize(d)?;
    match value.longest() {
        Some(v) if v > Duration::from_secs(MAX_SECS) => Err(serde::de::Error::custom(too_long(v, MAX_SECS))),
        _ => Ok(value),
    }
}

/// The reason a duration over its bound is refused: the value and the bound, both as humantime.
pub fn too_long(value: Duration, max_secs: u64) -> String {
    format!(
        "{} is longer than the bound of {}",
        humantime::format_duration(value),
        humantime::format_duration(Duration::from_secs(max_secs))
    )
}

/// A duration field's value, present or not.
pub trait Bounded {
    fn longest(&self) -> Option<Duration>;
}

impl Bounded for Duration {
    fn longest(&self) -> Option<Duration> {
        Some(*self)
    }
}

impl Bounded for Option<Duration> {
    fn longest(&self) -> Option<Duration> {
        *self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    struct Both {
        #[serde(deserialize_with = "at_most::<_, _, { HOUR }>")]
        short: Duration,
        #[serde(default, deserialize_with = "at_most::<_, _, { DAY }>")]
        long: Option<Duration>,
    }

    fn parse(json: &str) -> Result<Both, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn values_up_to_the_bound_are_kept() {
        let b = parse(r#"{"short": "1h", "long": "1day"}"#).expect("at the bounds");
        assert_eq!(b.short, Duration::from_secs(HOUR));
        assert_eq!(b.long, Some(Duration::from_secs(DAY)));
        let b = parse(r#"{"short": "0s"}"#).expect("long is optional");
        assert_eq!(b.long, None);
    }

    #[test]
    fn longer_values_are_refused_with_the_bound() {
        let e = parse(r#"{"short": "1h 1s"}"#).expect_err("over an hour").to_string();
        assert!(e.contains("1h 1s is longer than the bound of 1h"), "{e}");
        let e = parse(r#"{"short": "1s", "long": "300000000000y"}"#)
            .expect_err("absurd")
            .to_string();
        assert!(e.contains("longer than the bound of 1day"), "{e}");
    }

    /// A duration field added with plain `humantime_serde` would have no bound: every one goes
    /// through `at_most`.
    #[test]
    fn no_duration_field_of_the_schema_skips_the_bound() {
        let plain = ["with = \"humantime", "serde\""].concat();
        for (file, text) in [
            ("mod.rs", include_str!("mod.rs")),
            ("agent.rs", include_str!("agent.rs")),
            ("secrets.rs", include_str!("secrets.rs")),
            ("proxy.rs", include_str!("proxy.rs")),
            ("routes.rs", include_str!("routes.rs")),
            ("gcp.rs", include_str!("gcp.rs")),
            ("cloudflared.rs", include_str!("cloudflared.rs")),
            ("health.rs", include_str!("health.rs")),
            ("roles.rs", include_str!("roles.rs")),
            ("route_spec.rs", include_str!("route_spec.rs")),
        ] {
            assert!(!text.contains(&plain), "{file} reads a duration without a bound");
            // Every plain `Duration` field of these files is read from input (an `Option` one
            // may be a validated copy, so only the plain ones are counted).
            let fields = text.matches(": Duration,").count();
            let bounded = text.matches("duration::at_most::<").count();
            assert!(bounded >= fields, "{file}: {fields} duration fields, {bounded} bounded");
        }
    }

    #[test]
    fn what_humantime_cannot_read_is_still_its_error() {
        let e = parse(r#"{"short": "soon"}"#).expect_err("not a duration").to_string();
        assert!(!e.contains("bound"), "{e}");
    }
}
