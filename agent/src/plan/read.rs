//! Reading a cluster's records live and read-only, for `plan check
//! --from-clustermesh` and `podmesh diagnose`: only Range requests, paged,
//! with the TLS settings of the cluster's Secret entry.
use std::{path::Path, time::Duration};

use etcd_client::{Client, KvClient};

use super::{
    cilium,
    live::{LiveCluster, RawRecord},
};
use crate::{
    kvstore::{client_config::EtcdClientConfig, etcd::RECEIVE_LIMIT},
    model::PREFIX,
};

/// Keys per page.
const PAGE: i64 = 500;

/// The prefixes read: podmesh's records and Cilium's node records.
pub const PREFIXES: [&str; 2] = [PREFIX, cilium::NODES_PREFIX];

/// Connects with the Secret entry `cfg` (read from `path`) within `timeout`.
pub async fn connect(
    cfg: &EtcdClientConfig,
    path: &Path,
    timeout: Duration,
) -> Result<Client, String> {
    let tls = cfg.read_tls_files(path).map_err(|e| e.to_string())?;
    let opts = EtcdClientConfig::connect_options(tls).with_timeout(timeout);
    match tokio::time::timeout(timeout, Client::connect(&cfg.endpoints, Some(opts))).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(one_line(&e)),
        Err(_) => Err(format!("no connection within {}s", timeout.as_secs_f64())),
    }
}

/// `e` and its causes on one line.
pub fn one_line(e: &etcd_client::Error) -> String {
    crate::kvstore::one_line(e)
}

fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Every key and value under `prefix`, in pages, at one revision.
pub async fn read_prefix(
    kv: &mut KvClient,
    prefix: &str,
) -> Result<Vec<RawRecord>, etcd_client::Error> {
    let end = prefix_end(prefix.as_bytes());
    let mut from = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut limit = PAGE;
    let mut out = Vec::new();
    loop {
        let resp =
            podmesh_plumbing::etcd_page::get_page(kv, &from, &end, revision, &mut limit, false)
                .await?;
        if revision == 0 {
            revision = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            out.push(RawRecord {
                key: String::from_utf8_lossy(kv.key()).into_owned(),
                value: kv.value().to_vec(),
            });
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => {
                from = last.key().to_vec();
                from.push(0);
            }
            _ => return Ok(out),
        }
    }
}

/// Whether `e` is a refusal of the key range (a podmesh proxy confines
/// reads to `podmesh/v1/`; an etcd user may read only some prefixes).
pub fn is_permission_denied(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::PermissionDenied))
}

/// The records of every prefix of [`PREFIXES`] the store lets this client
/// read (a refused prefix reads as empty: nothing of that layout there).
pub async fn read_records(client: &Client, timeout: Duration) -> Result<Vec<RawRecord>, String> {
    let mut kv = client.kv_client().max_decoding_message_size(RECEIVE_LIMIT);
    let mut out = Vec::new();
    for p in PREFIXES {
        match tokio::time::timeout(timeout, read_prefix(&mut kv, p)).await {
            Ok(Ok(r)) => out.extend(r),
            Ok(Err(e)) if is_permission_denied(&e) => {}
            Ok(Err(e)) => return Err(format!("reading {p}: {}", one_line(&e))),
            Err(_) => {
                return Err(format!(
                    "reading {p}: no answer within {}s",
                    timeout.as_secs_f64()
                ));
            }
        }
    }
    Ok(out)
}

/// Reads the cluster of the Secret entry `path` (named `name`) live.
pub async fn read_cluster(name: &str, path: &Path, timeout: Duration) -> LiveCluster {
    let records = async {
        let cfg = EtcdClientConfig::load(path).map_err(|e| e.to_string())?;
        let client = connect(&cfg, path, timeout).await?;
        read_records(&client, timeout).await
    }
    .await;
    LiveCluster {
        name: name.to_string(),
        records,
    }
}
