//! rtnetlink messages podmesh sends and reads back: links, addresses, routes, neighbours and fdb
//! entries, as netlink-packet-route's types.
//!
//! The messages are built and parsed with netlink-packet-route and travel
//! over [`Netlink`]'s batching socket (many requests per datagram, one ack
//! each), which keeps installing 100k routes linear. Nexthop objects, which
//! the crate has no type for, are in [`super::nexthop`].
use std::net::IpAddr;

use ipnet::IpNet;
use netlink_packet_core::{Emitable, Parseable};
use netlink_packet_route::{
    AddressFamily,
    address::{AddressAttribute, AddressMessage},
    link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage},
    neighbour::{
        NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
    },
    route::{
        RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteMetric, RouteProtocol,
        RouteScope, RouteType,
    },
};

use super::{
    base::{DatapathError, ROUTE_PROTOCOL},
    error::netlink_err,
    nl::{Msg, Netlink, NlError, consts::*},
};

/// The main routing table.
pub const RT_TABLE_MAIN: u8 = RouteHeader::RT_TABLE_MAIN;
/// Interface is up.
pub const IFF_UP: u32 = 0x1;
/// No ARP: the kernel uses the device's own address as neighbour address.
pub const IFF_NOARP: u32 = 0x80;
const RTM_GETADDR: u16 = 22;

/// A network device as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Link {
    /// ifindex.
    pub index: u32,
    /// Name.
    pub name: String,
    /// IFF_* flags.
    pub flags: u32,
    /// MTU.
    pub mtu: u32,
    /// Hardware address (empty for devices without one).
    pub mac: Vec<u8>,
    /// `rtnl_link_ops` kind (e.g. "vxlan"), if any.
    pub kind: Option<String>,
    /// For VXLAN devices: (VNI, UDP port, external/collect_md).
    pub vxlan: Option<VxlanInfo>,
}

/// The VXLAN parameters podmesh cares about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VxlanInfo {
    /// VNI (0 for external devices).
    pub vni: u32,
    /// Destination UDP port.
    pub port: u16,
    /// collect_md: the tunnel key comes from the packet's metadata.
    pub external: bool,
    /// Source address, when one is set.
    pub local: Option<IpAddr>,
}

/// The body of a request: the message's fixed header and attributes.
fn body(m: &impl Emitable) -> Vec<u8> {
    let mut b = vec![0u8; m.buffer_len()];
    m.emit(&mut b);
    b
}

/// Parses a reply body; a message the crate cannot parse is skipped (and
/// said at debug level): podmesh's own objects always parse.
fn parse<T: Parseable<[u8]>>(what: &str, b: &[u8]) -> Option<T> {
    match T::parse(b) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::debug!(error = %e, "skipping a {what} netlink-packet-route cannot parse");
            None
        }
    }
}

/// All links of the namespace.
pub fn links(nl: &mut Netlink) -> Result<Vec<Link>, NlError> {
    let replies = nl.dump(RTM_GETLINK, body(&LinkMessage::default()))?;
    Ok(replies
        .iter()
        .filter(|r| r.ty == RTM_NEWLINK)
        .filter_map(|r| parse::<LinkMessage>("link", &r.body))
        .map(|m| link_of(&m))
        .collect())
}

/// The link called `name`, if present.
pub fn link_by_name(nl: &mut Netlink, name: &str) -> Result<Option<Link>, NlError> {
    Ok(links(nl)?.into_iter().find(|l| l.name == name))
}

