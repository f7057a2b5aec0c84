//! One TLS connection per watch, as remote agents hold them: 2,000 connections each receive every event once and in order, a reader that stops is cut off with its reason (and resumes from a revision) while the others keep receiving, and `--max-connections` refuses the excess with its reason and counts it.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use podmesh_tests::{
    etcd::Etcd,
    eventually,
    proxy::Proxy,
    watchconn::{Refused, WatchConn, prefix_watch, source, tls},
};

const PREFIX: &str = "podmesh/v1/conns/";
const CONNECTIONS: usize = 2000;

fn addr(proxy: &Proxy) -> SocketAddr {
    proxy
        .endpoint()
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

/// Opens `n` watch connections of `PREFIX`, a few dozen at a time, each
/// confirmed created.
async fn open_many(proxy: &Proxy, n: usize) -> Vec<WatchConn> {
    use futures::StreamExt;
    let (addr, tls) = (addr(proxy), tls(proxy.pki().ca(), proxy.client()).unwrap());
    futures::stream::iter((0..n).map(|i| {
        let tls = tls.clone();
        async move {
            let mut c = WatchConn::open(addr, source(i), tls, prefix_watch(PREFIX, 0))
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e}"));
            c.created()
                .await
                .unwrap_or_else(|e| panic!("connection {i}: {e:#}"));
            c
        }
    }))
    .buffer_unordered(32)
    .collect()
    .await
}

/// The mod revisions of the events `c` receives until it has `n`; fails on
/// a cancellation or an end.
async fn revisions(c: &mut WatchConn, n: usize) -> anyhow::Result<Vec<i64>> {
    revisions_counted(c, n, &AtomicUsize::new(0)).await
}

/// [`revisions`], adding every event received to `count`.
async fn revisions_counted(
    c: &mut WatchConn,
    n: usize,
    count: &AtomicUsize,
) -> anyhow::Result<Vec<i64>> {
    let mut got = Vec::with_capacity(n);
    while got.len() < n {
        let r = tokio::time::timeout(Duration::from_secs(120), c.next())
            .await
            .map_err(|_| anyhow::anyhow!("no event for 120 s after {} of {n}", got.len()))??
            .ok_or_else(|| anyhow::anyhow!("stream ended after {} of {n} events", got.len()))?;
        anyhow::ensure!(!r.canceled, "cancelled: {}", r.cancel_reason);
        got.extend(
            r.events
                .iter()
                .filter_map(|e| Some(e.kv.as_ref()?.mod_revision)),
        );
        count.fetch_add(r.events.len(), Ordering::Relaxed);
    }
    Ok(got)
}

