//! The datapath layer: what the agent wants programmed (`/status` routes)
//! against what the kernel holds, read with the datapath's own readers
//! (podmesh's routes and nexthop objects, the VXLAN device's neighbours and
//! fdb, the pinned LPM maps), the tunnel device, what the agent found of
//! the CNI, the masquerade exemption and rp_filter, and a probe per remote
//! node's Pod CIDR ([`super::probe`]); with WireGuard, the device as
//! WireGuard reports it ([`super::wireguard`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use ipnet::IpNet;

use super::{Check, Layer, check, wireguard};
use crate::{
    datapath::{
        ROUTE_PROTOCOL,
        device::{IPIP_OVERHEAD, VXLAN_OVERHEAD, VXLAN6_OVERHEAD},
        ebpf, nexthop,
        nl::{Netlink, consts::AF_BRIDGE},
        routes::{IP6_TUNNEL_OVERHEAD, IPIP_DEVICE, VXLAN_DEVICE, link_local_of},
        rpfilter,
        rtnl::{self, IFF_UP, Link, Route},
        wireguard::{
            OVERHEAD_V4 as WG_OVERHEAD_V4, OVERHEAD_V6 as WG_OVERHEAD_V6, WG_DEVICE,
            uapi::DeviceState,
        },
    },
    model::format_mac,
    status::{RouteStatus, StatusReport, WireguardStatus, agent_info::AgentInfo},
};

const L: Layer = Layer::Datapath;

/// The LPM maps' entries: Pod CIDR → (tunnel endpoint, VTEP MAC).
pub type LpmEntries = BTreeMap<IpNet, (IpAddr, [u8; 6])>;

/// What the kernel holds of podmesh's, in this network namespace.
#[derive(Debug, Default)]
pub struct Installed {
    /// The tunnel device, when the mode has one and it is there.
    pub device: Option<Link>,
    /// Routes with podmesh's protocol, by destination.
    pub routes: BTreeMap<IpNet, Route>,
    /// podmesh's nexthop objects: id → gateway.
    pub nexthops: BTreeMap<u32, IpAddr>,
    /// ebpf: the LPM maps (CIDR → tunnel endpoint, VTEP MAC), or why they cannot be read.
    pub lpm: Option<Result<LpmEntries, String>>,
    /// vxlan: neighbours of the device (address → MAC).
    pub neighbours: BTreeMap<IpAddr, [u8; 6]>,
    /// vxlan: fdb entries of the device (MAC → remote).
    pub fdb: BTreeMap<[u8; 6], IpAddr>,
    /// The device holding this node's tunnel endpoint: (name, MTU).
    pub underlay: Option<(String, u32)>,
    /// The WireGuard device (`--encryption wireguard`), when it is there.
    pub wireguard: Option<Link>,
    /// The WireGuard device as WireGuard reports it (`--encryption wireguard`), or why it cannot be read.
    pub wg_device: Option<Result<DeviceState, String>>,
}

/// The tunnel device of a mode.
pub fn device_name(mode: &str) -> Option<&'static str> {
    match mode {
        "ebpf" => Some(podmesh_common::TUNNEL_DEVICE),
        "vxlan" => Some(VXLAN_DEVICE),
        "ipip" => Some(IPIP_DEVICE),
        _ => None,
    }
}

