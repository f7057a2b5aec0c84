//! The local ranges follow this node: from the flags, or from the Kubernetes
//! Node (through a tower-test mock of the API) as it changes.
use std::collections::BTreeMap;

use http::{Request, Response};
use kube::{Client, client::Body};
use tower_test::mock;

use super::*;
use crate::{
    config,
    datapath::memory::MemoryDatapath,
    desired::{RecordState, decode::decode},
    k8s::tests::{node_at, watch_line},
    model::{cluster_key, node_key},
    validate::code as vcode,
};

fn net(s: &str) -> IpNet {
    s.parse().unwrap()
}

/// Cluster "home" without --node-ip/--pod-cidr: the Node comes from Kubernetes.
const KUBERNETES_FLAGS: &[&str] = &[
    "podmesh-agent",
    "--cluster-name",
    "home",
    "--cluster-id",
    "9",
    "--node-name",
    "n1",
    "--service-cidr",
    "10.96.0.0/12",
];

fn kubernetes_config() -> AgentConfig {
    config::load_from(KUBERNETES_FLAGS.iter().copied()).unwrap()
}

#[test]
fn the_node_from_kubernetes_is_local_once_known() {
    let mut args = KUBERNETES_FLAGS.to_vec();
    args.extend(["--cluster-pod-cidr", "10.9.0.0/16"]);
    let cfg = config::load_from(args.clone()).unwrap();
    assert_eq!(
        cfg.node_source,
        NodeSource::Kubernetes { addresses: vec![] }
    );
    let before = local_ranges(&cfg, None);
    assert_eq!(before.pod, [net("10.9.0.0/16")]);
    assert!(before.node.is_empty());
    assert_eq!(before.service, [net("10.96.0.0/12")]);

    let node = LocalNode {
        addresses: vec![
            "192.168.9.1".parse().unwrap(),
            "203.0.113.5".parse().unwrap(),
        ],
        pod_cidrs: vec![net("10.9.1.0/24"), net("fd00:9::/64")],
        vtep_mac: None,
    };
    let known = local_ranges(&cfg, Some(&node));
    assert_eq!(
        known.pod,
        [net("10.9.0.0/16"), net("10.9.1.0/24"), net("fd00:9::/64")]
    );
    assert_eq!(known.node, [net("192.168.9.1/32"), net("203.0.113.5/32")]);

    // From flags: the same ranges whether or not the node was reported yet.
    args.extend(["--node-ip", "192.168.9.1", "--pod-cidr", "10.9.1.0/24"]);
    let cfg = config::load_from(args).unwrap();
    let node = LocalNode {
        addresses: vec!["192.168.9.1".parse().unwrap()],
        pod_cidrs: vec![net("10.9.1.0/24")],
        vtep_mac: None,
    };
    assert_eq!(local_ranges(&cfg, None), local_ranges(&cfg, Some(&node)));
    assert_eq!(
        local_ranges(&cfg, None).node,
        [net("192.168.9.1/32")],
        "the flag's address"
    );
}

fn respond(v: &serde_json::Value) -> Response<Body> {
    Response::builder().body(watch_line(v)).unwrap()
}

/// Two synced remotes: east (10.1.0.0/16: e1, e2) and west (10.2.0.0/16:
/// w1, and wx claiming 192.168.9.0/24 outside its cluster's range).
fn remotes() -> MeshCache {
    let cache = MeshCache::new();
    let generation: BTreeMap<&str, u64> = ["east", "west"]
        .into_iter()
        .map(|c| (c, cache.begin_list(c)))
        .collect();
    let mut rev = 0;
    let mut put = |cluster: &str, key: String, value: serde_json::Value| {
        rev += 1;
        let e = decode(cluster, &key, value.to_string().as_bytes(), rev, rev);
        cache.put(cluster, generation[cluster], key, e);
    };
    for (c, id, declared, nodes) in [
        (
            "east",
            1,
            "10.1.0.0/16",
            vec![("e1", "10.1.1.0/24"), ("e2", "10.1.2.0/24")],
        ),
        (
            "west",
            2,
            "10.2.0.0/16",
            vec![("w1", "10.2.1.0/24"), ("wx", "192.168.9.0/24")],
        ),
    ] {
        put(
            c,
            cluster_key(c),
            serde_json::json!({"name": c, "id": id, "podCIDRs": [declared], "serviceCIDRs": []}),
        );
        for (i, (n, pod)) in nodes.into_iter().enumerate() {
            put(
                c,
                node_key(c, n),
                serde_json::json!({"name": n, "cluster": c, "clusterID": id,
                    "addresses": [format!("192.168.{id}.{}", i + 1)], "podCIDRs": [pod]}),
            );
        }
    }
    for (c, g) in generation {
        cache.prune_stale(c, g);
    }
    cache
}

