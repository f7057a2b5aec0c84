//! Prometheus exposition of the status, rendered from a snapshot at scrape time so
//! that a removed remote cluster disappears from the metrics too.
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use super::StatusReport;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClusterLabel {
    cluster: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    cluster: String,
    reason: String,
}

/// The metrics of `s` in the Prometheus text format.
pub fn render(s: &StatusReport) -> String {
    let mut reg = Registry::with_prefix("podmesh");
    let ready = Family::<ClusterLabel, Gauge>::default();
    let connected = Family::<ClusterLabel, Gauge>::default();
    let nodes = Family::<ClusterLabel, Gauge>::default();
    let entries = Family::<ClusterLabel, Gauge>::default();
    let failures = Family::<ClusterLabel, Counter>::default();
    let last_failure = Family::<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let sync_seconds = Family::<ClusterLabel, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let grace = Family::<ClusterLabel, Gauge>::default();
    let rejected = Family::<ReasonLabel, Gauge>::default();
    let rejections = Family::<ReasonLabel, Counter>::default();
    for (name, r) in &s.remotes {
        let l = ClusterLabel {
            cluster: name.clone(),
        };
        ready
            .get_or_create(&l)
            .set(i64::from(r.connected && r.synced));
        connected.get_or_create(&l).set(i64::from(r.connected));
        nodes
            .get_or_create(&l)
            .set(i64::try_from(r.nodes_programmed).unwrap_or(i64::MAX));
        entries
            .get_or_create(&l)
            .set(i64::try_from(r.entries).unwrap_or(i64::MAX));
        failures.get_or_create(&l).inc_by(r.failures);
        last_failure
            .get_or_create(&l)
            .set(r.last_failure.unwrap_or(0.0));
        sync_seconds
            .get_or_create(&l)
            .set(r.sync_seconds.unwrap_or(0.0));
        grace
            .get_or_create(&l)
            .set(i64::from(r.empty_grace_until.is_some()));
        for (reason, n) in &r.rejected_by_reason {
            rejected
                .get_or_create(&ReasonLabel {
                    cluster: name.clone(),
                    reason: reason.clone(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }
    for (cluster, by) in &s.rejections_total {
        for (reason, n) in by {
            rejections
                .get_or_create(&ReasonLabel {
                    cluster: cluster.clone(),
                    reason: reason.clone(),
                })
                .inc_by(*n);
        }
    }
    reg.register(
        "remote_ready",
        "1 when the remote cluster is connected and synced",
        ready,
    );
    reg.register(
        "remote_connected",
        "1 when connected to the remote cluster's etcd",
        connected,
    );
    reg.register(
        "remote_nodes",
        "Remote nodes whose routes are programmed",
        nodes,
    );
    reg.register(
        "remote_entries",
        "Entries held for the remote cluster",
        entries,
    );
    reg.register("remote_failures", "Connection and watch failures", failures);
    reg.register(
        "remote_last_failure_timestamp_seconds",
        "Unix time of the last failure (0: none)",
        last_failure,
    );
    reg.register(
        "remote_sync_duration_seconds",
        "Duration of the last complete list",
        sync_seconds,
    );
    reg.register(
        "remote_empty_grace",
        "1 while a remote that came back empty is in its grace period",
        grace,
    );
    reg.register(
        "remote_rejected_records",
        "Records currently rejected, by reason",
        rejected,
    );
    reg.register(
        "remote_rejections",
        "Records rejected since start, by reason",
        rejections,
    );
    let published = Gauge::<i64>::default();
    published.set(i64::from(s.local.published));
    reg.register(
        "local_node_published",
        "1 when this node's record is published under a live lease",
        published,
    );
    let routes = Gauge::<i64>::default();
    routes.set(i64::try_from(s.routes_installed).unwrap_or(i64::MAX));
    reg.register("datapath_routes", "Routes the datapath holds", routes);
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}
