//! A real `podmesh-agent` killed with SIGKILL and restarted under a 20 pps
//! ping stream to a pod of another cluster: not one packet is lost, and in
//! ebpf mode the restarted agent adopts the pinned maps and TCX link (same
//! ids; the program is swapped inside the link) instead of recreating them.
//! The running agent's own periodic resync puts back a route and a map entry
//! deleted by hand, and SIGTERM stops it without removing anything.
use std::{collections::BTreeSet, net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Context, ensure};
use aya::{
    maps::{LpmTrie, MapData, PerCpuArray, lpm_trie::Key},
    programs::{
        links::{FdLink, PinnedLink},
        loaded_programs,
    },
};
use podmesh_common::{COUNTERS_MAP, REMOTES_V4_MAP, RemoteNode, TUNNEL_EGRESS_LINK_PIN, counter};
use podmesh_tests::{
    eventually,
    mesh::Mesh,
    ping::{PingResult, PingStream},
    require_root,
};

const READY: Duration = Duration::from_secs(90);
const CONVERGE: Duration = Duration::from_secs(60);
/// Where the agent is killed and restarted.
const NODE: &str = "east-n0";

/// Ids of what the ebpf datapath pinned, and the program the link runs.
#[derive(Debug, PartialEq, Eq)]
struct Pinned {
    remotes_map: u32,
    counters_map: u32,
    link: u32,
    program: u32,
}

fn pinned(pin_dir: &Path) -> anyhow::Result<Pinned> {
    let map_id = |name: &str| -> anyhow::Result<u32> {
        Ok(MapData::from_pin(pin_dir.join(name))
            .with_context(|| format!("opening pin {name}"))?
            .info()?
            .id())
    };
    let link = FdLink::from(PinnedLink::from_pin(pin_dir.join(TUNNEL_EGRESS_LINK_PIN))?).info()?;
    Ok(Pinned {
        remotes_map: map_id(REMOTES_V4_MAP)?,
        counters_map: map_id(COUNTERS_MAP)?,
        link: link.id(),
        program: link.program_id(),
    })
}

/// Ids of the maps program `id` uses.
fn program_maps(id: u32) -> anyhow::Result<BTreeSet<u32>> {
    for p in loaded_programs() {
        let p = p?;
        if p.id() == id {
            return Ok(p.map_ids()?.unwrap_or_default().into_iter().collect());
        }
    }
    anyhow::bail!("program {id} is not loaded")
}

/// Packets the tc program sent into the tunnel (from the pinned counters).
fn forwarded(pin_dir: &Path) -> anyhow::Result<u64> {
    let map = PerCpuArray::<_, u64>::try_from(aya::maps::Map::PerCpuArray(MapData::from_pin(
        pin_dir.join(COUNTERS_MAP),
    )?))?;
    Ok(map.get(&counter::FORWARDED, 0)?.iter().sum())
}

/// podmesh's routes (protocol 80) on `node`, as `ip route` prints them.
fn podmesh_routes(m: &Mesh, node: &str) -> anyhow::Result<BTreeSet<String>> {
    Ok(m.routes(node)?
        .lines()
        .filter(|l| l.contains("proto 80"))
        .map(str::to_string)
        .collect())
}

/// Waits for the mesh, then for the first east pod to reach the first west
/// pod; returns (that pod's name, the west pod's address).
fn first_pair_answering(m: &mut Mesh) -> anyhow::Result<(String, Ipv4Addr)> {
    m.wait_ready(READY)?;
    let from = m
        .pods_of("east")
        .next()
        .context("no east pod")?
        .name
        .clone();
    let to = m.pods_of("west").next().context("no west pod")?.addr;
    eventually(CONVERGE, || {
        if m.ping(&from, to) {
            Ok(())
        } else {
            Err(format!("{from} does not reach {to}"))
        }
    })?;
    Ok((from, to))
}

fn killed_agent_loses_no_packet(mode: &str) -> anyhow::Result<()> {
    let ebpf = mode == "ebpf";
    let mut m = Mesh::start(&["east", "west"], 1, 1, mode)?;
    let (from, to) = first_pair_answering(&mut m)?;
    let routes_before = podmesh_routes(&m, NODE)?;
    ensure!(!routes_before.is_empty(), "no podmesh route on {NODE}");
    let pin_dir = m.bpf_pin_dir(NODE);
    let (ids_before, forwarded_before) = if ebpf {
        (Some(pinned(&pin_dir)?), forwarded(&pin_dir)?)
    } else {
        (None, 0)
    };

    let mut ping = PingStream::start(&m, &from, to)?;
    std::thread::sleep(Duration::from_secs(1));
    ping.running()?;
    m.kill_agent(NODE)?;
    // No agent at all for a while: forwarding is the kernel's alone.
    std::thread::sleep(Duration::from_secs(2));
    ping.running()?;
    m.start_agent(NODE)?;
    m.wait_agent_ready(NODE, READY)?;
    // Past the restarted agent's first full resync.
    std::thread::sleep(Duration::from_secs(2));
    ping.running()?;
    let out = ping.stop()?;
    let r = PingResult::parse(&out)?;
    eprintln!(
        "{mode}: {} requests, {} answered",
        r.transmitted,
        r.answered.len()
    );
    assert!(
        r.transmitted >= 40,
        "the stream did not run across the restart: {out}"
    );
    assert_eq!(
        r.lost(),
        Vec::<u32>::new(),
        "requests lost across the agent's SIGKILL and restart ({mode}):\n{out}\nagent log:\n{}",
        m.log_tail(NODE, 30)
    );
    // Adopted, not withdrawn and put back: the restarted agent knew whose
    // routes it found (the owners map) and kept them while it reconnected.
    assert_eq!(
        podmesh_routes(&m, NODE)?,
        routes_before,
        "routes changed across the restart"
    );
    let log = m.log_tail(NODE, 10_000);
    assert!(
        !log.contains("pruned"),
        "the restarted agent withdrew routes:\n{log}"
    );

    if let Some(before) = ids_before {
        let after = pinned(&pin_dir)?;
        assert_eq!(
            (after.remotes_map, after.counters_map, after.link),
            (before.remotes_map, before.counters_map, before.link),
            "maps or link recreated instead of adopted: before {before:?}, after {after:?}"
        );
        // The new agent swapped its own program into the link, and that
        // program uses the adopted maps.
        let maps = program_maps(after.program)?;
        assert!(
            maps.contains(&before.remotes_map) && maps.contains(&before.counters_map),
            "program {} uses maps {maps:?}, not the pinned {before:?}",
            after.program
        );
        // Every request went through the tc program, whose counters
        // carried on in the same map.
        let sent = forwarded(&pin_dir)? - forwarded_before;
        assert!(
            sent >= u64::from(r.transmitted) - 1,
            "the tc program forwarded {sent} packets for {} requests",
            r.transmitted
        );
    }
    Ok(())
}

