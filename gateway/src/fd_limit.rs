//! The process's open-file limit (RLIMIT_NOFILE): every connection cap is checked against it at
//! start-up, because past it `accept` fails and so do the health endpoint and the state files.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises the soft open-file limit to the hard limit (an unprivileged process may) and returns
/// the soft limit now in force. On a platform or sandbox that refuses, returns what is in force.
pub fn raise_to_hard() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}
