//! End to end: two clusters × two nodes × two pods in network namespaces, a
//! mesh etcd with mTLS and a podmesh-etcd-proxy per cluster, real
//! `podmesh-agent` processes on the ebpf datapath; pings, `/status`,
//! `podmesh status`, kernel routes and the pinned eBPF map.
use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Context, ensure};
use aya::maps::{LpmTrie, MapData};
use ipnet::IpNet;
use podmesh_agent::{
    desired::{RecordState, Rejection},
    status::{RemoteStatus, StatusReport},
};
use podmesh_common::{REMOTES_V4_MAP, RemoteNode};
use podmesh_tests::{
    eventually,
    mesh::{Kept, Mesh, process_ended},
    netns::{self, NetNs},
    require_root,
};

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
    m.cross_cluster_pairs()
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
    packets_are_counted_and_misses_dropped(&m)
}

/// The tc program's counters in `/status` and `/metrics`: the pings were
/// forwarded; a route whose map entry is gone (deleted here by hand; the
/// agent's resync is a minute away) counts a miss and drops the packet.
fn packets_are_counted_and_misses_dropped(m: &Mesh) -> anyhow::Result<()> {
    let node = "east-n0";
    let metric = |result: &str| -> anyhow::Result<u64> {
        let body = m.agent_get(node, "/metrics")?;
        let name = format!("podmesh_datapath_packets_total{{result=\"{result}\"}} ");
        body.lines()
            .find_map(|l| l.strip_prefix(&name))
            .with_context(|| format!("no {name}in /metrics of {node}:\n{body}"))?
            .trim()
            .parse()
            .context("not a number")
    };
    let s = status(m, node).map_err(anyhow::Error::msg)?;
    let c = s
        .datapath_packets
        .context("no datapath_packets in /status")?;
    ensure!(c.forwarded > 0, "/status counts no forwarded packet: {c:?}");
    ensure!(
        metric("forwarded")? >= c.forwarded,
        "/metrics behind /status"
    );
    let misses = metric("miss")?;

    let west = m.node("west-n1")?;
    let to = west.pods[0].addr;
    // A pod behind `node`, whose map loses the entry.
    let from = m.node(node)?.pods[0].name.clone();
    let data = MapData::from_pin(m.bpf_pin_dir(node).join(REMOTES_V4_MAP))?;
    let mut map: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let cidr = west.pod_cidr;
    map.remove(&aya::maps::lpm_trie::Key::new(
        u32::from(cidr.prefix_len()),
        cidr.network().octets(),
    ))?;
    ensure!(
        !m.ping(&from, to),
        "{from} reached {to} without a map entry"
    );
    let after = metric("miss")?;
    ensure!(
        after > misses,
        "a packet to {to} without a map entry was not counted as a miss ({misses} -> {after})"
    );
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

/// The rejection of the record at `key` of `remote_name` in `s`; an error
/// while it is missing or programmed.
fn rejection<'a>(
    s: &'a StatusReport,
    remote_name: &str,
    key: &str,
) -> Result<&'a Rejection, String> {
    let r = remote(s, remote_name)?;
    let rec = r
        .records
        .iter()
        .find(|o| o.key == key)
        .ok_or_else(|| format!("{}: {key} not in status yet", s.local.node))?;
    match &rec.state {
        RecordState::Rejected(j) => Ok(j),
        RecordState::Programmed => Err(format!("{}: {key} was programmed", s.local.node)),
    }
}

/// The entries of the agent's pinned LPM map on `node` (CIDR -> tunnel endpoint).
fn map_entries(m: &Mesh, node: &str) -> anyhow::Result<BTreeMap<IpNet, Ipv4Addr>> {
    let pin = m.bpf_pin_dir(node).join(REMOTES_V4_MAP);
    let data = MapData::from_pin(&pin).with_context(|| format!("opening {}", pin.display()))?;
    let map: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let mut out = BTreeMap::new();
    for e in map.iter() {
        let (k, v) = e?;
        let cidr = IpNet::new(IpAddr::from(k.data()), k.prefix_len() as u8)?;
        out.insert(cidr, Ipv4Addr::from(v.addr_v4));
    }
    Ok(out)
}

