//! Where the route table comes from, and where it is written for operators and reboots.
//!
//! - `<runtime_dir>/routes.json`: the effective table as a host map, for operators (and
//!   anything that used to read `/etc/cf-proxy/routes.json`).
//! - `<state_dir>/routes.json`: the last host map from a remote source (file, metadata attribute)
//!   that built a valid table; served at boot when the source cannot be read, so a reboot during
//!   a metadata outage still serves.
//!
//! The metadata attribute is watched with the metadata server's long poll
//! ([`crate::gcp::AttributeWatch`]).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tokio::sync::mpsc;

use crate::config::{Config, RouteSourceKind};
use crate::gcp::{MetadataClient, Watched};
use crate::routing::error::SourceError;
use crate::routing::table::{parse_host_map, read_host_map, RouteTable};
use crate::routing::{compile, config_api};
use crate::telemetry::Metrics;

pub type HostMap = BTreeMap<String, String>;

/// A human name for the configured source.
pub fn describe(config: &Config) -> String {
    match config.routes.source {
        RouteSourceKind::Inline => "inline".to_owned(),
        RouteSourceKind::File => format!(
            "file {}",
            config.routes.file.as_deref().unwrap_or(Path::new("")).display()
        ),
        RouteSourceKind::ConfigApi => "config-api".to_owned(),
        RouteSourceKind::GcpMetadata => format!(
            "gcp-metadata {}/{}",
            config.routes.attribute_scope.path(),
            config.routes.attribute.as_deref().unwrap_or("")
        ),
    }
}

fn attribute_path(config: &Config) -> String {
    format!(
        "{}/{}",
        config.routes.attribute_scope.path(),
        config.routes.attribute.as_deref().unwrap_or("")
    )
}

/// Reads the host map from the configured source. Returns the map and, for the metadata
/// attribute, its ETag (the starting point of the watch).
pub async fn fetch(config: &Config, metadata: &MetadataClient) -> Result<(HostMap, Option<String>), SourceError> {
    match config.routes.source {
        RouteSourceKind::Inline => Ok((config.routes.hosts.clone(), None)),
        // Pushed tables are not fetched; the config API applies them itself.
        RouteSourceKind::ConfigApi => Ok((HostMap::new(), None)),
        RouteSourceKind::File => {
            read_host_map(config.routes.file.as_deref().unwrap_or(Path::new(""))).map(|m| (m, None))
        }
        RouteSourceKind::GcpMetadata => {
            let path = attribute_path(config);
            let (body, etag) = metadata.get(&path, &[]).await?;
            let map = parse_attribute(&path, &body)?;
            Ok((map, etag))
        }
    }
}

/// The metadata attribute at `path`, read as a host map.
fn parse_attribute(path: &str, body: &str) -> Result<HostMap, SourceError> {
    parse_host_map(body.as_bytes()).map_err(|error| SourceError::NotAHostMap {
        origin: format!("metadata attribute {path}"),
        error,
    })
}

fn last_good_path(config: &Config) -> PathBuf {
    config.agent.state_dir.join("routes.json")
}

/// Whether the source is remote enough to need a last-good copy.
fn keeps_last_good(config: &Config) -> bool {
    matches!(
        config.routes.source,
        RouteSourceKind::File | RouteSourceKind::GcpMetadata
    )
}

/// The last host map that built a valid table, if any.
pub fn load_last_good(config: &Config) -> Result<HostMap, SourceError> {
    read_host_map(&last_good_path(config))
}

/// Records a table that was just applied: the effective table for operators, and the source's
/// host map as the last good one.
pub fn persist(config: &Config, map: &HostMap, table: &RouteTable) -> std::io::Result<()> {
    let effective = serde_json::to_vec_pretty(&table.to_host_map()).map_err(std::io::Error::other)?;
    crate::files::write_atomic(&config.agent.runtime_dir.join("routes.json"), &effective, 0o644)?;
    if keeps_last_good(config) {
        let raw = serde_json::to_vec_pretty(map).map_err(std::io::Error::other)?;
        crate::files::write_atomic(&last_good_path(config), &raw, 0o600)?;
    }
    Ok(())
}

/// Builds the route table from a host map (the source's) plus the config's `[[route]]`s. The
/// error reads "invalid routes: …" (with `{:#}`) and keeps the
/// [`RoutesError`](crate::routing::table::RoutesError) for callers that sort its problems
/// (`check`).
pub fn build(config: &Config, map: &HostMap, metrics: &Metrics) -> Result<RouteTable, SourceError> {
    compile::build_with(config, map, metrics).map_err(SourceError::Invalid)
}

