//! The `ebpf` datapath: `podmesh0` (VXLAN, collect_md), a TCX egress program and pinned LPM maps.
//!
//! Remote Pod CIDRs are routed into `podmesh0` (protocol [`ROUTE_PROTOCOL`],
//! MTU = underlay − 50, or − 70 over IPv6); the program looks the
//! destination up in the map of its family (IPv4 or IPv6 Pod CIDRs; the
//! underlay, IPv4 or IPv6, is independent of it), sets the tunnel key and
//! rewrites the inner destination MAC. Maps and the
//! TCX link are pinned under the pin directory, so a stopped agent leaves
//! forwarding in place and a new one adopts them: it reuses the pinned maps
//! and atomically swaps its program into the pinned link.
use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray, lpm_trie::Key, lpm_trie::LpmTrie},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        links::{FdLink, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle},
    },
    util::KernelVersion,
};
use ipnet::IpNet;
use podmesh_common::{
    COUNTERS_MAP, OWNERS_MAP, REMOTES_V4_MAP, REMOTES_V6_MAP, RemoteNode, RemoteNodeV1,
    TUNNEL_DEVICE, TUNNEL_EGRESS_LINK_PIN, TUNNEL_EGRESS_PROG, counter,
};

use crate::model::UnderlayFamily;

use super::{
    base::{
        Counters, DatapathError, KernelConfig, PruneReport, ROUTE_PROTOCOL, RefusalReason,
        RemoteRoute,
    },
    device::{self, VxlanSpec, vxlan_overhead},
    error::{netlink_err, upsert_result},
    nexthop,
    nl::{Msg, Netlink, in_netns},
    owners::Owners,
    pins::ensure_pin_dir,
    rtnl::{self, RouteTarget, delete_routes},
};

/// The eBPF datapath of one network namespace.
pub struct EbpfDatapath {
    nl: Netlink,
    ifindex: u32,
    mac: [u8; 6],
    route_mtu: u32,
    vni: u32,
    underlay: UnderlayFamily,
    pin_dir: PathBuf,
    remotes: LpmTrie<MapData, [u8; 4], RemoteNode>,
    remotes_v6: LpmTrie<MapData, [u8; 16], RemoteNode>,
    counters: PerCpuArray<MapData, u64>,
    /// Cluster and node names of what is installed, for `installed()` (the
    /// LPM map holds only addresses); pinned, so they survive a restart.
    owners: Owners,
    /// Keeps the loaded program (and so the maps) referenced while we run.
    _ebpf: Ebpf,
}

/// The tc program's packet counters, read from their pinned map.
pub struct CounterReader {
    map: PerCpuArray<MapData, u64>,
}

impl std::fmt::Debug for CounterReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CounterReader").finish_non_exhaustive()
    }
}

impl CounterReader {
    /// Opens the counters map pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let path = pin_dir.join(COUNTERS_MAP);
        let data = MapData::from_pin(&path)
            .map_err(|e| DatapathError::map(format!("opening the pinned {}", path.display()), e))?;
        let map = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))
            .map_err(|e| DatapathError::map(format!("{} as a per-CPU array", path.display()), e))?;
        Ok(Self { map })
    }

    /// The counters now, summed over CPUs.
    pub fn read(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.map)
    }
}

fn read_counters(map: &PerCpuArray<MapData, u64>) -> Result<Counters, DatapathError> {
    let read = |i: u32| -> Result<u64, DatapathError> {
        Ok(map
            .get(&i, 0)
            .map_err(|e| DatapathError::map(format!("reading counter {i}"), e))?
            .iter()
            .sum())
    };
    Ok(Counters {
        forwarded: read(counter::FORWARDED)?,
        miss: read(counter::MISS)?,
        not_ipv4: read(counter::NOT_IPV4)?,
        tunnel_key_failed: read(counter::TUNNEL_KEY_FAILED)?,
    })
}

impl std::fmt::Debug for EbpfDatapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfDatapath")
            .field("ifindex", &self.ifindex)
            .field("mac", &self.mac)
            .field("route_mtu", &self.route_mtu)
            .field("vni", &self.vni)
            .field("pin_dir", &self.pin_dir)
            .finish_non_exhaustive()
    }
}

