//! Calico's IP pools (`crd.projectcalico.org/v1`, kind IPPool) read through
//! the Kubernetes API as dynamic objects, so no CRD type crate is needed,
//! behind a narrow trait ([`PoolSource`]). No CRD (404) or no permission
//! (403) is "cannot tell", not an error.
use std::future::Future;

use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};

use super::{CalicoPool, CalicoPools};

/// Where Calico's pools come from.
pub trait PoolSource: Send + Sync + 'static {
    /// The pools now, or why they cannot be told.
    fn pools(&self) -> impl Future<Output = CalicoPools> + Send;
}

/// A fixed answer (tests; and an agent without the Kubernetes API).
impl PoolSource for CalicoPools {
    async fn pools(&self) -> CalicoPools {
        self.clone()
    }
}

/// The agent runs without the Kubernetes API (`--node-ip`/`--pod-cidr` given).
pub fn without_kubernetes() -> CalicoPools {
    CalicoPools::Unknown(
        "the agent does not use the Kubernetes API (--node-ip and --pod-cidr given)".into(),
    )
}

/// [`PoolSource`] on a kube-rs client; the client is made on first use.
#[derive(Clone, Default)]
pub struct KubePools {
    client: std::sync::Arc<tokio::sync::OnceCell<Result<Client, String>>>,
}

impl std::fmt::Debug for KubePools {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KubePools")
    }
}

impl KubePools {
    /// Over this client (tests pass a tower-test mock).
    pub fn new(client: Client) -> Self {
        Self {
            client: std::sync::Arc::new(tokio::sync::OnceCell::new_with(Some(Ok(client)))),
        }
    }

    /// From the in-cluster service account or the kubeconfig, on first use.
    pub fn from_env() -> Self {
        Self::default()
    }
}

/// The API resource of Calico's IPPool CRD.
pub fn ippool_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("crd.projectcalico.org", "v1", "IPPool"),
        "ippools",
    )
}

impl PoolSource for KubePools {
    async fn pools(&self) -> CalicoPools {
        let client = self
            .client
            .get_or_init(|| async { Client::try_default().await.map_err(|e| e.to_string()) })
            .await;
        let client = match client {
            Ok(c) => c.clone(),
            Err(e) => return CalicoPools::Unknown(format!("no Kubernetes client: {e}")),
        };
        let api: Api<DynamicObject> = Api::all_with(client, &ippool_resource());
        match api.list(&ListParams::default()).await {
            Ok(list) => pools_from(list.items.iter().map(|o| serde_json::to_value(o).unwrap_or_default())),
            Err(kube::Error::Api(s)) if s.is_not_found() => CalicoPools::Unknown(
                "no ippools.crd.projectcalico.org in the Kubernetes API (Calico keeps its pools elsewhere, e.g. in etcd: check them with calicoctl get ippools -o yaml)".into(),
            ),
            Err(kube::Error::Api(s)) if s.is_forbidden() => CalicoPools::Unknown(
                "listing ippools.crd.projectcalico.org is forbidden: grant the agent's ServiceAccount list on them, or check them with kubectl get ippools.crd.projectcalico.org -o yaml".into(),
            ),
            Err(e) => CalicoPools::Unknown(format!("listing Calico IPPools: {e}")),
        }
    }
}

/// The pools of a list of IPPool objects (as JSON); an object without a
/// valid `spec.cidr` is skipped.
pub fn pools_from(objects: impl Iterator<Item = serde_json::Value>) -> CalicoPools {
    CalicoPools::Listed(objects.filter_map(|o| pool_from_json(&o)).collect())
}

/// One IPPool from its JSON (`metadata.name`, `spec.cidr`, `spec.natOutgoing`, `spec.disabled`).
pub fn pool_from_json(o: &serde_json::Value) -> Option<CalicoPool> {
    let spec = o.get("spec")?;
    let flag = |k: &str| {
        spec.get(k)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(false)
    };
    Some(CalicoPool {
        name: o
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or_default()
            .to_string(),
        cidr: spec
            .get("cidr")?
            .as_str()?
            .parse::<ipnet::IpNet>()
            .ok()?
            .trunc(),
        nat_outgoing: flag("natOutgoing"),
        disabled: flag("disabled"),
    })
}

#[cfg(test)]
mod tests {
    use http::{Request, Response, StatusCode};
    use kube::client::Body;
    use tower_test::mock;

    use super::*;

    /// Answers one request for the IPPool list with `status` and `body`.
    async fn answered(status: StatusCode, body: serde_json::Value) -> CalicoPools {
        let (svc, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let pools = KubePools::new(Client::new(svc, "default"));
        let server = tokio::spawn(async move {
            let (req, send) = handle.next_request().await.expect("a request");
            assert_eq!(req.uri().path(), "/apis/crd.projectcalico.org/v1/ippools");
            send.send_response(
                Response::builder()
                    .status(status)
                    .body(Body::from(serde_json::to_vec(&body).expect("json")))
                    .expect("response"),
            );
        });
        let got = pools.pools().await;
        server.await.expect("server");
        got
    }

    fn api_status(code: u16, reason: &str) -> serde_json::Value {
        serde_json::json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "message": reason, "reason": reason, "code": code
        })
    }

    #[tokio::test]
    async fn pools_are_listed_as_dynamic_objects() {
        let list = serde_json::json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPoolList",
            "metadata": {"resourceVersion": "5"},
            "items": [{
                "apiVersion": "crd.projectcalico.org/v1", "kind": "IPPool",
                "metadata": {"name": "default-ipv4-ippool"},
                "spec": {"cidr": "10.1.0.0/16", "natOutgoing": true, "vxlanMode": "Always"}
            }]
        });
        match answered(StatusCode::OK, list).await {
            CalicoPools::Listed(p) => {
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].name, "default-ipv4-ippool");
                assert!(p[0].nat_outgoing && !p[0].disabled);
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn no_crd_or_no_permission_is_cannot_tell() {
        let CalicoPools::Unknown(why) =
            answered(StatusCode::NOT_FOUND, api_status(404, "NotFound")).await
        else {
            panic!("404 must be unknown");
        };
        assert!(why.contains("calicoctl get ippools"), "{why}");
        let CalicoPools::Unknown(why) =
            answered(StatusCode::FORBIDDEN, api_status(403, "Forbidden")).await
        else {
            panic!("403 must be unknown");
        };
        assert!(why.contains("forbidden"), "{why}");
    }
}
