//! WireGuard between this node and remote clusters' nodes (`--encryption wireguard`).
//!
//! WireGuard replaces the tunnel for every remote node that publishes a key:
//! one device, `podmesh-wg`, one peer per remote node (endpoint: its
//! address and `--wireguard-port`; allowed IPs: its Pod CIDRs), and each of
//! its Pod CIDRs routed into the device (protocol 80, MTU the underlay's minus
//! 60 bytes over IPv4, 80 over IPv6). A remote node without a key goes to
//! the configured mode's tunnel, in clear, and is listed as such; with
//! `--encryption-strict` it is refused (`encryption-required`). Traffic
//! inside the cluster never comes here.
//!
//! The device is the kernel's where it has WireGuard ([`genl`]), else a TUN
//! served by the `podmesh-wireguard` process, configured through its UAPI
//! socket ([`uapi`]). That process outlives the agent: a restarted agent
//! adopts it and changes only what differs, so a peer's session (and the
//! traffic on it) survives the restart; the agent starts it only when no
//! process serves the socket. The key pair is kept in a file ([`keys`]).
mod bringup;
pub mod genl;
pub mod keys;
pub mod read;
pub mod uapi;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{SystemTime, UNIX_EPOCH},
};

use ipnet::IpNet;
use tokio::sync::watch;

use self::{
    bringup::bring_up,
    keys::KeyPair,
    uapi::{DeviceState, PeerChange},
};
use super::{
    base::{DatapathError, KernelConfig, ROUTE_PROTOCOL, Refusal, RefusalReason, RemoteRoute},
    device,
    error::netlink_err,
    nl::Netlink,
    owners::Owners,
    rtnl::{self, IFF_UP, RouteTarget},
};
use crate::{
    config::WireguardBackend,
    model::format_wireguard_key,
    status::{WireguardPeerStatus, WireguardStatus},
};

/// The WireGuard device podmesh owns.
pub const WG_DEVICE: &str = "podmesh-wg";
/// WireGuard's overhead over an IPv4 underlay: IPv4 20, UDP 8, WireGuard 32.
pub const OVERHEAD_V4: u32 = 60;
/// WireGuard's overhead over an IPv6 underlay: IPv6 40, UDP 8, WireGuard 32.
pub const OVERHEAD_V6: u32 = 80;

/// The WireGuard settings of the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgConfig {
    /// UDP port (every node of the mesh uses the same).
    pub port: u16,
    /// Refuse remote nodes without a key instead of reaching them in clear.
    pub strict: bool,
    /// Where the private key is kept.
    pub key_dir: PathBuf,
    /// Where the userspace process's UAPI socket is.
    pub run_dir: PathBuf,
    /// Kernel, userspace, or whichever this kernel allows.
    pub backend: WireguardBackend,
    /// The program started when no process serves the socket (`None`: wait for one).
    pub userspace_binary: Option<PathBuf>,
}

impl WgConfig {
    /// The UAPI socket of the userspace process.
    pub fn socket(&self) -> PathBuf {
        self.run_dir.join(format!("{WG_DEVICE}.sock"))
    }
}

/// `podmesh-wireguard` next to the running executable, else the name (looked up on PATH).
pub fn default_userspace_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| Some(e.parent()?.join("podmesh-wireguard")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("podmesh-wireguard"))
}

/// How the device is configured.
#[derive(Clone, Debug)]
enum Control {
    /// The userspace process, through its UAPI socket.
    Uapi(PathBuf),
    /// Kernel WireGuard, over generic netlink in this namespace.
    Kernel(Option<PathBuf>),
}

impl Control {
    fn get(&self) -> Result<DeviceState, DatapathError> {
        match self {
            Self::Uapi(sock) => read::uapi(sock),
            Self::Kernel(netns) => genl::get(netns.as_deref(), WG_DEVICE),
        }
    }

    fn set(
        &self,
        private_key: Option<&[u8; 32]>,
        port: Option<u16>,
        changes: &[PeerChange],
    ) -> Result<(), DatapathError> {
        match self {
            Self::Uapi(sock) => uapi::set(sock, private_key, port, changes).map_err(|e| {
                DatapathError::io(
                    format!("configuring WireGuard through {}", sock.display()),
                    e,
                )
            }),
            Self::Kernel(netns) => {
                genl::set(netns.as_deref(), WG_DEVICE, private_key, port, changes)
            }
        }
    }

