//! Unit tests of the desired state and the diff.
use super::{
    oracle::{Desired, desired, diff},
    *,
};

fn local() -> LocalRanges {
    LocalRanges {
        cluster: "home".into(),
        cluster_id: 9,
        pod: vec!["10.9.0.0/16".parse().unwrap()],
        service: vec!["10.96.0.0/12".parse().unwrap()],
        node: vec!["192.168.9.1/32".parse().unwrap()],
        underlay: Default::default(),
    }
}

fn cluster_json(name: &str, id: u32, pods: &[&str]) -> String {
    serde_json::json!({"name": name, "id": id, "podCIDRs": pods, "serviceCIDRs": []}).to_string()
}

fn node_json(cluster: &str, id: u32, node: &str, addr: &str, pods: &[&str]) -> String {
    serde_json::json!({"name": node, "cluster": cluster, "clusterID": id, "addresses": [addr], "podCIDRs": pods})
        .to_string()
}

#[derive(Default)]
struct Mesh(BTreeMap<String, RemoteEntries>);

impl Mesh {
    fn put(&mut self, remote: &str, key: &str, value: &str, rev: i64) -> &mut Self {
        let e = self.0.entry(remote.to_string()).or_default();
        e.synced_once = true;
        e.entries.insert(
            key.to_string(),
            decode::decode(remote, key, value.as_bytes(), rev, rev),
        );
        self
    }
    fn cluster(&mut self, name: &str, id: u32, pods: &[&str]) -> &mut Self {
        self.put(name, &cluster_key(name), &cluster_json(name, id, pods), 1)
    }
    fn node(&mut self, c: &str, id: u32, n: &str, pods: &[&str], rev: i64) -> &mut Self {
        let v = node_json(c, id, n, "192.168.1.10", pods);
        self.put(c, &crate::model::node_key(c, n), &v, rev)
    }
}

fn state_of<'a>(d: &'a Desired, key: &str) -> &'a RecordState {
    &d.records
        .iter()
        .find(|r| r.key == key)
        .unwrap_or_else(|| panic!("no record {key}"))
        .state
}

fn code_of(d: &Desired, key: &str) -> String {
    match state_of(d, key) {
        RecordState::Rejected(r) => r.code.clone(),
        RecordState::Programmed => "programmed".into(),
    }
}

#[test]
fn two_clusters_programmed() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "e1", &["10.1.1.0/24"], 2)
        .cluster("west", 2, &["10.2.0.0/16"])
        .node("west", 2, "w1", &["10.2.1.0/24", "10.2.2.0/24"], 2);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(d.routes.len(), 3);
    assert_eq!(d.routes[&"10.2.2.0/24".parse().unwrap()].node, "w1");
    assert_eq!(d.rejected().count(), 0);
}

#[test]
fn unsynced_cluster_is_not_considered() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "e1", &["10.1.1.0/24"], 2);
    m.0.get_mut("east").unwrap().synced_once = false;
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert!(d.routes.is_empty());
}

