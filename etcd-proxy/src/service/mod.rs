//! The etcd v3 gRPC services the proxy answers, and the refusal of every write or admin RPC.
pub mod kv;
pub mod maintenance;
pub mod refuse;
pub mod watch;
pub mod watch_wire;

use tonic::Status;

use crate::hub::Hub;

/// Refuses an RPC that would write or administer: counted by reason and
/// answered with PermissionDenied and a message that says why.
pub fn read_only(hub: &Hub, rpc: &str) -> Status {
    hub.metrics.refuse("read_only");
    Status::permission_denied(format!(
        "podmesh-etcd-proxy is read-only: {rpc} is refused; it serves Range, read-only Txn, Watch, Status and MemberList under {:?}; write to the cluster's own mesh etcd instead",
        hub.prefix.display()
    ))
}