fn link_of(m: &LinkMessage) -> Link {
    let mut link = Link {
        index: m.header.index,
        name: String::new(),
        flags: m.header.flags.bits(),
        mtu: 0,
        mac: Vec::new(),
        kind: None,
        vxlan: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => link.name = n.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Address(mac) => link.mac = mac.clone(),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(kind) => link.kind = Some(kind.to_string()),
                        LinkInfo::Data(InfoData::Vxlan(data)) => {
                            let mut v = VxlanInfo {
                                vni: 0,
                                port: 0,
                                external: false,
                                local: None,
                            };
                            for d in data {
                                match d {
                                    InfoVxlan::Id(vni) => v.vni = *vni,
                                    InfoVxlan::Port(port) => v.port = *port,
                                    InfoVxlan::CollectMetadata(on) => v.external = *on,
                                    InfoVxlan::Local(a) => v.local = Some(IpAddr::V4(*a)),
                                    InfoVxlan::Local6(a) => v.local = Some(IpAddr::V6(*a)),
                                    _ => {}
                                }
                            }
                            link.vxlan = Some(v);
                        }
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    link
}

fn link_message(index: u32, flags: u32, change: u32) -> LinkMessage {
    let mut m = LinkMessage::default();
    m.header.index = index;
    m.header.flags = LinkFlags::from_bits_retain(flags);
    m.header.change_mask = LinkFlags::from_bits_retain(change);
    m
}

/// RTM_NEWLINK of a VXLAN device: external (collect_md) when `vni` is
/// `None`, learning off either way (podmesh programs every entry itself);
/// with `mac`, that Ethernet address instead of a random one; with an
/// IPv6 `local` (`::` included), an IPv6 device.
pub fn vxlan_create(
    name: &str,
    vni: Option<u32>,
    port: u16,
    mtu: u32,
    mac: Option<[u8; 6]>,
    local: Option<IpAddr>,
) -> Msg {
    let mut data = vec![match vni {
        Some(vni) => InfoVxlan::Id(vni),
        None => InfoVxlan::CollectMetadata(true),
    }];
    data.extend([InfoVxlan::Port(port), InfoVxlan::Learning(false)]);
    match local {
        Some(IpAddr::V4(a)) => data.push(InfoVxlan::Local(a)),
        Some(IpAddr::V6(a)) => data.push(InfoVxlan::Local6(a)),
        None => {}
    }
    let mut m = link_message(0, 0, 0);
    m.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Vxlan),
            LinkInfo::Data(InfoData::Vxlan(data)),
        ]),
    ];
    if let Some(mac) = mac {
        m.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    Msg {
        ty: RTM_NEWLINK,
        flags: NLM_F_CREATE | NLM_F_EXCL,
        body: body(&m),
    }
}

/// RTM_NEWLINK of an external (collect_md) ip6tnl device in "any" mode
/// (IPv4 and IPv6 inside): each packet's outer destination comes from its
/// route's `encap ip6` nexthop.
pub fn ip6tnl_create(name: &str, mtu: u32) -> Msg {
    use netlink_packet_route::{IpProtocol, link::InfoIpTunnel};
    let mut m = link_message(0, 0, 0);
    m.attributes = vec![
        LinkAttribute::IfName(name.to_string()),
        LinkAttribute::Mtu(mtu),
        LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Ip6Tnl),
            LinkInfo::Data(InfoData::IpTunnel(vec![
                InfoIpTunnel::Protocol(IpProtocol::from(0u8)),
                InfoIpTunnel::CollectMetadata,
            ])),
        ]),
    ];
    Msg {
        ty: RTM_NEWLINK,
        flags: NLM_F_CREATE | NLM_F_EXCL,
        body: body(&m),
    }
}

/// Creates an ip6tnl device (see [`ip6tnl_create`]).
pub fn create_ip6tnl(nl: &mut Netlink, name: &str, mtu: u32) -> Result<(), NlError> {
    nl.request(ip6tnl_create(name, mtu))
}

/// Creates a VXLAN device (see [`vxlan_create`]).
pub fn create_vxlan(
    nl: &mut Netlink,
    name: &str,
    vni: Option<u32>,
    port: u16,
    mtu: u32,
    mac: Option<[u8; 6]>,
    local: Option<IpAddr>,
) -> Result<(), NlError> {
    nl.request(vxlan_create(name, vni, port, mtu, mac, local))
}

/// RTM_NEWLINK that sets the flags in `mask` to the values in `flags`, and the MTU when given.
pub fn link_set(index: u32, flags: u32, mask: u32, mtu: Option<u32>) -> Msg {
    let mut m = link_message(index, flags, mask);
    if let Some(mtu) = mtu {
        m.attributes.push(LinkAttribute::Mtu(mtu));
    }
    Msg {
        ty: RTM_NEWLINK,
        flags: 0,
        body: body(&m),
    }
}

