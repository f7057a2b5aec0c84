//! The WireGuard checks of the datapath layer (`--encryption wireguard`),
//! on the device as WireGuard itself reports it (read like the agent reads
//! it: kernel generic netlink or the userspace process's UAPI socket): the
//! device, its port and key against what this node publishes; per remote
//! cluster, a peer per node with a key (its Pod CIDRs allowed, its address
//! the endpoint), the nodes reached in clear, and the latest handshakes.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use ipnet::IpNet;

use super::{Check, Layer, check};
use crate::{
    datapath::{
        rtnl::{IFF_UP, Link},
        wireguard::{WG_DEVICE, keys::KeyPair, read, uapi::DeviceState},
    },
    model::{format_wireguard_key, parse_wireguard_key},
    status::{StatusReport, WireguardStatus, agent_info::AgentInfo, unix_now},
};

const L: Layer = Layer::Datapath;

/// A handshake older than this, on a link that carries traffic, means the
/// session is gone: WireGuard handshakes again every 2 minutes while
/// packets flow (and the tunnel probe sends some).
pub const HANDSHAKE_STALE_SECS: u64 = 180;

/// Where the userspace WireGuard's socket is when the agent does not say.
const DEFAULT_SOCKET: &str = "/var/run/wireguard/podmesh-wg.sock";

/// Reads the device as the agent's status names its backend (blocking).
pub fn read_device(info: &AgentInfo, wg: &WireguardStatus) -> Result<DeviceState, String> {
    let sock = info
        .wireguard_socket
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET));
    read::device(&wg.backend, &sock).map_err(|e| e.to_string())
}

/// The public key `wireguardPublicKey` of this node's record in the local
/// mesh etcd (`None` inside: the record has none).
pub fn published_key(record: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(record).ok()?;
    v.get("wireguardPublicKey")?.as_str().map(str::to_string)
}

fn short(key: &str) -> String {
    key.chars().take(10).collect::<String>() + "…"
}

/// The node-wide check of the device: there, up, readable, listening on
/// the configured port, with the key this node publishes (`record`: this
/// node's record read from the local mesh etcd, `None` when it could not
/// be read; `Some(None)`: the record has no key).
pub fn device_check(
    wg: &WireguardStatus,
    link: Option<&Link>,
    dev: &Result<DeviceState, String>,
    record: Option<(String, Option<String>)>,
) -> Check {
    let fail =
        |evidence: String, fix: &str| Check::fail(L, None, check::WIREGUARD_DEVICE, evidence, fix);
    let link = match link {
        None => {
            return fail(
                format!("{WG_DEVICE} does not exist"),
                "the agent brings it back at its next resync (--resync-interval); with the userspace backend the podmesh-wireguard process serves it (the DaemonSet's wireguard container, or the process the agent starts): its log says why it is gone",
            );
        }
        Some(l) if l.flags & IFF_UP == 0 => {
            return fail(
                format!("{WG_DEVICE} is down"),
                "`ip link set podmesh-wg up`; the agent's next resync does it too: something on the node took it down",
            );
        }
        Some(l) => l,
    };
    let d = match dev {
        Ok(d) => d,
        Err(e) => {
            return fail(
                format!("{WG_DEVICE} ({}) cannot be read: {e}", wg.backend),
                "run podmesh diagnose as root in the agent's network namespace; with the userspace backend the podmesh-wireguard process must serve the agent's UAPI socket (--wireguard-run-dir): the agent restarts it, or the DaemonSet's wireguard container does",
            );
        }
    };
    if d.listen_port != wg.port {
        return fail(
            format!(
                "{WG_DEVICE} listens on UDP {}, but the agent is configured with --wireguard-port {}",
                d.listen_port, wg.port
            ),
            "remote nodes send to --wireguard-port: restart the agent (it sets the port), find what changed it by hand, and use one wireguard-port in every cluster of the mesh",
        );
    }
    let Some(private) = d.private_key else {
        return fail(
            format!("{WG_DEVICE} has no private key"),
            "restart the agent: it sets the key kept in --wireguard-key-dir",
        );
    };
    let public = format_wireguard_key(&KeyPair::from_private(private).public);
    if public != wg.public_key {
        return fail(
            format!(
                "{WG_DEVICE}'s key pair has public key {}, but the agent publishes {}",
                short(&public),
                short(&wg.public_key)
            ),
            "restart the agent: it sets the device's key from --wireguard-key-dir; something changed it by hand",
        );
    }
    let published = match record {
        Some((key, Some(k))) if k == public => format!(", published in {key}"),
        Some((key, other)) => {
            return fail(
                format!(
                    "{WG_DEVICE} uses public key {}, but this node's record {key} publishes {}",
                    short(&public),
                    other.as_deref().map(short).unwrap_or_else(|| "none".into())
                ),
                "remote nodes encrypt to the published key, so their handshakes fail: the agent republishes its record when its key changes; if the record stays wrong, another writer (a second agent with this node's name?) writes it",
            );
        }
        None => String::new(),
    };
    Check::pass(
        L,
        None,
        check::WIREGUARD_DEVICE,
        format!(
            "{WG_DEVICE} up ({} WireGuard), MTU {}, UDP port {}, public key {}{published}; {} peers",
            wg.backend,
            link.mtu,
            d.listen_port,
            short(&public),
            d.peers.len()
        ),
    )
}

