//! `--encryption wireguard` with the userspace WireGuard (this kernel has no
//! WireGuard module; the VM test runs the kernel's): two clusters of two
//! nodes on the real CNI plugins, real agents.
//!
//! Every cross-cluster pod pair answers; a capture on the shared underlay
//! during pings with a known payload shows WireGuard UDP on 51871 and neither
//! the payload nor any packet addressed to a pod; traffic inside a cluster
//! keeps its own path. An agent killed with SIGKILL and restarted under a
//! 20 pps ping loses nothing (the userspace process outlives it). A key
//! rotation (SIGUSR1) is followed by the other nodes; what a 20 pps ping loses
//! across it is printed. A node without a key is reached in clear, or refused
//! (`encryption-required`) with `--encryption-strict`, and `podmesh diagnose`
//! names it (`wireguard-clear`, `rejected-record`); a key published by two
//! nodes is refused for the newcomer (`wireguard-key-duplicate`).
use std::{collections::BTreeSet, net::Ipv4Addr, time::Duration};

use anyhow::{Context, ensure};
use podmesh_tests::{
    capture::Capture,
    eventually,
    mesh::Mesh,
    ping::{PingResult, PingStream},
    require_root,
};
use serde_json::Value;

const READY: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);
const WG_PORT: u16 = 51871;
/// The payload pattern of the captured pings (`ping -p`).
const PATTERN: [u8; 4] = [0x5a, 0x17, 0xc0, 0xde];
const ENCRYPTED: [&str; 4] = ["--encryption", "wireguard", "--resync-interval", "2"];

fn status(m: &Mesh, node: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&m.status(node)?)?)
}

