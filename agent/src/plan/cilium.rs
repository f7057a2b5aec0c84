//! Cilium's node records (`cilium/state/nodes/v1/<cluster>/<node>`), read
//! for the audit of a Cilium ClusterMesh (`podmesh plan check
//! --from-clustermesh`): JSON with Go field names, whose CIDRs older writers
//! encode as `{"IP": "10.6.6.0", "Mask": "////AA=="}` (a base64 mask) and
//! newer ones as `"10.6.6.0/24"`.
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

/// The key prefix of Cilium's node records.
pub const NODES_PREFIX: &str = "cilium/state/nodes/v1/";

/// One Cilium node record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CiliumNode {
    /// `Name`.
    pub name: String,
    /// `Cluster`.
    pub cluster: String,
    /// `ClusterID`.
    pub cluster_id: i64,
    /// `IPAddresses[].IP`, InternalIP first.
    pub addresses: Vec<IpAddr>,
    /// `IPv4AllocCIDR`, `IPv6AllocCIDR` and `IPv4SecondaryAllocCIDRs`, in that order.
    pub pod_cidrs: Vec<IpNet>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Raw {
    #[serde(default)]
    name: String,
    #[serde(default)]
    cluster: String,
    #[serde(default, rename = "ClusterID")]
    cluster_id: i64,
    #[serde(default, rename = "IPAddresses")]
    ip_addresses: Option<Vec<RawAddress>>,
    #[serde(default, rename = "IPv4AllocCIDR")]
    ipv4_alloc_cidr: Option<serde_json::Value>,
    #[serde(default, rename = "IPv6AllocCIDR")]
    ipv6_alloc_cidr: Option<serde_json::Value>,
    #[serde(default, rename = "IPv4SecondaryAllocCIDRs")]
    ipv4_secondary_alloc_cidrs: Option<Vec<serde_json::Value>>,
}

#[derive(Deserialize)]
struct RawAddress {
    #[serde(default, rename = "Type")]
    kind: String,
    #[serde(default, rename = "IP")]
    ip: String,
}

/// The (cluster, node) of a Cilium node key, if `key` is one.
pub fn parse_key(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(NODES_PREFIX)?;
    let (cluster, node) = rest.split_once('/')?;
    (!cluster.is_empty() && !node.is_empty()).then_some((cluster, node))
}

/// A CIDR in either of Cilium's encodings (`null` is none).
pub fn decode_cidr(v: &serde_json::Value) -> Result<Option<IpNet>, String> {
    match v {
        serde_json::Value::Null => Ok(None),
        serde_json::Value::String(s) => s
            .parse()
            .map(Some)
            .map_err(|_| format!("{s:?} is not a CIDR")),
        serde_json::Value::Object(o) => {
            let ip = o
                .get("IP")
                .and_then(|v| v.as_str())
                .ok_or("a CIDR object without \"IP\"")?;
            let ip: IpAddr = ip
                .parse()
                .map_err(|_| format!("{ip:?} is not an address"))?;
            let mask = o
                .get("Mask")
                .and_then(|v| v.as_str())
                .ok_or("a CIDR object without \"Mask\"")?;
            let bytes = base64_decode(mask).ok_or(format!("mask {mask:?} is not base64"))?;
            let want = if ip.is_ipv4() { 4 } else { 16 };
            if bytes.len() != want {
                return Err(format!(
                    "mask {mask:?} has {} bytes for an IPv{} address",
                    bytes.len(),
                    if ip.is_ipv4() { 4 } else { 6 }
                ));
            }
            let ones: u32 = bytes.iter().map(|b| b.count_ones()).sum();
            // A mask is contiguous ones: anything else is no prefix.
            let contiguous = bytes
                .iter()
                .flat_map(|b| (0..8).rev().map(move |i| b >> i & 1))
                .skip(ones as usize)
                .all(|bit| bit == 0);
            if !contiguous {
                return Err(format!("mask {mask:?} is not a prefix"));
            }
            IpNet::new(ip, ones as u8)
                .map(Some)
                .map_err(|e| e.to_string())
        }
        other => Err(format!("{other} is not a CIDR")),
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.trim_end_matches('=').bytes() {
        let v = ALPHABET.iter().position(|&a| a == c)? as u32;
        acc = acc << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// Decodes a Cilium node record's value.
pub fn decode(value: &[u8]) -> Result<CiliumNode, String> {
    let raw: Raw = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let mut addresses: Vec<(bool, IpAddr)> = Vec::new();
    for a in raw.ip_addresses.unwrap_or_default() {
        if let Ok(ip) = a.ip.parse() {
            addresses.push((a.kind != "InternalIP", ip));
        }
    }
    addresses.sort_by_key(|(not_internal, _)| *not_internal);
    let mut pod_cidrs = Vec::new();
    let fields = [raw.ipv4_alloc_cidr, raw.ipv6_alloc_cidr]
        .into_iter()
        .flatten()
        .chain(raw.ipv4_secondary_alloc_cidrs.unwrap_or_default());
    for v in fields {
        if let Some(c) = decode_cidr(&v)? {
            pod_cidrs.push(c);
        }
    }
    Ok(CiliumNode {
        name: raw.name,
        cluster: raw.cluster,
        cluster_id: raw.cluster_id,
        addresses: addresses.into_iter().map(|(_, a)| a).collect(),
        pod_cidrs,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_cidr_encodings_decode() {
        let old = br#"{"Name":"n1","Cluster":"east","ClusterID":3,"IPAddresses":[{"Type":"CiliumInternalIP","IP":"10.6.6.1"},{"Type":"InternalIP","IP":"192.168.1.5"}],"IPv4AllocCIDR":{"IP":"10.6.6.0","Mask":"////AA=="},"IPv6AllocCIDR":null,"BootID":"x"}"#;
        let n = decode(old).unwrap();
        assert_eq!(n.cluster, "east");
        assert_eq!(n.cluster_id, 3);
        assert_eq!(n.addresses[0].to_string(), "192.168.1.5");
        assert_eq!(n.pod_cidrs, vec!["10.6.6.0/24".parse::<IpNet>().unwrap()]);
        let new = br#"{"Name":"n2","Cluster":"east","ClusterID":3,"IPv4AllocCIDR":"10.6.7.0/24","IPv4SecondaryAllocCIDRs":["10.9.0.0/25"],"IPv6AllocCIDR":{"IP":"fd00::","Mask":"//////////////////8AAA=="}}"#;
        let n = decode(new).unwrap();
        assert_eq!(
            n.pod_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.6.7.0/24", "fd00::/112", "10.9.0.0/25"]
        );
    }

    #[test]
    fn bad_masks_and_keys() {
        assert!(decode_cidr(&serde_json::json!({"IP": "10.0.0.0", "Mask": "/wD/AA=="})).is_err());
        assert!(decode_cidr(&serde_json::json!({"IP": "10.0.0.0", "Mask": "//8="})).is_err());
        assert!(decode_cidr(&serde_json::json!("10.0.0.0")).is_err());
        assert_eq!(
            parse_key("cilium/state/nodes/v1/east/n1"),
            Some(("east", "n1"))
        );
        assert_eq!(parse_key("cilium/state/nodes/v1/east"), None);
    }
}
