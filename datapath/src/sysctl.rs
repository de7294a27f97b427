//! Reverse-path filtering on Flannel's device, with the previous value saved for restoration.
//!
//! Decapsulated packets from via-hub peers arrive on `flannel.1`, but the route back to their
//! source now points at `petrel.1`/`petrel0` (our rule + table), so strict reverse-path
//! filtering drops them. The effective setting is `max(conf.all.rp_filter,
//! conf.<dev>.rp_filter)`; when it is 1 (strict) we set the device's value to 2 (loose: the
//! source must be reachable through *some* interface). The previous value goes to a small state
//! file keyed by the network namespace's inode, so [`crate::cleanup_all`] can restore it even
//! after a crash. All file access is synchronous on the calling thread: `/proc/sys/net` answers
//! for the namespace of the thread that opens it.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::DatapathError;

const LOOSE: i64 = 2;

fn conf_path(dev: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("/proc/sys/net/ipv4/conf/{dev}/{key}"))
}

pub(crate) fn read(path: &Path) -> Result<i64, DatapathError> {
    let s = fs::read_to_string(path).map_err(|source| DatapathError::Sysctl {
        path: path.to_path_buf(),
        source,
    })?;
    s.trim().parse().map_err(|_| DatapathError::Sysctl {
        path: path.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidData, format!("not a number: {s:?}")),
    })
}

pub(crate) fn write(path: &Path, value: i64) -> Result<(), DatapathError> {
    fs::write(path, format!("{value}\n")).map_err(|source| DatapathError::Sysctl {
        path: path.to_path_buf(),
        source,
    })
}

/// The inode of the calling thread's network namespace.
fn netns_inode() -> Result<u64, DatapathError> {
    let p = Path::new("/proc/thread-self/ns/net");
    fs::metadata(p)
        .map(|m| m.ino())
        .map_err(|source| DatapathError::State {
            path: p.to_path_buf(),
            source,
        })
}

/// Saved values, one `rp_filter <dev> <value>` line each.
pub(crate) struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub(crate) fn for_current_netns(dir: &Path) -> Result<Self, DatapathError> {
        let ino = netns_inode()?;
        Ok(StateFile {
            path: dir.join(format!("datapath-netns-{ino}.state")),
        })
    }

    fn err(&self, source: io::Error) -> DatapathError {
        DatapathError::State {
            path: self.path.clone(),
            source,
        }
    }

    fn entries(&self) -> Result<Vec<(String, i64)>, DatapathError> {
        match fs::read_to_string(&self.path) {
            Ok(s) => Ok(s
                .lines()
                .filter_map(|l| {
                    let mut it = l.split_whitespace();
                    match (it.next(), it.next(), it.next()) {
                        (Some("rp_filter"), Some(dev), Some(v)) => {
                            v.parse().ok().map(|v| (dev.to_string(), v))
                        }
                        _ => None,
                    }
                })
                .collect()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(self.err(e)),
        }
    }

    fn saved_rp_filter(&self, dev: &str) -> Result<Option<i64>, DatapathError> {
        Ok(self
            .entries()?
            .into_iter()
            .find(|(d, _)| d == dev)
            .map(|(_, v)| v))
    }

    fn save_rp_filter(&self, dev: &str, value: i64) -> Result<(), DatapathError> {
        let mut entries = self.entries()?;
        entries.retain(|(d, _)| d != dev);
        entries.push((dev.to_string(), value));
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(|e| self.err(e))?;
        }
        let tmp = self.path.with_extension("tmp");
        let mut f = fs::File::create(&tmp).map_err(|e| self.err(e))?;
        for (d, v) in &entries {
            writeln!(f, "rp_filter {d} {v}").map_err(|e| self.err(e))?;
        }
        f.sync_all().map_err(|e| self.err(e))?;
        fs::rename(&tmp, &self.path).map_err(|e| self.err(e))
    }

    fn remove(&self) -> Result<(), DatapathError> {
        match fs::remove_file(&self.path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.err(e)),
        }
    }
}

/// Makes reverse-path filtering on `dev` loose if it is effectively strict. Returns whether it
/// changed anything.
pub(crate) fn ensure_loose_rp_filter(state: &StateFile, dev: &str) -> Result<bool, DatapathError> {
    let all = read(&conf_path("all", "rp_filter"))?;
    let dev_path = conf_path(dev, "rp_filter");
    let cur = read(&dev_path)?;
    if all.max(cur) != 1 {
        return Ok(false);
    }
    if state.saved_rp_filter(dev)?.is_none() {
        state.save_rp_filter(dev, cur)?;
    }
    write(&dev_path, LOOSE)?;
    tracing::info!(
        dev,
        previous = cur,
        all,
        "set rp_filter=2 (loose) on {dev}: decapsulated packets from via-hub peers arrive there \
         while the route back points at Petrel's device"
    );
    Ok(true)
}

/// Restores what [`ensure_loose_rp_filter`] changed (if the device still has our value) and
/// removes the state file.
pub(crate) fn restore(state: &StateFile) -> Result<(), DatapathError> {
    for (dev, value) in state.entries()? {
        let path = conf_path(&dev, "rp_filter");
        match read(&path) {
            Ok(LOOSE) => {
                write(&path, value)?;
                tracing::info!(dev, value, "restored rp_filter on {dev}");
            }
            Ok(other) => {
                tracing::info!(
                    dev,
                    current = other,
                    "rp_filter on {dev} was changed by someone else; left as is"
                )
            }
            // The device is gone (Flannel recreates it with the default value): nothing to do.
            Err(DatapathError::Sysctl { source, .. })
                if source.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    state.remove()
}
