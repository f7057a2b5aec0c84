//! The harness itself: pods ping across the underlay; namespaces vanish on drop, also after a panic.
use podmesh_tests::{
    netns::{self, NetNs},
    require_root,
    topo::{ClusterPlan, Topology},
};

#[test]
fn two_pods_on_two_nodes_ping_across_the_underlay() {
    if !require_root("two_pods_on_two_nodes_ping_across_the_underlay") {
        return;
    }
    let topo = Topology::build(&[ClusterPlan::new("east", "10.1.0.0/16", 2, 2)]).unwrap();
    let (a, b) = (&topo.nodes[0], &topo.nodes[1]);
    assert_ne!(a.pod_cidr, b.pod_cidr);
    let from = &a.pods[0];
    let to = &b.pods[1];
    assert!(
        from.ns.ping(&to.addr.to_string(), 3, None),
        "{} ({}) cannot ping {} ({}) across the underlay",
        from.name,
        from.addr,
        to.name,
        to.addr
    );
    // And the reverse direction, with a large packet that must not fragment.
    assert!(to.ns.ping(&from.addr.to_string(), 2, Some(1400)));
    // A pod of a cluster that does not exist is not reachable: the test can fail.
    assert!(!from.ns.ping("10.9.0.10", 1, None));
}

#[test]
fn namespaces_are_removed_on_drop_even_after_a_panic() {
    if !require_root("namespaces_are_removed_on_drop_even_after_a_panic") {
        return;
    }
    let name = std::sync::Mutex::new(String::new());
    let r = std::panic::catch_unwind(|| {
        let ns = NetNs::new("panics").unwrap();
        *name.lock().unwrap() = ns.name().to_string();
        assert!(netns::exists(ns.name()));
        panic!("test body fails");
    });
    assert!(r.is_err());
    let name = name.into_inner().unwrap();
    assert!(!name.is_empty());
    assert!(!netns::exists(&name), "{name} survived the panic");
}