/// A remote node reached through WireGuard, as the agent wants it.
#[derive(Debug, Default)]
struct Wanted {
    key: String,
    endpoint: Option<IpAddr>,
    cidrs: Vec<IpNet>,
}

/// Every node of `cluster` that publishes a key, from the agent's routes.
fn wanted(cluster: &str, s: &StatusReport) -> BTreeMap<String, Wanted> {
    let mut out: BTreeMap<String, Wanted> = BTreeMap::new();
    for r in s.routes.iter().filter(|r| r.cluster == cluster) {
        let Some(k) = &r.wireguard_public_key else {
            continue;
        };
        let w = out.entry(r.node.clone()).or_default();
        w.key.clone_from(k);
        w.endpoint = Some(r.node_addr);
        w.cidrs.push(r.cidr);
    }
    out
}

/// The peers of `cluster`'s nodes in the device against the agent's routes;
/// and the nodes of `cluster` reached in clear (a warning).
pub fn peer_checks(cluster: &str, s: &StatusReport, dev: &DeviceState) -> Vec<Check> {
    let Some(wg) = &s.wireguard else {
        return Vec::new();
    };
    let c = Some(cluster);
    let nodes = wanted(cluster, s);
    let mut problems = Vec::new();
    for (node, w) in &nodes {
        let peer =
            parse_wireguard_key(&w.key).and_then(|k| dev.peers.iter().find(|p| p.public_key == k));
        let Some(p) = peer else {
            problems.push(format!(
                "node {node}: no peer with its key {} in {WG_DEVICE}",
                short(&w.key)
            ));
            continue;
        };
        let missing: Vec<String> = w
            .cidrs
            .iter()
            .filter(|c| !p.allowed_ips.iter().any(|a| a.contains(*c)))
            .map(ToString::to_string)
            .collect();
        if !missing.is_empty() {
            problems.push(format!(
                "node {node}: its peer's allowed IPs ({}) lack its Pod CIDR {}",
                p.allowed_ips
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                missing.join(", ")
            ));
        }
        let want = w.endpoint.map(|a| SocketAddr::new(a, wg.port));
        if p.endpoint.map(read::normalize_endpoint) != want {
            problems.push(format!(
                "node {node}: its peer's endpoint is {}, not {}",
                p.endpoint
                    .map(|e| e.to_string())
                    .unwrap_or_else(|| "unset".into()),
                want.map(|e| e.to_string()).unwrap_or_default()
            ));
        }
    }
    let mut out = vec![if problems.is_empty() {
        Check::pass(
            L,
            c,
            check::WIREGUARD_PEER,
            format!(
                "{} node(s) with a WireGuard key, each a peer of {WG_DEVICE} with its Pod CIDRs as allowed IPs and its address, UDP {}, as endpoint",
                nodes.len(),
                wg.port
            ),
        )
    } else {
        Check::fail(
            L,
            c,
            check::WIREGUARD_PEER,
            problems.join("; "),
            "the agent makes the peers follow the records at its next full resync (--resync-interval, and on start); until then these nodes' traffic is dropped or goes to the wrong node. If it comes back, something else configures podmesh-wg (`wg set` by hand, a second agent)",
        )
    }];
    let prefix = format!("{cluster}/");
    let clear: Vec<&str> = wg
        .unencrypted
        .iter()
        .filter_map(|n| n.strip_prefix(&prefix))
        .collect();
    if !clear.is_empty() {
        out.push(Check::warn(
            L,
            c,
            check::WIREGUARD_CLEAR,
            format!(
                "node(s) {} publish no WireGuard key: reached in clear, through the datapath's tunnel",
                clear.join(", ")
            ),
            format!(
                "run their agents with --encryption wireguard (they publish their key in their record, and this node then encrypts to them); or run this agent with --encryption-strict to refuse nodes without a key (rejected, {})",
                crate::desired::code::ENCRYPTION_REQUIRED
            ),
        ));
    }
    out
}

