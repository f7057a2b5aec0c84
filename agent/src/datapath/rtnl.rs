//! Typed rtnetlink messages podmesh sends: links, routes, nexthop objects, neighbours, fdb.
//!
//! Layouts follow include/uapi/linux/{rtnetlink,if_link,neighbour,nexthop}.h.
use std::net::IpAddr;

use ipnet::IpNet;

use super::{
    base::{DatapathError, ROUTE_PROTOCOL},
    error::netlink_err,
    nl::{Attrs, Msg, Netlink, NlError, as_u32, attrs, consts::*},
};

/// The main routing table.
pub const RT_TABLE_MAIN: u8 = 254;
const RTN_UNICAST: u8 = 1;
const RT_SCOPE_UNIVERSE: u8 = 0;
const RT_SCOPE_LINK: u8 = 253;
const RT_SCOPE_NOWHERE: u8 = 255;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_METRICS: u16 = 8;
const RTA_TABLE: u16 = 15;
const RTA_NH_ID: u16 = 30;
const RTAX_MTU: u16 = 2;
const RTNH_F_ONLINK: u32 = 4;

const IFLA_ADDRESS: u16 = 1;
const IFLA_IFNAME: u16 = 3;
const IFLA_MTU: u16 = 4;
const IFLA_LINKINFO: u16 = 18;
const IFLA_INFO_KIND: u16 = 1;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_VXLAN_ID: u16 = 1;
const IFLA_VXLAN_LEARNING: u16 = 7;
const IFLA_VXLAN_PORT: u16 = 15;
const IFLA_VXLAN_COLLECT_METADATA: u16 = 25;
/// Interface is up.
pub const IFF_UP: u32 = 0x1;
/// No ARP: the kernel uses the device's own address as neighbour address.
pub const IFF_NOARP: u32 = 0x80;

const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;

const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NTF_SELF: u8 = 0x02;

const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
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
}

/// All links of the namespace.
pub fn links(nl: &mut Netlink) -> Result<Vec<Link>, NlError> {
    let replies = nl.dump(RTM_GETLINK, vec![0u8; 16])?;
    Ok(replies
        .iter()
        .filter(|r| r.ty == RTM_NEWLINK && r.body.len() >= 16)
        .map(|r| parse_link(&r.body))
        .collect())
}

/// The link called `name`, if present.
pub fn link_by_name(nl: &mut Netlink, name: &str) -> Result<Option<Link>, NlError> {
    Ok(links(nl)?.into_iter().find(|l| l.name == name))
}