#[test]
fn bad_record_corpus_is_rejected_with_reasons() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .put("east", "podmesh/v1/nodes/east/json", "{not json", 2)
        .put(
            "east",
            "podmesh/v1/nodes/east/mismatch",
            &node_json("east", 1, "other", "192.168.1.1", &["10.1.3.0/24"]),
            2,
        )
        .node("east", 1, "outside", &["10.5.0.0/24"], 2)
        .node("east", 1, "default", &["0.0.0.0/0"], 2)
        .node("east", 1, "reserved", &["127.0.0.0/24"], 2)
        .node("east", 1, "hostbits", &["10.1.4.1/24"], 2)
        .node("east", 7, "wrongid", &["10.1.5.0/24"], 2)
        .put(
            "east",
            "podmesh/v1/nodes/east/huge",
            &" ".repeat(crate::model::MAX_VALUE_LEN + 1),
            2,
        )
        .put(
            "east",
            "podmesh/v1/nodes/east/noaddr",
            &serde_json::json!({"name":"noaddr","cluster":"east","clusterID":1,"addresses":[],"podCIDRs":["10.1.6.0/24"]}).to_string(),
            2,
        )
        .node("east", 1, "good", &["10.1.1.0/24"], 2);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    let k = |n: &str| format!("podmesh/v1/nodes/east/{n}");
    assert_eq!(code_of(&d, &k("json")), code::RECORD_INVALID_JSON);
    assert_eq!(code_of(&d, &k("mismatch")), vcode::RECORD_KEY_MISMATCH);
    assert_eq!(
        code_of(&d, &k("outside")),
        vcode::NODE_POD_CIDR_OUTSIDE_CLUSTER
    );
    assert_eq!(code_of(&d, &k("default")), vcode::CIDR_DEFAULT_ROUTE);
    assert_eq!(code_of(&d, &k("reserved")), vcode::CIDR_RESERVED);
    assert_eq!(code_of(&d, &k("hostbits")), vcode::CIDR_NOT_CANONICAL);
    assert_eq!(code_of(&d, &k("wrongid")), vcode::RECORD_KEY_MISMATCH);
    assert_eq!(code_of(&d, &k("huge")), code::RECORD_TOO_LARGE);
    assert_eq!(code_of(&d, &k("noaddr")), vcode::NODE_ADDRESS_MISSING);
    assert_eq!(code_of(&d, &k("good")), "programmed");
    assert_eq!(d.routes.len(), 1);
}

#[test]
fn overlap_with_local_rejects_cluster_and_node() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.9.0.0/16"])
        .node("east", 1, "e1", &["10.9.1.0/24"], 2)
        .cluster("west", 2, &["10.96.0.0/16"])
        .cluster("north", 3, &["10.3.0.0/16", "192.168.9.0/24"])
        .cluster("south", 4, &["10.4.0.0/16"])
        .node("south", 4, "s1", &["10.4.1.0/24"], 2);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/east"),
        vcode::POD_CIDR_OVERLAP
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/e1"),
        code::CLUSTER_REJECTED
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/west"),
        vcode::POD_CIDR_OVERLAPS_SERVICE
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/north"),
        vcode::POD_CIDR_OVERLAPS_NODE
    );
    assert_eq!(d.routes.len(), 1);
}

#[test]
fn node_claiming_local_services_or_this_node_is_told_so_before_containment() {
    // The cluster record is fine; its nodes claim ranges outside it, into
    // this cluster's service CIDR and onto this node's address.
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "svc", &["10.96.4.0/24"], 2)
        .node("east", 1, "addr", &["192.168.9.0/24"], 2)
        .node("east", 1, "pods", &["10.9.1.0/24"], 2)
        .node("east", 1, "outside", &["10.5.0.0/24"], 2)
        .node("east", 1, "good", &["10.1.1.0/24"], 2);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    let k = |n: &str| format!("podmesh/v1/nodes/east/{n}");
    assert_eq!(code_of(&d, &k("svc")), vcode::POD_CIDR_OVERLAPS_SERVICE);
    assert_eq!(code_of(&d, &k("addr")), vcode::POD_CIDR_OVERLAPS_NODE);
    assert_eq!(code_of(&d, &k("pods")), vcode::POD_CIDR_OVERLAP);
    assert_eq!(
        code_of(&d, &k("outside")),
        vcode::NODE_POD_CIDR_OUTSIDE_CLUSTER
    );
    assert_eq!(
        d.routes.keys().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.1.1.0/24"]
    );
}

#[test]
fn duplicate_id_and_local_id() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "e1", &["10.1.1.0/24"], 2)
        .cluster("west", 1, &["10.2.0.0/16"])
        .cluster("mine", 9, &["10.3.0.0/16"]);
    // east is programmed already: it keeps its ID, west is the newcomer.
    let programmed = desired(
        &local(),
        &{
            let mut only = Mesh::default();
            only.cluster("east", 1, &["10.1.0.0/16"])
                .node("east", 1, "e1", &["10.1.1.0/24"], 2);
            only.0
        },
        &BTreeMap::new(),
    )
    .routes;
    let d = desired(&local(), &m.0, &programmed);
    assert_eq!(code_of(&d, "podmesh/v1/clusters/east"), "programmed");
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/west"),
        vcode::CLUSTER_ID_DUPLICATE
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/mine"),
        code::LOCAL_CLUSTER_CLAIMED
    );
    // At a cold start neither keeps the duplicate ID.
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(
        code_of(&d, "podmesh/v1/clusters/east"),
        vcode::CLUSTER_ID_DUPLICATE
    );
    assert!(d.routes.is_empty());
}

