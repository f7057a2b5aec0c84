//! End to end over IPv6: real `podmesh-agent`s, mesh etcds and
//! `podmesh-etcd-proxy`s reached over IPv6 with mTLS (`https://[addr]:port`
//! endpoints, certificates with IPv6 SANs), dual-stack pods. An IPv6-only
//! underlay (no IPv4 address on any node's `eth0`) in ebpf, vxlan and direct
//! mode; a dual-stack underlay with `--underlay-family ipv6` and `ipv4`.
use std::{net::IpAddr, time::Duration};

use podmesh_agent::{desired::RecordState, model::UnderlayFamily, status::StatusReport};
use podmesh_tests::{eventually, mesh::Mesh, require_root, topo::Underlay};

const READY: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);

fn start(underlay: Underlay, datapath: &str, args: &[&str]) -> anyhow::Result<Mesh> {
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .pods(1)
        .underlay(underlay)
        .dual_stack_pods()
        .datapath(datapath)
        .agent_args(args)
        .start()?;
    m.wait_ready(READY)?;
    Ok(m)
}

fn status(m: &Mesh, node: &str) -> Result<StatusReport, String> {
    let body = m.status(node).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&body).map_err(|e| format!("/status of {node} is not a status: {e}"))
}

/// Every node's status lists every node of the other cluster as programmed,
/// with routes to it over an endpoint of `family`.
fn all_programmed(m: &Mesh, family: UnderlayFamily) -> Result<(), String> {
    for (node, remote) in [
        ("east-n0", "west"),
        ("east-n1", "west"),
        ("west-n0", "east"),
        ("west-n1", "east"),
    ] {
        let s = status(m, node)?;
        let r = s
            .remotes
            .get(remote)
            .ok_or_else(|| format!("{node}: no remote {remote}"))?;
        if !(r.connected && r.synced) {
            return Err(format!("{node}: {remote} not synced ({:?})", r.last_error));
        }
        for n in m.nodes_of(remote) {
            let rec = r
                .records
                .iter()
                .find(|o| o.kind == "node" && o.name.as_deref() == Some(&n))
                .ok_or_else(|| format!("{node}: no record of {remote}/{n}"))?;
            if rec.state != RecordState::Programmed {
                return Err(format!("{node}: {remote}/{n} is {:?}", rec.state));
            }
            let routes: Vec<_> = s
                .routes
                .iter()
                .filter(|rt| rt.cluster == remote && rt.node == n)
                .collect();
            // One IPv4 and one IPv6 Pod CIDR per node.
            if routes.len() != 2 || !routes.iter().all(|rt| family.holds(rt.node_addr)) {
                return Err(format!("{node}: routes to {remote}/{n}: {routes:?}"));
            }
        }
    }
    Ok(())
}

/// IPv4 and IPv6 pings between every pair of pods of different clusters
/// answer (each pair retried until it has answered once).
fn all_pods_answer(m: &Mesh) -> anyhow::Result<()> {
    let mut pending = Vec::new();
    for a in ["east", "west"] {
        let b = if a == "east" { "west" } else { "east" };
        for p in m.pods_of(a) {
            for q in m.pods_of(b) {
                pending.push((p.name.clone(), IpAddr::V4(q.addr)));
                pending.push((p.name.clone(), IpAddr::V6(q.addr6.expect("dual-stack pod"))));
            }
        }
    }
    assert_eq!(pending.len(), 16);
    eventually(CONVERGE, || {
        pending.retain(|(from, to)| {
            !m.pods_of("east")
                .chain(m.pods_of("west"))
                .find(|p| p.name == *from)
                .is_some_and(|p| p.ns.ping(&to.to_string(), 1, None))
        });
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("unreachable: {pending:?}"))
        }
    })
    .map(drop)
}

fn ipv6_only(datapath: &str) -> anyhow::Result<()> {
    let m = start(Underlay::Ipv6, datapath, &[])?;
    for n in ["east-n0", "east-n1", "west-n0", "west-n1"] {
        let v4 = m.node(n)?.ns.ip(&["-4", "addr", "show", "dev", "eth0"])?;
        assert!(v4.trim().is_empty(), "{n}: IPv4 on the underlay: {v4}");
    }
    for cp in m.control_planes() {
        assert!(
            cp.proxy_endpoint.starts_with("https://[fd31::"),
            "proxy not reached over IPv6: {}",
            cp.proxy_endpoint
        );
    }
    all_pods_answer(&m)?;
    eventually(CONVERGE, || all_programmed(&m, UnderlayFamily::Ipv6))?;
    Ok(())
}

#[test]
fn ebpf_mesh_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("ebpf_mesh_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    ipv6_only("ebpf")
}

#[test]
fn vxlan_mesh_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("vxlan_mesh_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    ipv6_only("vxlan")
}

