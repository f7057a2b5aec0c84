//! Route-only datapaths (`vxlan`, `direct`, `ipip`): one nexthop object per remote node.
//!
//! Every remote node becomes one nexthop object (id in podmesh's range,
//! protocol [`ROUTE_PROTOCOL`]) and each of its Pod CIDRs a route that points
//! at it: per-route gateways are quadratic to install in the kernel, nexthop
//! objects are not. `vxlan` adds a permanent neighbour (node address → its
//! VTEP MAC) and an fdb entry (VTEP MAC → node address) on `podmesh-vx`,
//! flannel style; `ipip` routes onlink through `tunl0` (over an IPv6
//! underlay: lightweight-tunnel nexthops on `podmesh-ip6`, an external
//! `ip6tnl` device). Over
//! an IPv6 underlay the nexthops are IPv6 for IPv4 Pod CIDRs too: Linux
//! routes IPv4 through an IPv6 gateway (RFC 5549). It routes IPv6 through no
//! IPv4 gateway: over an IPv4 underlay, `vxlan` sends IPv6 Pod CIDRs to the
//! remote VTEP's link-local address, and `direct` and `ipip` refuse them.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{
    base::{
        DatapathError, KernelConfig, NEXTHOP_ID_FIRST, NEXTHOP_ID_LAST, PruneReport,
        ROUTE_PROTOCOL, RefusalReason, RemoteRoute,
    },
    device::{self, IPIP_OVERHEAD, VxlanSpec, vxlan_overhead},
    error::{Refusal, netlink_err, upsert_result},
    nexthop,
    nl::{Msg, Netlink, consts::AF_BRIDGE},
    owners::Owners,
    rtnl::{self, RouteTarget, delete_routes},
};

/// Name of the VXLAN device of the `vxlan` mode.
pub const VXLAN_DEVICE: &str = "podmesh-vx";
/// The IPIP fallback device the `ipip` module creates in every namespace.
pub const IPIP_DEVICE: &str = "tunl0";
/// The `ipip` mode's device over an IPv6 underlay: ip6tnl, mode any.
pub const IP6_TUNNEL_DEVICE: &str = "podmesh-ip6";
/// Bytes an IPv6 tunnel adds: the outer IPv6 header.
pub const IP6_TUNNEL_OVERHEAD: u32 = 40;

/// How routes leave the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteMode {
    /// Through `podmesh-vx` (ifindex, its MAC).
    Vxlan { ifindex: u32, mac: [u8; 6] },
    /// Straight to the node address over the underlay.
    Direct,
    /// Through `tunl0`, or `podmesh-ip6` over IPv6 (ifindex).
    Ipip { ifindex: u32 },
}

/// A route-only datapath.
#[derive(Debug)]
pub struct RouteDatapath {
    nl: Netlink,
    mode: RouteMode,
    underlay: crate::model::UnderlayFamily,
    route_mtu: Option<u32>,
    /// Our nexthop objects by gateway (node address), adopted at start.
    nexthops: BTreeMap<IpAddr, u32>,
    /// Ids in use (ours), and where the search for a free one starts.
    used_ids: BTreeSet<u32>,
    next_id: u32,
    /// What this process installed, by CIDR.
    routes: BTreeMap<IpNet, RemoteRoute>,
    /// Cluster and node names of what is installed, pinned so that they
    /// survive a restart; `None` when no bpffs could hold them.
    owners: Option<Owners>,
}

