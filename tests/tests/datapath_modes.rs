//! Every pod reaches every remote-cluster pod in each datapath mode this
//! kernel supports, also with 1400-byte packets that may not fragment; the
//! ipip mode refuses clearly on a kernel without IPIP.
mod datapath_support;

use datapath_support::{DEFERS_TO_KERNEL, Mesh, WireguardContainer, podmesh_routes};
use podmesh_agent::{config::DatapathMode, datapath::DatapathError};
use podmesh_tests::{netns::NetNs, require_root};

/// Every pod's IPv6 address, with the index of its node.
fn pod_v6_addresses(mesh: &Mesh) -> Vec<(usize, String)> {
    let mut pod_v6 = Vec::new();
    for (i, node) in mesh.topo.nodes.iter().enumerate() {
        for pod in &node.pods {
            pod_v6.push((i, pod.addr6.expect("dual-stack pod").to_string()));
        }
    }
    pod_v6
}

/// Pairs of pods in different clusters whose IPv6 ping gets no answer. First
/// contact resolves IPv6 neighbours on four hops: a pair gets a few seconds
/// to answer, not just its first two requests.
fn ipv6_cross_cluster_failures(mesh: &Mesh, pod_v6: &[(usize, String)]) -> Vec<String> {
    let mut failed = Vec::new();
    for (from_node, from) in mesh.topo.pods() {
        for (j, to) in pod_v6 {
            if mesh.topo.nodes[*j].cluster != from_node.cluster
                && podmesh_tests::eventually(std::time::Duration::from_secs(5), || {
                    if from.ns.ping(to, 2, None) {
                        Ok(())
                    } else {
                        Err(String::new())
                    }
                })
                .is_err()
            {
                failed.push(format!("{} -> {to}", from.name));
            }
        }
    }
    failed
}

async fn every_pod_reaches_every_remote_pod(mode: DatapathMode) -> anyhow::Result<Mesh> {
    let mut mesh = Mesh::build(mode)?;
    // Before programming nothing crosses: the test can fail.
    let (_, pod) = mesh.topo.pods().next().expect("pods");
    let remote = mesh
        .topo
        .cluster_nodes("west")
        .next()
        .expect("west node")
        .pods[0]
        .addr;
    assert!(
        !pod.ns.ping(&remote.to_string(), 1, None),
        "{mode:?}: reached {remote} before any datapath entry existed"
    );

    mesh.resync_all().await?;
    for i in 0..mesh.dps.len() {
        let want: std::collections::BTreeSet<String> =
            mesh.desired(i).iter().map(|r| r.cidr.to_string()).collect();
        assert_eq!(
            podmesh_routes(&mesh, i)?,
            want,
            "{mode:?}: routes of node {i}"
        );
    }
    let failed = mesh.cross_cluster_failures(None);
    assert!(failed.is_empty(), "{mode:?}: unreachable: {failed:#?}");
    let failed = mesh.cross_cluster_failures(Some(1400));
    assert!(
        failed.is_empty(),
        "{mode:?}: 1400-byte DF pings lost: {failed:#?}"
    );
    Ok(mesh)
}

#[tokio::test]
async fn ebpf_mode_connects_every_pod_pair_across_clusters() -> anyhow::Result<()> {
    if !require_root("ebpf_mode_connects_every_pod_pair_across_clusters") {
        return Ok(());
    }
    let mesh = every_pod_reaches_every_remote_pod(DatapathMode::Ebpf).await?;
    // The packets really went through the program.
    let c = mesh.dps[0].counters().expect("ebpf counters")?;
    assert!(
        c.forwarded > 0,
        "no packet forwarded by the tc program: {c:?}"
    );
    assert_eq!(c.tunnel_key_failed, 0, "{c:?}");
    // Route MTU accounts for VXLAN (underlay 1500 - 50).
    let route = mesh.ip(0, &["route", "show", "10.2.0.0/24"])?;
    assert!(route.contains("mtu 1450"), "route without MTU: {route}");
    Ok(())
}

#[tokio::test]
async fn vxlan_mode_connects_every_pod_pair_across_clusters() -> anyhow::Result<()> {
    if !require_root("vxlan_mode_connects_every_pod_pair_across_clusters") {
        return Ok(());
    }
    let mesh = every_pod_reaches_every_remote_pod(DatapathMode::Vxlan).await?;
    let neigh = mesh.ip(0, &["neigh", "show", "dev", "podmesh-vx"])?;
    assert!(
        neigh.contains("PERMANENT"),
        "no permanent neighbours: {neigh}"
    );
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert_eq!(nh.lines().count(), 2, "one nexthop per remote node: {nh}");
    Ok(())
}

