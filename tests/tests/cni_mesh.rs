//! A real CNI underneath: pods attached by the standard `bridge` and `ptp`
//! plugins with `ipMasq: true`, real `podmesh-agent` processes, and TCP
//! connections that say which source address really arrived.
//!
//! Two clusters × two nodes (node 0 on `bridge`, node 1 on `ptp`): every
//! cross-cluster pod pair connects and the receiver sees the sender's pod
//! address, in ebpf, vxlan and direct mode; a connection to an address
//! outside every cluster is still masqueraded; the plugins' own nat rules are
//! never touched; podmesh's exemption comes back when deleted by hand and
//! follows the Secret; a 4 MB transfer with pod MTU 1500 crosses the tunnel;
//! CNI DEL and ADD of pods while the agents run.
use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::{Context, ensure};
use podmesh_tests::{
    eventually,
    flow::{Sink, exchange},
    mesh::Mesh,
    netns::NetNs,
    require_root,
};

const READY: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);
/// The address standing for the internet: on the underlay, in no cluster.
const INTERNET: Ipv4Addr = Ipv4Addr::new(172, 31, 254, 1);

/// The nat table of `ns` as `iptables-save` prints it, without comments and counters.
fn nat_rules(ns: &NetNs) -> anyhow::Result<String> {
    let out = ns.run("iptables-save", &["-t", "nat"])?;
    Ok(out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| match l.find(" [") {
            Some(i) if l.starts_with(':') => &l[..i],
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The nat rules of every node, by node name.
fn all_nat_rules(m: &Mesh) -> anyhow::Result<Vec<(String, String)>> {
    m.topo
        .nodes
        .iter()
        .map(|n| Ok((n.name.clone(), nat_rules(&n.ns)?)))
        .collect()
}

/// The Pod CIDRs of every node outside `cluster`.
fn remote_cidrs(m: &Mesh, cluster: &str) -> BTreeSet<String> {
    m.topo
        .nodes
        .iter()
        .filter(|n| n.cluster != cluster)
        .map(|n| n.pod_cidr.to_string())
        .collect()
}

/// Every cross-cluster pod pair: (from pod name, to pod address).
fn cross_pairs(m: &Mesh) -> Vec<(String, Ipv4Addr, Ipv4Addr)> {
    let mut v = Vec::new();
    for (fnode, from) in m.topo.pods() {
        for (tnode, to) in m.topo.pods() {
            if fnode.cluster != tnode.cluster {
                v.push((from.name.clone(), from.addr, to.addr));
            }
        }
    }
    v
}

fn pod_ns<'a>(m: &'a Mesh, name: &str) -> anyhow::Result<&'a NetNs> {
    m.topo
        .pods()
        .find(|(_, p)| p.name == name)
        .map(|(_, p)| &p.ns)
        .with_context(|| format!("no pod {name}"))
}

/// Sinks in every pod.
fn sinks(m: &Mesh) -> anyhow::Result<Vec<Sink>> {
    m.topo.pods().map(|(_, p)| Sink::start(&p.ns)).collect()
}

/// Waits until every cross-cluster pair connects, then asserts each arrived
/// from the sending pod's own address.
fn sources_kept(m: &Mesh, mode: &str) -> anyhow::Result<()> {
    let mut wrong = Vec::new();
    for (from, from_addr, to) in cross_pairs(m) {
        let ns = pod_ns(m, &from)?;
        let seen = eventually(CONVERGE, || {
            exchange(ns, IpAddr::V4(to), 1024).map_err(|e| format!("{e:#}"))
        })
        .with_context(|| format!("{mode}: {from} -> {to}"))?;
        if seen.source != IpAddr::V4(from_addr) || seen.bytes != 1024 {
            wrong.push(format!(
                "{from} ({from_addr}) -> {to} arrived from {} with {} bytes",
                seen.source, seen.bytes
            ));
        }
    }
    ensure!(
        wrong.is_empty(),
        "{mode}: pod sources lost across clusters:\n{}",
        wrong.join("\n")
    );
    Ok(())
}

/// A pod's connection to the internet still leaves with its node's address.
fn internet_masqueraded(m: &Mesh, mode: &str) -> anyhow::Result<()> {
    for (node, pod) in m.topo.pods() {
        let seen = exchange(&pod.ns, IpAddr::V4(INTERNET), 100)
            .with_context(|| format!("{mode}: {} -> the internet", pod.name))?;
        ensure!(
            seen.source == IpAddr::V4(node.addr),
            "{mode}: {} reached the internet from {}, not masqueraded behind {} ({})",
            pod.name,
            seen.source,
            node.addr,
            node.cni.cni
        );
    }
    Ok(())
}

/// A 4 MB transfer from the ptp pod of east to the bridge pod of west.
fn large_transfer(m: &Mesh, mode: &str) -> anyhow::Result<()> {
    let from = &m.node("east-n1")?.pods[0];
    let to = &m.node("west-n0")?.pods[0];
    let seen = exchange(&from.ns, IpAddr::V4(to.addr), 4 << 20)
        .with_context(|| format!("{mode}: 4 MB from {} to {}", from.name, to.name))?;
    ensure!(
        seen.bytes == 4 << 20 && seen.source == IpAddr::V4(from.addr),
        "{mode}: 4 MB transfer arrived as {seen:?}"
    );
    Ok(())
}

fn assert_nat_unchanged(m: &Mesh, before: &[(String, String)], when: &str) -> anyhow::Result<()> {
    let now = all_nat_rules(m)?;
    for ((node, a), (_, b)) in before.iter().zip(&now) {
        ensure!(
            a == b,
            "the CNI's nat rules on {node} changed {when}:\nbefore:\n{a}\nafter:\n{b}"
        );
    }
    Ok(())
}

fn wait_exempt(m: &Mesh, node: &str, want: &BTreeSet<String>) -> anyhow::Result<()> {
    let ns = &m.node(node)?.ns;
    eventually(CONVERGE, || match ns.nft_set("podmesh", "remote-pods-v4") {
        Ok(got) if &got == want => Ok(()),
        Ok(got) => Err(format!("{node} exempts {got:?}, wants {want:?}")),
        Err(e) => Err(format!("{e:#}")),
    })
    .map(drop)
}

#[test]
fn pod_sources_survive_the_cni_masquerade_in_every_mode() -> anyhow::Result<()> {
    if !require_root("pod_sources_survive_the_cni_masquerade_in_every_mode") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .pods(1)
        .datapath("ebpf")
        .agent_args(&["--resync-interval", "2"])
        .create()?;
    let internet = m.topo.namespace("inet")?;
    m.topo.attach(&internet, "uinet", INTERNET)?;
    let _internet_sink = Sink::start(&internet)?;
    let mut _sinks = sinks(&m)?;
    let cni_nat = all_nat_rules(&m)?;
    for n in &m.topo.nodes {
        ensure!(
            cni_nat
                .iter()
                .any(|(node, r)| node == &n.name && r.contains("MASQUERADE")),
            "{} ({}) has no CNI masquerade to test against",
            n.name,
            n.cni.cni
        );
    }
    // Before podmesh: the masquerade hides the pods (what users hit).
    m.start_kvstores()?;
    m.start_proxies()?;
    m.start_agents()?;
    m.wait_ready(READY)?;

    sources_kept(&m, "ebpf")?;
    internet_masqueraded(&m, "ebpf")?;
    large_transfer(&m, "ebpf")?;
    assert_nat_unchanged(&m, &cni_nat, "after podmesh started")?;
    for n in ["east-n0", "east-n1"] {
        wait_exempt(&m, n, &remote_cidrs(&m, "east"))?;
    }

    // Deleted by hand: back with the next resync, the pods' sources with it.
    m.node("east-n0")?
        .ns
        .run("nft", &["delete", "table", "inet", "podmesh"])?;
    wait_exempt(&m, "east-n0", &remote_cidrs(&m, "east"))?;
    sources_kept(&m, "ebpf, exemption repaired")?;
    assert_nat_unchanged(&m, &cni_nat, "after a resync")?;
    let status: podmesh_agent::status::StatusReport = serde_json::from_str(&m.status("east-n0")?)?;
    let x = status
        .masquerade_exemption
        .context("no masqueradeExemption in /status")?;
    ensure!(
        x.installed && x.error.is_none() && x.cidrs == 2 && x.repairs >= 1,
        "exemption status after the repair: {x:?}"
    );

    // CNI DEL of a pod leaves podmesh alone; a new pod is reachable at once.
    let routes_before: Vec<String> = m
        .topo
        .nodes
        .iter()
        .map(|n| n.ns.ip(&["route", "show", "proto", "80"]))
        .collect::<anyhow::Result<_>>()?;
    let deleted = m.node("east-n0")?.pods[0].name.clone();
    _sinks = Vec::new();
    m.topo.remove_pod(&deleted)?;
    std::thread::sleep(Duration::from_secs(3));
    let routes_after: Vec<String> = m
        .topo
        .nodes
        .iter()
        .map(|n| n.ns.ip(&["route", "show", "proto", "80"]))
        .collect::<anyhow::Result<_>>()?;
    ensure!(
        routes_before == routes_after,
        "CNI DEL changed podmesh's routes"
    );
    wait_exempt(&m, "east-n0", &remote_cidrs(&m, "east"))?;
    let added = m.topo.add_pod("east-n0")?.name.clone();
    _sinks = sinks(&m)?;
    let cni_nat = all_nat_rules(&m)?;
    sources_kept(&m, "ebpf, pod added while the agents run")?;
    ensure!(
        m.node("east-n0")?.pods.iter().any(|p| p.name == added),
        "pod {added} missing"
    );

    // A restart keeps everything; so does the CNI's nat table.
    for node in m
        .topo
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect::<Vec<_>>()
    {
        m.kill_agent(&node)?;
        m.start_agent(&node)?;
    }
    m.wait_ready(READY)?;
    sources_kept(&m, "ebpf, after a restart")?;
    assert_nat_unchanged(&m, &cni_nat, "after a restart")?;

    // Every other mode this kernel has: a takeover of the running mesh.
    for mode in ["vxlan", "direct"] {
        for node in m
            .topo
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
        {
            m.stop_agent(&node, Duration::from_secs(10))?;
        }
        m.set_datapath(mode);
        for node in m
            .topo
            .nodes
            .iter()
            .map(|n| n.name.clone())
            .collect::<Vec<_>>()
        {
            m.start_agent(&node)?;
        }
        m.wait_ready(READY)?;
        sources_kept(&m, mode)?;
        internet_masqueraded(&m, mode)?;
        large_transfer(&m, mode)?;
        assert_nat_unchanged(&m, &cni_nat, &format!("after the change to {mode}"))?;
        wait_exempt(&m, "west-n1", &remote_cidrs(&m, "west"))?;
    }
    Ok(())
}

#[test]
fn the_exemption_holds_exactly_the_clusters_of_the_secret() -> anyhow::Result<()> {
    if !require_root("the_exemption_holds_exactly_the_clusters_of_the_secret") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .cluster("north", 1)
        .pods(1)
        .datapath("vxlan")
        .start()?;
    m.wait_ready(READY)?;
    let cidr = |m: &Mesh, c: &str| {
        m.topo
            .cluster_nodes(c)
            .map(|n| n.pod_cidr.to_string())
            .collect::<BTreeSet<_>>()
    };
    let west = cidr(&m, "west");
    let both: BTreeSet<String> = west.union(&cidr(&m, "north")).cloned().collect();
    wait_exempt(&m, "east-n0", &both)?;
    m.remove_from_secret("east", "north")?;
    wait_exempt(&m, "east-n0", &west)?;
    m.restore_in_secret("east", "north")?;
    wait_exempt(&m, "east-n0", &both)?;
    Ok(())
}

/// `podmesh cleanup` refuses while the agent runs; once it is stopped, it
/// removes exactly podmesh's objects (routes, nexthops, device, pins, the
/// exemption) and leaves the CNI's nat rules, bridge and pods as they were.
#[test]
fn cleanup_removes_exactly_podmesh_objects() -> anyhow::Result<()> {
    if !require_root("cleanup_removes_exactly_podmesh_objects") {
        return Ok(());
    }
    cleanup_in("ebpf", "podmesh0", &[])?;
    cleanup_in("vxlan", "podmesh-vx", &["nexthop objects"])
}

fn cleanup_in(mode: &str, device: &str, also: &[&str]) -> anyhow::Result<()> {
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .datapath(mode)
        .start()?;
    m.wait_ready(READY)?;
    let sinks = sinks(&m)?;
    sources_kept(&m, mode)?;
    drop(sinks);
    let node = "east-n0";
    let pins = m.bpf_pin_dir(node);
    let pins_arg = pins.display().to_string();
    let refused = m.podmesh(node, &["cleanup", "--bpf-pin-dir", &pins_arg])?;
    ensure!(
        refused.status.code() == Some(2)
            && String::from_utf8_lossy(&refused.stderr).contains("Stop it first"),
        "cleanup beside a running agent: {refused:?}"
    );
    m.stop_agent(node, Duration::from_secs(10))?;
    let ns = &m.node(node)?.ns;
    let cni_before = nat_rules(ns)?;
    ensure!(
        !ns.ip(&["route", "show", "proto", "80"])?.is_empty()
            && pins.join("PODMESH_REMOTES_V4").exists(),
        "nothing installed to clean up"
    );
    let out = m.podmesh(node, &["cleanup", "--bpf-pin-dir", &pins_arg])?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "cleanup failed: {out:?}");
    let device_line = format!("device {device}");
    let expected = [
        "table inet podmesh",
        "routes (proto 80)",
        &device_line,
        "PODMESH_REMOTES_V4",
    ];
    for what in expected.iter().chain(also) {
        ensure!(
            stdout.contains(what),
            "{mode}: cleanup did not report {what}:\n{stdout}"
        );
    }
    let ns = &m.node(node)?.ns;
    ensure!(
        ns.ip(&["route", "show", "proto", "80"])?.trim().is_empty(),
        "routes left"
    );
    ensure!(
        ns.ip(&["-6", "route", "show", "proto", "80"])?
            .trim()
            .is_empty(),
        "IPv6 routes left"
    );
    ensure!(
        ns.ip(&["nexthop", "show", "proto", "80"])?
            .trim()
            .is_empty(),
        "nexthops left"
    );
    ensure!(
        ns.ip(&["link", "show", "podmesh0"]).is_err(),
        "podmesh0 left"
    );
    ensure!(
        ns.run("nft", &["list", "table", "inet", "podmesh"])
            .is_err(),
        "exemption left"
    );
    ensure!(
        !pins.join("PODMESH_REMOTES_V4").exists(),
        "pins left in {}",
        pins.display()
    );
    ensure!(
        nat_rules(ns)? == cni_before,
        "cleanup changed the CNI's nat rules"
    );
    ensure!(
        ns.ip(&["link", "show", "cni0"]).is_ok(),
        "cleanup removed the CNI's bridge"
    );
    let again = m.podmesh(node, &["cleanup", "--bpf-pin-dir", &pins_arg])?;
    ensure!(
        again.status.success()
            && String::from_utf8_lossy(&again.stdout).contains("nothing of podmesh's"),
        "a second cleanup: {again:?}"
    );
    Ok(())
}