impl RouteDatapath {
    /// `vxlan`: creates or adopts `podmesh-vx`.
    pub fn vxlan(cfg: &KernelConfig) -> Result<Self, DatapathError> {
        let mut nl = Netlink::open(cfg.netns.as_deref()).map_err(netlink_err("opening netlink"))?;
        let mtu = device::underlay_mtu(&mut nl, cfg.underlay_mtu, cfg.node_ip)?
            - vxlan_overhead(cfg.underlay);
        // A device with a VNI has one socket family, set by its source
        // address (drivers/net/vxlan/vxlan_core.c, `vxlan_config_validate`):
        // the node's IPv6 address, or any (`::`) while it is not known.
        let local = match cfg.underlay {
            crate::model::UnderlayFamily::Ipv4 => None,
            crate::model::UnderlayFamily::Ipv6 => Some(
                cfg.node_ip
                    .unwrap_or(IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)),
            ),
        };
        let link = device::ensure_vxlan(
            &mut nl,
            VxlanSpec {
                name: VXLAN_DEVICE,
                vni: Some(cfg.vni),
                port: cfg.tunnel_port,
                mtu,
                noarp: false,
                mac: cfg.tunnel_mac,
                local,
            },
        )?;
        let mode = RouteMode::Vxlan {
            ifindex: link.index,
            mac: device::mac_of(&link)?,
        };
        Self::with(nl, mode, Some(mtu), cfg)
    }

    /// `direct`: plain routes via the node addresses.
    pub fn direct(cfg: &KernelConfig) -> Result<Self, DatapathError> {
        let nl = Netlink::open(cfg.netns.as_deref()).map_err(netlink_err("opening netlink"))?;
        Self::with(nl, RouteMode::Direct, None, cfg)
    }

    /// `ipip`: onlink routes through `tunl0`; refuses on a kernel without IPIP.
    /// Over an IPv6 underlay: through `podmesh-ip6`; refuses on a kernel
    /// without IPv6 tunnels.
    pub fn ipip(cfg: &KernelConfig) -> Result<Self, DatapathError> {
        let mut nl = Netlink::open(cfg.netns.as_deref()).map_err(netlink_err("opening netlink"))?;
        if cfg.underlay == crate::model::UnderlayFamily::Ipv6 {
            return Self::ip6tnl(nl, cfg);
        }
        let mut tunl =
            rtnl::link_by_name(&mut nl, IPIP_DEVICE).map_err(netlink_err("looking up tunl0"))?;
        if tunl.is_none() {
            // The module creates tunl0 in every namespace when it loads.
            let _ = std::process::Command::new("modprobe")
                .arg("ipip")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
            tunl = rtnl::link_by_name(&mut nl, IPIP_DEVICE)
                .map_err(netlink_err("looking up tunl0"))?;
        }
        let Some(tunl) = tunl else {
            return Err(DatapathError::Unavailable(
                "this kernel has no IPIP support: no tunl0 device, even after `modprobe ipip` \
                 (hint: use --datapath ebpf (default) or vxlan, or a kernel with CONFIG_NET_IPIP)"
                    .into(),
            ));
        };
        let mtu = device::underlay_mtu(&mut nl, cfg.underlay_mtu, cfg.node_ip)? - IPIP_OVERHEAD;
        rtnl::set_link(&mut nl, tunl.index, rtnl::IFF_UP, rtnl::IFF_UP, Some(mtu))
            .map_err(netlink_err("setting up tunl0"))?;
        Self::with(
            nl,
            RouteMode::Ipip {
                ifindex: tunl.index,
            },
            Some(mtu),
            cfg,
        )
    }

    /// `ipip` over an IPv6 underlay: `podmesh-ip6`, an external
    /// (collect_md) ip6tnl device in "any" mode (IPv4 and IPv6 inside); each
    /// remote node is an `encap ip6 dst <node>` nexthop on it. (A gateway
    /// nexthop cannot do: Linux refuses an IPv6 gateway on the tunnel device
    /// that a connected route of the underlay device covers,
    /// `ip6_route_check_nh_onlink`.)
    fn ip6tnl(mut nl: Netlink, cfg: &KernelConfig) -> Result<Self, DatapathError> {
        let mtu =
            device::underlay_mtu(&mut nl, cfg.underlay_mtu, cfg.node_ip)? - IP6_TUNNEL_OVERHEAD;
        let find = |nl: &mut Netlink| {
            rtnl::link_by_name(nl, IP6_TUNNEL_DEVICE).map_err(netlink_err("looking up podmesh-ip6"))
        };
        let mut dev = find(&mut nl)?;
        if dev.is_none() {
            let mut created = rtnl::create_ip6tnl(&mut nl, IP6_TUNNEL_DEVICE, mtu);
            if created.is_err() {
                let _ = std::process::Command::new("modprobe")
                    .arg("ip6_tunnel")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status();
                created = rtnl::create_ip6tnl(&mut nl, IP6_TUNNEL_DEVICE, mtu);
            }
            if let Err(e) = created {
                return Err(DatapathError::Unavailable(format!(
                    "this kernel has no IPv6 tunnel support for the ipip mode over an IPv6 \
                     underlay: creating an ip6tnl device failed ({e}), even after `modprobe \
                     ip6_tunnel` (hint: use --datapath ebpf (default), vxlan or direct, which \
                     run over IPv6, or a kernel with CONFIG_IPV6_TUNNEL)"
                )));
            }
            dev = find(&mut nl)?;
        }
        let dev = dev.ok_or_else(|| {
            DatapathError::Other(format!("{IP6_TUNNEL_DEVICE} vanished after creation"))
        })?;
        rtnl::set_link(&mut nl, dev.index, rtnl::IFF_UP, rtnl::IFF_UP, Some(mtu))
            .map_err(netlink_err("setting up podmesh-ip6"))?;
        Self::with(nl, RouteMode::Ipip { ifindex: dev.index }, Some(mtu), cfg)
    }

    fn with(
        mut nl: Netlink,
        mode: RouteMode,
        route_mtu: Option<u32>,
        cfg: &KernelConfig,
    ) -> Result<Self, DatapathError> {
        let nexthops = nexthop::nexthops_with_protocol(&mut nl, ROUTE_PROTOCOL)
            .map_err(|e| {
                DatapathError::Unavailable(format!(
                    "listing nexthop objects: {e} (hint: needs Linux 5.3 or newer)"
                ))
            })?
            .into_iter()
            .filter_map(|nh| Some((nh.target()?, nh.id)))
            .collect::<BTreeMap<IpAddr, u32>>();
        let used_ids: BTreeSet<u32> = nexthops.values().copied().collect();
        let next_id = used_ids
            .last()
            .map_or(NEXTHOP_ID_FIRST, |m| m.saturating_add(1));
        Ok(Self {
            nl,
            mode,
            underlay: cfg.underlay,
            route_mtu,
            nexthops,
            used_ids,
            next_id,
            routes: BTreeMap::new(),
            owners: open_owners(cfg),
        })
    }

    /// What happened to the tunnel device (vxlan, ipip) since it was set
    /// up, if it is gone, replaced or down; see [`device::lost`].
    pub fn device_lost(&mut self) -> Result<Option<String>, DatapathError> {
        match self.mode {
            RouteMode::Vxlan { ifindex, .. } => device::lost(&mut self.nl, VXLAN_DEVICE, ifindex),
            RouteMode::Ipip { ifindex } => {
                let name = match self.underlay {
                    crate::model::UnderlayFamily::Ipv4 => IPIP_DEVICE,
                    crate::model::UnderlayFamily::Ipv6 => IP6_TUNNEL_DEVICE,
                };
                device::lost(&mut self.nl, name, ifindex)
            }
            RouteMode::Direct => Ok(None),
        }
    }

    /// MAC of the tunnel device (vxlan mode), what the node publishes as `vtepMAC`.
    pub fn vtep_mac(&self) -> Option<[u8; 6]> {
        match self.mode {
            RouteMode::Vxlan { mac, .. } => Some(mac),
            _ => None,
        }
    }

    /// The next free id of podmesh's range (amortised O(1): ids are handed
    /// out in order and wrap around only once the range's end is reached).
    fn allocate_id(&mut self) -> Result<u32, DatapathError> {
        let start = self.next_id.clamp(NEXTHOP_ID_FIRST, NEXTHOP_ID_LAST);
        let id = (start..=NEXTHOP_ID_LAST)
            .chain(NEXTHOP_ID_FIRST..start)
            .find(|id| !self.used_ids.contains(id))
            .ok_or_else(|| DatapathError::Other("podmesh's nexthop id range is full".into()))?;
        self.used_ids.insert(id);
        self.next_id = id.saturating_add(1);
        Ok(id)
    }

    /// For `direct`: the device of the directly connected network of each
    /// address (a gateway on the way means the underlay is not shared).
    fn direct_oifs(
        &mut self,
        addrs: &BTreeSet<IpAddr>,
    ) -> Result<BTreeMap<IpAddr, u32>, DatapathError> {
        let connected = rtnl::connected_routes(&mut self.nl)
            .map_err(netlink_err("listing connected networks"))?;
        Ok(addrs
            .iter()
            .filter_map(|a| {
                connected
                    .iter()
                    .filter(|(net, _)| net.contains(a))
                    .max_by_key(|(net, _)| net.prefix_len())
                    .map(|(_, oif)| (*a, *oif))
            })
            .collect())
    }

    /// The routes that can be installed, with the output device of their
    /// node; the others go to `refused`.
    fn usable<'a>(
        &mut self,
        routes: &'a [RemoteRoute],
        refused: &mut Vec<Refusal>,
    ) -> Result<(Vec<&'a RemoteRoute>, BTreeMap<IpAddr, u32>), DatapathError> {
        let mut usable: Vec<&RemoteRoute> = Vec::with_capacity(routes.len());
        for r in routes {
            if !self.underlay.holds(r.node_addr) {
                refused.push(r.refusal(RefusalReason::UnderlayFamily {
                    addr: r.node_addr,
                    underlay: self.underlay,
                }));
                continue;
            }
            if r.cidr.addr().is_ipv6() && r.node_addr.is_ipv4() {
                let mode = match self.mode {
                    RouteMode::Direct => Some("direct"),
                    RouteMode::Ipip { .. } => Some("ipip"),
                    // Through the remote VTEP's link-local address.
                    RouteMode::Vxlan { .. } => None,
                };
                if let Some(mode) = mode {
                    refused.push(r.refusal(RefusalReason::Ipv6OverIpv4 {
                        mode,
                        addr: r.node_addr,
                    }));
                    continue;
                }
            }
            if matches!(self.mode, RouteMode::Vxlan { .. }) && r.vtep_mac.is_none() {
                refused.push(r.refusal(RefusalReason::NoVtepMac { mode: "vxlan" }));
                continue;
            }
            usable.push(r);
        }
        let addrs: BTreeSet<IpAddr> = usable.iter().map(|r| r.node_addr).collect();
        let oifs = match self.mode {
            RouteMode::Direct => self.direct_oifs(&addrs)?,
            RouteMode::Vxlan { ifindex, .. } | RouteMode::Ipip { ifindex } => {
                addrs.iter().map(|a| (*a, ifindex)).collect()
            }
        };
        usable.retain(|r| {
            let ok = oifs.contains_key(&r.node_addr);
            if !ok {
                refused.push(r.refusal(RefusalReason::NotConnected { addr: r.node_addr }));
            }
            ok
        });
        Ok((usable, oifs))
    }
}

