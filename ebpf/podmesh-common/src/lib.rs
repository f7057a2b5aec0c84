//! Map keys, values and constants shared by the tc program and the agent.
//!
//! Every type here is `#[repr(C)]` and declared once; user space gets
//! `aya::Pod` impls behind the `user` feature.
#![no_std]

/// Directory under bpffs where podmesh pins its maps and links.
pub const PIN_DIR: &str = "/sys/fs/bpf/podmesh";
/// Name of the LPM map of remote IPv4 Pod CIDRs (also its pin file name).
pub const REMOTES_V4_MAP: &str = "PODMESH_REMOTES_V4";
/// Name of the LPM map of remote IPv6 Pod CIDRs (also its pin file name).
pub const REMOTES_V6_MAP: &str = "PODMESH_REMOTES_V6";
/// Name of the per-CPU counters map.
pub const COUNTERS_MAP: &str = "PODMESH_COUNTERS";
/// Name of the map recording which remote cluster and node each installed
/// Pod CIDR belongs to (user space only; every kernel datapath mode).
pub const OWNERS_MAP: &str = "PODMESH_OWNERS";
/// Name of the tc egress program in the object (its ELF symbol).
pub const TUNNEL_EGRESS_PROG: &str = "podmesh_tunnel_egress";
/// File name, under the pin directory, of the pinned TCX link that keeps the
/// program attached to `podmesh0` while no agent runs.
pub const TUNNEL_EGRESS_LINK_PIN: &str = "tunnel_egress_link";
/// Name of the eBPF tunnel device.
pub const TUNNEL_DEVICE: &str = "podmesh0";
/// Maximum number of remote Pod CIDRs the LPM map holds.
pub const REMOTES_MAX_ENTRIES: u32 = 262_144;

/// Index into the counters array.
pub mod counter {
    /// Packets whose destination matched a remote Pod CIDR and were sent.
    pub const FORWARDED: u32 = 0;
    /// Packets whose destination matched no remote Pod CIDR (dropped).
    pub const MISS: u32 = 1;
    /// Packets that were neither IPv4 nor IPv6, or too short to parse (passed on).
    pub const NOT_IPV4: u32 = 2;
    /// Packets for which setting the tunnel key failed (dropped).
    pub const TUNNEL_KEY_FAILED: u32 = 3;
    /// Number of counters.
    pub const LEN: u32 = 4;
}

/// Value of the remote-CIDR LPM map: where to send packets for that CIDR.
///
/// The key is `aya::maps::lpm_trie::Key<[u8; 4]>` (IPv4) or `Key<[u8; 16]>`
/// (IPv6): prefix length, address in network byte order. The underlay (the
/// tunnel endpoint) is IPv4 or IPv6 independently of the key's family:
/// [`REMOTE_IPV6`] in `flags` says which address field holds it.
///
/// The first 16 bytes keep the layout of the IPv4-only value of earlier
/// versions (`flags` was padding, zero), which [`RemoteNodeV1`] describes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNode {
    /// Underlay IPv4 address of the remote node, host byte order (as
    /// `bpf_skb_set_tunnel_key` expects `remote_ipv4`); unused with [`REMOTE_IPV6`].
    pub addr_v4: u32,
    /// VXLAN network identifier.
    pub vni: u32,
    /// MAC address of the remote node's tunnel device: the inner
    /// destination MAC (the receiving stack drops frames not addressed to it).
    pub vtep_mac: [u8; 6],
    /// [`REMOTE_IPV6`] or zero.
    pub flags: u8,
    /// Reserved, zero.
    pub _pad: u8,
    /// Underlay IPv6 address of the remote node, network byte order (as
    /// `bpf_skb_set_tunnel_key` copies `remote_ipv6`); with [`REMOTE_IPV6`].
    pub addr_v6: [u8; 16],
}

/// [`RemoteNode::flags`]: the tunnel endpoint is `addr_v6` (an IPv6 underlay).
pub const REMOTE_IPV6: u8 = 1;

impl RemoteNode {
    /// The value for a remote node whose tunnel endpoint is `endpoint`.
    pub fn new(endpoint: core::net::IpAddr, vni: u32, vtep_mac: [u8; 6]) -> Self {
        let (addr_v4, flags, addr_v6) = match endpoint {
            core::net::IpAddr::V4(a) => (u32::from(a), 0, [0; 16]),
            core::net::IpAddr::V6(a) => (0, REMOTE_IPV6, a.octets()),
        };
        Self {
            addr_v4,
            vni,
            vtep_mac,
            flags,
            _pad: 0,
            addr_v6,
        }
    }

    /// The tunnel endpoint.
    pub fn endpoint(&self) -> core::net::IpAddr {
        if self.flags & REMOTE_IPV6 != 0 {
            core::net::IpAddr::from(self.addr_v6)
        } else {
            core::net::IpAddr::from(core::net::Ipv4Addr::from(self.addr_v4))
        }
    }
}

impl From<RemoteNodeV1> for RemoteNode {
    fn from(v: RemoteNodeV1) -> Self {
        Self::new(
            core::net::IpAddr::from(core::net::Ipv4Addr::from(v.addr_v4)),
            v.vni,
            v.vtep_mac,
        )
    }
}

/// The LPM maps' value before IPv6 underlays (16 bytes, IPv4 endpoint only):
/// what a map pinned by an earlier version holds, read once to carry its
/// entries over into maps of the current layout.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteNodeV1 {
    /// Underlay IPv4 address, host byte order.
    pub addr_v4: u32,
    /// VXLAN network identifier.
    pub vni: u32,
    /// MAC address of the remote node's tunnel device.
    pub vtep_mac: [u8; 6],
    /// Reserved, zero.
    pub _pad: [u8; 2],
}

/// Key of the owners map: one installed remote Pod CIDR.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OwnerKey {
    /// 4 (IPv4) or 6 (IPv6).
    pub family: u8,
    /// Prefix length.
    pub prefix_len: u8,
    /// Reserved, zero.
    pub _pad: [u8; 2],
    /// Network address; IPv4 in the first 4 bytes, the rest zero.
    pub addr: [u8; 16],
}

/// Longest cluster name the owners map holds (the wire contract's limit).
pub const OWNER_CLUSTER_MAX: usize = 32;
/// Longest node name the owners map holds (a Kubernetes node name's limit).
pub const OWNER_NODE_MAX: usize = 253;

/// Value of the owners map: the remote cluster and node of a Pod CIDR, so an
/// agent that restarts reads back exactly what it installed (names included)
/// and keeps it while it reconnects.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    /// Bytes used in `cluster`.
    pub cluster_len: u8,
    /// Bytes used in `node`.
    pub node_len: u8,
    /// Cluster name (UTF-8).
    pub cluster: [u8; OWNER_CLUSTER_MAX],
    /// Node name (UTF-8).
    pub node: [u8; OWNER_NODE_MAX],
    /// Reserved, zero.
    pub _pad: [u8; 1],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY: repr(C), Copy, explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::OwnerKey {}
    // SAFETY: repr(C), Copy, only byte fields, every bit pattern valid.
    unsafe impl aya::Pod for super::Owner {}
    // SAFETY: RemoteNode is repr(C), Copy, has no padding holes (explicit
    // `_pad`) and every bit pattern is valid.
    unsafe impl aya::Pod for super::RemoteNode {}
    // SAFETY: as RemoteNode: repr(C), Copy, explicit padding, any bits valid.
    unsafe impl aya::Pod for super::RemoteNodeV1 {}
}
