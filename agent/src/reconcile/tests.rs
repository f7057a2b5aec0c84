//! The reconciler's error policy against an in-memory datapath with faults
//! injected: refused entries become rejections, failures back off.
use std::{
    collections::BTreeSet,
    io::Write,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
};

use super::*;
use crate::{
    datapath::{PruneReport, Refusal, memory::MemoryDatapath},
    desired::{RecordState, code, decode::decode},
    model::{cluster_key, node_key},
};

/// The in-memory datapath, with faults: every upsert fails while `fail` is
/// set; entries in `refuse` are refused (the others installed).
#[derive(Clone, Debug, Default)]
struct Faulty {
    inner: MemoryDatapath,
    fail: Arc<AtomicBool>,
    refuse: Arc<Mutex<BTreeSet<IpNet>>>,
    upserts: Arc<AtomicUsize>,
}

impl Datapath for Faulty {
    async fn upsert(&mut self, routes: &[RemoteRoute]) -> Result<(), DatapathError> {
        self.upserts.fetch_add(1, Ordering::SeqCst);
        if self.fail.load(Ordering::SeqCst) {
            return Err(DatapathError::Op {
                op: "upsert route",
                cidr: routes[0].cidr,
                others: 0,
                source: std::io::Error::from_raw_os_error(libc::EBUSY),
            });
        }
        let refuse = self.refuse.lock().unwrap().clone();
        let (bad, good): (Vec<RemoteRoute>, Vec<RemoteRoute>) = routes
            .iter()
            .cloned()
            .partition(|r| refuse.contains(&r.cidr));
        self.inner.upsert(&good).await?;
        if bad.is_empty() {
            return Ok(());
        }
        Err(DatapathError::Refused(
            bad.iter()
                .map(|r| Refusal {
                    cidr: r.cidr,
                    cluster: r.cluster.clone(),
                    node: r.node.clone(),
                    reason: crate::datapath::RefusalReason::NoVtepMac { mode: "ebpf" },
                })
                .collect(),
        ))
    }
    async fn delete(&mut self, cidrs: &[IpNet]) -> Result<(), DatapathError> {
        self.inner.delete(cidrs).await
    }
    async fn prune(&mut self, keep: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
        self.inner.prune(keep).await
    }
    async fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
        self.inner.installed().await
    }
}

/// One synced remote, east (10.1.0.0/16) with nodes e1 and e2.
fn east() -> MeshCache {
    let cache = MeshCache::new();
    let g = cache.begin_list("east");
    let mut rev = 0;
    let mut put = |key: String, value: serde_json::Value| {
        rev += 1;
        let e = decode("east", &key, value.to_string().as_bytes(), rev, rev);
        cache.put("east", g, key, e);
    };
    put(
        cluster_key("east"),
        serde_json::json!({"name": "east", "id": 1, "podCIDRs": ["10.1.0.0/16"], "serviceCIDRs": []}),
    );
    for (i, n) in ["e1", "e2"].iter().enumerate() {
        put(
            node_key("east", n),
            serde_json::json!({"name": n, "cluster": "east", "clusterID": 1,
                "addresses": [format!("192.168.1.{}", i + 1)],
                "podCIDRs": [format!("10.1.{}.0/24", i + 1)]}),
        );
    }
    cache.prune_stale("east", g);
    cache
}

fn local() -> LocalRanges {
    LocalRanges {
        cluster: "home".into(),
        cluster_id: 9,
        pod: vec!["10.9.0.0/16".parse().unwrap()],
        ..LocalRanges::default()
    }
}

fn setup() -> (Faulty, Status, Reconciler<Faulty>) {
    let dp = Faulty::default();
    let status = Status::new("home", "n1");
    status.remote("east", |_| {});
    let rec = Reconciler::new(dp.clone(), local(), east(), status.clone());
    (dp, status, rec)
}

fn state_of(s: &crate::status::StatusReport, key: &str) -> RecordState {
    s.remotes["east"]
        .records
        .iter()
        .find(|r| r.key == key)
        .map(|r| r.state.clone())
        .unwrap_or_else(|| panic!("no record {key}"))
}

fn routes(dp: &Faulty) -> Vec<String> {
    dp.inner
        .snapshot()
        .keys()
        .map(ToString::to_string)
        .collect()
}