impl EbpfDatapath {
    /// Creates or adopts `podmesh0`, loads the program with the pinned maps
    /// (creating the pins on first start) and attaches it, replacing the
    /// program of an existing pinned link atomically.
    pub fn new(cfg: &KernelConfig) -> Result<Self, DatapathError> {
        let mut nl = Netlink::open(cfg.netns.as_deref()).map_err(netlink_err("opening netlink"))?;
        let underlay = device::underlay_mtu(&mut nl, cfg.underlay_mtu, cfg.node_ip)?;
        let route_mtu = underlay - vxlan_overhead(cfg.underlay);
        // External (collect_md) devices listen on IPv4 and IPv6 alike
        // (drivers/net/vxlan/vxlan_core.c, `vxlan_open`): the tunnel key
        // chooses the family per packet.
        let link = device::ensure_vxlan(
            &mut nl,
            VxlanSpec {
                name: TUNNEL_DEVICE,
                vni: None,
                port: cfg.tunnel_port,
                mtu: route_mtu,
                noarp: true,
                mac: cfg.tunnel_mac,
                local: None,
            },
        )?;
        let mac = device::mac_of(&link)?;
        ensure_pin_dir(&cfg.pin_dir)?;
        let carried = take_v1_maps(&cfg.pin_dir)?;

        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&cfg.pin_dir)
            .load(crate::EBPF_OBJECT)
            .map_err(|e| {
                DatapathError::program(
                    "loading the eBPF object",
                    "needs CAP_BPF/CAP_SYS_ADMIN; a map pinned by an incompatible podmesh version \
                     under the pin directory must be removed",
                    e,
                )
            })?;
        carry_over(&mut ebpf, carried)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(TUNNEL_EGRESS_PROG)
            .ok_or_else(|| DatapathError::Other(format!("{TUNNEL_EGRESS_PROG} not in object")))?
            .try_into()
            .map_err(|e| DatapathError::program("program type", "rebuild podmesh", e))?;
        prog.load().map_err(|e| {
            DatapathError::program("verifying the tc program", "see the verifier log", e)
        })?;
        let link_pin = cfg.pin_dir.join(TUNNEL_EGRESS_LINK_PIN);
        match cfg.netns.as_deref() {
            None => attach_or_adopt(prog, &link_pin)?,
            Some(ns) => in_netns(ns, || attach_or_adopt(prog, &link_pin))?,
        }

        let remotes = LpmTrie::try_from(
            ebpf.take_map(REMOTES_V4_MAP)
                .ok_or_else(|| DatapathError::Other(format!("{REMOTES_V4_MAP} not in object")))?,
        )
        .map_err(|e| DatapathError::program("opening the LPM map", "rebuild podmesh", e))?;
        let remotes_v6 = LpmTrie::try_from(
            ebpf.take_map(REMOTES_V6_MAP)
                .ok_or_else(|| DatapathError::Other(format!("{REMOTES_V6_MAP} not in object")))?,
        )
        .map_err(|e| DatapathError::program("opening the IPv6 LPM map", "rebuild podmesh", e))?;
        let counters = PerCpuArray::try_from(
            ebpf.take_map(COUNTERS_MAP)
                .ok_or_else(|| DatapathError::Other(format!("{COUNTERS_MAP} not in object")))?,
        )
        .map_err(|e| DatapathError::program("opening the counters map", "rebuild podmesh", e))?;
        let owners = Owners::new(
            ebpf.take_map(OWNERS_MAP)
                .ok_or_else(|| DatapathError::Other(format!("{OWNERS_MAP} not in object")))?,
        )?;
        tracing::info!(
            device = TUNNEL_DEVICE,
            ifindex = link.index,
            mtu = route_mtu,
            pin_dir = %cfg.pin_dir.display(),
            "ebpf datapath ready"
        );
        Ok(Self {
            nl,
            ifindex: link.index,
            mac,
            route_mtu,
            vni: cfg.vni,
            underlay: cfg.underlay,
            pin_dir: cfg.pin_dir.clone(),
            remotes,
            remotes_v6,
            counters,
            owners,
            _ebpf: ebpf,
        })
    }

    /// What happened to `podmesh0` since it was set up, if it is gone,
    /// replaced or down; see [`device::lost`].
    pub fn device_lost(&mut self) -> Result<Option<String>, DatapathError> {
        device::lost(&mut self.nl, TUNNEL_DEVICE, self.ifindex)
    }

    /// MAC of `podmesh0`: what this node publishes as `vtepMAC`.
    pub fn vtep_mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Packet counters of the tc program, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        read_counters(&self.counters)
    }

    /// A reader of the same counters with a map handle of its own, for the
    /// status server to read at scrape time while the datapath is busy.
    pub fn counter_reader(&self) -> Result<CounterReader, DatapathError> {
        CounterReader::open(&self.pin_dir)
    }

    /// Every entry of both LPM maps.
    fn map_entries(&self) -> Result<Vec<(IpNet, RemoteNode)>, DatapathError> {
        lpm_entries(&self.remotes, &self.remotes_v6)
    }
}

