//! Every datapath mode over an IPv6-only underlay (no IPv4 address on any
//! node's `eth0`) carries IPv4 and IPv6 pod traffic across clusters; a
//! dual-stack underlay tunnels over the family it is told to; the ipip mode
//! over IPv6 refuses clearly on a kernel without IPv6 tunnels.
mod datapath_support;

use std::{collections::BTreeSet, net::IpAddr, time::Duration};

use datapath_support::Mesh;
use ipnet::IpNet;
use podmesh_agent::{config::DatapathMode, datapath::Datapath, model::UnderlayFamily};
use podmesh_tests::{
    eventually, require_root,
    topo::{ClusterPlan, Underlay},
};

fn plans(underlay: Underlay) -> [ClusterPlan; 2] {
    [
        ClusterPlan::new("east", "10.1.0.0/16", 2, 1)
            .with_ipv6("fd00:1::/48")
            .with_underlay(underlay),
        ClusterPlan::new("west", "10.2.0.0/16", 2, 1)
            .with_ipv6("fd00:2::/48")
            .with_underlay(underlay),
    ]
}

/// Programs every node with the IPv4 and IPv6 Pod CIDRs of the other
/// cluster's nodes and checks that each reads back what it installed.
async fn program(mesh: &mut Mesh) -> anyhow::Result<()> {
    for i in 0..mesh.dps.len() {
        mesh.dps[i].repair().await?;
        let mut want = mesh.desired_dual(i);
        let keep: BTreeSet<IpNet> = want.iter().map(|r| r.cidr).collect();
        mesh.dps[i].prune(&keep).await?;
        mesh.dps[i].upsert(&want).await?;
        let mut got = mesh.dps[i].installed().await?;
        got.sort();
        want.sort();
        assert_eq!(got, want, "node {i} reads back what it installed");
    }
    Ok(())
}

/// Pings every pod of the other cluster from every pod, IPv4 and IPv6
/// (with `size` bytes and DF when given); returns the pairs that got no
/// answer. First contact resolves neighbours on several hops: a pair gets a
/// few seconds.
fn failures(mesh: &Mesh, size: Option<u32>) -> Vec<String> {
    let mut failed = Vec::new();
    for (from_node, from) in mesh.topo.pods() {
        for (to_node, to) in mesh.topo.pods() {
            if from_node.cluster == to_node.cluster {
                continue;
            }
            let mut targets = vec![to.addr.to_string()];
            targets.extend(to.addr6.map(|a| a.to_string()));
            for t in targets {
                let ok = eventually(Duration::from_secs(5), || {
                    if from.ns.ping(&t, 2, size) {
                        Ok(())
                    } else {
                        Err(String::new())
                    }
                })
                .is_ok();
                if !ok {
                    failed.push(format!("{} -> {} ({t})", from.name, to.name));
                }
            }
        }
    }
    failed
}

/// An IPv6-only underlay with dual-stack pods in `mode`: nothing crosses
/// before programming; afterwards IPv4 and IPv6 pings cross both ways, also
/// 1300-byte ones that may not fragment.
async fn ipv6_only_underlay(mode: DatapathMode) -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::with_underlay(mode, &plans(Underlay::Ipv6), UnderlayFamily::Ipv6)?;
    for i in 0..mesh.topo.nodes.len() {
        let v4 = mesh.ip(i, &["-4", "addr", "show", "dev", "eth0"])?;
        assert!(v4.trim().is_empty(), "IPv4 on an IPv6-only underlay: {v4}");
    }
    let from = &mesh.topo.nodes[0].pods[0];
    let to = &mesh.topo.cluster_nodes("west").next().expect("west").pods[0];
    assert!(
        !from.ns.ping(&to.addr.to_string(), 1, None),
        "{mode:?}: reached {} before programming",
        to.addr
    );
    program(&mut mesh).await?;
    let failed = failures(&mesh, None);
    assert!(failed.is_empty(), "{mode:?}: unreachable: {failed:#?}");
    let failed = failures(&mesh, Some(1300));
    assert!(
        failed.is_empty(),
        "{mode:?}: 1300-byte DF pings lost: {failed:#?}"
    );
    Ok(mesh)
}

