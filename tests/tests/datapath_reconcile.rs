//! Reconciliation on a real kernel: removing a remote node removes exactly its
//! entries, a resync repairs manual deletions, foreign routes/nexthops/tc
//! filters are never touched, and a new datapath adopts a running one
//! without losing a packet.
mod datapath_support;

use std::{
    collections::BTreeSet,
    net::{IpAddr, Ipv4Addr},
    process::Stdio,
    time::Duration,
};

use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
use datapath_support::{Mesh, podmesh_routes};
use ipnet::IpNet;
use podmesh_agent::{
    config::DatapathMode,
    datapath::{Datapath, RemoteRoute, ebpf::ours_attached},
};
use podmesh_common::{REMOTES_V4_MAP, RemoteNode, TUNNEL_EGRESS_LINK_PIN};
use podmesh_tests::require_root;

/// The LPM map of node `i`, opened from its pin.
fn pinned_map(mesh: &Mesh, i: usize) -> anyhow::Result<LpmTrie<MapData, [u8; 4], RemoteNode>> {
    let data = MapData::from_pin(mesh.config(i).pin_dir.join(REMOTES_V4_MAP))?;
    Ok(LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?)
}

fn map_cidrs(mesh: &Mesh, i: usize) -> anyhow::Result<BTreeSet<String>> {
    let map = pinned_map(mesh, i)?;
    let mut out = BTreeSet::new();
    for k in map.keys() {
        let k = k?;
        out.insert(format!("{}/{}", Ipv4Addr::from(k.data()), k.prefix_len()));
    }
    Ok(out)
}

fn reaches(mesh: &Mesh, from: &str, to: &str) -> bool {
    let f = &mesh.topo.nodes[mesh.index(from)].pods[0];
    let t = &mesh.topo.nodes[mesh.index(to)].pods[0];
    f.ns.ping(&t.addr.to_string(), 2, None)
}

async fn removed_node_loses_exactly_its_entries(mode: DatapathMode) -> anyhow::Result<()> {
    let mut mesh = Mesh::build(mode)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let (w0, w1) = (mesh.index("west-n0"), mesh.index("west-n1"));
    let gone = mesh.topo.nodes[w0].pod_cidr.to_string();
    let kept = mesh.topo.nodes[w1].pod_cidr.to_string();
    assert!(reaches(&mesh, "east-n0", "west-n0"));

    let keep: BTreeSet<IpNet> = [kept.parse()?].into();
    let report = mesh.dps[e0].prune(&keep).await?;
    assert_eq!(report.removed, vec![gone.parse::<IpNet>()?], "{mode:?}");

    assert_eq!(
        podmesh_routes(&mesh, e0)?,
        [kept.clone()].into(),
        "{mode:?}"
    );
    let installed = mesh.dps[e0].installed().await?;
    assert_eq!(installed.len(), 1, "{mode:?}: {installed:?}");
    assert_eq!(installed[0].cidr.to_string(), kept);
    assert_eq!(installed[0].node_addr, IpAddr::V4(mesh.topo.nodes[w1].addr));
    match mode {
        DatapathMode::Ebpf => assert_eq!(map_cidrs(&mesh, e0)?, [kept.clone()].into()),
        DatapathMode::Vxlan => {
            let nh = mesh.ip(e0, &["nexthop", "show", "proto", "80"])?;
            assert_eq!(nh.lines().count(), 1, "{nh}");
            assert!(nh.contains(&mesh.topo.nodes[w1].addr.to_string()), "{nh}");
            let neigh = mesh.ip(e0, &["neigh", "show", "dev", "podmesh-vx"])?;
            assert!(
                !neigh.contains(&mesh.topo.nodes[w0].addr.to_string()),
                "{neigh}"
            );
            assert!(
                neigh.contains(&mesh.topo.nodes[w1].addr.to_string()),
                "{neigh}"
            );
            let fdb = mesh.topo.nodes[e0]
                .ns
                .run("bridge", &["fdb", "show", "dev", "podmesh-vx"])?;
            assert!(
                !fdb.contains(&mesh.topo.nodes[w0].addr.to_string()),
                "{fdb}"
            );
            assert!(fdb.contains(&mesh.topo.nodes[w1].addr.to_string()), "{fdb}");
        }
        _ => {}
    }
    // Traffic follows: the removed node is unreachable, the kept one is not.
    assert!(!reaches(&mesh, "east-n0", "west-n0"), "{mode:?}");
    assert!(reaches(&mesh, "east-n0", "west-n1"), "{mode:?}");
    // Other nodes are untouched.
    let e1 = mesh.index("east-n1");
    assert_eq!(podmesh_routes(&mesh, e1)?.len(), 2);
    assert!(reaches(&mesh, "east-n1", "west-n0"), "{mode:?}");
    Ok(())
}

