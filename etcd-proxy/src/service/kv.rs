//! etcd KV: Range and read-only Txn served from the cache, confined to the prefix; every write refused.
use std::sync::Arc;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};

use super::read_only;
use crate::cache::RangeError;
use crate::hub::Hub;

#[derive(Debug, Clone)]
pub struct KvService {
    hub: Arc<Hub>,
}

impl KvService {
    pub fn new(hub: Arc<Hub>) -> KvService {
        KvService { hub }
    }
}

/// Serves one Range from the cache (shared with nothing else, kept apart so
/// the confinement and revision rules read in one place).
pub fn range(hub: &Hub, req: &PbRangeRequest) -> Result<PbRangeResponse, Status> {
    if let Err(e) = hub.prefix.check(&req.key, &req.range_end) {
        hub.metrics.refuse(e.reason());
        return Err(Status::permission_denied(format!("permission denied: {e}")));
    }
    let (synced, revision, result) = hub.with_cache(|c| (c.synced(), c.revision(), c.range(req)));
    if !synced {
        hub.metrics.refuse("not_synced");
        return Err(Status::unavailable(
            "the proxy has not listed its upstream etcd yet; retry shortly",
        ));
    }
    match result {
        Ok(r) => Ok(PbRangeResponse {
            header: Some(hub.header(revision)),
            kvs: r.kvs,
            more: r.more,
            count: r.count,
        }),
        Err(e) => Err(range_status(hub, e)),
    }
}

/// The status etcd answers for a Range it cannot serve at that revision.
fn range_status(hub: &Hub, e: RangeError) -> Status {
    match e {
        RangeError::Compacted { .. } => hub.metrics.refuse("compacted_revision"),
        RangeError::Future { .. } => hub.metrics.refuse("future_revision"),
    }
    Status::out_of_range(e.to_string())
}

/// Serves a Txn that only reads inside the prefix from the cache (compares
/// and ranges at one revision, like etcd's serializable read Txn); any write
/// or key outside the prefix refuses the whole Txn and says which part.
pub fn txn(hub: &Hub, req: &PbTxnRequest) -> Result<PbTxnResponse, Status> {
    if let Err(e) = crate::txn::check(&hub.prefix, req) {
        return Err(match e {
            crate::txn::TxnRefusal::Write { .. } => read_only(hub, &e.to_string()),
            crate::txn::TxnRefusal::Escape { .. } => {
                hub.metrics.refuse(e.reason());
                Status::permission_denied(format!("permission denied: {e}"))
            }
        });
    }
    let (synced, result) = hub.with_cache(|c| {
        let header = hub.header(c.revision());
        (c.synced(), crate::txn::evaluate(c, req, &header))
    });
    if !synced {
        hub.metrics.refuse("not_synced");
        return Err(Status::unavailable(
            "the proxy has not listed its upstream etcd yet; retry shortly",
        ));
    }
    result.map_err(|e| range_status(hub, e))
}

#[tonic::async_trait]
impl PbKvService for KvService {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        range(&self.hub, request.get_ref()).map(Response::new)
    }

    type RangeStreamStream = futures::stream::Empty<Result<PbRangeStreamResponse, Status>>;

    async fn range_stream(
        &self,
        _request: Request<PbRangeRequest>,
    ) -> Result<Response<Self::RangeStreamStream>, Status> {
        self.hub.metrics.refuse("unimplemented");
        Err(Status::unimplemented(
            "RangeStream is not served by podmesh-etcd-proxy; use Range",
        ))
    }

    async fn put(
        &self,
        _request: Request<PbPutRequest>,
    ) -> Result<Response<PbPutResponse>, Status> {
        Err(read_only(&self.hub, "Put"))
    }

    async fn delete_range(
        &self,
        _request: Request<PbDeleteRequest>,
    ) -> Result<Response<PbDeleteResponse>, Status> {
        Err(read_only(&self.hub, "DeleteRange"))
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        txn(&self.hub, request.get_ref()).map(Response::new)
    }

    async fn compact(
        &self,
        _request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        Err(read_only(&self.hub, "Compact"))
    }
}