#[tokio::test]
async fn direct_mode_connects_every_pod_pair_across_clusters() -> anyhow::Result<()> {
    if !require_root("direct_mode_connects_every_pod_pair_across_clusters") {
        return Ok(());
    }
    let mesh = every_pod_reaches_every_remote_pod(DatapathMode::Direct).await?;
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert_eq!(nh.lines().count(), 2, "one nexthop per remote node: {nh}");
    assert!(
        nh.contains("dev eth0"),
        "nexthops not on the underlay: {nh}"
    );
    Ok(())
}

/// Kernel WireGuard between the clusters over the vxlan datapath (which keeps
/// carrying nodes without a key): every pod pair answers through
/// `podmesh-wg`, a kernel `wireguard` device with one peer per remote node,
/// routes with the MTU less WireGuard's 60 bytes. Runs only where the kernel
/// has WireGuard: `cargo xtask vm-test` runs it on Debian's kernel.
#[tokio::test]
#[ignore = "needs a kernel with WireGuard: cargo xtask vm-test runs it in a VM"]
async fn wireguard_kernel_connects_every_pod_pair_across_clusters() -> anyhow::Result<()> {
    if !require_root("wireguard_kernel_connects_every_pod_pair_across_clusters") {
        return Ok(());
    }
    let mut mesh = Mesh::without_datapaths(
        DatapathMode::Vxlan,
        &[
            podmesh_tests::topo::ClusterPlan::new("east", "10.1.0.0/16", 2, 2),
            podmesh_tests::topo::ClusterPlan::new("west", "10.2.0.0/16", 2, 2),
        ],
        podmesh_agent::model::UnderlayFamily::Ipv4,
        Some(podmesh_agent::config::WireguardBackend::Auto),
    )?;
    // As in the DaemonSet: the userspace WireGuard's container starts on
    // every node first and, the kernel having WireGuard, stands by.
    let mut containers = Vec::new();
    for i in 0..mesh.topo.nodes.len() {
        let run_dir = mesh.config(i).wireguard.expect("wireguard").run_dir;
        let log = mesh
            .wg_dir
            .path()
            .join(format!("{}.container.log", mesh.topo.nodes[i].name));
        let mut c = WireguardContainer::start(&mesh.topo.nodes[i].ns, &run_dir, &log)?;
        c.wait_for_log(DEFERS_TO_KERNEL)?;
        containers.push(c);
    }
    for (i, c) in containers.iter_mut().enumerate() {
        assert!(c.running(), "node {i}: the container exited");
        assert!(
            mesh.ip(i, &["link", "show", "podmesh-wg"]).is_err(),
            "node {i}: the standing-by container holds podmesh-wg"
        );
        let files: Vec<_> = std::fs::read_dir(&c.run_dir)?.collect();
        assert!(
            files.is_empty(),
            "node {i}: the standing-by container wrote {files:?}"
        );
        let links = mesh.ip(i, &["-d", "link", "show"])?;
        assert!(
            !links.contains("wireguard") && !links.contains("podmesh-wgprobe"),
            "node {i}: the probe left a link: {links}"
        );
    }
    mesh.build_datapaths()?;
    mesh.resync_all().await?;
    for i in 0..mesh.dps.len() {
        let link = mesh.ip(i, &["-d", "link", "show", "podmesh-wg"])?;
        assert!(
            link.contains("wireguard"),
            "node {i}: not kernel WireGuard: {link}"
        );
        let routes = mesh.ip(i, &["route", "show", "dev", "podmesh-wg"])?;
        assert_eq!(routes.lines().count(), 2, "node {i}: {routes}");
        assert!(routes.contains("mtu 1440"), "node {i}: {routes}");
        let wg = mesh.dps[i].wireguard().expect("wireguard").status();
        assert_eq!(wg.backend, "kernel");
        assert_eq!(wg.peers.len(), 2, "node {i}: {wg:?}");
    }
    let failed = mesh.cross_cluster_failures(None);
    assert!(
        failed.is_empty(),
        "kernel WireGuard: unreachable: {failed:#?}"
    );
    let failed = mesh.cross_cluster_failures(Some(1400));
    assert!(
        failed.is_empty(),
        "kernel WireGuard, 1400 bytes with DF: {failed:#?}"
    );
    for i in 0..mesh.dps.len() {
        let wg = mesh.dps[i].wireguard().expect("wireguard").status();
        assert!(
            wg.peers
                .iter()
                .all(|p| p.latest_handshake_age.is_some() && p.rx_bytes > 0 && p.tx_bytes > 0),
            "node {i}: {wg:?}"
        );
    }
    // A second pass changes nothing (the sessions stay).
    let before = mesh.dps[0].wireguard().expect("wireguard").status();
    mesh.resync_all().await?;
    let after = mesh.dps[0].wireguard().expect("wireguard").status();
    let keys = |s: &podmesh_agent::status::WireguardStatus| {
        s.peers
            .iter()
            .map(|p| (p.public_key.clone(), p.latest_handshake_age.is_some()))
            .collect::<Vec<_>>()
    };
    assert_eq!(keys(&before), keys(&after));
    // The containers stood by all along, and stop on SIGTERM.
    for (i, c) in containers.iter_mut().enumerate() {
        assert!(c.running(), "node {i}: the container exited");
        let st = c.terminate()?;
        assert!(st.success(), "node {i}: the container ended with {st}");
    }
    Ok(())
}

