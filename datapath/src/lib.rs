//! Petrel's kernel data plane on a node: the hooks that hand traffic for "via-hub" pod CIDRs to
//! a relay as VXLAN payloads, and the injection of VXLAN payloads that come back from the hub.
//!
//! Flannel (VXLAN backend) programs, per remote node, a permanent neighbour, FDB entry and
//! main-table route on `flannel.1` (VNI 1, UDP 8472, `nolearning`). Edge nodes sit behind NAT,
//! so kernel VXLAN cannot reach them; Petrel carries the very same VXLAN payloads (8-byte VXLAN
//! header + inner Ethernet frame, byte-compatible with `flannel.1`) over QUIC through a hub.
//! This crate is the kernel half of that: it **never modifies Flannel's objects** (its device,
//! FDB, neighbours or main-table routes). Instead, for every peer pod CIDR that must go through
//! the hub it adds
//!
//! * a policy rule `to <podCIDR> lookup <T> pref <P>` (defaults 7473 / 100): it is consulted
//!   before the `main` table (pref 32766), so it beats Flannel's route without touching it;
//! * in table `T` a route with `mtu lock <M>`: the node answers oversized DF packets from pods
//!   with ICMP "fragmentation needed" carrying `M`, so pods learn the per-site MTU and TCP adapts;
//! * a hook that sends those packets, as VXLAN, to the relay (`127.0.0.1:<relay_port>` for a
//!   local agent/hub process, `<hub ip>:<relay_port>` for a remote hub).
//!
//! # The two hooks ([`HookMode`])
//!
//! **Fast** (kernel VXLAN, no per-packet userspace work on the sending side): our own VXLAN
//! device `petrel.1` with `flannel.1`'s VNI, `local` address, underlay `dev` and MTU, `nolearning`,
//! and its MAC address set to `flannel.1`'s (so the inner source MAC is the node's VtepMAC, which
//! the hub's authority checks expect). Per peer: route
//! `<cidr> via <cidr.0> dev petrel.1 onlink mtu lock M table T`, neighbour
//! `<cidr.0> lladdr <peer VtepMAC> nud permanent dev petrel.1`, FDB
//! `<peer VtepMAC> dst <relay ip> port <relay port> self permanent dev petrel.1`.
//! For a local relay the kernel's VXLAN *local bypass* would swallow the packet (an FDB entry
//! pointing at a local address is handed to a local VXLAN device with that VNI and port instead
//! of being sent as UDP; none exists, so it is dropped with `tx_errors++`). Since Linux 6.6
//! `IFLA_VXLAN_LOCALBYPASS` can be turned off, and then the kernel really sends UDP to
//! `127.0.0.1:<relay port>`, where [`FrameSource`] receives it. [`detect_fast_support`] probes for
//! the attribute by creating a throw-away VXLAN device (never by parsing `uname`).
//!
//! Measured on Linux 6.18: a VXLAN device binds a kernel UDP socket on `0.0.0.0:<dstport>` when
//! it is brought up, so `petrel.1` can **not** use the relay port as its `dstport` (the relay's
//! userspace socket would get `EADDRINUSE`, and so would a hub listening on that port). `petrel.1`
//! therefore listens on its own [`DatapathConfig::vxlan_port`] (default 8474; it coexists with
//! `flannel.1` on 8472 because the VNI is unique per port) and every FDB entry names
//! `port <relay_port>` explicitly.
//!
//! **Portable** (any kernel): a TUN device `petrel0` (`IFF_TUN | IFF_NO_PI`) and routes
//! `<cidr> dev petrel0 mtu lock M table T`. [`FrameSource`] reads IP packets from the TUN and
//! builds the VXLAN payload itself: VXLAN header (flags `0x08`, VNI), Ethernet destination =
//! the VtepMAC of the peer whose CIDR contains the destination IP, source = `flannel.1`'s MAC,
//! ethertype `0x0800`, then the packet (read straight into place: no copy, no allocation).
//!
//! # Receiving (both modes): [`Injector`]
//!
//! "A VXLAN packet sent by any UDP socket to a node's port 8472 is decapsulated, whatever the
//! outer source, if the VNI matches, the inner destination MAC is that flannel.1's MAC and the
//! inner source MAC is not." Measured here: sending to `127.0.0.1:8472` works as well as to the
//! node's underlay address, so the injector uses loopback and needs no address.
//!
//! Decapsulated packets arrive on `flannel.1` with a source inside a via-hub CIDR, whose route
//! now points at `petrel.1`/`petrel0`: strict reverse-path filtering (`rp_filter=1`, common on
//! distributions and used by the lab) drops them. The effective value is
//! `max(conf.all, conf.<dev>)`, so when it is strict the datapath sets
//! `net.ipv4.conf.flannel.1.rp_filter=2` (loose), records the previous value in a state file
//! under [`DatapathConfig::state_dir`] (keyed by the network namespace) and restores it on
//! [`Datapath::cleanup`] / [`cleanup_all`].
//!
//! # Measured on this kernel (6.18), proved by this crate's tests
//!
//! * `petrel.1` (dstport 8474) and `flannel.1` (8472) coexist with the same VNI and MAC; with
//!   local bypass off the kernel sends to `127.0.0.1:8473` and a userspace socket receives it.
//! * Frames captured in both modes carry complete inner IPv4 and TCP/UDP/ICMP checksums
//!   (the fast hook's GSO packets are segmented and checksummed on the way through `lo`; the TUN
//!   has no offloads), so the hub may forward them to any real VTEP unchanged.
//! * Injection to `127.0.0.1:8472` is decapsulated like injection to the underlay address.
//! * With `rp_filter=1` on `flannel.1` injected traffic from via-hub peers is dropped; `2`
//!   makes it pass; nothing is needed on `petrel.1`/`petrel0` (no traffic arrives on them).
//! * A DF packet larger than the site MTU gets ICMP "frag needed, mtu = M" from the node, and
//!   TCP through the hook settles on M.
//! * The kernel does not wake readers of a TUN device that is deleted from outside; the portable
//!   [`FrameSource`] therefore also waits for the datapath to publish a new descriptor (which
//!   `apply` does after recreating the device) and carries on with it.
//!
//! # Layout
//!
//! | module | owns |
//! |---|---|
//! | `datapath` | [`Datapath`]: opening (hook choice, Flannel's device), the idempotent `apply`, cleanup |
//! | `capture` | [`FrameSource`], [`FrameBatch`]: frames toward the relay (UDP from `petrel.1`, or TUN + in-place encapsulation) |
//! | `inject` | [`Injector`]: frames from the hub into `flannel.1` |
//! | `nl`, `events` | the rtnetlink request helper and change notifications |
//! | `tun`, `ethtool` | the TUN device and the checksum-offload ioctl |
//! | `heap` | the allocator's free pages given back to the kernel (glibc `malloc_trim`; used by the hub) |
//! | `probe`, `sysctl`, `error` | the fast-hook probe, `rp_filter`, [`DatapathError`] |
//!
//! `tun`, `ethtool` and `heap` hold the crate's only `unsafe`.
//!
//! The VXLAN wire format comes from `petrel_proto::datagram`; UDP batching (GSO, `recvmmsg`) from
//! `petrel_transport::udp_batch`, which the hub uses without this crate's netlink parts.
//!
//! # Network namespaces and threads
//!
//! Netlink sockets, UDP sockets, the TUN device and `/proc/sys/net` all bind to the network
//! namespace of the *calling thread* when they are created. [`Datapath::open`],
//! [`Datapath::frame_source`], [`Datapath::injector`] and [`Datapath::change_events`] must be
//! called on threads of that namespace (trivially true for a daemon in the host namespace; the
//! tests run one current-thread runtime per namespace, on a thread that entered it with
//! `setns`). Nothing in this crate uses `spawn_blocking` for namespace-sensitive work.
//!
//! # Reconciling
//!
//! [`Datapath::apply`] is idempotent and returns an [`ApplyReport`] of what it had to change, so
//! a reconcile loop can log only repairs. [`Datapath::change_events`] gives a [`ChangeEvents`]
//! that fires when links, table-`T` routes, rules, or neighbours / FDB entries on our device
//! change (rtnetlink multicast groups), so a caller can re-apply within a second of someone
//! (Flannel, an operator) disturbing our objects.