/// The [`super::Datapath`] operations, synchronous: [`super::KernelDatapath`]
/// runs them off the async runtime's workers.
impl RouteDatapath {
    /// Installs every route that can be installed (a node without vtepMAC
    /// or off the underlay never blocks the others); returns the first
    /// failure, else the refused records.
    pub fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        let mut first_err = None;
        let mut refused = Vec::new();
        let (usable, oifs) = self.usable(routes, &mut refused)?;
        let onlink = !matches!(self.mode, RouteMode::Direct);
        // Per gateway (one per node, two for a vxlan node with IPv4 and
        // IPv6 Pod CIDRs over an IPv4 underlay): nexthop (+ neighbour and
        // fdb for vxlan); then the routes.
        let mut nodes: BTreeMap<IpAddr, (IpAddr, IpNet, Option<[u8; 6]>)> = BTreeMap::new();
        for r in &usable {
            nodes
                .entry(self.gateway(r.cidr, r.node_addr, r.vtep_mac))
                .or_insert((r.node_addr, r.cidr, r.vtep_mac));
        }
        let mut node_msgs: Vec<(IpNet, Msg)> = Vec::with_capacity(nodes.len() * 3);
        for (gw, (a, cidr, mac)) in &nodes {
            let gw = *gw;
            let id = match self.nexthops.get(&gw) {
                Some(id) => *id,
                None => {
                    let id = self.allocate_id()?;
                    self.nexthops.insert(gw, id);
                    id
                }
            };
            let nh = match (self.mode, gw) {
                (RouteMode::Ipip { ifindex }, IpAddr::V6(dst)) => {
                    nexthop::nexthop_encap_ip6_replace(id, dst, ifindex, ROUTE_PROTOCOL)
                }
                _ => nexthop::nexthop_replace(id, gw, oifs[a], onlink, ROUTE_PROTOCOL),
            };
            node_msgs.push((*cidr, nh));
            if let (RouteMode::Vxlan { ifindex, .. }, Some(mac)) = (self.mode, mac) {
                node_msgs.push((*cidr, rtnl::neigh_replace(ifindex, gw, *mac)));
                node_msgs.push((*cidr, rtnl::fdb_replace(ifindex, *mac, *a)));
            }
        }
        let (cidrs, msgs): (Vec<IpNet>, Vec<Msg>) = node_msgs.into_iter().unzip();
        let failures = self
            .nl
            .batch(msgs)
            .map_err(netlink_err("installing nexthop objects"))?;
        if let Some((i, errno)) = failures.first() {
            // Routes to a node whose nexthop failed would fail too.
            return Err(DatapathError::op(
                "upsert nexthop",
                cidrs[*i],
                *errno,
                failures.len() - 1,
            ));
        }
        let msgs: Vec<Msg> = usable
            .iter()
            .map(|r| {
                rtnl::route_replace(
                    r.cidr,
                    RouteTarget::Nexthop(
                        self.nexthops[&self.gateway(r.cidr, r.node_addr, r.vtep_mac)],
                    ),
                    ROUTE_PROTOCOL,
                    self.route_mtu,
                )
            })
            .collect();
        let failures = self
            .nl
            .batch(msgs)
            .map_err(netlink_err("installing routes"))?;
        if let Some((i, errno)) = failures.first() {
            first_err.get_or_insert(DatapathError::op(
                "upsert route",
                usable[*i].cidr,
                *errno,
                failures.len() - 1,
            ));
        }
        if let Some(o) = &mut self.owners
            && let Some(e) = o.set_all(usable.iter().copied())
        {
            first_err.get_or_insert(e);
        }
        crate::compact::extend(
            &mut self.routes,
            usable.iter().map(|r| (r.cidr, (*r).clone())).collect(),
        );
        upsert_result(first_err, refused)
    }

    pub fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        delete_routes(&mut self.nl, cidrs)?;
        for c in cidrs {
            self.routes.remove(c);
            if let Some(o) = &mut self.owners {
                o.remove(c);
            }
        }
        self.collect_nexthops()
    }

    pub fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        let removed: Vec<IpNet> = rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?
            .into_iter()
            .map(|r| r.dst)
            .filter(|d| !keep.contains(d))
            .collect();
        delete_routes(&mut self.nl, &removed)?;
        self.routes.retain(|c, _| keep.contains(c));
        if let Some(o) = &mut self.owners {
            o.retain(|c| keep.contains(c));
        }
        self.collect_nexthops()?;
        Ok(PruneReport { removed })
    }

    pub fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        let by_id: BTreeMap<u32, IpAddr> =
            nexthop::nexthops_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
                .map_err(netlink_err("listing podmesh's nexthop objects"))?
                .into_iter()
                .filter_map(|nh| Some((nh.id, nh.target()?)))
                .collect();
        let mut macs: BTreeMap<IpAddr, [u8; 6]> = BTreeMap::new();
        if let RouteMode::Vxlan { ifindex, .. } = self.mode {
            for any in [IpAddr::from([0u8; 4]), IpAddr::from([0u16; 8])] {
                macs.extend(
                    rtnl::neighbours(&mut self.nl, rtnl::family_of(any), ifindex)
                        .map_err(netlink_err("listing neighbours"))?
                        .into_iter()
                        .filter_map(|(ip, mac)| Some((ip?, mac?))),
                );
            }
        }
        // A link-local gateway is the VTEP's (vxlan over IPv6, or an IPv6
        // Pod CIDR over IPv4); the fdb entry of its MAC holds the node address.
        let fdb: BTreeMap<[u8; 6], IpAddr> = match self.mode {
            RouteMode::Vxlan { ifindex, .. } => rtnl::neighbours(&mut self.nl, AF_BRIDGE, ifindex)
                .map_err(netlink_err("listing fdb entries"))?
                .into_iter()
                .filter_map(|(ip, mac)| Some((mac?, ip?)))
                .collect(),
            _ => BTreeMap::new(),
        };
        let mut out = Vec::new();
        for r in rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?
        {
            let Some(gw) = r.nhid.and_then(|id| by_id.get(&id)) else {
                continue;
            };
            let mac = macs.get(gw).copied();
            let link_local = matches!(gw, IpAddr::V6(g) if g.is_unicast_link_local());
            let addr = match mac.and_then(|m| fdb.get(&m)) {
                Some(a) if link_local => a,
                _ => gw,
            };
            let (cluster, node) = match (self.routes.get(&r.dst), &self.owners) {
                (Some(k), _) => (k.cluster.clone(), k.node.clone()),
                (None, Some(o)) => o.get(&r.dst).cloned().unwrap_or_default(),
                (None, None) => Default::default(),
            };
            out.push(RemoteRoute {
                cidr: r.dst,
                cluster,
                node,
                node_addr: *addr,
                vtep_mac: mac,
                wireguard_key: None,
            });
        }
        Ok(out)
    }
}

