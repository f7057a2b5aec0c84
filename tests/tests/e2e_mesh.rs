//! End to end: two clusters × two nodes × two pods in network namespaces, a
//! mesh etcd with mTLS and a podmesh-etcd-proxy per cluster, real
//! `podmesh-agent` processes on the ebpf datapath; pings and `/status`.
use std::{net::Ipv4Addr, time::Duration};

use anyhow::{Context, ensure};
use podmesh_agent::{
    desired::RecordState,
    status::{RemoteStatus, StatusReport},
};
use podmesh_tests::{eventually, mesh::Mesh, require_root};

const READY: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);

fn start() -> anyhow::Result<Mesh> {
    let mut m = Mesh::start(&["east", "west"], 2, 2, "ebpf")?;
    m.wait_ready(READY)?;
    Ok(m)
}

fn status(m: &Mesh, node: &str) -> Result<StatusReport, String> {
    let body = m.status(node).map_err(|e| format!("{e:#}"))?;
    serde_json::from_str(&body).map_err(|e| format!("/status of {node} is not a status: {e}"))
}

fn remote<'a>(s: &'a StatusReport, name: &str) -> Result<&'a RemoteStatus, String> {
    s.remotes
        .get(name)
        .ok_or_else(|| format!("no remote {name} in status of {}", s.local.node))
}

/// Pings every pair until each has answered once (pairs that answered are
/// not retried); fails with the pairs that never did.
fn all_answer(m: &Mesh, pairs: &[(String, Ipv4Addr)], timeout: Duration) -> anyhow::Result<()> {
    let mut pending = pairs.to_vec();
    eventually(timeout, || {
        pending = m.unreachable(&pending);
        if pending.is_empty() {
            Ok(())
        } else {
            Err(format!("unreachable: {pending:?}"))
        }
    })
    .map(drop)
}

/// Every pair answers, each with one ping, right now.
fn all_answer_now(m: &Mesh, pairs: &[(String, Ipv4Addr)]) -> anyhow::Result<()> {
    let bad = m.unreachable(pairs);
    ensure!(bad.is_empty(), "unreachable: {bad:?}");
    Ok(())
}

/// `node`'s status shows `remote` connected and synced with exactly the
/// nodes `expect` programmed (each with a route).
fn remote_programmed(
    m: &Mesh,
    node: &str,
    remote_name: &str,
    expect: &[String],
) -> Result<(), String> {
    let s = status(m, node)?;
    let r = remote(&s, remote_name)?;
    if !(r.connected && r.synced) {
        return Err(format!(
            "{node}: {remote_name} connected={} synced={} ({:?})",
            r.connected, r.synced, r.last_error
        ));
    }
    for n in expect {
        let rec = r
            .records
            .iter()
            .find(|o| o.kind == "node" && o.name.as_deref() == Some(n))
            .ok_or_else(|| format!("{node}: no record of {remote_name}/{n}"))?;
        if rec.state != RecordState::Programmed {
            return Err(format!("{node}: {remote_name}/{n} is {:?}", rec.state));
        }
        if !s
            .routes
            .iter()
            .any(|rt| rt.cluster == remote_name && rt.node == *n)
        {
            return Err(format!(
                "{node}: no route to {remote_name}/{n}: {:?}",
                s.routes
            ));
        }
    }
    if r.nodes_programmed != expect.len() {
        return Err(format!(
            "{node}: {} nodes of {remote_name} programmed, expected {}",
            r.nodes_programmed,
            expect.len()
        ));
    }
    Ok(())
}

fn cross_pairs(m: &Mesh) -> Vec<(String, Ipv4Addr)> {
    [m.pairs("east", "west"), m.pairs("west", "east")].concat()
}