#[tokio::test]
async fn ebpf_removed_node_loses_exactly_its_entries() -> anyhow::Result<()> {
    if !require_root("ebpf_removed_node_loses_exactly_its_entries") {
        return Ok(());
    }
    removed_node_loses_exactly_its_entries(DatapathMode::Ebpf).await
}

#[tokio::test]
async fn vxlan_removed_node_loses_exactly_its_entries() -> anyhow::Result<()> {
    if !require_root("vxlan_removed_node_loses_exactly_its_entries") {
        return Ok(());
    }
    removed_node_loses_exactly_its_entries(DatapathMode::Vxlan).await
}

#[tokio::test]
async fn ebpf_resync_restores_deleted_route_and_map_entry() -> anyhow::Result<()> {
    if !require_root("ebpf_resync_restores_deleted_route_and_map_entry") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let w0 = mesh.topo.nodes[mesh.index("west-n0")].pod_cidr;
    let w1 = mesh.topo.nodes[mesh.index("west-n1")].pod_cidr;
    mesh.ip(e0, &["route", "del", &w0.to_string()])?;
    pinned_map(&mesh, e0)?.remove(&Key::new(u32::from(w1.prefix_len()), w1.network().octets()))?;
    assert!(
        !reaches(&mesh, "east-n0", "west-n0"),
        "route deletion had no effect"
    );
    assert!(
        !reaches(&mesh, "east-n0", "west-n1"),
        "map deletion had no effect"
    );

    mesh.resync(e0).await?;
    assert_eq!(podmesh_routes(&mesh, e0)?.len(), 2);
    assert_eq!(map_cidrs(&mesh, e0)?.len(), 2);
    assert!(reaches(&mesh, "east-n0", "west-n0"));
    assert!(reaches(&mesh, "east-n0", "west-n1"));
    Ok(())
}

#[tokio::test]
async fn vxlan_resync_restores_deleted_route_nexthop_and_neighbour() -> anyhow::Result<()> {
    if !require_root("vxlan_resync_restores_deleted_route_nexthop_and_neighbour") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Vxlan)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let w0 = &mesh.topo.nodes[mesh.index("west-n0")];
    let w1_addr = mesh.topo.nodes[mesh.index("west-n1")].addr.to_string();
    let (w0_cidr, w0_addr) = (w0.pod_cidr.to_string(), w0.addr.to_string());
    mesh.ip(e0, &["route", "del", &w0_cidr])?;
    mesh.ip(e0, &["neigh", "del", &w1_addr, "dev", "podmesh-vx"])?;
    let nh = mesh.ip(e0, &["nexthop", "show", "proto", "80"])?;
    let w0_nh = nh
        .lines()
        .find(|l| l.contains(&w0_addr))
        .and_then(|l| l.split_whitespace().nth(1))
        .expect("nexthop of west-n0")
        .to_string();
    mesh.ip(e0, &["nexthop", "del", "id", &w0_nh])?;
    assert!(!reaches(&mesh, "east-n0", "west-n0"));
    assert!(
        !reaches(&mesh, "east-n0", "west-n1"),
        "neighbour deletion had no effect"
    );

    mesh.resync(e0).await?;
    assert!(reaches(&mesh, "east-n0", "west-n0"));
    assert!(reaches(&mesh, "east-n0", "west-n1"));
    Ok(())
}

