//! The wire contract: key layout and records in the mesh etcd (DESIGN.md, "Wire contract").
//!
//! The key path is authoritative; a value that disagrees with its key is
//! rejected by validation, not here. Unknown fields are ignored so that newer
//! agents can add fields without breaking older ones.
use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Every podmesh key starts with this prefix.
pub const PREFIX: &str = "podmesh/v1/";
/// Prefix of the cluster records.
pub const CLUSTERS_PREFIX: &str = "podmesh/v1/clusters/";
/// Prefix of the node records.
pub const NODES_PREFIX: &str = "podmesh/v1/nodes/";
/// Largest record value podmesh accepts, in bytes. Larger values are rejected
/// (a record this big is a bug or an attack, never a node).
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// A cluster name: a DNS label of 1 to 32 characters, `[a-z0-9]([-a-z0-9]*[a-z0-9])?`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ClusterName(String);

/// A string that is not a valid cluster name, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid cluster name {name:?}: {reason} (a DNS label of 1-32 characters: lowercase letters, digits and '-', starting and ending with a letter or digit)"
)]
pub struct InvalidClusterName {
    /// The offending name.
    pub name: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl ClusterName {
    /// Checks `name` against the cluster-name rule.
    pub fn new(name: impl Into<String>) -> Result<Self, InvalidClusterName> {
        let name = name.into();
        let reason = cluster_name_problem(&name);
        match reason {
            None => Ok(Self(name)),
            Some(reason) => Err(InvalidClusterName { name, reason }),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Why `name` is not a valid cluster name, or `None` when it is.
pub fn cluster_name_problem(name: &str) -> Option<&'static str> {
    let b = name.as_bytes();
    if b.is_empty() {
        return Some("empty");
    }
    if b.len() > 32 {
        return Some("longer than 32 characters");
    }
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Some("contains a character other than a-z, 0-9 and '-'");
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Some("starts or ends with '-'");
    }
    None
}

/// Why `name` is not a valid node name, or `None` when it is: Kubernetes
/// node names are DNS subdomains (RFC 1123): at most 253 characters of
/// lowercase letters, digits, '-' and '.', in labels that start and end with
/// a letter or digit. Node names reach logs, status and metric labels.
pub fn node_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        return Some("empty");
    }
    if name.len() > 253 {
        return Some("longer than 253 characters");
    }
    for label in name.split('.') {
        let b = label.as_bytes();
        if b.is_empty() {
            return Some("has an empty label");
        }
        if !b
            .iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        {
            return Some("contains a character other than a-z, 0-9, '-' and '.'");
        }
        if b[0] == b'-' || b[b.len() - 1] == b'-' {
            return Some("has a label that starts or ends with '-'");
        }
        if b.len() > 63 {
            return Some("has a label longer than 63 characters");
        }
    }
    None
}

impl fmt::Display for ClusterName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for ClusterName {
    type Err = InvalidClusterName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for ClusterName {
    type Error = InvalidClusterName;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::new(s)
    }
}

impl From<ClusterName> for String {
    fn from(n: ClusterName) -> Self {
        n.0
    }
}

impl AsRef<str> for ClusterName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// `podmesh/v1/clusters/<cluster>`: a cluster's identity and declared ranges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterRecord {
    /// Cluster name; must equal the name in the key.
    pub name: String,
    /// Cluster ID, 1-255, unique in a mesh.
    pub id: u32,
    /// The cluster's Pod CIDRs; every node's Pod CIDRs must lie inside them.
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<IpNet>,
    /// The cluster's service CIDRs.
    #[serde(rename = "serviceCIDRs", default)]
    pub service_cidrs: Vec<IpNet>,
}