#[tokio::test]
async fn a_refused_entry_is_its_records_rejection_not_a_retry_loop() {
    let (dp, status, mut rec) = setup();
    let e2: IpNet = "10.1.2.0/24".parse().unwrap();
    dp.refuse.lock().unwrap().insert(e2);

    assert_eq!(rec.reconcile(true).await, Action::AwaitChange);
    assert_eq!(routes(&dp), ["10.1.1.0/24"]);
    let s = status.snapshot();
    assert_eq!(s.datapath_error, None);
    assert_eq!(
        state_of(&s, &node_key("east", "e1")),
        RecordState::Programmed
    );
    let RecordState::Rejected(why) = state_of(&s, &node_key("east", "e2")) else {
        panic!("e2 is not rejected");
    };
    assert_eq!(why.code, code::DATAPATH_REFUSED);
    assert!(why.message.contains("no vtepMAC"), "{}", why.message);
    let east = &s.remotes["east"];
    assert_eq!(east.nodes_programmed, 1);
    assert_eq!(
        east.rejected_by_reason.get(code::DATAPATH_REFUSED),
        Some(&1)
    );
    assert_eq!(s.routes_installed, 1);
    assert_eq!(s.routes.len(), 1);
    assert_eq!(s.rejections_total["east"][code::DATAPATH_REFUSED], 1);
    assert_eq!(s.reconcile_retries, 0);

    // The next full resync tries again, and counts no new rejection.
    assert_eq!(rec.reconcile(true).await, Action::AwaitChange);
    assert_eq!(
        status.snapshot().rejections_total["east"][code::DATAPATH_REFUSED],
        1
    );

    // Once the datapath takes it, the record is programmed.
    dp.refuse.lock().unwrap().clear();
    assert_eq!(rec.reconcile(true).await, Action::AwaitChange);
    assert_eq!(routes(&dp), ["10.1.1.0/24", "10.1.2.0/24"]);
    let s = status.snapshot();
    assert_eq!(
        state_of(&s, &node_key("east", "e2")),
        RecordState::Programmed
    );
    assert_eq!(s.remotes["east"].nodes_programmed, 2);
    assert_eq!(
        s.remotes["east"]
            .rejected_by_reason
            .get(code::DATAPATH_REFUSED),
        None
    );
}

#[tokio::test(start_paused = true)]
async fn a_refusal_does_not_resync_every_second() {
    let (dp, status, rec) = setup();
    dp.refuse
        .lock()
        .unwrap()
        .insert("10.1.2.0/24".parse().unwrap());
    let task = tokio::spawn(rec.run(Duration::from_secs(3600)));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = dp.upserts.load(Ordering::SeqCst);
    assert!(start <= 2, "the full resyncs at start: {start}");
    tokio::time::sleep(Duration::from_secs(120)).await;
    // Nothing since (formerly a full resync every second).
    assert_eq!(dp.upserts.load(Ordering::SeqCst), start);
    assert_eq!(status.snapshot().reconcile_retries, 0);
    task.abort();
}

#[tokio::test]
async fn failures_back_off_with_jitter_up_to_the_cap_and_are_counted() {
    let (dp, status, mut rec) = setup();
    dp.fail.store(true, Ordering::SeqCst);
    let mut delays = Vec::new();
    for _ in 0..10 {
        match rec.reconcile(true).await {
            Action::RequeueAfter(d) => delays.push(d),
            Action::AwaitChange => panic!("a failed pass must be retried"),
        }
    }
    assert!(
        delays[0] >= RETRY_BASE / 2 && delays[0] <= RETRY_BASE,
        "{delays:?}"
    );
    assert!(delays.iter().all(|d| *d <= RETRY_CAP), "{delays:?}");
    assert!(delays[9] >= RETRY_CAP / 2, "{delays:?}");
    assert!(
        delays.windows(2).take(4).all(|w| w[1] >= w[0]),
        "{delays:?}"
    );
    let s = status.snapshot();
    assert_eq!(s.reconcile_retries, 10);
    assert!(
        s.datapath_error
            .as_deref()
            .unwrap_or("")
            .contains("upsert route")
    );
    assert!(
        crate::status::metrics::render(&s).contains("podmesh_reconcile_retries_total 10"),
        "{}",
        crate::status::metrics::render(&s)
    );

    // Recovered: programmed, and the next failure starts from the base again.
    dp.fail.store(false, Ordering::SeqCst);
    assert_eq!(rec.reconcile(true).await, Action::AwaitChange);
    assert_eq!(routes(&dp), ["10.1.1.0/24", "10.1.2.0/24"]);
    assert_eq!(status.snapshot().datapath_error, None);
    dp.fail.store(true, Ordering::SeqCst);
    assert!(matches!(rec.reconcile(true).await, Action::RequeueAfter(d) if d <= RETRY_BASE));
}