/// The latest handshake with each of `cluster`'s nodes, read after the
/// probes sent traffic: a warning when one is older than
/// [`HANDSHAKE_STALE_SECS`] or never happened.
pub fn handshake_check(cluster: &str, s: &StatusReport, dev: &DeviceState) -> Option<Check> {
    let wg = s.wireguard.as_ref()?;
    let nodes = wanted(cluster, s);
    if nodes.is_empty() {
        return None;
    }
    let now = unix_now() as u64;
    let (mut fresh, mut stale) = (Vec::new(), Vec::new());
    for (node, w) in &nodes {
        let Some(p) =
            parse_wireguard_key(&w.key).and_then(|k| dev.peers.iter().find(|p| p.public_key == k))
        else {
            continue;
        };
        let bytes = format!("rx {} B, tx {} B", p.rx_bytes, p.tx_bytes);
        match (p.last_handshake_sec > 0).then(|| now.saturating_sub(p.last_handshake_sec)) {
            Some(age) if age <= HANDSHAKE_STALE_SECS => {
                fresh.push(format!("{node} {age}s ago ({bytes})"));
            }
            Some(age) => stale.push(format!("{node}: latest handshake {age}s ago ({bytes})")),
            None => stale.push(format!("{node}: no handshake yet ({bytes})")),
        }
    }
    let c = Some(cluster);
    Some(if stale.is_empty() {
        Check::pass(
            L,
            c,
            check::WIREGUARD_HANDSHAKE,
            format!("latest handshakes: {}", fresh.join(", ")),
        )
    } else {
        Check::warn(
            L,
            c,
            check::WIREGUARD_HANDSHAKE,
            stale.join("; "),
            format!(
                "WireGuard handshakes only while traffic flows: on an idle link (and when the probe was skipped) an old handshake is expected. If traffic flows, UDP {} must pass both ways between the two nodes, and the remote node must hold this node's current key (run podmesh diagnose there: wireguard-peer)",
                wg.port
            ),
        )
    })
}