#[tokio::test]
async fn ebpf_prune_leaves_foreign_routes_and_tc_filters() -> anyhow::Result<()> {
    if !require_root("ebpf_prune_leaves_foreign_routes_and_tc_filters") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    mesh.ip(e0, &["route", "add", "10.9.0.0/24", "dev", "podmesh0"])?;
    mesh.ip(
        e0,
        &[
            "route",
            "add",
            "10.8.0.0/24",
            "via",
            "172.31.1.2",
            "proto",
            "static",
        ],
    )?;
    let ns = &mesh.topo.nodes[e0].ns;
    ns.run("tc", &["qdisc", "add", "dev", "podmesh0", "clsact"])?;
    ns.run(
        "tc",
        &[
            "filter", "add", "dev", "podmesh0", "egress", "prio", "7", "u32", "match", "u32", "0",
            "0", "classid", "1:1",
        ],
    )?;

    let report = mesh.dps[e0].prune(&BTreeSet::new()).await?;
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(podmesh_routes(&mesh, e0)?.is_empty());
    assert!(map_cidrs(&mesh, e0)?.is_empty());
    let routes = mesh.ip(e0, &["route", "show"])?;
    assert!(routes.contains("10.9.0.0/24 dev podmesh0"), "{routes}");
    assert!(routes.contains("10.8.0.0/24 via 172.31.1.2"), "{routes}");
    let filters = ns.run("tc", &["filter", "show", "dev", "podmesh0", "egress"])?;
    assert!(
        filters.contains("u32") && filters.contains("1:1"),
        "{filters}"
    );
    {
        let _inside = ns.enter()?;
        assert!(ours_attached()?, "prune detached the podmesh program");
    }
    // And podmesh's own state comes back on the next resync.
    mesh.resync(e0).await?;
    assert!(reaches(&mesh, "east-n0", "west-n0"));
    Ok(())
}

#[tokio::test]
async fn direct_prune_leaves_foreign_nexthops_and_routes() -> anyhow::Result<()> {
    if !require_root("direct_prune_leaves_foreign_nexthops_and_routes") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Direct)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    mesh.ip(
        e0,
        &[
            "nexthop",
            "add",
            "id",
            "77",
            "via",
            "172.31.1.2",
            "dev",
            "eth0",
        ],
    )?;
    mesh.ip(e0, &["route", "add", "10.7.0.0/24", "nhid", "77"])?;
    let report = mesh.dps[e0].prune(&BTreeSet::new()).await?;
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(
        mesh.ip(e0, &["nexthop", "show", "proto", "80"])?
            .trim()
            .is_empty()
    );
    assert!(
        mesh.ip(e0, &["nexthop", "show", "id", "77"])?
            .contains("172.31.1.2")
    );
    assert!(
        mesh.ip(e0, &["route", "show"])?
            .contains("10.7.0.0/24 nhid 77")
    );
    Ok(())
}

#[tokio::test]
async fn ebpf_new_datapath_adopts_running_one_without_loss() -> anyhow::Result<()> {
    if !require_root("ebpf_new_datapath_adopts_running_one_without_loss") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let before_routes = podmesh_routes(&mesh, e0)?;
    let before_map = map_cidrs(&mesh, e0)?;
    let mac = mesh.dps[e0].vtep_mac();
    let from = &mesh.topo.nodes[e0].pods[0];
    let to = mesh.topo.nodes[mesh.index("west-n0")].pods[0]
        .addr
        .to_string();
    // 20 pps for 4 s across the restart.
    let ping = from
        .ns
        .command("ping")
        .args(["-n", "-q", "-i", "0.05", "-c", "80", "-W", "1", &to])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Stop: the agent's datapath object goes away, forwarding must not.
    drop(mesh.dps.remove(e0));
    tokio::time::sleep(Duration::from_millis(800)).await;
    // Start: a new one adopts device, maps and program, then resyncs.
    let dp = mesh.datapath(e0)?;
    mesh.dps.insert(e0, dp);
    mesh.resync(e0).await?;
    let out = ping.wait_with_output()?;
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("80 packets transmitted, 80 received"),
        "packets lost across the restart: {summary}"
    );
    assert_eq!(podmesh_routes(&mesh, e0)?, before_routes);
    assert_eq!(map_cidrs(&mesh, e0)?, before_map);
    assert_eq!(mesh.dps[e0].vtep_mac(), mac, "podmesh0 was recreated");
    let ns = &mesh.topo.nodes[e0].ns;
    let _inside = ns.enter()?;
    assert!(ours_attached()?);
    Ok(())
}

