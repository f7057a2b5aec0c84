//! [`KvStore`] on a real etcd (v3 gRPC), with the TLS settings of an etcd client YAML.
use std::{path::Path, time::Duration};

use etcd_client::{
    Client, Compare, CompareOp, EventType, PutOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{
    EventStream, KeyValue, KvError, KvEvent, KvStore, LeaseId,
    client_config::{ClientConfigError, EtcdClientConfig},
};

/// Keys per page of a list: what 20 remotes listing at once hold in memory
/// stays small.
const PAGE: i64 = 500;
/// The largest answer accepted from an etcd: a full page of records at the
/// record size limit (with their keys), instead of gRPC's 4 MiB, which five
/// records of 1 MiB in one page of 500 already pass. A page still larger
/// (records far over the limit) is read again in smaller pages, so every
/// record arrives and the oversized ones are rejected one by one.
pub const RECEIVE_LIMIT: usize = PAGE as usize * (crate::model::MAX_VALUE_LEN + 4096);
/// Events buffered between a store's list/watch task and its consumer.
const EVENTS: usize = 256;

/// An etcd client. Clones share the connection.
#[derive(Clone)]
pub struct EtcdStore {
    client: Client,
    endpoints: String,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .finish()
    }
}

fn convert(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
    }
}

impl EtcdStore {
    /// Connects with the settings of `cfg` (read from `path`, named in errors).
    /// TLS files are read now, so a rotated certificate takes effect on the next connect.
    pub async fn connect(cfg: &EtcdClientConfig, path: &Path) -> Result<Self, KvError> {
        let endpoints = cfg.endpoints.join(",");
        let tls = cfg.read_tls_files(path)?;
        if let (Some((cert, _)), Some(file)) = (&tls.identity, &cfg.cert_file) {
            check_validity(cert, file, path)?;
        }
        let opts = EtcdClientConfig::connect_options(tls);
        let client = Client::connect(&cfg.endpoints, Some(opts))
            .await
            .map_err(|e| unavailable("connect", &endpoints, e))?;
        Ok(Self { client, endpoints })
    }

    /// The endpoints this store talks to, comma-separated.
    pub fn endpoints(&self) -> &str {
        &self.endpoints
    }

    /// Compacts the store's history up to `revision` (tests and benchmarks).
    pub async fn compact(&self, revision: i64) -> Result<(), KvError> {
        self.client
            .clone()
            .compact(revision, None)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("compact", &self.endpoints, e))
    }

    /// One page of at most `*page` keys from `from`; shrinks `*page` (down to
    /// one key) while an answer passes [`RECEIVE_LIMIT`].
    /// One page of at most `*page` keys from `from`; `*page` shrinks while
    /// an answer passes [`RECEIVE_LIMIT`].
    async fn list_page(
        &self,
        from: &[u8],
        end: &[u8],
        revision: i64,
        page: &mut i64,
    ) -> Result<etcd_client::GetResponse, KvError> {
        let mut kv = self
            .client
            .kv_client()
            .max_decoding_message_size(RECEIVE_LIMIT);
        podmesh_plumbing::etcd_page::get_page(&mut kv, from, end, revision, page, false)
            .await
            .map_err(|e| map_list_error(&self.endpoints, e))
    }
}

/// Refuses a client certificate that is expired or not yet valid, before the
/// server does: the server's refusal (a bare "bad certificate" alert) does not
/// say why, this does.
fn check_validity(pem: &[u8], file: &Path, config: &Path) -> Result<(), KvError> {
    let invalid = |message: String| {
        KvError::Config(ClientConfigError::Invalid {
            path: config.to_path_buf(),
            message,
        })
    };
    let Ok((_, block)) = x509_parser::pem::parse_x509_pem(pem) else {
        return Err(invalid(format!(
            "cert-file {} holds no PEM certificate; put the client certificate (PEM) into this cluster's entry of the clustermesh Secret",
            file.display()
        )));
    };
    let Ok(cert) = block.parse_x509() else {
        return Err(invalid(format!(
            "cert-file {} is not a valid X.509 certificate; put the client certificate (PEM) into this cluster's entry of the clustermesh Secret",
            file.display()
        )));
    };
    let v = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if v.not_after < now {
        return Err(invalid(format!(
            "client certificate cert-file {} expired on {}; the remote will refuse it: put a renewed client certificate into this cluster's entry of the clustermesh Secret (picked up without a restart)",
            file.display(),
            v.not_after
        )));
    }
    if v.not_before > now {
        return Err(invalid(format!(
            "client certificate cert-file {} is not valid before {}; check this node's clock or issue a certificate valid now",
            file.display(),
            v.not_before
        )));
    }
    Ok(())
}

/// The end of the range that `prefix` covers (etcd's `with_prefix` rule).
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