/// `podmesh-wireguard --defer-to-kernel-wireguard` serves the userspace
/// device where the kernel has no WireGuard, and stands by where it has
/// (`wireguard_kernel_connects_every_pod_pair_across_clusters` covers that
/// case with a mesh, in the VM).
#[tokio::test]
async fn userspace_wireguard_defers_only_to_a_kernel_with_wireguard() -> anyhow::Result<()> {
    if !require_root("userspace_wireguard_defers_only_to_a_kernel_with_wireguard") {
        return Ok(());
    }
    let ns = NetNs::new("wgdefer")?;
    // The kernel's answer, asked independently of the program.
    let kernel_has_it = ns
        .ip(&["link", "add", "wgdefer-probe", "type", "wireguard"])
        .is_ok();
    if kernel_has_it {
        ns.ip(&["link", "del", "wgdefer-probe"])?;
    }
    let dir = tempfile::tempdir()?;
    let run_dir = dir.path().join("run");
    let mut c = WireguardContainer::start(&ns, &run_dir, &dir.path().join("log"))?;
    if kernel_has_it {
        c.wait_for_log(DEFERS_TO_KERNEL)?;
        assert!(ns.ip(&["link", "show", "podmesh-wg"]).is_err());
        assert!(!run_dir.join("podmesh-wg.sock").exists());
    } else {
        c.wait_for_log("serving WireGuard")?;
        let sock = run_dir.join("podmesh-wg.sock");
        podmesh_tests::eventually(std::time::Duration::from_secs(10), || {
            std::os::unix::net::UnixStream::connect(&sock)
                .map(drop)
                .map_err(|e| format!("{}: {e}", sock.display()))
        })?;
        let link = ns.ip(&["-d", "link", "show", "podmesh-wg"])?;
        assert!(link.contains("tun"), "not the userspace TUN: {link}");
        let log = std::fs::read_to_string(&c.log)?;
        assert!(!log.contains(DEFERS_TO_KERNEL), "{log}");
        let links = ns.ip(&["link", "show"])?;
        assert!(
            !links.contains("podmesh-wgprobe"),
            "the probe left its link: {links}"
        );
    }
    assert!(
        c.running(),
        "it exited: {}",
        std::fs::read_to_string(&c.log)?
    );
    let st = c.terminate()?;
    assert!(st.success(), "ended with {st}");
    Ok(())
}

/// Runs only where the kernel has IPIP: `cargo xtask vm-test` boots a Debian
/// kernel in qemu and runs it there.
#[tokio::test]
#[ignore = "needs a kernel with IPIP: cargo xtask vm-test runs it in a VM"]
async fn ipip_mode_connects_every_pod_pair_across_clusters() -> anyhow::Result<()> {
    if !require_root("ipip_mode_connects_every_pod_pair_across_clusters") {
        return Ok(());
    }
    let mesh = every_pod_reaches_every_remote_pod(DatapathMode::Ipip).await?;
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert_eq!(nh.lines().count(), 2, "one nexthop per remote node: {nh}");
    assert!(nh.contains("dev tunl0") && nh.contains("onlink"), "{nh}");
    let route = mesh.ip(0, &["route", "show", "10.2.0.0/24"])?;
    assert!(
        route.contains("mtu 1480"),
        "route without IPIP MTU: {route}"
    );
    Ok(())
}