/// The WireGuard peers the agent on `node` reports: `cluster/node` → the peer.
fn peers(m: &Mesh, node: &str) -> anyhow::Result<Vec<Value>> {
    let s = status(m, node)?;
    Ok(s["wireguard"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

fn peer_names(m: &Mesh, node: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(peers(m, node)?
        .iter()
        .map(|p| {
            format!(
                "{}/{}",
                p["cluster"].as_str().unwrap_or(""),
                p["node"].as_str().unwrap_or("")
            )
        })
        .collect())
}

/// The state and reason code of the record of `remote_node` on `node`.
fn record_state(
    m: &Mesh,
    node: &str,
    cluster: &str,
    remote_node: &str,
) -> anyhow::Result<(String, String)> {
    let s = status(m, node)?;
    let recs = s["remotes"][cluster]["records"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let r = recs
        .iter()
        .find(|r| r["name"].as_str() == Some(remote_node))
        .with_context(|| format!("{node} lists no record of {cluster}/{remote_node}: {s}"))?;
    Ok((
        r["state"].as_str().unwrap_or("").to_string(),
        r["code"].as_str().unwrap_or("").to_string(),
    ))
}

fn all_pairs_answer(m: &Mesh, pairs: &[(String, Ipv4Addr)], what: &str) -> anyhow::Result<()> {
    eventually(CONVERGE, || {
        let lost = m.unreachable(pairs);
        if lost.is_empty() {
            Ok(())
        } else {
            Err(format!("{what}: unanswered {lost:?}"))
        }
    })
    .map(drop)
}

fn pod_ns<'a>(m: &'a Mesh, name: &str) -> anyhow::Result<&'a podmesh_tests::netns::NetNs> {
    m.topo
        .pods()
        .find(|(_, p)| p.name == name)
        .map(|(_, p)| &p.ns)
        .with_context(|| format!("no pod {name}"))
}

/// Pings every cross-cluster pair with the pattern while capturing the
/// underlay; asserts what crossed it.
fn underlay_carries_only_wireguard(m: &Mesh) -> anyhow::Result<()> {
    let pods: Vec<ipnet::Ipv4Net> = m.topo.nodes.iter().map(|n| n.pod_cidr).collect();
    let cap = Capture::start(&m.topo.underlay)?;
    let hex: String = PATTERN.iter().map(|b| format!("{b:02x}")).collect();
    for (from, to) in m.cross_cluster_pairs() {
        let out = pod_ns(m, &from)?.exec(
            "ping",
            &[
                "-n",
                "-c",
                "3",
                "-i",
                "0.2",
                "-s",
                "256",
                "-p",
                &hex,
                &to.to_string(),
            ],
        )?;
        ensure!(
            out.status.success(),
            "{from} -> {to} with the pattern: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let frames = cap.stop()?;
    let wg = frames
        .iter()
        .filter(|f| {
            f.udp_ports()
                .is_some_and(|(s, d)| s == WG_PORT && d == WG_PORT)
        })
        .count();
    let pattern: Vec<u8> = PATTERN.iter().chain(&PATTERN).copied().collect();
    let clear = frames.iter().filter(|f| f.contains(&pattern)).count();
    let to_pods: Vec<String> = frames
        .iter()
        .filter_map(|f| f.ipv4())
        .filter(|(s, d, ..)| pods.iter().any(|p| p.contains(d) || p.contains(s)))
        .map(|(s, d, p, _)| format!("{s} -> {d} proto {p}"))
        .collect();
    eprintln!(
        "underlay capture: {} frames, {wg} WireGuard (UDP {WG_PORT}), {clear} with the payload pattern, {} with a pod address",
        frames.len(),
        to_pods.len()
    );
    ensure!(
        wg > 0,
        "no WireGuard packet on the underlay during the pings"
    );
    ensure!(
        clear == 0,
        "{clear} frames carried the ping payload in clear"
    );
    ensure!(
        to_pods.is_empty(),
        "packets with pod addresses crossed the underlay: {:?}",
        &to_pods[..to_pods.len().min(5)]
    );
    Ok(())
}

/// The 20 pps stream from `from` to `to` across `act`; the requests lost.
fn loss_across(
    m: &mut Mesh,
    from: &str,
    to: Ipv4Addr,
    act: impl FnOnce(&mut Mesh) -> anyhow::Result<()>,
) -> anyhow::Result<(PingResult, String)> {
    let mut ping = PingStream::start(m, from, to)?;
    std::thread::sleep(Duration::from_secs(1));
    ping.running()?;
    act(m)?;
    std::thread::sleep(Duration::from_secs(3));
    ping.running()?;
    let out = ping.stop()?;
    Ok((PingResult::parse(&out)?, out))
}

/// Bytes and packets that the kernel handed to the userspace WireGuard on
/// `node` (what its `podmesh-wg` transmitted).
fn wg_tx(m: &Mesh, node: &str) -> anyhow::Result<(u64, u64)> {
    let out = m
        .node(node)?
        .ns
        .ip(&["-s", "-j", "link", "show", "dev", "podmesh-wg"])?;
    let v: Value = serde_json::from_str(&out)?;
    let tx = &v[0]["stats64"]["tx"];
    Ok((
        tx["bytes"]
            .as_u64()
            .context("podmesh-wg without tx bytes")?,
        tx["packets"]
            .as_u64()
            .context("podmesh-wg without tx packets")?,
    ))
}

/// 32 MB by TCP from east-n0's pod to west-n0's pod, through the offloads
/// of the userspace WireGuard: the sender's TUN hands over TCP segments
/// larger than the MTU (TSO), which the process cuts into packets, and the
/// receiver coalesces them again before writing (GRO). A wrong checksum or
/// length on either side would stall the transfer instead of finishing it.
fn bulk_tcp_crosses(m: &Mesh) -> anyhow::Result<()> {
    const BYTES: u64 = 32 << 20;
    let from = &m.node("east-n0")?.pods[0];
    let to = &m.node("west-n0")?.pods[0];
    let mut server = podmesh_tests::flow::iperf3_server(&to.ns)?;
    let before = wg_tx(m, "east-n0")?;
    let addr = to.addr.to_string();
    let out = from.ns.run(
        "timeout",
        &[
            "120", "iperf3", "-c", &addr, "-p", "5201", "-n", "32M", "-J",
        ],
    );
    let _ = server.kill();
    let _ = server.wait();
    let json: Value = serde_json::from_str(&out?)?;
    let sent = json["end"]["sum_sent"]["bytes"]
        .as_u64()
        .context("iperf3 JSON without end.sum_sent.bytes")?;
    let received = json["end"]["sum_received"]["bytes"]
        .as_u64()
        .context("iperf3 JSON without end.sum_received.bytes")?;
    // The server stops counting when the client's end message arrives,
    // which can overtake the last data in flight: most, not all.
    ensure!(
        sent >= BYTES && received >= BYTES / 2,
        "{sent} bytes sent, {received} of them received, of {BYTES}"
    );
    let after = wg_tx(m, "east-n0")?;
    let (bytes, packets) = (after.0 - before.0, after.1 - before.1);
    ensure!(
        packets > 0 && bytes / packets > 2 * 1440,
        "east-n0's TUN handed over {bytes} bytes in {packets} reads: no TCP segmentation offload"
    );
    Ok(())
}

#[test]
fn wireguard_encrypts_cross_cluster_traffic_and_survives_agent_restarts() -> anyhow::Result<()> {
    if !require_root("wireguard_encrypts_cross_cluster_traffic_and_survives_agent_restarts") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .pods(1)
        .datapath("ebpf")
        .agent_args(&ENCRYPTED)
        .start()?;
    m.wait_ready(READY)?;
    all_pairs_answer(&m, &m.cross_cluster_pairs(), "cross-cluster")?;
    bulk_tcp_crosses(&m)?;

    // Every node has one peer per node of the other cluster, none of its own.
    for n in &m.topo.nodes {
        let other = if n.cluster == "east" { "west" } else { "east" };
        let want: BTreeSet<String> = m
            .nodes_of(other)
            .into_iter()
            .map(|x| format!("{other}/{x}"))
            .collect();
        let got = eventually(CONVERGE, || {
            let got = peer_names(&m, &n.name).map_err(|e| format!("{e:#}"))?;
            if got == want {
                Ok(got)
            } else {
                Err(format!("{} peers {got:?}", n.name))
            }
        })?;
        ensure!(got == want);
        let routes = n.ns.ip(&["route", "show", "dev", "podmesh-wg"])?;
        for own in m.topo.cluster_nodes(&n.cluster) {
            ensure!(
                !routes.contains(&own.pod_cidr.to_string()),
                "{}: its own cluster's {} goes into WireGuard:\n{routes}",
                n.name,
                own.pod_cidr
            );
        }
        // Route MTU: the underlay's 1500 minus WireGuard's 60.
        ensure!(routes.contains("mtu 1440"), "{}: {routes}", n.name);
        let p = peers(&m, &n.name)?;
        ensure!(
            p.iter().all(|p| p["latestHandshakeAgeSeconds"].is_u64()
                && p["txBytes"].as_u64() > Some(0)
                && p["rxBytes"].as_u64() > Some(0)),
            "{}: peers without handshake or bytes: {p:?}",
            n.name
        );
    }
    let metrics = m.agent_get("east-n0", "/metrics")?;
    ensure!(
        metrics.contains("podmesh_wireguard_rx_bytes_total{cluster=\"west\",node=\"west-n0\"}")
            && metrics.contains("podmesh_wireguard_latest_handshake_age_seconds{"),
        "metrics:\n{metrics}"
    );

    // What crosses the underlay.
    underlay_carries_only_wireguard(&m)?;

    // Inside a cluster: the cluster's own path, unchanged.
    let mut intra = m.pairs("east", "east");
    intra.extend(m.pairs("west", "west"));
    ensure!(m.unreachable(&intra).is_empty(), "intra-cluster pairs lost");
    let east_n0 = m.node("east-n0")?;
    let east_n1_cidr = m.node("east-n1")?.pod_cidr;
    let via = east_n0
        .ns
        .ip(&["route", "get", &east_n1_cidr.addr().to_string()])?;
    ensure!(
        !via.contains("podmesh"),
        "east-n0 reaches east-n1's pods through podmesh: {via}"
    );

    // SIGKILL and restart of the sender's and the receiver's agent under a
    // 20 pps stream: the userspace WireGuard carries on alone, and the new
    // agents adopt it without touching a session.
    let from = m.pods_of("east").next().context("east pod")?.name.clone();
    let to_node = "west-n0";
    let to = m.node(to_node)?.pods[0].addr;
    let pid_file = m.wireguard_dir("east-n0").join("run/podmesh-wg.pid");
    let wg_pid = std::fs::read_to_string(&pid_file)?;
    let (r, out) = loss_across(&mut m, &from, to, |m| {
        m.kill_agent("east-n0")?;
        m.kill_agent(to_node)?;
        std::thread::sleep(Duration::from_secs(2));
        m.start_agent("east-n0")?;
        m.start_agent(to_node)?;
        m.wait_agent_ready("east-n0", READY)?;
        m.wait_agent_ready(to_node, READY)
    })?;
    eprintln!(
        "agent SIGKILL and restart: {} requests, {} answered",
        r.transmitted,
        r.answered.len()
    );
    ensure!(
        r.transmitted >= 60,
        "the stream did not run across the restart: {out}"
    );
    ensure!(
        r.lost().is_empty(),
        "requests lost across the agents' SIGKILL and restart: {:?}\n{out}\nlog:\n{}",
        r.lost(),
        m.log_tail("east-n0", 30)
    );
    ensure!(
        std::fs::read_to_string(&pid_file)? == wg_pid,
        "the userspace WireGuard was replaced across the agent restart"
    );
    ensure!(
        m.log_tail("east-n0", 200)
            .contains("adopting the running userspace WireGuard"),
        "the restarted agent did not adopt the running WireGuard:\n{}",
        m.log_tail("east-n0", 30)
    );

    // Key rotation of the receiver: the others follow the record.
    let old = status(&m, to_node)?["wireguard"]["publicKey"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let (r, out) = loss_across(&mut m, &from, to, |m| {
        let pid = m.agent_pid(to_node)?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGUSR1,
        )?;
        Ok(())
    })?;
    let new = status(&m, to_node)?["wireguard"]["publicKey"]
        .as_str()
        .unwrap_or("")
        .to_string();
    ensure!(
        new != old && new.len() == 44,
        "the key did not rotate: {old} -> {new}"
    );
    for n in m.nodes_of("east") {
        eventually(CONVERGE, || {
            let p = peers(&m, &n).map_err(|e| format!("{e:#}"))?;
            if p.iter()
                .any(|p| p["node"] == to_node && p["publicKey"] == new.as_str())
            {
                Ok(())
            } else {
                Err(format!("{n} does not know {to_node}'s new key: {p:?}"))
            }
        })?;
    }
    eprintln!(
        "key rotation: {} requests at 20 pps, {} lost ({:?})",
        r.transmitted,
        r.lost().len(),
        r.lost()
    );
    // The stream carries on under the new key.
    let tail: Vec<u32> =
        ((r.transmitted.saturating_sub(20))..r.transmitted.saturating_sub(1)).collect();
    ensure!(
        tail.iter().all(|s| r.answered.contains(s)),
        "the stream did not recover after the rotation:\n{out}"
    );
    all_pairs_answer(&m, &m.cross_cluster_pairs(), "after the rotation")?;
    Ok(())
}

#[test]
fn nodes_without_keys_and_duplicate_keys_are_handled_as_configured() -> anyhow::Result<()> {
    if !require_root("nodes_without_keys_and_duplicate_keys_are_handled_as_configured") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 2)
        .cluster("west", 2)
        .pods(1)
        .datapath("vxlan")
        .agent_args(&ENCRYPTED)
        .create()?;
    // east-n0 refuses clear nodes; west-n0 publishes no key.
    let mut strict = ENCRYPTED.to_vec();
    strict.push("--encryption-strict");
    m.set_node_args("east-n0", &strict);
    m.set_node_args("west-n0", &["--resync-interval", "2"]);
    m.start_kvstores()?;
    m.start_proxies()?;
    m.start_agents()?;
    m.wait_ready(READY)?;
    let west_n0_pod = m.node("west-n0")?.pods[0].addr;
    let west_n1_pod = m.node("west-n1")?.pods[0].addr;
    let east_n0_pod = m.node("east-n0")?.pods[0].name.clone();
    let east_n1_pod = m.node("east-n1")?.pods[0].name.clone();

    // Not strict: in clear, and said so.
    all_pairs_answer(
        &m,
        &[
            (east_n1_pod.clone(), west_n0_pod),
            (east_n1_pod.clone(), west_n1_pod),
        ],
        "east-n1",
    )?;
    let s = status(&m, "east-n1")?;
    let clear: Vec<String> = serde_json::from_value(s["wireguard"]["unencrypted"].clone())?;
    ensure!(
        clear == ["west/west-n0"],
        "east-n1 reaches in clear: {clear:?}"
    );
    ensure!(peer_names(&m, "east-n1")? == BTreeSet::from(["west/west-n1".to_string()]));
    // Strict: not programmed, rejected with the code; the keyed node still works.
    eventually(CONVERGE, || {
        match record_state(&m, "east-n0", "west", "west-n0") {
            Ok((state, code)) if state == "rejected" && code == "encryption-required" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })?;
    ensure!(
        !m.ping(&east_n0_pod, west_n0_pod),
        "east-n0 reached a node without a key"
    );
    all_pairs_answer(
        &m,
        &[(east_n0_pod.clone(), west_n1_pod)],
        "east-n0 to west-n1",
    )?;
    let routes = m
        .node("east-n0")?
        .ns
        .ip(&["route", "show", "proto", "80"])?;
    ensure!(
        !routes.contains(&m.node("west-n0")?.pod_cidr.to_string()),
        "east-n0 routes the refused node:\n{routes}"
    );
    // `podmesh diagnose` says the same: on east-n1 the node in clear is a
    // warning (the probes answer, in clear and through WireGuard), on
    // east-n0 the refused node a rejected record with its code.
    let warning = |node: &str, check: &str, needle: &str| {
        eventually(CONVERGE, || {
            let out = m
                .podmesh(node, &["diagnose", "-o", "json", "--timeout", "3s"])
                .map_err(|e| format!("{e:#}"))?;
            let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())?;
            let found = v["checks"].as_array().into_iter().flatten().any(|c| {
                c["cluster"] == "west"
                    && c["check"] == check
                    && c["severity"] == "warning"
                    && c["evidence"].as_str().unwrap_or("").contains(needle)
                    && !c["fix"].as_str().unwrap_or("").is_empty()
            });
            match (out.status.code(), found) {
                (Some(0), true) => Ok(v),
                (code, _) => Err(format!(
                    "{node}: exit {code:?}, {check} naming {needle:?}: {v:#}"
                )),
            }
        })
    };
    let v = warning(
        "east-n1",
        "wireguard-clear",
        "node(s) west-n0 publish no WireGuard key",
    )?;
    let probes: Vec<&str> = v["checks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["check"] == "tunnel-probe" && c["ok"] == true)
        .filter_map(|c| c["evidence"].as_str())
        .collect();
    ensure!(
        probes
            .iter()
            .any(|e| e.starts_with("node west-n0") && e.contains("through the tunnel"))
            && probes
                .iter()
                .any(|e| e.starts_with("node west-n1") && e.contains("through WireGuard")),
        "{probes:#?}"
    );
    warning("east-n0", "rejected-record", "[encryption-required]")?;

    // A key used twice: a record copying west-n1's key is the newcomer.
    let key = status(&m, "west-n1")?["wireguard"]["publicKey"]
        .as_str()
        .context("west-n1 key")?
        .to_string();
    m.put_raw(
        "west",
        "podmesh/v1/nodes/west/west-copy",
        &format!(
            r#"{{"name":"west-copy","cluster":"west","clusterID":2,"addresses":["172.31.2.99"],"podCIDRs":["{}"],"wireguardPublicKey":"{key}"}}"#,
            spare_cidr(&m, 0)?
        ),
    )?;
    for n in m.nodes_of("east") {
        eventually(CONVERGE, || {
            match record_state(&m, &n, "west", "west-copy") {
                Ok((state, code)) if state == "rejected" && code == "wireguard-key-duplicate" => {
                    Ok(())
                }
                other => Err(format!("{n}: {other:?}")),
            }
        })?;
    }
    all_pairs_answer(
        &m,
        &[(east_n1_pod.clone(), west_n1_pod)],
        "the key's holder",
    )?;
    // A malformed key is rejected as such.
    m.put_raw(
        "west",
        "podmesh/v1/nodes/west/west-bad",
        &format!(
            r#"{{"name":"west-bad","cluster":"west","clusterID":2,"addresses":["172.31.2.98"],"podCIDRs":["{}"],"wireguardPublicKey":"not-a-key"}}"#,
            spare_cidr(&m, 1)?
        ),
    )?;
    eventually(CONVERGE, || {
        match record_state(&m, "east-n1", "west", "west-bad") {
            Ok((state, code)) if state == "rejected" && code == "node-wireguard-key-invalid" => {
                Ok(())
            }
            other => Err(format!("{other:?}")),
        }
    })?;

    // A changed key (west-n1 rotates): the peer follows, traffic too.
    let pid = m.agent_pid("west-n1")?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGUSR1,
    )?;
    let new = eventually(CONVERGE, || {
        let k = status(&m, "west-n1").map_err(|e| format!("{e:#}"))?["wireguard"]["publicKey"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if k != key {
            Ok(k)
        } else {
            Err("not rotated yet".into())
        }
    })?;
    for n in m.nodes_of("east") {
        eventually(CONVERGE, || {
            let p = peers(&m, &n).map_err(|e| format!("{e:#}"))?;
            if p.iter()
                .any(|p| p["node"] == "west-n1" && p["publicKey"] == new.as_str())
            {
                Ok(())
            } else {
                Err(format!("{n}: {p:?}"))
            }
        })?;
    }
    all_pairs_answer(
        &m,
        &[(east_n0_pod, west_n1_pod), (east_n1_pod, west_n1_pod)],
        "after west-n1 changed its key",
    )?;
    Ok(())
}

/// The `n`-th /24 of west's Pod CIDR that no node uses.
fn spare_cidr(m: &Mesh, n: usize) -> anyhow::Result<ipnet::Ipv4Net> {
    let used: BTreeSet<ipnet::Ipv4Net> = m.topo.nodes.iter().map(|n| n.pod_cidr).collect();
    let west = m.node("west-n0")?.pod_cidr;
    let cluster = ipnet::Ipv4Net::new(west.network(), 16)?.trunc();
    cluster
        .subnets(24)?
        .skip(200)
        .filter(|c| !used.contains(c))
        .nth(n)
        .context("no spare /24 in west's Pod CIDR")
}
