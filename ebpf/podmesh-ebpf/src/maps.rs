//! The maps shared by the programs; names and sizes come from podmesh-common.
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray},
};
use podmesh_common::{Owner, OwnerKey, REMOTES_MAX_ENTRIES, RemoteNode, counter};

/// Remote node Pod CIDR (IPv4) -> the node to tunnel to.
///
/// Pinned by name so that a restarted agent (and a replaced program) keeps
/// using the same map: forwarding survives the agent.
#[map(name = "PODMESH_REMOTES_V4")]
pub static PODMESH_REMOTES_V4: LpmTrie<[u8; 4], RemoteNode> =
    LpmTrie::pinned(REMOTES_MAX_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Remote node Pod CIDR (IPv6) -> the node to tunnel to (over the IPv4
/// underlay, like IPv4 Pod CIDRs). Pinned like the IPv4 map.
#[map(name = "PODMESH_REMOTES_V6")]
pub static PODMESH_REMOTES_V6: LpmTrie<[u8; 16], RemoteNode> =
    LpmTrie::pinned(REMOTES_MAX_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Per-CPU packet counters, indexed by `podmesh_common::counter`; pinned so
/// counts survive an agent restart.
#[map(name = "PODMESH_COUNTERS")]
pub static PODMESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);

/// Installed remote Pod CIDR -> its cluster and node names. No program
/// reads it: it lives here so that it is created and pinned with the others,
/// and a restarted agent reads back what it installed, names included.
#[map(name = "PODMESH_OWNERS")]
pub static PODMESH_OWNERS: HashMap<OwnerKey, Owner> =
    HashMap::pinned(REMOTES_MAX_ENTRIES, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

/// Adds one to counter `index`.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = PODMESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *c += 1 };
    }
}
