//! The sync layer: the agent's view of one remote cluster, from `/status`:
//! connected, synced, what it holds, every record it rejected or
//! quarantined (with its code and owning cluster), the age of the last change.
use super::{Check, Layer, check};
use crate::{
    desired::RecordState,
    status::{StatusReport, unix_now},
};

const L: Layer = Layer::Sync;

fn age(t: f64) -> String {
    let s = (unix_now() - t).max(0.0);
    if s < 120.0 {
        format!("{s:.0}s ago")
    } else if s < 7200.0 {
        format!("{:.0}m ago", s / 60.0)
    } else {
        format!("{:.1}h ago", s / 3600.0)
    }
}

/// The sync checks of `cluster` in the agent's status `s`.
pub fn check_cluster(cluster: &str, s: &StatusReport) -> Vec<Check> {
    let c = Some(cluster);
    let mut out = Vec::new();
    let Some(r) = s.remotes.get(cluster) else {
        out.push(Check::fail(
            L,
            c,
            check::CONNECTED,
            format!("the agent follows no cluster {cluster} (it follows: {})", s.remotes.keys().cloned().collect::<Vec<_>>().join(", ")),
            "the agent reads another Secret directory than this command (give --clustermesh-config as the agent's), or has not read the entry yet (it scans every --secret-poll-ms)",
        ));
        return out;
    };
    if !r.connected {
        out.push(Check::fail(
            L,
            c,
            check::CONNECTED,
            format!("not connected ({} failures): {}", r.failures, r.last_error.as_deref().unwrap_or("no error reported yet")),
            "the agent retries with backoff; the error says why (see the reach and authz layers, and docs/troubleshooting.md, \"A remote cluster\")",
        ));
        return out;
    }
    out.push(Check::pass(
        L,
        c,
        check::CONNECTED,
        format!("connected to {}", r.endpoints.join(", ")),
    ));
    if !r.synced {
        out.push(Check::fail(
            L,
            c,
            check::SYNCED,
            format!("connected but not synced ({} lists, {} compactions)", r.lists, r.compactions),
            "the remote's proxy has not listed its upstream yet (its /readyz says synced=false), or the agent is re-listing after a compaction; a count of compactions that keeps climbing means the agent cannot keep up",
        ));
        return out;
    }
    out.push(Check::pass(
        L,
        c,
        check::SYNCED,
        format!(
            "synced {}{}",
            r.last_sync.map(age).unwrap_or_default(),
            r.sync_seconds
                .map(|s| format!(" (the list took {s:.1}s)"))
                .unwrap_or_default()
        ),
    ));
    let rejected: usize = r.rejected_by_reason.values().sum();
    out.push(Check::pass(
        L,
        c,
        check::RECORDS,
        format!(
            "{} records held, {} node(s) programmed, {rejected} rejected{}",
            r.entries,
            r.nodes_programmed,
            r.empty_grace_until
                .map(|_| "; came back empty: its routes are kept for the grace period")
                .unwrap_or_default()
        ),
    ));
    for rec in &r.records {
        if let RecordState::Rejected(j) = &rec.state {
            let cidrs = rec
                .pod_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ");
            out.push(Check::warn(
                L,
                c,
                check::REJECTED_RECORD,
                format!("{} of cluster {} ({}{}) rejected [{}]: {}", rec.key, rec.cluster, rec.kind, if cidrs.is_empty() { String::new() } else { format!(" {cidrs}") }, j.code, j.message),
                format!("never programmed; see code `{}` in docs/troubleshooting.md, \"A remote record is rejected\" (fixing or deleting the record in the remote mesh etcd takes effect at once)", j.code),
            ));
        }
    }
    out.push(Check::pass(
        L,
        c,
        check::LAST_EVENT,
        match r.last_event {
            Some(t) => format!("last change {}", age(t)),
            None => "no change since the agent connected".to_string(),
        },
    ));
    out
}