/// Every entry of both LPM maps (IPv4 and IPv6 Pod CIDRs).
fn lpm_entries(
    v4: &LpmTrie<MapData, [u8; 4], RemoteNode>,
    v6: &LpmTrie<MapData, [u8; 16], RemoteNode>,
) -> Result<Vec<(IpNet, RemoteNode)>, DatapathError> {
    let read = |e| DatapathError::map("reading the LPM maps", e);
    let mut out = Vec::new();
    for item in v4.iter() {
        let (k, v) = item.map_err(read)?;
        if let Ok(c) = IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8) {
            out.push((c, v));
        }
    }
    for item in v6.iter() {
        let (k, v) = item.map_err(read)?;
        if let Ok(c) = IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8) {
            out.push((c, v));
        }
    }
    Ok(out)
}

/// Every entry of the LPM maps pinned in `pin_dir`, read without loading
/// the program or touching anything (`podmesh diagnose`).
pub fn pinned_entries(pin_dir: &Path) -> Result<Vec<(IpNet, RemoteNode)>, DatapathError> {
    let open = |name: &str| {
        let path = pin_dir.join(name);
        MapData::from_pin(&path)
            .map_err(|e| DatapathError::map(format!("opening the pinned {}", path.display()), e))
    };
    let v4 = LpmTrie::try_from(aya::maps::Map::LpmTrie(open(REMOTES_V4_MAP)?))
        .map_err(|e| DatapathError::map("the pinned IPv4 LPM map", e))?;
    let v6 = LpmTrie::try_from(aya::maps::Map::LpmTrie(open(REMOTES_V6_MAP)?))
        .map_err(|e| DatapathError::map("the pinned IPv6 LPM map", e))?;
    lpm_entries(&v4, &v6)
}