    fn backend(&self) -> &'static str {
        match self {
            Self::Uapi(_) => "userspace",
            Self::Kernel(_) => "kernel",
        }
    }
}

/// What the datapath shares with the status, the publisher and key rotation.
#[derive(Debug)]
struct Shared {
    pair: KeyPair,
    /// Remote nodes by key, for the status.
    names: BTreeMap<[u8; 32], (String, String)>,
    /// Remote nodes reached in clear (no key, not strict), by Pod CIDR.
    clear: BTreeMap<IpNet, (String, String)>,
}

/// A handle on the WireGuard device for the status and key rotation.
#[derive(Clone, Debug)]
pub struct WgHandle {
    shared: Arc<Mutex<Shared>>,
    key_tx: Arc<watch::Sender<Option<String>>>,
    control: Control,
    key_dir: PathBuf,
    port: u16,
    strict: bool,
}

impl WgHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().expect("wireguard lock")
    }

    /// This node's public key (base64) now and after every rotation, for the node record.
    pub fn public_key(&self) -> watch::Receiver<Option<String>> {
        self.key_tx.subscribe()
    }

    /// Replaces this node's key pair: a new key file, the device's private
    /// key, the published public key. The peers' sessions carry on until the
    /// remote nodes read the new key from the record and handshake again.
    pub fn rotate(&self) -> Result<String, DatapathError> {
        let pair =
            KeyPair::generate().map_err(|e| DatapathError::io("generating a WireGuard key", e))?;
        keys::store(&self.key_dir, &pair).map_err(|e| {
            DatapathError::io(
                format!(
                    "writing the new WireGuard key into {}",
                    self.key_dir.display()
                ),
                e,
            )
        })?;
        self.control.set(Some(&pair.private), None, &[])?;
        let public = pair.public_base64();
        self.lock().pair = pair;
        self.key_tx.send_replace(Some(public.clone()));
        Ok(public)
    }

    /// The device's peers with their handshake age and byte counts, and the
    /// remote nodes reached in clear.
    pub fn status(&self) -> WireguardStatus {
        let (public, names, clear) = {
            let g = self.lock();
            (
                g.pair.public_base64(),
                g.names.clone(),
                g.clear.values().cloned().collect::<BTreeSet<_>>(),
            )
        };
        let mut s = WireguardStatus {
            backend: self.control.backend().to_string(),
            public_key: public,
            port: self.port,
            strict: self.strict,
            unencrypted: clear.into_iter().map(|(c, n)| format!("{c}/{n}")).collect(),
            ..WireguardStatus::default()
        };
        match self.control.get() {
            Ok(d) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                for p in d.peers {
                    let (cluster, node) = names.get(&p.public_key).cloned().unwrap_or_default();
                    s.peers.push(WireguardPeerStatus {
                        cluster,
                        node,
                        public_key: format_wireguard_key(&p.public_key),
                        endpoint: p.endpoint.map(|e| e.to_string()),
                        allowed_ips: p.allowed_ips.into_iter().collect(),
                        latest_handshake_age: (p.last_handshake_sec > 0)
                            .then(|| now.saturating_sub(p.last_handshake_sec)),
                        rx_bytes: p.rx_bytes,
                        tx_bytes: p.tx_bytes,
                    });
                }
            }
            Err(e) => s.error = Some(e.to_string()),
        }
        s
    }
}

/// The routes of one upsert, split by where they go.
#[derive(Debug, Default)]
pub struct Split {
    /// Through WireGuard.
    pub encrypted: Vec<RemoteRoute>,
    /// Through the configured mode, in clear.
    pub clear: Vec<RemoteRoute>,
    /// Not at all.
    pub refused: Vec<Refusal>,
}

/// The WireGuard part of the kernel datapath.
pub struct Wireguard {
    cfg: WgConfig,
    netns: Option<PathBuf>,
    handle: WgHandle,
    nl: Netlink,
    ifindex: u32,
    mtu: u32,
    /// The Pod CIDRs routed into the device.
    routes: BTreeMap<IpNet, RemoteRoute>,
    /// Names of the routes, pinned, for a restarted agent.
    owners: Option<Owners>,
}