/// ipip over an IPv6-only underlay: IPv4 and IPv6 pods through the kernel's
/// IPv6 tunnel (`podmesh-ip6`, external ip6tnl with `encap ip6` nexthops).
/// Runs where the kernel has ip6tnl: `cargo xtask vm-test` (Debian's kernel).
#[tokio::test]
#[ignore = "needs a kernel with ip6tnl: cargo xtask vm-test runs it in a VM"]
async fn ipip_mode_over_an_ipv6_underlay_connects_every_pod_pair() -> anyhow::Result<()> {
    use podmesh_agent::{datapath::Datapath, model::UnderlayFamily};
    use podmesh_tests::topo::{ClusterPlan, Underlay};

    if !require_root("ipip_mode_over_an_ipv6_underlay_connects_every_pod_pair") {
        return Ok(());
    }
    let plans = [
        ClusterPlan::new("east", "10.1.0.0/16", 2, 1)
            .with_ipv6("fd00:1::/48")
            .with_underlay(Underlay::Ipv6),
        ClusterPlan::new("west", "10.2.0.0/16", 2, 1)
            .with_ipv6("fd00:2::/48")
            .with_underlay(Underlay::Ipv6),
    ];
    let mut mesh = Mesh::with_underlay(DatapathMode::Ipip, &plans, UnderlayFamily::Ipv6)?;
    for i in 0..mesh.dps.len() {
        let mut want = mesh.desired_dual(i);
        mesh.dps[i].upsert(&want).await?;
        let mut got = mesh.dps[i].installed().await?;
        got.sort();
        want.sort();
        assert_eq!(got, want, "node {i} reads back what it installed");
    }
    let failed = mesh.cross_cluster_failures(None);
    assert!(failed.is_empty(), "IPv4 unreachable: {failed:#?}");
    let mut failed6 = Vec::new();
    for (from_node, from) in mesh.topo.pods() {
        for (to_node, to) in mesh.topo.pods() {
            let to6 = to.addr6.expect("dual-stack pod").to_string();
            if from_node.cluster != to_node.cluster
                && podmesh_tests::eventually(std::time::Duration::from_secs(5), || {
                    if from.ns.ping(&to6, 2, None) {
                        Ok(())
                    } else {
                        Err(String::new())
                    }
                })
                .is_err()
            {
                failed6.push(format!("{} -> {to6}", from.name));
            }
        }
    }
    assert!(failed6.is_empty(), "IPv6 unreachable: {failed6:#?}");
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert!(
        nh.contains("encap ip6") && nh.contains("dev podmesh-ip6"),
        "{nh}"
    );
    let route = mesh.ip(0, &["route", "show", "10.2.0.0/24"])?;
    assert!(route.contains("mtu 1460"), "IPv6 tunnel MTU: {route}");

    // East's first node switches to direct: podmesh-ip6 goes with the
    // switch, its routes are direct's, and the node that still runs ipip
    // keeps its tunnel.
    mesh.mode = DatapathMode::Direct;
    mesh.dps[0] = mesh.datapath(0)?;
    // (`ip6tnl0`, the kernel's own fallback device, stays.)
    assert!(
        mesh.ip(0, &["link", "show", "podmesh-ip6"]).is_err(),
        "the ipip tunnel outlived the switch to direct: {}",
        mesh.ip(0, &["-d", "link", "show"])?
    );
    let want = mesh.desired_dual(0);
    let keep: std::collections::BTreeSet<_> = want.iter().map(|r| r.cidr).collect();
    mesh.dps[0].prune(&keep).await?;
    mesh.dps[0].upsert(&want).await?;
    let routes6: std::collections::BTreeSet<String> = mesh
        .ip(0, &["-6", "route", "show", "proto", "80"])?
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let mut got = podmesh_routes(&mesh, 0)?;
    got.extend(routes6);
    assert_eq!(
        got,
        keep.iter().map(ToString::to_string).collect(),
        "direct's routes (both families) after the switch"
    );
    let nh = mesh.ip(0, &["nexthop", "show", "proto", "80"])?;
    assert!(
        nh.contains("dev eth0") && !nh.contains("encap") && !nh.contains("podmesh-ip6"),
        "direct's next hops on the underlay after the switch: {nh}"
    );
    let other = mesh.ip(1, &["-d", "link", "show", "podmesh-ip6"])?;
    assert!(other.contains("ip6tnl"), "node 1 lost its tunnel: {other}");
    Ok(())
}

