//! The datapath: what the control plane asks of the kernel, behind a narrow trait.
//!
//! The control plane computes the desired set of [`RemoteRoute`]s (a pure
//! function) and drives a [`Datapath`] with idempotent upserts, deletes and a
//! `prune(keep)` that removes every podmesh-owned entry not in `keep`.
//! Implementations: [`memory::MemoryDatapath`] for tests of the control plane,
//! and the kernel ones (eBPF, VXLAN, IPIP, direct routes).
//!
//! # Layering
//!
//! The submodules form layers, listed here from the bottom up. A module
//! uses only modules named before it in this list, never one after it: no
//! two modules use each other, and each layer can be read (and tested)
//! without the ones on top.
//!
//! 1. [`nl`]: the netlink socket (batched requests, dumps, `in_netns`).
//! 2. [`error`] ([`DatapathError`], [`Refusal`]) and [`base`]: the shared
//!    vocabulary: [`Datapath`], [`RemoteRoute`], [`KernelConfig`],
//!    [`Counters`], podmesh's route protocol and nexthop id range.
//! 3. Kernel objects, one kind per module: [`rtnl`] (links, addresses,
//!    routes, neighbours, with netlink-packet-route's types), [`nexthop`]
//!    (nexthop objects, encoded by hand: the crate has no type for them),
//!    [`nftset`] (nf_tables sets), [`pins`] (the bpffs pin directory).
//! 4. What podmesh owns on top of them: [`device`] (its tunnel devices),
//!    [`owners`] (the pinned owners map), [`masq`] (the masquerade
//!    exemption), [`rpfilter`].
//! 5. The modes: [`ebpf`] and [`routes`] (vxlan, direct, ipip); neither
//!    uses the other.
//! 6. [`wireguard`]: encryption towards remote nodes (`--encryption
//!    wireguard`), beside whichever mode carries the clear traffic.
//! 7. [`kernel`]: the configured mode behind one type, plus the exemption
//!    and WireGuard;
//!    [`uninstall`] (removing all of it) and [`memory`] (the in-memory fake)
//!    sit beside it.
pub mod base;
pub mod device;
pub mod ebpf;
pub mod error;
pub mod kernel;
pub mod masq;
pub mod memory;
pub mod nexthop;
pub mod nftset;
pub mod nl;
pub mod owners;
pub mod pins;
pub mod routes;
pub mod rpfilter;
pub mod rtnl;
pub mod uninstall;
pub mod wireguard;

pub use base::{
    Counters, Datapath, DatapathError, KernelConfig, NEXTHOP_ID_FIRST, NEXTHOP_ID_LAST,
    PruneReport, ROUTE_PROTOCOL, Refusal, RefusalReason, RemoteRoute,
};
pub use kernel::{KernelDatapath, from_config};
