//! What this binary is: version, commit and build date (set by `build.rs`), for `--version`,
//! the first log line, `/status` and the `tunnel_agent_build_info` metric.

/// The crate version (`Cargo.toml`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The abbreviated git commit the binary was built from, or `unknown` outside a checkout.
pub const COMMIT: &str = env!("TUNNEL_AGENT_COMMIT");
/// The build date, `YYYY-MM-DD` UTC (`SOURCE_DATE_EPOCH` when the builder sets it).
pub const BUILD_DATE: &str = env!("TUNNEL_AGENT_BUILD_DATE");

/// `--version`'s text after the program name: `0.1.0 (commit 0123abcd, built 2026-12-01)`.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("TUNNEL_AGENT_COMMIT"),
    ", built ",
    env!("TUNNEL_AGENT_BUILD_DATE"),
    ")"
);
