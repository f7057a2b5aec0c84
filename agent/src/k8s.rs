//! This node's address and Pod CIDRs from the Kubernetes Node object
//! (`status.addresses` InternalIP, `spec.podCIDRs`), behind a narrow trait;
//! a watch keeps them current.
use std::{net::IpAddr, pin::Pin};

use futures::{Stream, StreamExt};
use ipnet::IpNet;
use k8s_openapi::api::core::v1::Node;
use kube::{Api, Client, runtime::watcher};
use tokio::sync::watch;

use crate::{
    config::NodeNameOrigin, model::UnderlayFamily, publish::LocalNode, remote::backoff::Backoff,
    status::Status,
};

mod problem;
pub use problem::{CLUSTER_ROLE, NODE_VERBS, RETRY_BASE, RETRY_CAP, code};

/// A log directive for kube-runtime's watcher, whose own WARN line for
/// every failed attempt ("watch list error with 403: …") repeats what
/// [`NodeFollower`] logs once per cause, with the fix. The agent adds it to
/// its log filter unless `RUST_LOG` names `kube_runtime`.
pub const WATCHER_LOG_DIRECTIVE: &str = "kube_runtime::watcher=error";

/// A Kubernetes failure, or a Node that does not (yet) say what the agent
/// needs. Each message ends with what the operator can do about it.
#[derive(Debug, thiserror::Error)]
pub enum K8sError {
    /// No in-cluster or kubeconfig credentials.
    #[error(
        "kubernetes client: {0} (run in a Pod with a service account, or give --node-ip and --pod-cidr)"
    )]
    Client(#[source] kube::Error),
    /// The API server answered with an error status.
    #[error("{}", problem::api_message(.op, .node, *.code, .message))]
    Api {
        /// What was attempted (`list`, `watch`).
        op: &'static str,
        /// The node.
        node: String,
        /// The HTTP status.
        code: u16,
        /// The API's message.
        message: String,
    },
    /// No answer from the API server.
    #[error(
        "{op} node {node}: cannot reach the Kubernetes API ({source}); check that the API server is up and reachable from the node's network namespace (KUBERNETES_SERVICE_HOST and _PORT, firewalls); retrying with backoff"
    )]
    Unreachable {
        /// What was attempted.
        op: &'static str,
        /// The node.
        node: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// The client's own credentials cannot be used (e.g. the token file).
    #[error("{op} node {node}: the agent's Kubernetes credentials are unusable ({source}); {hint}")]
    Credentials {
        /// What was attempted.
        op: &'static str,
        /// The node.
        node: String,
        /// What to check.
        hint: &'static str,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
    /// Any other failure of the API call.
    #[error("{op} node {node}: {source}; retrying with backoff")]
    Other {
        /// What was attempted.
        op: &'static str,
        /// The node.
        node: String,
        /// The client's or the watcher's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The API lists no Node of this name.
    #[error(
        "no Node named {node:?} in the Kubernetes API (the name came from {origin}); `kubectl get nodes` shows the names: set NODE_NAME from the downward API (fieldRef spec.nodeName, as deploy/base/agent-daemonset.yaml does) or give --node-name the Node's name (a host name often differs from it, e.g. an FQDN)"
    )]
    NotFound {
        /// The name looked for.
        node: String,
        /// Where that name came from.
        origin: NodeNameOrigin,
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

impl K8sError {
    /// The watcher's failure, for the Node `node`.
    fn from_watcher(node: &str, e: watcher::Error) -> Self {
        let node = node.to_string();
        match e {
            watcher::Error::InitialListFailed(e) => Self::from_kube("list", node, e),
            watcher::Error::WatchStartFailed(e) | watcher::Error::WatchFailed(e) => {
                Self::from_kube("watch", node, e)
            }
            watcher::Error::WatchError(s) => Self::Api {
                op: "watch",
                node,
                code: s.code,
                message: s.message,
            },
            e @ watcher::Error::NoResourceVersion => Self::Other {
                op: "watch",
                node,
                source: Box::new(e),
            },
        }
    }

    fn from_kube(op: &'static str, node: String, e: kube::Error) -> Self {
        match e {
            kube::Error::Api(s) => Self::Api {
                op,
                node,
                code: s.code,
                message: s.message,
            },
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                Self::Unreachable {
                    op,
                    node,
                    source: e,
                }
            }
            kube::Error::Auth(ref a) => Self::Credentials {
                op,
                node,
                hint: credentials_hint(a),
                source: e,
            },
            e => Self::Other {
                op,
                node,
                source: Box::new(e),
            },
        }
    }
}

/// What the watch of one Node says.
#[derive(Debug)]
pub enum NodeEvent {
    /// The Node, as listed or as changed.
    Node(Box<Node>),
    /// The Node does not exist: a complete list without it, or its deletion.
    Missing,
}

/// The stream of a Node's versions.
pub type NodeStream = Pin<Box<dyn Stream<Item = Result<NodeEvent, K8sError>> + Send>>;

/// What the agent needs from the Kubernetes API.
pub trait NodeApi: Send + Sync + 'static {
    /// Every version of the Node named `name`: listed, then watched. An
    /// error does not end the stream; polling it again retries, at once:
    /// the caller backs off.
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
            .map_err(K8sError::Client)
    }
}

