//! etcd KV: Range and read-only Txn served from the cache, confined to the prefix; every write refused.
use std::sync::Arc;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbDeleteRequest, PbDeleteResponse, PbKvService,
    PbPutRequest, PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse,
    PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};

use super::read_only;
use crate::budget::{ConnectionBudget, MAX_KEY_BYTES, MAX_RESPONSE_BYTES, Reservation};
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

/// The key-length bound of every request the proxy serves.
pub fn key_len(hub: &Hub, key: &[u8], range_end: &[u8]) -> Result<(), Status> {
    let bytes = key.len().max(range_end.len());
    if bytes > MAX_KEY_BYTES {
        hub.metrics.refuse("key_too_long");
        return Err(Status::invalid_argument(format!(
            "a key or range end of {bytes} bytes (at most {MAX_KEY_BYTES}): nothing the proxy serves has such a key"
        )));
    }
    Ok(())
}

/// Serves one Range from the cache (shared with nothing else, kept apart so
/// the confinement and revision rules read in one place). The answer is
/// sized and its bytes reserved from `conn` and the proxy's budget before
/// it is built; the reservation comes back with it.
pub fn range(
    hub: &Hub,
    req: &PbRangeRequest,
    conn: Option<&ConnectionBudget>,
) -> Result<(PbRangeResponse, Reservation), Status> {
    key_len(hub, &req.key, &req.range_end)?;
    if let Err(e) = hub.prefix.check(&req.key, &req.range_end) {
        hub.metrics.refuse(e.reason());
        return Err(Status::permission_denied(format!("permission denied: {e}")));
    }
    let mut meter = hub.budget.meter(conn, MAX_RESPONSE_BYTES);
    let (synced, revision, result) = hub.with_cache(|c| {
        (
            c.synced(),
            c.revision(),
            c.range_within(req, &mut |n| meter.take(n)),
        )
    });
    if !synced {
        hub.metrics.refuse("not_synced");
        return Err(Status::unavailable(
            "the proxy has not listed its upstream etcd yet; retry shortly",
        ));
    }
    match result {
        Ok(r) => Ok((
            PbRangeResponse {
                header: Some(hub.header(revision)),
                kvs: r.kvs,
                more: r.more,
                count: r.count,
            },
            meter.finish(),
        )),
        Err(e) => Err(range_status(hub, e)),
    }
}

/// The status etcd answers for a Range it cannot serve at that revision, or
/// the proxy for one over its bounds.
fn range_status(hub: &Hub, e: RangeError) -> Status {
    match &e {
        RangeError::Compacted { .. } => hub.metrics.refuse("compacted_revision"),
        RangeError::Future { .. } => hub.metrics.refuse("future_revision"),
        RangeError::Exhausted(x) => {
            hub.metrics.refuse(x.reason());
            return Status::resource_exhausted(e.to_string());
        }
    }
    Status::out_of_range(e.to_string())
}

/// Serves a Txn that only reads inside the prefix from the cache (compares
/// and ranges at one revision, like etcd's serializable read Txn); any write
/// or key outside the prefix refuses the whole Txn and says which part. Its
/// ranges share one answer's bounds.
pub fn txn(
    hub: &Hub,
    req: &PbTxnRequest,
    conn: Option<&ConnectionBudget>,
) -> Result<(PbTxnResponse, Reservation), Status> {
    if let Err(e) = crate::txn::check(&hub.prefix, req) {
        return Err(match e {
            crate::txn::TxnRefusal::Write { .. } => read_only(hub, &e.to_string()),
            crate::txn::TxnRefusal::Escape { .. } => {
                hub.metrics.refuse(e.reason());
                Status::permission_denied(format!("permission denied: {e}"))
            }
            crate::txn::TxnRefusal::TooManyOps { .. }
            | crate::txn::TxnRefusal::KeyTooLong { .. } => {
                hub.metrics.refuse(e.reason());
                Status::invalid_argument(e.to_string())
            }
        });
    }
    let mut meter = hub.budget.meter(conn, MAX_RESPONSE_BYTES);
    let (synced, result) = hub.with_cache(|c| {
        let header = hub.header(c.revision());
        (
            c.synced(),
            crate::txn::evaluate(c, req, &header, &mut |n| meter.take(n)),
        )
    });
    if !synced {
        hub.metrics.refuse("not_synced");
        return Err(Status::unavailable(
            "the proxy has not listed its upstream etcd yet; retry shortly",
        ));
    }
    result
        .map(|r| (r, meter.finish()))
        .map_err(|e| range_status(hub, e))
}

/// The answer, with its reservation in the extensions (`serve` moves it
/// into the body, which holds it until the answer is sent).
fn answer<T>((message, reservation): (T, Reservation)) -> Response<T> {
    let mut r = Response::new(message);
    r.extensions_mut().insert(reservation);
    r
}

#[tonic::async_trait]
impl PbKvService for KvService {
    async fn range(
        &self,
        request: Request<PbRangeRequest>,
    ) -> Result<Response<PbRangeResponse>, Status> {
        let conn = request.extensions().get::<ConnectionBudget>();
        range(&self.hub, request.get_ref(), conn).map(answer)
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
        let conn = request.extensions().get::<ConnectionBudget>();
        txn(&self.hub, request.get_ref(), conn).map(answer)
    }

    async fn compact(
        &self,
        _request: Request<PbCompactionRequest>,
    ) -> Result<Response<PbCompactionResponse>, Status> {
        Err(read_only(&self.hub, "Compact"))
    }
}