#[test]
fn ebpf_agent_sigkill_and_restart_lose_no_packet() -> anyhow::Result<()> {
    if !require_root("ebpf_agent_sigkill_and_restart_lose_no_packet") {
        return Ok(());
    }
    killed_agent_loses_no_packet("ebpf")
}

#[test]
fn vxlan_agent_sigkill_and_restart_lose_no_packet() -> anyhow::Result<()> {
    if !require_root("vxlan_agent_sigkill_and_restart_lose_no_packet") {
        return Ok(());
    }
    killed_agent_loses_no_packet("vxlan")
}

/// The node's pinned IPv4 LPM map.
fn remotes_map(pin_dir: &Path) -> anyhow::Result<LpmTrie<MapData, [u8; 4], RemoteNode>> {
    let data = MapData::from_pin(pin_dir.join(REMOTES_V4_MAP))?;
    Ok(LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?)
}

fn map_has(pin_dir: &Path, cidr: ipnet::Ipv4Net) -> anyhow::Result<bool> {
    let key = Key::new(u32::from(cidr.prefix_len()), cidr.network().octets());
    Ok(remotes_map(pin_dir)?.get(&key, 0).is_ok())
}

#[test]
fn ebpf_agent_resync_repairs_manual_deletions_and_sigterm_leaves_forwarding() -> anyhow::Result<()>
{
    if !require_root("ebpf_agent_resync_repairs_manual_deletions_and_sigterm_leaves_forwarding") {
        return Ok(());
    }
    let mut m = Mesh::builder()
        .cluster("east", 1)
        .cluster("west", 1)
        .pods(1)
        .agent_args(&["--resync-interval", "1"])
        .start()?;
    let (from, to) = first_pair_answering(&mut m)?;
    let west = m.node("west-n0")?.pod_cidr;
    let pin_dir = m.bpf_pin_dir(NODE);
    let routes_before = podmesh_routes(&m, NODE)?;
    ensure!(
        routes_before
            .iter()
            .any(|r| r.starts_with(&west.to_string())),
        "no route to {west} on {NODE}: {routes_before:?}"
    );
    ensure!(map_has(&pin_dir, west)?, "no map entry for {west}");

    // Deleted by hand: traffic stops, and the agent's timer (not a restart,
    // not a remote change) puts both back.
    m.node(NODE)?
        .ns
        .ip(&["route", "del", &west.to_string(), "proto", "80"])?;
    let key = Key::new(u32::from(west.prefix_len()), west.network().octets());
    remotes_map(&pin_dir)?.remove(&key)?;
    ensure!(!map_has(&pin_dir, west)?, "the map entry is still there");
    eventually(Duration::from_secs(20), || {
        let routes = podmesh_routes(&m, NODE).map_err(|e| e.to_string())?;
        let entry = map_has(&pin_dir, west).map_err(|e| e.to_string())?;
        if routes == routes_before && entry {
            Ok(())
        } else {
            Err(format!(
                "routes {routes:?} (want {routes_before:?}), map entry {entry}"
            ))
        }
    })
    .with_context(|| format!("agent log:\n{}", m.log_tail(NODE, 30)))?;
    ensure!(
        m.ping(&from, to),
        "{from} does not reach {to} after the resync"
    );
    let log = m.log_tail(NODE, 10_000);
    ensure!(
        !log.contains("pruned"),
        "the resync withdrew routes:\n{log}"
    );

    // SIGTERM, as the kubelet stops a pod: a clean exit that leaves the
    // datapath, and forwarding goes on without any agent.
    let st = m.stop_agent(NODE, Duration::from_secs(20))?;
    ensure!(st.success(), "the agent exited with {st} on SIGTERM");
    ensure!(
        podmesh_routes(&m, NODE)? == routes_before,
        "routes changed on SIGTERM"
    );
    ensure!(map_has(&pin_dir, west)?, "SIGTERM removed the map entry");
    ensure!(
        pinned(&pin_dir).is_ok(),
        "SIGTERM removed the pinned maps or link"
    );
    ensure!(
        m.ping(&from, to),
        "{from} does not reach {to} after SIGTERM"
    );
    Ok(())
}
