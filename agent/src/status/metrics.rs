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
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CniLabel {
    cni: String,
    severity: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PeerLabel {
    cluster: String,
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LocalReasonLabel {
    reason: String,
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
    let lists = Family::<ClusterLabel, Counter>::default();
    let compactions = Family::<ClusterLabel, Counter>::default();
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
        lists.get_or_create(&l).inc_by(r.lists);
        compactions.get_or_create(&l).inc_by(r.compactions);
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
        "remote_lists",
        "Complete lists started: one per connection, and one per compaction the watch fell behind",
        lists,
    );
    reg.register(
        "remote_watch_compactions",
        "Times the watch fell behind a compaction of the remote's history and the agent re-listed",
        compactions,
    );
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
    let node_error = Family::<LocalReasonLabel, Gauge>::default();
    if let Some(p) = &s.local.node_error {
        node_error
            .get_or_create(&LocalReasonLabel {
                reason: p.code.clone(),
            })
            .set(1);
    }
    reg.register(
        "local_node_error",
        "1 while this node's Kubernetes Node cannot be read (or lacks its address or Pod CIDRs), by reason; the fix is in /status local.node_error",
        node_error,
    );
    let outside = Gauge::<i64>::default();
    outside.set(i64::try_from(s.local.pod_cidrs_outside_cluster.len()).unwrap_or(i64::MAX));
    reg.register(
        "local_pod_cidrs_outside_cluster",
        "Pod CIDRs of this node outside every declared cluster Pod CIDR (remote clusters reject the node)",
        outside,
    );
    let conflict = Gauge::<i64>::default();
    conflict.set(i64::from(s.local.cluster_record_conflict.is_some()));
    reg.register(
        "cluster_record_conflict",
        "1 when this cluster's record in the local mesh etcd differs from this agent's configuration (left as it is; the reason is in /status)",
        conflict,
    );
    let routes = Gauge::<i64>::default();
    routes.set(i64::try_from(s.routes_installed).unwrap_or(i64::MAX));
    reg.register("datapath_routes", "Routes the datapath holds", routes);
    let retries = Counter::<u64>::default();
    retries.inc_by(s.reconcile_retries);
    reg.register(
        "reconcile_retries",
        "Times programming the datapath failed and was retried after a backoff",
        retries,
    );
    if let Some(c) = &s.datapath_packets {
        let packets = Family::<ResultLabel, Counter>::default();
        for (result, n) in [
            ("forwarded", c.forwarded),
            ("miss", c.miss),
            ("not_ip_unicast", c.not_ipv4),
            ("tunnel_key_failed", c.tunnel_key_failed),
        ] {
            packets.get_or_create(&ResultLabel { result }).inc_by(n);
        }
        reg.register(
            "datapath_packets",
            "Packets the eBPF program handled: forwarded into the tunnel, dropped for a miss (no remote Pod CIDR holds the destination) or a refused tunnel key, passed on as not IP unicast",
            packets,
        );
    }
    let cni = Family::<CniLabel, Gauge>::default();
    for f in &s.cni {
        cni.get_or_create(&CniLabel {
            cni: f.cni.clone(),
            severity: f.severity.as_str(),
        })
        .set(1);
    }
    reg.register(
        "node_cni_info",
        "1 for each CNI (or component) this node appears to run, by the severity of its finding (warning: the operator must set something; see podmesh status)",
        cni,
    );
    let strict = Gauge::<i64>::default();
    strict.set(i64::try_from(s.strict_rp_filter.len()).unwrap_or(i64::MAX));
    reg.register(
        "strict_rp_filter_devices",
        "Devices of this node with strict reverse-path filtering (named in /status)",
        strict,
    );
    if let Some(x) = &s.masquerade_exemption {
        let installed = Gauge::<i64>::default();
        installed.set(i64::from(x.installed && x.error.is_none()));
        reg.register(
            "masquerade_exemption_ok",
            "1 when the masquerade exemption (nftables table inet podmesh) is in place and its last change succeeded; 0: pod traffic to remote clusters may leave with the node's address (the reason is in /status)",
            installed,
        );
        let cidrs = Gauge::<i64>::default();
        cidrs.set(i64::try_from(x.cidrs).unwrap_or(i64::MAX));
        reg.register(
            "masquerade_exemption_cidrs",
            "Remote Pod CIDRs exempt from the CNI's masquerade",
            cidrs,
        );
        let repairs = Counter::<u64>::default();
        repairs.inc_by(x.repairs);
        reg.register(
            "masquerade_exemption_repairs",
            "Times the exemption's table was found removed or altered and set up again",
            repairs,
        );
    }
    if let Some(w) = &s.wireguard {
        wireguard_metrics(&mut reg, w);
    }
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out.clear();
    }
    out
}

