//! Kernel WireGuard over generic netlink (the "wireguard" family, include/uapi/linux/wireguard.h):
//! creating the device, reading it and changing it, with the operations the userspace socket
//! offers ([`super::uapi`]), so that the rest of podmesh does not care which one runs.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
};

use ipnet::IpNet;

use super::uapi::{DeviceState, PeerChange, PeerState};
use crate::datapath::{
    base::DatapathError,
    nl::{Attrs, Msg, Netlink, NlError, attrs, link},
};

const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

const WG_CMD_GET_DEVICE: u8 = 0;
const WG_CMD_SET_DEVICE: u8 = 1;
const WG_GENL_VERSION: u8 = 1;
const WGDEVICE_A_IFNAME: u16 = 2;
const WGDEVICE_A_PRIVATE_KEY: u16 = 3;
const WGDEVICE_A_LISTEN_PORT: u16 = 6;
const WGDEVICE_A_PEERS: u16 = 8;
const WGPEER_A_PUBLIC_KEY: u16 = 1;
const WGPEER_A_FLAGS: u16 = 3;
const WGPEER_A_ENDPOINT: u16 = 4;
const WGPEER_A_LAST_HANDSHAKE_TIME: u16 = 6;
const WGPEER_A_RX_BYTES: u16 = 7;
const WGPEER_A_TX_BYTES: u16 = 8;
const WGPEER_A_ALLOWEDIPS: u16 = 9;
const WGPEER_F_REMOVE_ME: u32 = 1;
const WGPEER_F_REPLACE_ALLOWEDIPS: u32 = 2;
const WGALLOWEDIP_A_FAMILY: u16 = 1;
const WGALLOWEDIP_A_IPADDR: u16 = 2;
const WGALLOWEDIP_A_CIDR_MASK: u16 = 3;
/// Peers per set message: keeps each well under a netlink message's size.
const PEERS_PER_MESSAGE: usize = 64;

fn genl_err(context: &'static str) -> impl FnOnce(NlError) -> DatapathError {
    move |e| DatapathError::netlink(context, e)
}

/// Creates the kernel WireGuard device `name`; fails (EOPNOTSUPP) where the
/// kernel has no WireGuard.
pub fn create_link(nl: &mut Netlink, name: &str) -> Result<(), DatapathError> {
    nl.request(link::create(name, "wireguard")).map_err(|e| {
        DatapathError::Unavailable(format!(
            "cannot create the kernel WireGuard device {name} ({e}): this kernel has no \
             WireGuard; use --wireguard-backend userspace or auto"
        ))
    })
}

/// Creates the device when the kernel can; whether it did.
pub fn try_create(nl: &mut Netlink, name: &str) -> bool {
    match create_link(nl, name) {
        Ok(()) => true,
        Err(e) => {
            tracing::info!(reason = %e, "no kernel WireGuard; using the userspace one");
            false
        }
    }
}

