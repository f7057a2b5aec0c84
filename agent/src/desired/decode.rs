//! Decoding one remote etcd entry into a record, before any cross-record validation.
//!
//! This is the first thing that touches bytes from another cluster, so it is
//! total: every input, however hostile, becomes either a record or a
//! [`Rejection`] naming the problem.
use std::net::IpAddr;

use ipnet::IpNet;

use crate::{
    compact::Few,
    model::{ClusterRecord, Key, MAX_VALUE_LEN, NodeRecord, parse_mac, parse_wireguard_key},
    validate::{Finding, Severity, record::check_node_record},
};

/// Stable reason codes of rejections decided here (the validation core's
/// `validate::code` covers the rest).
pub mod code {
    /// The value is larger than [`crate::model::MAX_VALUE_LEN`].
    pub const RECORD_TOO_LARGE: &str = "record-too-large";
    /// The value is not the JSON the key calls for.
    pub const RECORD_INVALID_JSON: &str = "record-invalid-json";
    /// The key is not in podmesh's layout.
    pub const RECORD_KEY_UNKNOWN: &str = "record-key-unknown";
    /// The key names a cluster other than the remote it was read from.
    pub const RECORD_FOREIGN_CLUSTER: &str = "record-foreign-cluster";
    /// A node of a cluster that publishes no (valid) cluster record.
    pub const CLUSTER_RECORD_MISSING: &str = "cluster-record-missing";
    /// A node of a cluster whose cluster record was rejected.
    pub const CLUSTER_REJECTED: &str = "cluster-rejected";
    /// A remote record claims this agent's own cluster name or ID.
    pub const LOCAL_CLUSTER_CLAIMED: &str = "local-cluster-claimed";
    /// `vtepMAC` is not six colon-separated hex octets.
    pub const NODE_VTEP_MAC_INVALID: &str = "node-vtep-mac-invalid";
    /// An address cannot be a tunnel endpoint (unspecified, loopback,
    /// multicast, IPv6 link-local).
    pub const NODE_ADDRESS_INVALID: &str = "node-address-invalid";
    /// An address of the node is an address of this node.
    pub const NODE_ADDRESS_LOCAL: &str = "node-address-local";
    /// The node publishes no address of this node's underlay family
    /// (`--underlay-family`): it has no tunnel endpoint here.
    pub const NODE_ADDRESS_FAMILY_MISSING: &str = "node-address-family-missing";
    /// The datapath refused to install the node's entry (e.g. no `vtepMAC` in ebpf mode).
    pub const DATAPATH_REFUSED: &str = "datapath-refused";
    /// `wireguardPublicKey` is not base64 of 32 bytes.
    pub const NODE_WIREGUARD_KEY_INVALID: &str = "node-wireguard-key-invalid";
    /// The node's `wireguardPublicKey` is already another node's (or this node's own).
    pub const WIREGUARD_KEY_DUPLICATE: &str = "wireguard-key-duplicate";
    /// `--encryption-strict` and the node publishes no `wireguardPublicKey`.
    pub const ENCRYPTION_REQUIRED: &str = "encryption-required";
}

/// Why a record is not programmed: a stable code and a message with a hint.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Rejection {
    /// Stable machine-readable reason (a metric label).
    pub code: String,
    /// What is wrong and what to do about it.
    pub message: String,
}

impl Rejection {
    /// A rejection with this code and message.
    pub fn new(code: &str, message: impl Into<String>) -> Self {
        Self {
            code: code.to_string(),
            message: message.into(),
        }
    }
}

/// What a decoded entry holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A cluster record (not yet validated).
    Cluster(Box<ClusterRecord>),
    /// A node record (not yet validated against its cluster), the node name being the key's.
    Node(NodeData),
    /// Rejected while decoding.
    Invalid(Rejection),
}