/// `podmesh status -o json` on `node`, as the CLI prints it.
fn cli_status(m: &Mesh, node: &str) -> anyhow::Result<StatusReport> {
    let out = m.podmesh(node, &["status", "-o", "json"])?;
    ensure!(
        out.status.success(),
        "podmesh status -o json on {node}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("podmesh status -o json is not a status")
}

/// A remote cluster whose cluster record declares a Pod CIDR inside the
/// local cluster's range, with a node record inside that declaration:
/// the observing cluster rejects the cluster record with the overlap code
/// (and so its node), programs nothing for it, and keeps the legitimate
/// owner's traffic; a third cluster rejects the node with the overlap code
/// as well, because the range belongs to a cluster it already routes.
#[test]
fn remote_cluster_claiming_a_local_range_is_rejected_and_reported() -> anyhow::Result<()> {
    if !require_root("remote_cluster_claiming_a_local_range_is_rejected_and_reported") {
        return Ok(());
    }
    // `rogue` runs only its control plane: the test writes its records.
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .cluster("rogue", 0)
        .start()?;
    m.wait_ready(READY)?;
    let pairs = cross_pairs(&m);
    assert_eq!(pairs.len(), 32);
    all_answer(&m, &pairs, CONVERGE)?;

    // east-n1's own block, inside east's declared 10.1.0.0/16.
    let victim = m.node("east-n1")?;
    let (stolen, owner) = (victim.pod_cidr, victim.addr);
    let stolen_net = IpNet::V4(stolen);
    let cluster_key = "podmesh/v1/clusters/rogue";
    let node_key = "podmesh/v1/nodes/rogue/rogue-n0";
    let rogue_addr = Ipv4Addr::new(172, 31, 3, 1);
    m.put_raw(
        "rogue",
        cluster_key,
        &serde_json::json!({
            "name": "rogue", "id": 3, "podCIDRs": [stolen], "serviceCIDRs": []
        })
        .to_string(),
    )?;
    m.put_raw(
        "rogue",
        node_key,
        &serde_json::json!({
            "name": "rogue-n0", "cluster": "rogue", "clusterID": 3,
            "addresses": [rogue_addr], "podCIDRs": [stolen],
            "vtepMAC": "02:00:ac:1f:03:01"
        })
        .to_string(),
    )?;

    for node in m.nodes_of("east") {
        let s = eventually(CONVERGE, || {
            let s = status(&m, &node)?;
            rejection(&s, "rogue", cluster_key)?;
            rejection(&s, "rogue", node_key)?;
            Ok(s)
        })?;
        let c = rejection(&s, "rogue", cluster_key).map_err(anyhow::Error::msg)?;
        assert_eq!(c.code, "pod-cidr-overlap", "{node}: {c:?}");
        assert!(
            c.message.contains(&stolen.to_string()) && c.message.contains("local cluster east"),
            "{node}: the reason names neither {stolen} nor the local cluster: {}",
            c.message
        );
        let n = rejection(&s, "rogue", node_key).map_err(anyhow::Error::msg)?;
        assert_eq!(n.code, "cluster-rejected", "{node}: {n:?}");
        assert!(
            n.message.contains("pod-cidr-overlap"),
            "{node}: the node's reason does not name its cluster's: {}",
            n.message
        );
        let r = &s.remotes["rogue"];
        assert!(r.connected && r.synced, "{node}: rogue {r:?}");
        assert_eq!(r.nodes_programmed, 0, "{node}: {r:?}");
        assert!(
            r.rejected_by_reason.get("pod-cidr-overlap").copied() >= Some(1),
            "{node}: not counted by reason: {:?}",
            r.rejected_by_reason
        );
        assert!(
            !s.routes
                .iter()
                .any(|rt| rt.cluster == "rogue" || rt.cidr == stolen_net),
            "{node} programmed the claim: {:?}",
            s.routes
        );

        // The CLI shows the same, as JSON and in its table.
        let cli = cli_status(&m, &node)?;
        let c = rejection(&cli, "rogue", cluster_key).map_err(anyhow::Error::msg)?;
        assert_eq!(c.code, "pod-cidr-overlap", "{node}: podmesh status -o json");
        let table = m.podmesh(&node, &["status"])?;
        let table = String::from_utf8_lossy(&table.stdout);
        assert!(
            table
                .lines()
                .any(|l| l.contains(cluster_key) && l.contains("[pod-cidr-overlap]")),
            "{node}: podmesh status does not list the rejection:\n{table}"
        );

        // Nothing in the kernel: no podmesh route, no map entry for the claim.
        let routes = netns::ip(&[
            "-n",
            m.node(&node)?.ns.name(),
            "route",
            "show",
            "proto",
            "80",
        ])?;
        assert!(
            !routes.lines().any(|l| l.starts_with(&stolen.to_string())),
            "{node} routes the claimed range into the tunnel:\n{routes}"
        );
        let map = map_entries(&m, &node)?;
        assert!(!map.contains_key(&stolen_net), "{node}: map {map:?}");
        for w in m.nodes_of("west") {
            let cidr = IpNet::V4(m.node(&w)?.pod_cidr);
            assert!(
                map.contains_key(&cidr),
                "{node}: no map entry for {w}: {map:?}"
            );
        }
        eprintln!("{node}: {cluster_key} rejected: {}: {}", c.code, c.message);
    }
    // east-n0 still reaches east-n1's pods through the cluster's own route.
    let routes = m.routes("east-n0")?;
    assert!(
        routes
            .lines()
            .any(|l| l.starts_with(&format!("{stolen} via {owner}"))),
        "east-n0 lost its route to {stolen}:\n{routes}"
    );

    // west routes the range to its legitimate owner and rejects the newcomer.
    for node in m.nodes_of("west") {
        let s = eventually(CONVERGE, || {
            let s = status(&m, &node)?;
            rejection(&s, "rogue", node_key)?;
            Ok(s)
        })?;
        let n = rejection(&s, "rogue", node_key).map_err(anyhow::Error::msg)?;
        assert_eq!(n.code, "pod-cidr-overlap", "{node}: {n:?}");
        let route = s.routes.iter().find(|rt| rt.cidr == stolen_net);
        assert!(
            route.is_some_and(|rt| rt.cluster == "east" && rt.node == "east-n1"),
            "{node}: {stolen} is not routed to east-n1: {route:?}"
        );
        let map = map_entries(&m, &node)?;
        assert_eq!(map.get(&stolen_net), Some(&owner), "{node}: map {map:?}");
    }

    all_answer_now(&m, &m.pairs("east", "east")).context("east's own traffic")?;
    all_answer_now(&m, &pairs).context("cross-cluster traffic")?;
    // The legitimate nodes are still programmed next to the rejected records.
    for (node, remote_name) in [("east-n0", "west"), ("west-n0", "east")] {
        let expect = m.nodes_of(remote_name);
        eventually(CONVERGE, || {
            remote_programmed(&m, node, remote_name, &expect)
        })?;
    }
    Ok(())
}

/// What `cargo xtask demo --keep` and `demo down` rely on: a kept mesh
/// outlives its value and keeps forwarding; its manifest survives a JSON
/// round trip (the demo's state file) and removes exactly what it lists.
#[test]
fn kept_mesh_keeps_running_and_is_removed_exactly() -> anyhow::Result<()> {
    if !require_root("kept_mesh_keeps_running_and_is_removed_exactly") {
        return Ok(());
    }
    let prefix = format!("pmt{}-kept-", std::process::id());
    // Same prefix, not the mesh's: must survive the removal.
    let bystander = NetNs::named(&format!("{prefix}bystander"))?;
    let parent = tempfile::tempdir()?;
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .namespace_prefix(&prefix)
        .dir_in(parent.path())
        .start()?;
    m.wait_ready(READY)?;
    let pairs = cross_pairs(&m);
    all_answer(&m, &pairs, CONVERGE)?;
    let east_pod = m.pods_of("east").next().context("east pod")?;
    let (from, to) = (
        east_pod.ns.name().to_string(),
        m.pods_of("west").next().context("west pod")?.addr,
    );

    let kept = m.into_kept();
    // Removed also when an assertion fails before the removal under test.
    let mut guard = RemoveOnDrop(Some(kept.clone()));
    // underlay, 2 nodes, 2 pods, 2 control planes; 2 agents, 2 proxies, 2 etcds.
    assert_eq!(kept.namespaces.len(), 7, "{kept:?}");
    assert!(
        kept.namespaces.iter().all(|n| n.starts_with(&prefix)),
        "{kept:?}"
    );
    assert!(kept.namespaces.iter().all(|n| netns::exists(n)), "{kept:?}");
    assert_eq!(kept.processes.len(), 6, "{kept:?}");
    // A bpffs per node, still holding the agents' pins.
    assert_eq!(kept.mounts.len(), 2, "{kept:?}");
    for mnt in &kept.mounts {
        assert!(mounted(mnt), "{} is not mounted", mnt.display());
        assert!(mnt.join("podmesh").join(REMOTES_V4_MAP).exists(), "{mnt:?}");
    }
    for p in &kept.processes {
        assert!(!process_ended(p.pid), "{p:?} is not running");
    }
    let dir = kept.dir.clone().context("no directory")?;
    assert!(
        dir.starts_with(parent.path()) && dir.join("logs").is_dir(),
        "{dir:?}"
    );
    assert!(
        ping_kept(&from, to),
        "{from} -> {to} stopped answering once the mesh was kept"
    );

    let back: Kept = serde_json::from_str(&serde_json::to_string(&kept)?)?;
    assert_eq!(back, kept);
    guard.0 = None;
    let errors = back.remove();
    assert!(errors.is_empty(), "{errors:?}");
    for n in &kept.namespaces {
        assert!(!netns::exists(n), "{n} was not removed");
    }
    for p in &kept.processes {
        assert!(process_ended(p.pid), "{p:?} still runs");
    }
    for mnt in &kept.mounts {
        assert!(!mounted(mnt), "{} is still mounted", mnt.display());
    }
    assert!(!dir.exists(), "{} was not removed", dir.display());
    assert!(
        netns::exists(bystander.name()),
        "the bystander namespace was removed"
    );
    Ok(())
}

/// Whether `path` is a mount point of this process's mount namespace.
fn mounted(path: &std::path::Path) -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(&*path.to_string_lossy()))
}

/// Removes a kept mesh when dropped.
struct RemoveOnDrop(Option<Kept>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(k) = self.0.take() {
            for e in k.remove() {
                eprintln!("warning: {e}");
            }
        }
    }
}

/// One ping from namespace `ns` without taking ownership of it.
fn ping_kept(ns: &str, to: Ipv4Addr) -> bool {
    std::process::Command::new("ip")
        .args([
            "netns", "exec", ns, "ping", "-n", "-q", "-c", "3", "-W", "1", "-i", "0.2",
        ])
        .arg(to.to_string())
        .output()
        .is_ok_and(|o| o.status.success())
}