#[tokio::test]
async fn ebpf_mode_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("ebpf_mode_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    let mut mesh = ipv6_only_underlay(DatapathMode::Ebpf).await?;
    let c = mesh.dps[0].counters().expect("ebpf counters")?;
    assert!(c.forwarded > 0, "nothing went through the program: {c:?}");
    assert_eq!(c.tunnel_key_failed, 0, "{c:?}");
    // VXLAN over IPv6 costs 70 bytes.
    let route = mesh.ip(0, &["route", "show", "10.2.0.0/24"])?;
    assert!(route.contains("mtu 1430"), "route MTU: {route}");
    let installed = mesh.dps[0].installed().await?;
    assert!(
        installed.iter().all(|r| r.node_addr.is_ipv6()),
        "IPv4 endpoint on an IPv6 underlay: {installed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn vxlan_mode_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("vxlan_mode_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    let mesh = ipv6_only_underlay(DatapathMode::Vxlan).await?;
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert_eq!(nh.lines().count(), 2, "one nexthop per remote node: {nh}");
    // Gateways are the remote VTEPs' link-local addresses; the fdb sends
    // their MACs to the IPv6 node addresses.
    assert!(nh.contains("via fe80::"), "link-local next hops: {nh}");
    let neigh = mesh.ip(0, &["-6", "neigh", "show", "dev", "podmesh-vx"])?;
    assert!(neigh.contains("PERMANENT"), "IPv6 neighbours: {neigh}");
    let fdb = mesh.topo.nodes[0]
        .ns
        .run("bridge", &["fdb", "show", "dev", "podmesh-vx"])?;
    assert!(fdb.contains("dst fd31::2:"), "fdb to IPv6 endpoints: {fdb}");
    let route = mesh.ip(0, &["route", "show", "10.2.0.0/24"])?;
    assert!(route.contains("mtu 1430"), "route MTU: {route}");
    Ok(())
}

#[tokio::test]
async fn direct_mode_over_an_ipv6_only_underlay() -> anyhow::Result<()> {
    if !require_root("direct_mode_over_an_ipv6_only_underlay") {
        return Ok(());
    }
    let mesh = ipv6_only_underlay(DatapathMode::Direct).await?;
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert_eq!(nh.lines().count(), 2, "one nexthop per remote node: {nh}");
    assert!(
        nh.contains("via fd31::") && nh.contains("dev eth0"),
        "IPv6 next hops on the underlay: {nh}"
    );
    Ok(())
}

/// A dual-stack underlay tunnels over the family it is told to: the
/// endpoints read back from the datapath are of that family, and pods reach
/// each other either way.
#[tokio::test]
async fn dual_stack_underlay_tunnels_over_the_chosen_family() -> anyhow::Result<()> {
    if !require_root("dual_stack_underlay_tunnels_over_the_chosen_family") {
        return Ok(());
    }
    for family in [UnderlayFamily::Ipv6, UnderlayFamily::Ipv4] {
        let mut mesh = Mesh::with_underlay(DatapathMode::Ebpf, &plans(Underlay::Dual), family)?;
        program(&mut mesh).await?;
        let installed = mesh.dps[0].installed().await?;
        assert!(
            !installed.is_empty() && installed.iter().all(|r| family.holds(r.node_addr)),
            "{family}: endpoints {installed:?}"
        );
        let failed = failures(&mesh, None);
        assert!(failed.is_empty(), "{family}: unreachable: {failed:#?}");
        // An endpoint of the other family is refused, with the flag to change.
        let other = match family {
            UnderlayFamily::Ipv4 => IpAddr::from([0xfd31u16, 0, 0, 0, 0, 0, 9, 9]),
            UnderlayFamily::Ipv6 => IpAddr::from([172, 31, 9, 9]),
        };
        let mut bad = mesh.desired(0)[0].clone();
        bad.cidr = "10.2.99.0/24".parse()?;
        bad.node_addr = other;
        let e = mesh.dps[0]
            .upsert(std::slice::from_ref(&bad))
            .await
            .expect_err("endpoint of the other family refused");
        assert!(
            e.to_string()
                .contains(&format!("tunnels over an {family} underlay")),
            "unclear refusal: {e}"
        );
    }
    Ok(())
}

/// ipip over an IPv6 underlay needs the kernel's IPv6 tunnel (ip6tnl);
/// this machine's kernel has none, and the mode says so.
#[tokio::test]
async fn ipip_over_ipv6_refuses_clearly_without_ip6_tunnels() -> anyhow::Result<()> {
    use podmesh_agent::datapath::{KernelConfig, from_config};
    use podmesh_tests::netns::NetNs;

    if !require_root("ipip_over_ipv6_refuses_clearly_without_ip6_tunnels") {
        return Ok(());
    }
    let ns = NetNs::new("ip6t")?;
    if ns
        .ip(&["link", "add", "pm6probe", "type", "ip6tnl"])
        .is_ok()
    {
        // A kernel with IPv6 tunnels: the mode must come up instead.
        let _ = ns.ip(&["link", "del", "pm6probe"]);
        let mut cfg =
            KernelConfig::new(DatapathMode::Ipip).in_netns(format!("/run/netns/{}", ns.name()));
        cfg.underlay = UnderlayFamily::Ipv6;
        from_config(&cfg)?;
        let link = ns.ip(&["-d", "link", "show", "podmesh-ip6"])?;
        assert!(link.contains("ip6tnl"), "{link}");
        return Ok(());
    }
    let mut cfg =
        KernelConfig::new(DatapathMode::Ipip).in_netns(format!("/run/netns/{}", ns.name()));
    cfg.underlay = UnderlayFamily::Ipv6;
    let e = from_config(&cfg).expect_err("no ip6tnl on this kernel");
    let msg = e.to_string();
    assert!(
        msg.contains("no IPv6 tunnel support") && msg.contains("--datapath"),
        "unclear refusal: {msg}"
    );
    Ok(())
}

/// An LPM map pinned with the value of earlier versions (16 bytes, IPv4
/// endpoints only) is carried over into the current layout when the ebpf
/// datapath starts: its entries keep forwarding to the same endpoints.
#[tokio::test]
async fn ebpf_maps_of_the_earlier_layout_are_carried_over() -> anyhow::Result<()> {
    use aya::maps::{LpmTrie, MapData, lpm_trie::Key};
    use podmesh_agent::datapath::{KernelConfig, from_config};
    use podmesh_common::{REMOTES_V4_MAP, RemoteNode, RemoteNodeV1};
    use podmesh_tests::netns::NetNs;

    if !require_root("ebpf_maps_of_the_earlier_layout_are_carried_over") {
        return Ok(());
    }
    let bpffs = datapath_support::Bpffs::new()?;
    let pin_dir = bpffs.path().join("node");
    std::fs::create_dir_all(&pin_dir)?;
    let key = Key::new(24, [10, 2, 0, 0]);
    let mut old: LpmTrie<MapData, [u8; 4], RemoteNodeV1> = LpmTrie::create(1024, 1)?;
    old.insert(
        &key,
        RemoteNodeV1 {
            addr_v4: u32::from(std::net::Ipv4Addr::new(172, 31, 2, 1)),
            vni: 1,
            vtep_mac: [2, 0, 0, 0, 0, 1],
            _pad: [0; 2],
        },
        0,
    )?;
    old.pin(pin_dir.join(REMOTES_V4_MAP))?;

    let ns = NetNs::new("v1map")?;
    let mut cfg =
        KernelConfig::new(DatapathMode::Ebpf).in_netns(format!("/run/netns/{}", ns.name()));
    cfg.pin_dir = pin_dir.clone();
    let _dp = from_config(&cfg)?;
    let data = MapData::from_pin(pin_dir.join(REMOTES_V4_MAP))?;
    let now: LpmTrie<MapData, [u8; 4], RemoteNode> =
        LpmTrie::try_from(aya::maps::Map::LpmTrie(data))?;
    let v = now.get(&key, 0)?;
    assert_eq!(v.endpoint(), IpAddr::from([172, 31, 2, 1]));
    assert_eq!(v.vtep_mac, [2, 0, 0, 0, 0, 1]);
    assert_eq!(v.vni, 1);
    Ok(())
}
