//! etcd Maintenance.Status, Alarm GET and Cluster.MemberList answered as the proxy itself (so clients never bypass it).
use std::sync::Arc;

use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest,
    PbHashResponse, PbMaintenanceService, PbMember, PbMemberAddRequest, PbMemberAddResponse,
    PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse,
    PbMoveLeaderRequest, PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse,
    PbStatusRequest, PbStatusResponse,
};
use tonic::{Request, Response, Status};

use super::read_only;
use crate::hub::Hub;
use crate::metrics::UpstreamState;

#[derive(Debug, Clone)]
pub struct MaintenanceService {
    hub: Arc<Hub>,
}

impl MaintenanceService {
    pub fn new(hub: Arc<Hub>) -> MaintenanceService {
        MaintenanceService { hub }
    }
}

#[tonic::async_trait]
impl PbMaintenanceService for MaintenanceService {
    /// GET answers "no alarms": the proxy holds no data that could raise one,
    /// and the upstream's alarms are its operators' business, not remote
    /// readers'. Activating or disarming is refused.
    async fn alarm(
        &self,
        request: Request<PbAlarmRequest>,
    ) -> Result<Response<PbAlarmResponse>, Status> {
        if request.get_ref().action != 0 {
            return Err(read_only(&self.hub, "Alarm ACTIVATE/DEACTIVATE"));
        }
        let revision = self.hub.with_cache(|c| c.revision());
        Ok(Response::new(PbAlarmResponse {
            header: Some(self.hub.header(revision)),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<PbStatusRequest>,
    ) -> Result<Response<PbStatusResponse>, Status> {
        let (revision, keys) = self.hub.with_cache(|c| (c.revision(), c.key_count()));
        let mut errors = Vec::new();
        if self.hub.upstream_state() != UpstreamState::Watching {
            // The state and how long it lasts, never the upstream's own error
            // text: that names addresses and certificates of the serving
            // cluster and goes to the proxy's log only.
            errors.push(format!(
                "upstream etcd not watched ({}{}); serving the last known state at revision {revision}; the proxy's log says why",
                self.hub.upstream_state().name(),
                self.hub
                    .upstream_outage()
                    .map(|d| format!(", failing for {}s", d.as_secs()))
                    .unwrap_or_default()
            ));
        }
        let id = self.hub.identity.member_id;
        Ok(Response::new(PbStatusResponse {
            header: Some(self.hub.header(revision)),
            version: self.hub.upstream_version(),
            db_size: keys as i64,
            leader: id,
            raft_index: revision.max(0) as u64,
            raft_term: self.hub.header(revision).raft_term,
            raft_applied_index: revision.max(0) as u64,
            errors,
            db_size_in_use: keys as i64,
            is_learner: false,
            ..Default::default()
        }))
    }

    async fn defragment(
        &self,
        _request: Request<PbDefragmentRequest>,
    ) -> Result<Response<PbDefragmentResponse>, Status> {
        Err(read_only(&self.hub, "Defragment"))
    }

    async fn hash(
        &self,
        _request: Request<PbHashRequest>,
    ) -> Result<Response<PbHashResponse>, Status> {
        Err(read_only(&self.hub, "Hash"))
    }

    async fn hash_kv(
        &self,
        _request: Request<PbHashKvRequest>,
    ) -> Result<Response<PbHashKvResponse>, Status> {
        Err(read_only(&self.hub, "HashKV"))
    }

    type SnapshotStream = futures::stream::Empty<Result<PbSnapshotResponse, Status>>;

    async fn snapshot(
        &self,
        _request: Request<PbSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        Err(read_only(&self.hub, "Snapshot"))
    }

    async fn move_leader(
        &self,
        _request: Request<PbMoveLeaderRequest>,
    ) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(read_only(&self.hub, "MoveLeader"))
    }

    async fn downgrade(
        &self,
        _request: Request<PbDowngradeRequest>,
    ) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(read_only(&self.hub, "Downgrade"))
    }
}

#[derive(Debug, Clone)]
pub struct ClusterService {
    hub: Arc<Hub>,
}

impl ClusterService {
    pub fn new(hub: Arc<Hub>) -> ClusterService {
        ClusterService { hub }
    }
}

#[tonic::async_trait]
impl PbClusterService for ClusterService {
    async fn member_add(
        &self,
        _request: Request<PbMemberAddRequest>,
    ) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(read_only(&self.hub, "MemberAdd"))
    }

    async fn member_remove(
        &self,
        _request: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(read_only(&self.hub, "MemberRemove"))
    }

    async fn member_update(
        &self,
        _request: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(read_only(&self.hub, "MemberUpdate"))
    }

    /// Only the proxy itself: a client that syncs its endpoints from the
    /// member list keeps talking to the proxy, never to the etcd behind it.
    async fn member_list(
        &self,
        _request: Request<PbMemberListRequest>,
    ) -> Result<Response<PbMemberListResponse>, Status> {
        let revision = self.hub.with_cache(|c| c.revision());
        let id = &self.hub.identity;
        Ok(Response::new(PbMemberListResponse {
            header: Some(self.hub.header(revision)),
            members: vec![PbMember {
                id: id.member_id,
                name: id.name.clone(),
                peer_ur_ls: Vec::new(),
                client_ur_ls: vec![id.advertise_url.clone()],
                is_learner: false,
            }],
        }))
    }

    async fn member_promote(
        &self,
        _request: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(read_only(&self.hub, "MemberPromote"))
    }
}
