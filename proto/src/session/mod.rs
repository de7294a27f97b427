//! The control-stream sessions of both ends as sans-IO state machines, in the manner of
//! quinn-proto's `Connection`: the driver feeds messages, the agent-side or hub-side commands
//! and `now`; the machine queues actions (send this, close with this code and reason, apply this
//! view, sign this CSR) that the driver takes with `poll_action` and performs; `poll_timeout`
//! says when to call `handle_timeout` next. Neither machine reads a clock, opens a stream or
//! knows QUIC, so both ends are tested against each other in memory with a simulated clock
//! (`tests.rs`).
//!
//! What stays with the drivers, and why: certificate verification, the inventory admission and
//! revocation (they need the hub's stores, and decide before any control message is read),
//! building a node's view, signing, the route-sync pacing (pre-encoded chunks shared by every
//! session, paced over the whole hub), and the write queue's byte cap (it counts bytes on the
//! QUIC stream).

pub mod agent;
pub mod hub;
#[cfg(test)]
mod tests;

pub use agent::{AgentAction, AgentSession, AgentSessionConfig, AgentSessionEnd, NextAttempt};
pub use hub::{HubAction, HubSession, HubSessionConfig, HubSessionEnd, Refusal};

/// QUIC application close codes Petrel uses. The reason phrase always carries a sentence for the
/// operator; the code is for programs.
pub mod close_code {
    pub const NORMAL: u32 = 0x00;
    pub const GOING_AWAY: u32 = 0x01;
    pub const UNAUTHORIZED: u32 = 0x10;
    pub const PROTOCOL_ERROR: u32 = 0x11;
    pub const REPLACED: u32 = 0x12;
    pub const KEEPALIVE_TIMEOUT: u32 = 0x13;
    pub const ENROL_DONE: u32 = 0x20;
}

/// Closing the connection: the code for programs, the reason phrase for the peer's operator,
/// and how long to let the messages queued before it arrive (and the peer close first, which
/// is cleaner for both sides) before closing anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Close {
    pub code: u32,
    pub reason: String,
    pub linger: std::time::Duration,
}

impl Close {
    fn now(code: u32, reason: impl Into<String>) -> Self {
        Close {
            code,
            reason: reason.into(),
            linger: std::time::Duration::ZERO,
        }
    }
}