/// `podmesh/v1/nodes/<cluster>/<node>`: one node, bound to its agent's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// Node name; must equal the name in the key.
    pub name: String,
    /// Cluster name; must equal the cluster in the key.
    pub cluster: String,
    /// Cluster ID of the node's cluster.
    #[serde(rename = "clusterID")]
    pub cluster_id: u32,
    /// Underlay addresses, at most one per family; the tunnel endpoint is
    /// the first of the reader's underlay family ([`UnderlayFamily::endpoint`]).
    /// The publisher lists its own underlay family first, so that readers
    /// that take `addresses[0]` keep working.
    pub addresses: Vec<IpAddr>,
    /// The node's Pod CIDRs.
    #[serde(rename = "podCIDRs", default)]
    pub pod_cidrs: Vec<IpNet>,
    /// MAC address of the node's tunnel device (`aa:bb:cc:dd:ee:ff`), if any.
    #[serde(rename = "vtepMAC", default, skip_serializing_if = "Option::is_none")]
    pub vtep_mac: Option<String>,
    /// Boot ID of the node, so that a reboot is visible.
    #[serde(rename = "bootID", default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// The node's WireGuard public key (base64 of 32 bytes), when it runs `--encryption wireguard`.
    #[serde(
        rename = "wireguardPublicKey",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub wireguard_public_key: Option<String>,
}

/// The address family of the underlay: which of a node's addresses are the
/// tunnel endpoints (`--underlay-family`).
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum UnderlayFamily {
    /// Tunnels and next hops between IPv4 node addresses.
    #[default]
    Ipv4,
    /// Tunnels and next hops between IPv6 node addresses.
    Ipv6,
}

impl UnderlayFamily {
    /// The family of `a`.
    pub fn of(a: IpAddr) -> Self {
        match a {
            IpAddr::V4(_) => Self::Ipv4,
            IpAddr::V6(_) => Self::Ipv6,
        }
    }

    /// Whether `a` is of this family.
    pub fn holds(self, a: IpAddr) -> bool {
        Self::of(a) == self
    }

    /// The tunnel endpoint of a node with these addresses: the first one of
    /// this family, if any.
    pub fn endpoint(self, addresses: &[IpAddr]) -> Option<IpAddr> {
        addresses.iter().copied().find(|a| self.holds(*a))
    }

    /// `"IPv4"` or `"IPv6"`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Self::Ipv4 => "IPv4",
            Self::Ipv6 => "IPv6",
        }
    }

    /// `ipv4` or `ipv6`, the flag's value.
    pub fn flag(self) -> &'static str {
        match self {
            Self::Ipv4 => "ipv4",
            Self::Ipv6 => "ipv6",
        }
    }
}

impl fmt::Display for UnderlayFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a key under [`PREFIX`] names.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// `podmesh/v1/clusters/<cluster>`
    Cluster {
        /// Cluster named by the key.
        cluster: String,
    },
    /// `podmesh/v1/nodes/<cluster>/<node>`
    Node {
        /// Cluster named by the key.
        cluster: String,
        /// Node named by the key.
        node: String,
    },
}

/// A key that is not in podmesh's layout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "key {key:?} is not in podmesh's layout (podmesh/v1/clusters/<cluster> or podmesh/v1/nodes/<cluster>/<node>)"
)]
pub struct UnknownKey {
    /// The key, lossily decoded.
    pub key: String,
}

impl Key {
    /// Parses a key; names inside it are checked only for being non-empty
    /// and free of '/' (validation checks the cluster-name rule).
    pub fn parse(key: &str) -> Result<Self, UnknownKey> {
        let err = || UnknownKey {
            key: key.to_string(),
        };
        if let Some(rest) = key.strip_prefix(CLUSTERS_PREFIX) {
            if rest.is_empty() || rest.contains('/') {
                return Err(err());
            }
            return Ok(Key::Cluster {
                cluster: rest.to_string(),
            });
        }
        if let Some(rest) = key.strip_prefix(NODES_PREFIX) {
            let mut parts = rest.split('/');
            if let (Some(c), Some(n), None) = (parts.next(), parts.next(), parts.next())
                && !c.is_empty()
                && !n.is_empty()
            {
                return Ok(Key::Node {
                    cluster: c.to_string(),
                    node: n.to_string(),
                });
            }
        }
        Err(err())
    }

    /// The cluster this key belongs to.
    pub fn cluster(&self) -> &str {
        match self {
            Key::Cluster { cluster } | Key::Node { cluster, .. } => cluster,
        }
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Cluster { cluster } => write!(f, "{CLUSTERS_PREFIX}{cluster}"),
            Key::Node { cluster, node } => write!(f, "{NODES_PREFIX}{cluster}/{node}"),
        }
    }
}

