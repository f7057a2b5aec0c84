//! What a failure to read this node's Node means to the operator: a stable
//! code for metrics and alerts, and the fix (which RBAC rule, which Node
//! name and where it came from), and how long the agent waits to retry.
use std::time::Duration;

use super::K8sError;
use crate::status::LocalProblem;

/// The ClusterRole (deploy/base/rbac.yaml) that lets the agent read its Node.
pub const CLUSTER_ROLE: &str = "podmesh-agent";

/// The verbs on `nodes` the agent uses: its watcher lists, then watches.
pub const NODE_VERBS: &[&str] = &["list", "watch"];

/// The first delay before a failed list or watch of the Node is retried.
pub const RETRY_BASE: Duration = Duration::from_secs(1);

/// The longest delay between retries: once the API answers again, the Node
/// (and any change of it) arrives within this time. 15 s keeps a cluster of
/// agents whose API is down (or whose RBAC is missing) at one list per
/// agent every 7.5-15 s, instead of one a second.
pub const RETRY_CAP: Duration = Duration::from_secs(15);

/// Stable codes of [`LocalProblem`]s about the Node (`local.node_error.code`,
/// the `reason` of `podmesh_local_node_error`).
pub mod code {
    /// 403: the ServiceAccount may not list or watch nodes.
    pub const FORBIDDEN: &str = "kubernetes-forbidden";
    /// 401, or credentials the client cannot use.
    pub const UNAUTHORIZED: &str = "kubernetes-unauthorized";
    /// No answer from the API server.
    pub const UNREACHABLE: &str = "kubernetes-unreachable";
    /// Any other failure of the API.
    pub const API: &str = "kubernetes-error";
    /// No Node of this name.
    pub const NOT_FOUND: &str = "node-not-found";
    /// The Node lacks an InternalIP or Pod CIDRs.
    pub const INCOMPLETE: &str = "node-incomplete";
}

/// The message of an error status from the API server, with the fix.
pub(super) fn api_message(op: &str, node: &str, status: u16, message: &str) -> String {
    match status {
        403 => format!(
            "{op} node {node}: 403 Forbidden ({message}); the agent's ServiceAccount needs {verbs} \
             on nodes: the ClusterRole {CLUSTER_ROLE} of deploy/base/rbac.yaml, bound to it by the \
             ClusterRoleBinding {CLUSTER_ROLE}; check with `kubectl auth can-i watch nodes \
             --as=system:serviceaccount:podmesh:podmesh-agent`",
            verbs = NODE_VERBS.join(" and "),
        ),
        401 => format!(
            "{op} node {node}: 401 Unauthorized ({message}); the API server does not accept the \
             agent's token: check the ServiceAccount token the Pod mounts (automountServiceAccountToken, \
             a ServiceAccount deleted and recreated under the running Pod: restart it) or the \
             kubeconfig's credentials"
        ),
        _ => format!("{op} node {node}: {status} ({message}); retrying with backoff"),
    }
}

/// The stable code of `e`.
pub(super) fn code_of(e: &K8sError) -> &'static str {
    match e {
        K8sError::Api { code: 403, .. } => code::FORBIDDEN,
        K8sError::Api { code: 401, .. } | K8sError::Credentials { .. } => code::UNAUTHORIZED,
        K8sError::Unreachable { .. } => code::UNREACHABLE,
        K8sError::NotFound { .. } => code::NOT_FOUND,
        K8sError::Incomplete { .. } => code::INCOMPLETE,
        K8sError::Api { .. } | K8sError::Other { .. } | K8sError::Client(_) => code::API,
    }
}

/// `e` as the status shows it.
pub(super) fn problem(e: &K8sError) -> LocalProblem {
    LocalProblem {
        code: code_of(e).to_string(),
        message: e.to_string(),
    }
}
