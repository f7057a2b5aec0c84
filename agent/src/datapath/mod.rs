//! The datapath: what the control plane asks of the kernel, behind a narrow trait.
//!
//! The control plane computes the desired set of [`RemoteRoute`]s (a pure
//! function) and drives a [`Datapath`] with idempotent upserts, deletes and a
//! `prune(keep)` that removes every podmesh-owned entry not in `keep`.
//! Implementations: [`memory::MemoryDatapath`] for tests of the control plane,
//! and the kernel ones (eBPF, VXLAN, IPIP, direct routes).
use std::{collections::BTreeSet, future::Future, net::IpAddr};

use ipnet::IpNet;

pub mod device;
pub mod ebpf;
pub mod kernel;
pub mod masq;
pub mod memory;
pub mod nftset;
pub mod nl;
pub mod owners;
pub mod routes;
pub mod rpfilter;
pub mod rtnl;
pub mod uninstall;

pub use kernel::{Counters, KernelConfig, KernelDatapath, from_config};

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
    /// The remote node's tunnel endpoint / next hop (`addresses[0]`).
    pub node_addr: IpAddr,
    /// The remote node's tunnel device MAC, when it published one.
    pub vtep_mac: Option<[u8; 6]>,
}

/// A datapath operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The kernel refused or could not do `op` for `cidr`.
    #[error("{op} {cidr}: {message}")]
    Op {
        /// What was attempted (e.g. "upsert route").
        op: &'static str,
        /// The CIDR concerned.
        cidr: IpNet,
        /// What went wrong, with a hint where there is one.
        message: String,
    },
    /// The datapath cannot run on this machine (missing kernel feature,
    /// missing privilege); the message says what to do.
    #[error("datapath unavailable: {0}")]
    Unavailable(String),
    /// Any other failure.
    #[error("{0}")]
    Other(String),
    /// Entries the datapath will not install; every other entry of the
    /// call was applied. Each becomes its record's rejection.
    #[error("{} entries refused; first: {}", .0.len(), .0.first().map_or(String::new(), ToString::to_string))]
    Refused(Vec<Refusal>),
}

// The reconciler's error policy relies on the two items below: a refusal of
// single entries, and whether retrying can help.

/// One entry the datapath will not install (a remote node it cannot reach
/// in this mode, e.g. without a vtepMAC in ebpf mode), and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{cidr}: {message}")]
pub struct Refusal {
    /// The entry's CIDR.
    pub cidr: IpNet,
    /// Why, with a hint.
    pub message: String,
}

impl DatapathError {
    /// Whether the same call may succeed later by itself (a kernel call that
    /// failed), as opposed to a datapath that cannot run here or entries it
    /// refuses: retried with backoff.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Op { .. } | Self::Other(_))
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