#[tokio::test]
async fn ipip_mode_refuses_clearly_without_kernel_support() -> anyhow::Result<()> {
    if !require_root("ipip_mode_refuses_clearly_without_kernel_support") {
        return Ok(());
    }
    let ns = NetNs::new("ipip")?;
    let mut cfg = podmesh_agent::datapath::KernelConfig::new(DatapathMode::Ipip)
        .in_netns(format!("/run/netns/{}", ns.name()));
    cfg.pin_dir = std::env::temp_dir().join("podmesh-ipip-unused");
    let has_ipip = ns.ip(&["link", "show", "tunl0"]).is_ok();
    match podmesh_agent::datapath::from_config(&cfg) {
        Err(DatapathError::Unavailable(msg)) if !has_ipip => {
            assert!(msg.contains("IPIP"), "unclear refusal: {msg}");
            assert!(
                msg.contains("--datapath"),
                "refusal without a way out: {msg}"
            );
        }
        Ok(_) if has_ipip || ns.ip(&["link", "show", "tunl0"]).is_ok() => {
            // A kernel with IPIP (cargo xtask vm-test covers forwarding there).
        }
        Ok(_) => panic!("ipip datapath built on a kernel without tunl0"),
        Err(e) => panic!("unexpected error: {e}"),
    }
    Ok(())
}

/// IPv6 Pod CIDRs in ebpf mode: a second LPM map, tunnelled over the same
/// IPv4 underlay. The pods are dual-stack: the CNI gives node `n` of cluster
/// `c` the /64 `fd00:<c>:<n>::/64` next to its IPv4 block.
#[tokio::test]
async fn ebpf_mode_forwards_ipv6_pod_cidrs() -> anyhow::Result<()> {
    use std::net::IpAddr;

    use podmesh_agent::datapath::{Datapath, RemoteRoute};

    if !require_root("ebpf_mode_forwards_ipv6_pod_cidrs") {
        return Ok(());
    }
    let mut mesh = Mesh::build_dual_stack(DatapathMode::Ebpf)?;
    mesh.resync_all().await?;
    let v6_cidr = |i: usize| -> ipnet::IpNet {
        ipnet::IpNet::V6(mesh.topo.nodes[i].pod_cidr_v6.expect("dual-stack node"))
    };
    let pod_v6 = pod_v6_addresses(&mesh);
    let from = &mesh.topo.nodes[mesh.index("east-n0")].pods[0];
    let (_, to) = pod_v6
        .iter()
        .find(|(i, _)| mesh.topo.nodes[*i].cluster == "west")
        .expect("a west pod")
        .clone();
    assert!(
        !from.ns.ping(&to, 1, None),
        "reached {to} before any IPv6 entry existed"
    );

    let before = mesh.dps[0].counters().expect("ebpf counters")?;
    for i in 0..mesh.dps.len() {
        let me = mesh.topo.nodes[i].cluster.clone();
        let mut routes = mesh.desired(i);
        for (j, n) in mesh.topo.nodes.iter().enumerate() {
            if n.cluster != me {
                routes.push(RemoteRoute {
                    cidr: v6_cidr(j),
                    cluster: n.cluster.clone(),
                    node: n.name.clone(),
                    node_addr: IpAddr::V4(n.addr),
                    vtep_mac: mesh.dps[j].vtep_mac(),
                    wireguard_key: None,
                });
            }
        }
        mesh.dps[i].upsert(&routes).await?;
        let mut installed = mesh.dps[i].installed().await?;
        installed.sort();
        routes.sort();
        assert_eq!(installed, routes, "node {i} reads back what it installed");
    }
    let route = mesh.ip(0, &["-6", "route", "show", "proto", "80"])?;
    assert!(
        route.contains("dev podmesh0") && route.contains("mtu 1450"),
        "IPv6 routes: {route}"
    );
    let failed = ipv6_cross_cluster_failures(&mesh, &pod_v6);
    assert!(failed.is_empty(), "IPv6 unreachable: {failed:#?}");
    // The CNI masquerades IPv6 too (ip6tables); the exemption's IPv6 set
    // keeps the pod's own address towards remote pods.
    for (from_name, to_name) in [("east-n0", "west-n1"), ("west-n1", "east-n0")] {
        let from = &mesh.topo.nodes[mesh.index(from_name)].pods[0];
        let to = &mesh.topo.nodes[mesh.index(to_name)].pods[0];
        let _sink = podmesh_tests::flow::Sink::start(&to.ns)?;
        let to6 = to.addr6.expect("dual-stack pod");
        let seen = podmesh_tests::flow::exchange(&from.ns, IpAddr::V6(to6), 1024)?;
        assert_eq!(
            seen.source,
            IpAddr::V6(from.addr6.expect("dual-stack pod")),
            "{} -> {to6} over IPv6 arrived from another source",
            from.name
        );
    }
    let after = mesh.dps[0].counters().expect("ebpf counters")?;
    assert!(
        after.forwarded > before.forwarded,
        "IPv6 did not go through the tc program: {before:?} -> {after:?}"
    );
    assert_eq!(after.tunnel_key_failed, 0, "{after:?}");

    // An IPv6 tunnel endpoint is refused with a reason; the rest is installed.
    let bad = RemoteRoute {
        cidr: "fd00:9::/64".parse()?,
        cluster: "north".into(),
        node: "n6".into(),
        node_addr: "fd99::1".parse()?,
        vtep_mac: Some([2, 0, 0, 0, 0, 9]),
        wireguard_key: None,
    };
    let e = mesh.dps[0]
        .upsert(std::slice::from_ref(&bad))
        .await
        .expect_err("IPv6 underlay refused");
    assert!(
        e.to_string().contains("IPv4 underlay"),
        "unclear refusal: {e}"
    );
    assert!(
        !mesh
            .ip(0, &["-6", "route", "show", "proto", "80"])?
            .contains("fd00:9::"),
        "refused entry routed anyway"
    );
    Ok(())
}

