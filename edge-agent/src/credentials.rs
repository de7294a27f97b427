//! The agent's node identity while it runs: the current certificate and key (replaced by a
//! renewal over any link), whether a renewal is in flight (one at a time, whichever link notices
//! first), and the state directory that stores a renewed certificate.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use crate::identity::{AgentState, Identity};

#[derive(Debug)]
pub struct Credentials {
    pub state: AgentState,
    identity: RwLock<Arc<Identity>>,
    renewing: AtomicBool,
}

impl Credentials {
    pub fn new(state: AgentState, identity: Identity) -> Self {
        Self {
            state,
            identity: RwLock::new(Arc::new(identity)),
            renewing: AtomicBool::new(false),
        }
    }

    pub fn identity(&self) -> Arc<Identity> {
        self.identity
            .read()
            .map(|i| i.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    pub fn set_identity(&self, id: Identity) {
        if let Ok(mut slot) = self.identity.write() {
            *slot = Arc::new(id);
        }
    }

    /// Claims the one renewal; `false` if another link's is in flight.
    pub fn start_renewal(&self) -> bool {
        !self.renewing.swap(true, Ordering::SeqCst)
    }

    /// The renewal in flight ended (answered, refused or abandoned).
    pub fn end_renewal(&self) {
        self.renewing.store(false, Ordering::SeqCst);
    }
}