/// Puts `n` values of `size` bytes; the revisions etcd gave them. With
/// `paced`, each put waits until `paced.1` has counted the previous one
/// `paced.0` times (every reader has it), so that readers that do read are
/// never more than one event behind, whatever the machine's load.
async fn put(
    etcd: &Etcd,
    n: usize,
    size: usize,
    tag: &str,
    paced: Option<(usize, &AtomicUsize)>,
) -> Vec<i64> {
    let mut c = etcd.connect().await.unwrap();
    let mut revs = Vec::with_capacity(n);
    for i in 0..n {
        let v = format!("{tag}{i}").into_bytes();
        let mut value = vec![b'x'; size.max(v.len())];
        value[..v.len()].copy_from_slice(&v);
        let r = c
            .put(format!("{PREFIX}k{}", i % 16), value, None)
            .await
            .unwrap();
        revs.push(r.header().unwrap().revision());
        if let Some((readers, count)) = paced {
            let target = count.load(Ordering::Relaxed) / readers * readers + readers;
            let waited = tokio::time::timeout(Duration::from_secs(120), async {
                while count.load(Ordering::Relaxed) < target {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            })
            .await;
            assert!(waited.is_ok(), "the readers stopped receiving at put {i}");
        }
    }
    revs
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_connections_every_watcher_gets_every_event_once_in_order_and_a_slow_one_is_cut_off()
{
    podmesh_plumbing::limits::raise_nofile_limit().unwrap();
    let etcd = Etcd::start().unwrap();
    // A small backlog, so that the reader that stops is cut off after a
    // few puts rather than thousands.
    let proxy = Proxy::start(&etcd, &["--watch-backlog", "8"]).unwrap();
    let conns = open_many(&proxy, CONNECTIONS).await;
    assert_eq!(
        proxy.metric("podmesh_proxy_connections", "").unwrap(),
        CONNECTIONS as f64,
        "connections in use"
    );
    // A reader that stops reading after its watch is created, with a small
    // HTTP/2 window so that the proxy's sending stops early.
    let tls_cfg = tls(proxy.pki().ca(), proxy.client()).unwrap();
    let mut slow = WatchConn::open_with_window(
        addr(&proxy),
        source(CONNECTIONS),
        tls_cfg.clone(),
        prefix_watch(PREFIX, 0),
        1024,
    )
    .await
    .unwrap();
    slow.created().await.unwrap();

    // Small events, then 2 KiB ones that fill the slow reader's backlog
    // (its 1 KiB window, the proxy's 32 KiB HTTP/2 send buffer and a
    // 32 KiB encoded chunk, then 8 responses).
    const SMALL: usize = 30;
    const LARGE: usize = 80;
    let count = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            let count = count.clone();
            tokio::spawn(async move { revisions_counted(&mut c, SMALL + LARGE, &count).await })
        })
        .collect();
    let paced = Some((CONNECTIONS, &*count));
    let mut want = put(&etcd, SMALL, 8, "s", paced).await;
    want.extend(put(&etcd, LARGE, 2048, "l", paced).await);
    for (i, r) in readers.into_iter().enumerate() {
        let got = r
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("watcher {i}: {e:#}"));
        assert_eq!(got, want, "watcher {i}: every event once, in order");
    }

    // The reader that stopped was cut off, counted while it still reads
    // nothing.
    eventually(Duration::from_secs(30), || {
        let n = proxy
            .metric("podmesh_proxy_watchers_cancelled_total", "slow_watcher")
            .map_err(|e| e.to_string())?;
        (n >= 1.0)
            .then_some(())
            .ok_or(format!("slow_watcher cancels: {n}"))
    })
    .unwrap();
    // What it reads now: a prefix of the events, in order, then the
    // cancellation with its reason.
    let mut got = Vec::new();
    let reason = loop {
        let r = tokio::time::timeout(Duration::from_secs(30), slow.next())
            .await
            .expect("the slow reader's cancellation never came")
            .unwrap()
            .expect("the slow reader's stream ended without a cancellation");
        got.extend(
            r.events
                .iter()
                .filter_map(|e| Some(e.kv.as_ref()?.mod_revision)),
        );
        if r.canceled {
            break r.cancel_reason;
        }
    };
    assert!(reason.contains("backlog"), "cancel reason: {reason}");
    assert!(got.len() < want.len(), "it was cut off before the end");
    assert_eq!(got, want[..got.len()], "what it got came once, in order");
    // It watches again from the revision after its last event and gets the
    // rest, from the proxy's history.
    let next = got.last().map_or(want[0], |r| r + 1);
    let mut again = WatchConn::open(
        addr(&proxy),
        source(CONNECTIONS + 1),
        tls_cfg,
        prefix_watch(PREFIX, next),
    )
    .await
    .unwrap();
    again.created().await.unwrap();
    let rest = revisions(&mut again, want.len() - got.len()).await.unwrap();
    assert_eq!(rest, want[got.len()..], "resumed from revision {next}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_connections_beyond_max_connections_are_refused_with_the_reason_and_counted() {
    const MAX: usize = 20;
    const EXTRA: usize = 5;
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &["--max-connections", &MAX.to_string()]).unwrap();
    let mut conns = open_many(&proxy, MAX).await;
    assert_eq!(
        proxy.metric("podmesh_proxy_connections", "").unwrap(),
        MAX as f64
    );
    let tls_cfg = tls(proxy.pki().ca(), proxy.client()).unwrap();
    for i in 0..EXTRA {
        match WatchConn::open(
            addr(&proxy),
            source(i),
            tls_cfg.clone(),
            prefix_watch(PREFIX, 0),
        )
        .await
        {
            Err(Refused::Status(code, msg)) => {
                assert_eq!(
                    code, 14,
                    "UNAVAILABLE, so clients try another replica: {msg}"
                );
                assert!(
                    msg.contains("--max-connections") && msg.contains(&MAX.to_string()),
                    "refusal message: {msg}"
                );
            }
            Err(Refused::Other(e)) => panic!("refused without the reason: {e:#}"),
            Ok(_) => panic!(
                "connection {} beyond --max-connections {MAX} was served",
                MAX + i + 1
            ),
        }
    }
    assert_eq!(
        proxy
            .metric("podmesh_proxy_connections_refused_total", "")
            .unwrap(),
        EXTRA as f64
    );
    assert_eq!(
        proxy.metric("podmesh_proxy_connections", "").unwrap(),
        MAX as f64
    );
    // The connections served keep working.
    let want = put(&etcd, 3, 8, "m", None).await;
    for c in conns.iter_mut() {
        assert_eq!(revisions(c, want.len()).await.unwrap(), want);
    }
    // A connection closed makes room for a new one.
    drop(conns.pop());
    let proxy = Arc::new(proxy);
    let p = proxy.clone();
    eventually(Duration::from_secs(30), move || {
        let n = p
            .metric("podmesh_proxy_connections", "")
            .map_err(|e| e.to_string())?;
        (n < MAX as f64).then_some(()).ok_or(format!("{n} in use"))
    })
    .unwrap();
    let mut c = WatchConn::open(addr(&proxy), source(0), tls_cfg, prefix_watch(PREFIX, 0))
        .await
        .unwrap();
    c.created().await.unwrap();
}
