//! SPDY/3.1 as Kubernetes uses it for exec, attach and port-forward: the frame codec
//! ([`frame`]), the header-compression dictionary ([`dictionary`]), a session with streams
//! ([`session`]) and a minimal client-side HTTP upgrade ([`client`]) used by tests.

pub mod client;
pub mod dictionary;
pub mod frame;
pub mod session;

pub use frame::{Frame, FrameDecoder, FrameEncoder, FrameError, HeaderBlock, Limits};
pub use session::{
    Incoming, Role, Session, SessionConfig, SessionError, Stream, StreamReader, StreamWriter,
};