fn unavailable(op: &'static str, endpoints: &str, e: etcd_client::Error) -> KvError {
    KvError::Unavailable {
        op,
        endpoints: endpoints.to_string(),
        source: Box::new(e),
    }
}

fn map_list_error(endpoints: &str, e: etcd_client::Error) -> KvError {
    if let etcd_client::Error::GRpcStatus(s) = &e
        && s.message().contains("compacted")
    {
        return KvError::Compacted {
            compact_revision: 0,
        };
    }
    unavailable("list", endpoints, e)
}

impl KvStore for EtcdStore {
    async fn list_and_watch(&self, prefix: &str) -> Result<EventStream, KvError> {
        let end = prefix_end(prefix.as_bytes());
        // The first page fixes the revision; later pages read at that revision.
        let mut size = PAGE;
        let first = self
            .list_page(prefix.as_bytes(), &end, 0, &mut size)
            .await?;
        let revision = first.header().map(|h| h.revision()).unwrap_or(0);
        let (tx, rx) = mpsc::channel::<Result<KvEvent, KvError>>(EVENTS);
        let this = self.clone();
        let prefix = prefix.to_string();
        tokio::spawn(async move {
            let run = async {
                let mut page = first;
                loop {
                    for kv in page.kvs() {
                        if tx.send(Ok(KvEvent::Put(convert(kv)))).await.is_err() {
                            return Ok(());
                        }
                    }
                    if !page.more() {
                        break;
                    }
                    let Some(last) = page.kvs().last() else { break };
                    let mut from = last.key().to_vec();
                    from.push(0);
                    page = this.list_page(&from, &end, revision, &mut size).await?;
                }
                if tx.send(Ok(KvEvent::ListDone { revision })).await.is_err() {
                    return Ok(());
                }
                let opts = WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(revision + 1)
                    .with_progress_notify();
                let mut watch = this
                    .client
                    .watch_client()
                    .max_decoding_message_size(RECEIVE_LIMIT)
                    .watch(prefix.as_bytes(), Some(opts))
                    .await
                    .map_err(|e| unavailable("watch", &this.endpoints, e))?;
                loop {
                    let msg = tokio::select! {
                        m = watch.message() => m,
                        () = tx.closed() => return Ok(()),
                    };
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => {
                            return Err(KvError::WatchClosed {
                                reason: "stream ended".into(),
                            });
                        }
                        Err(e) => return Err(unavailable("watch", &this.endpoints, e)),
                    };
                    if resp.compact_revision() > 0 {
                        return Err(KvError::Compacted {
                            compact_revision: resp.compact_revision(),
                        });
                    }
                    if resp.canceled() {
                        return Err(KvError::WatchClosed {
                            reason: resp.cancel_reason().to_string(),
                        });
                    }
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let item = match ev.event_type() {
                            EventType::Put => KvEvent::Put(convert(kv)),
                            EventType::Delete => KvEvent::Delete {
                                key: String::from_utf8_lossy(kv.key()).into_owned(),
                                revision: kv.mod_revision(),
                            },
                        };
                        if tx.send(Ok(item)).await.is_err() {
                            return Ok(());
                        }
                    }
                }
            };
            let result: Result<(), KvError> = run.await;
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Ok(ReceiverStream::new(rx).boxed())
    }

    async fn get(&self, key: &str) -> Result<Option<KeyValue>, KvError> {
        let resp = self
            .client
            .clone()
            .get(key, None)
            .await
            .map_err(|e| unavailable("get", &self.endpoints, e))?;
        Ok(resp.kvs().first().map(convert))
    }

    async fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<(), KvError> {
        let opts = lease.map(|l| PutOptions::new().with_lease(l));
        self.client
            .clone()
            .put(key, value, opts)
            .await
            .map(|_| ())
            .map_err(|e| unavailable("put", &self.endpoints, e))
    }

    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<KeyValue>, KvError> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self
            .client
            .clone()
            .txn(txn)
            .await
            .map_err(|e| unavailable("create", &self.endpoints, e))?;
        if resp.succeeded() {
            return Ok(None);
        }
        Ok(resp.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => g.kvs().first().map(convert),
            _ => None,
        }))
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId, KvError> {
        let ttl = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        self.client
            .clone()
            .lease_grant(ttl, None)
            .await
            .map(|r| r.id())
            .map_err(|e| unavailable("grant lease", &self.endpoints, e))
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<bool, KvError> {
        match self.client.clone().lease_keep_alive(lease).await {
            Ok(_) => Ok(true),
            Err(etcd_client::Error::LeaseKeepAliveError(_)) => Ok(false),
            Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("lease not found") => {
                Ok(false)
            }
            Err(e) => Err(unavailable("keep lease alive", &self.endpoints, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_rule() {
        assert_eq!(prefix_end(b"podmesh/v1/"), b"podmesh/v10".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff"), vec![0]);
    }
}