#[test]
fn every_pod_reaches_every_pod_of_the_other_cluster() -> anyhow::Result<()> {
    if !require_root("every_pod_reaches_every_pod_of_the_other_cluster") {
        return Ok(());
    }
    let m = start()?;
    let pairs = cross_pairs(&m);
    assert_eq!(pairs.len(), 32);
    all_answer(&m, &pairs, CONVERGE)?;
    for (node, remote_name) in [("east-n0", "west"), ("west-n1", "east")] {
        let expect = m.nodes_of(remote_name);
        eventually(CONVERGE, || {
            remote_programmed(&m, node, remote_name, &expect)
        })?;
        let s = status(&m, node).map_err(anyhow::Error::msg)?;
        assert!(s.ready, "{node} not ready: {s:?}");
        assert!(s.local.published, "{node} did not publish its node record");
        assert_eq!(s.datapath_error, None);
    }
    Ok(())
}

#[test]
fn node_added_at_run_time_becomes_reachable() -> anyhow::Result<()> {
    if !require_root("node_added_at_run_time_becomes_reachable") {
        return Ok(());
    }
    let mut m = start()?;
    all_answer(&m, &cross_pairs(&m), CONVERGE)?;
    let added = m.add_node("west")?;
    m.wait_ready(READY)?;
    let new_pods: Vec<Ipv4Addr> = m.node(&added)?.pods.iter().map(|p| p.addr).collect();
    let mut pairs = Vec::new();
    for p in m.pods_of("east") {
        for a in &new_pods {
            pairs.push((p.name.clone(), *a));
        }
    }
    let from_new: Vec<_> = m
        .pairs("west", "east")
        .into_iter()
        .filter(|(from, _)| from.starts_with(&format!("{added}-")))
        .collect();
    assert_eq!(pairs.len() + from_new.len(), 16);
    all_answer(&m, &[pairs, from_new].concat(), CONVERGE)?;
    let expect = m.nodes_of("west");
    assert_eq!(expect.len(), 3);
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || remote_programmed(&m, &node, "west", &expect))?;
    }
    Ok(())
}

#[test]
fn cluster_removed_from_secret_is_withdrawn_and_comes_back() -> anyhow::Result<()> {
    if !require_root("cluster_removed_from_secret_is_withdrawn_and_comes_back") {
        return Ok(());
    }
    let mut m = start()?;
    let east_to_west = m.pairs("east", "west");
    all_answer(&m, &cross_pairs(&m), CONVERGE)?;

    m.remove_from_secret("east", "west")?;
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || {
            let s = status(&m, &node)?;
            if s.remotes.contains_key("west") || s.routes.iter().any(|r| r.cluster == "west") {
                return Err(format!("{node} still follows west: {:?}", s.routes));
            }
            let routes = m.routes(&node).map_err(|e| e.to_string())?;
            if routes.lines().any(|l| l.starts_with("10.2.")) {
                return Err(format!("{node} still routes west's pods:\n{routes}"));
            }
            Ok(())
        })?;
    }
    let answered: Vec<_> = east_to_west
        .iter()
        .filter(|(from, to)| m.ping(from, *to))
        .collect();
    assert!(answered.is_empty(), "withdrawn, yet answered: {answered:?}");

    m.restore_in_secret("east", "west")?;
    let expect = m.nodes_of("west");
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || remote_programmed(&m, &node, "west", &expect))?;
    }
    all_answer(&m, &cross_pairs(&m), CONVERGE)?;
    Ok(())
}