#![deny(unsafe_code)]

mod capture;
mod datapath;
mod error;
mod ethtool;
mod events;
pub mod heap;
mod inject;
mod nl;
mod probe;
mod sysctl;
mod tun;

use std::fmt;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;

pub use capture::{FrameBatch, FrameSource, FrameStats, FRAME_BUF_LEN};
pub use datapath::{cleanup_all, ApplyReport, Datapath};
pub use error::DatapathError;
pub use events::{ChangeEvents, ChangeSet};
pub use inject::Injector;
/// What a VXLAN payload adds to an IP packet (defined by the wire protocol, `petrel-proto`).
pub use petrel_proto::datagram::VXLAN_OVERHEAD;
pub use probe::detect_fast_support;

/// Which hook to use (configuration). `Auto` picks [`HookMode::Fast`] when the kernel can turn
/// off VXLAN local bypass, else [`HookMode::Portable`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HookChoice {
    #[default]
    Auto,
    Fast,
    Portable,
}

impl FromStr for HookChoice {
    type Err = ParseHookChoiceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(HookChoice::Auto),
            "fast" => Ok(HookChoice::Fast),
            "portable" => Ok(HookChoice::Portable),
            _ => Err(ParseHookChoiceError(s.to_string())),
        }
    }
}

impl fmt::Display for HookChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookChoice::Auto => "auto",
            HookChoice::Fast => "fast",
            HookChoice::Portable => "portable",
        })
    }
}