/// Reads what is installed for `info`'s mode, and the WireGuard device when
/// the agent runs one (`wg`; blocking: netlink, bpf syscalls, the UAPI socket).
pub fn read_installed(info: &AgentInfo, wg: Option<&WireguardStatus>) -> Result<Installed, String> {
    let mut nl = Netlink::open(None).map_err(|e| format!("opening netlink: {e}"))?;
    let mut out = Installed::default();
    if let Some(name) = device_name(&info.datapath) {
        out.device =
            rtnl::link_by_name(&mut nl, name).map_err(|e| format!("reading {name}: {e}"))?;
    }
    out.wireguard =
        rtnl::link_by_name(&mut nl, WG_DEVICE).map_err(|e| format!("reading {WG_DEVICE}: {e}"))?;
    out.wg_device = wg.map(|w| wireguard::read_device(info, w));
    if let Some(addr) = info.node_addresses.first()
        && let Ok(Some(index)) = rtnl::link_with_address(&mut nl, *addr)
    {
        out.underlay = rtnl::links(&mut nl)
            .map_err(|e| format!("listing links: {e}"))?
            .into_iter()
            .find(|l| l.index == index)
            .map(|l| (l.name, l.mtu));
    }
    out.routes = rtnl::routes_with_protocol(&mut nl, ROUTE_PROTOCOL)
        .map_err(|e| format!("listing podmesh's routes: {e}"))?
        .into_iter()
        .map(|r| (r.dst, r))
        .collect();
    out.nexthops = nexthop::nexthops_with_protocol(&mut nl, ROUTE_PROTOCOL)
        .map_err(|e| format!("listing podmesh's nexthop objects: {e}"))?
        .into_iter()
        .filter_map(|n| Some((n.id, n.gateway?)))
        .collect();
    match (info.datapath.as_str(), &out.device) {
        ("ebpf", _) => {
            out.lpm = Some(
                ebpf::pinned_entries(&info.bpf_pin_dir)
                    .map(|v| {
                        v.into_iter()
                            .map(|(c, n)| (c, (n.endpoint(), n.vtep_mac)))
                            .collect()
                    })
                    .map_err(|e| e.to_string()),
            );
        }
        ("vxlan", Some(dev)) => {
            // IPv4 next hops over an IPv4 underlay; over an IPv6 one, the
            // remote VTEPs' link-local addresses.
            for any in [IpAddr::from([0u8; 4]), IpAddr::from([0u8; 16])] {
                out.neighbours.extend(
                    rtnl::neighbours(&mut nl, rtnl::family_of(any), dev.index)
                        .map_err(|e| format!("listing neighbours: {e}"))?
                        .into_iter()
                        .filter_map(|(ip, mac)| Some((ip?, mac?))),
                );
            }
            out.fdb = rtnl::neighbours(&mut nl, AF_BRIDGE, dev.index)
                .map_err(|e| format!("listing fdb entries: {e}"))?
                .into_iter()
                .filter_map(|(ip, mac)| Some((mac?, ip?)))
                .collect();
        }
        _ => {}
    }
    Ok(out)
}

/// The node-wide checks: the tunnel device, CNI, masquerade, rp_filter.
pub fn node_checks(
    s: &StatusReport,
    info: &AgentInfo,
    inst: &Result<Installed, String>,
) -> Vec<Check> {
    let mut out = Vec::new();
    if info.dry_run {
        out.push(Check::pass(
            L,
            None,
            check::TUNNEL_DEVICE,
            "the agent runs with --datapath-dry-run: nothing is programmed in the kernel",
        ));
        return out;
    }
    match (inst, device_name(&info.datapath)) {
        (Err(e), _) => out.push(Check::fail(L, None, check::TUNNEL_DEVICE, format!("cannot read the kernel's state: {e}"), "run podmesh diagnose as root in the agent's network namespace (`kubectl exec ds/podmesh-agent -- podmesh diagnose`)")),
        (Ok(_), None) => out.push(Check::pass(L, None, check::TUNNEL_DEVICE, format!("{} mode: no tunnel device", info.datapath))),
        (Ok(i), Some(name)) => out.push(match &i.device {
            None => Check::fail(L, None, check::TUNNEL_DEVICE, format!("{name} does not exist"), "the agent creates it at start and puts it back at its next resync; if it stays gone, the agent's log says why (`datapath unavailable`)"),
            Some(d) if d.flags & IFF_UP == 0 => Check::fail(L, None, check::TUNNEL_DEVICE, format!("{name} is down"), format!("`ip link set {name} up`; the agent's next resync does it too: something on the node took it down")),
            Some(d) => match d.vxlan {
                Some(v) if v.port != info.tunnel_port => Check::fail(L, None, check::TUNNEL_DEVICE, format!("{name} uses UDP port {} but the agent is configured with --tunnel-port {}", v.port, info.tunnel_port), "restart the agent (it recreates the device), and use one tunnel-port in every cluster of the mesh"),
                Some(v) => Check::pass(L, None, check::TUNNEL_DEVICE, format!("{name} up, MTU {}, VXLAN UDP port {}{}", d.mtu, v.port, if v.external { ", external (collect_md)".to_string() } else { format!(", VNI {}", v.vni) })),
                None => Check::pass(L, None, check::TUNNEL_DEVICE, format!("{name} up, MTU {}", d.mtu)),
            },
        }),
    }
    if let Ok(i) = inst {
        out.extend(mtu(info, i));
        out.extend(stale(s, i));
    }
    for f in &s.cni {
        let evidence = format!("{}: {}; {}", f.cni, f.evidence.join(", "), f.podmesh);
        out.push(if f.severity == crate::cni::Severity::Warning {
            Check::warn(
                L,
                None,
                check::CNI,
                evidence,
                if f.action.is_empty() {
                    "see docs/cni.md".to_string()
                } else {
                    f.action.clone()
                },
            )
        } else {
            Check::pass(L, None, check::CNI, evidence)
        });
    }
    match &s.masquerade_exemption {
        Some(e) if e.error.is_some() || !e.installed => out.push(Check::warn(
            L,
            None,
            check::MASQUERADE,
            format!("masquerade exemption not in place: {}", e.error.as_deref().unwrap_or("not installed yet")),
            "pods of other clusters see this node's address instead of the pod's; `nft list table inet podmesh`; `cannot run nft` means the image lacks nftables",
        )),
        Some(e) => out.push(Check::pass(L, None, check::MASQUERADE, format!("{} remote Pod CIDRs exempt from masquerade ({} repairs)", e.cidrs, e.repairs))),
        None => {}
    }
    if !s.strict_rp_filter.is_empty() {
        out.push(Check::warn(
            L,
            None,
            check::RP_FILTER,
            format!("strict rp_filter on {}", s.strict_rp_filter.join(", ")),
            rpfilter::hint(&s.strict_rp_filter),
        ));
    }
    out
}