#[tokio::test]
async fn ebpf_node_without_vtep_mac_does_not_block_the_others() -> anyhow::Result<()> {
    if !require_root("ebpf_node_without_vtep_mac_does_not_block_the_others") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let w0 = mesh.topo.nodes[mesh.index("west-n0")].pod_cidr.to_string();
    mesh.dps[e0].prune(&BTreeSet::new()).await?;
    let mut desired = mesh.desired(e0);
    let bad = desired
        .iter_mut()
        .find(|r| r.cidr.to_string() == w0)
        .expect("west-n0 route");
    bad.vtep_mac = None;
    let err = mesh.dps[e0]
        .upsert(&desired)
        .await
        .expect_err("a record without vtepMAC is refused");
    assert!(err.to_string().contains("vtepMAC"), "{err}");
    assert!(err.to_string().contains(&w0), "{err}");
    assert_eq!(podmesh_routes(&mesh, e0)?.len(), 1);
    assert!(!reaches(&mesh, "east-n0", "west-n0"));
    assert!(reaches(&mesh, "east-n0", "west-n1"));
    Ok(())
}

/// A new datapath (a restarted agent) reads back exactly what the previous
/// one installed, cluster and node names included (the pinned owners map):
/// the agent keeps a cluster's routes by name while that cluster reconnects.
async fn new_datapath_reads_back_names(mode: DatapathMode) -> anyhow::Result<()> {
    let mut mesh = Mesh::build(mode)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    let mut want = mesh.desired(e0);
    want.sort();
    drop(mesh.dps.remove(e0));
    let dp = mesh.datapath(e0)?;
    mesh.dps.insert(e0, dp);
    let mut got = mesh.dps[e0].installed().await?;
    got.sort();
    assert_eq!(got, want);
    // Withdrawn entries leave no names behind.
    mesh.dps[e0].prune(&BTreeSet::new()).await?;
    drop(mesh.dps.remove(e0));
    let dp = mesh.datapath(e0)?;
    mesh.dps.insert(e0, dp);
    assert_eq!(mesh.dps[e0].installed().await?, Vec::new());
    Ok(())
}

#[tokio::test]
async fn ebpf_new_datapath_reads_back_names() -> anyhow::Result<()> {
    if !require_root("ebpf_new_datapath_reads_back_names") {
        return Ok(());
    }
    new_datapath_reads_back_names(DatapathMode::Ebpf).await
}

#[tokio::test]
async fn vxlan_new_datapath_reads_back_names() -> anyhow::Result<()> {
    if !require_root("vxlan_new_datapath_reads_back_names") {
        return Ok(());
    }
    new_datapath_reads_back_names(DatapathMode::Vxlan).await
}

