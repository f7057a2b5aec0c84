//! The incremental desired state against the full recomputation, on random
//! event sequences driven through the real [`MeshCache`].
use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::{
    desired::{MeshCache, decode::decode, oracle::desired},
    model::{cluster_key, node_key},
};

const CLUSTERS: [(&str, u32); 4] = [("a", 1), ("b", 2), ("c", 3), ("d", 1)];
const DECLARED: [&[&str]; 5] = [
    &["10.1.0.0/16"],
    &["10.2.0.0/16"],
    &["10.0.0.0/14"],
    &["10.1.0.0/17", "10.3.0.0/16"],
    &["10.9.0.0/16"],
];
const NODE_CIDRS: [&str; 9] = [
    "10.1.0.0/24",
    "10.1.1.0/24",
    "10.1.0.0/25",
    "10.1.0.0/16",
    "10.2.0.0/24",
    "10.2.0.128/25",
    "10.3.5.0/24",
    "10.9.1.0/24",
    "10.1.0.128/25",
];

fn local() -> LocalRanges {
    locals(0)
}

/// The local ranges as this node changes: 0 as configured; then with a Pod
/// CIDR (1, 2) or a node address (3) from the Node that remotes also claim.
fn locals(i: usize) -> LocalRanges {
    let cidrs = |l: &[&str]| l.iter().map(|c| c.parse().unwrap()).collect::<Vec<IpNet>>();
    let (pod, node) = match i {
        0 => (cidrs(&["10.9.0.0/16"]), cidrs(&["192.168.9.1/32"])),
        1 => (
            cidrs(&["10.9.0.0/16", "10.1.0.0/25"]),
            cidrs(&["192.168.9.1/32"]),
        ),
        2 => (
            cidrs(&["10.9.0.0/16", "10.2.0.0/24"]),
            cidrs(&["192.168.9.2/32"]),
        ),
        _ => (cidrs(&["10.9.0.0/16"]), cidrs(&["10.3.5.7/32"])),
    };
    LocalRanges {
        cluster: "home".into(),
        cluster_id: 9,
        pod,
        service: cidrs(&["10.96.0.0/12"]),
        node,
        underlay: Default::default(),
    }
}

#[derive(Clone, Debug)]
enum Ev {
    Register(usize),
    Sync(usize),
    Remove(usize),
    Cluster(usize, usize, bool),
    Node(usize, usize, Vec<usize>, u8),
    Invalid(usize, usize),
    DeleteNode(usize, usize),
    DeleteCluster(usize),
    /// This node changed: the local ranges become `locals(i)`.
    Local(usize),
}

fn ev() -> impl Strategy<Value = Ev> {
    let c = 0..CLUSTERS.len();
    prop_oneof![
        1 => c.clone().prop_map(Ev::Register),
        2 => c.clone().prop_map(Ev::Sync),
        1 => c.clone().prop_map(Ev::Remove),
        2 => (c.clone(), 0..DECLARED.len(), any::<bool>()).prop_map(|(c, d, i)| Ev::Cluster(c, d, i)),
        8 => (c.clone(), 0..5usize, prop::collection::vec(0..NODE_CIDRS.len(), 1..3), 1u8..4)
            .prop_map(|(c, n, cidrs, a)| Ev::Node(c, n, cidrs, a)),
        1 => (c.clone(), 0..5usize).prop_map(|(c, n)| Ev::Invalid(c, n)),
        3 => (c.clone(), 0..5usize).prop_map(|(c, n)| Ev::DeleteNode(c, n)),
        1 => c.prop_map(Ev::DeleteCluster),
        1 => (0..4usize).prop_map(Ev::Local),
    ]
}

/// The cache as the connections drive it, with etcd's create revisions.
struct Sim {
    cache: MeshCache,
    rev: i64,
    created: BTreeMap<(String, String), i64>,
    local: usize,
}