/// The owners map under the pin directory. Without it the datapath still
/// works, but a restarted agent no longer knows whose routes it finds, and
/// its first resync withdraws them until the remote clusters have synced.
fn open_owners(cfg: &KernelConfig) -> Option<Owners> {
    match Owners::open(&cfg.pin_dir) {
        Ok(o) => Some(o),
        Err(e) => {
            tracing::warn!(
                error = %e,
                pin_dir = %cfg.pin_dir.display(),
                "cannot keep route owners in a pinned map; after a restart, routes are withdrawn \
                 until the remote clusters have synced (hint: mount a bpffs that outlives the \
                 agent, e.g. hostPath /sys/fs/bpf, or set --bpf-pin-dir)"
            );
            None
        }
    }
}

impl RouteDatapath {
    /// Whether nexthops go to the VTEPs' link-local addresses: vxlan over
    /// IPv6, where the kernel refuses an onlink gateway on `podmesh-vx` that
    /// a connected route of another device covers (net/ipv6/route.c,
    /// `ip6_route_check_nh_onlink`: "device mismatch"), and skips that check
    /// for link-local gateways. Flannel's IPv6 VXLAN avoids it the same way,
    /// with a gateway that is not an underlay address.
    /// Also an IPv6 Pod CIDR over an IPv4 underlay: Linux routes IPv6
    /// through no IPv4 gateway, and the fdb entry of the VTEP's MAC still
    /// sends to the node's IPv4 address.
    fn ll_gateway(&self, cidr: IpNet) -> bool {
        matches!(self.mode, RouteMode::Vxlan { .. })
            && (self.underlay == crate::model::UnderlayFamily::Ipv6 || cidr.addr().is_ipv6())
    }