#[test]
fn within_cluster_higher_create_revision_loses() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "b-old", &["10.1.1.0/24"], 5)
        .node("east", 1, "a-new", &["10.1.1.0/25"], 9);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/b-old"), "programmed");
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/a-new"),
        vcode::POD_CIDR_OVERLAP_SAME_CLUSTER
    );
}

#[test]
fn across_clusters_the_programmed_owner_keeps_traffic() {
    // west is programmed with 10.2.0.0/16; east then declares 10.0.0.0/14.
    let mut m = Mesh::default();
    m.cluster("west", 2, &["10.2.0.0/16"])
        .node("west", 2, "w1", &["10.2.1.0/24"], 3);
    let before = desired(&local(), &m.0, &BTreeMap::new()).routes;
    assert_eq!(before.len(), 1);
    m.cluster("east", 1, &["10.0.0.0/14"])
        .node("east", 1, "e1", &["10.2.1.0/24"], 1)
        .node("east", 1, "e2", &["10.1.0.0/24"], 2);
    let d = desired(&local(), &m.0, &before);
    assert_eq!(code_of(&d, "podmesh/v1/nodes/west/w1"), "programmed");
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/e1"),
        vcode::POD_CIDR_OVERLAP
    );
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/e2"), "programmed");
    assert_eq!(d.routes[&"10.2.1.0/24".parse().unwrap()].cluster, "west");
    // Cold start with both: the doubly declared range goes to neither.
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/west/w1"),
        vcode::POD_CIDR_OVERLAP
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/e1"),
        vcode::POD_CIDR_OVERLAP
    );
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/e2"), "programmed");
}

#[test]
fn diff_upserts_changes_and_deletes_leftovers() {
    let r = |c: &str, n: &str| RemoteRoute {
        cidr: c.parse().unwrap(),
        cluster: "east".into(),
        node: n.into(),
        node_addr: "192.168.1.1".parse().unwrap(),
        vtep_mac: None,
        wireguard_key: None,
    };
    let installed: BTreeMap<_, _> = [r("10.1.1.0/24", "a"), r("10.1.2.0/24", "b")]
        .into_iter()
        .map(|x| (x.cidr, x))
        .collect();
    let want: BTreeMap<_, _> = [
        r("10.1.1.0/24", "a"),
        r("10.1.2.0/24", "c"),
        r("10.1.3.0/24", "d"),
    ]
    .into_iter()
    .map(|x| (x.cidr, x))
    .collect();
    let ops = diff(&installed, &want);
    assert_eq!(ops.upsert.len(), 2);
    assert!(ops.delete.is_empty());
    let ops = diff(&want, &BTreeMap::new());
    assert_eq!(ops.delete.len(), 3);
    assert!(diff(&want, &want).is_empty());
}

#[test]
fn unsynced_cluster_keeps_programmed_routes_and_removed_cluster_loses_them() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"])
        .node("east", 1, "e1", &["10.1.1.0/24"], 2);
    let programmed = desired(&local(), &m.0, &BTreeMap::new()).routes;
    let mut restarted: BTreeMap<String, RemoteEntries> = BTreeMap::new();
    restarted.insert("east".into(), RemoteEntries::default());
    let d = desired(&local(), &restarted, &programmed);
    assert_eq!(d.routes, programmed);
    let d = desired(&local(), &BTreeMap::new(), &programmed);
    assert!(d.routes.is_empty());
}

mod properties {
    //! The record decoder and the desired state on arbitrary input (the
    //! `record_decode` fuzz target runs the same checks under libFuzzer).
    use proptest::prelude::*;

    use super::*;