/// Sets the flags in `mask` to the values in `flags`, and the MTU when given.
pub fn set_link(
    nl: &mut Netlink,
    index: u32,
    flags: u32,
    mask: u32,
    mtu: Option<u32>,
) -> Result<(), NlError> {
    nl.request(link_set(index, flags, mask, mtu))
}

/// RTM_DELLINK of the link with this index.
pub fn link_delete(index: u32) -> Msg {
    Msg {
        ty: RTM_DELLINK,
        flags: 0,
        body: body(&link_message(index, 0, 0)),
    }
}

/// Deletes the link with this index.
pub fn delete_link(nl: &mut Netlink, index: u32) -> Result<(), NlError> {
    nl.request(link_delete(index))
}

/// The ifindex of the link that holds address `addr`, if any.
pub fn link_with_address(nl: &mut Netlink, addr: IpAddr) -> Result<Option<u32>, NlError> {
    let mut req = AddressMessage::default();
    req.header.family = AddressFamily::from(family_of(addr));
    let replies = nl.dump(RTM_GETADDR, body(&req))?;
    Ok(replies
        .iter()
        .filter_map(|r| parse::<AddressMessage>("address", &r.body))
        .find(|m| {
            m.attributes.iter().any(|a| {
                matches!(a, AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if *ip == addr)
            })
        })
        .map(|m| m.header.index))
}

/// Where the kernel would send a packet for `dst`: (output ifindex, gateway).
pub fn route_get(nl: &mut Netlink, dst: IpAddr) -> Result<(u32, Option<IpAddr>), NlError> {
    let mut req = route_message(family_of(dst), host_len(dst), 0, 0, 0, 0);
    req.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    // A plain (non-dump) GET answers with one RTM_NEWROUTE; `dump` reads until
    // the ack, which the kernel sends after it for NLM_F_ACK requests.
    let replies = nl.get(RTM_GETROUTE, body(&req))?;
    let r = replies
        .iter()
        .filter(|r| r.ty == RTM_NEWROUTE)
        .find_map(|r| parse::<RouteMessage>("route", &r.body))
        .ok_or(NlError::Malformed("no route in RTM_GETROUTE reply"))?;
    let mut oif = 0;
    let mut gw = None;
    for a in &r.attributes {
        match a {
            RouteAttribute::Oif(o) => oif = *o,
            RouteAttribute::Gateway(g) => gw = route_ip(g),
            _ => {}
        }
    }
    Ok((oif, gw))
}

/// What a podmesh route points at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteTarget {
    /// Straight into a device (scope link): the eBPF tunnel device.
    Dev(u32),
    /// Through a nexthop object.
    Nexthop(u32),
}

/// A route owned by podmesh, as read back from the kernel.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// Destination.
    pub dst: IpNet,
    /// Output device, if the route names one.
    pub oif: Option<u32>,
    /// Nexthop object id, if the route uses one.
    pub nhid: Option<u32>,
    /// Route MTU metric, if set.
    pub mtu: Option<u32>,
}

const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTN_UNSPEC: u8 = 0;
const RTN_UNICAST: u8 = 1;

/// A route message with this `struct rtmsg` (no source prefix, TOS or flags).
fn route_message(
    family: u8,
    dst_len: u8,
    table: u8,
    proto: u8,
    scope: u8,
    kind: u8,
) -> RouteMessage {
    let mut m = RouteMessage::default();
    m.header.address_family = AddressFamily::from(family);
    m.header.destination_prefix_length = dst_len;
    m.header.table = table;
    m.header.protocol = RouteProtocol::from(proto);
    m.header.scope = RouteScope::from(scope);
    m.header.kind = RouteType::from(kind);
    m
}

/// RTM_NEWROUTE (create or replace) of `dst` in the main table with `proto`.
pub fn route_replace(dst: IpNet, target: RouteTarget, proto: u8, mtu: Option<u32>) -> Msg {
    let scope = match target {
        RouteTarget::Dev(_) => RT_SCOPE_LINK,
        RouteTarget::Nexthop(_) => RT_SCOPE_UNIVERSE,
    };
    let mut m = route_message(
        family_of(dst.addr()),
        dst.prefix_len(),
        RT_TABLE_MAIN,
        proto,
        scope,
        RTN_UNICAST,
    );
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            dst.network(),
        )));
    m.attributes.push(match target {
        RouteTarget::Dev(oif) => RouteAttribute::Oif(oif),
        RouteTarget::Nexthop(id) => RouteAttribute::NhId(id),
    });
    if let Some(mtu) = mtu {
        m.attributes
            .push(RouteAttribute::Metrics(vec![RouteMetric::Mtu(mtu)]));
    }
    Msg {
        ty: RTM_NEWROUTE,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body(&m),
    }
}

