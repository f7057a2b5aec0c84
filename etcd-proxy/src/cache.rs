//! In-memory copy of the allowed prefix at one upstream revision, plus a bounded history of its events.
use std::collections::{BTreeMap, VecDeque};
use std::ops::Bound;

use etcd_client::proto::{PbCompare, PbEvent, PbKeyValue, PbRangeRequest, PbTargetUnion};

use crate::budget::{Exhausted, PER_KV_OVERHEAD};

/// `mvccpb.Event.EventType.PUT`.
pub const PUT: i32 = 0;
/// `mvccpb.Event.EventType.DELETE`.
pub const DELETE: i32 = 1;

/// Why a Range cannot be answered from the cache.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error(
        "mvcc: required revision has been compacted (revision {revision}, the proxy holds revisions from {floor} on)"
    )]
    Compacted { revision: i64, floor: i64 },
    #[error(
        "mvcc: required revision is a future revision (revision {revision}, current {current})"
    )]
    Future { revision: i64, current: i64 },
    /// The answer would pass a bound ([`crate::budget`]).
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
}

/// An upstream event at or below a revision the upstream had already reported
/// progress to: the progress report overtook the event (etcd before 3.4.25
/// and 3.5.8 answers a progress request at once with its current revision,
/// also while a watch is still catching up, etcd-io/etcd#15220), so the cache
/// claimed a revision it was not complete up to.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("upstream sent an event at revision {event} after reporting progress up to {progress}")]
pub struct Overtaken {
    pub event: i64,
    pub progress: i64,
}

/// Result of a Range served from the cache.
#[derive(Debug, Default, PartialEq)]
pub struct RangeResult {
    pub kvs: Vec<PbKeyValue>,
    pub count: i64,
    pub more: bool,
}

/// The cache: the current key-values under the prefix, the upstream revision
/// they are complete up to, and the recent events (with `prev_kv` filled in)
/// from which watches starting in the past are replayed.
#[derive(Debug)]
pub struct Cache {
    kvs: BTreeMap<Vec<u8>, PbKeyValue>,
    revision: i64,
    /// Revision of the last event applied (or of the list): an event at or
    /// below it is a repeat; one above it but at or below `revision` came
    /// after a progress report that had claimed it ([`Overtaken`]).
    applied: i64,
    /// Every event with a revision >= floor is in `history`.
    floor: i64,
    history: VecDeque<PbEvent>,
    history_cap: usize,
    synced: bool,
}

fn event_rev(e: &PbEvent) -> i64 {
    e.kv.as_ref().map_or(0, |kv| kv.mod_revision)
}

impl Cache {
    pub fn new(history_cap: usize) -> Cache {
        Cache {
            kvs: BTreeMap::new(),
            revision: 0,
            applied: 0,
            floor: 1,
            history: VecDeque::new(),
            history_cap: history_cap.max(1),
            synced: false,
        }
    }

    /// Replaces the contents with a complete list taken at `revision`; the
    /// history restarts there, so only watches from `revision + 1` on can be replayed.
    pub fn reset(&mut self, kvs: Vec<PbKeyValue>, revision: i64) {
        self.kvs = kvs.into_iter().map(|kv| (kv.key.clone(), kv)).collect();
        self.revision = revision;
        self.applied = revision;
        self.floor = revision + 1;
        self.history.clear();
        self.synced = true;
    }