/// key -> "programmed" or the rejection code.
fn outcomes(cache: &MeshCache) -> BTreeMap<String, String> {
    cache
        .with_live(|l, r| l.records(r))
        .unwrap_or_default()
        .into_iter()
        .map(|o| {
            let s = match o.state {
                RecordState::Programmed => "programmed".to_string(),
                RecordState::Rejected(j) => j.code,
            };
            (o.key, s)
        })
        .collect()
}

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..500 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("not true after 5 s: {what}");
}

fn routes(dp: &MemoryDatapath) -> Vec<String> {
    dp.snapshot().keys().map(ToString::to_string).collect()
}

#[tokio::test]
async fn remote_records_are_validated_against_the_node_as_kubernetes_reports_it() {
    let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
    let (change_tx, change) = tokio::sync::oneshot::channel::<()>();
    let (done_tx, done) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // The watcher's LIST: this node has 10.9.1.0/24 and 192.168.9.1.
        let (_, send) = handle.next_request().await.unwrap();
        send.send_response(respond(&serde_json::json!({
            "apiVersion": "v1", "kind": "NodeList",
            "metadata": {"resourceVersion": "7"},
            "items": [node_at("10.9.1.0/24", "192.168.9.1", "7")]
        })));
        // Its WATCH: the node's Pod CIDR becomes 10.1.2.0/24.
        let (_, send) = handle.next_request().await.unwrap();
        change.await.unwrap();
        send.send_response(respond(&serde_json::json!({
            "type": "MODIFIED",
            "object": node_at("10.1.2.0/24", "192.168.9.1", "8")
        })));
        done.await.unwrap();
        handle
    });

    // The agent's wiring, as `start_with` does it, over the mock.
    let cfg = kubernetes_config();
    let (node_tx, node_rx) = watch::channel(None::<LocalNode>);
    let follower = tokio::spawn(k8s::follow_node(
        k8s::KubeNodes::new(Client::new(svc, "default")),
        "n1".into(),
        None,
        node_tx,
    ));
    let (local_tx, local_rx) = watch::channel(local_ranges(&cfg, None));
    let ranges = tokio::spawn(follow_local_ranges(cfg, node_rx, local_tx));
    let cache = remotes();
    let dp = MemoryDatapath::new();
    let status = Status::new("home", "n1");
    let initial = local_rx.borrow().clone();
    let reconciler =
        Reconciler::new(dp.clone(), initial, cache.clone(), status.clone()).follow_local(local_rx);
    let rec = tokio::spawn(reconciler.run(Duration::from_secs(3600)));

    // The Node's address is local: wx, claiming it, is told so.
    let wx = node_key("west", "wx");
    wait_for("wx rejected for this node's address", || {
        outcomes(&cache).get(&wx).map(String::as_str) == Some(vcode::POD_CIDR_OVERLAPS_NODE)
    })
    .await;
    assert_eq!(routes(&dp), ["10.1.1.0/24", "10.1.2.0/24", "10.2.1.0/24"]);

    // The Node changes to a Pod CIDR inside east's: east is withdrawn and
    // reported, west stays.
    change_tx.send(()).unwrap();
    wait_for("east withdrawn", || routes(&dp) == ["10.2.1.0/24"]).await;
    let o = outcomes(&cache);
    assert_eq!(o[&cluster_key("east")], vcode::POD_CIDR_OVERLAP);
    assert_eq!(
        o[&node_key("east", "e2")],
        crate::desired::code::CLUSTER_REJECTED
    );
    assert_eq!(o[&node_key("west", "w1")], "programmed");
    let s = status.snapshot();
    assert_eq!(
        s.rejections_total["east"].get(vcode::POD_CIDR_OVERLAP),
        Some(&1),
        "{:?}",
        s.rejections_total
    );
    for t in [follower, ranges, rec] {
        t.abort();
    }
    done_tx.send(()).unwrap();
    let _handle = server.await.unwrap();
}