/// Whether the tunnel device's MTU plus the encapsulation fits the underlay
/// device's (and the WireGuard device's plus WireGuard's): a larger one
/// sends packets the underlay must fragment or drop.
fn mtu(info: &AgentInfo, i: &Installed) -> Vec<Check> {
    // The tunnel endpoint is the first node address (the underlay family's).
    let v6 = info.node_addresses.first().is_some_and(IpAddr::is_ipv6);
    let overhead = match (info.datapath.as_str(), v6) {
        ("ebpf" | "vxlan", false) => Some(VXLAN_OVERHEAD),
        ("ebpf" | "vxlan", true) => Some(VXLAN6_OVERHEAD),
        ("ipip", false) => Some(IPIP_OVERHEAD),
        ("ipip", true) => Some(IP6_TUNNEL_OVERHEAD),
        _ => None,
    };
    let wg = if v6 { WG_OVERHEAD_V6 } else { WG_OVERHEAD_V4 };
    [
        overhead.and_then(|o| fits(i.device.as_ref(), o, i.underlay.as_ref())),
        fits(i.wireguard.as_ref(), wg, i.underlay.as_ref()),
    ]
    .into_iter()
    .flatten()
    .collect()
}

fn fits(dev: Option<&Link>, overhead: u32, under: Option<&(String, u32)>) -> Option<Check> {
    let (dev, (under, under_mtu)) = (dev?, under?);
    Some(if dev.mtu + overhead > *under_mtu {
        Check::warn(
            L,
            None,
            check::TUNNEL_MTU,
            format!(
                "{} has MTU {}, which with {overhead} bytes of encapsulation passes {under}'s MTU {under_mtu}",
                dev.name, dev.mtu
            ),
            format!(
                "large packets between clusters are fragmented or dropped: set underlay-mtu to {under_mtu} (or less, if the path between the clusters is narrower) and restart the agent"
            ),
        )
    } else {
        Check::pass(
            L,
            None,
            check::TUNNEL_MTU,
            format!(
                "{} MTU {} + {overhead} bytes of encapsulation fits {under}'s MTU {under_mtu}",
                dev.name, dev.mtu
            ),
        )
    })
}

/// podmesh's entries in the kernel that no remote cluster wants now.
fn stale(s: &StatusReport, i: &Installed) -> Option<Check> {
    let desired: BTreeSet<IpNet> = s.routes.iter().map(|r| r.cidr).collect();
    let mut extra: Vec<String> = i
        .routes
        .keys()
        .filter(|c| !desired.contains(c))
        .map(|c| format!("route {c}"))
        .collect();
    if let Some(Ok(m)) = &i.lpm {
        extra.extend(
            m.keys()
                .filter(|c| !desired.contains(c))
                .map(|c| format!("LPM map entry {c}")),
        );
    }
    (!extra.is_empty()).then(|| {
        Check::warn(
            L,
            None,
            check::STALE_ENTRIES,
            format!("installed but wanted by no remote cluster: {}", extra.join(", ")),
            "the agent prunes them at its next full resync (--resync-interval); if they stay, something else installs routes with podmesh's protocol 80 (a second agent on the node?)",
        )
    })
}