/// RTM_DELROUTE of `dst` in the main table, only if its protocol is `proto`.
pub fn route_delete(dst: IpNet, proto: u8) -> Msg {
    let mut m = route_message(
        family_of(dst.addr()),
        dst.prefix_len(),
        RT_TABLE_MAIN,
        proto,
        RT_SCOPE_NOWHERE,
        RTN_UNSPEC,
    );
    m.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            dst.network(),
        )));
    Msg {
        ty: RTM_DELROUTE,
        flags: 0,
        body: body(&m),
    }
}

/// The main-table routes (both families) whose protocol is `proto`.
pub fn routes_with_protocol(nl: &mut Netlink, proto: u8) -> Result<Vec<Route>, NlError> {
    Ok(main_routes(nl)?
        .into_iter()
        .filter(|(p, ..)| *p == proto)
        .map(|(_, _, _, r)| r)
        .collect())
}

/// Directly connected networks of the main table (no gateway; IPv4: scope
/// link; IPv6, whose routes are all scope universe: the kernel's own
/// prefix routes of its addresses): (network, device).
pub fn connected_routes(nl: &mut Netlink) -> Result<Vec<(IpNet, u32)>, NlError> {
    /// `RTPROT_KERNEL`: routes the kernel added for an address.
    const RTPROT_KERNEL: u8 = 2;
    Ok(main_routes(nl)?
        .into_iter()
        .filter(|(proto, scope, gw, r)| {
            let connected = match r.dst {
                IpNet::V4(_) => *scope == RT_SCOPE_LINK,
                IpNet::V6(_) => *proto == RTPROT_KERNEL,
            };
            connected && gw.is_none() && r.nhid.is_none()
        })
        .filter_map(|(_, _, _, r)| Some((r.dst, r.oif?)))
        .collect())
}

/// A main-table route with its protocol, scope and gateway.
type RouteRow = (u8, u8, Option<IpAddr>, Route);

/// Unicast routes of the main table: (protocol, scope, gateway, route).
fn main_routes(nl: &mut Netlink) -> Result<Vec<RouteRow>, NlError> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let req = route_message(family, 0, 0, 0, 0, 0);
        let replies = nl.dump(RTM_GETROUTE, body(&req))?;
        for m in replies
            .iter()
            .filter(|r| r.ty == RTM_NEWROUTE)
            .filter_map(|r| parse::<RouteMessage>("route", &r.body))
        {
            let h = &m.header;
            if u8::from(h.kind) != RTN_UNICAST {
                continue;
            }
            let mut table = u32::from(h.table);
            let mut dst = None;
            let mut gw = None;
            let mut route = Route {
                dst: IpNet::default(),
                oif: None,
                nhid: None,
                mtu: None,
            };
            for a in &m.attributes {
                match a {
                    RouteAttribute::Table(t) => table = *t,
                    RouteAttribute::Destination(d) => dst = route_ip(d),
                    RouteAttribute::Oif(o) => route.oif = Some(*o),
                    RouteAttribute::Gateway(g) => gw = route_ip(g),
                    RouteAttribute::NhId(id) => route.nhid = Some(*id),
                    RouteAttribute::Metrics(metrics) => {
                        route.mtu = metrics.iter().find_map(|x| match x {
                            RouteMetric::Mtu(mtu) => Some(*mtu),
                            _ => None,
                        })
                    }
                    _ => {}
                }
            }
            if table != u32::from(RT_TABLE_MAIN) {
                continue;
            }
            let addr = dst.unwrap_or(if family == AF_INET {
                IpAddr::from([0u8; 4])
            } else {
                IpAddr::from([0u16; 8])
            });
            if let Ok(net) = IpNet::new(addr, h.destination_prefix_length) {
                route.dst = net;
                out.push((u8::from(h.protocol), u8::from(h.scope), gw, route));
            }
        }
    }
    Ok(out)
}