impl Sim {
    fn put(&mut self, cluster: &str, key: String, value: &str) {
        self.rev += 1;
        let crev = *self
            .created
            .entry((cluster.to_string(), key.clone()))
            .or_insert(self.rev);
        let g = self.cache.begin_list_generation(cluster);
        let e = decode(cluster, &key, value.as_bytes(), crev, self.rev);
        self.cache.put(cluster, g, key, e);
    }

    fn delete(&mut self, cluster: &str, key: &str) {
        self.created.remove(&(cluster.to_string(), key.to_string()));
        self.cache.delete(cluster, key);
    }

    fn apply(&mut self, e: &Ev) {
        match e {
            Ev::Register(c) => self.cache.register(CLUSTERS[*c].0),
            Ev::Sync(c) => self.cache.mark_synced(CLUSTERS[*c].0),
            Ev::Remove(c) => {
                let name = CLUSTERS[*c].0;
                self.created.retain(|(cl, _), _| cl != name);
                self.cache.remove(name);
            }
            Ev::Cluster(c, d, invalid) => {
                let (name, id) = CLUSTERS[*c];
                let v = if *invalid {
                    "{".to_string()
                } else {
                    serde_json::json!({"name": name, "id": id, "podCIDRs": DECLARED[*d], "serviceCIDRs": []})
                        .to_string()
                };
                self.put(name, cluster_key(name), &v);
            }
            Ev::Node(c, n, cidrs, a) => {
                let (name, id) = CLUSTERS[*c];
                let pods: Vec<&str> = cidrs.iter().map(|i| NODE_CIDRS[*i]).collect();
                let v = serde_json::json!({"name": format!("n{n}"), "cluster": name, "clusterID": id,
                    "addresses": [format!("192.168.{c}.{a}")], "podCIDRs": pods});
                self.put(name, node_key(name, &format!("n{n}")), &v.to_string());
            }
            Ev::Invalid(c, n) => {
                let name = CLUSTERS[*c].0;
                self.put(name, node_key(name, &format!("n{n}")), "{\"name\":");
            }
            Ev::DeleteNode(c, n) => {
                let name = CLUSTERS[*c].0;
                self.delete(name, &node_key(name, &format!("n{n}")));
            }
            Ev::DeleteCluster(c) => {
                let name = CLUSTERS[*c].0;
                self.delete(name, &cluster_key(name));
            }
            Ev::Local(i) => {
                self.local = *i;
                self.cache.set_local(locals(*i));
            }
        }
    }
}

impl MeshCache {
    /// The current list generation of `cluster` (registering it if needed).
    fn begin_list_generation(&self, cluster: &str) -> u64 {
        self.register(cluster);
        self.with(|r| r[cluster].generation)
    }
}

fn route(c: &str, n: &str, cidr: &str) -> RemoteRoute {
    RemoteRoute {
        cidr: cidr.parse().unwrap(),
        cluster: c.into(),
        node: n.into(),
        node_addr: "192.168.0.1".parse().unwrap(),
        vtep_mac: None,
        wireguard_key: None,
    }
}