fn nul(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn genl_header(cmd: u8, version: u8) -> [u8; 4] {
    [cmd, version, 0, 0]
}

/// The id of the "wireguard" generic netlink family.
fn family(nl: &mut Netlink) -> Result<u16, DatapathError> {
    let mut a = Attrs::with_header(&genl_header(CTRL_CMD_GETFAMILY, 1));
    a.put(CTRL_ATTR_FAMILY_NAME, &nul("wireguard"));
    let replies = nl
        .get(GENL_ID_CTRL, a.build())
        .map_err(genl_err("resolving the wireguard netlink family"))?;
    replies
        .iter()
        .flat_map(|r| attrs(r.body.get(4..).unwrap_or_default()))
        .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
        .and_then(|(_, v)| Some(u16::from_ne_bytes(v.get(0..2)?.try_into().ok()?)))
        .ok_or_else(|| {
            DatapathError::Unavailable("the kernel has no wireguard netlink family".into())
        })
}

fn open(netns: Option<&Path>) -> Result<(Netlink, u16), DatapathError> {
    let mut nl = Netlink::open_generic(netns).map_err(genl_err("opening generic netlink"))?;
    let id = family(&mut nl)?;
    Ok((nl, id))
}

/// Reads the kernel device `name`.
pub fn get(netns: Option<&Path>, name: &str) -> Result<DeviceState, DatapathError> {
    let (mut nl, id) = open(netns)?;
    let mut a = Attrs::with_header(&genl_header(WG_CMD_GET_DEVICE, WG_GENL_VERSION));
    a.put(WGDEVICE_A_IFNAME, &nul(name));
    let replies = nl
        .dump(id, a.build())
        .map_err(genl_err("reading the kernel WireGuard device"))?;
    let mut d = DeviceState::default();
    for r in replies {
        parse_device(r.body.get(4..).unwrap_or_default(), &mut d);
    }
    Ok(d)
}

/// Adds one message of a (possibly split) GET_DEVICE dump to `d`: a peer that
/// continues the previous message's last one adds its allowed IPs to it.
fn parse_device(body: &[u8], d: &mut DeviceState) {
    for (t, v) in attrs(body) {
        match t {
            WGDEVICE_A_PRIVATE_KEY => d.private_key = key(v).filter(|k| *k != [0; 32]),
            WGDEVICE_A_LISTEN_PORT => {
                d.listen_port = v.get(0..2).map_or(0, |b| u16::from_ne_bytes([b[0], b[1]]));
            }
            WGDEVICE_A_PEERS => {
                for (_, p) in attrs(v) {
                    let peer = parse_peer(p);
                    match d.peers.last_mut() {
                        Some(last) if last.public_key == peer.public_key => {
                            last.allowed_ips.extend(peer.allowed_ips);
                        }
                        _ => d.peers.push(peer),
                    }
                }
            }
            _ => {}
        }
    }
}

fn key(v: &[u8]) -> Option<[u8; 32]> {
    v.get(0..32)?.try_into().ok()
}

fn u64_of(v: &[u8]) -> u64 {
    v.get(0..8)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

fn parse_peer(p: &[u8]) -> PeerState {
    let mut peer = PeerState::default();
    for (t, v) in attrs(p) {
        match t {
            WGPEER_A_PUBLIC_KEY => peer.public_key = key(v).unwrap_or_default(),
            WGPEER_A_ENDPOINT => peer.endpoint = parse_sockaddr(v),
            WGPEER_A_LAST_HANDSHAKE_TIME => peer.last_handshake_sec = u64_of(v),
            WGPEER_A_RX_BYTES => peer.rx_bytes = u64_of(v),
            WGPEER_A_TX_BYTES => peer.tx_bytes = u64_of(v),
            WGPEER_A_ALLOWEDIPS => {
                for (_, a) in attrs(v) {
                    if let Some(net) = parse_allowed_ip(a) {
                        peer.allowed_ips.insert(net);
                    }
                }
            }
            _ => {}
        }
    }
    peer
}

fn parse_allowed_ip(a: &[u8]) -> Option<IpNet> {
    let (mut addr, mut mask) = (None, None);
    for (t, v) in attrs(a) {
        match t {
            WGALLOWEDIP_A_IPADDR => {
                addr = match v.len() {
                    4 => Some(IpAddr::from(<[u8; 4]>::try_from(v).ok()?)),
                    16 => Some(IpAddr::from(<[u8; 16]>::try_from(v).ok()?)),
                    _ => None,
                }
            }
            WGALLOWEDIP_A_CIDR_MASK => mask = v.first().copied(),
            _ => {}
        }
    }
    IpNet::new(addr?, mask?).ok()
}

/// `struct sockaddr_in` / `sockaddr_in6` (port in network order).
fn parse_sockaddr(v: &[u8]) -> Option<SocketAddr> {
    let family = u16::from_ne_bytes(v.get(0..2)?.try_into().ok()?);
    let port = u16::from_be_bytes(v.get(2..4)?.try_into().ok()?);
    match family {
        2 => Some(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(v.get(4..8)?).ok()?)),
            port,
        )),
        10 => Some(SocketAddr::new(
            IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(v.get(8..24)?).ok()?)),
            port,
        )),
        _ => None,
    }
}

fn sockaddr(e: &SocketAddr) -> Vec<u8> {
    match e {
        SocketAddr::V4(a) => {
            let mut v = Vec::with_capacity(16);
            v.extend_from_slice(&2u16.to_ne_bytes());
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&[0; 8]);
            v
        }
        SocketAddr::V6(a) => {
            let mut v = Vec::with_capacity(28);
            v.extend_from_slice(&10u16.to_ne_bytes());
            v.extend_from_slice(&a.port().to_be_bytes());
            v.extend_from_slice(&a.flowinfo().to_ne_bytes());
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.scope_id().to_ne_bytes());
            v
        }
    }
}