    fn check(data: &[u8]) {
        let mut m = Mesh::default();
        m.cluster("east", 1, &["10.1.0.0/16", "fd00:1::/56"]);
        for (i, part) in data.split(|b| *b == 0).take(4).enumerate() {
            let (key, value) = match part.iter().position(|b| *b == b'\n') {
                Some(p) => (&part[..p], &part[p + 1..]),
                None => (part, &[][..]),
            };
            let key = String::from_utf8_lossy(key).into_owned();
            let e = decode::decode("east", &key, value, 2 + i as i64, 2 + i as i64);
            if let Decoded::Invalid(r) = &e.decoded {
                assert!(!r.code.is_empty() && !r.message.is_empty());
            }
            m.0.get_mut("east").unwrap().entries.insert(key, e);
        }
        let l = local();
        let d = desired(&l, &m.0, &BTreeMap::new());
        for r in &d.records {
            if let RecordState::Rejected(_) = r.state {
                for c in &r.pod_cidrs {
                    assert!(
                        d.routes
                            .get(c)
                            .is_none_or(|x| Some(&x.node) != r.name.as_ref()),
                        "rejected {} programmed",
                        r.key
                    );
                }
            }
        }
        for (cidr, route) in &d.routes {
            assert!(cidr.prefix_len() > 0, "default route programmed");
            assert_eq!(route.cidr, *cidr);
            assert!(!l.pod.iter().any(|p| overlaps(p, cidr)));
        }
    }

    fn node_like() -> impl Strategy<Value = Vec<u8>> {
        (
            "[a-z0-9]{1,4}",
            0u8..=255,
            0u8..=255,
            0u8..=32,
            prop::option::of("[0-9a-f:]{0,20}"),
        )
            .prop_map(|(n, a, b, len, mac)| {
                let mut v = serde_json::json!({"name": n, "cluster": "east", "clusterID": 1,
                    "addresses": ["192.168.1.1"], "podCIDRs": [format!("10.{a}.{b}.0/{len}")]});
                if let Some(m) = mac {
                    v["vtepMAC"] = m.into();
                }
                format!("podmesh/v1/nodes/east/{n}\n{v}").into_bytes()
            })
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..512)) {
            check(&data);
        }

        #[test]
        fn plausible_nodes_never_program_a_rejected_record(nodes in prop::collection::vec(node_like(), 1..4)) {
            check(&nodes.join(&0u8));
        }
    }
}

#[test]
fn a_remote_node_naming_this_nodes_address_is_rejected() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16"]);
    let v = node_json("east", 1, "e1", "192.168.9.1", &["10.1.1.0/24"]);
    m.put("east", &crate::model::node_key("east", "e1"), &v, 2);
    m.node("east", 1, "e2", &["10.1.2.0/24"], 3);
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/e1"),
        code::NODE_ADDRESS_LOCAL
    );
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/e2"), "programmed");
}

/// This node on an IPv6 underlay, with IPv6 Pod, service and node ranges.
fn local6() -> LocalRanges {
    LocalRanges {
        pod: vec![
            "10.9.0.0/16".parse().unwrap(),
            "fd00:9::/48".parse().unwrap(),
        ],
        service: vec!["fd00:96::/108".parse().unwrap()],
        node: vec![
            "fd10::9/128".parse().unwrap(),
            "192.168.9.1/32".parse().unwrap(),
        ],
        underlay: crate::model::UnderlayFamily::Ipv6,
        ..local()
    }
}

fn node_addrs(c: &str, id: u32, n: &str, addrs: &[&str], pods: &[&str]) -> String {
    serde_json::json!({"name": n, "cluster": c, "clusterID": id, "addresses": addrs,
        "podCIDRs": pods, "vtepMAC": "02:00:00:00:00:01"})
    .to_string()
}