fn route_ip(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(a) => Some(IpAddr::V4(*a)),
        RouteAddress::Inet6(a) => Some(IpAddr::V6(*a)),
        _ => None,
    }
}

/// Deletes podmesh's routes of these CIDRs; absent ones are fine.
pub fn delete_routes(nl: &mut Netlink, cidrs: &[IpNet]) -> Result<(), DatapathError> {
    let failures = nl
        .batch(cidrs.iter().map(|c| route_delete(*c, ROUTE_PROTOCOL)))
        .map_err(netlink_err("deleting routes"))?;
    let mut failed = failures
        .into_iter()
        .filter(|(_, errno)| *errno != libc::ESRCH && *errno != libc::ENOENT);
    match failed.next() {
        Some((i, errno)) => Err(DatapathError::op(
            "delete route",
            cidrs[i],
            errno,
            failed.count(),
        )),
        None => Ok(()),
    }
}

/// A neighbour message of `family` on `ifindex` in `state` with `flags`.
fn neighbour_message(family: u8, ifindex: u32, state: u16, flags: u8) -> NeighbourMessage {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::from(family);
    m.header.ifindex = ifindex;
    m.header.state = NeighbourState::from(state);
    m.header.flags = NeighbourFlags::from_bits_retain(flags);
    m
}

const NUD_PERMANENT: u16 = 0x80;
const NTF_SELF: u8 = 0x02;

fn neighbour_ip(ip: IpAddr) -> NeighbourAttribute {
    NeighbourAttribute::Destination(match ip {
        IpAddr::V4(a) => NeighbourAddress::Inet(a),
        IpAddr::V6(a) => NeighbourAddress::Inet6(a),
    })
}

/// A permanent neighbour `ip lladdr mac dev ifindex` (create or replace).
pub fn neigh_replace(ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> Msg {
    let mut m = neighbour_message(family_of(ip), ifindex, NUD_PERMANENT, 0);
    m.attributes = vec![
        neighbour_ip(ip),
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
    ];
    Msg {
        ty: RTM_NEWNEIGH,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body(&m),
    }
}

/// Deletes the neighbour `ip` on `ifindex`.
pub fn neigh_delete(ifindex: u32, ip: IpAddr) -> Msg {
    let mut m = neighbour_message(family_of(ip), ifindex, 0, 0);
    m.attributes = vec![neighbour_ip(ip)];
    Msg {
        ty: RTM_DELNEIGH,
        flags: 0,
        body: body(&m),
    }
}

/// A permanent VXLAN fdb entry `mac dev ifindex dst remote self` (create or replace).
pub fn fdb_replace(ifindex: u32, mac: [u8; 6], remote: IpAddr) -> Msg {
    let mut m = neighbour_message(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF);
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        neighbour_ip(remote),
    ];
    Msg {
        ty: RTM_NEWNEIGH,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body(&m),
    }
}

/// Deletes the fdb entry `mac` (towards `remote`) on `ifindex`.
pub fn fdb_delete(ifindex: u32, mac: [u8; 6], remote: IpAddr) -> Msg {
    let mut m = neighbour_message(AF_BRIDGE, ifindex, 0, NTF_SELF);
    m.attributes = vec![
        NeighbourAttribute::LinkLayerAddress(mac.to_vec()),
        neighbour_ip(remote),
    ];
    Msg {
        ty: RTM_DELNEIGH,
        flags: 0,
        body: body(&m),
    }
}

/// A neighbour or fdb entry as read back: (address, lladdr).
pub type NeighEntry = (Option<IpAddr>, Option<[u8; 6]>);