    /// Applies upstream events in order and returns them with `prev_kv` taken
    /// from the cache (so the upstream watch need not ask for it). An event
    /// that a progress report overtook changes nothing: the cache must be
    /// listed again.
    pub fn apply(&mut self, events: Vec<PbEvent>) -> Result<Vec<PbEvent>, Overtaken> {
        if let Some(event) = events
            .iter()
            .map(event_rev)
            .find(|&r| r > self.applied && r <= self.revision)
        {
            return Err(Overtaken {
                event,
                progress: self.revision,
            });
        }
        let mut out = Vec::with_capacity(events.len());
        for mut e in events {
            let Some(kv) = e.kv.as_ref() else { continue };
            let rev = kv.mod_revision;
            if rev <= self.revision {
                // Already applied (a resumed watch may repeat the last revision).
                continue;
            }
            e.prev_kv = match e.r#type {
                DELETE => self.kvs.remove(&kv.key),
                _ => self.kvs.insert(kv.key.clone(), kv.clone()),
            };
            out.push(e);
        }
        if let Some(last) = out.last() {
            self.revision = self.revision.max(event_rev(last));
            self.applied = self.revision;
        }
        for e in &out {
            self.history.push_back(e.clone());
        }
        while self.history.len() > self.history_cap {
            if let Some(old) = self.history.pop_front() {
                self.floor = self.floor.max(event_rev(&old) + 1);
            }
        }
        Ok(out)
    }

    /// Records that the upstream has delivered every event up to `revision`
    /// (a progress notification).
    pub fn advance(&mut self, revision: i64) -> bool {
        if revision > self.revision {
            self.revision = revision;
            true
        } else {
            false
        }
    }

    pub fn revision(&self) -> i64 {
        self.revision
    }

    #[cfg(test)]
    pub fn floor(&self) -> i64 {
        self.floor
    }

    /// The fingerprint of what the cache holds (see
    /// [`crate::upstream::Fingerprint`]), to compare with the upstream's at
    /// [`Cache::revision`].
    pub fn fingerprint(&self) -> crate::upstream::Fingerprint {
        let mut f = crate::upstream::Fingerprinter::default();
        for kv in self.kvs.values() {
            f.add(kv);
        }
        f.finish()
    }

    pub fn key_count(&self) -> usize {
        self.kvs.len()
    }

    /// Marks the content as no longer a complete copy of the upstream (its
    /// history was lost and the re-list has not completed): reads and new
    /// watches are refused until the next [`Cache::reset`].
    pub fn invalidate(&mut self) {
        self.synced = false;
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    /// The events with revision >= `start`, or `Err(compact_revision)` when
    /// some of them are no longer held.
    #[cfg(test)]
    pub fn replay(&self, start: i64) -> Result<Vec<PbEvent>, i64> {
        if start < self.floor {
            return Err(self.floor - 1);
        }
        let from = self.history.partition_point(|e| event_rev(e) < start);
        Ok(self.history.range(from..).cloned().collect())
    }

    /// The next part of a replay: events with a revision from `start` to
    /// `upto` that `select` takes, cloned by `clone`, stopping at the first
    /// revision boundary after `max_bytes` (the events of one revision, one
    /// etcd transaction, stay in one part). Returns them with the revision
    /// the next part starts at (`upto + 1` when done), or
    /// `Err(compact_revision)` when `start` is no longer held.
    pub fn replay_part(
        &self,
        start: i64,
        upto: i64,
        max_bytes: usize,
        select: impl Fn(&PbEvent) -> bool,
        clone: impl Fn(&PbEvent) -> PbEvent,
    ) -> Result<(Vec<PbEvent>, i64), i64> {
        if start < self.floor {
            return Err(self.floor - 1);
        }
        let from = self.history.partition_point(|e| event_rev(e) < start);
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for e in self.history.range(from..) {
            let rev = event_rev(e);
            if rev > upto {
                break;
            }
            if bytes >= max_bytes && out.last().is_some_and(|l: &PbEvent| event_rev(l) != rev) {
                return Ok((out, rev));
            }
            if select(e) {
                let e = clone(e);
                bytes += prost::Message::encoded_len(&e);
                out.push(e);
            }
        }
        Ok((out, upto + 1))
    }

    /// Serves a RangeRequest without bounds (tests).
    #[cfg(test)]
    pub fn range(&self, req: &PbRangeRequest) -> Result<RangeResult, RangeError> {
        self.range_within(req, &mut |_| Ok(()))
    }

    /// Serves a RangeRequest (already confined to the prefix) from the cache.
    /// `take` is charged the answer's size before any key-value is cloned,
    /// and may refuse it ([`crate::budget::Meter::take`]).
    pub fn range_within(
        &self,
        req: &PbRangeRequest,
        take: &mut dyn FnMut(usize) -> Result<(), Exhausted>,
    ) -> Result<RangeResult, RangeError> {
        if req.revision > 0 && req.revision != self.revision {
            if req.revision > self.revision {
                return Err(RangeError::Future {
                    revision: req.revision,
                    current: self.revision,
                });
            }
            if req.revision < self.floor - 1 {
                return Err(RangeError::Compacted {
                    revision: req.revision,
                    floor: self.floor - 1,
                });
            }
        }
        let selected: Vec<&PbKeyValue> = if req.revision > 0 && req.revision < self.revision {
            self.select_at(&req.key, &req.range_end, req.revision)
        } else {
            self.select(&req.key, &req.range_end).collect()
        };
        let selected: Vec<&PbKeyValue> = selected
            .into_iter()
            .filter(|kv| {
                (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
                    && (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
                    && (req.min_create_revision == 0
                        || kv.create_revision >= req.min_create_revision)
                    && (req.max_create_revision == 0
                        || kv.create_revision <= req.max_create_revision)
            })
            .collect();
        let count = selected.len() as i64;
        if req.count_only {
            return Ok(RangeResult {
                kvs: Vec::new(),
                count,
                more: false,
            });
        }
        let mut selected = selected;
        sort(&mut selected, req.sort_target, req.sort_order);
        let limit = if req.limit > 0 {
            req.limit as usize
        } else {
            usize::MAX
        };
        let more = selected.len() > limit;
        let bytes = selected
            .iter()
            .take(limit)
            .map(|kv| {
                kv.key.len() + if req.keys_only { 0 } else { kv.value.len() } + PER_KV_OVERHEAD
            })
            .sum();
        take(bytes)?;
        let kvs = selected
            .into_iter()
            .take(limit)
            .map(|kv| {
                let mut kv = kv.clone();
                if req.keys_only {
                    kv.value.clear();
                }
                kv
            })
            .collect();
        Ok(RangeResult { kvs, count, more })
    }

    /// etcd's Txn compare (`applyCompare` in etcd 3.4): a range holds when
    /// every key in it holds; a missing key compares as the zero key-value,
    /// except that comparing its value always fails.
    pub fn compare(&self, c: &PbCompare) -> bool {
        let mut kvs = self.select(&c.key, &c.range_end).peekable();
        if kvs.peek().is_none() {
            return c.target != COMPARE_VALUE && compare_kv(c, &PbKeyValue::default());
        }
        kvs.all(|kv| compare_kv(c, kv))
    }

    /// The key-values of a range as they were at `revision` (>= floor - 1):
    /// the current ones with every later event in the range undone, newest
    /// first (each event carries the key-value it replaced, if any).
    fn select_at<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
        revision: i64,
    ) -> Vec<&'a PbKeyValue> {
        let mut at: BTreeMap<&[u8], &PbKeyValue> = self
            .select(key, range_end)
            .map(|kv| (kv.key.as_slice(), kv))
            .collect();
        let from = self.history.partition_point(|e| event_rev(e) <= revision);
        for e in self.history.range(from..).rev() {
            let Some(kv) = e.kv.as_ref() else { continue };
            if !in_range(key, range_end, &kv.key) {
                continue;
            }
            match &e.prev_kv {
                Some(prev) => {
                    at.insert(prev.key.as_slice(), prev);
                }
                None => {
                    at.remove(kv.key.as_slice());
                }
            }
        }
        at.into_values().collect()
    }

    fn select<'a>(
        &'a self,
        key: &'a [u8],
        range_end: &'a [u8],
    ) -> Box<dyn Iterator<Item = &'a PbKeyValue> + 'a> {
        if range_end.is_empty() {
            return Box::new(self.kvs.get(key).into_iter());
        }
        if range_end == [0] {
            return Box::new(
                self.kvs
                    .range::<[u8], _>((Bound::Included(key), Bound::Unbounded))
                    .map(|(_, v)| v),
            );
        }
        if range_end <= key {
            return Box::new(std::iter::empty());
        }
        Box::new(
            self.kvs
                .range::<[u8], _>((Bound::Included(key), Bound::Excluded(range_end)))
                .map(|(_, v)| v),
        )
    }
}

