//! [`Datapath`]: opening (hook selection, reading Flannel's device), the idempotent `apply`
//! reconciler, and cleanup (also stateless, after a crash).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use ipnet::Ipv4Net;
use rtnetlink::packet_route::link::InfoKind;
use tokio::io::unix::AsyncFd;

use crate::capture::{EncapShared, EncapTable, FrameSource};
use crate::error::DatapathError;
use crate::events::{self, ChangeEvents, Watch};
use crate::inject::Injector;
use crate::nl::{Fdb, Netlink, VxlanSpec, WantRoute};
use crate::sysctl::{self, StateFile};
use crate::{format_mac, probe, tun, DatapathConfig, DesiredState, HookChoice, HookMode, Relay};

/// Smallest per-site MTU we accept (IPv4 minimum reassembly size).
const MIN_MTU: u16 = 576;

/// What `flannel.1` looks like (re-read on every apply: Flannel may recreate it).
#[derive(Debug, Clone, PartialEq, Eq)]
struct FlannelInfo {
    index: u32,
    vni: u32,
    mac: [u8; 6],
    local: Option<Ipv4Addr>,
    underlay: Option<u32>,
    mtu: u32,
}

async fn read_flannel(nl: &Netlink, dev: &str) -> Result<FlannelInfo, DatapathError> {
    let link = nl
        .link_by_name(dev)
        .await?
        .ok_or_else(|| DatapathError::FlannelMissing {
            dev: dev.to_string(),
        })?;
    let unusable = |why: &str| DatapathError::FlannelUnusable {
        dev: dev.to_string(),
        why: why.to_string(),
    };
    if link.kind != Some(InfoKind::Vxlan) {
        return Err(unusable("not a VXLAN device"));
    }
    Ok(FlannelInfo {
        index: link.index,
        vni: link.vxlan_id().ok_or_else(|| unusable("no VNI"))?,
        mac: link.mac.ok_or_else(|| unusable("no MAC address"))?,
        local: link.vxlan_local(),
        underlay: link.vxlan_link(),
        mtu: link.mtu,
    })
}

/// What one [`Datapath::apply`] changed. All zero: everything was already as desired.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Hook device created, recreated or fixed (MTU, MAC, up), or a stale one removed.
    pub device: usize,
    /// Sysctls changed (rp_filter on Flannel's device).
    pub sysctls: usize,
    pub rules_added: usize,
    pub rules_removed: usize,
    pub routes_added: usize,
    pub routes_updated: usize,
    pub routes_removed: usize,
    pub neighbours_added: usize,
    pub neighbours_updated: usize,
    pub neighbours_removed: usize,
    pub fdb_added: usize,
    pub fdb_updated: usize,
    pub fdb_removed: usize,
}

impl ApplyReport {
    /// Number of changes.
    pub fn total(&self) -> usize {
        self.device
            + self.sysctls
            + self.rules_added
            + self.rules_removed
            + self.routes_added
            + self.routes_updated
            + self.routes_removed
            + self.neighbours_added
            + self.neighbours_updated
            + self.neighbours_removed
            + self.fdb_added
            + self.fdb_updated
            + self.fdb_removed
    }

    /// Whether anything had to change.
    pub fn changed(&self) -> bool {
        self.total() != 0
    }
}

impl fmt::Display for ApplyReport {
    /// `device 1, sysctls 1, rules +2/-0, routes +2/~0/-0, neighbours +2/~0/-0, fdb +2/~0/-0`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "device {}, sysctls {}, rules +{}/-{}, routes +{}/~{}/-{}, neighbours +{}/~{}/-{}, fdb +{}/~{}/-{}",
            self.device,
            self.sysctls,
            self.rules_added,
            self.rules_removed,
            self.routes_added,
            self.routes_updated,
            self.routes_removed,
            self.neighbours_added,
            self.neighbours_updated,
            self.neighbours_removed,
            self.fdb_added,
            self.fdb_updated,
            self.fdb_removed
        )
    }
}