/// Neighbours (`family` AF_INET/AF_INET6) or fdb entries (AF_BRIDGE) of `ifindex`.
pub fn neighbours(nl: &mut Netlink, family: u8, ifindex: u32) -> Result<Vec<NeighEntry>, NlError> {
    let replies = nl.dump(RTM_GETNEIGH, body(&neighbour_message(family, 0, 0, 0)))?;
    Ok(replies
        .iter()
        .filter(|r| r.ty == RTM_NEWNEIGH)
        .filter_map(|r| parse::<NeighbourMessage>("neighbour", &r.body))
        .filter(|m| m.header.ifindex == ifindex)
        .map(|m| {
            let mut e: NeighEntry = (None, None);
            for a in &m.attributes {
                match a {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        e.0 = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        e.0 = Some(IpAddr::V6(*a))
                    }
                    // fdb entries (AF_BRIDGE): the crate leaves the address raw.
                    NeighbourAttribute::Destination(NeighbourAddress::Other(v)) => {
                        e.0 = parse_ip(v)
                    }
                    NeighbourAttribute::LinkLayerAddress(mac) => {
                        e.1 = mac.as_slice().try_into().ok()
                    }
                    _ => {}
                }
            }
            e
        })
        .collect())
}

/// AF_INET or AF_INET6.
pub fn family_of(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { AF_INET } else { AF_INET6 }
}

fn host_len(ip: IpAddr) -> u8 {
    if ip.is_ipv4() { 32 } else { 128 }
}

/// Network-order address bytes.
pub fn ip_bytes(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(a) => a.octets().to_vec(),
        IpAddr::V6(a) => a.octets().to_vec(),
    }
}

/// An address attribute's value (4 or 16 bytes).
pub fn parse_ip(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
        _ => None,
    }
}

/// The bytes each message had when podmesh encoded them by hand (before
/// netlink-packet-route): type, NLM_F_* flags and body must stay exactly
/// these, so the kernel sees the same requests.
#[cfg(all(test, target_endian = "little"))]
mod tests {
    use super::*;

    fn hex(m: &Msg) -> String {
        let body: String = m.body.iter().map(|b| format!("{b:02x}")).collect();
        format!("{} {:#x} {body}", m.ty, m.flags)
    }

    const MAC: [u8; 6] = [0x02, 0x00, 0xc0, 0xa8, 0x01, 0x0a];

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn routes_encode_as_before() {
        let cases = [
            (
                route_replace(
                    net("10.2.1.0/24"),
                    RouteTarget::Nexthop(0x5000_0001),
                    80,
                    Some(1450),
                ),
                "24 0x500 02180000fe50000100000000080001000a02010008001e00010000500c00080008000200aa050000",
            ),
            (
                route_replace(net("10.2.1.0/24"), RouteTarget::Nexthop(5), 80, None),
                "24 0x500 02180000fe50000100000000080001000a02010008001e0005000000",
            ),
            (
                route_replace(net("fd00:2::/64"), RouteTarget::Dev(7), 80, Some(1450)),
                "24 0x500 0a400000fe50fd010000000014000100fd00000200000000000000000000000008000400070000000c00080008000200aa050000",
            ),
            (
                route_replace(net("10.9.0.0/16"), RouteTarget::Dev(7), 80, Some(1450)),
                "24 0x500 02100000fe50fd0100000000080001000a09000008000400070000000c00080008000200aa050000",
            ),
            (
                route_delete(net("10.2.1.0/24"), 80),
                "25 0x0 02180000fe50ff0000000000080001000a020100",
            ),
            (
                route_delete(net("fd00:2::/64"), 80),
                "25 0x0 0a400000fe50ff000000000014000100fd000002000000000000000000000000",
            ),
        ];
        for (m, want) in cases {
            assert_eq!(hex(&m), want);
        }
    }

    #[test]
    fn neighbours_and_fdb_entries_encode_as_before() {
        let cases = [
            (
                neigh_replace(7, ip("192.168.1.2"), MAC),
                "28 0x500 02000000070000008000000008000100c0a801020a0002000200c0a8010a0000",
            ),
            (
                neigh_replace(7, ip("fd00::1"), MAC),
                "28 0x500 0a000000070000008000000014000100fd0000000000000000000000000000010a0002000200c0a8010a0000",
            ),
            (
                neigh_delete(7, ip("192.168.1.2")),
                "29 0x0 02000000070000000000000008000100c0a80102",
            ),
            (
                neigh_delete(7, ip("fd00::1")),
                "29 0x0 0a000000070000000000000014000100fd000000000000000000000000000001",
            ),
            (
                fdb_replace(7, MAC, ip("192.168.1.2")),
                "28 0x500 0700000007000000800002000a0002000200c0a8010a000008000100c0a80102",
            ),
            (
                fdb_delete(7, MAC, ip("192.168.1.2")),
                "29 0x0 0700000007000000000002000a0002000200c0a8010a000008000100c0a80102",
            ),
        ];
        for (m, want) in cases {
            assert_eq!(hex(&m), want);
        }
    }

