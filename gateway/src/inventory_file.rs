//! File-inventory mode's writer: re-reads the inventory file when it changes and writes it to
//! the store, so adding a node or a site needs no hub restart; agents get what changed through
//! the hub's refresher, as in Kubernetes mode.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::inventory::Inventory;
use crate::inventory_store::InventoryWriter;

/// How often a file inventory is checked for changes.
const INVENTORY_POLL: Duration = Duration::from_secs(2);

/// File-inventory mode: re-reads the inventory when the file changes (its modification time or
/// size), so adding a node or a site needs no hub restart; agents get what changed, as in
/// Kubernetes mode. A file that does not parse is logged and the hub keeps the inventory it has.
pub async fn watch(writer: InventoryWriter, path: std::path::PathBuf, shutdown: CancellationToken) {
    let stamp = |p: &std::path::Path| {
        std::fs::metadata(p)
            .ok()
            .map(|m| (m.modified().ok(), m.len()))
    };
    let mut seen = stamp(&path);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(INVENTORY_POLL) => {}
        }
        let now = stamp(&path);
        if now == seen {
            continue;
        }
        seen = now;
        let loaded = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| {
                Inventory::from_toml(&text, &path.display().to_string()).map_err(|e| e.to_string())
            });
        match loaded {
            Ok(inv) => {
                info!(path = %path.display(), nodes = inv.nodes().count(), "inventory file changed; applying it");
                writer.replace(inv);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "inventory file changed but cannot be used; keeping the current inventory");
            }
        }
    }
}