fn parse_link(b: &[u8]) -> Link {
    let index = as_u32(&b[4..8]).unwrap_or_default();
    let flags = as_u32(&b[8..12]).unwrap_or_default();
    let mut link = Link {
        index,
        name: String::new(),
        flags,
        mtu: 0,
        mac: Vec::new(),
        kind: None,
        vxlan: None,
    };
    for (ty, v) in attrs(&b[16..]) {
        match ty {
            IFLA_IFNAME => {
                link.name =
                    String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap_or(v)).into_owned()
            }
            IFLA_MTU => link.mtu = as_u32(v).unwrap_or_default(),
            IFLA_ADDRESS => link.mac = v.to_vec(),
            IFLA_LINKINFO => {
                for (ity, iv) in attrs(v) {
                    match ity {
                        IFLA_INFO_KIND => {
                            link.kind = Some(
                                String::from_utf8_lossy(iv.split(|c| *c == 0).next().unwrap_or(iv))
                                    .into_owned(),
                            )
                        }
                        IFLA_INFO_DATA if link.kind.as_deref() == Some("vxlan") => {
                            let mut info = VxlanInfo {
                                vni: 0,
                                port: 0,
                                external: false,
                            };
                            for (dty, dv) in attrs(iv) {
                                match dty {
                                    IFLA_VXLAN_ID => info.vni = as_u32(dv).unwrap_or_default(),
                                    IFLA_VXLAN_PORT if dv.len() >= 2 => {
                                        info.port = u16::from_be_bytes([dv[0], dv[1]])
                                    }
                                    IFLA_VXLAN_COLLECT_METADATA => {
                                        info.external = dv.first().copied().unwrap_or(0) != 0
                                    }
                                    _ => {}
                                }
                            }
                            link.vxlan = Some(info);
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

fn ifinfomsg(index: u32, flags: u32, change: u32) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[4..8].copy_from_slice(&index.to_ne_bytes());
    h[8..12].copy_from_slice(&flags.to_ne_bytes());
    h[12..16].copy_from_slice(&change.to_ne_bytes());
    h
}

/// Creates a VXLAN device: external (collect_md) when `vni` is `None`,
/// learning off either way (podmesh programs every entry itself); with
/// `mac`, that Ethernet address instead of a random one.
pub fn create_vxlan(
    nl: &mut Netlink,
    name: &str,
    vni: Option<u32>,
    port: u16,
    mtu: u32,
    mac: Option<[u8; 6]>,
) -> Result<(), NlError> {
    let mut data = Attrs::default();
    match vni {
        Some(vni) => {
            data.u32(IFLA_VXLAN_ID, vni);
        }
        None => {
            data.put(IFLA_VXLAN_COLLECT_METADATA, &[1]);
        }
    }
    data.put(IFLA_VXLAN_PORT, &port.to_be_bytes())
        .put(IFLA_VXLAN_LEARNING, &[0]);
    let mut info = Attrs::default();
    info.put(IFLA_INFO_KIND, b"vxlan");
    info.nested(IFLA_INFO_DATA, &data);
    let mut body = Attrs::with_header(&ifinfomsg(0, 0, 0));
    body.put(IFLA_IFNAME, &nul_terminated(name))
        .u32(IFLA_MTU, mtu)
        .nested(IFLA_LINKINFO, &info);
    if let Some(mac) = mac {
        body.put(IFLA_ADDRESS, &mac);
    }
    nl.request(Msg {
        ty: RTM_NEWLINK,
        flags: NLM_F_CREATE | NLM_F_EXCL,
        body: body.build(),
    })
}

/// Sets the flags in `mask` to the values in `flags`, and the MTU when given.
pub fn set_link(
    nl: &mut Netlink,
    index: u32,
    flags: u32,
    mask: u32,
    mtu: Option<u32>,
) -> Result<(), NlError> {
    let mut body = Attrs::with_header(&ifinfomsg(index, flags, mask));
    if let Some(mtu) = mtu {
        body.u32(IFLA_MTU, mtu);
    }
    nl.request(Msg {
        ty: RTM_NEWLINK,
        flags: 0,
        body: body.build(),
    })
}

/// Deletes the link with this index.
pub fn delete_link(nl: &mut Netlink, index: u32) -> Result<(), NlError> {
    nl.request(Msg {
        ty: RTM_DELLINK,
        flags: 0,
        body: ifinfomsg(index, 0, 0),
    })
}

/// The ifindex of the link that holds address `addr`, if any.
pub fn link_with_address(nl: &mut Netlink, addr: IpAddr) -> Result<Option<u32>, NlError> {
    let family = family_of(addr);
    let replies = nl.dump(RTM_GETADDR, vec![family, 0, 0, 0, 0, 0, 0, 0])?;
    for r in replies.iter().filter(|r| r.body.len() >= 8) {
        let index = as_u32(&r.body[4..8]).unwrap_or_default();
        for (ty, v) in attrs(&r.body[8..]) {
            if (ty == IFA_LOCAL || ty == IFA_ADDRESS) && parse_ip(v) == Some(addr) {
                return Ok(Some(index));
            }
        }
    }
    Ok(None)
}

/// Where the kernel would send a packet for `dst`: (output ifindex, gateway).
pub fn route_get(nl: &mut Netlink, dst: IpAddr) -> Result<(u32, Option<IpAddr>), NlError> {
    let mut body = Attrs::with_header(&rtmsg(family_of(dst), host_len(dst), 0, 0, 0, 0));
    body.put(RTA_DST, &ip_bytes(dst));
    // A plain (non-dump) GET answers with one RTM_NEWROUTE; `dump` reads until
    // the ack, which the kernel sends after it for NLM_F_ACK requests.
    let replies = nl.get(RTM_GETROUTE, body.build())?;
    let r = replies
        .iter()
        .find(|r| r.ty == RTM_NEWROUTE)
        .ok_or(NlError::Malformed("no route in RTM_GETROUTE reply"))?;
    let mut oif = 0;
    let mut gw = None;
    for (ty, v) in attrs(&r.body[12..]) {
        match ty {
            RTA_OIF => oif = as_u32(v).unwrap_or_default(),
            RTA_GATEWAY => gw = parse_ip(v),
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

fn rtmsg(family: u8, dst_len: u8, table: u8, proto: u8, scope: u8, ty: u8) -> Vec<u8> {
    vec![family, dst_len, 0, 0, table, proto, scope, ty, 0, 0, 0, 0]
}

/// RTM_NEWROUTE (create or replace) of `dst` in the main table with `proto`.
pub fn route_replace(dst: IpNet, target: RouteTarget, proto: u8, mtu: Option<u32>) -> Msg {
    let scope = match target {
        RouteTarget::Dev(_) => RT_SCOPE_LINK,
        RouteTarget::Nexthop(_) => RT_SCOPE_UNIVERSE,
    };
    let mut body = Attrs::with_header(&rtmsg(
        family_of(dst.addr()),
        dst.prefix_len(),
        RT_TABLE_MAIN,
        proto,
        scope,
        RTN_UNICAST,
    ));
    body.put(RTA_DST, &ip_bytes(dst.network()));
    match target {
        RouteTarget::Dev(oif) => body.u32(RTA_OIF, oif),
        RouteTarget::Nexthop(id) => body.u32(RTA_NH_ID, id),
    };
    if let Some(mtu) = mtu {
        let mut m = Attrs::default();
        m.u32(RTAX_MTU, mtu);
        body.put(RTA_METRICS, &m.0);
    }
    Msg {
        ty: RTM_NEWROUTE,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body.build(),
    }
}

/// RTM_DELROUTE of `dst` in the main table, only if its protocol is `proto`.
pub fn route_delete(dst: IpNet, proto: u8) -> Msg {
    let mut body = Attrs::with_header(&rtmsg(
        family_of(dst.addr()),
        dst.prefix_len(),
        RT_TABLE_MAIN,
        proto,
        RT_SCOPE_NOWHERE,
        0,
    ));
    body.put(RTA_DST, &ip_bytes(dst.network()));
    Msg {
        ty: RTM_DELROUTE,
        flags: 0,
        body: body.build(),
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

/// Directly connected networks of the main table (scope link, no gateway):
/// (network, device).
pub fn connected_routes(nl: &mut Netlink) -> Result<Vec<(IpNet, u32)>, NlError> {
    Ok(main_routes(nl)?
        .into_iter()
        .filter(|(_, scope, gw, r)| *scope == RT_SCOPE_LINK && gw.is_none() && r.nhid.is_none())
        .filter_map(|(_, _, _, r)| Some((r.dst, r.oif?)))
        .collect())
}

/// A main-table route with its protocol, scope and gateway.
type RouteRow = (u8, u8, Option<IpAddr>, Route);

/// Unicast routes of the main table: (protocol, scope, gateway, route).
fn main_routes(nl: &mut Netlink) -> Result<Vec<RouteRow>, NlError> {
    let mut out = Vec::new();
    for family in [AF_INET, AF_INET6] {
        let replies = nl.dump(RTM_GETROUTE, rtmsg(family, 0, 0, 0, 0, 0))?;
        for r in replies
            .iter()
            .filter(|r| r.ty == RTM_NEWROUTE && r.body.len() >= 12)
        {
            let b = &r.body;
            if b[7] != RTN_UNICAST {
                continue;
            }
            let mut table = u32::from(b[4]);
            let mut dst = None;
            let mut gw = None;
            let mut route = Route {
                dst: IpNet::default(),
                oif: None,
                nhid: None,
                mtu: None,
            };
            for (ty, v) in attrs(&b[12..]) {
                match ty {
                    RTA_TABLE => table = as_u32(v).unwrap_or(table),
                    RTA_DST => dst = parse_ip(v),
                    RTA_OIF => route.oif = as_u32(v),
                    RTA_GATEWAY => gw = parse_ip(v),
                    RTA_NH_ID => route.nhid = as_u32(v),
                    RTA_METRICS => {
                        route.mtu = attrs(v)
                            .find(|(t, _)| *t == RTAX_MTU)
                            .and_then(|(_, v)| as_u32(v))
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
            if let Ok(net) = IpNet::new(addr, b[1]) {
                route.dst = net;
                out.push((b[5], b[6], gw, route));
            }
        }
    }
    Ok(out)
}

/// A nexthop object as read back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Nexthop {
    /// Object id.
    pub id: u32,
    /// Owner protocol.
    pub proto: u8,
    /// Gateway.
    pub gateway: Option<IpAddr>,
    /// Device.
    pub oif: Option<u32>,
}

/// RTM_NEWNEXTHOP (create or replace): `via gateway dev oif [onlink] proto`.
pub fn nexthop_replace(id: u32, gateway: IpAddr, oif: u32, onlink: bool, proto: u8) -> Msg {
    let flags = if onlink { RTNH_F_ONLINK } else { 0 };
    let mut h = vec![family_of(gateway), RT_SCOPE_UNIVERSE, proto, 0];
    h.extend_from_slice(&flags.to_ne_bytes());
    let mut body = Attrs::with_header(&h);
    body.u32(NHA_ID, id)
        .u32(NHA_OIF, oif)
        .put(NHA_GATEWAY, &ip_bytes(gateway));
    Msg {
        ty: RTM_NEWNEXTHOP,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body.build(),
    }
}

/// RTM_DELNEXTHOP of `id`.
pub fn nexthop_delete(id: u32) -> Msg {
    let mut body = Attrs::with_header(&[0u8; 8]);
    body.u32(NHA_ID, id);
    Msg {
        ty: RTM_DELNEXTHOP,
        flags: 0,
        body: body.build(),
    }
}

/// Every nexthop object whose protocol is `proto`.
pub fn nexthops_with_protocol(nl: &mut Netlink, proto: u8) -> Result<Vec<Nexthop>, NlError> {
    let replies = nl.dump(RTM_GETNEXTHOP, vec![0u8; 8])?;
    let mut out = Vec::new();
    for r in replies
        .iter()
        .filter(|r| r.ty == RTM_NEWNEXTHOP && r.body.len() >= 8)
    {
        if r.body[2] != proto {
            continue;
        }
        let mut nh = Nexthop {
            id: 0,
            proto,
            gateway: None,
            oif: None,
        };
        for (ty, v) in attrs(&r.body[8..]) {
            match ty {
                NHA_ID => nh.id = as_u32(v).unwrap_or_default(),
                NHA_OIF => nh.oif = as_u32(v),
                NHA_GATEWAY => nh.gateway = parse_ip(v),
                _ => {}
            }
        }
        out.push(nh);
    }
    Ok(out)
}

fn ndmsg(family: u8, ifindex: u32, state: u16, flags: u8) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[0] = family;
    h[4..8].copy_from_slice(&ifindex.to_ne_bytes());
    h[8..10].copy_from_slice(&state.to_ne_bytes());
    h[10] = flags;
    h
}

/// A permanent neighbour `ip lladdr mac dev ifindex` (create or replace).
pub fn neigh_replace(ifindex: u32, ip: IpAddr, mac: [u8; 6]) -> Msg {
    let mut body = Attrs::with_header(&ndmsg(family_of(ip), ifindex, NUD_PERMANENT, 0));
    body.put(NDA_DST, &ip_bytes(ip)).put(NDA_LLADDR, &mac);
    Msg {
        ty: RTM_NEWNEIGH,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body.build(),
    }
}

/// Deletes the neighbour `ip` on `ifindex`.
pub fn neigh_delete(ifindex: u32, ip: IpAddr) -> Msg {
    let mut body = Attrs::with_header(&ndmsg(family_of(ip), ifindex, 0, 0));
    body.put(NDA_DST, &ip_bytes(ip));
    Msg {
        ty: RTM_DELNEIGH,
        flags: 0,
        body: body.build(),
    }
}

/// A permanent VXLAN fdb entry `mac dev ifindex dst remote self` (create or replace).
pub fn fdb_replace(ifindex: u32, mac: [u8; 6], remote: IpAddr) -> Msg {
    let mut body = Attrs::with_header(&ndmsg(AF_BRIDGE, ifindex, NUD_PERMANENT, NTF_SELF));
    body.put(NDA_LLADDR, &mac).put(NDA_DST, &ip_bytes(remote));
    Msg {
        ty: RTM_NEWNEIGH,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body.build(),
    }
}

/// Deletes the fdb entry `mac` (towards `remote`) on `ifindex`.
pub fn fdb_delete(ifindex: u32, mac: [u8; 6], remote: IpAddr) -> Msg {
    let mut body = Attrs::with_header(&ndmsg(AF_BRIDGE, ifindex, 0, NTF_SELF));
    body.put(NDA_LLADDR, &mac).put(NDA_DST, &ip_bytes(remote));
    Msg {
        ty: RTM_DELNEIGH,
        flags: 0,
        body: body.build(),
    }
}

/// A neighbour or fdb entry as read back: (address, lladdr).
pub type NeighEntry = (Option<IpAddr>, Option<[u8; 6]>);

/// Neighbours (`family` AF_INET/AF_INET6) or fdb entries (AF_BRIDGE) of `ifindex`.
pub fn neighbours(nl: &mut Netlink, family: u8, ifindex: u32) -> Result<Vec<NeighEntry>, NlError> {
    let replies = nl.dump(RTM_GETNEIGH, ndmsg(family, 0, 0, 0))?;
    Ok(replies
        .iter()
        .filter(|r| r.ty == RTM_NEWNEIGH && r.body.len() >= 12)
        .filter(|r| as_u32(&r.body[4..8]) == Some(ifindex))
        .map(|r| {
            let mut e: NeighEntry = (None, None);
            for (ty, v) in attrs(&r.body[12..]) {
                match ty {
                    NDA_DST => e.0 = parse_ip(v),
                    NDA_LLADDR => e.1 = v.try_into().ok(),
                    _ => {}
                }
            }
            e
        })
        .collect())
}

fn nul_terminated(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
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

fn parse_ip(v: &[u8]) -> Option<IpAddr> {
    match v.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_replace_carries_destination_protocol_and_mtu() {
        let m = route_replace(
            "10.2.1.0/24".parse().unwrap(),
            RouteTarget::Nexthop(7),
            80,
            Some(1450),
        );
        assert_eq!(m.ty, RTM_NEWROUTE);
        assert_eq!(&m.body[..8], &[AF_INET, 24, 0, 0, 254, 80, 0, 1]);
        let a: Vec<_> = attrs(&m.body[12..]).collect();
        assert_eq!(a[0], (RTA_DST, &[10u8, 2, 1, 0][..]));
        assert_eq!(a[1], (RTA_NH_ID, &7u32.to_ne_bytes()[..]));
        let metrics: Vec<_> = attrs(a[2].1).collect();
        assert_eq!(metrics, vec![(RTAX_MTU, &1450u32.to_ne_bytes()[..])]);
    }

    #[test]
    fn nexthop_replace_sets_onlink_and_owner() {
        let m = nexthop_replace(9, "192.168.1.2".parse().unwrap(), 3, true, 80);
        assert_eq!(&m.body[..4], &[AF_INET, 0, 80, 0]);
        assert_eq!(as_u32(&m.body[4..8]), Some(RTNH_F_ONLINK));
    }
}