    /// Links as before, but for two details the kernel reads the same
    /// way: the hand encoder set NLA_F_NESTED (0x8000) on IFLA_LINKINFO and
    /// IFLA_INFO_DATA, netlink-packet-route does not (nor does iproute2),
    /// and the kernel parses both with `nla_parse_nested_deprecated`, which
    /// accepts either; the crate sends IFLA_INFO_KIND NUL-terminated
    /// ("vxlan\0", length 10 instead of 9), an NLA_STRING either way.
    #[test]
    fn links_encode_as_before() {
        let unflag = |s: &str| {
            s.replace("2c001280", "2c001200")
                .replace("1c000280", "1c000200")
                .replace("0900010076786c616e", "0a00010076786c616e")
        };
        let cases = [
            (
                vxlan_create("podmesh0", None, 8472, 1450, None, None),
                "16 0x600 000000000000000000000000000000000d000300706f646d657368300000000008000400aa0500002c0012800900010076786c616e0000001c000280050019000100000006000f00211800000500070000000000",
            ),
            (
                vxlan_create("podmesh-vx", Some(1), 8472, 1450, Some(MAC), None),
                "16 0x600 000000000000000000000000000000000f000300706f646d6573682d7678000008000400aa0500002c0012800900010076786c616e0000001c000280080001000100000006000f002118000005000700000000000a0001000200c0a8010a0000",
            ),
            (
                link_set(5, IFF_UP, IFF_UP | IFF_NOARP, Some(1450)),
                "16 0x0 0000000005000000010000008100000008000400aa050000",
            ),
            (
                link_set(5, IFF_UP, IFF_UP, None),
                "16 0x0 00000000050000000100000001000000",
            ),
            (link_delete(5), "17 0x0 00000000050000000000000000000000"),
        ];
        for (m, want) in cases {
            assert_eq!(hex(&m), unflag(want));
        }
    }

    #[test]
    fn requests_encode_as_before() {
        let mut get = route_message(AF_INET, 32, 0, 0, 0, 0);
        get.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(ip(
                "192.168.1.2",
            ))));
        let mut addr = AddressMessage::default();
        addr.header.family = AddressFamily::Inet;
        let cases = [
            (body(&get), "02200000000000000000000008000100c0a80102"),
            (
                body(&LinkMessage::default()),
                "00000000000000000000000000000000",
            ),
            (
                body(&route_message(AF_INET, 0, 0, 0, 0, 0)),
                "020000000000000000000000",
            ),
            (
                body(&route_message(AF_INET6, 0, 0, 0, 0, 0)),
                "0a0000000000000000000000",
            ),
            (
                body(&neighbour_message(AF_BRIDGE, 0, 0, 0)),
                "070000000000000000000000",
            ),
            (body(&addr), "0200000000000000"),
        ];
        for (b, want) in cases {
            let got: String = b.iter().map(|b| format!("{b:02x}")).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn replies_parse_back() {
        let m = route_replace(net("10.2.1.0/24"), RouteTarget::Nexthop(7), 80, Some(1450));
        let r = RouteMessage::parse(&m.body).unwrap();
        assert_eq!(u8::from(r.header.protocol), 80);
        assert!(r.attributes.contains(&RouteAttribute::NhId(7)));
        let m = fdb_replace(7, MAC, ip("192.168.1.2"));
        let n = NeighbourMessage::parse(&m.body).unwrap();
        assert!(
            n.attributes
                .contains(&NeighbourAttribute::Destination(NeighbourAddress::Other(
                    vec![192, 168, 1, 2]
                )))
        );
        let m = vxlan_create("podmesh0", None, 8472, 1450, None, None);
        let l = link_of(&LinkMessage::parse(&m.body).unwrap());
        assert_eq!(l.name, "podmesh0");
        assert_eq!(l.kind.as_deref(), Some("vxlan"));
        assert_eq!(
            l.vxlan,
            Some(VxlanInfo {
                vni: 0,
                port: 8472,
                external: true,
                local: None,
            })
        );
    }
}