/// Petrel's data plane in the current network namespace. See the crate docs.
///
/// Dropping it does not remove anything from the kernel (a crash must not take the data plane
/// down with it; [`cleanup_all`] exists for that), except that the portable hook's TUN device
/// disappears with its file descriptor (and with it our routes; the rules then fall through to
/// Flannel's main-table routes).
pub struct Datapath {
    cfg: DatapathConfig,
    mode: HookMode,
    localbypass_supported: bool,
    nl: Netlink,
    flannel: FlannelInfo,
    tun: Option<Arc<AsyncFd<File>>>,
    encap: Arc<EncapShared>,
    hook_index: Arc<AtomicU32>,
    state: StateFile,
}

impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("mode", &self.mode)
            .field("flannel", &self.flannel)
            .field("hook_index", &self.hook_index.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Opens the datapath in the calling thread's network namespace: reads Flannel's device
    /// (VNI, MAC, local address, underlay device, MTU), resolves [`HookChoice::Auto`] by probing
    /// the kernel (logged at info with the reason) and, for the portable hook, creates the TUN
    /// device. Nothing else is changed until [`Datapath::apply`].
    pub async fn open(cfg: DatapathConfig) -> Result<Datapath, DatapathError> {
        cfg.validate()?;
        let nl = Netlink::connect()?;
        let flannel = read_flannel(&nl, &cfg.flannel_dev).await?;
        let localbypass_supported = match cfg.hook {
            HookChoice::Portable => false,
            HookChoice::Auto | HookChoice::Fast => probe::detect_fast_support()?,
        };
        let (mode, why) = match (cfg.hook, localbypass_supported) {
            (HookChoice::Auto, true) => (
                HookMode::Fast,
                "auto: the kernel can turn off VXLAN local bypass (IFLA_VXLAN_LOCALBYPASS, Linux >= 6.6)",
            ),
            (HookChoice::Auto, false) => (
                HookMode::Portable,
                "auto: the kernel cannot turn off VXLAN local bypass (Linux < 6.6), so kernel VXLAN cannot hand frames to a local relay",
            ),
            (HookChoice::Fast, _) => (HookMode::Fast, "configured"),
            (HookChoice::Portable, _) => (HookMode::Portable, "configured"),
        };
        tracing::info!(
            hook = %mode,
            reason = why,
            flannel_dev = %cfg.flannel_dev,
            vni = flannel.vni,
            vtep_mac = %format_mac(&flannel.mac),
            mtu = flannel.mtu,
            "petrel datapath hook selected"
        );
        if mode == HookMode::Fast && !localbypass_supported {
            tracing::warn!(
                "fast hook configured but this kernel cannot turn off VXLAN local bypass: \
                 only a remote relay (Relay::Remote) will work"
            );
        }
        let state = StateFile::for_current_netns(&cfg.state_dir)?;
        let mut dp = Datapath {
            cfg,
            mode,
            localbypass_supported,
            nl,
            flannel,
            tun: None,
            encap: Arc::new(EncapShared::default()),
            hook_index: Arc::new(AtomicU32::new(0)),
            state,
        };
        if mode == HookMode::Portable {
            let mut report = ApplyReport::default();
            dp.ensure_tun(&mut report).await?;
            dp.publish_encap(&[]);
        }
        Ok(dp)
    }

    /// The hook in use.
    pub fn mode(&self) -> HookMode {
        self.mode
    }

    /// Flannel's VtepMAC on this node (`flannel.1`'s MAC, as of the last open/apply).
    pub fn vtep_mac(&self) -> [u8; 6] {
        self.flannel.mac
    }

    /// Flannel's VNI (as of the last open/apply).
    pub fn vni(&self) -> u32 {
        self.flannel.vni
    }

    /// The configuration this datapath was opened with.
    pub fn config(&self) -> &DatapathConfig {
        &self.cfg
    }

    /// Makes the kernel match `desired`: adds or fixes our objects, removes ours that are no
    /// longer desired, never touches Flannel's. Idempotent; the report says what changed.
    pub async fn apply(&mut self, desired: &DesiredState) -> Result<ApplyReport, DatapathError> {
        let mut rep = ApplyReport::default();
        self.flannel = read_flannel(&self.nl, &self.cfg.flannel_dev).await?;
        let peers = self.validate(desired)?;

        if sysctl::ensure_loose_rp_filter(&self.state, &self.cfg.flannel_dev)? {
            rep.sysctls += 1;
        }

        let hook = match self.mode {
            HookMode::Fast => {
                self.remove_link_of_kind(&self.cfg.tun_dev.clone(), InfoKind::Tun, &mut rep)
                    .await?;
                self.ensure_vxlan(desired.uses_local_relay(), &mut rep)
                    .await?
            }
            HookMode::Portable => {
                self.remove_link_of_kind(&self.cfg.vxlan_dev.clone(), InfoKind::Vxlan, &mut rep)
                    .await?;
                self.ensure_tun(&mut rep).await?
            }
        };
        self.hook_index.store(hook, Ordering::Relaxed);
        let cidrs: HashSet<Ipv4Net> = peers.iter().map(|p| p.0).collect();

        // 1. Rules that are ours but not wanted go first: traffic falls back to Flannel's
        //    routes before we take anything else away.
        let mut rules_present = HashSet::new();
        for r in self.nl.rules().await? {
            if r.priority != self.cfg.rule_pref || r.table != self.cfg.table {
                continue;
            }
            match r.dst {
                Some(d)
                    if cidrs.contains(&d) && !r.has_other_selectors && rules_present.insert(d) => {}
                _ => {
                    self.nl.del_rule(&r).await?;
                    rep.rules_removed += 1;
                }
            }
        }

        // 2. Fast hook: FDB and neighbours on petrel.1.
        if self.mode == HookMode::Fast {
            let relay_ip = |r: Relay| match r {
                Relay::Local => Ipv4Addr::LOCALHOST,
                Relay::Remote(ip) => ip,
            };
            let fdb: HashMap<[u8; 6], Ipv4Addr> = desired
                .peers
                .iter()
                .map(|p| (p.vtep_mac, relay_ip(p.via.unwrap_or(desired.relay))))
                .collect();
            self.sync_fdb(hook, &fdb, &mut rep).await?;
            self.sync_neighbours(hook, &peers, &mut rep).await?;
        }

        // 3. Routes in our table.
        self.sync_routes(hook, &peers, &mut rep).await?;

        // 4. Missing rules last: the path behind them is ready.
        for (cidr, _, _) in &peers {
            if !rules_present.contains(cidr) {
                self.nl
                    .add_rule(*cidr, self.cfg.table, self.cfg.rule_pref)
                    .await?;
                rep.rules_added += 1;
            }
        }

        let encap: Vec<(Ipv4Net, [u8; 6])> = peers.iter().map(|p| (p.0, p.1)).collect();
        self.publish_encap(&encap);
        if rep.changed() {
            tracing::debug!(%rep, "datapath applied");
        }
        Ok(rep)
    }

    /// Checks the desired state against Flannel's device; returns (cidr, mac, mtu) normalised.
    fn validate(
        &self,
        desired: &DesiredState,
    ) -> Result<Vec<(Ipv4Net, [u8; 6], u16)>, DatapathError> {
        let mut seen = HashSet::new();
        let mut out = Vec::with_capacity(desired.peers.len());
        for p in &desired.peers {
            let cidr = p.cidr.trunc();
            if !seen.insert(cidr) {
                return Err(DatapathError::Config(format!(
                    "peer CIDR {cidr} listed twice"
                )));
            }
            if p.mtu < MIN_MTU || u32::from(p.mtu) > self.flannel.mtu {
                return Err(DatapathError::Config(format!(
                    "peer {cidr}: mtu {} must be in {MIN_MTU}..={} ({}'s MTU)",
                    p.mtu, self.flannel.mtu, self.cfg.flannel_dev
                )));
            }
            if p.vtep_mac == self.flannel.mac {
                return Err(DatapathError::Config(format!(
                    "peer {cidr}: VtepMAC {} is this node's own",
                    format_mac(&p.vtep_mac)
                )));
            }
            if p.vtep_mac[0] & 1 == 1 {
                return Err(DatapathError::Config(format!(
                    "peer {cidr}: VtepMAC {} is a multicast address",
                    format_mac(&p.vtep_mac)
                )));
            }
            if let Some(other) = desired
                .peers
                .iter()
                .find(|o| o.vtep_mac == p.vtep_mac && o.via != p.via)
            {
                return Err(DatapathError::Config(format!(
                    "peer {cidr}: VtepMAC {} goes to {:?} but its CIDR {} to {:?} (one relay per VtepMAC)",
                    format_mac(&p.vtep_mac),
                    p.via,
                    other.cidr,
                    other.via
                )));
            }
            out.push((cidr, p.vtep_mac, p.mtu));
        }
        Ok(out)
    }

    async fn remove_link_of_kind(
        &self,
        name: &str,
        kind: InfoKind,
        rep: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        if let Some(l) = self.nl.link_by_name(name).await? {
            if l.kind == Some(kind) && self.nl.del_link(l.index, name).await? {
                tracing::info!(
                    dev = name,
                    "removed {name} left over from the other hook mode"
                );
                rep.device += 1;
            }
        }
        Ok(())
    }

    async fn ensure_vxlan(
        &mut self,
        local_relay: bool,
        rep: &mut ApplyReport,
    ) -> Result<u32, DatapathError> {
        let name = self.cfg.vxlan_dev.clone();
        if local_relay && !self.localbypass_supported {
            return Err(DatapathError::LocalBypassUnsupported { dev: name });
        }
        let spec = VxlanSpec {
            name: name.clone(),
            vni: self.flannel.vni,
            port: self.cfg.vxlan_port,
            local: self.flannel.local,
            underlay: self.flannel.underlay,
            mac: self.flannel.mac,
            mtu: self.flannel.mtu,
            localbypass: self.localbypass_supported.then_some(false),
        };
        let existing = self.nl.link_by_name(&name).await?;
        let link = match existing {
            Some(l) if spec.matches_immutable(&l) => {
                if l.mtu != spec.mtu || l.mac != Some(spec.mac) || !l.up {
                    self.nl
                        .set_link(l.index, &name, Some(spec.mtu), Some(spec.mac), true)
                        .await?;
                    rep.device += 1;
                }
                if self.ensure_software_checksum(&name)? {
                    rep.device += 1;
                }
                return Ok(l.index);
            }
            Some(l) => {
                tracing::info!(dev = %name, "recreating {name}: its VXLAN attributes differ");
                self.nl.del_link(l.index, &name).await?;
                self.create_vxlan(&spec).await?
            }
            None => self.create_vxlan(&spec).await?,
        };
        self.ensure_software_checksum(&name)?;
        rep.device += 1;
        Ok(link)
    }

    /// See `ethtool.rs`: without this, TCP through a userspace relay carries unfinished inner
    /// checksums.
    fn ensure_software_checksum(&self, dev: &str) -> Result<bool, DatapathError> {
        crate::ethtool::disable_tx_checksum(dev)
            .map_err(|e| DatapathError::netlink("disable tx checksum offload", dev.to_string(), e))
    }

    async fn create_vxlan(&self, spec: &VxlanSpec) -> Result<u32, DatapathError> {
        self.nl.add_vxlan(spec).await?;
        let link = self.nl.link_by_name(&spec.name).await?.ok_or_else(|| {
            DatapathError::netlink(
                "create vxlan",
                spec.name.clone(),
                std::io::Error::other("created but not found"),
            )
        })?;
        disable_ipv6(&spec.name);
        self.nl
            .set_link(link.index, &spec.name, None, None, true)
            .await?;
        tracing::info!(
            dev = %spec.name,
            vni = spec.vni,
            dstport = spec.port,
            local = ?spec.local,
            mac = %format_mac(&spec.mac),
            mtu = spec.mtu,
            localbypass = ?spec.localbypass,
            "created VXLAN hook device"
        );
        Ok(link.index)
    }

    /// Creates the TUN device if we do not hold it (or someone deleted it), sets MTU and UP.
    async fn ensure_tun(&mut self, rep: &mut ApplyReport) -> Result<u32, DatapathError> {
        let name = self.cfg.tun_dev.clone();
        let tun_err = |source| DatapathError::Tun {
            dev: name.clone(),
            source,
        };
        let mut link = self.nl.link_by_name(&name).await?;
        if let Some(l) = &link {
            if l.kind != Some(InfoKind::Tun) {
                tracing::info!(dev = %name, "removing {name}: not a TUN device");
                self.nl.del_link(l.index, &name).await?;
                link = None;
            }
        }
        if link.is_none() || self.tun.is_none() {
            // Not there, or there but not ours (left by a previous run that still holds it:
            // TUNSETIFF then fails with EBUSY, which is the right answer).
            let fd = tun::create_async(&name).map_err(tun_err)?;
            self.tun = Some(Arc::new(fd));
            link = self.nl.link_by_name(&name).await?;
            disable_ipv6(&name);
            rep.device += 1;
            tracing::info!(dev = %name, "created TUN hook device");
        }
        let l = link.ok_or_else(|| tun_err(std::io::Error::other("created but not found")))?;
        if l.mtu != self.flannel.mtu || !l.up {
            self.nl
                .set_link(l.index, &name, Some(self.flannel.mtu), None, true)
                .await?;
            rep.device += 1;
        }
        Ok(l.index)
    }

    fn publish_encap(&self, peers: &[(Ipv4Net, [u8; 6])]) {
        self.encap.publish(
            EncapTable::new(self.flannel.vni, self.flannel.mac, peers).with_tun(self.tun.clone()),
        );
    }

    /// One FDB entry per peer VtepMAC, toward its relay's address (`want`).
    async fn sync_fdb(
        &self,
        hook: u32,
        want: &HashMap<[u8; 6], Ipv4Addr>,
        rep: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let dev = &self.cfg.vxlan_dev;
        let good = |f: &Fdb, relay_ip: Ipv4Addr| {
            f.dst == Some(relay_ip)
                && f.port.unwrap_or(self.cfg.vxlan_port) == self.cfg.relay_port
                && f.vni.is_none_or(|v| v == self.flannel.vni)
                && f.via_ifindex.is_none()
                && f.permanent
        };
        let mut by_mac: HashMap<[u8; 6], Vec<Fdb>> = HashMap::new();
        for f in self.nl.fdb(hook).await? {
            if let Some(mac) = f.mac {
                by_mac.entry(mac).or_default().push(f);
            }
        }
        for (mac, entries) in &by_mac {
            let what = |f: &Fdb| format!("fdb {} dst {:?} dev {dev}", format_mac(mac), f.dst);
            let Some(&relay_ip) = want.get(mac) else {
                for f in entries {
                    self.nl.del_neighbour(&f.msg, what(f)).await?;
                }
                rep.fdb_removed += 1;
                continue;
            };
            match entries.iter().position(|f| good(f, relay_ip)) {
                Some(keep) => {
                    let mut changed = false;
                    for (i, f) in entries.iter().enumerate() {
                        if i != keep {
                            self.nl.del_neighbour(&f.msg, what(f)).await?;
                            changed = true;
                        }
                    }
                    if changed {
                        rep.fdb_updated += 1;
                    }
                }
                None => {
                    for f in entries {
                        self.nl.del_neighbour(&f.msg, what(f)).await?;
                    }
                    self.nl
                        .replace_fdb(hook, dev, *mac, relay_ip, self.cfg.relay_port)
                        .await?;
                    rep.fdb_updated += 1;
                }
            }
        }
        for (mac, &relay_ip) in want {
            if !by_mac.contains_key(mac) {
                self.nl
                    .replace_fdb(hook, dev, *mac, relay_ip, self.cfg.relay_port)
                    .await?;
                rep.fdb_added += 1;
            }
        }
        Ok(())
    }

    async fn sync_neighbours(
        &self,
        hook: u32,
        peers: &[(Ipv4Net, [u8; 6], u16)],
        rep: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let dev = &self.cfg.vxlan_dev;
        let want: HashMap<Ipv4Addr, [u8; 6]> = peers.iter().map(|p| (p.0.network(), p.1)).collect();
        let mut ok = HashSet::new();
        let mut seen = HashSet::new();
        for n in self.nl.neighbours(hook).await? {
            let Some(ip) = n.ip else { continue };
            seen.insert(ip);
            match want.get(&ip) {
                Some(mac) if n.permanent && n.mac == Some(*mac) => {
                    ok.insert(ip);
                }
                Some(_) => {}
                None if n.permanent => {
                    self.nl
                        .del_neighbour(&n.msg, format!("{ip} dev {dev}"))
                        .await?;
                    rep.neighbours_removed += 1;
                }
                None => {}
            }
        }
        for (ip, mac) in &want {
            if ok.contains(ip) {
                continue;
            }
            self.nl.replace_neighbour(hook, dev, *ip, *mac).await?;
            if seen.contains(ip) {
                rep.neighbours_updated += 1;
            } else {
                rep.neighbours_added += 1;
            }
        }
        Ok(())
    }

    async fn sync_routes(
        &self,
        hook: u32,
        peers: &[(Ipv4Net, [u8; 6], u16)],
        rep: &mut ApplyReport,
    ) -> Result<(), DatapathError> {
        let (dev, fast) = match self.mode {
            HookMode::Fast => (self.cfg.vxlan_dev.clone(), true),
            HookMode::Portable => (self.cfg.tun_dev.clone(), false),
        };
        let want: HashMap<Ipv4Net, WantRoute> = peers
            .iter()
            .map(|(cidr, _, mtu)| {
                (
                    *cidr,
                    WantRoute {
                        table: self.cfg.table,
                        dst: *cidr,
                        oif: hook,
                        dev: dev.clone(),
                        via: fast.then(|| cidr.network()),
                        mtu: *mtu,
                    },
                )
            })
            .collect();
        let existing = self.nl.routes(self.cfg.table).await?;
        let mut satisfied = HashSet::new();
        let mut to_replace = HashSet::new();
        let mut stale = Vec::new();
        for r in &existing {
            match r.dst.and_then(|d| want.get(&d).map(|w| (d, w))) {
                Some((d, w)) if r.satisfies(w) && !satisfied.contains(&d) => {
                    satisfied.insert(d);
                }
                // Our key (tos 0, priority 0): `replace` rewrites it in place, no gap.
                Some((d, _)) if r.tos == 0 && r.priority == 0 => {
                    to_replace.insert(d);
                }
                _ => stale.push(r),
            }
        }
        for (d, w) in &want {
            if satisfied.contains(d) {
                continue;
            }
            self.nl.replace_route(w).await?;
            if to_replace.contains(d) {
                rep.routes_updated += 1;
            } else {
                rep.routes_added += 1;
            }
        }
        for r in stale {
            self.nl.del_route(r).await?;
            match r.dst {
                Some(d) if want.contains_key(&d) => rep.routes_updated += 1,
                _ => rep.routes_removed += 1,
            }
        }
        Ok(())
    }

    /// Removes everything we added: our rules (pref + table), every route of our table, our
    /// devices (with their neighbours and FDB), and restores the sysctls we changed.
    pub async fn cleanup(&mut self) -> Result<(), DatapathError> {
        self.tun = None;
        self.publish_encap(&[]);
        self.hook_index.store(0, Ordering::Relaxed);
        remove_all(&self.nl, &self.cfg, &self.state).await
    }

    /// Frames the kernel sends toward the relay, as VXLAN payloads. Fast hook: binds
    /// `127.0.0.1:<relay_port>` (only meaningful with [`Relay::Local`]). Portable hook: reads
    /// the TUN device and encapsulates (with [`Relay::Remote`] the caller forwards them).
    /// Must be called on a thread in the datapath's network namespace.
    pub fn frame_source(&self) -> Result<FrameSource, DatapathError> {
        match self.mode {
            HookMode::Fast => FrameSource::udp(self.cfg.relay_port),
            HookMode::Portable => {
                if self.tun.is_none() {
                    return Err(DatapathError::Tun {
                        dev: self.cfg.tun_dev.clone(),
                        source: std::io::Error::new(
                            std::io::ErrorKind::NotConnected,
                            "the TUN device was removed by cleanup",
                        ),
                    });
                }
                Ok(FrameSource::tun(Arc::clone(&self.encap)))
            }
        }
    }

    /// Sends VXLAN payloads from the hub to this node's `flannel.1` (UDP
    /// `127.0.0.1:<flannel_port>`). Must be called on a thread in the datapath's namespace.
    pub fn injector(&self) -> Result<Injector, DatapathError> {
        Injector::new(self.cfg.flannel_port, self.flannel.vni)
    }

    /// Notifications of changes to links (Flannel's and ours), our table's routes, IPv4 rules,
    /// and neighbours / FDB entries on our device, from rtnetlink multicast groups. Await
    /// [`ChangeEvents::changed`] and re-apply; bursts are coalesced. Needs a tokio runtime and
    /// must be called on a thread in the datapath's network namespace.
    pub fn change_events(&self) -> Result<ChangeEvents, DatapathError> {
        events::subscribe(Watch {
            names: vec![
                self.cfg.flannel_dev.clone(),
                self.cfg.vxlan_dev.clone(),
                self.cfg.tun_dev.clone(),
            ],
            table: self.cfg.table,
            hook_index: Arc::clone(&self.hook_index),
        })
    }
}