/// Route MTU = underlay MTU − VXLAN overhead: the underlay is the default
/// route's device when the node address is not known yet (the Node comes
/// from Kubernetes), and `--underlay-mtu` wins over what the kernel says.
#[tokio::test]
async fn route_mtu_follows_the_underlay_device_or_the_flag() -> anyhow::Result<()> {
    use std::net::IpAddr;

    use podmesh_agent::datapath::{Datapath, KernelConfig, RemoteRoute, from_config};

    if !require_root("route_mtu_follows_the_underlay_device_or_the_flag") {
        return Ok(());
    }
    let bpffs = datapath_support::Bpffs::new()?;
    let route = RemoteRoute {
        cidr: "10.9.0.0/24".parse()?,
        cluster: "west".into(),
        node: "west-n0".into(),
        node_addr: IpAddr::from([172, 30, 0, 9]),
        vtep_mac: Some([0x02, 0, 0xac, 0x1e, 0, 9]),
        wireguard_key: None,
    };
    // (node_ip known?, --underlay-mtu, expected route MTU) on a 9000-byte underlay.
    let cases = [
        (false, None, "mtu 8950"),
        (true, None, "mtu 8950"),
        (true, Some(1400), "mtu 1350"),
    ];
    for (i, (with_ip, flag, want)) in cases.into_iter().enumerate() {
        let ns = NetNs::new("mtu")?;
        ns.ip(&[
            "link", "add", "eth0", "mtu", "9000", "type", "veth", "peer", "name", "eth1", "mtu",
            "9000",
        ])?;
        ns.ip(&["addr", "add", "172.30.0.2/24", "dev", "eth0"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        ns.ip(&["link", "set", "eth1", "up"])?;
        ns.ip(&[
            "route",
            "add",
            "default",
            "via",
            "172.30.0.1",
            "dev",
            "eth0",
        ])?;
        // The node's loopback has the default 65536: a wrong pick shows.
        ns.ip(&["link", "set", "lo", "up"])?;
        let mut cfg =
            KernelConfig::new(DatapathMode::Vxlan).in_netns(format!("/run/netns/{}", ns.name()));
        cfg.pin_dir = bpffs.path().join(format!("case{i}"));
        cfg.node_ip = with_ip.then_some(IpAddr::from([172, 30, 0, 2]));
        cfg.underlay_mtu = flag;
        let mut dp = from_config(&cfg)?;
        dp.upsert(std::slice::from_ref(&route)).await?;
        let shown = ns.ip(&["route", "show", "10.9.0.0/24"])?;
        assert!(
            shown.contains(want),
            "case {i} (node ip known: {with_ip}, flag {flag:?}): want {want}, got {shown}"
        );
    }
    Ok(())
}

/// A tunnel port another VXLAN device already uses (flannel's `flannel.1`
/// defaults to 8472 and VNI 1, as podmesh does): the refusal names the device
/// and the flag to change, leaves no half-made device behind and never
/// touches the other device; another VNI (vxlan mode) or port (ebpf) works
/// beside it.
#[tokio::test]
async fn a_tunnel_port_taken_by_another_vxlan_device_is_named() -> anyhow::Result<()> {
    use podmesh_agent::datapath::{KernelConfig, from_config};

    if !require_root("a_tunnel_port_taken_by_another_vxlan_device_is_named") {
        return Ok(());
    }
    let bpffs = datapath_support::Bpffs::new()?;
    let ns = NetNs::new("port")?;
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dstport",
        "8472",
        "nolearning",
    ])?;
    ns.ip(&["link", "set", "flannel.1", "up"])?;
    let flannel_before = ns.ip(&["-d", "link", "show", "flannel.1"])?;
    let config = |mode, port, vni| {
        let mut cfg = KernelConfig::new(mode).in_netns(format!("/run/netns/{}", ns.name()));
        cfg.pin_dir = bpffs.path().join(format!("{mode:?}-{port}-{vni}"));
        cfg.tunnel_port = port;
        cfg.vni = vni;
        cfg.underlay_mtu = Some(1500);
        cfg
    };
    let refusal = |mode, vni| match from_config(&config(mode, 8472, vni)) {
        Err(DatapathError::Unavailable(msg)) => msg,
        Err(e) => panic!("{mode:?}: unclear error: {e}"),
        Ok(_) => panic!("{mode:?}: built a datapath on a port flannel.1 holds"),
    };

    // ebpf: an external device cannot share the socket of a device with a VNI.
    let msg = refusal(DatapathMode::Ebpf, 1);
    for want in ["flannel.1 (VNI 1)", "UDP port 8472", "--tunnel-port"] {
        assert!(msg.contains(want), "ebpf refusal lacks {want:?}: {msg}");
    }
    assert!(
        ns.ip(&["link", "show", "podmesh0"]).is_err(),
        "a podmesh0 that could not come up was left behind"
    );
    // vxlan: the same port and VNI is taken.
    let msg = refusal(DatapathMode::Vxlan, 1);
    for want in ["flannel.1 (VNI 1)", "VNI 1", "--vni", "--tunnel-port"] {
        assert!(msg.contains(want), "vxlan refusal lacks {want:?}: {msg}");
    }
    assert_eq!(
        ns.ip(&["-d", "link", "show", "flannel.1"])?,
        flannel_before,
        "the other device was changed"
    );

    // Beside it: vxlan with another VNI shares the port; ebpf takes another
    // port (and, as a mode switch does, removes podmesh-vx).
    let up = |dev: &str| -> anyhow::Result<()> {
        let shown = ns.ip(&["link", "show", dev])?;
        assert!(shown.contains(",UP"), "{dev} is not up: {shown}");
        Ok(())
    };
    let _vx = from_config(&config(DatapathMode::Vxlan, 8472, 2))?;
    up("podmesh-vx")?;
    up("flannel.1")?;
    let _ebpf = from_config(&config(DatapathMode::Ebpf, 8473, 1))?;
    up("podmesh0")?;
    up("flannel.1")?;
    Ok(())
}