#[test]
fn direct_mesh_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("direct_mesh_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    ipv6_only("direct")
}

/// The hijack cases over IPv6, written into the mesh etcd of a cluster that
/// runs only its control plane: a node claiming `::/0`, one of this
/// cluster's IPv6 ranges, a link-local or a multicast range, this node's own
/// address, or offering no IPv6 endpoint; each is rejected with its code and
/// never programmed, the honest node beside them is, and no pod loses its
/// peers.
#[test]
fn ipv6_hijacks_through_a_remote_etcd_are_rejected() -> anyhow::Result<()> {
    if !require_root("ipv6_hijacks_through_a_remote_etcd_are_rejected") {
        return Ok(());
    }
    // rogue runs only its control plane: the test writes its records.
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .cluster("rogue", 0)
        .pods(1)
        .underlay(Underlay::Ipv6)
        .dual_stack_pods()
        .start()?;
    m.wait_ready(READY)?;
    all_pods_answer(&m)?;
    let east_n0 = m.node("east-n0")?.addr6.expect("IPv6 underlay").to_string();
    m.put_raw(
        "rogue",
        "podmesh/v1/clusters/rogue",
        &serde_json::json!({"name": "rogue", "id": 3,
            "podCIDRs": ["fd00:3::/48", "10.3.0.0/16"], "serviceCIDRs": []})
        .to_string(),
    )?;
    let cases = [
        ("r-default", "fd31::3:1", "::/0", "cidr-default-route"),
        (
            "r-local",
            "fd31::3:2",
            "fd00:1:0:9::/64",
            "pod-cidr-overlap",
        ),
        ("r-linklocal", "fd31::3:3", "fe80::/64", "cidr-reserved"),
        ("r-multicast", "fd31::3:4", "ff05::/64", "cidr-reserved"),
        (
            "r-myaddr",
            &east_n0,
            "fd00:3:0:5::/64",
            "node-address-local",
        ),
        (
            "r-v4only",
            "172.31.3.6",
            "fd00:3:0:6::/64",
            "node-address-family-missing",
        ),
        ("r-honest", "fd31::3:7", "fd00:3:0:7::/64", "programmed"),
    ];
    for (n, addr, pod, _) in cases {
        m.put_raw(
            "rogue",
            &format!("podmesh/v1/nodes/rogue/{n}"),
            &serde_json::json!({"name": n, "cluster": "rogue", "clusterID": 3,
                "addresses": [addr], "podCIDRs": [pod], "vtepMAC": "02:00:00:00:03:01"})
            .to_string(),
        )?;
    }
    let codes = |s: &StatusReport| -> Result<Vec<(String, String)>, String> {
        let r = s.remotes.get("rogue").ok_or("no remote rogue")?;
        Ok(r.records
            .iter()
            .filter(|o| o.kind == "node")
            .map(|o| {
                let code = match &o.state {
                    RecordState::Programmed => "programmed".to_string(),
                    RecordState::Rejected(j) => j.code.clone(),
                };
                (o.name.clone().unwrap_or_default(), code)
            })
            .collect())
    };
    let s = eventually(CONVERGE, || {
        let s = status(&m, "east-n0")?;
        let got = codes(&s)?;
        if got.len() == cases.len() {
            Ok(s)
        } else {
            Err(format!("rogue records so far: {got:?}"))
        }
    })?;
    let got = codes(&s).map_err(anyhow::Error::msg)?;
    for (n, _, pod, want) in cases {
        let code = &got.iter().find(|(name, _)| name == n).expect("listed").1;
        assert_eq!(code, want, "{n}");
        let routed = s.routes.iter().any(|r| r.cidr.to_string() == pod);
        assert_eq!(routed, want == "programmed", "{n}: {pod} routed: {routed}");
    }
    all_pods_answer(&m)?;
    Ok(())
}

/// Dual-stack nodes publish both addresses; `--underlay-family` decides
/// which ones every node tunnels to.
#[test]
fn dual_stack_underlay_with_either_underlay_family() -> anyhow::Result<()> {
    if !require_root("dual_stack_underlay_with_either_underlay_family") {
        return Ok(());
    }
    for family in [UnderlayFamily::Ipv6, UnderlayFamily::Ipv4] {
        let m = start(
            Underlay::Dual,
            "ebpf",
            &["--underlay-family", family.flag()],
        )?;
        all_pods_answer(&m)?;
        eventually(CONVERGE, || all_programmed(&m, family))?;
        // Every record carries both addresses, the underlay family's first.
        let s = status(&m, "east-n0").map_err(anyhow::Error::msg)?;
        for rec in s.remotes["west"]
            .records
            .iter()
            .filter(|r| r.kind == "node")
        {
            assert_eq!(rec.addresses.len(), 2, "{rec:?}");
            assert!(family.holds(rec.addresses[0]), "{family}: {rec:?}");
        }
    }
    Ok(())
}