impl NodeApi for KubeNodes {
    /// The watcher without kube-runtime's `StreamBackoff`: the watcher emits
    /// an `Init` event before every attempt at its initial list, and that
    /// event resets the `StreamBackoff`, so a list that keeps failing was
    /// retried about once a second forever. [`follow_node`] backs off itself.
    fn watch(&self, name: &str) -> NodeStream {
        let node = name.to_string();
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        // Whether the list running since the last `Init` held the Node.
        let mut listed = false;
        watcher(self.api.clone(), cfg)
            .filter_map(move |ev| {
                let out = match ev {
                    Ok(watcher::Event::Init) => {
                        listed = false;
                        None
                    }
                    Ok(watcher::Event::InitApply(n)) => {
                        listed = true;
                        Some(Ok(NodeEvent::Node(Box::new(n))))
                    }
                    Ok(watcher::Event::InitDone) => (!listed).then_some(Ok(NodeEvent::Missing)),
                    Ok(watcher::Event::Apply(n)) => Some(Ok(NodeEvent::Node(Box::new(n)))),
                    Ok(watcher::Event::Delete(_)) => Some(Ok(NodeEvent::Missing)),
                    Err(e) => Some(Err(K8sError::from_watcher(&node, e))),
                };
                std::future::ready(out)
            })
            .boxed()
    }
}

/// What to check when the client's credentials cannot be used.
fn credentials_hint(e: &kube::client::AuthError) -> &'static str {
    match e {
        // client-go trims the token file; this client sends it as it is,
        // and a newline cannot be in an HTTP header.
        kube::client::AuthError::InvalidBearerToken(_) => {
            "the token is not a valid HTTP header value: a token file written by hand that ends with a newline (or holds spaces) is refused; write the token without them (`printf %s \"$TOKEN\" > file`), or use the ServiceAccount token the Pod mounts"
        }
        _ => {
            "check the ServiceAccount token the Pod mounts (automountServiceAccountToken) or the kubeconfig"
        }
    }
}

/// The addresses (InternalIPs of both families first) and Pod CIDRs of `node`.
pub fn node_addresses(node: &Node) -> Result<(Vec<IpAddr>, Vec<IpNet>), K8sError> {
    node_addresses_with(node, &[], None)
}

