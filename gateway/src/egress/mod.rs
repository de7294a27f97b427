//! The API server's egress proxy: HTTP CONNECT (kube-apiserver `EgressSelectorConfiguration`,
//! `HTTPConnect` over a Unix socket or mutual-TLS TCP) and SNI passthrough, resolving each target
//! from the inventory to the agent that owns it (one QUIC stream per connection) or dialing cloud
//! and Express Connect targets directly.
//!
//! Not built yet: this module only carries the configuration hooks the hub is wired to.

use std::sync::Arc;

use clap::Args;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::hub::HubContext;

/// Egress flags (flattened into `petrel-gateway run`).
#[derive(Debug, Args, Default, Clone)]
pub struct EgressArgs {}

/// The `[egress]` table of the config file.
#[derive(Debug, Default, Deserialize, Clone)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct EgressFileConfig {}

/// Why the egress proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum EgressError {}

/// Starts the egress listeners configured in the hub's config; returns when `shutdown` fires.
pub async fn run(ctx: Arc<HubContext>, shutdown: CancellationToken) -> Result<(), EgressError> {
    let _ = (&ctx.config.egress, &ctx.config.egress_file);
    shutdown.cancelled().await;
    Ok(())
}