/// What the agent keeps of a node record: only the fields that decide its
/// routes and its validation, so that 100k remote nodes stay small in memory
/// (names come from the key, `bootID` and unknown fields are dropped).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeData {
    /// `clusterID` as published.
    pub cluster_id: u32,
    /// Underlay addresses; `addresses[0]` is the tunnel endpoint.
    pub addresses: Few<IpAddr>,
    /// The node's Pod CIDRs.
    pub pod_cidrs: Few<IpNet>,
    /// The parsed `vtepMAC`, when it published a valid one.
    pub vtep_mac: Option<[u8; 6]>,
    /// The parsed `wireguardPublicKey`, when it published a valid one.
    pub wireguard_key: Option<[u8; 32]>,
    /// The first problem of the record on its own that comes before the checks
    /// against its cluster record (key vs value, IDs, CIDRs, no address).
    pub early: Option<Box<Rejection>>,
    /// The first problem of the record on its own that comes after them
    /// (unusable tunnel endpoint, malformed `vtepMAC`).
    pub late: Option<Box<Rejection>>,
}

/// One remote entry, decoded once when it arrives. Its key is the map key it is stored under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// etcd create revision (the newcomer rule within a cluster).
    pub create_revision: i64,
    /// etcd mod revision.
    pub mod_revision: i64,
    /// List generation of the connection that last saw it (pruning after a re-list).
    pub generation: u64,
    /// The decoded content.
    pub decoded: Decoded,
}

/// Decodes the entry `key` = `value` read from remote cluster `remote`.
pub fn decode(
    remote: &str,
    key: &str,
    value: &[u8],
    create_revision: i64,
    mod_revision: i64,
) -> Entry {
    Entry {
        create_revision,
        mod_revision,
        generation: 0,
        decoded: decode_value(remote, key, value),
    }
}

fn first_error(findings: Vec<Finding>) -> Option<Box<Rejection>> {
    findings
        .into_iter()
        .find(|f| f.severity == Severity::Error)
        .map(|f| Box::new(Rejection::new(f.code, f.message)))
}

/// The compact form of `r`, stored under `podmesh/v1/nodes/<cluster>/<node>`.
fn node_data(cluster: &str, node: &str, r: NodeRecord) -> NodeData {
    let early = first_error(check_node_record(cluster, node, &r, None));
    let mut late = None;
    if let Some(a) = r.addresses.iter().find(|a| unusable_endpoint(a)) {
        late = Some(Box::new(Rejection::new(
            code::NODE_ADDRESS_INVALID,
            format!(
                "node {node} of cluster {cluster} publishes tunnel endpoint {a}, which cannot be reached; its agent must publish the node's underlay address"
            ),
        )));
    }
    let vtep_mac = r.vtep_mac.as_deref().and_then(parse_mac);
    if late.is_none()
        && let Some(m) = &r.vtep_mac
        && vtep_mac.is_none()
    {
        late = Some(Box::new(Rejection::new(
            code::NODE_VTEP_MAC_INVALID,
            format!(
                "node {node} of cluster {cluster} publishes vtepMAC {m:?}, not six colon-separated hex octets"
            ),
        )));
    }
    let wireguard_key = r
        .wireguard_public_key
        .as_deref()
        .and_then(parse_wireguard_key);
    if late.is_none()
        && let Some(k) = &r.wireguard_public_key
        && wireguard_key.is_none()
    {
        late = Some(Box::new(Rejection::new(
            code::NODE_WIREGUARD_KEY_INVALID,
            format!(
                "node {node} of cluster {cluster} publishes wireguardPublicKey {k:?}, not the base64 of 32 bytes (44 characters, as wg(8) prints keys)"
            ),
        )));
    }
    NodeData {
        cluster_id: r.cluster_id,
        addresses: r.addresses.into(),
        pod_cidrs: r.pod_cidrs.into(),
        vtep_mac,
        wireguard_key,
        early,
        late,
    }
}

