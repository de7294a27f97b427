//! A node's routing and VXLAN forwarding state as normalized text, so a test can assert that
//! Petrel left Flannel's state exactly as it found it (or see precisely what changed).
//!
//! Captured: `ip rule`, `ip route show table all`, `bridge fdb show dev flannel.1` and
//! `ip neigh show dev flannel.1`. Normalization: whitespace collapsed, empty lines dropped,
//! lines sorted (dump order of FDB hash buckets is not meaningful). Nothing else is removed:
//! a neighbour entry that is not PERMANENT shows up with its state.

use std::fmt;

use anyhow::{Context as _, Result};

use super::cmd::{command, run_checked, DEFAULT_TIMEOUT};
use super::layout::FLANNEL_DEV;

/// See the module docs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeNetState {
    /// Node name.
    pub node: String,
    /// `ip rule show`.
    pub rules: Vec<String>,
    /// `ip route show table all`.
    pub routes: Vec<String>,
    /// `bridge fdb show dev flannel.1`.
    pub fdb: Vec<String>,
    /// `ip neigh show dev flannel.1`.
    pub neigh: Vec<String>,
}

fn normalize(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    v.sort();
    v
}

impl NodeNetState {
    pub(crate) fn capture(node: &str, ns: &str) -> Result<NodeNetState> {
        let get = |tool: &str, args: &[&str]| -> Result<Vec<String>> {
            let mut full = vec!["-n", ns];
            full.extend_from_slice(args);
            Ok(normalize(
                &run_checked(command(tool, &full), None, DEFAULT_TIMEOUT)?.stdout,
            ))
        };
        let state = || -> Result<NodeNetState> {
            Ok(NodeNetState {
                node: node.into(),
                rules: get("ip", &["rule", "show"])?,
                routes: get("ip", &["route", "show", "table", "all"])?,
                fdb: get("bridge", &["fdb", "show", "dev", FLANNEL_DEV])?,
                neigh: get("ip", &["neigh", "show", "dev", FLANNEL_DEV])?,
            })
        };
        state().with_context(|| format!("snapshot of node {node} ({ns})"))
    }

    fn sections(&self) -> [(&'static str, &Vec<String>); 4] {
        [
            ("ip rule", &self.rules),
            ("ip route (all tables)", &self.routes),
            ("fdb flannel.1", &self.fdb),
            ("neigh flannel.1", &self.neigh),
        ]
    }

    /// Lines only in `self` (`-`) or only in `other` (`+`), per section; empty if equal.
    pub fn diff(&self, other: &NodeNetState) -> String {
        let mut out = String::new();
        for ((title, a), (_, b)) in self.sections().into_iter().zip(other.sections()) {
            let removed: Vec<&String> = a.iter().filter(|l| !b.contains(l)).collect();
            let added: Vec<&String> = b.iter().filter(|l| !a.contains(l)).collect();
            if removed.is_empty() && added.is_empty() && a.len() == b.len() {
                continue;
            }
            out.push_str(&format!("[{title}]\n"));
            for l in removed {
                out.push_str(&format!("- {l}\n"));
            }
            for l in added {
                out.push_str(&format!("+ {l}\n"));
            }
            if a.len() != b.len() {
                out.push_str(&format!(
                    "  ({} lines before, {} after)\n",
                    a.len(),
                    b.len()
                ));
            }
        }
        out
    }
}

impl fmt::Display for NodeNetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "== node {}", self.node)?;
        for (title, lines) in self.sections() {
            writeln!(f, "[{title}]")?;
            for l in lines {
                writeln!(f, "{l}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_and_diff() {
        let a = NodeNetState {
            node: "n".into(),
            rules: normalize("0:\tfrom all lookup local \n\n32766:\tfrom all lookup main\n"),
            routes: vec![],
            fdb: normalize("b dst 1\na dst 2\n"),
            neigh: vec![],
        };
        assert_eq!(
            a.rules,
            vec!["0: from all lookup local", "32766: from all lookup main"]
        );
        assert_eq!(a.fdb, vec!["a dst 2", "b dst 1"]);
        let mut b = a.clone();
        assert_eq!(a.diff(&b), "");
        b.fdb[0] = "a dst 127.0.0.1 port 9999".into();
        let d = a.diff(&b);
        assert!(
            d.contains("- a dst 2")
                && d.contains("+ a dst 127.0.0.1 port 9999")
                && d.contains("[fdb flannel.1]"),
            "{d}"
        );
    }
}
