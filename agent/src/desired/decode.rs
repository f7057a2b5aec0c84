//! Decoding one remote etcd entry into a record, before any cross-record validation.
//!
//! This is the first thing that touches bytes from another cluster, so it is
//! total: every input, however hostile, becomes either a record or a
//! [`Rejection`] naming the problem.
use crate::model::{ClusterRecord, Key, MAX_VALUE_LEN, NodeRecord};

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
    /// `addresses[0]` cannot be a tunnel endpoint (unspecified, loopback, multicast).
    pub const NODE_ADDRESS_INVALID: &str = "node-address-invalid";
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
    Cluster(ClusterRecord),
    /// A node record (not yet validated), with the node name from its key.
    Node {
        /// Node name from the key.
        node: String,
        /// The record.
        record: NodeRecord,
    },
    /// Rejected while decoding.
    Invalid(Rejection),
}

/// One remote entry, decoded once when it arrives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The etcd key.
    pub key: String,
    /// etcd create revision (the newcomer rule within a cluster).
    pub create_revision: i64,
    /// etcd mod revision.
    pub mod_revision: i64,
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
        key: key.to_string(),
        create_revision,
        mod_revision,
        decoded: decode_value(remote, key, value),
    }
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
            Ok(r) => Decoded::Cluster(r),
            Err(e) => json_err("cluster", e),
        },
        Key::Node { node, .. } => match serde_json::from_slice::<NodeRecord>(value) {
            Ok(record) => Decoded::Node { node, record },
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
    fn node_decodes() {
        let v = br#"{"name":"n1","cluster":"east","clusterID":1,"addresses":["192.168.1.10"],"podCIDRs":["10.1.1.0/24"]}"#;
        assert!(matches!(
            decode("east", "podmesh/v1/nodes/east/n1", v, 1, 1).decoded,
            Decoded::Node { node, .. } if node == "n1"
        ));
    }
}