/// Installing many routes does not stall the async runtime: with a single
/// worker thread, another task keeps running while the datapath works
/// (the kernel calls run off the workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn large_install_does_not_stall_the_runtime() -> anyhow::Result<()> {
    if !require_root("large_install_does_not_stall_the_runtime") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Direct)?;
    let e0 = mesh.index("east-n0");
    let via = mesh.desired(e0)[0].clone();
    let routes: Vec<RemoteRoute> = (0..30_000u32)
        .map(|i| RemoteRoute {
            cidr: IpNet::new(IpAddr::V4(Ipv4Addr::from(0x0a80_0000 + (i << 8))), 24)
                .expect("valid"),
            node: format!("bulk-{i}"),
            ..via.clone()
        })
        .collect();
    let mut dp = mesh.dps.remove(e0);
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let ticks = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let ticker = {
        let (busy, ticks) = (busy.clone(), ticks.clone());
        tokio::spawn(async move {
            while busy.load(std::sync::atomic::Ordering::SeqCst) {
                ticks.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    // Let the ticker start, then install on the same (only) worker.
    tokio::time::sleep(Duration::from_millis(20)).await;
    let install = tokio::spawn(async move {
        let before = ticks.load(std::sync::atomic::Ordering::SeqCst);
        let r = dp.upsert(&routes).await;
        let during = ticks.load(std::sync::atomic::Ordering::SeqCst) - before;
        busy.store(false, std::sync::atomic::Ordering::SeqCst);
        (dp, r, during)
    });
    let (mut dp, r, during) = install.await?;
    ticker.await?;
    r?;
    // Withdraw in bulk before the namespace goes (see datapath_bench).
    dp.prune(&BTreeSet::new()).await?;
    assert!(
        during > 0,
        "no other task ran while 30k routes were installed: the runtime was blocked"
    );
    Ok(())
}

/// Switching a running mesh from one mode to another (`--datapath` changed,
/// agents restarted): the new mode removes what the old one left (its
/// device, which would hold the UDP port; the program's pins; nexthop
/// objects nothing uses) and every pod pair answers again after a resync.
#[tokio::test]
async fn switching_modes_removes_what_the_old_mode_left() -> anyhow::Result<()> {
    if !require_root("switching_modes_removes_what_the_old_mode_left") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let has = |mesh: &Mesh, i: usize, dev: &str| mesh.ip(i, &["link", "show", dev]).is_ok();
    let pins = |mesh: &Mesh, i: usize| -> anyhow::Result<BTreeSet<String>> {
        Ok(std::fs::read_dir(mesh.config(i).pin_dir)?
            .map(|e| Ok(e?.file_name().to_string_lossy().into_owned()))
            .collect::<std::io::Result<_>>()?)
    };
    assert!(pins(&mesh, 0)?.contains(TUNNEL_EGRESS_LINK_PIN));
    assert_eq!(map_cidrs(&mesh, 0)?.len(), 2);
    // A mode that cannot start here (no IPIP on this kernel) leaves the
    // running one alone.
    if mesh.ip(0, &["link", "show", "tunl0"]).is_err() {
        let mut cfg = mesh.config(0);
        cfg.mode = DatapathMode::Ipip;
        assert!(podmesh_agent::datapath::from_config(&cfg).is_err());
        assert!(has(&mesh, 0, "podmesh0"), "a refused ipip removed podmesh0");
        assert!(reaches(&mesh, "east-n0", "west-n0"));
    }
    for (to, gone) in [
        (DatapathMode::Vxlan, "podmesh0"),
        (DatapathMode::Direct, "podmesh-vx"),
        (DatapathMode::Ebpf, "podmesh-vx"),
    ] {
        mesh.dps.clear();
        mesh.mode = to;
        for i in 0..mesh.topo.nodes.len() {
            let dp = mesh.datapath(i)?;
            mesh.dps.push(dp);
        }
        mesh.resync_all().await?;
        let failed = mesh.cross_cluster_failures(None);
        assert!(failed.is_empty(), "after switching to {to:?}: {failed:#?}");
        for i in 0..mesh.dps.len() {
            assert!(!has(&mesh, i, gone), "{to:?}: {gone} left on node {i}");
            // Away from ebpf the program's link is unpinned and its map
            // entries are gone.
            let pinned = pins(&mesh, i)?;
            assert_eq!(
                pinned.contains(TUNNEL_EGRESS_LINK_PIN),
                to == DatapathMode::Ebpf,
                "{to:?}: pins of node {i}: {pinned:?}"
            );
            if to == DatapathMode::Ebpf {
                assert_eq!(map_cidrs(&mesh, i)?.len(), 2, "{to:?}: node {i}");
            } else if pinned.contains(REMOTES_V4_MAP) {
                // The route modes pin the object's maps (for the owners
                // map), new and empty once the ebpf ones were removed.
                let left = map_cidrs(&mesh, i)?;
                assert!(
                    left.is_empty(),
                    "{to:?}: node {i} kept LPM entries {left:?}"
                );
            }
        }
    }
    // Back on ebpf: the direct mode's nexthop objects went with the
    // resync after the one whose upserts replaced their routes.
    let before = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert!(
        !before.trim().is_empty(),
        "direct left no nexthops to test with"
    );
    mesh.resync_all().await?;
    for i in 0..mesh.dps.len() {
        let nh = mesh.ip(i, &["nexthop", "show", "proto", "80"])?;
        assert!(nh.trim().is_empty(), "node {i} kept nexthops: {nh}");
    }
    assert!(mesh.cross_cluster_failures(None).is_empty());
    Ok(())
}

/// Someone removes podmesh's tunnel device, or sets it down, while the agent
/// runs: the kernel drops every route (and neighbour, fdb entry, nexthop)
/// that went through it. The next resync sets the device up again, with the
/// MAC the node published (the remote nodes keep sending to it), and
/// re-installs every entry: traffic flows both ways again.
async fn resync_repairs_the_tunnel_device(
    mode: DatapathMode,
    device: &str,
    break_it: &[&str],
) -> anyhow::Result<()> {
    let mut mesh = Mesh::build(mode)?;
    mesh.resync_all().await?;
    let e0 = mesh.index("east-n0");
    assert!(reaches(&mesh, "east-n0", "west-n0"), "{mode:?}");
    let mac = mesh.dps[e0].vtep_mac();
    let routes = podmesh_routes(&mesh, e0)?;

    mesh.ip(e0, break_it)?;
    assert!(
        !reaches(&mesh, "east-n0", "west-n0"),
        "{mode:?}: `ip {}` did not break forwarding: the test proves nothing",
        break_it.join(" ")
    );
    assert!(
        mesh.dps[e0].repair().await?.is_some(),
        "{mode:?}: the loss of {device} went unnoticed"
    );
    mesh.resync(e0).await?;
    assert_eq!(
        mesh.dps[e0].vtep_mac(),
        mac,
        "{mode:?}: {device} got a new MAC"
    );
    let shown = mesh.ip(e0, &["link", "show", device])?;
    assert!(shown.contains(",UP"), "{mode:?}: {shown}");
    assert_eq!(podmesh_routes(&mesh, e0)?, routes, "{mode:?}");
    for (from, to) in [("east-n0", "west-n0"), ("west-n1", "east-n0")] {
        assert!(
            reaches(&mesh, from, to),
            "{mode:?}: {from} -> {to} after repair"
        );
    }
    // Nothing left to repair.
    assert_eq!(mesh.dps[e0].repair().await?, None, "{mode:?}");
    Ok(())
}

#[tokio::test]
async fn ebpf_resync_recreates_a_removed_podmesh0() -> anyhow::Result<()> {
    if !require_root("ebpf_resync_recreates_a_removed_podmesh0") {
        return Ok(());
    }
    resync_repairs_the_tunnel_device(DatapathMode::Ebpf, "podmesh0", &["link", "del", "podmesh0"])
        .await
}

#[tokio::test]
async fn ebpf_resync_sets_a_downed_podmesh0_up() -> anyhow::Result<()> {
    if !require_root("ebpf_resync_sets_a_downed_podmesh0_up") {
        return Ok(());
    }
    resync_repairs_the_tunnel_device(
        DatapathMode::Ebpf,
        "podmesh0",
        &["link", "set", "podmesh0", "down"],
    )
    .await
}

#[tokio::test]
async fn vxlan_resync_recreates_a_removed_device() -> anyhow::Result<()> {
    if !require_root("vxlan_resync_recreates_a_removed_device") {
        return Ok(());
    }
    resync_repairs_the_tunnel_device(
        DatapathMode::Vxlan,
        "podmesh-vx",
        &["link", "del", "podmesh-vx"],
    )
    .await
}