#[tokio::test]
async fn a_datapath_that_cannot_run_waits_the_cap() {
    #[derive(Debug)]
    struct Unavailable;
    impl Datapath for Unavailable {
        async fn upsert(&mut self, _: &[RemoteRoute]) -> Result<(), DatapathError> {
            Err(DatapathError::Unavailable("no VXLAN in this kernel".into()))
        }
        async fn delete(&mut self, _: &[IpNet]) -> Result<(), DatapathError> {
            Ok(())
        }
        async fn prune(&mut self, _: &BTreeSet<IpNet>) -> Result<PruneReport, DatapathError> {
            Ok(PruneReport::default())
        }
        async fn installed(&mut self) -> Result<Vec<RemoteRoute>, DatapathError> {
            Ok(Vec::new())
        }
    }
    let status = Status::new("home", "n1");
    let mut rec = Reconciler::new(Unavailable, local(), east(), status.clone());
    assert_eq!(rec.reconcile(true).await, Action::RequeueAfter(RETRY_CAP));
    assert_eq!(status.snapshot().reconcile_retries, 1);
}

fn rejected(
    n: usize,
    cluster: &str,
    code: &str,
    message: &str,
) -> Vec<(String, String, Rejection)> {
    (0..n)
        .map(|i| {
            (
                cluster.to_string(),
                node_key(cluster, &format!("n{i:05}")),
                Rejection::new(code, message),
            )
        })
        .collect()
}

/// A writer into a shared buffer, for a subscriber under test.
#[derive(Clone, Default)]
struct Buf(Arc<Mutex<Vec<u8>>>);

impl Write for Buf {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged(f: impl FnOnce()) -> String {
    let buf = Buf::default();
    let w = buf.clone();
    let sub = tracing_subscriber::fmt()
        .with_writer(move || w.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(sub, f);
    String::from_utf8(buf.0.lock().unwrap().clone()).unwrap()
}

#[test]
fn a_cluster_rejected_as_a_whole_is_one_log_line_with_the_count() {
    let mut all = rejected(
        5000,
        "west",
        code::CLUSTER_REJECTED,
        "cluster west is rejected",
    );
    all.extend(rejected(
        2,
        "north",
        code::CLUSTER_RECORD_MISSING,
        "no cluster record",
    ));
    all.push((
        "north".into(),
        node_key("north", "x"),
        Rejection::new(code::DATAPATH_REFUSED, "node north/x published no vtepMAC"),
    ));
    let groups = report::group(&all);
    assert_eq!(groups.len(), 3, "{groups:?}");
    let west = groups.iter().find(|g| g.cluster == "west").unwrap();
    assert_eq!(west.records, 5000);
    assert_eq!(west.first_key, node_key("west", "n00000"));
    let out = logged(|| report::log_rejections(&all));
    assert_eq!(out.lines().count(), 3, "{out}");
    assert!(out.contains("records=5000"), "{out}");
    // Messages that name their node are one cause all the same.
    let per_node: Vec<_> = (0..1000)
        .map(|i| {
            (
                "east".to_string(),
                node_key("east", &format!("bad-{i:04}")),
                Rejection::new(
                    code::CLUSTER_REJECTED,
                    format!("node bad-{i:04} of cluster east is outside"),
                ),
            )
        })
        .collect();
    let out = logged(|| report::log_rejections(&per_node));
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("records=1000") && out.contains("bad-0000"),
        "{out}"
    );
}

#[test]
fn remote_text_cannot_forge_a_log_line() {
    let key =
        "podmesh/v1/nodes/east/n1\n2026-01-01T00:00:00Z  INFO forged line\u{1b}[2J".to_string();
    let all = vec![(
        "east".to_string(),
        key,
        Rejection::new(code::RECORD_KEY_UNKNOWN, "bad\nINFO also forged\u{1b}[31m"),
    )];
    let out = logged(|| report::log_rejections(&all));
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(!out.contains('\u{1b}'), "{out:?}");
    assert!(out.contains("\\n") && out.contains("\\u{1b}"), "{out}");
}