/// `Compare.CompareTarget.VALUE`.
const COMPARE_VALUE: i32 = 3;

/// etcd's `compareKV`: targets VERSION=0 CREATE=1 MOD=2 VALUE=3 LEASE=4,
/// results EQUAL=0 GREATER=1 LESS=2 NOT_EQUAL=3; a missing target value is
/// the zero value.
fn compare_kv(c: &PbCompare, kv: &PbKeyValue) -> bool {
    use PbTargetUnion as U;
    // etcd reads the union variant that matches the target; any other is 0.
    let ord = match (c.target, &c.target_union) {
        (0, Some(U::Version(v))) => kv.version.cmp(v),
        (0, _) => kv.version.cmp(&0),
        (1, Some(U::CreateRevision(v))) => kv.create_revision.cmp(v),
        (1, _) => kv.create_revision.cmp(&0),
        (2, Some(U::ModRevision(v))) => kv.mod_revision.cmp(v),
        (2, _) => kv.mod_revision.cmp(&0),
        (COMPARE_VALUE, Some(U::Value(v))) => kv.value.as_slice().cmp(v.as_slice()),
        (COMPARE_VALUE, _) => kv.value.as_slice().cmp(&[]),
        (4, Some(U::Lease(v))) => kv.lease.cmp(v),
        (4, _) => kv.lease.cmp(&0),
        _ => std::cmp::Ordering::Equal,
    };
    match c.result {
        0 => ord.is_eq(),
        1 => ord.is_gt(),
        2 => ord.is_lt(),
        3 => ord.is_ne(),
        _ => true,
    }
}