/// Reads the configured local route source and builds the table (what `check` uses).
pub fn load_local(config: &Config, metrics: &Metrics) -> Result<RouteTable, SourceError> {
    let map = match config.routes.source {
        RouteSourceKind::Inline => config.routes.hosts.clone(),
        RouteSourceKind::File => read_host_map(config.routes.file.as_deref().unwrap_or(Path::new("")))?,
        RouteSourceKind::GcpMetadata => HostMap::new(),
        RouteSourceKind::ConfigApi => return Ok(config_api::load_persisted(config, metrics)),
    };
    build(config, &map, metrics)
}

/// The routes a node boots with.
pub struct BootRoutes {
    /// The source's host map (empty for the config API).
    pub map: HostMap,
    pub table: RouteTable,
    /// The metadata attribute's ETag, where the watch starts.
    pub etag: Option<String>,
    /// Why the last good table is served instead of the source's.
    pub fallback: Option<String>,
}

/// Routes at boot: the source's, or the last good table when the source cannot be read.
pub async fn boot(config: &Config, metadata: &MetadataClient, metrics: &Metrics) -> anyhow::Result<BootRoutes> {
    if config.routes.source == RouteSourceKind::ConfigApi {
        // The controller's last push, persisted in the state dir, unless it is on trial for a
        // crash (or an empty table until the first push; /ready waits for one).
        let (table, fallback) = config_api::boot_persisted(config, metrics);
        return Ok(BootRoutes {
            map: HostMap::new(),
            table,
            etag: None,
            fallback,
        });
    }
    // A remote source's value that builds no valid table is as unusable as an unreachable one.
    let fetched = fetch(config, metadata).await.and_then(|(map, etag)| {
        let table = compile::build_with(config, &map, metrics).map_err(SourceError::Invalid)?;
        Ok((map, table, etag))
    });
    match fetched {
        Ok((map, table, etag)) => Ok(BootRoutes {
            map,
            table,
            etag,
            fallback: None,
        }),
        Err(source_error) if config.routes.source == RouteSourceKind::Inline => {
            anyhow::bail!("{source_error}")
        }
        Err(source_error) => {
            let map = load_last_good(config).map_err(|e| {
                anyhow::anyhow!(
                    "cannot read routes from {}: {source_error}; no last good table either ({e})",
                    describe(config)
                )
            })?;
            // A last good table that no longer builds (a state dir from another version, a
            // changed `[[route]]`) must not keep the agent down: it boots empty, loudly, and the
            // source's next value replaces it.
            let (map, table, fallback) = match build(config, &map, metrics) {
                Ok(table) => {
                    tracing::warn!(source = %describe(config), error = %source_error, "route source {} unreachable; serving the last good table: {source_error}", describe(config));
                    (map, table, format!("source unreachable at boot: {source_error}"))
                }
                Err(e) => {
                    let why = format!("source unreachable at boot: {source_error}; the last good table is no longer valid ({e:#}); serving no routes until the source answers");
                    tracing::error!(source = %describe(config), "{why}");
                    (
                        HostMap::new(),
                        build(config, &HostMap::new(), metrics).unwrap_or_default(),
                        why,
                    )
                }
            };
            Ok(BootRoutes {
                map,
                table,
                etag: None,
                fallback: Some(fallback),
            })
        }
    }
}

/// A new value of the watched attribute: the parsed map, or why it is unusable.
pub type Update = Result<HostMap, SourceError>;

/// Long-polls the routes attribute and sends each changed value. Ends when `tx` is closed.
pub fn watch(
    config: &Config,
    metadata: MetadataClient,
    etag: Option<String>,
    tx: mpsc::Sender<Update>,
) -> Option<tokio::task::JoinHandle<()>> {
    if config.routes.source != RouteSourceKind::GcpMetadata {
        return None;
    }
    let mut watch = metadata.watch_attribute(attribute_path(config), etag, "routes watch failed");
    Some(tokio::spawn(async move {
        loop {
            let path = watch.path().to_owned();
            let update = match watch.next().await {
                Watched::Changed(body) => parse_attribute(&path, &body),
                // Deleted attribute: keep serving the current table, say so once per change.
                Watched::Missing { was_present: true } => Err(SourceError::Deleted { path }),
                Watched::Missing { was_present: false } => continue,
            };
            if tx.send(update).await.is_err() {
                return;
            }
        }
    }))
}