/// The [`super::Datapath`] operations, synchronous: [`super::KernelDatapath`]
/// runs them off the async runtime's workers.
impl EbpfDatapath {
    /// Installs every route that can be installed; one bad remote record
    /// (no vtepMAC, a node address of the other family than the underlay's)
    /// never blocks the others. Returns the first failure, else the refused
    /// records. IPv4 and IPv6 Pod CIDRs each have their LPM map; the tunnel
    /// runs over the configured underlay family for both.
    pub fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        let mut first_err = None;
        let mut refused = Vec::new();
        let mut msgs = Vec::with_capacity(routes.len());
        let mut cidrs = Vec::with_capacity(routes.len());
        let mut named = Vec::with_capacity(routes.len());
        for r in routes {
            if !self.underlay.holds(r.node_addr) {
                refused.push(r.refusal(RefusalReason::UnderlayFamily {
                    addr: r.node_addr,
                    underlay: self.underlay,
                }));
                continue;
            }
            let Some(vtep_mac) = r.vtep_mac else {
                refused.push(r.refusal(RefusalReason::NoVtepMac { mode: "ebpf" }));
                continue;
            };
            let value = RemoteNode::new(r.node_addr, self.vni, vtep_mac);
            let inserted = match r.cidr {
                IpNet::V4(net) => self.remotes.insert(
                    &Key::new(u32::from(net.prefix_len()), net.network().octets()),
                    value,
                    0,
                ),
                IpNet::V6(net) => self.remotes_v6.insert(
                    &Key::new(u32::from(net.prefix_len()), net.network().octets()),
                    value,
                    0,
                ),
            };
            if let Err(e) = inserted {
                first_err.get_or_insert(DatapathError::map(
                    format!("upsert map entry {}", r.cidr),
                    e,
                ));
                continue;
            }
            named.push(r);
            msgs.push(rtnl::route_replace(
                r.cidr,
                RouteTarget::Dev(self.ifindex),
                ROUTE_PROTOCOL,
                Some(self.route_mtu),
            ));
            cidrs.push(r.cidr);
        }
        if let Some(e) = self.owners.set_all(named) {
            first_err.get_or_insert(e);
        }
        let failures = self
            .nl
            .batch(msgs)
            .map_err(netlink_err("installing routes"))?;
        if let Some((i, errno)) = failures.first() {
            first_err.get_or_insert(DatapathError::op(
                "upsert route",
                cidrs[*i],
                *errno,
                failures.len() - 1,
            ));
        }
        upsert_result(first_err, refused)
    }

    pub fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        for c in cidrs {
            // Absent is fine (idempotent).
            let _ = match c {
                IpNet::V4(net) => self.remotes.remove(&Key::new(
                    u32::from(net.prefix_len()),
                    net.network().octets(),
                )),
                IpNet::V6(net) => self.remotes_v6.remove(&Key::new(
                    u32::from(net.prefix_len()),
                    net.network().octets(),
                )),
            };
            self.owners.remove(c);
        }
        delete_routes(&mut self.nl, cidrs)
    }

    pub fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        let mut removed = BTreeSet::new();
        for (c, _) in self.map_entries()? {
            if !keep.contains(&c) {
                removed.insert(c);
            }
        }
        let routes = rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?;
        for r in &routes {
            if !keep.contains(&r.dst) {
                removed.insert(r.dst);
            }
        }
        let removed: Vec<IpNet> = removed.into_iter().collect();
        self.delete(&removed)?;
        self.owners.retain(|c| keep.contains(c));
        // This mode has no nexthop objects: podmesh's are a route mode's,
        // left when the node switched to ebpf. Once no route uses them (the
        // upserts replaced those routes) they go.
        let used: BTreeSet<u32> = routes.iter().filter_map(|r| r.nhid).collect();
        let unused: Vec<Msg> = nexthop::nexthops_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's nexthop objects"))?
            .iter()
            .filter(|nh| !used.contains(&nh.id))
            .map(|nh| nexthop::nexthop_delete(nh.id))
            .collect();
        if !unused.is_empty() {
            let _ = self
                .nl
                .batch(unused)
                .map_err(netlink_err("deleting unused nexthop objects"))?;
        }
        Ok(PruneReport { removed })
    }

    pub fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        let routed: BTreeSet<IpNet> = rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?
            .into_iter()
            .filter(|r| r.oif == Some(self.ifindex))
            .map(|r| r.dst)
            .collect();
        let mut out = Vec::new();
        for (cidr, v) in self.map_entries()? {
            // Both halves are needed to forward: the route steers into
            // podmesh0, the map entry says where to.
            if !routed.contains(&cidr) {
                continue;
            }
            let (cluster, node) = self.owners.get(&cidr).cloned().unwrap_or_default();
            out.push(RemoteRoute {
                cidr,
                cluster,
                node,
                node_addr: v.endpoint(),
                vtep_mac: Some(v.vtep_mac),
                wireguard_key: None,
            });
        }
        Ok(out)
    }
}

/// LPM map entries, keyed by `K` (`[u8; 4]` or `[u8; 16]`).
type Entries<K> = Vec<(Key<K>, RemoteNode)>;