fn run(installed: Vec<RemoteRoute>, batches: &[Vec<Ev>]) {
    let mut sim = Sim {
        cache: MeshCache::new(),
        rev: 0,
        created: BTreeMap::new(),
        local: 0,
    };
    sim.cache.install(Live::new(local(), installed.clone()));
    let mut applied: BTreeMap<IpNet, RemoteRoute> =
        installed.into_iter().map(|r| (r.cidr, r)).collect();
    for batch in batches {
        for e in batch {
            sim.apply(e);
        }
        let step = sim.cache.step().expect("installed");
        let want = sim.cache.with(|r| desired(&locals(sim.local), r, &applied));
        for c in &step.ops.delete {
            applied.remove(c);
        }
        for r in step.ops.upsert {
            applied.insert(r.cidr, r);
        }
        assert_eq!(
            applied, want.routes,
            "delta applied != full routes after {batch:?}"
        );
        let (routes, records, counts) = sim
            .cache
            .with_live(|l, r| {
                let counts: BTreeMap<String, Counts> =
                    r.keys().map(|k| (k.clone(), l.counts(k))).collect();
                (l.routes(r), l.records(r), counts)
            })
            .unwrap();
        assert_eq!(routes, want.routes, "routes after {batch:?}");
        assert_eq!(records, want.records, "records after {batch:?}");
        for (cluster, c) in counts {
            let mut expect = Counts::default();
            for r in want.records.iter().filter(|r| r.cluster == cluster) {
                match &r.state {
                    RecordState::Programmed if r.kind == "node" => expect.nodes_programmed += 1,
                    RecordState::Programmed => {}
                    RecordState::Rejected(j) => {
                        *expect.rejected_by_reason.entry(j.code.clone()).or_default() += 1;
                    }
                }
            }
            assert_eq!(c, expect, "counts of {cluster} after {batch:?}");
        }
        assert_eq!(
            sim.cache.with_live(|l, _| l.route_count()).unwrap(),
            want.routes.len()
        );
    }
}

#[test]
fn owner_goes_away_and_the_quarantined_newcomer_takes_over() {
    // b's node overlaps a's programmed node: quarantined until a's node is deleted.
    let batches = vec![
        vec![
            Ev::Register(0),
            Ev::Cluster(0, 2, false),
            Ev::Node(0, 0, vec![0], 1),
            Ev::Sync(0),
        ],
        vec![
            Ev::Register(1),
            Ev::Cluster(1, 1, false),
            Ev::Node(1, 0, vec![4], 1),
            Ev::Sync(1),
        ],
        vec![Ev::Node(1, 1, vec![0], 2)],
        vec![Ev::Node(0, 1, vec![2], 2)],
        vec![Ev::DeleteNode(0, 0)],
        vec![Ev::DeleteNode(0, 1)],
        vec![Ev::Remove(1)],
    ];
    run(vec![], &batches);
}

#[test]
fn restart_keeps_routes_of_unsynced_clusters() {
    let installed = vec![
        route("a", "n0", "10.1.0.0/24"),
        route("x", "n0", "10.5.0.0/24"),
    ];
    let batches = vec![
        vec![Ev::Register(0)],
        vec![Ev::Cluster(0, 0, false), Ev::Node(0, 1, vec![2], 1)],
        vec![Ev::Node(0, 0, vec![0], 1), Ev::Sync(0)],
        vec![],
    ];
    run(installed, &batches);
}

#[test]
fn cluster_removed_and_configured_again_before_a_step_keeps_its_routes() {
    let batches = vec![
        vec![Ev::Cluster(1, 0, false)],
        vec![Ev::Sync(1), Ev::Node(1, 0, vec![0], 1)],
        vec![Ev::Remove(1), Ev::Node(1, 0, vec![0], 1)],
        vec![Ev::Cluster(1, 0, false), Ev::Sync(1)],
    ];
    run(vec![], &batches);
}

#[test]
fn this_node_taking_a_remote_range_withdraws_it_and_giving_it_back_restores_it() {
    // a's n0 holds 10.1.0.0/24 and n1 10.1.1.0/24; then this node gets
    // 10.1.0.0/25 (Kubernetes re-allocated), then an address inside 10.1.1.0/24.
    let batches = vec![
        vec![
            Ev::Register(0),
            Ev::Cluster(0, 0, false),
            Ev::Node(0, 0, vec![0], 1),
            Ev::Node(0, 1, vec![1], 1),
            Ev::Sync(0),
        ],
        vec![Ev::Local(1)],
        vec![Ev::Local(1)],
        vec![Ev::Local(0)],
        vec![Ev::Local(3), Ev::Node(0, 2, vec![6], 1)],
        vec![Ev::Local(0)],
    ];
    run(vec![], &batches);
}

