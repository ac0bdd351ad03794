//! tunnel-agent: keeps a Cloudflare Tunnel origin host alive.
//!
//! [`boot::run`] is the whole life of the agent, top to bottom: config → secrets → routes →
//! health listener → proxy → (cloudflared) → ready → the [`node`]'s event loop → on shutdown,
//! the same steps in reverse. ARCHITECTURE.md says where each concept lives.

// Denied everywhere but `tunnel::sandbox` (Landlock syscalls, a `pre_exec` hook), which allows
// it for itself, and single functions that allow it with their `SAFETY:` reasons (`reaper`'s
// `pre_exec`; `tunnel::child`'s pidfd_open and the duplicate of a carried descriptor).
#![deny(unsafe_code)]

pub mod backoff;
pub mod boot;
pub mod build_info;
pub mod check;
pub mod config;
pub mod control;
pub mod deadline;
pub mod election;
pub mod errors;
pub mod exit;
pub mod files;
pub mod follow;
pub mod framing;
pub mod gcp;
pub mod handover;
pub mod health;
pub mod node;
pub mod peer_body;
pub mod process_stats;
pub mod prom_text;
pub mod proxy;
pub mod random;
pub mod reaper;
pub mod role;
pub mod routing;
pub mod secret;
pub mod secrets;
pub mod server;
pub mod shutdown;
pub mod systemd;
pub mod telemetry;
pub mod tunnel;