/// What is wrong with one desired route in the kernel, if anything.
fn entry_problem(mode: &str, r: &RouteStatus, wg_peer: bool, i: &Installed) -> Option<String> {
    let mac = r.vtep_mac.clone().unwrap_or_default();
    let Some(route) = i.routes.get(&r.cidr) else {
        return Some(format!(
            "{} (node {}): no route (proto {ROUTE_PROTOCOL})",
            r.cidr, r.node
        ));
    };
    // A node with a WireGuard key is reached through the WireGuard device
    // instead of the mode's tunnel (its peer is the wireguard-peer check's).
    let into_wg = i
        .wireguard
        .as_ref()
        .is_some_and(|d| route.oif == Some(d.index));
    match (into_wg, wg_peer) {
        (true, true) => return None,
        (true, false) => {
            return Some(format!(
                "{}: the route leads into {WG_DEVICE}, but node {} publishes no WireGuard key",
                r.cidr, r.node
            ));
        }
        (false, true) => {
            return Some(format!(
                "{}: node {} publishes a WireGuard key, but the route does not lead into {WG_DEVICE}",
                r.cidr, r.node
            ));
        }
        (false, false) => {}
    }
    // The next hop: the node's address, or in vxlan mode over an IPv6
    // underlay or for an IPv6 Pod CIDR its VTEP's link-local address (the
    // fdb maps that MAC to the node).
    let hop = match (
        mode,
        r.vtep_mac.as_deref().and_then(crate::model::parse_mac),
    ) {
        ("vxlan", Some(m)) if r.node_addr.is_ipv6() || r.cidr.addr().is_ipv6() => {
            IpAddr::V6(link_local_of(m))
        }
        _ => r.node_addr,
    };
    match mode {
        "ebpf" => {
            if route.oif != i.device.as_ref().map(|d| d.index) {
                return Some(format!(
                    "{}: the route does not lead into {}",
                    r.cidr,
                    podmesh_common::TUNNEL_DEVICE
                ));
            }
            match &i.lpm {
                Some(Ok(m)) => match m.get(&r.cidr) {
                    None => {
                        return Some(format!(
                            "{} (node {}): no entry in the LPM map",
                            r.cidr, r.node
                        ));
                    }
                    Some((a, m)) if *a != r.node_addr || format_mac(*m) != mac => {
                        return Some(format!(
                            "{}: the LPM map sends to {a} ({}), not {} ({mac})",
                            r.cidr,
                            format_mac(*m),
                            r.node_addr
                        ));
                    }
                    Some(_) => {}
                },
                Some(Err(e)) => return Some(format!("the LPM maps cannot be read: {e}")),
                None => {}
            }
        }
        _ => {
            let via = route.nhid.and_then(|id| i.nexthops.get(&id));
            match via {
                None => {
                    return Some(format!(
                        "{} (node {}): the route has no podmesh nexthop",
                        r.cidr, r.node
                    ));
                }
                Some(a) if *a != hop => {
                    return Some(format!("{}: the route goes via {a}, not {hop}", r.cidr));
                }
                Some(_) => {}
            }
            if mode == "vxlan" {
                match i.neighbours.get(&hop) {
                    Some(m) if format_mac(*m) == mac => {}
                    other => {
                        return Some(format!(
                            "{}: neighbour {} is {}, not {mac}",
                            r.cidr,
                            hop,
                            other
                                .map(|m| format_mac(*m))
                                .unwrap_or_else(|| "missing".into())
                        ));
                    }
                }
                let fdb = r
                    .vtep_mac
                    .as_deref()
                    .and_then(crate::model::parse_mac)
                    .and_then(|m| i.fdb.get(&m));
                if fdb != Some(&r.node_addr) {
                    return Some(format!(
                        "{}: no fdb entry {mac} dst {}",
                        r.cidr, r.node_addr
                    ));
                }
            }
        }
    }
    None
}

/// Desired against installed for `cluster`'s routes.
pub fn check_entries(cluster: &str, s: &StatusReport, info: &AgentInfo, inst: &Installed) -> Check {
    let c = Some(cluster);
    let desired: Vec<&RouteStatus> = s.routes.iter().filter(|r| r.cluster == cluster).collect();
    if info.dry_run {
        return Check::pass(
            L,
            c,
            check::ENTRIES,
            format!(
                "{} routes desired; dry run, nothing in the kernel",
                desired.len()
            ),
        );
    }
    let problems: Vec<String> = desired
        .iter()
        .filter_map(|r| {
            let wg_peer = s.wireguard.is_some() && r.wireguard_public_key.is_some();
            entry_problem(&info.datapath, r, wg_peer, inst)
        })
        .collect();
    if problems.is_empty() {
        let what = match info.datapath.as_str() {
            "ebpf" => "route and LPM map entry",
            "vxlan" => "route, nexthop, neighbour and fdb entry",
            _ => "route and nexthop",
        };
        let encrypted = desired
            .iter()
            .filter(|r| s.wireguard.is_some() && r.wireguard_public_key.is_some())
            .count();
        Check::pass(
            L,
            c,
            check::ENTRIES,
            match encrypted {
                0 => format!(
                    "{} Pod CIDRs desired, each with its {what} in place",
                    desired.len()
                ),
                n if n == desired.len() => {
                    format!("{n} Pod CIDRs desired, each with its route into {WG_DEVICE}")
                }
                n => format!(
                    "{} Pod CIDRs desired: {n} with their route into {WG_DEVICE}, the others each with its {what} in place",
                    desired.len()
                ),
            },
        )
    } else {
        Check::fail(
            L,
            c,
            check::ENTRIES,
            problems.join("; "),
            "the agent puts missing entries back at its next full resync (--resync-interval, and on start); if they go again, something else on the node removes podmesh's routes (proto 80) or maps: find it (another agent's reconciler, a script flushing routes)",
        )
    }
}