#[test]
fn proxy_killed_keeps_routes_and_recovers() -> anyhow::Result<()> {
    if !require_root("proxy_killed_keeps_routes_and_recovers") {
        return Ok(());
    }
    let mut m = start()?;
    let pairs = cross_pairs(&m);
    all_answer(&m, &pairs, CONVERGE)?;

    m.kill_proxy("west")?;
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || {
            let s = status(&m, &node)?;
            let r = remote(&s, "west")?;
            if r.connected {
                return Err(format!("{node} still reports west connected"));
            }
            Ok(())
        })?;
        let s = status(&m, &node).map_err(anyhow::Error::msg)?;
        let r = remote(&s, "west").map_err(anyhow::Error::msg)?;
        assert!(!s.ready, "{node} ready although west is unreachable");
        assert!(
            r.last_error.is_some(),
            "{node}: no error reported for west: {r:?}"
        );
        assert_eq!(
            s.routes.iter().filter(|rt| rt.cluster == "west").count(),
            2,
            "{node} dropped west's routes: {:?}",
            s.routes
        );
    }
    // The data path does not go through the proxy: existing routes carry on.
    all_answer_now(&m, &pairs).context("traffic while west's proxy is down")?;

    m.restart_proxy("west")?;
    let expect = m.nodes_of("west");
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || remote_programmed(&m, &node, "west", &expect))?;
    }
    m.wait_ready(READY)?;
    all_answer_now(&m, &pairs).context("traffic after west's proxy came back")?;
    Ok(())
}

#[test]
fn remote_record_claiming_a_local_range_is_rejected() -> anyhow::Result<()> {
    if !require_root("remote_record_claiming_a_local_range_is_rejected") {
        return Ok(());
    }
    let m = start()?;
    let pairs = cross_pairs(&m);
    all_answer(&m, &pairs, CONVERGE)?;

    // A node record in west whose Pod CIDR is east-n1's own block.
    let victim = m.node("east-n1")?;
    let stolen = victim.pod_cidr.to_string();
    let victim_addr = victim.addr.to_string();
    let key = "podmesh/v1/nodes/west/rogue";
    let value = serde_json::json!({
        "name": "rogue", "cluster": "west", "clusterID": 2,
        "addresses": ["172.31.2.99"], "podCIDRs": [stolen],
        "vtepMAC": "02:00:ac:1f:02:63"
    });
    m.put_raw("west", key, &value.to_string())?;

    for node in m.nodes_of("east") {
        let (code, message) = eventually(CONVERGE, || {
            let s = status(&m, &node)?;
            let r = remote(&s, "west")?;
            let rec = r
                .records
                .iter()
                .find(|o| o.key == key)
                .ok_or_else(|| format!("{node}: {key} not in status yet"))?;
            match &rec.state {
                RecordState::Rejected(j) => Ok((j.code.clone(), j.message.clone())),
                RecordState::Programmed => Err(format!("{node}: {key} was programmed")),
            }
        })?;
        assert!(
            !code.is_empty(),
            "{node}: rejection of {key} without a code"
        );
        assert!(
            message.contains(&stolen),
            "{node}: the reason does not name the range {stolen}: {message}"
        );
        let s = status(&m, &node).map_err(anyhow::Error::msg)?;
        assert!(
            !s.routes.iter().any(|rt| rt.node == "rogue"),
            "{node} programmed the rogue record: {:?}",
            s.routes
        );
        assert!(
            s.remotes["west"].rejected_by_reason.get(&code).copied() >= Some(1),
            "{node}: rejection not counted by reason: {:?}",
            s.remotes["west"].rejected_by_reason
        );
        eprintln!("{node}: {key} rejected: {code}: {message}");
    }
    // east-n0 still reaches east-n1's pods through the cluster's own route.
    let routes = m.routes("east-n0")?;
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{stolen} via {victim_addr}"))),
        "east-n0 lost its route to {stolen}:\n{routes}"
    );
    let east_pairs = m.pairs("east", "east");
    all_answer_now(&m, &east_pairs).context("east's own traffic")?;
    all_answer_now(&m, &pairs).context("cross-cluster traffic")?;
    // The legitimate west nodes are still programmed next to the rejected record.
    let expect = m.nodes_of("west");
    for node in m.nodes_of("east") {
        eventually(CONVERGE, || remote_programmed(&m, &node, "west", &expect))?;
    }
    m.delete_raw("west", key)?;
    Ok(())
}
