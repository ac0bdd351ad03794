//! The TOML configuration through `routing::parse_config`: the parse, schema, cross-section
//! checks and route compile that `tunnel-agent check` and the agent's boot run on a file
//! (`routing::load_config` is a read of the file, then this). No input may panic, allocate
//! without bound or take long; every refusal must name what is wrong.
//!
//! Not here: `check`'s reading of the secret files and a `routes.file` the config names (file
//! system, not parsing).

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match tunnel_agent::routing::parse_config(Path::new("/etc/tunnel-agent/agent.toml"), text) {
        Ok(config) => {
            // What the boot does next with an inline table; `check` prints its size.
            let metrics = tunnel_agent::telemetry::Metrics::default();
            if config.routes.source == tunnel_agent::config::RouteSourceKind::Inline {
                let _ = tunnel_agent::routing::source::build(&config, &config.routes.hosts, &metrics);
            }
        }
        Err(e) => {
            let report = e.to_string();
            assert!(!report.is_empty(), "a refused config says why");
        }
    }
});