/// The entries of LPM maps pinned by an earlier version, whose value
/// ([`RemoteNodeV1`]) had no room for an IPv6 endpoint.
#[derive(Default)]
struct CarriedOver {
    v4: Entries<[u8; 4]>,
    v6: Entries<[u8; 16]>,
}

/// Reads the entries of LPM maps pinned with the earlier value layout and
/// removes their pins, so that loading creates maps of the current layout
/// (the program in the pinned link keeps the old maps, and forwarding, until
/// the new program replaces it). Maps of the current layout are left alone.
fn take_v1_maps(pin_dir: &Path) -> Result<CarriedOver, DatapathError> {
    fn take<K: aya::Pod>(path: &Path) -> Result<Option<Entries<K>>, DatapathError> {
        let Ok(data) = MapData::from_pin(path) else {
            return Ok(None);
        };
        let size = data
            .info()
            .map_err(|e| DatapathError::map(format!("reading {}", path.display()), e))?
            .value_size();
        if size as usize != std::mem::size_of::<RemoteNodeV1>() {
            return Ok(None);
        }
        let map: LpmTrie<MapData, K, RemoteNodeV1> =
            LpmTrie::try_from(aya::maps::Map::LpmTrie(data))
                .map_err(|e| DatapathError::map(format!("opening {}", path.display()), e))?;
        let entries = map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, RemoteNode::from(v)))
            .collect();
        std::fs::remove_file(path).map_err(|e| {
            DatapathError::io(
                format!("removing the earlier layout's {}", path.display()),
                e,
            )
        })?;
        tracing::info!(pin = %path.display(), "carrying a map of the earlier layout (IPv4 endpoints only) over");
        Ok(Some(entries))
    }
    Ok(CarriedOver {
        v4: take(&pin_dir.join(REMOTES_V4_MAP))?.unwrap_or_default(),
        v6: take(&pin_dir.join(REMOTES_V6_MAP))?.unwrap_or_default(),
    })
}

/// Puts the carried-over entries into the freshly created maps, before the
/// new program is attached.
fn carry_over(ebpf: &mut Ebpf, c: CarriedOver) -> Result<(), DatapathError> {
    fn put<K: aya::Pod>(
        ebpf: &mut Ebpf,
        name: &str,
        entries: Entries<K>,
    ) -> Result<(), DatapathError> {
        if entries.is_empty() {
            return Ok(());
        }
        let map = ebpf
            .map_mut(name)
            .ok_or_else(|| DatapathError::Other(format!("{name} not in object")))?;
        let mut trie: LpmTrie<&mut MapData, K, RemoteNode> = LpmTrie::try_from(map)
            .map_err(|e| DatapathError::program("opening the LPM map", "rebuild podmesh", e))?;
        for (k, v) in entries {
            trie.insert(&k, v, 0)
                .map_err(|e| DatapathError::map(format!("carrying {name} over"), e))?;
        }
        Ok(())
    }
    put(ebpf, REMOTES_V4_MAP, c.v4)?;
    put(ebpf, REMOTES_V6_MAP, c.v6)
}

/// Priority of podmesh's cls_bpf filter on kernels without TCX (< 6.6): first.
pub const NETLINK_FILTER_PRIORITY: u16 = 1;
/// Handle of podmesh's cls_bpf filter on kernels without TCX.
pub const NETLINK_FILTER_HANDLE: u16 = 0x50;

/// Whether the kernel has TCX (Linux 6.6): then the program is attached
/// through a pinned bpf link, else as a cls_bpf filter on a clsact qdisc.
pub fn has_tcx() -> bool {
    KernelVersion::current().map_or(true, |v| v >= KernelVersion::new(6, 6, 0))
}

/// Attaches `prog` to the egress of `podmesh0`, adopting what a previous
/// agent left there. Runs in the target namespace (interface names resolve
/// there).
fn attach_or_adopt(prog: &mut SchedClassifier, link_pin: &Path) -> Result<(), DatapathError> {
    if has_tcx() {
        attach_tcx(prog, link_pin)
    } else {
        attach_cls_bpf(prog)
    }
}

