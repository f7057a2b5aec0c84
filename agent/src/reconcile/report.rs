//! Log lines of rejected records: one per (cluster, reason code) with the number
//! of records, so that a cluster rejected as a whole (every node record
//! carries its cluster's rejection) costs one line, not one per node.
//! Remote-supplied text (keys, messages naming remote nodes) is written with
//! `Debug` escaping, so a key holding a newline or ESC cannot forge a log line.
use std::collections::BTreeMap;

use crate::desired::Rejection;

/// One log line's worth of rejections: the records sharing a cause.
#[derive(Debug, PartialEq, Eq)]
pub struct Group<'a> {
    /// The remote cluster.
    pub cluster: &'a str,
    /// The reason code.
    pub code: &'a str,
    /// The message (the cause, with its hint).
    pub message: &'a str,
    /// Records with this cause.
    pub records: usize,
    /// The first of their keys.
    pub first_key: &'a str,
}

/// The rejections of one pass grouped by (cluster, code), in order; the
/// message shown is that of the first key (messages name their node, so
/// records of one cause differ in them).
pub fn group(rejected: &[(String, String, Rejection)]) -> Vec<Group<'_>> {
    let mut groups: BTreeMap<(&str, &str), (usize, &str, &str)> = BTreeMap::new();
    for (cluster, key, why) in rejected {
        let e = groups
            .entry((cluster, &why.code))
            .or_insert((0, key, &why.message));
        e.0 += 1;
        if key.as_str() < e.1 {
            e.1 = key;
            e.2 = &why.message;
        }
    }
    groups
        .into_iter()
        .map(|((cluster, code), (records, first_key, message))| Group {
            cluster,
            code,
            message,
            records,
            first_key,
        })
        .collect()
}

/// Logs `rejected` once per cause.
pub fn log_rejections(rejected: &[(String, String, Rejection)]) {
    for g in group(rejected) {
        if g.records == 1 {
            tracing::warn!(cluster = ?g.cluster, key = ?g.first_key, reason = %g.code, message = ?g.message, "remote record rejected");
        } else {
            tracing::warn!(cluster = ?g.cluster, records = g.records, first_key = ?g.first_key, reason = %g.code, first_message = ?g.message, "remote records rejected for one reason (podmesh status --rejected lists them)");
        }
    }
}