fn allowed_ips(nets: &BTreeSet<IpNet>) -> Attrs {
    let mut list = Attrs::default();
    for n in nets {
        let mut a = Attrs::default();
        let (family, addr): (u16, Vec<u8>) = match n.addr() {
            IpAddr::V4(v4) => (2, v4.octets().to_vec()),
            IpAddr::V6(v6) => (10, v6.octets().to_vec()),
        };
        a.put(WGALLOWEDIP_A_FAMILY, &family.to_ne_bytes())
            .put(WGALLOWEDIP_A_IPADDR, &addr)
            .put(WGALLOWEDIP_A_CIDR_MASK, &[n.prefix_len()]);
        list.nested(0, &a);
    }
    list
}

fn peer_attrs(c: &PeerChange) -> Attrs {
    let mut p = Attrs::default();
    match c {
        PeerChange::Remove(k) => {
            p.put(WGPEER_A_PUBLIC_KEY, k)
                .u32(WGPEER_A_FLAGS, WGPEER_F_REMOVE_ME);
        }
        PeerChange::Upsert {
            public_key,
            endpoint,
            allowed_ips: nets,
        } => {
            p.put(WGPEER_A_PUBLIC_KEY, public_key)
                .u32(WGPEER_A_FLAGS, WGPEER_F_REPLACE_ALLOWEDIPS)
                .put(WGPEER_A_ENDPOINT, &sockaddr(endpoint))
                .nested(WGPEER_A_ALLOWEDIPS, &allowed_ips(nets));
        }
    }
    p
}

/// The SET_DEVICE messages for these changes (the key and port in the first).
fn set_messages(
    name: &str,
    private_key: Option<&[u8; 32]>,
    port: Option<u16>,
    changes: &[PeerChange],
) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut chunks: Vec<&[PeerChange]> = changes.chunks(PEERS_PER_MESSAGE).collect();
    if chunks.is_empty() {
        chunks.push(&[]);
    }
    for (i, chunk) in chunks.into_iter().enumerate() {
        let mut a = Attrs::with_header(&genl_header(WG_CMD_SET_DEVICE, WG_GENL_VERSION));
        a.put(WGDEVICE_A_IFNAME, &nul(name));
        if i == 0 {
            if let Some(k) = private_key {
                a.put(WGDEVICE_A_PRIVATE_KEY, k);
            }
            if let Some(p) = port {
                a.put(WGDEVICE_A_LISTEN_PORT, &p.to_ne_bytes());
            }
        }
        if !chunk.is_empty() {
            let mut peers = Attrs::default();
            for c in chunk {
                peers.nested(0, &peer_attrs(c));
            }
            a.nested(WGDEVICE_A_PEERS, &peers);
        }
        out.push(a.build());
    }
    out
}

/// Changes the kernel device `name`.
pub fn set(
    netns: Option<&Path>,
    name: &str,
    private_key: Option<&[u8; 32]>,
    port: Option<u16>,
    changes: &[PeerChange],
) -> Result<(), DatapathError> {
    let (mut nl, id) = open(netns)?;
    for body in set_messages(name, private_key, port, changes) {
        nl.request(Msg {
            ty: id,
            flags: 0,
            body,
        })
        .map_err(genl_err("configuring the kernel WireGuard device"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A SET message read back as a GET answer carries the same device.
    #[test]
    fn set_messages_parse_back() {
        let change = PeerChange::Upsert {
            public_key: [3; 32],
            endpoint: "172.31.2.1:51871".parse().unwrap(),
            allowed_ips: [
                "10.2.0.0/24".parse().unwrap(),
                "fd00:2::/64".parse().unwrap(),
            ]
            .into(),
        };
        let msgs = set_messages("podmesh-wg", Some(&[9; 32]), Some(51871), &[change]);
        assert_eq!(msgs.len(), 1);
        let mut d = DeviceState::default();
        parse_device(&msgs[0][4..], &mut d);
        assert_eq!(d.private_key, Some([9; 32]));
        assert_eq!(d.listen_port, 51871);
        assert_eq!(d.peers.len(), 1);
        assert_eq!(d.peers[0].public_key, [3; 32]);
        assert_eq!(
            d.peers[0].endpoint,
            Some("172.31.2.1:51871".parse().unwrap())
        );
        assert_eq!(d.peers[0].allowed_ips.len(), 2);
        let many: Vec<PeerChange> = (0..130)
            .map(|i| PeerChange::Remove([i as u8; 32]))
            .collect();
        assert_eq!(set_messages("podmesh-wg", None, None, &many).len(), 3);
    }
}
