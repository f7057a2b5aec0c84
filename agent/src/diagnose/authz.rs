//! The authz layer: what the remote lets this node do, live. A read of
//! the mesh prefix must succeed, and a write must be refused: the probe is
//! a transaction whose condition can never hold (`version(key) < 0`), so an
//! endpoint that accepts it (an etcd reached directly with credentials that
//! may write) writes nothing, and a podmesh proxy refuses it for the write
//! in its branch. Also reads the etcd version and cluster ID behind the
//! endpoint (etcd's Status, which the proxy answers for its upstream).
use std::{path::Path, time::Duration};

use etcd_client::{Compare, CompareOp, Txn, TxnOp};

use super::{Check, Layer, check};
use crate::{
    kvstore::{client_config::EtcdClientConfig, etcd::RECEIVE_LIMIT},
    model::{CLUSTERS_PREFIX, NODES_PREFIX, PREFIX},
    plan::{live::RawRecord, read},
    remote::hint,
};

const L: Layer = Layer::Authz;

/// The key the write probe names (never written: its condition cannot hold).
pub const PROBE_KEY: &str = "podmesh/v1/diagnose-write-probe";

/// The authz checks, and the records read (for the plan layer) when the read passed.
pub async fn check_cluster(
    cluster: &str,
    path: &Path,
    cfg: &EtcdClientConfig,
    wait: Duration,
) -> (Vec<Check>, Option<Vec<RawRecord>>) {
    let c = Some(cluster);
    let mut out = Vec::new();
    let client = match read::connect(cfg, path, wait).await {
        Ok(cl) => cl,
        Err(e) => {
            out.push(Check::fail(
                L,
                c,
                check::READ,
                format!("cannot connect: {e}"),
                hint::UNREACHABLE,
            ));
            return (out, None);
        }
    };
    let mut kv = client.kv_client().max_decoding_message_size(RECEIVE_LIMIT);
    let records = match tokio::time::timeout(wait, read::read_prefix(&mut kv, PREFIX)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            let fix = if read::is_permission_denied(&e) {
                "the remote refuses this client the podmesh/v1/ prefix: its proxy must run with --allow-prefix podmesh/v1/ (the default), and an etcd user behind it must be allowed to read that prefix"
            } else {
                "the remote's proxy answers but not the read: check its /readyz (synced=true) and log"
            };
            out.push(Check::fail(
                L,
                c,
                check::READ,
                format!("reading {PREFIX}: {}", read::one_line(&e)),
                fix,
            ));
            return (out, None);
        }
        Err(_) => {
            out.push(Check::fail(
                L,
                c,
                check::READ,
                format!("reading {PREFIX}: no answer within {}s", wait.as_secs()),
                "a hung etcd proxy: check the remote's etcd proxy",
            ));
            return (out, None);
        }
    };
    let clusters = records
        .iter()
        .filter(|r| r.key.starts_with(CLUSTERS_PREFIX))
        .count();
    let nodes = records
        .iter()
        .filter(|r| r.key.starts_with(NODES_PREFIX))
        .count();
    out.push(Check::pass(
        L,
        c,
        check::READ,
        format!(
            "read {} records under {PREFIX} ({clusters} cluster, {nodes} node)",
            records.len()
        ),
    ));
    let txn = Txn::new()
        .when([Compare::version(PROBE_KEY, CompareOp::Less, 0)])
        .and_then([TxnOp::put(PROBE_KEY, "", None)]);
    let write = tokio::time::timeout(wait, kv.txn(txn)).await;
    out.push(match write {
        Ok(Ok(_)) => Check::fail(
            L,
            c,
            check::WRITE_REFUSED,
            format!("the endpoint accepted a write transaction under {PREFIX} (a Txn with a Put of {PROBE_KEY} whose condition never holds, so nothing was written): it is not a read-only podmesh etcd proxy, and these credentials can change cluster {cluster}'s records"),
            "point this entry at the remote's podmesh-etcd-proxy (never at its mesh etcd) with the client certificate the proxy's CA issued for this cluster, and revoke the credentials that could write",
        ),
        Ok(Err(e)) if read::is_permission_denied(&e) => Check::pass(
            L,
            c,
            check::WRITE_REFUSED,
            format!("a write is refused: {}", read::one_line(&e)),
        ),
        Ok(Err(e)) => Check::warn(
            L,
            c,
            check::WRITE_REFUSED,
            format!("the write probe failed without a permission refusal: {}", read::one_line(&e)),
            "a podmesh proxy answers writes with PermissionDenied; check that the endpoint is the remote's podmesh-etcd-proxy",
        ),
        Err(_) => Check::warn(L, c, check::WRITE_REFUSED, format!("no answer to the write probe within {}s", wait.as_secs()), "check the remote's etcd proxy"),
    });
    let mut m = client.maintenance_client();
    out.push(match tokio::time::timeout(wait, m.status()).await {
        Ok(Ok(s)) => {
            let id = s.header().map_or(0, |h| h.cluster_id());
            let member = s.header().map_or(0, |h| h.member_id());
            Check::pass(
                L,
                c,
                check::ETCD_IDENTITY,
                format!("etcd {} (cluster ID {id:x}, member {member:x}, revision {})", if s.version().is_empty() { "(version not said)" } else { s.version() }, s.header().map_or(0, |h| h.revision())),
            )
        }
        Ok(Err(e)) => Check::warn(L, c, check::ETCD_IDENTITY, format!("etcd's Status was not answered: {}", read::one_line(&e)), "the remote's etcd proxy answers Status for its upstream; check that the endpoint is one"),
        Err(_) => Check::warn(L, c, check::ETCD_IDENTITY, "no answer to Status", "check the remote's etcd proxy"),
    });
    (out, Some(records))
}