/// What the device says of the peer with `key`, for a failed probe's evidence.
pub fn peer_evidence(dev: &DeviceState, key: &str) -> String {
    let Some(p) =
        parse_wireguard_key(key).and_then(|k| dev.peers.iter().find(|p| p.public_key == k))
    else {
        return format!("; no WireGuard peer with key {}", short(key));
    };
    let now = unix_now() as u64;
    format!(
        "; WireGuard peer: latest handshake {}, rx {} B, tx {} B",
        if p.last_handshake_sec > 0 {
            format!("{}s ago", now.saturating_sub(p.last_handshake_sec))
        } else {
            "never".into()
        },
        p.rx_bytes,
        p.tx_bytes
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{datapath::wireguard::uapi::PeerState, status::RouteStatus};

    fn route(cidr: &str, node: &str, key: Option<&str>) -> RouteStatus {
        RouteStatus {
            cidr: cidr.parse().unwrap(),
            cluster: "west".into(),
            node: node.into(),
            node_addr: "172.31.2.1".parse().unwrap(),
            vtep_mac: None,
            wireguard_public_key: key.map(str::to_string),
        }
    }

    fn status(key: &str, own: &str) -> StatusReport {
        StatusReport {
            routes: vec![
                route("10.2.0.0/24", "w0", Some(key)),
                route("fd00:2::/64", "w0", Some(key)),
                route("10.2.1.0/24", "w1", None),
            ],
            wireguard: Some(WireguardStatus {
                backend: "userspace".into(),
                public_key: own.into(),
                port: 51871,
                unencrypted: vec!["west/w1".into(), "north/w1".into()],
                ..WireguardStatus::default()
            }),
            ..StatusReport::default()
        }
    }

    fn peer(key: [u8; 32], allowed: &[&str], endpoint: &str, handshake: u64) -> PeerState {
        PeerState {
            public_key: key,
            endpoint: Some(endpoint.parse().unwrap()),
            allowed_ips: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            last_handshake_sec: handshake,
            ..PeerState::default()
        }
    }

    #[test]
    fn peers_are_compared_with_the_nodes_that_publish_a_key() {
        let theirs = KeyPair::from_private([7; 32]);
        let mine = KeyPair::from_private([1; 32]);
        let s = status(&theirs.public_base64(), &mine.public_base64());
        let now = unix_now() as u64;
        let mut dev = DeviceState {
            private_key: Some(mine.private),
            listen_port: 51871,
            peers: vec![peer(
                theirs.public,
                &["10.2.0.0/24"],
                "[::ffff:172.31.2.9]:51871",
                0,
            )],
        };
        let c = peer_checks("west", &s, &dev);
        assert!(c[0].is_failure(), "{c:#?}");
        assert!(
            c[0].evidence.contains(
                "node w0: its peer's allowed IPs (10.2.0.0/24) lack its Pod CIDR fd00:2::/64"
            ) && c[0]
                .evidence
                .contains("endpoint is [::ffff:172.31.2.9]:51871, not 172.31.2.1:51871"),
            "{c:#?}"
        );
        // The node without a key: a warning naming it (and no other cluster's).
        assert_eq!(c[1].check, check::WIREGUARD_CLEAR);
        assert!(!c[1].is_failure() && c[1].evidence.starts_with("node(s) w1 publish"));
        assert_eq!(
            handshake_check("west", &s, &dev).unwrap().severity,
            crate::diagnose::Severity::Warning
        );
        dev.peers[0] = peer(
            theirs.public,
            &["10.2.0.0/24", "fd00:2::/64"],
            "[::ffff:172.31.2.1]:51871",
            now - 5,
        );
        let c = peer_checks("west", &s, &dev);
        assert!(c[0].ok, "{c:#?}");
        assert!(handshake_check("west", &s, &dev).unwrap().ok);
        dev.peers.clear();
        let c = peer_checks("west", &s, &dev);
        assert!(c[0].is_failure() && c[0].evidence.starts_with("node w0: no peer with its key"));
        assert!(peer_evidence(&dev, &theirs.public_base64()).contains("no WireGuard peer"));
    }

    #[test]
    fn the_device_is_checked_against_the_published_key_and_port() {
        let mine = KeyPair::from_private([1; 32]);
        let s = status("", &mine.public_base64());
        let wg = s.wireguard.as_ref().unwrap();
        let link = Link {
            index: 9,
            name: WG_DEVICE.into(),
            flags: IFF_UP,
            mtu: 1420,
            mac: vec![],
            kind: None,
            vxlan: None,
        };
        let mut dev = DeviceState {
            private_key: Some(mine.private),
            listen_port: 51871,
            peers: vec![],
        };
        let rec = |k: Option<String>| Some(("podmesh/v1/nodes/east/e0".to_string(), k));
        let c = device_check(
            wg,
            Some(&link),
            &Ok(dev.clone()),
            rec(Some(mine.public_base64())),
        );
        assert!(
            c.ok && c.evidence.contains("published in podmesh/v1/nodes/east/e0"),
            "{c:#?}"
        );
        let other = KeyPair::from_private([2; 32]).public_base64();
        let c = device_check(wg, Some(&link), &Ok(dev.clone()), rec(Some(other)));
        assert!(
            c.is_failure()
                && c.evidence
                    .contains("record podmesh/v1/nodes/east/e0 publishes")
        );
        assert!(device_check(wg, Some(&link), &Ok(dev.clone()), rec(None)).is_failure());
        assert!(device_check(wg, None, &Ok(dev.clone()), None).is_failure());
        dev.listen_port = 51872;
        let c = device_check(wg, Some(&link), &Ok(dev), None);
        assert!(c.is_failure() && c.evidence.contains("--wireguard-port 51871"));
        assert_eq!(
            published_key(br#"{"name":"e0","wireguardPublicKey":"abc"}"#),
            Some("abc".into())
        );
    }
}