#[test]
fn local_ranges_change_rejects_and_restores_with_the_right_reasons() {
    use crate::{desired::code, validate::code as vcode};
    let cache = MeshCache::new();
    cache.install(Live::new(local(), vec![]));
    let mut sim = Sim {
        cache,
        rev: 0,
        created: BTreeMap::new(),
        local: 0,
    };
    // a declares 10.1.0.0/16; n0 holds 10.1.0.0/24, n1 claims 10.3.5.0/24 outside it.
    for e in [
        Ev::Register(0),
        Ev::Cluster(0, 0, false),
        Ev::Node(0, 0, vec![0], 1),
        Ev::Node(0, 1, vec![6], 1),
        Ev::Sync(0),
    ] {
        sim.apply(&e);
    }
    let step = sim.cache.step().unwrap();
    assert_eq!(step.ops.upsert.len(), 1);
    let reasons = |step: &Step| -> Vec<(String, String)> {
        step.newly_rejected
            .iter()
            .map(|(_, k, r)| (k.clone(), r.code.clone()))
            .collect()
    };
    let (ck, n0, n1) = (cluster_key("a"), node_key("a", "n0"), node_key("a", "n1"));
    assert_eq!(
        reasons(&step),
        [(n1.clone(), vcode::NODE_POD_CIDR_OUTSIDE_CLUSTER.to_string())]
    );

    // This node gets 10.1.0.0/25 (inside a's declaration): a is rejected
    // and n0's route withdrawn.
    sim.apply(&Ev::Local(1));
    let step = sim.cache.step().unwrap();
    assert_eq!(step.ops.delete, ["10.1.0.0/24".parse::<IpNet>().unwrap()]);
    assert!(step.ops.upsert.is_empty());
    assert_eq!(
        reasons(&step),
        [
            (ck.clone(), vcode::POD_CIDR_OVERLAP.to_string()),
            (n0.clone(), code::CLUSTER_REJECTED.to_string()),
            (n1.clone(), code::CLUSTER_REJECTED.to_string()),
        ]
    );
    // The same ranges again: nothing to do, nothing reported twice.
    assert!(!sim.cache.set_local(locals(1)));
    let step = sim.cache.step().unwrap();
    assert!(step.ops.is_empty() && step.newly_rejected.is_empty());

    // Given back: n0 programmed again, n1 back to its own reason.
    sim.apply(&Ev::Local(0));
    let step = sim.cache.step().unwrap();
    assert_eq!(step.ops.upsert.len(), 1);
    assert_eq!(
        reasons(&step),
        [(n1.clone(), vcode::NODE_POD_CIDR_OUTSIDE_CLUSTER.to_string())]
    );

    // This node's address moves into n1's claim: n1 is told so, n0 stays.
    // (Re-validated records are handed to the datapath again: upserts are idempotent.)
    sim.apply(&Ev::Local(3));
    let step = sim.cache.step().unwrap();
    assert!(step.ops.delete.is_empty(), "{:?}", step.ops);
    assert!(
        step.ops.upsert.iter().all(|r| r.node == "n0"),
        "{:?}",
        step.ops
    );
    assert_eq!(
        reasons(&step),
        [(n1, vcode::POD_CIDR_OVERLAPS_NODE.to_string())]
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn incremental_equals_full_recomputation(
        installed in prop::collection::vec((0..CLUSTERS.len(), 0..5usize, 0..NODE_CIDRS.len()), 0..3),
        batches in prop::collection::vec(prop::collection::vec(ev(), 0..4), 1..25),
    ) {
        let mut routes: BTreeMap<IpNet, RemoteRoute> = BTreeMap::new();
        for (c, n, i) in installed {
            let r = route(CLUSTERS[c].0, &format!("n{n}"), NODE_CIDRS[i]);
            if !routes.keys().any(|k| crate::validate::overlap::overlaps(k, &r.cidr)) {
                routes.insert(r.cidr, r);
            }
        }
        run(routes.into_values().collect(), &batches);
    }
}