/// A hook name that is not `auto`, `fast` or `portable`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown hook {0:?} (allowed: auto, fast, portable)")]
pub struct ParseHookChoiceError(pub String);

/// The hook in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookMode {
    /// Kernel VXLAN device `petrel.1` (local bypass off for a local relay).
    Fast,
    /// TUN device `petrel0` + policy routing; userspace builds the VXLAN payloads.
    Portable,
}

impl fmt::Display for HookMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HookMode::Fast => "fast (kernel VXLAN, localbypass off)",
            HookMode::Portable => "portable (TUN + policy routing)",
        })
    }
}

/// Names, numbers and ports of the objects Petrel owns on a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatapathConfig {
    /// Flannel's VXLAN device (read only): `flannel.1`.
    pub flannel_dev: String,
    /// Our VXLAN device (fast hook): `petrel.1`.
    pub vxlan_dev: String,
    /// Our TUN device (portable hook): `petrel0`.
    pub tun_dev: String,
    /// Routing table holding our routes: 7473. Every route in it is ours.
    pub table: u32,
    /// Preference of our rules: 100 (must be below the `main` rule's 32766).
    pub rule_pref: u32,
    /// UDP port of the relay (local agent/hub on 127.0.0.1, or a remote hub): 8473.
    pub relay_port: u16,
    /// Flannel's VXLAN UDP port, where the injector sends: 8472.
    pub flannel_port: u16,
    /// UDP port `petrel.1` itself binds (`dstport`), 8474. The kernel binds `0.0.0.0:<port>` for
    /// every VXLAN device, so it must differ from `relay_port` (see the crate docs); the FDB
    /// entries carry `port <relay_port>` explicitly.
    pub vxlan_port: u16,
    /// Which hook to use.
    pub hook: HookChoice,
    /// Where the previous values of sysctls we change are kept (for `cleanup`/`cleanup_all`
    /// after a crash): `/run/petrel`. A tmpfs is right: a reboot clears the kernel state too.
    pub state_dir: PathBuf,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        DatapathConfig {
            flannel_dev: "flannel.1".to_string(),
            vxlan_dev: "petrel.1".to_string(),
            tun_dev: "petrel0".to_string(),
            table: 7473,
            rule_pref: 100,
            relay_port: 8473,
            flannel_port: 8472,
            vxlan_port: 8474,
            hook: HookChoice::Auto,
            state_dir: PathBuf::from("/run/petrel"),
        }
    }
}

impl DatapathConfig {
    /// Checks names, table, preference and ports.
    pub fn validate(&self) -> Result<(), DatapathError> {
        for (what, name) in [
            ("flannel_dev", &self.flannel_dev),
            ("vxlan_dev", &self.vxlan_dev),
            ("tun_dev", &self.tun_dev),
        ] {
            if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains(' ') {
                return Err(DatapathError::Config(format!(
                    "{what} {name:?}: an interface name has 1 to 15 characters, no '/' or space"
                )));
            }
        }
        if self.vxlan_dev == self.flannel_dev || self.tun_dev == self.flannel_dev {
            return Err(DatapathError::Config(
                "vxlan_dev and tun_dev must differ from flannel_dev".into(),
            ));
        }
        if matches!(self.table, 0 | 253..=255) {
            return Err(DatapathError::Config(format!(
                "table {} is reserved (unspec/default/main/local)",
                self.table
            )));
        }
        if self.rule_pref == 0 || self.rule_pref >= 32766 {
            return Err(DatapathError::Config(format!(
                "rule_pref {} must be in 1..32766 (after the local rule, before main)",
                self.rule_pref
            )));
        }
        let ports = [self.relay_port, self.flannel_port, self.vxlan_port];
        if ports.contains(&0)
            || self.relay_port == self.flannel_port
            || self.relay_port == self.vxlan_port
            || self.flannel_port == self.vxlan_port
        {
            return Err(DatapathError::Config(format!(
                "relay_port {}, flannel_port {} and vxlan_port {} must be distinct and non-zero",
                self.relay_port, self.flannel_port, self.vxlan_port
            )));
        }
        Ok(())
    }
}

/// A pod CIDR that goes through the hub.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer node's pod CIDR (Flannel lease), e.g. 10.244.3.0/24.
    pub cidr: ipnet::Ipv4Net,
    /// The peer node's VtepMAC (Flannel's `backend-data`).
    pub vtep_mac: [u8; 6],
    /// The inner MTU for this site (`mtu lock`), at most `flannel.1`'s MTU.
    pub mtu: u16,
    /// Where this peer's frames go when not to [`DesiredState::relay`]: with several active
    /// hubs each site's CIDRs point at the hub that owns the site. Every CIDR of one VtepMAC
    /// must name the same relay (the kernel keeps one FDB entry per MAC).
    pub via: Option<Relay>,
}