/// Strict reverse-path filtering everywhere (`all=1`): podmesh clears its
/// own tunnel device's mode only (on a device without an address, loose is
/// strict too), reports the other strict devices,
/// and every pod pair still connects (the CNI's devices route their pods
/// back through themselves).
#[tokio::test]
async fn strict_rp_filter_is_reported_and_only_podmesh_device_cleared() -> anyhow::Result<()> {
    if !require_root("strict_rp_filter_is_reported_and_only_podmesh_device_cleared") {
        return Ok(());
    }
    let mut mesh = Mesh::build(DatapathMode::Ebpf)?;
    let conf = |mesh: &Mesh, i: usize, dev: &str| -> anyhow::Result<String> {
        Ok(mesh.topo.nodes[i]
            .ns
            .run(
                "cat",
                &[&format!("/proc/sys/net/ipv4/conf/{dev}/rp_filter")],
            )?
            .trim()
            .to_string())
    };
    for n in &mesh.topo.nodes {
        n.ns.sysctl("net.ipv4.conf.all.rp_filter", "1")?;
        n.ns.sysctl("net.ipv4.conf.podmesh0.rp_filter", "1")?;
    }
    let eth0_before = conf(&mesh, 0, "eth0")?;
    mesh.resync_all().await?;
    for i in 0..mesh.dps.len() {
        assert_eq!(
            conf(&mesh, i, "podmesh0")?,
            "0",
            "podmesh0 of node {i} keeps a mode of its own"
        );
        assert_eq!(
            conf(&mesh, i, "all")?,
            "1",
            "podmesh changed net.ipv4.conf.all"
        );
        let strict = mesh.dps[i].rp_filter_strict().lock().expect("lock").clone();
        assert!(
            strict.contains(&"eth0".to_string()) && !strict.contains(&"podmesh0".to_string()),
            "node {i} reports {strict:?}"
        );
    }
    assert_eq!(
        conf(&mesh, 0, "eth0")?,
        eth0_before,
        "podmesh changed eth0's rp_filter"
    );
    let failed = mesh.cross_cluster_failures(None);
    assert!(
        failed.is_empty(),
        "unreachable with strict rp_filter: {failed:#?}"
    );
    // Without the exemption on east-n0 its pods reach the other cluster
    // masqueraded, from its underlay address, which is routed back through
    // eth0, not podmesh0: with `all` off, podmesh0's own 0 lets them in (a 2
    // there would drop them, as strict, on a device without an address).
    for n in &mesh.topo.nodes {
        n.ns.sysctl("net.ipv4.conf.all.rp_filter", "0")?;
    }
    mesh.topo.nodes[0]
        .ns
        .run("nft", &["delete", "table", "inet", "podmesh"])?;
    let failed = mesh.cross_cluster_failures(None);
    assert!(
        failed.is_empty(),
        "unreachable when masqueraded: {failed:#?}"
    );
    Ok(())
}

