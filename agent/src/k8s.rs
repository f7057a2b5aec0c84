//! This node's address and Pod CIDRs from the Kubernetes Node object
//! (`status.addresses` InternalIP, `spec.podCIDRs`), behind a narrow trait;
//! a watch keeps them current.
use std::{future::Future, net::IpAddr, pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::watch;

use crate::{publish::LocalNode, remote::backoff::Backoff};

/// A Kubernetes failure, or a Node that does not (yet) say what the agent needs.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// No in-cluster or kubeconfig credentials.
    #[error(
        "kubernetes client: {0} (run in a Pod with a service account, or give --node-ip and --pod-cidr)"
    )]
    Client(String),
    /// The API call failed.
    #[error("{op} node {node}: {message}")]
    Api {
        /// What was attempted.
        op: &'static str,
        /// The node.
        node: String,
        /// The API's message.
        message: String,
    },
    /// The Node lacks something.
    #[error("node {node}: {message}")]
    Incomplete {
        /// The node.
        node: String,
        /// What is missing and what to do.
        message: String,
    },
}

/// The stream of a Node's versions.
pub type NodeStream = Pin<Box<dyn Stream<Item = Result<Node, K8sError>> + Send>>;

/// What the agent needs from the Kubernetes API.
pub trait NodeApi: Send + Sync + 'static {
    /// The Node named `name`, now.
    fn get(&self, name: &str) -> impl Future<Output = Result<Node, K8sError>> + Send;
    /// Every new version of the Node named `name`.
    fn watch(&self, name: &str) -> NodeStream;
}

/// [`NodeApi`] on a kube-rs client.
#[derive(Clone)]
pub struct KubeNodes {
    api: Api<Node>,
}

impl std::fmt::Debug for KubeNodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubeNodes")
    }
}

impl KubeNodes {
    /// Over this client (tests pass a tower-test mock).
    pub fn new(client: Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }

    /// From the in-cluster service account or the kubeconfig.
    pub async fn from_env() -> Result<Self, K8sError> {
        Client::try_default()
            .await
            .map(Self::new)
            .map_err(|e| K8sError::Client(e.to_string()))
    }
}

impl NodeApi for KubeNodes {
    async fn get(&self, name: &str) -> Result<Node, K8sError> {
        self.api.get(name).await.map_err(|e| K8sError::Api {
            op: "get",
            node: name.to_string(),
            message: e.to_string(),
        })
    }

    fn watch(&self, name: &str) -> NodeStream {
        let node = name.to_string();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        watcher(self.api.clone(), cfg)
            .default_backoff()
            .filter_map(move |ev| {
                let node = node.clone();
                async move {
                    match ev {
                        Ok(watcher::Event::Apply(n) | watcher::Event::InitApply(n)) => Some(Ok(n)),
                        Ok(_) => None,
                        Err(e) => Some(Err(K8sError::Api {
                            op: "watch",
                            node,
                            message: e.to_string(),
                        })),
                    }
                }
            })
            .boxed()
    }
}