/// Kernels before 6.6: a direct-action cls_bpf filter at podmesh's fixed
/// priority and handle. An existing one (a previous agent's) is replaced in
/// place, which the kernel does atomically; the filter outlives the agent.
fn attach_cls_bpf(prog: &mut SchedClassifier) -> Result<(), DatapathError> {
    // EEXIST when a previous agent (or someone else) added it already.
    let _ = tc::qdisc_add_clsact(TUNNEL_DEVICE);
    let handle = TcHandle::new(0, NETLINK_FILTER_HANDLE);
    let replaced = SchedClassifierLink::attached(
        TUNNEL_DEVICE,
        TcAttachType::Egress,
        NETLINK_FILTER_PRIORITY,
        handle,
        None,
    )
    .ok()
    .and_then(|old| prog.attach_to_link(old).ok());
    let id = match replaced {
        Some(id) => id,
        None => prog
            .attach_with_options(
                TUNNEL_DEVICE,
                TcAttachType::Egress,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NETLINK_FILTER_PRIORITY,
                    handle,
                    classid: None,
                }),
            )
            .map_err(|e| {
                DatapathError::program(
                    "attaching to podmesh0 egress (cls_bpf)",
                    "needs the clsact qdisc and cls_bpf (modules sch_ingress, cls_bpf)",
                    e,
                )
            })?,
    };
    let link = prog
        .take_link(id)
        .map_err(|e| DatapathError::program("taking the link", "", e))?;
    // Dropping the handle would delete the filter: stop is not remove.
    std::mem::forget(link);
    Ok(())
}

/// Linux 6.6+: TCX. When the pinned link is still attached, its program is
/// replaced atomically (no packet sees an empty hook); otherwise a new link
/// is created and pinned.
fn attach_tcx(prog: &mut SchedClassifier, link_pin: &Path) -> Result<(), DatapathError> {
    let attached = ours_attached()?;
    let pinned = PinnedLink::from_pin(link_pin).ok();
    if let (true, Some(old)) = (attached, pinned) {
        let link = SchedClassifierLink::try_from(FdLink::from(old))
            .map_err(|e| DatapathError::program("adopting the pinned link", "remove the pin", e))?;
        let id = prog
            .attach_to_link(link)
            .map_err(|e| DatapathError::program("replacing the program", "remove the pin", e))?;
        // The pin keeps the link; this handle only has to let go of it.
        drop(prog.take_link(id));
        tracing::info!(pin = %link_pin.display(), "adopted the attached tc program");
        return Ok(());
    }
    if link_pin.exists() {
        // Stale: podmesh0 was recreated, the pinned link points at nothing.
        std::fs::remove_file(link_pin).map_err(|e| {
            DatapathError::io(format!("removing stale pin {}", link_pin.display()), e)
        })?;
    }
    let id = prog
        .attach_with_options(
            TUNNEL_DEVICE,
            TcAttachType::Egress,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|e| {
            DatapathError::program(
                "attaching to podmesh0 egress",
                "TCX needs Linux 6.6 or newer",
                e,
            )
        })?;
    let link: FdLink = prog
        .take_link(id)
        .map_err(|e| DatapathError::program("taking the link", "", e))?
        .try_into()
        .map_err(|e| DatapathError::program("link type", "", e))?;
    link.pin(link_pin).map_err(|e| {
        DatapathError::program("pinning the link", "is the pin directory on bpffs?", e)
    })?;
    Ok(())
}

/// Whether a podmesh tunnel program is attached to podmesh0's TCX egress.
pub fn ours_attached() -> Result<bool, DatapathError> {
    let (_, progs) = SchedClassifier::query_tcx(TUNNEL_DEVICE, TcAttachType::Egress)
        .map_err(|e| DatapathError::program("querying podmesh0 egress", "", e))?;
    Ok(progs.iter().any(|p| {
        p.name_as_str()
            .is_some_and(|n| !n.is_empty() && TUNNEL_EGRESS_PROG.starts_with(n))
    }))
}
