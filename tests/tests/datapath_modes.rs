//! Every pod reaches every remote-cluster pod in each datapath mode this
//! kernel supports, also with 1400-byte packets that may not fragment; the
//! ipip mode refuses clearly on a kernel without IPIP.
mod datapath_support;

use datapath_support::{Mesh, podmesh_routes};
use podmesh_agent::{config::DatapathMode, datapath::DatapathError};
use podmesh_tests::{netns::NetNs, require_root};

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