/// Whether `a` can never be a tunnel endpoint: unspecified, loopback,
/// multicast, or an IPv6 link-local address (valid only with a scope).
fn unusable_endpoint(a: &IpAddr) -> bool {
    a.is_unspecified()
        || a.is_loopback()
        || a.is_multicast()
        || matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

fn decode_value(remote: &str, key: &str, value: &[u8]) -> Decoded {
    if value.len() > MAX_VALUE_LEN {
        return Decoded::Invalid(Rejection::new(
            code::RECORD_TOO_LARGE,
            format!(
                "record {key} is {} bytes, more than the {MAX_VALUE_LEN} bytes a record may have; it is ignored (check what writes it into cluster {remote}'s mesh etcd)",
                value.len()
            ),
        ));
    }
    let parsed = match Key::parse(key) {
        Ok(k) => k,
        Err(e) => {
            return Decoded::Invalid(Rejection::new(
                code::RECORD_KEY_UNKNOWN,
                format!(
                    "{e}; ignored (a newer podmesh, or something else writing under podmesh/v1/ in cluster {remote})"
                ),
            ));
        }
    };
    if parsed.cluster() != remote {
        return Decoded::Invalid(Rejection::new(
            code::RECORD_FOREIGN_CLUSTER,
            format!(
                "record {key} names cluster {:?} but was read from cluster {remote}'s etcd; a cluster may only publish its own records (check which etcd the Secret entry {remote} points to)",
                parsed.cluster()
            ),
        ));
    }
    let json_err = |what: &str, e: serde_json::Error| {
        Decoded::Invalid(Rejection::new(
            code::RECORD_INVALID_JSON,
            format!(
                "record {key} is not a valid {what} record: {e} (line {}, column {}); fix the publisher in cluster {remote}",
                e.line(),
                e.column()
            ),
        ))
    };
    match parsed {
        Key::Cluster { .. } => match serde_json::from_slice::<ClusterRecord>(value) {
            Ok(r) => Decoded::Cluster(Box::new(r)),
            Err(e) => json_err("cluster", e),
        },
        Key::Node { node, .. } => match serde_json::from_slice::<NodeRecord>(value) {
            Ok(record) => Decoded::Node(node_data(remote, &node, record)),
            Err(e) => json_err("node", e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(key: &str, value: &[u8]) -> String {
        match decode("east", key, value, 1, 1).decoded {
            Decoded::Invalid(r) => r.code,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rejections() {
        assert_eq!(
            reason("podmesh/v1/nodes/east/n1", b"{"),
            code::RECORD_INVALID_JSON
        );
        assert_eq!(
            reason("podmesh/v1/nodes/west/n1", b"{}"),
            code::RECORD_FOREIGN_CLUSTER
        );
        assert_eq!(reason("podmesh/v1/other", b"{}"), code::RECORD_KEY_UNKNOWN);
        let huge = vec![b' '; MAX_VALUE_LEN + 1];
        assert_eq!(
            reason("podmesh/v1/nodes/east/n1", &huge),
            code::RECORD_TOO_LARGE
        );
    }

    #[test]
    fn wireguard_keys_decode_or_reject() {
        let node = |k: &str| {
            format!(
                r#"{{"name":"n1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],"podCIDRs":["10.1.1.0/24"],"wireguardPublicKey":"{k}"}}"#
            )
        };
        let good = crate::model::format_wireguard_key(&[7; 32]);
        match decode(
            "east",
            "podmesh/v1/nodes/east/n1",
            node(&good).as_bytes(),
            1,
            1,
        )
        .decoded
        {
            Decoded::Node(n) => {
                assert_eq!(n.wireguard_key, Some([7; 32]));
                assert!(n.late.is_none());
            }
            other => panic!("{other:?}"),
        }
        for bad in [
            "",
            "short",
            &good[..43],
            &format!("{good}A"),
            "!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!=",
        ] {
            match decode(
                "east",
                "podmesh/v1/nodes/east/n1",
                node(bad).as_bytes(),
                1,
                1,
            )
            .decoded
            {
                Decoded::Node(n) => assert_eq!(
                    n.late.map(|r| r.code),
                    Some(code::NODE_WIREGUARD_KEY_INVALID.to_string()),
                    "{bad:?}"
                ),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn node_decodes() {
        let v = br#"{"name":"n1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],"podCIDRs":["10.1.1.0/24"]}"#;
        assert!(matches!(
            decode("east", "podmesh/v1/nodes/east/n1", v, 1, 1).decoded,
            Decoded::Node(NodeData {
                early: None,
                late: None,
                ..
            })
        ));
    }
}