impl std::fmt::Debug for Wireguard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Wireguard")
            .field("backend", &self.handle.control.backend())
            .field("ifindex", &self.ifindex)
            .field("routes", &self.routes.len())
            .finish_non_exhaustive()
    }
}

impl Wireguard {
    /// Reads (or creates) the key pair, brings up or adopts the device and
    /// sets its key and port when they differ. Peers and routes already there
    /// stay until the first sync says otherwise.
    pub fn new(cfg: &WgConfig, kc: &KernelConfig) -> Result<Self, DatapathError> {
        let (pair, created) = keys::load_or_generate(&cfg.key_dir).map_err(|e| {
            DatapathError::io(
                format!(
                    "reading or creating the WireGuard key under {} (--wireguard-key-dir)",
                    cfg.key_dir.display()
                ),
                e,
            )
        })?;
        if created {
            tracing::info!(public_key = %pair.public_base64(), dir = %cfg.key_dir.display(), "generated this node's WireGuard key pair");
        }
        let mut nl = Netlink::open(kc.netns.as_deref())
            .map_err(|e| DatapathError::netlink("opening netlink", e))?;
        let control = bring_up(cfg, kc, &mut nl)?;
        let link = rtnl::link_by_name(&mut nl, WG_DEVICE)
            .map_err(netlink_err("listing links"))?
            .ok_or_else(|| {
                DatapathError::Unavailable(format!(
                    "{WG_DEVICE} is missing although WireGuard answers ({})",
                    control.backend()
                ))
            })?;
        let underlay = device::underlay_mtu(&mut nl, kc.underlay_mtu, kc.node_ip)?;
        let overhead = match kc.node_ip {
            Some(IpAddr::V6(_)) => OVERHEAD_V6,
            _ => OVERHEAD_V4,
        };
        let mtu = underlay.saturating_sub(overhead);
        rtnl::set_link(&mut nl, link.index, IFF_UP, IFF_UP, Some(mtu))
            .map_err(netlink_err("setting podmesh-wg up"))?;
        let state = control.get()?;
        let key = (state.private_key != Some(pair.private)).then_some(&pair.private);
        let port = (state.listen_port != cfg.port).then_some(cfg.port);
        if key.is_some() || port.is_some() {
            control.set(key, port, &[])?;
        }
        tracing::info!(
            backend = control.backend(),
            peers = state.peers.len(),
            mtu,
            port = cfg.port,
            public_key = %pair.public_base64(),
            "WireGuard is up{}",
            if state.peers.is_empty() { "" } else { "; adopted its peers" }
        );
        let owners = match Owners::open(&kc.pin_dir) {
            Ok(o) => Some(o),
            Err(e) => {
                tracing::warn!(error = %e, "the owners map cannot be opened; a restarted agent re-learns the WireGuard routes' owners from the remote clusters");
                None
            }
        };
        let public = pair.public_base64();
        let (key_tx, _) = watch::channel(Some(public));
        Ok(Self {
            cfg: cfg.clone(),
            netns: kc.netns.clone(),
            handle: WgHandle {
                shared: Arc::new(Mutex::new(Shared {
                    pair,
                    names: BTreeMap::new(),
                    clear: BTreeMap::new(),
                })),
                key_tx: Arc::new(key_tx),
                control,
                key_dir: cfg.key_dir.clone(),
                port: cfg.port,
                strict: cfg.strict,
            },
            nl,
            ifindex: link.index,
            mtu,
            routes: BTreeMap::new(),
            owners,
        })
    }

    /// A layer on no device, for tests of its decisions.
    #[cfg(test)]
    fn detached(cfg: WgConfig, pair: KeyPair) -> Self {
        let (key_tx, _) = watch::channel(Some(pair.public_base64()));
        Self {
            netns: None,
            handle: WgHandle {
                shared: Arc::new(Mutex::new(Shared {
                    pair,
                    names: BTreeMap::new(),
                    clear: BTreeMap::new(),
                })),
                key_tx: Arc::new(key_tx),
                control: Control::Uapi(PathBuf::from("/nonexistent/podmesh-wg.sock")),
                key_dir: cfg.key_dir.clone(),
                port: cfg.port,
                strict: cfg.strict,
            },
            cfg,
            nl: Netlink::open(None).expect("a netlink socket"),
            ifindex: 0,
            mtu: 1440,
            routes: BTreeMap::new(),
            owners: None,
        }
    }