/// Best effort: no IPv6 addresses (and router solicitations) on our hook device. The sysctl
/// lives and dies with the device, so nothing to restore.
fn disable_ipv6(dev: &str) {
    let path = std::path::PathBuf::from(format!("/proc/sys/net/ipv6/conf/{dev}/disable_ipv6"));
    if let Err(e) = sysctl::write(&path, 1) {
        tracing::debug!(error = %e, "could not disable IPv6 on {dev}");
    }
}

async fn remove_all(
    nl: &Netlink,
    cfg: &DatapathConfig,
    state: &StateFile,
) -> Result<(), DatapathError> {
    let mut removed = 0usize;
    for r in nl.rules().await? {
        if r.priority == cfg.rule_pref && r.table == cfg.table {
            nl.del_rule(&r).await?;
            removed += 1;
        }
    }
    for r in nl.routes(cfg.table).await? {
        nl.del_route(&r).await?;
        removed += 1;
    }
    for (name, kind) in [
        (&cfg.vxlan_dev, InfoKind::Vxlan),
        (&cfg.tun_dev, InfoKind::Tun),
    ] {
        if let Some(l) = nl.link_by_name(name).await? {
            if l.kind == Some(kind) && nl.del_link(l.index, name).await? {
                removed += 1;
            }
        }
    }
    sysctl::restore(state)?;
    tracing::info!(removed, "petrel datapath cleaned up");
    Ok(())
}

/// Stateless cleanup for `petrel-gateway cleanup` / `petrel-edge-agent cleanup` after a crash:
/// removes the rules with our preference and table, every route of our table, our VXLAN and TUN
/// devices, and restores the sysctls recorded in the state file, in the calling thread's network
/// namespace. Needs a tokio runtime.
pub async fn cleanup_all(cfg: &DatapathConfig) -> Result<(), DatapathError> {
    cfg.validate()?;
    let nl = Netlink::connect()?;
    let state = StateFile::for_current_netns(&cfg.state_dir)?;
    remove_all(&nl, cfg, &state).await
}
