//! Kernel nexthop objects (RTM_*NEXTHOP), encoded by hand: netlink-packet-route 0.34 has no
//! message type for them.
//!
//! Everything else podmesh sends over rtnetlink is built with
//! netlink-packet-route's types in [`super::rtnl`]; this module is the one
//! place that writes a message layout itself, from the kernel's uapi
//! (include/uapi/linux/nexthop.h: `struct nhmsg` and the `NHA_*`
//! attributes). Replace it with the crate's type once it has one.
use std::net::{IpAddr, Ipv6Addr};

use super::{
    nl::{Attrs, Msg, Netlink, NlError, as_u32, attrs, consts::*},
    rtnl::{family_of, ip_bytes, parse_ip},
};

const RT_SCOPE_UNIVERSE: u8 = 0;
const RTNH_F_ONLINK: u32 = 4;
const NHA_ID: u16 = 1;
const NHA_OIF: u16 = 5;
const NHA_GATEWAY: u16 = 6;
const NHA_ENCAP_TYPE: u16 = 7;
const NHA_ENCAP: u16 = 8;
/// `LWTUNNEL_ENCAP_IP6` (include/uapi/linux/lwtunnel.h).
const LWTUNNEL_ENCAP_IP6: u16 = 4;
const LWTUNNEL_IP6_DST: u16 = 2;
const LWTUNNEL_IP6_HOPLIMIT: u16 = 4;
/// `struct nhmsg`: family, scope, protocol, reserved, flags (u32).
const NHMSG_LEN: usize = 8;

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
    /// Destination of an `encap ip6` (lightweight tunnel) nexthop.
    pub encap_dst: Option<IpAddr>,
}

impl Nexthop {
    /// Where it sends to: its gateway, or its tunnel destination.
    pub fn target(&self) -> Option<IpAddr> {
        self.gateway.or(self.encap_dst)
    }
}

/// RTM_NEWNEXTHOP (create or replace): `encap ip6 dst <dst> hoplimit 64 dev oif proto`,
/// a lightweight-tunnel nexthop for a collect_md IPv6 tunnel device: the
/// device takes each packet's outer destination from it
/// (net/ipv6/ip6_tunnel.c, `ip6_tnl_start_xmit` with `collect_md`). IPv4
/// and IPv6 routes may both use it.
pub fn nexthop_encap_ip6_replace(id: u32, dst: Ipv6Addr, oif: u32, proto: u8) -> Msg {
    let mut h = vec![family_of(IpAddr::V6(dst)), RT_SCOPE_UNIVERSE, proto, 0];
    h.extend_from_slice(&0u32.to_ne_bytes());
    let mut encap = Attrs::with_header(&[]);
    encap
        .put(LWTUNNEL_IP6_DST, &dst.octets())
        .put(LWTUNNEL_IP6_HOPLIMIT, &[64]);
    let mut body = Attrs::with_header(&h);
    body.u32(NHA_ID, id)
        .u32(NHA_OIF, oif)
        .put(NHA_ENCAP_TYPE, &LWTUNNEL_ENCAP_IP6.to_ne_bytes())
        .nested(NHA_ENCAP, &encap);
    Msg {
        ty: RTM_NEWNEXTHOP,
        flags: NLM_F_CREATE | NLM_F_REPLACE,
        body: body.build(),
    }
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
    let mut body = Attrs::with_header(&[0u8; NHMSG_LEN]);
    body.u32(NHA_ID, id);
    Msg {
        ty: RTM_DELNEXTHOP,
        flags: 0,
        body: body.build(),
    }
}

/// Every nexthop object whose protocol is `proto`.
pub fn nexthops_with_protocol(nl: &mut Netlink, proto: u8) -> Result<Vec<Nexthop>, NlError> {
    let replies = nl.dump(RTM_GETNEXTHOP, vec![0u8; NHMSG_LEN])?;
    let mut out = Vec::new();
    for r in replies
        .iter()
        .filter(|r| r.ty == RTM_NEWNEXTHOP && r.body.len() >= NHMSG_LEN)
    {
        if r.body[2] != proto {
            continue;
        }
        let mut nh = Nexthop {
            id: 0,
            proto,
            gateway: None,
            oif: None,
            encap_dst: None,
        };
        for (ty, v) in attrs(&r.body[NHMSG_LEN..]) {
            match ty {
                NHA_ID => nh.id = as_u32(v).unwrap_or_default(),
                NHA_OIF => nh.oif = as_u32(v),
                NHA_GATEWAY => nh.gateway = parse_ip(v),
                NHA_ENCAP => {
                    nh.encap_dst = attrs(v)
                        .find(|(t, _)| *t == LWTUNNEL_IP6_DST)
                        .and_then(|(_, a)| parse_ip(a));
                }
                _ => {}
            }
        }
        out.push(nh);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes the kernel gets (`struct nhmsg` + attributes), as `ip
    /// nexthop replace id 0x50000001 via 192.168.1.2 dev 3 onlink proto 80`
    /// (host byte order: little-endian machines).
    #[cfg(target_endian = "little")]
    #[test]
    fn nexthop_messages_keep_their_layout() {
        let m = nexthop_replace(0x5000_0001, "192.168.1.2".parse().unwrap(), 3, true, 80);
        assert_eq!((m.ty, m.flags), (RTM_NEWNEXTHOP, 0x500));
        assert_eq!(
            hex(&m.body),
            "02005000040000000800010001000050080005000300000008000600c0a80102"
        );
        let m = nexthop_delete(0x5000_0001);
        assert_eq!((m.ty, m.flags), (RTM_DELNEXTHOP, 0));
        assert_eq!(hex(&m.body), "00000000000000000800010001000050");
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }
}