    /// The nexthop gateway of `cidr` towards the node at `addr` with VTEP `mac`.
    fn gateway(&self, cidr: IpNet, addr: IpAddr, mac: Option<[u8; 6]>) -> IpAddr {
        match mac {
            Some(m) if self.ll_gateway(cidr) => IpAddr::V6(link_local_of(m)),
            _ => addr,
        }
    }

    /// Deletes our nexthop objects (and vxlan neighbour/fdb entries) that no
    /// podmesh route uses any more.
    fn collect_nexthops(&mut self) -> Result<(), DatapathError> {
        let used: BTreeSet<u32> = rtnl::routes_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's routes"))?
            .into_iter()
            .filter_map(|r| r.nhid)
            .collect();
        let all = nexthop::nexthops_with_protocol(&mut self.nl, ROUTE_PROTOCOL)
            .map_err(netlink_err("listing podmesh's nexthop objects"))?;
        let unused: Vec<(u32, Option<IpAddr>)> = all
            .iter()
            .filter(|nh| !used.contains(&nh.id))
            .map(|nh| (nh.id, nh.target()))
            .collect();
        let live: BTreeSet<IpAddr> = all
            .iter()
            .filter(|nh| used.contains(&nh.id))
            .filter_map(|nh| nh.target())
            .collect();
        let mut msgs: Vec<Msg> = unused
            .iter()
            .map(|(id, _)| nexthop::nexthop_delete(*id))
            .collect();
        if let RouteMode::Vxlan { ifindex, .. } = self.mode {
            for family in [
                rtnl::family_of(IpAddr::from([0u8; 4])),
                rtnl::family_of(IpAddr::from([0u16; 8])),
            ] {
                for (ip, _) in rtnl::neighbours(&mut self.nl, family, ifindex)
                    .map_err(netlink_err("listing neighbours"))?
                {
                    if let Some(ip) = ip.filter(|ip| !live.contains(ip)) {
                        msgs.push(rtnl::neigh_delete(ifindex, ip));
                    }
                }
            }
            for (ip, mac) in rtnl::neighbours(&mut self.nl, AF_BRIDGE, ifindex)
                .map_err(netlink_err("listing fdb entries"))?
            {
                // An fdb entry lives while the node address or, with
                // link-local gateways, the gateway of its MAC does.
                if let (Some(ip), Some(mac)) = (ip, mac)
                    && !live.contains(&ip)
                    && !live.contains(&IpAddr::V6(link_local_of(mac)))
                {
                    msgs.push(rtnl::fdb_delete(ifindex, mac, ip));
                }
            }
        }
        // Already gone is fine: deleting is idempotent.
        let _ = self.nl.batch(msgs).map_err(netlink_err(
            "deleting unused nexthop, neighbour and fdb entries",
        ))?;
        self.nexthops.retain(|_, id| used.contains(id));
        self.used_ids.retain(|id| used.contains(id));
        Ok(())
    }
}

/// The EUI-64 link-local address of `mac` (RFC 4291, appendix A): what the
/// kernel gives the remote VTEP device of that MAC.
pub fn link_local_of(mac: [u8; 6]) -> std::net::Ipv6Addr {
    let m = mac;
    std::net::Ipv6Addr::from([
        0xfe,
        0x80,
        0,
        0,
        0,
        0,
        0,
        0,
        m[0] ^ 2,
        m[1],
        m[2],
        0xff,
        0xfe,
        m[3],
        m[4],
        m[5],
    ])
}

#[cfg(test)]
mod tests {
    #[test]
    fn link_local_of_a_mac() {
        assert_eq!(
            super::link_local_of([0x02, 0, 0xc0, 0xa8, 1, 10]).to_string(),
            "fe80::c0ff:fea8:10a"
        );
    }
}