/// The tunnel endpoint (InternalIP first) and Pod CIDRs of `node`.
pub fn node_addresses(node: &Node) -> Result<(Vec<IpAddr>, Vec<IpNet>), K8sError> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let incomplete = |message: &str| K8sError::Incomplete {
        node: name.clone(),
        message: message.to_string(),
    };
    let mut addrs: Vec<(u8, IpAddr)> = node
        .status
        .as_ref()
        .and_then(|s| s.addresses.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|a| {
            let rank = match a.type_.as_str() {
                "InternalIP" => 0,
                "ExternalIP" => 1,
                _ => return None,
            };
            a.address.parse().ok().map(|ip| (rank, ip))
        })
        .collect();
    addrs.sort_by_key(|(r, _)| *r);
    if addrs.first().is_none_or(|(r, _)| *r != 0) {
        return Err(incomplete(
            "status.addresses has no InternalIP; give --node-ip, or fix the kubelet's --node-ip",
        ));
    }
    let spec = node.spec.as_ref();
    let mut cidrs: Vec<String> = spec.and_then(|s| s.pod_cidrs.clone()).unwrap_or_default();
    if cidrs.is_empty()
        && let Some(c) = spec.and_then(|s| s.pod_cidr.clone())
    {
        cidrs.push(c);
    }
    if cidrs.is_empty() {
        return Err(incomplete(
            "spec.podCIDRs is empty; enable node CIDR allocation (kube-controller-manager --allocate-node-cidrs) or give --pod-cidr",
        ));
    }
    let pods = cidrs
        .iter()
        .map(|c| {
            c.parse::<IpNet>()
                .map_err(|_| incomplete(&format!("spec.podCIDRs has {c:?}, not a CIDR")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((addrs.into_iter().map(|(_, a)| a).collect(), pods))
}

/// Follows the Node named `name` and sends its [`LocalNode`] on every change, forever.
pub async fn follow_node<A: NodeApi>(
    api: A,
    name: String,
    vtep_mac: Option<String>,
    tx: watch::Sender<Option<LocalNode>>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut warned = None::<String>;
    loop {
        let mut stream = api.watch(&name);
        while let Some(item) = stream.next().await {
            let local = item
                .and_then(|n| node_addresses(&n))
                .map(|(a, p)| LocalNode {
                    addresses: a,
                    pod_cidrs: p,
                    vtep_mac: vtep_mac.clone(),
                });
            match local {
                Ok(l) => {
                    backoff.reset();
                    warned = None;
                    tx.send_if_modified(|cur| {
                        let changed = cur.as_ref() != Some(&l);
                        *cur = Some(l);
                        changed
                    });
                }
                Err(e) => {
                    let msg = e.to_string();
                    if warned.as_deref() != Some(msg.as_str()) {
                        tracing::warn!(error = %msg, "cannot take this node's address and Pod CIDRs from Kubernetes yet");
                        warned = Some(msg);
                    }
                }
            }
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;

    fn node_json(pod: &str) -> serde_json::Value {
        serde_json::json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "resourceVersion": "7"},
            "spec": {"podCIDR": pod, "podCIDRs": [pod]},
            "status": {"addresses": [
                {"type": "Hostname", "address": "n1"},
                {"type": "ExternalIP", "address": "203.0.113.5"},
                {"type": "InternalIP", "address": "192.168.1.10"}
            ]}
        })
    }

    #[test]
    fn extraction_prefers_internal_ip_and_requires_pod_cidrs() {
        let n: Node = serde_json::from_value(node_json("10.1.1.0/24")).unwrap();
        let (a, p) = node_addresses(&n).unwrap();
        assert_eq!(a[0], "192.168.1.10".parse::<IpAddr>().unwrap());
        assert_eq!(p, vec!["10.1.1.0/24".parse::<IpNet>().unwrap()]);
        let mut bare = n.clone();
        bare.spec = None;
        assert!(
            node_addresses(&bare)
                .unwrap_err()
                .to_string()
                .contains("podCIDRs")
        );
    }

    #[tokio::test]
    async fn get_and_watch_through_the_api() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = KubeNodes::new(Client::new(svc, "default"));
        let (first_tx, seen_first) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // GET for `get`.
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.uri().path(), "/api/v1/nodes/n1");
            send.send_response(
                Response::builder()
                    .body(Body::from(
                        serde_json::to_vec(&node_json("10.1.1.0/24")).unwrap(),
                    ))
                    .unwrap(),
            );
            // LIST of the watcher, by field selector.
            let (req, send) = handle.next_request().await.unwrap();
            assert!(
                req.uri()
                    .query()
                    .unwrap()
                    .contains("fieldSelector=metadata.name%3Dn1")
            );
            let list = serde_json::json!({
                "apiVersion": "v1", "kind": "NodeList",
                "metadata": {"resourceVersion": "7"},
                "items": [node_json("10.1.1.0/24")]
            });
            send.send_response(
                Response::builder()
                    .body(Body::from(serde_json::to_vec(&list).unwrap()))
                    .unwrap(),
            );
            // WATCH: the node's Pod CIDR changes.
            let (req, send) = handle.next_request().await.unwrap();
            assert!(req.uri().query().unwrap().contains("watch=true"));
            seen_first.await.unwrap();
            let mut changed = node_json("10.1.2.0/24");
            changed["metadata"]["resourceVersion"] = "8".into();
            let ev = serde_json::json!({"type": "MODIFIED", "object": changed});
            let mut body = serde_json::to_vec(&ev).unwrap();
            body.push(b'\n');
            send.send_response(Response::builder().body(Body::from(body)).unwrap());
            handle
        });
        let n = api.get("n1").await.unwrap();
        assert_eq!(node_addresses(&n).unwrap().1.len(), 1);
        let (tx, mut rx) = watch::channel(None);
        let follower = tokio::spawn(follow_node(api, "n1".into(), None, tx));
        rx.wait_for(|n| {
            n.as_ref()
                .is_some_and(|n| n.pod_cidrs == vec!["10.1.1.0/24".parse::<IpNet>().unwrap()])
        })
        .await
        .unwrap();
        first_tx.send(()).unwrap();
        rx.wait_for(|n| {
            n.as_ref()
                .is_some_and(|n| n.pod_cidrs == vec!["10.1.2.0/24".parse::<IpNet>().unwrap()])
        })
        .await
        .unwrap();
        follower.abort();
        let _handle = server.await.unwrap();
    }

    /// One line of a watch response body (a list's whole body, too).
    pub(crate) fn watch_line(ev: &serde_json::Value) -> Body {
        let mut body = serde_json::to_vec(ev).unwrap();
        body.push(b'\n');
        Body::from(body)
    }

    /// The node of `node_json` at `rv`, with InternalIP `ip`.
    pub(crate) fn node_at(pod: &str, ip: &str, rv: &str) -> serde_json::Value {
        let mut n = node_json(pod);
        n["metadata"]["resourceVersion"] = rv.into();
        n["status"]["addresses"][2]["address"] = ip.into();
        n
    }

    fn is_watch(req: &Request<Body>) -> bool {
        req.uri().query().unwrap_or("").contains("watch=true")
    }

    /// The Node watch breaks three ways (its stream ends, the API answers it
    /// with 500, then with a 410 Gone event); the follower re-watches, backs
    /// off, re-lists, and still delivers the InternalIP of the new list and
    /// the Pod CIDR of a later MODIFIED event.
    #[tokio::test(start_paused = true)]
    async fn node_watch_recovers_after_it_ends_and_fails() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = KubeNodes::new(Client::new(svc, "default"));
        let (tx, mut rx) = watch::channel(None);
        let follower = tokio::spawn(follow_node(api, "n1".into(), None, tx));
        // Every request must come, also after a backoff (paused time jumps
        // over it; a follower that stops asking fails here, not by hanging).
        let mut next = async move || {
            tokio::time::timeout(Duration::from_secs(600), handle.next_request())
                .await
                .expect("the follower sent no further request")
                .expect("the client is gone")
        };
        let list = |n: serde_json::Value, rv: &str| {
            let l = serde_json::json!({
                "apiVersion": "v1", "kind": "NodeList",
                "metadata": {"resourceVersion": rv}, "items": [n]
            });
            Response::builder()
                .body(Body::from(serde_json::to_vec(&l).unwrap()))
                .unwrap()
        };
        let pods = |c: &str| vec![c.parse::<IpNet>().unwrap()];
        let ip = |a: &str| a.parse::<IpAddr>().unwrap();

        let (req, send) = next().await;
        assert!(!is_watch(&req), "a list first: {}", req.uri());
        send.send_response(list(node_at("10.1.1.0/24", "192.168.1.10", "7"), "7"));
        rx.wait_for(|n| {
            n.as_ref()
                .is_some_and(|n| n.pod_cidrs == pods("10.1.1.0/24"))
        })
        .await
        .unwrap();

        // 1. The watch's stream ends without an event: watched again from
        //    the same resource version.
        let (req, send) = next().await;
        assert!(is_watch(&req), "{}", req.uri());
        assert!(req.uri().query().unwrap().contains("resourceVersion=7"));
        send.send_response(Response::builder().body(Body::empty()).unwrap());

        // 2. The API refuses the watch: retried after a backoff.
        let (req, send) = next().await;
        assert!(is_watch(&req), "{}", req.uri());
        let refused_at = tokio::time::Instant::now();
        let status = serde_json::json!({
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "etcdserver: leader changed", "reason": "InternalError", "code": 500
        });
        send.send_response(
            Response::builder()
                .status(500)
                .body(Body::from(serde_json::to_vec(&status).unwrap()))
                .unwrap(),
        );

        // 3. The watch starts, then reports its resource version expired.
        let (req, send) = next().await;
        assert!(is_watch(&req), "{}", req.uri());
        assert!(
            refused_at.elapsed() >= Duration::from_millis(100),
            "a refused watch is retried after a backoff, not at once ({:?})",
            refused_at.elapsed()
        );
        let gone = serde_json::json!({"type": "ERROR", "object": {
            "apiVersion": "v1", "kind": "Status", "status": "Failure",
            "message": "too old resource version: 7 (12)", "reason": "Expired", "code": 410
        }});
        send.send_response(Response::builder().body(watch_line(&gone)).unwrap());

        // Listed again: the node's InternalIP changed in the meantime.
        let (req, send) = next().await;
        assert!(!is_watch(&req), "410 Gone: a new list: {}", req.uri());
        send.send_response(list(node_at("10.1.1.0/24", "192.168.1.20", "12"), "12"));
        rx.wait_for(|n| {
            n.as_ref()
                .is_some_and(|n| n.addresses.first() == Some(&ip("192.168.1.20")))
        })
        .await
        .unwrap();

        // The new watch delivers a later change of the Pod CIDRs.
        let (req, send) = next().await;
        assert!(is_watch(&req), "{}", req.uri());
        assert!(req.uri().query().unwrap().contains("resourceVersion=12"));
        let ev = serde_json::json!({"type": "MODIFIED",
            "object": node_at("10.1.2.0/24", "192.168.1.20", "13")});
        send.send_response(Response::builder().body(watch_line(&ev)).unwrap());
        let got = rx
            .wait_for(|n| {
                n.as_ref()
                    .is_some_and(|n| n.pod_cidrs == pods("10.1.2.0/24"))
            })
            .await
            .unwrap()
            .clone()
            .unwrap();
        assert_eq!(got.addresses[0], ip("192.168.1.20"));
        follower.abort();
    }
}
