//! The inventory as a writer/store pair, the way kube-rs's reflector splits a watcher's writer
//! from the stores its readers share: the Kubernetes node index and the file watcher write
//! whole inventories ([`InventoryWriter::replace`]); sessions, views, the switch's refresher,
//! enrolment and egress read snapshots ([`InventoryReader`]). A snapshot is an `Arc`: a reader
//! never holds a lock while it works, and a write never waits for readers.
//!
//! Every write gets a new revision. An inventory's own generation is not unique across
//! replacements (each Kubernetes index counts its own), so anything cached per inventory (the
//! egress policies) is keyed by the revision, which comes with the snapshot it describes.

use std::sync::Arc;

use tokio::sync::watch;

use crate::inventory::Inventory;

/// One written inventory and its revision.
#[derive(Debug, Clone)]
pub struct InventorySnapshot {
    pub revision: u64,
    pub inventory: Arc<Inventory>,
}

impl std::ops::Deref for InventorySnapshot {
    type Target = Inventory;

    fn deref(&self) -> &Inventory {
        &self.inventory
    }
}

/// The one writer of a store (`main` hands it to the Kubernetes integration or the file
/// watcher).
#[derive(Debug)]
pub struct InventoryWriter {
    tx: watch::Sender<InventorySnapshot>,
}

/// A reader of the store; clones are cheap and each sees every write.
#[derive(Debug, Clone)]
pub struct InventoryReader {
    rx: watch::Receiver<InventorySnapshot>,
}

/// A new store holding `initial` (revision 0).
pub fn store(initial: Inventory) -> (InventoryWriter, InventoryReader) {
    let (tx, rx) = watch::channel(InventorySnapshot {
        revision: 0,
        inventory: Arc::new(initial),
    });
    (InventoryWriter { tx }, InventoryReader { rx })
}

impl InventoryWriter {
    /// Replaces the inventory; returns the new revision. Readers that wait in
    /// [`InventoryReader::changed`] wake up.
    pub fn replace(&self, inventory: Inventory) -> u64 {
        let revision = self.tx.borrow().revision + 1;
        self.tx.send_replace(InventorySnapshot {
            revision,
            inventory: Arc::new(inventory),
        });
        revision
    }

    pub fn reader(&self) -> InventoryReader {
        InventoryReader {
            rx: self.tx.subscribe(),
        }
    }
}

impl InventoryReader {
    /// The current inventory and its revision.
    pub fn snapshot(&self) -> InventorySnapshot {
        self.rx.borrow().clone()
    }

    /// Waits for a write this reader has not seen and returns it; `None` once the writer is
    /// gone.
    pub async fn changed(&mut self) -> Option<InventorySnapshot> {
        self.rx.changed().await.ok()?;
        Some(self.rx.borrow_and_update().clone())
    }

    /// Marks the current snapshot as seen (the next [`Self::changed`] waits for a new write).
    pub fn mark_seen(&mut self) -> InventorySnapshot {
        self.rx.borrow_and_update().clone()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn readers_see_each_write_with_a_new_revision() {
        let (writer, reader) = store(Inventory::default());
        let mut follower = writer.reader();
        follower.mark_seen();
        assert_eq!(reader.snapshot().revision, 0);
        assert_eq!(reader.snapshot().nodes().count(), 0);

        let demo = Inventory::embedded_default().unwrap();
        assert_eq!(writer.replace(demo.clone()), 1);
        let seen = follower.changed().await.unwrap();
        assert_eq!(seen.revision, 1);
        assert_eq!(seen.nodes().count(), demo.nodes().count());
        assert_eq!(reader.snapshot().revision, 1, "every reader sees it");

        // The same content written again is a new revision (caches keyed by it refill).
        assert_eq!(writer.replace(demo), 2);
        assert_eq!(follower.changed().await.unwrap().revision, 2);

        // A snapshot taken before a write stays what it was.
        let before = reader.snapshot();
        writer.replace(Inventory::default());
        assert_eq!(before.revision, 2);
        assert!(before.nodes().count() > 0);
        drop(writer);
        follower.mark_seen();
        assert!(follower.changed().await.is_none(), "the writer is gone");
    }
}