/// The key of a cluster record.
pub fn cluster_key(cluster: &str) -> String {
    format!("{CLUSTERS_PREFIX}{cluster}")
}

/// The key of a node record.
pub fn node_key(cluster: &str, node: &str) -> String {
    format!("{NODES_PREFIX}{cluster}/{node}")
}

/// Parses a WireGuard key as `wg(8)` writes it: standard base64 (with its
/// padding) of 32 bytes, 44 characters.
pub fn parse_wireguard_key(s: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    if s.len() != 44 {
        return None;
    }
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .ok()?
        .try_into()
        .ok()
}

/// Formats a WireGuard key as `wg(8)` does (standard base64).
pub fn format_wireguard_key(key: &[u8; 32]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(key)
}

/// Parses a MAC address written as six colon-separated hex octets.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for o in &mut out {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *o = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Formats a MAC address as six colon-separated lowercase hex octets.
pub fn format_mac(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_names() {
        for ok in ["east", "a", "e-1", "0", "abcdefghijabcdefghijabcdefghij12"] {
            assert!(ClusterName::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "East",
            "a_b",
            "a.b",
            "abcdefghijabcdefghijabcdefghij123",
        ] {
            assert!(ClusterName::new(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_round_trip() {
        let k = Key::parse("podmesh/v1/nodes/east/node-1").unwrap();
        assert_eq!(
            k,
            Key::Node {
                cluster: "east".into(),
                node: "node-1".into()
            }
        );
        assert_eq!(k.to_string(), node_key("east", "node-1"));
        let k = Key::parse("podmesh/v1/clusters/east").unwrap();
        assert_eq!(k.to_string(), cluster_key("east"));
        for bad in [
            "podmesh/v1/nodes/east",
            "podmesh/v1/nodes/east/n/x",
            "podmesh/v1/nodes//n",
            "podmesh/v1/clusters/",
            "podmesh/v1/clusters/a/b",
            "other",
        ] {
            assert!(Key::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn node_record_decodes_contract_example_and_ignores_unknown_fields() {
        let v = r#"{"name":"node-1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],
            "podCIDRs":["10.1.1.0/24"],"vtepMAC":"02:00:c0:a8:01:0a","bootID":"b","future":42}"#;
        let r: NodeRecord = serde_json::from_str(v).unwrap();
        assert_eq!(r.cluster_id, 1);
        assert_eq!(r.pod_cidrs, vec!["10.1.1.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(
            parse_mac(r.vtep_mac.as_deref().unwrap()),
            Some([2, 0, 0xc0, 0xa8, 1, 10])
        );
        let c: ClusterRecord = serde_json::from_str(
            r#"{"name":"east","id":1,"podCIDRs":["10.1.0.0/16"],"serviceCIDRs":["10.96.0.0/12"]}"#,
        )
        .unwrap();
        assert_eq!(c.id, 1);
    }

    /// A dual-stack record carries both addresses; each reader takes the
    /// one of its underlay family, and an old single-address record still
    /// decodes.
    #[test]
    fn endpoints_by_underlay_family() {
        let v =
            r#"{"name":"n","cluster":"east","clusterID":1,"addresses":["fd00::a","192.168.1.10"]}"#;
        let r: NodeRecord = serde_json::from_str(v).unwrap();
        assert_eq!(
            UnderlayFamily::Ipv4.endpoint(&r.addresses),
            Some("192.168.1.10".parse().unwrap())
        );
        assert_eq!(
            UnderlayFamily::Ipv6.endpoint(&r.addresses),
            Some("fd00::a".parse().unwrap())
        );
        let old: NodeRecord = serde_json::from_str(
            r#"{"name":"n","cluster":"east","clusterID":1,"addresses":["192.168.1.10"]}"#,
        )
        .unwrap();
        assert_eq!(UnderlayFamily::Ipv6.endpoint(&old.addresses), None);
    }

    #[test]
    fn macs() {
        assert_eq!(format_mac([2, 0, 0xc0, 0xa8, 1, 10]), "02:00:c0:a8:01:0a");
        assert_eq!(parse_mac("02:00:c0:a8:01"), None);
        assert_eq!(parse_mac("02:00:c0:a8:01:0a:00"), None);
        assert_eq!(parse_mac("zz:00:c0:a8:01:0a"), None);
    }
}