/// vxlan over an IPv4 underlay carries IPv6 Pod CIDRs too: Linux routes IPv6
/// through no IPv4 gateway, so their nexthops are the remote VTEPs'
/// link-local addresses, whose fdb entries send to the nodes' IPv4
/// addresses. direct mode cannot, and says so.
#[tokio::test]
async fn vxlan_mode_forwards_ipv6_pod_cidrs_over_an_ipv4_underlay() -> anyhow::Result<()> {
    use std::net::IpAddr;

    use podmesh_agent::datapath::{Datapath, RemoteRoute};

    if !require_root("vxlan_mode_forwards_ipv6_pod_cidrs_over_an_ipv4_underlay") {
        return Ok(());
    }
    for mode in [DatapathMode::Vxlan, DatapathMode::Direct] {
        let mut mesh = Mesh::build_dual_stack(mode)?;
        mesh.resync_all().await?;
        let pod_v6 = pod_v6_addresses(&mesh);
        for i in 0..mesh.dps.len() {
            let me = mesh.topo.nodes[i].cluster.clone();
            let mut routes = mesh.desired(i);
            let mut v6 = Vec::new();
            for (j, n) in mesh.topo.nodes.iter().enumerate() {
                if n.cluster != me {
                    v6.push(RemoteRoute {
                        cidr: ipnet::IpNet::V6(n.pod_cidr_v6.expect("dual-stack node")),
                        cluster: n.cluster.clone(),
                        node: n.name.clone(),
                        node_addr: IpAddr::V4(n.addr),
                        vtep_mac: mesh.dps[j].vtep_mac(),
                        wireguard_key: None,
                    });
                }
            }
            routes.extend(v6.iter().cloned());
            let res = mesh.dps[i].upsert(&routes).await;
            if mode == DatapathMode::Direct {
                let e = res.expect_err("direct refuses IPv6 Pod CIDRs behind IPv4 next hops");
                assert!(
                    e.to_string()
                        .contains("cannot route an IPv6 Pod CIDR through an IPv4 next hop"),
                    "unclear refusal: {e}"
                );
                let shown = mesh.ip(i, &["-6", "route", "show", "proto", "80"])?;
                assert!(
                    shown.trim().is_empty(),
                    "refused IPv6 routes installed: {shown}"
                );
                let v4 = mesh.ip(i, &["route", "show", "proto", "80"])?;
                assert!(
                    !v4.trim().is_empty(),
                    "the IPv4 routes beside them went too"
                );
                continue;
            }
            res?;
            let mut installed = mesh.dps[i].installed().await?;
            installed.sort();
            routes.sort();
            assert_eq!(installed, routes, "node {i} reads back what it installed");
        }
        if mode == DatapathMode::Direct {
            continue;
        }
        let route = mesh.ip(0, &["-6", "route", "show", "proto", "80"])?;
        assert!(
            route.contains("podmesh-vx") && route.contains("mtu 1450"),
            "IPv6 routes: {route}"
        );
        let failed = ipv6_cross_cluster_failures(&mesh, &pod_v6);
        assert!(
            failed.is_empty(),
            "IPv6 unreachable over vxlan: {failed:#?}"
        );
        // IPv4 still answers beside it, through the IPv4 nexthops.
        let f = mesh.cross_cluster_failures(None);
        assert!(f.is_empty(), "IPv4 unreachable beside IPv6: {f:#?}");
        // Withdrawing the IPv6 routes leaves the IPv4 ones and their fdb.
        let v6: Vec<ipnet::IpNet> = mesh
            .topo
            .nodes
            .iter()
            .filter(|n| n.cluster != mesh.topo.nodes[0].cluster)
            .map(|n| ipnet::IpNet::V6(n.pod_cidr_v6.unwrap()))
            .collect();
        mesh.dps[0].delete(&v6).await?;
        assert!(
            mesh.ip(0, &["-6", "route", "show", "proto", "80"])?
                .trim()
                .is_empty(),
            "IPv6 routes left"
        );
        let f = mesh.cross_cluster_failures(None);
        assert!(
            f.is_empty(),
            "IPv4 unreachable after the IPv6 withdrawal: {f:#?}"
        );
    }
    Ok(())
}