/// Each node tunnels to the remote's address of its own underlay family; a
/// remote without one is rejected with its own code, the others stay.
#[test]
fn tunnel_endpoints_follow_the_underlay_family() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["10.1.0.0/16", "fd00:1::/48"]);
    for (n, addrs, pods) in [
        (
            "dual",
            &["192.168.1.10", "fd10::10"][..],
            &["10.1.1.0/24", "fd00:1:0:1::/64"][..],
        ),
        ("v4only", &["192.168.1.11"][..], &["10.1.2.0/24"][..]),
        ("v6only", &["fd10::12"][..], &["fd00:1:0:3::/64"][..]),
    ] {
        let v = node_addrs("east", 1, n, addrs, pods);
        m.put("east", &crate::model::node_key("east", n), &v, 2);
    }
    let d = desired(&local6(), &m.0, &BTreeMap::new());
    let via = |cidr: &str| d.routes[&cidr.parse().unwrap()].node_addr.to_string();
    assert_eq!(via("10.1.1.0/24"), "fd10::10");
    assert_eq!(via("fd00:1:0:1::/64"), "fd10::10");
    assert_eq!(via("fd00:1:0:3::/64"), "fd10::12");
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/v4only"),
        code::NODE_ADDRESS_FAMILY_MISSING
    );
    let d = desired(&local(), &m.0, &BTreeMap::new());
    assert_eq!(
        d.routes[&"10.1.1.0/24".parse().unwrap()]
            .node_addr
            .to_string(),
        "192.168.1.10"
    );
    assert_eq!(
        code_of(&d, "podmesh/v1/nodes/east/v6only"),
        code::NODE_ADDRESS_FAMILY_MISSING
    );
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/v4only"), "programmed");
}

/// The hijack cases in IPv6: `::/0`, a local IPv6 range, link-local and
/// multicast ranges and endpoints, an address of this node: each rejected,
/// none programmed, the honest node beside them programmed.
#[test]
fn ipv6_hijacks_are_rejected() {
    let mut m = Mesh::default();
    m.cluster("east", 1, &["fd00:1::/48"]);
    let cases = [
        (
            "default",
            &["fd10::1"][..],
            "::/0",
            vcode::CIDR_DEFAULT_ROUTE,
        ),
        (
            "localpod",
            &["fd10::2"][..],
            "fd00:9:0:1::/64",
            vcode::POD_CIDR_OVERLAP,
        ),
        (
            "localsvc",
            &["fd10::3"][..],
            "fd00:96::/112",
            vcode::POD_CIDR_OVERLAPS_SERVICE,
        ),
        (
            "linklocal",
            &["fd10::4"][..],
            "fe80::/64",
            vcode::CIDR_RESERVED,
        ),
        (
            "multicast",
            &["fd10::5"][..],
            "ff02::/64",
            vcode::CIDR_RESERVED,
        ),
        (
            "mynode",
            &["fd10::9"][..],
            "fd00:1:0:6::/64",
            code::NODE_ADDRESS_LOCAL,
        ),
        (
            "mynode4",
            &["fd10::7", "192.168.9.1"][..],
            "fd00:1:0:7::/64",
            code::NODE_ADDRESS_LOCAL,
        ),
        (
            "llendpoint",
            &["fe80::8"][..],
            "fd00:1:0:8::/64",
            code::NODE_ADDRESS_INVALID,
        ),
        (
            "mcendpoint",
            &["ff05::9"][..],
            "fd00:1:0:9::/64",
            code::NODE_ADDRESS_INVALID,
        ),
    ];
    for (n, addrs, pod, _) in cases {
        let v = node_addrs("east", 1, n, addrs, &[pod]);
        m.put("east", &crate::model::node_key("east", n), &v, 2);
    }
    let v = node_addrs("east", 1, "honest", &["fd10::10"], &["fd00:1:0:10::/64"]);
    m.put("east", &crate::model::node_key("east", "honest"), &v, 2);
    let d = desired(&local6(), &m.0, &BTreeMap::new());
    for (n, _, pod, want) in cases {
        assert_eq!(
            code_of(&d, &format!("podmesh/v1/nodes/east/{n}")),
            want,
            "{n}"
        );
        assert!(
            !d.routes.contains_key(&pod.parse().unwrap()),
            "{n} programmed"
        );
    }
    assert_eq!(code_of(&d, "podmesh/v1/nodes/east/honest"), "programmed");
    assert_eq!(d.routes.len(), 1);
}