    /// The handle for the status, the publisher and rotation.
    pub fn handle(&self) -> WgHandle {
        self.handle.clone()
    }

    /// Splits `routes`: those of nodes with a key go through WireGuard; the
    /// others in clear, or (strict) nowhere; a key that another node (or
    /// this one) already holds is refused for the newcomer.
    pub fn split(&mut self, routes: &[RemoteRoute]) -> Split {
        let batch: BTreeMap<IpNet, &RemoteRoute> = routes.iter().map(|r| (r.cidr, r)).collect();
        let own = self.handle.lock().pair.public;
        // The nodes that hold a key now keep it, unless this batch moves
        // their entry to another key (a rotation) or another node.
        let mut holders: BTreeMap<[u8; 32], (String, String)> = BTreeMap::new();
        for r in self.routes.values() {
            let Some(k) = r.wireguard_key else { continue };
            let released = batch.get(&r.cidr).is_some_and(|n| {
                n.wireguard_key != Some(k) || n.cluster != r.cluster || n.node != r.node
            });
            if !released {
                holders
                    .entry(k)
                    .or_insert_with(|| (r.cluster.clone(), r.node.clone()));
            }
        }
        let mut out = Split::default();
        for r in routes {
            match r.wireguard_key {
                None if self.cfg.strict => out
                    .refused
                    .push(r.refusal(RefusalReason::EncryptionRequired)),
                None => out.clear.push(r.clone()),
                Some(k) if k == own => {
                    out.refused
                        .push(r.refusal(RefusalReason::WireguardKeyDuplicate {
                            owner: "this node".to_string(),
                        }))
                }
                Some(k) => {
                    let me = (r.cluster.clone(), r.node.clone());
                    let holder = holders.entry(k).or_insert_with(|| me.clone());
                    if *holder == me {
                        out.encrypted.push(r.clone());
                    } else {
                        out.refused
                            .push(r.refusal(RefusalReason::WireguardKeyDuplicate {
                                owner: format!("node {}/{}", holder.0, holder.1),
                            }));
                    }
                }
            }
        }
        let mut g = self.handle.lock();
        for r in routes {
            g.clear.remove(&r.cidr);
        }
        for r in &out.clear {
            g.clear.insert(r.cidr, (r.cluster.clone(), r.node.clone()));
        }
        out
    }

