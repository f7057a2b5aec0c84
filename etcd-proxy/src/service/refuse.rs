//! Whole services refused without decoding (Lease, Auth, Lock, Election): PermissionDenied for every method.
use std::convert::Infallible;
use std::future::{Ready, ready};
use std::marker::PhantomData;
use std::sync::Arc;
use std::task::{Context, Poll};

use tonic::body::Body;
use tonic::codegen::{Service, http};
use tonic::server::NamedService;

use crate::hub::Hub;

/// A gRPC service refused as a whole, and why.
pub trait Refused: Send + Sync + 'static {
    const NAME: &'static str;
    const WHY: &'static str;
}

#[derive(Debug, Clone, Copy)]
pub struct Lease;
impl Refused for Lease {
    const NAME: &'static str = "etcdserverpb.Lease";
    const WHY: &'static str = "leases belong to writers of the cluster's own mesh etcd";
}

#[derive(Debug, Clone, Copy)]
pub struct Auth;
impl Refused for Auth {
    const NAME: &'static str = "etcdserverpb.Auth";
    const WHY: &'static str =
        "clients authenticate with their TLS certificate; etcd users and roles are not exposed";
}

/// etcd's gRPC lock service (etcd-client's `lock`; etcdctl's `lock` takes a
/// lease first, which is refused too): a lock is a write. Without this route
/// clients would get Unimplemented, which reads like a version mismatch.
#[derive(Debug, Clone, Copy)]
pub struct Lock;
impl Refused for Lock {
    const NAME: &'static str = "v3lockpb.Lock";
    const WHY: &'static str =
        "a lock writes a key with a lease; take locks on the cluster's own mesh etcd";
}

/// etcd's gRPC election service: Campaign, Proclaim and Resign write; Leader
/// and Observe are refused with them, since an election is nothing a remote
/// reader of the mesh records takes part in.
#[derive(Debug, Clone, Copy)]
pub struct Election;
impl Refused for Election {
    const NAME: &'static str = "v3electionpb.Election";
    const WHY: &'static str =
        "elections write keys with a lease; run them on the cluster's own mesh etcd";
}

/// Answers every method of `R` with PermissionDenied (a trailers-only gRPC
/// response), so that the request body is never decoded.
#[derive(Debug)]
pub struct RefuseService<R> {
    hub: Arc<Hub>,
    _r: PhantomData<R>,
}

impl<R> Clone for RefuseService<R> {
    fn clone(&self) -> Self {
        RefuseService {
            hub: self.hub.clone(),
            _r: PhantomData,
        }
    }
}

impl<R: Refused> RefuseService<R> {
    pub fn new(hub: Arc<Hub>) -> Self {
        RefuseService {
            hub,
            _r: PhantomData,
        }
    }
}

impl<R: Refused> NamedService for RefuseService<R> {
    const NAME: &'static str = R::NAME;
}

impl<R: Refused> Service<http::Request<Body>> for RefuseService<R> {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        let method = req.uri().path().rsplit('/').next().unwrap_or("").to_owned();
        let status = super::read_only(&self.hub, &format!("{}.{method} ({})", R::NAME, R::WHY));
        ready(Ok(status.into_http()))
    }
}