/// etcd's sort: targets KEY=0 VERSION=1 CREATE=2 MOD=3 VALUE=4, orders
/// NONE=0 ASCEND=1 DESCEND=2; NONE keeps key order.
fn sort(kvs: &mut [&PbKeyValue], target: i32, order: i32) {
    if order == 0 {
        return;
    }
    match target {
        1 => kvs.sort_by_key(|kv| kv.version),
        2 => kvs.sort_by_key(|kv| kv.create_revision),
        3 => kvs.sort_by_key(|kv| kv.mod_revision),
        4 => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
        _ => {}
    }
    if order == 2 {
        kvs.reverse();
    }
}

/// Whether `key` is in the etcd range (key, range_end) of a watcher.
pub fn in_range(start: &[u8], range_end: &[u8], key: &[u8]) -> bool {
    if range_end.is_empty() {
        key == start
    } else if range_end == [0] {
        key >= start
    } else {
        key >= start && key < range_end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, val: &str, create: i64, modr: i64, version: i64) -> PbKeyValue {
        PbKeyValue {
            key: key.into(),
            value: val.into(),
            create_revision: create,
            mod_revision: modr,
            version,
            lease: 0,
        }
    }

    fn put(k: PbKeyValue) -> PbEvent {
        PbEvent {
            r#type: PUT,
            kv: Some(k),
            prev_kv: None,
        }
    }

    fn del(key: &str, rev: i64) -> PbEvent {
        PbEvent {
            r#type: DELETE,
            kv: Some(PbKeyValue {
                key: key.into(),
                mod_revision: rev,
                ..Default::default()
            }),
            prev_kv: None,
        }
    }

    fn req(key: &str, end: &str) -> PbRangeRequest {
        PbRangeRequest {
            key: key.into(),
            range_end: end.into(),
            ..Default::default()
        }
    }

    fn keys(r: &RangeResult) -> Vec<String> {
        r.kvs.iter().map(|kv| show(&kv.key)).collect()
    }

    fn show(b: &[u8]) -> String {
        String::from_utf8_lossy(b).into_owned()
    }

    fn seeded() -> Cache {
        let mut c = Cache::new(4);
        c.reset(
            vec![
                kv("p/a", "1", 2, 2, 1),
                kv("p/b", "2", 3, 3, 1),
                kv("p/c", "3", 4, 5, 2),
            ],
            10,
        );
        c
    }

    #[test]
    fn range_single_prefix_limit_count_keys_only() {
        let c = seeded();
        assert_eq!(keys(&c.range(&req("p/b", "")).unwrap()), vec!["p/b"]);
        assert_eq!(
            keys(&c.range(&req("p/x", "")).unwrap()),
            Vec::<String>::new()
        );
        let all = c.range(&req("p/", "p0")).unwrap();
        assert_eq!(keys(&all), vec!["p/a", "p/b", "p/c"]);
        assert_eq!(all.count, 3);
        let mut r = req("p/", "p0");
        r.limit = 2;
        let lim = c.range(&r).unwrap();
        assert_eq!((keys(&lim).len(), lim.count, lim.more), (2, 3, true));
        r.limit = 0;
        r.count_only = true;
        let co = c.range(&r).unwrap();
        assert_eq!((co.kvs.len(), co.count), (0, 3));
        r.count_only = false;
        r.keys_only = true;
        assert!(
            c.range(&r)
                .unwrap()
                .kvs
                .iter()
                .all(|kv| kv.value.is_empty())
        );
        let mut d = req("p/", "p0");
        d.sort_order = 2;
        assert_eq!(keys(&c.range(&d).unwrap()), vec!["p/c", "p/b", "p/a"]);
        d.sort_target = 3;
        d.sort_order = 1;
        d.min_mod_revision = 3;
        assert_eq!(keys(&c.range(&d).unwrap()), vec!["p/b", "p/c"]);
    }

    #[test]
    fn range_revision_rules() {
        let mut c = seeded();
        let mut r = req("p/", "p0");
        r.revision = 10;
        assert!(c.range(&r).is_ok());
        r.revision = 11;
        assert!(matches!(c.range(&r), Err(RangeError::Future { .. })));
        r.revision = 5;
        assert!(matches!(c.range(&r), Err(RangeError::Compacted { .. })));
        c.apply(vec![put(kv("p/d", "4", 11, 11, 1))]).unwrap();
        c.apply(vec![put(kv("p/a", "1b", 2, 12, 2)), del("p/b", 13)])
            .unwrap();
        // Past revisions still in the history are served as they were.
        let at = |c: &Cache, rev: i64| {
            let mut r = req("p/", "p0");
            r.revision = rev;
            c.range(&r)
                .unwrap()
                .kvs
                .iter()
                .map(|kv| format!("{}={}@{}", show(&kv.key), show(&kv.value), kv.mod_revision))
                .collect::<Vec<_>>()
        };
        assert_eq!(at(&c, 10), ["p/a=1@2", "p/b=2@3", "p/c=3@5"]);
        assert_eq!(at(&c, 11), ["p/a=1@2", "p/b=2@3", "p/c=3@5", "p/d=4@11"]);
        assert_eq!(at(&c, 12), ["p/a=1b@12", "p/b=2@3", "p/c=3@5", "p/d=4@11"]);
        assert_eq!(at(&c, 13), ["p/a=1b@12", "p/c=3@5", "p/d=4@11"]);
        let mut one = req("p/b", "");
        one.revision = 12;
        assert_eq!(keys(&c.range(&one).unwrap()), ["p/b"]);
        // Capacity 4: two more events push revision 11 out; 10 is compacted.
        c.apply(vec![
            put(kv("p/e", "5", 14, 14, 1)),
            put(kv("p/f", "6", 15, 15, 1)),
        ])
        .unwrap();
        r.revision = 10;
        assert!(matches!(c.range(&r), Err(RangeError::Compacted { .. })));
        assert_eq!(at(&c, 11).len(), 4);
    }

    #[test]
    fn apply_fills_prev_kv_and_skips_repeats() {
        let mut c = seeded();
        let out = c
            .apply(vec![
                put(kv("p/a", "9", 2, 11, 2)),
                del("p/b", 12),
                put(kv("p/z", "0", 13, 13, 1)),
            ])
            .unwrap();
        assert_eq!(out.len(), 3);
        assert_eq!(out[0].prev_kv.as_ref().unwrap().value, b"1");
        assert_eq!(out[1].prev_kv.as_ref().unwrap().value, b"2");
        assert!(out[2].prev_kv.is_none());
        assert_eq!(c.revision(), 13);
        assert_eq!(
            keys(&c.range(&req("p/", "p0")).unwrap()),
            vec!["p/a", "p/c", "p/z"]
        );
        // A resumed upstream watch may repeat revision 13: applied once only.
        assert!(
            c.apply(vec![put(kv("p/z", "0", 13, 13, 1))])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn an_event_after_a_progress_report_that_claimed_it_is_overtaken() {
        let mut c = seeded();
        c.apply(vec![put(kv("p/a", "9", 2, 11, 2))]).unwrap();
        // Progress to 14 arrives before the events of 12..=14.
        assert!(c.advance(14));
        let e = c.apply(vec![put(kv("p/x", "1", 12, 12, 1))]).unwrap_err();
        assert_eq!(
            e,
            Overtaken {
                event: 12,
                progress: 14
            }
        );
        assert_eq!(
            keys(&c.range(&req("p/x", "")).unwrap()),
            Vec::<String>::new()
        );
        // A repeat of the last applied event is still only a repeat, and
        // events past the progress apply.
        assert!(
            c.apply(vec![put(kv("p/a", "9", 2, 11, 2))])
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            c.apply(vec![put(kv("p/y", "1", 15, 15, 1))]).unwrap().len(),
            1
        );
        assert_eq!(c.revision(), 15);
    }

    #[test]
    fn replay_from_history_or_compacted() {
        let mut c = seeded();
        assert_eq!(c.replay(11), Ok(vec![]));
        assert_eq!(c.replay(10), Err(10));
        for r in 11..=16 {
            c.apply(vec![put(kv("p/a", "x", 2, r, r - 9))]).unwrap();
        }
        // Capacity 4: revisions 13..=16 held, floor 13.
        assert_eq!(c.floor(), 13);
        assert_eq!(c.replay(12), Err(12));
        let revs: Vec<i64> = c.replay(14).unwrap().iter().map(event_rev).collect();
        assert_eq!(revs, vec![14, 15, 16]);
        // In parts: a part ends at the first revision boundary past the
        // size, the next starts there, the last says upto + 1.
        let all = |_: &PbEvent| true;
        let copy = |e: &PbEvent| e.clone();
        let (p, next) = c.replay_part(13, 16, 1, all, copy).unwrap();
        assert_eq!(
            (p.iter().map(event_rev).collect::<Vec<_>>(), next),
            (vec![13], 14)
        );
        let (p, next) = c.replay_part(14, 15, 1 << 20, all, copy).unwrap();
        assert_eq!(
            (p.iter().map(event_rev).collect::<Vec<_>>(), next),
            (vec![14, 15], 16)
        );
        let (p, next) = c
            .replay_part(14, 16, 1 << 20, |e| event_rev(e) == 16, copy)
            .unwrap();
        assert_eq!(
            (p.iter().map(event_rev).collect::<Vec<_>>(), next),
            (vec![16], 17)
        );
        assert_eq!(c.replay_part(12, 16, 1, all, copy), Err(12));
        assert!(c.advance(20));
        assert!(!c.advance(19));
        assert_eq!(c.revision(), 20);
    }

    #[test]
    fn watcher_range_membership() {
        assert!(in_range(b"p/a", b"", b"p/a"));
        assert!(!in_range(b"p/a", b"", b"p/ab"));
        assert!(in_range(b"p/", b"p0", b"p/zz"));
        assert!(!in_range(b"p/", b"p0", b"p0"));
        assert!(in_range(b"p/", b"\0", b"zzz"));
    }
}