    /// Routes `routes` (nodes with a key) into the device and makes the
    /// peers follow.
    pub fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        if routes.is_empty() {
            return Ok(());
        }
        for r in routes {
            self.routes.insert(r.cidr, r.clone());
        }
        self.sync_peers()?;
        let msgs = routes
            .iter()
            .map(|r| {
                rtnl::route_replace(
                    r.cidr,
                    RouteTarget::Dev(self.ifindex),
                    ROUTE_PROTOCOL,
                    Some(self.mtu),
                )
            })
            .collect::<Vec<_>>();
        let failures = self
            .nl
            .batch(msgs)
            .map_err(netlink_err("installing routes into podmesh-wg"))?;
        if let Some(o) = &mut self.owners
            && let Some(e) = o.set_all(routes.iter())
        {
            tracing::debug!(error = %e, "recording the owners of WireGuard routes");
        }
        if let Some((i, errno)) = failures.first() {
            return Err(DatapathError::op(
                "upsert route",
                routes[*i].cidr,
                *errno,
                failures.len() - 1,
            ));
        }
        Ok(())
    }

    /// These CIDRs no longer go through WireGuard: they went to the clear
    /// path (`moved`: its upsert replaced the route and recorded the owner)
    /// or are gone (their routes deleted by the caller).
    pub fn forget(&mut self, cidrs: &[IpNet], moved: bool) -> Result<(), DatapathError> {
        let mut changed = false;
        for c in cidrs {
            changed |= self.routes.remove(c).is_some();
            if !moved && let Some(o) = &mut self.owners {
                o.remove(c);
            }
        }
        if !moved {
            let mut g = self.handle.lock();
            for c in cidrs {
                g.clear.remove(c);
            }
        }
        if changed {
            self.sync_peers()?;
        }
        Ok(())
    }

    /// Refused CIDRs: off WireGuard (the caller deletes their routes,
    /// whichever device they use).
    pub fn withdraw(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        {
            let mut g = self.handle.lock();
            for c in cidrs {
                g.clear.remove(c);
            }
        }
        self.forget(cidrs, false)
    }

    /// Only `keep` stays (a full resync); the peers follow.
    pub fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<(), DatapathError> {
        self.routes.retain(|c, _| keep.contains(c));
        if let Some(o) = &mut self.owners {
            o.retain(|c| keep.contains(c));
        }
        self.handle.lock().clear.retain(|c, _| keep.contains(c));
        self.sync_peers()
    }

    /// The routes into the device, with the peers' keys and addresses.
    pub fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        let state = self.handle.control.get()?;
        let mut by_cidr: BTreeMap<IpNet, ([u8; 32], Option<SocketAddr>)> = BTreeMap::new();
        for p in &state.peers {
            for a in &p.allowed_ips {
                by_cidr.insert(*a, (p.public_key, p.endpoint.map(read::normalize_endpoint)));
            }
        }
        let mut out = Vec::new();
        for r in rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?
        {
            if r.oif != Some(self.ifindex) {
                continue;
            }
            let Some((key, Some(endpoint))) = by_cidr.get(&r.dst).copied() else {
                continue;
            };
            let (cluster, node) = self
                .owners
                .as_ref()
                .and_then(|o| o.get(&r.dst).cloned())
                .unwrap_or_default();
            let route = RemoteRoute {
                cidr: r.dst,
                cluster,
                node,
                node_addr: endpoint.ip(),
                vtep_mac: None,
                wireguard_key: Some(key),
            };
            self.routes.insert(r.dst, route.clone());
            out.push(route);
        }
        self.refresh_names();
        Ok(out)
    }

    /// Brings the device back when it is gone (the userspace process
    /// died, someone deleted it); returns what was repaired.
    pub fn repair(&mut self) -> Result<Option<String>, DatapathError> {
        let link =
            rtnl::link_by_name(&mut self.nl, WG_DEVICE).map_err(netlink_err("listing links"))?;
        let alive = link.as_ref().is_some_and(|l| l.index == self.ifindex)
            && self.handle.control.get().is_ok();
        if alive {
            return Ok(None);
        }
        let kc = KernelConfig {
            netns: self.netns.clone(),
            ..KernelConfig::new(crate::config::DatapathMode::Direct)
        };
        let control = bring_up(&self.cfg, &kc, &mut self.nl)?;
        let link = rtnl::link_by_name(&mut self.nl, WG_DEVICE)
            .map_err(netlink_err("listing links"))?
            .ok_or_else(|| DatapathError::Unavailable(format!("{WG_DEVICE} did not come back")))?;
        self.ifindex = link.index;
        rtnl::set_link(&mut self.nl, link.index, IFF_UP, IFF_UP, Some(self.mtu))
            .map_err(netlink_err("setting podmesh-wg up"))?;
        let private = self.handle.lock().pair.private;
        control.set(Some(&private), Some(self.cfg.port), &[])?;
        self.handle.control = control;
        // The resync's upserts put the peers and routes back.
        self.routes.clear();
        Ok(Some(format!("{WG_DEVICE} was gone")))
    }

    fn refresh_names(&self) {
        let names = self
            .routes
            .values()
            .filter_map(|r| Some((r.wireguard_key?, (r.cluster.clone(), r.node.clone()))))
            .collect();
        self.handle.lock().names = names;
    }

    /// Makes the device's peers equal to what the routes say, changing only
    /// the peers that differ (a changed peer loses its session).
    fn sync_peers(&mut self) -> Result<(), DatapathError> {
        let mut want: BTreeMap<[u8; 32], (SocketAddr, BTreeSet<IpNet>)> = BTreeMap::new();
        for r in self.routes.values() {
            let Some(k) = r.wireguard_key else { continue };
            let e = want
                .entry(k)
                .or_insert_with(|| (SocketAddr::new(r.node_addr, self.cfg.port), BTreeSet::new()));
            e.1.insert(r.cidr);
        }
        let state = self.handle.control.get()?;
        let mut changes = Vec::new();
        let mut have = BTreeSet::new();
        for p in &state.peers {
            have.insert(p.public_key);
            match want.get(&p.public_key) {
                None => changes.push(PeerChange::Remove(p.public_key)),
                Some((endpoint, allowed)) => {
                    if p.endpoint.map(read::normalize_endpoint) != Some(*endpoint)
                        || p.allowed_ips != *allowed
                    {
                        changes.push(PeerChange::Upsert {
                            public_key: p.public_key,
                            endpoint: *endpoint,
                            allowed_ips: allowed.clone(),
                        });
                    }
                }
            }
        }
        for (k, (endpoint, allowed)) in &want {
            if !have.contains(k) {
                changes.push(PeerChange::Upsert {
                    public_key: *k,
                    endpoint: *endpoint,
                    allowed_ips: allowed.clone(),
                });
            }
        }
        self.refresh_names();
        if changes.is_empty() {
            return Ok(());
        }
        // Removals first: an allowed IP moving between two peers (a node
        // replaced under another key) must leave the old one before the new
        // one takes it.
        changes.sort_by_key(|c| !matches!(c, PeerChange::Remove(_)));
        tracing::debug!(changes = changes.len(), "updating WireGuard peers");
        self.handle.control.set(None, None, &changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(cidr: &str, node: &str, key: Option<u8>) -> RemoteRoute {
        RemoteRoute {
            cidr: cidr.parse().unwrap(),
            cluster: "west".into(),
            node: node.into(),
            node_addr: "172.31.2.1".parse().unwrap(),
            vtep_mac: None,
            wireguard_key: key.map(|k| [k; 32]),
        }
    }

    #[test]
    fn duplicate_keys_are_refused_for_the_newcomer_and_strict_refuses_clear_nodes() {
        let cfg = WgConfig {
            port: 51871,
            strict: false,
            key_dir: PathBuf::new(),
            run_dir: PathBuf::new(),
            backend: WireguardBackend::Userspace,
            userspace_binary: None,
        };
        let mut wg = Wireguard::detached(cfg.clone(), KeyPair::from_private([1; 32]));
        // n1 holds key 7 (programmed before).
        wg.routes.insert(
            "10.2.1.0/24".parse().unwrap(),
            route("10.2.1.0/24", "n1", Some(7)),
        );
        // A resync re-upserts n1 after n0, which copies its key: n0 is the newcomer.
        let s = wg.split(&[
            route("10.2.0.0/24", "n0", Some(7)),
            route("10.2.1.0/24", "n1", Some(7)),
            route("10.2.2.0/24", "n2", None),
        ]);
        assert_eq!(
            s.encrypted
                .iter()
                .map(|r| r.node.as_str())
                .collect::<Vec<_>>(),
            ["n1"]
        );
        assert_eq!(s.clear.len(), 1);
        assert_eq!(s.refused.len(), 1);
        assert_eq!(s.refused[0].node, "n0");
        assert_eq!(
            s.refused[0].reason.code(),
            crate::desired::code::WIREGUARD_KEY_DUPLICATE
        );
        // n1 rotates to key 8 in the same batch: key 7 is free for n0.
        let s = wg.split(&[
            route("10.2.0.0/24", "n0", Some(7)),
            route("10.2.1.0/24", "n1", Some(8)),
        ]);
        assert_eq!(s.encrypted.len(), 2);
        // This node's own key is never a peer's.
        let own = KeyPair::from_private([1; 32]).public[0];
        let mut r = route("10.2.3.0/24", "n3", None);
        r.wireguard_key = Some(KeyPair::from_private([1; 32]).public);
        let s = wg.split(&[r]);
        assert_eq!(s.refused.len(), 1, "own key {own}");
        // Strict: a node without a key is refused, never clear.
        let mut strict = Wireguard::detached(
            WgConfig {
                strict: true,
                ..cfg
            },
            KeyPair::from_private([1; 32]),
        );
        let s = strict.split(&[route("10.2.2.0/24", "n2", None)]);
        assert!(s.clear.is_empty());
        assert_eq!(
            s.refused[0].reason.code(),
            crate::desired::code::ENCRYPTION_REQUIRED
        );
    }

    #[test]
    fn mapped_endpoints_compare_as_ipv4() {
        let a: SocketAddr = "[::ffff:172.31.0.2]:51871".parse().unwrap();
        assert_eq!(
            read::normalize_endpoint(a),
            "172.31.0.2:51871".parse().unwrap()
        );
        let b: SocketAddr = "[fd00::1]:51871".parse().unwrap();
        assert_eq!(read::normalize_endpoint(b), b);
    }
}