/// [`node_addresses`], with `given` (from `--node-ip`) instead of the Node's
/// InternalIPs of their family, which may then be missing; with `underlay`,
/// the InternalIP of that family first (the endpoint older readers take).
pub fn node_addresses_with(
    node: &Node,
    given: &[IpAddr],
    underlay: Option<UnderlayFamily>,
) -> Result<(Vec<IpAddr>, Vec<IpNet>), K8sError> {
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
    for a in given {
        let family = UnderlayFamily::of(*a);
        addrs.retain(|(r, ip)| *ip != *a && !(*r == 0 && family.holds(*ip)));
        addrs.push((0, *a));
    }
    addrs.sort_by_key(|(r, ip)| (*r, underlay.is_some_and(|u| !u.holds(*ip))));
    if addrs.first().is_none_or(|(r, _)| *r != 0) {
        return Err(incomplete(
            "status.addresses has no InternalIP; fix the kubelet's --node-ip, or give the agent --node-ip (in the DaemonSet: NODE_IP from the downward API's status.hostIP)",
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
            "spec.podCIDRs is empty; podmesh needs node CIDR allocation (kube-controller-manager --allocate-node-cidrs with --cluster-cidr): --pod-cidr is per node, which the DaemonSet's shared ConfigMap cannot set",
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

/// Follows this node's Kubernetes Node, sends its [`LocalNode`] on every
/// change, and says in the status (and once per cause in the log) why the
/// Node cannot be read or used.
#[derive(Debug)]
pub struct NodeFollower<A> {
    /// The API.
    pub api: A,
    /// The Node's name.
    pub name: String,
    /// The addresses from `--node-ip`, replacing the Node's InternalIPs of their family.
    pub addresses: Vec<IpAddr>,
    /// The underlay family, whose address is published first.
    pub underlay: UnderlayFamily,
    /// Where that name came from (said when no Node has it).
    pub origin: NodeNameOrigin,
    /// This node's VTEP MAC, carried into the [`LocalNode`].
    pub vtep_mac: Option<String>,
    /// The declared Pod CIDRs of this cluster (`--cluster-pod-cidr`); empty: not checked.
    pub cluster_pod_cidrs: Vec<IpNet>,
    /// Where problems are shown.
    pub status: Status,
}

/// Follows the Node named `name` and sends its [`LocalNode`] on every change, forever.
pub async fn follow_node<A: NodeApi>(
    api: A,
    name: String,
    vtep_mac: Option<String>,
    tx: watch::Sender<Option<LocalNode>>,
) {
    NodeFollower {
        api,
        name,
        addresses: Vec::new(),
        underlay: UnderlayFamily::default(),
        origin: NodeNameOrigin::Flag,
        vtep_mac,
        cluster_pod_cidrs: Vec::new(),
        status: Status::default(),
    }
    .run(tx)
    .await;
}

impl<A: NodeApi> NodeFollower<A> {
    /// Runs until aborted. A failed list or watch is retried after a delay
    /// from [`RETRY_BASE`] growing to [`RETRY_CAP`] with jitter; any answer
    /// of the API (a list, an event) resets it.
    pub async fn run(self, tx: watch::Sender<Option<LocalNode>>) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_CAP);
        // The cause of the problem last logged: a new line only when it changes.
        let mut said = None::<&'static str>;
        let mut outside_said = Vec::new();
        loop {
            let mut stream = self.api.watch(&self.name);
            while let Some(item) = stream.next().await {
                let ev = match item {
                    Ok(ev) => {
                        backoff.reset();
                        ev
                    }
                    Err(e) => {
                        self.report(&e, &mut said);
                        tokio::time::sleep(backoff.next_delay()).await;
                        continue;
                    }
                };
                let node = match ev {
                    NodeEvent::Node(n) => n,
                    NodeEvent::Missing => {
                        let e = K8sError::NotFound {
                            node: self.name.clone(),
                            origin: self.origin,
                        };
                        self.report(&e, &mut said);
                        continue;
                    }
                };
                let (addresses, pod_cidrs) =
                    match node_addresses_with(&node, &self.addresses, Some(self.underlay)) {
                        Ok(v) => v,
                        Err(e) => {
                            self.report(&e, &mut said);
                            continue;
                        }
                    };
                if said.take().is_some() {
                    tracing::info!(node = %self.name, "this node's Node is read again");
                }
                let outside = outside_cluster(&pod_cidrs, &self.cluster_pod_cidrs);
                if outside != outside_said {
                    if !outside.is_empty() {
                        tracing::warn!(node = %self.name, "{}", crate::status::outside_message(&outside));
                    }
                    outside_said.clone_from(&outside);
                }
                self.status.update(|r| {
                    r.local.node_error = None;
                    r.local.pod_cidrs_outside_cluster = outside;
                });
                let l = LocalNode {
                    addresses,
                    pod_cidrs,
                    vtep_mac: self.vtep_mac.clone(),
                };
                tx.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&l);
                    *cur = Some(l);
                    changed
                });
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Shows `e` in the status, and in the log if its cause is new. The
    /// last known address and Pod CIDRs, if any, stay published.
    fn report(&self, e: &K8sError, said: &mut Option<&'static str>) {
        let p = problem::problem(e);
        let code = problem::code_of(e);
        if *said != Some(code) {
            tracing::warn!(node = %self.name, code, error = %p.message, "cannot take this node's address and Pod CIDRs from Kubernetes");
            *said = Some(code);
        }
        self.status.update(|r| r.local.node_error = Some(p));
    }
}

/// The Pod CIDRs in `pods` that no declared cluster Pod CIDR holds (none
/// when nothing is declared), as `--pod-cidr` is checked at start.
pub fn outside_cluster(pods: &[IpNet], declared: &[IpNet]) -> Vec<IpNet> {
    if declared.is_empty() {
        return Vec::new();
    }
    pods.iter()
        .filter(|c| !declared.iter().any(|d| d.contains(*c)))
        .copied()
        .collect()
}

#[cfg(test)]
mod follow_tests;

#[cfg(test)]
pub(crate) mod tests {
    use std::time::Duration;

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
    fn a_token_with_a_trailing_newline_is_named_as_such() {
        let bad = http::HeaderValue::try_from("Bearer abc\n").unwrap_err();
        let e = K8sError::from_kube(
            "list",
            "n1".into(),
            kube::Error::Auth(kube::client::AuthError::InvalidBearerToken(bad)),
        );
        let t = e.to_string();
        assert!(
            t.contains("ends with a newline") && t.contains("printf"),
            "{t}"
        );
    }

    /// `--node-ip` alone (the downward API's status.hostIP): the address is
    /// the tunnel endpoint, the Pod CIDRs are the Node's, and a Node without
    /// InternalIP is then usable.
    #[test]
    fn an_address_from_the_flag_replaces_the_internal_ip() {
        let host: IpAddr = "192.168.7.7".parse().unwrap();
        let n: Node = serde_json::from_value(node_json("10.1.1.0/24")).unwrap();
        let (a, p) = node_addresses_with(&n, &[host], None).unwrap();
        assert_eq!(a[0], host);
        assert_eq!(p, vec!["10.1.1.0/24".parse::<IpNet>().unwrap()]);
        let mut no_internal = n.clone();
        if let Some(s) = no_internal.status.as_mut() {
            s.addresses = Some(Vec::new());
        }
        assert!(node_addresses(&no_internal).is_err());
        let (a, _) = node_addresses_with(&no_internal, &[host], None).unwrap();
        assert_eq!(a, vec![host]);
    }

    /// A dual-stack Node: both InternalIPs are published, the underlay
    /// family's first; `--node-ip` replaces only the one of its family.
    #[test]
    fn dual_stack_internal_ips() {
        let mut j = node_json("10.1.1.0/24");
        j["status"]["addresses"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "InternalIP", "address": "fd00::10"}));
        let n: Node = serde_json::from_value(j).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, _) = node_addresses_with(&n, &[], Some(UnderlayFamily::Ipv6)).unwrap();
        assert_eq!(a[..2], [ip("fd00::10"), ip("192.168.1.10")]);
        let (a, _) = node_addresses_with(&n, &[], Some(UnderlayFamily::Ipv4)).unwrap();
        assert_eq!(a[..2], [ip("192.168.1.10"), ip("fd00::10")]);
        let (a, _) =
            node_addresses_with(&n, &[ip("fd00::99")], Some(UnderlayFamily::Ipv6)).unwrap();
        assert_eq!(a[..2], [ip("fd00::99"), ip("192.168.1.10")]);
        assert!(!a.contains(&ip("fd00::10")));
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
    async fn list_and_watch_through_the_api() {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let api = KubeNodes::new(Client::new(svc, "default"));
        let (first_tx, seen_first) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // LIST of the watcher, by field selector (no GET: the ClusterRole
            // grants only list and watch).
            let (req, send) = handle.next_request().await.unwrap();
            assert_eq!(req.uri().path(), "/api/v1/nodes");
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