/// Per remote node: the handshake age and the bytes each way; the nodes in clear.
fn wireguard_metrics(reg: &mut Registry, w: &super::WireguardStatus) {
    let age = Family::<PeerLabel, Gauge>::default();
    let rx = Family::<PeerLabel, Counter>::default();
    let tx = Family::<PeerLabel, Counter>::default();
    for p in &w.peers {
        let l = PeerLabel {
            cluster: p.cluster.clone(),
            node: p.node.clone(),
        };
        if let Some(a) = p.latest_handshake_age {
            age.get_or_create(&l)
                .set(i64::try_from(a).unwrap_or(i64::MAX));
        }
        rx.get_or_create(&l).inc_by(p.rx_bytes);
        tx.get_or_create(&l).inc_by(p.tx_bytes);
    }
    reg.register(
        "wireguard_latest_handshake_age_seconds",
        "Seconds since the latest WireGuard handshake with each remote node (absent: none yet)",
        age,
    );
    reg.register(
        "wireguard_rx_bytes",
        "Bytes received through WireGuard from each remote node",
        rx,
    );
    reg.register(
        "wireguard_tx_bytes",
        "Bytes sent through WireGuard to each remote node",
        tx,
    );
    let peers = Gauge::<i64>::default();
    peers.set(i64::try_from(w.peers.len()).unwrap_or(i64::MAX));
    reg.register(
        "wireguard_peers",
        "WireGuard peers (remote nodes reached encrypted)",
        peers,
    );
    let clear = Gauge::<i64>::default();
    clear.set(i64::try_from(w.unencrypted.len()).unwrap_or(i64::MAX));
    reg.register(
        "wireguard_unencrypted_nodes",
        "Remote nodes reached in clear because they publish no WireGuard key (named in /status)",
        clear,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datapath::Counters;

    #[test]
    fn cluster_record_conflict_is_a_zero_or_one_gauge() {
        let mut s = StatusReport::default();
        assert!(
            render(&s)
                .lines()
                .any(|l| l == "podmesh_cluster_record_conflict 0")
        );
        s.local.cluster_record_conflict = Some("podmesh/v1/clusters/east holds …".into());
        assert!(
            render(&s)
                .lines()
                .any(|l| l == "podmesh_cluster_record_conflict 1")
        );
    }

    #[test]
    fn a_node_not_read_or_out_of_range_is_a_gauge() {
        let mut s = StatusReport::default();
        let out = render(&s);
        assert!(!out.contains("podmesh_local_node_error{"), "{out}");
        assert!(
            out.lines()
                .any(|l| l == "podmesh_local_pod_cidrs_outside_cluster 0")
        );
        s.local.node_error = Some(crate::status::LocalProblem {
            code: "node-not-found".into(),
            message: "no Node named n1".into(),
        });
        s.local.pod_cidrs_outside_cluster = vec!["fd00:9::/64".parse().unwrap()];
        let out = render(&s);
        for line in [
            "podmesh_local_node_error{reason=\"node-not-found\"} 1",
            "podmesh_local_pod_cidrs_outside_cluster 1",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in:\n{out}");
        }
    }

    #[test]
    fn each_cni_finding_is_a_gauge_with_its_severity() {
        use crate::cni::{CniFinding, Severity};
        let mut s = StatusReport::default();
        for (cni, severity) in [("flannel", Severity::Info), ("cilium", Severity::Warning)] {
            s.cni.push(CniFinding {
                cni: cni.into(),
                severity,
                evidence: vec![],
                podmesh: String::new(),
                action: String::new(),
            });
        }
        let out = render(&s);
        for line in [
            "podmesh_node_cni_info{cni=\"flannel\",severity=\"info\"} 1",
            "podmesh_node_cni_info{cni=\"cilium\",severity=\"warning\"} 1",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in:\n{out}");
        }
    }

    #[test]
    fn the_masquerade_exemption_is_shown_with_its_failure() {
        let mut s = StatusReport::default();
        assert!(!render(&s).contains("masquerade_exemption"));
        s.masquerade_exemption = Some(crate::datapath::masq::ExemptionStatus {
            installed: true,
            cidrs: 4,
            repairs: 1,
            error: Some("cannot run nft".into()),
        });
        let out = render(&s);
        for line in [
            "podmesh_masquerade_exemption_ok 0",
            "podmesh_masquerade_exemption_cidrs 4",
            "podmesh_masquerade_exemption_repairs_total 1",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in:\n{out}");
        }
    }

    #[test]
    fn packet_counters_are_shown_only_when_the_datapath_has_them() {
        let mut s = StatusReport::default();
        assert!(!render(&s).contains("podmesh_datapath_packets"));
        s.datapath_packets = Some(Counters {
            forwarded: 7,
            miss: 3,
            not_ipv4: 1,
            tunnel_key_failed: 0,
        });
        let out = render(&s);
        for line in [
            "podmesh_datapath_packets_total{result=\"forwarded\"} 7",
            "podmesh_datapath_packets_total{result=\"miss\"} 3",
            "podmesh_datapath_packets_total{result=\"not_ip_unicast\"} 1",
            "podmesh_datapath_packets_total{result=\"tunnel_key_failed\"} 0",
        ] {
            assert!(out.lines().any(|l| l == line), "no {line} in:\n{out}");
        }
    }
}
