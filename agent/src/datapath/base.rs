//! The datapath's shared vocabulary: the trait, its types, its errors and the kernel configuration.
//!
//! The bottom of the datapath's layering (see the module doc of
//! [`super`]): everything else may use this module, and it uses nothing of
//! the datapath but [`super::error`] (whose types it re-exports).
use std::{
    collections::BTreeSet,
    future::Future,
    net::IpAddr,
    path::{Path, PathBuf},
};

use ipnet::IpNet;

pub use super::error::{DatapathError, Refusal, RefusalReason};
use crate::{config::DatapathMode, model::UnderlayFamily};

/// Route protocol number of every route podmesh installs (`ip route show
/// proto 80`): prune and resync touch only routes with this number.
pub const ROUTE_PROTOCOL: u8 = 80;
/// First id of podmesh's nexthop objects (which also carry [`ROUTE_PROTOCOL`]).
pub const NEXTHOP_ID_FIRST: u32 = 0x5000_0000;
/// Last id of podmesh's nexthop objects.
pub const NEXTHOP_ID_LAST: u32 = 0x5fff_ffff;

/// One remote node Pod CIDR and where to send its packets.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct RemoteRoute {
    /// The remote node's Pod CIDR (canonical).
    pub cidr: IpNet,
    /// The remote cluster.
    pub cluster: String,
    /// The remote node.
    pub node: String,
    /// The remote node's tunnel endpoint / next hop (its address of the underlay family).
    pub node_addr: IpAddr,
    /// The remote node's tunnel device MAC, when it published one.
    pub vtep_mac: Option<[u8; 6]>,
    /// The remote node's WireGuard public key, when it published one.
    #[serde(skip)]
    pub wireguard_key: Option<[u8; 32]>,
}

impl RemoteRoute {
    /// This record, refused for `reason`.
    pub fn refusal(&self, reason: RefusalReason) -> Refusal {
        Refusal {
            cidr: self.cidr,
            cluster: self.cluster.clone(),
            node: self.node.clone(),
            reason,
        }
    }
}

/// What `prune` removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PruneReport {
    /// CIDRs whose entries were removed.
    pub removed: Vec<IpNet>,
}

/// The kernel side of podmesh. Every method is idempotent.
pub trait Datapath: Send {
    /// Installs or updates the entries for these routes.
    fn upsert(
        &mut self,
        routes: &[RemoteRoute],
    ) -> impl Future<Output = Result<(), DatapathError>> + Send;
    /// Removes the entries of these CIDRs (absent ones are fine).
    fn delete(&mut self, cidrs: &[IpNet])
    -> impl Future<Output = Result<(), DatapathError>> + Send;
    /// Removes every podmesh-owned entry whose CIDR is not in `keep`.
    fn prune(
        &mut self,
        keep: &BTreeSet<IpNet>,
    ) -> impl Future<Output = Result<PruneReport, DatapathError>> + Send;
    /// The routes currently installed (as far as this datapath can read them back).
    fn installed(&mut self)
    -> impl Future<Output = Result<Vec<RemoteRoute>, DatapathError>> + Send;
    /// Called first in every full resync: puts back what the datapath's
    /// entries stand on (its device, its program) when someone removed it.
    /// Returns what was repaired, if anything; the resync's upserts then
    /// re-install the entries that went with it.
    fn repair(&mut self) -> impl Future<Output = Result<Option<String>, DatapathError>> + Send {
        async { Ok(None) }
    }
}

/// What the kernel datapath needs to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelConfig {
    /// Forwarding mode.
    pub mode: DatapathMode,
    /// VXLAN UDP port (ebpf, vxlan).
    pub tunnel_port: u16,
    /// VXLAN network identifier (ebpf, vxlan).
    pub vni: u32,
    /// Underlay MTU; default: the MTU of the device holding `node_ip` (without
    /// one: of the default route's device), else 1500.
    pub underlay_mtu: Option<u32>,
    /// This node's underlay address (of the `underlay` family).
    pub node_ip: Option<IpAddr>,
    /// The underlay's family: of the tunnel endpoints and next hops.
    pub underlay: UnderlayFamily,
    /// Where the maps and the tc link are pinned (on bpffs).
    pub pin_dir: PathBuf,
    /// Network namespace to program (a file like `/run/netns/NAME`); `None`
    /// for the agent's own. Tests and benchmarks program many namespaces
    /// from one process.
    pub netns: Option<PathBuf>,
    /// The Ethernet address of a tunnel device this creates (`None`:
    /// random). Set when a running datapath recreates its device.
    pub tunnel_mac: Option<[u8; 6]>,
    /// WireGuard towards remote nodes (`None`: `--encryption none`).
    pub wireguard: Option<super::wireguard::WgConfig>,
}

impl KernelConfig {
    /// Defaults of the agent's flags for `mode`.
    pub fn new(mode: DatapathMode) -> Self {
        Self {
            mode,
            tunnel_port: 8472,
            vni: 1,
            underlay_mtu: None,
            node_ip: None,
            underlay: UnderlayFamily::Ipv4,
            pin_dir: PathBuf::from(podmesh_common::PIN_DIR),
            netns: None,
            tunnel_mac: None,
            wireguard: None,
        }
    }

    /// Programs the namespace at `path` instead of the caller's.
    pub fn in_netns(mut self, path: impl AsRef<Path>) -> Self {
        self.netns = Some(path.as_ref().to_path_buf());
        self
    }
}

/// Packet counters of the eBPF program (summed over CPUs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    /// Sent into the tunnel.
    pub forwarded: u64,
    /// Destination in no remote Pod CIDR: dropped.
    pub miss: u64,
    /// Neither IPv4 nor IPv6 unicast (e.g. the device's own IPv6 multicast): passed on unchanged.
    pub not_ipv4: u64,
    /// The kernel refused the tunnel key: dropped.
    pub tunnel_key_failed: u64,
}