/// Where the hook sends the VXLAN payloads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Relay {
    /// A process on this node at `127.0.0.1:<relay_port>` (agent, or the hub on its own node).
    Local,
    /// A hub at `<ip>:<relay_port>` (cloud nodes pointing at the hub node's underlay address).
    Remote(Ipv4Addr),
}

/// Everything Petrel wants on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub peers: Vec<PeerRoute>,
    /// Where frames go unless a peer says otherwise ([`PeerRoute::via`]).
    pub relay: Relay,
}

impl DesiredState {
    /// The relay each peer VtepMAC's frames go to, and whether any of them is this node.
    pub fn relay_of(&self, mac: &[u8; 6]) -> Relay {
        self.peers
            .iter()
            .find(|p| &p.vtep_mac == mac)
            .and_then(|p| p.via)
            .unwrap_or(self.relay)
    }

    /// Whether a process on this node receives any of the frames (the kernel's VXLAN local
    /// bypass must be off then).
    pub fn uses_local_relay(&self) -> bool {
        self.relay == Relay::Local || self.peers.iter().any(|p| p.via == Some(Relay::Local))
    }
}

/// Formats a MAC address as `02:fa:00:00:00:01`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn hook_choice_parses() {
        assert_eq!("auto".parse::<HookChoice>(), Ok(HookChoice::Auto));
        assert_eq!("Fast".parse::<HookChoice>(), Ok(HookChoice::Fast));
        assert_eq!(" portable ".parse::<HookChoice>(), Ok(HookChoice::Portable));
        let e = "tun".parse::<HookChoice>().unwrap_err();
        assert!(e.to_string().contains("auto, fast, portable"), "{e}");
        assert_eq!(HookChoice::Portable.to_string(), "portable");
    }

    #[test]
    fn each_peer_goes_to_its_own_relay_or_the_default() {
        let peer = |n: u8, via| PeerRoute {
            cidr: format!("10.244.{n}.0/24").parse().unwrap(),
            vtep_mac: [2, 0xfa, 0, 0, 0, n],
            mtu: 1350,
            via,
        };
        let far = Relay::Remote("192.168.50.10".parse().unwrap());
        let d = DesiredState {
            peers: vec![peer(2, None), peer(3, Some(far))],
            relay: Relay::Remote("192.168.50.9".parse().unwrap()),
        };
        assert_eq!(d.relay_of(&[2, 0xfa, 0, 0, 0, 2]), d.relay);
        assert_eq!(d.relay_of(&[2, 0xfa, 0, 0, 0, 3]), far);
        assert_eq!(d.relay_of(&[2, 0xfa, 0, 0, 0, 9]), d.relay);
        assert!(!d.uses_local_relay());
        let mut local_peer = d.clone();
        local_peer.peers[0].via = Some(Relay::Local);
        assert!(local_peer.uses_local_relay());
        let local_default = DesiredState {
            relay: Relay::Local,
            ..d
        };
        assert!(local_default.uses_local_relay());
    }

    #[test]
    fn hook_mode_display() {
        assert_eq!(
            HookMode::Fast.to_string(),
            "fast (kernel VXLAN, localbypass off)"
        );
        assert_eq!(
            HookMode::Portable.to_string(),
            "portable (TUN + policy routing)"
        );
    }

    #[test]
    fn config_validation() {
        assert!(DatapathConfig::default().validate().is_ok());
        let bad = DatapathConfig {
            vxlan_port: 8473,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = DatapathConfig {
            table: 254,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = DatapathConfig {
            rule_pref: 32766,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = DatapathConfig {
            vxlan_dev: "a-very-long-name0".into(),
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn handles_are_send() {
        fn send<T: Send>(_: &T) {}
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Datapath>();
        send_sync::<Injector>();
        send_sync::<ChangeEvents>();
        fn recv_future_is_send(src: &mut FrameSource, buf: &mut [u8]) {
            send(&src.recv(buf));
        }
        fn inject_future_is_send(inj: &Injector, p: &[u8]) {
            send(&inj.send(p));
        }
        fn apply_future_is_send(dp: &mut Datapath, d: &DesiredState) {
            send(&dp.apply(d));
        }
        let _ = (
            recv_future_is_send,
            inject_future_is_send,
            apply_future_is_send,
        );
        fn frame_source_is_send<T: Send>() {}
        frame_source_is_send::<FrameSource>();
    }

    #[test]
    fn mac_format() {
        assert_eq!(format_mac(&[2, 0xfa, 0, 0, 0, 1]), "02:fa:00:00:00:01");
    }
}
