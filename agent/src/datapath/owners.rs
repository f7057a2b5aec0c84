//! The pinned owners map: which remote cluster and node each installed Pod CIDR belongs to.
//!
//! The kernel objects (LPM entries, routes, nexthops) hold addresses only. A
//! restarted agent must read back exactly what it installed, names included:
//! the desired state keeps a cluster's routes while that cluster reconnects,
//! and it knows them by cluster name. Without the names, the first resync
//! after a restart would prune every route until the remotes had synced
//! again. The map is pinned next to the others, so it outlives the agent.
use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::{
    EbpfLoader,
    maps::{HashMap, MapData},
};
use ipnet::IpNet;
use podmesh_common::{OWNER_CLUSTER_MAX, OWNER_NODE_MAX, OWNERS_MAP, Owner, OwnerKey};

use super::{
    base::{DatapathError, RemoteRoute},
    pins::is_bpffs,
};

/// Cluster and node names of one Pod CIDR.
pub type Names = (String, String);

/// The owners map and a copy of its contents (writes of unchanged names are skipped).
pub struct Owners {
    map: HashMap<MapData, OwnerKey, Owner>,
    names: BTreeMap<IpNet, Names>,
}

impl std::fmt::Debug for Owners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Owners")
            .field("entries", &self.names.len())
            .finish_non_exhaustive()
    }
}

impl Owners {
    /// Wraps the map taken from the loaded object and reads what a previous
    /// agent left in it.
    pub fn new(map: aya::maps::Map) -> Result<Self, DatapathError> {
        let map = HashMap::try_from(map)
            .map_err(|e| DatapathError::map(format!("opening {OWNERS_MAP}"), e))?;
        let mut names = BTreeMap::new();
        for item in map.iter() {
            let (k, v) =
                item.map_err(|e| DatapathError::map(format!("reading {OWNERS_MAP}"), e))?;
            if let Some(cidr) = cidr_of(&k) {
                names.insert(cidr, decode(&v));
            }
        }
        Ok(Self { map, names })
    }

    /// For the route-only modes, which load no program: creates (or opens)
    /// only the object's pinned maps under `pin_dir` and keeps the owners
    /// map. Unlike the ebpf mode, mounts nothing: the parent of `pin_dir`
    /// must already be a bpffs.
    pub fn open(pin_dir: &Path) -> Result<Self, DatapathError> {
        let parent = pin_dir.parent().unwrap_or(Path::new("/"));
        if !is_bpffs(parent) {
            return Err(DatapathError::Unavailable(format!(
                "{} is not a bpffs",
                parent.display()
            )));
        }
        std::fs::create_dir_all(pin_dir)
            .map_err(|e| DatapathError::io(format!("creating {}", pin_dir.display()), e))?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pin_dir)
            .load(crate::EBPF_OBJECT)
            .map_err(|e| {
                DatapathError::program(
                    format!("creating the owners map under {}", pin_dir.display()),
                    "",
                    e,
                )
            })?;
        let map = ebpf
            .take_map(OWNERS_MAP)
            .ok_or_else(|| DatapathError::Other(format!("{OWNERS_MAP} not in object")))?;
        Self::new(map)
    }

    /// Names recorded for `cidr`.
    pub fn get(&self, cidr: &IpNet) -> Option<&Names> {
        self.names.get(cidr)
    }

    /// Records the names of every route (unchanged ones are skipped); the
    /// first error, if any, after trying them all.
    pub fn set_all<'a>(
        &mut self,
        routes: impl IntoIterator<Item = &'a RemoteRoute>,
    ) -> Option<DatapathError> {
        let mut first_err = None;
        let mut changed = Vec::new();
        for r in routes {
            if self
                .names
                .get(&r.cidr)
                .is_some_and(|(c, n)| *c == r.cluster && *n == r.node)
            {
                continue;
            }
            match self
                .map
                .insert(key_of(&r.cidr), encode(&r.cluster, &r.node), 0)
            {
                Ok(()) => changed.push((r.cidr, (r.cluster.clone(), r.node.clone()))),
                Err(e) => {
                    first_err.get_or_insert(DatapathError::map(
                        format!("recording the owner of {}", r.cidr),
                        e,
                    ));
                }
            }
        }
        crate::compact::extend(&mut self.names, changed);
        first_err
    }

    /// Forgets `cidr` (absent is fine).
    pub fn remove(&mut self, cidr: &IpNet) {
        if self.names.remove(cidr).is_some() {
            let _ = self.map.remove(&key_of(cidr));
        }
    }

    /// Forgets every CIDR not in `keep` (entries whose routes are gone).
    pub fn retain(&mut self, keep: impl Fn(&IpNet) -> bool) {
        let gone: Vec<IpNet> = self.names.keys().filter(|c| !keep(c)).copied().collect();
        for c in gone {
            self.remove(&c);
        }
    }
}

/// The map key of `cidr`.
pub fn key_of(cidr: &IpNet) -> OwnerKey {
    let mut addr = [0u8; 16];
    let family = match cidr.network() {
        IpAddr::V4(a) => {
            addr[..4].copy_from_slice(&a.octets());
            4
        }
        IpAddr::V6(a) => {
            addr = a.octets();
            6
        }
    };
    OwnerKey {
        family,
        prefix_len: cidr.prefix_len(),
        _pad: [0; 2],
        addr,
    }
}

fn cidr_of(k: &OwnerKey) -> Option<IpNet> {
    let addr = match k.family {
        4 => IpAddr::from(<[u8; 4]>::try_from(&k.addr[..4]).ok()?),
        6 => IpAddr::from(k.addr),
        _ => return None,
    };
    IpNet::new(addr, k.prefix_len).ok()
}

/// Names longer than the map holds are cut (cluster names are at most 32
/// bytes by the wire contract, Kubernetes node names at most 253).
fn encode(cluster: &str, node: &str) -> Owner {
    let mut o = Owner {
        cluster_len: 0,
        node_len: 0,
        cluster: [0; OWNER_CLUSTER_MAX],
        node: [0; OWNER_NODE_MAX],
        _pad: [0; 1],
    };
    let c = &cluster.as_bytes()[..cluster.len().min(OWNER_CLUSTER_MAX)];
    let n = &node.as_bytes()[..node.len().min(OWNER_NODE_MAX)];
    o.cluster[..c.len()].copy_from_slice(c);
    o.node[..n.len()].copy_from_slice(n);
    o.cluster_len = c.len() as u8;
    o.node_len = n.len() as u8;
    o
}

fn decode(o: &Owner) -> Names {
    let c = &o.cluster[..usize::from(o.cluster_len).min(OWNER_CLUSTER_MAX)];
    let n = &o.node[..usize::from(o.node_len).min(OWNER_NODE_MAX)];
    (
        String::from_utf8_lossy(c).into_owned(),
        String::from_utf8_lossy(n).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_keys_round_trip() {
        for cidr in ["10.2.3.0/24", "fd00:2::/64", "0.0.0.0/0"] {
            let cidr: IpNet = cidr.parse().unwrap();
            assert_eq!(cidr_of(&key_of(&cidr)), Some(cidr));
        }
        let node = "n".repeat(OWNER_NODE_MAX);
        assert_eq!(
            decode(&encode("east", &node)),
            ("east".to_string(), node.clone())
        );
        assert_eq!(decode(&encode("", "")), (String::new(), String::new()));
        // Too long: cut, never a panic.
        let long = format!("{node}xyz");
        assert_eq!(decode(&encode("east", &long)).1, node);
    }
}
