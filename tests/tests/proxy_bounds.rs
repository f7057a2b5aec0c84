//! podmesh-etcd-proxy against one authenticated client that asks for too much: huge Txns, answers it
//! never reads, oversized keys. Each is refused with a clear gRPC error, the proxy's memory stays far
//! under the deploy limit (512 MiB), and another client keeps being served meanwhile. A prefix larger
//! than one gRPC message is listed from the upstream in pages.
use std::{net::SocketAddr, time::Instant};

use etcd_client::{
    GetOptions, TxnOp, TxnOpResponse,
    proto::{PbRangeRequest, PbTxnOpRequest, PbTxnRequest, PbTxnRequestOp},
};
use podmesh_tests::{
    etcd::Etcd,
    proxy::Proxy,
    rawgrpc::{RawGrpc, grpc_status, peak_rss},
};
use prost::Message as _;

/// Keys of 1 KiB under the prefix: 20 MiB in all, more than one answer may hold.
const KEYS: usize = 20_000;
const VALUE: usize = 1024;
const PREFIX: &str = "podmesh/v1/nodes/big/";
/// The deploy limit of the proxy's container.
const DEPLOY_LIMIT: u64 = 512 << 20;
/// `RESOURCE_EXHAUSTED`, `INVALID_ARGUMENT`.
const EXHAUSTED: i32 = 8;

async fn fill(etcd: &Etcd) {
    let mut c = etcd.connect().await.unwrap();
    let value = "v".repeat(VALUE);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(128) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|i| TxnOp::put(format!("{PREFIX}{i:06}"), value.clone(), None))
            .collect();
        c.txn(etcd_client::Txn::new().and_then(ops)).await.unwrap();
    }
}

fn range(key: &str, end: &str, limit: i64) -> PbRangeRequest {
    PbRangeRequest {
        key: key.into(),
        range_end: end.into(),
        limit,
        ..Default::default()
    }
}

fn prefix_end() -> String {
    // PREFIX ends in '/', whose successor is '0'.
    format!("{}0", PREFIX.trim_end_matches('/'))
}

fn addr(proxy: &Proxy) -> SocketAddr {
    proxy
        .endpoint()
        .trim_start_matches("https://")
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_bounds_what_one_client_can_make_it_build() {
    let etcd = Etcd::start().unwrap();
    fill(&etcd).await;
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let pid = proxy.pid().unwrap();
    // A client that accepts answers as large as the proxy's bound.
    let mut good = proxy
        .connect()
        .await
        .unwrap()
        .kv_client()
        .max_decoding_message_size(64 << 20);

    // The proxy listed 20 MiB from its upstream, in pages (one unpaged read
    // stops at the 4 MiB receive limit, and the proxy never became ready).
    let all = good
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_count_only()),
        )
        .await
        .unwrap();
    assert_eq!(all.count(), KEYS as i64);

    // A whole-prefix read is over one answer's bound: refused, with the way out.
    let e = good
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("resource has been exhausted") && e.contains("pages"),
        "{e}"
    );
    // The same in pages works.
    let page = good
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_limit(5000)),
        )
        .await
        .unwrap();
    assert_eq!(page.kvs().len(), 5000);
    assert!(page.more());

    // A Txn of 20 whole-prefix ranges (what took the proxy to 2.75 GB).
    let whole = TxnOp::get(PREFIX, Some(GetOptions::new().with_prefix()));
    let e = good
        .txn(etcd_client::Txn::new().and_then(vec![whole; 20]))
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("resource has been exhausted"), "{e}");
    // Ranges that fit one answer together are served.
    let small = TxnOp::get(
        PREFIX,
        Some(GetOptions::new().with_prefix().with_limit(1000)),
    );
    let r = good
        .txn(etcd_client::Txn::new().and_then(vec![small; 10]))
        .await
        .unwrap();
    assert_eq!(r.op_responses().len(), 10);
    assert!(matches!(&r.op_responses()[9], TxnOpResponse::Get(g) if g.kvs().len() == 1000));
    // More operations than etcd's own --max-txn-ops.
    let one = TxnOp::get(format!("{PREFIX}000001"), None);
    let e = good
        .txn(etcd_client::Txn::new().and_then(vec![one; 129]))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("invalid argument") && e.contains("too many operations"),
        "{e}"
    );
    // A key no prefix-confined client needs.
    let long = format!("{PREFIX}{}", "k".repeat(8192));
    let e = good.get(long, None).await.unwrap_err().to_string();
    assert!(e.contains("invalid argument") && e.contains("bytes"), "{e}");

    // One connection pipelines 20 reads of 8 MiB and never reads the answers
    // (1.23 GB before): the first answers fill its budget, the rest are refused.
    let mut raw = RawGrpc::connect(addr(&proxy), proxy.pki().ca(), proxy.client())
        .await
        .unwrap();
    let req = range(PREFIX, &prefix_end(), 8000).encode_to_vec();
    let mut pending = Vec::new();
    for _ in 0..20 {
        pending.push(raw.call("/etcdserverpb.KV/Range", &req).await.unwrap());
    }
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for p in pending {
        let head = p.await.unwrap();
        match grpc_status(head.headers()) {
            Some((code, message)) => refused.push((code, message)),
            None => held.push(head),
        }
    }
    eprintln!(
        "pipelined without reading: {} answers held, {} refused",
        held.len(),
        refused.len()
    );
    assert!(
        !held.is_empty() && held.len() <= 4,
        "{} held, {refused:?}",
        held.len()
    );
    assert_eq!(held.len() + refused.len(), 20);
    assert!(
        refused
            .iter()
            .all(|(c, m)| *c == EXHAUSTED && m.contains("has not read")),
        "{refused:?}"
    );

    // Meanwhile another client is served.
    let t = Instant::now();
    let r = good
        .get(
            PREFIX,
            Some(GetOptions::new().with_prefix().with_limit(100)),
        )
        .await
        .unwrap();
    assert_eq!(r.kvs().len(), 100);
    eprintln!(
        "another client's read while the budget is held: {:?}",
        t.elapsed()
    );

    // A nested Txn counts its inner operations too.
    let inner = PbTxnRequest {
        success: (0..100)
            .map(|_| PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestRange(range(
                    &format!("{PREFIX}000001"),
                    "",
                    0,
                ))),
            })
            .collect(),
        ..Default::default()
    };
    let outer = PbTxnRequest {
        success: vec![
            PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(inner.clone())),
            },
            PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(inner)),
            },
        ],
        ..Default::default()
    };
    let head = raw
        .call("/etcdserverpb.KV/Txn", &outer.encode_to_vec())
        .await
        .unwrap()
        .await
        .unwrap();
    let (code, message) = grpc_status(head.headers()).expect("refused");
    assert_eq!(code, 3, "{message}");

    let peak = peak_rss(pid).unwrap();
    eprintln!("proxy peak RSS: {} MiB", peak >> 20);
    assert!(
        peak < DEPLOY_LIMIT / 2,
        "peak RSS {} MiB, deploy limit {} MiB",
        peak >> 20,
        DEPLOY_LIMIT >> 20
    );

    // Once the greedy connection is gone its budget is free again.
    drop(held);
    drop(raw);
    let mut again = RawGrpc::connect(addr(&proxy), proxy.pki().ca(), proxy.client())
        .await
        .unwrap();
    let mut heads = Vec::new();
    for _ in 0..3 {
        let head = again
            .call("/etcdserverpb.KV/Range", &req)
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(grpc_status(head.headers()), None);
        heads.push(head);
    }
    assert!(
        proxy
            .metric("podmesh_proxy_refused_requests_total", "connection_budget")
            .unwrap()
            >= 16.0
    );
}

/// An authenticated client that completes its handshake and then sends
/// nothing, not even the HTTP/2 preface, is closed after the preface
/// deadline (10 s) instead of holding its connection forever; a client that
/// sent its preface and stays idle is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_closes_an_authenticated_client_that_never_sends_the_http2_preface() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let mut silent =
        podmesh_tests::rawgrpc::tls_connect(addr(&proxy), proxy.pki().ca(), proxy.client())
            .await
            .unwrap();
    let mut polite =
        podmesh_tests::rawgrpc::tls_connect(addr(&proxy), proxy.pki().ca(), proxy.client())
            .await
            .unwrap();
    // The preface and an empty SETTINGS frame: a connection that is idle
    // but alive (HTTP/2 keepalive pings look after it from here).
    polite
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(40), async {
        loop {
            match silent.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "a client that sent no preface was still connected after 40 s"
    );
    eprintln!("silent client closed after {:?}", started.elapsed());
    // The polite one is still served: its SETTINGS were answered, and a
    // PING is answered now, after the silent one was closed.
    polite
        .write_all(b"\0\0\x08\x06\0\0\0\0\0podmesh!")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let pong = tokio::time::timeout(std::time::Duration::from_secs(10), async {
        loop {
            let n = polite.read(&mut buf).await.unwrap();
            assert!(n > 0, "the idle client that sent its preface was closed");
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(8).any(|w| w == b"podmesh!") {
                return;
            }
        }
    })
    .await;
    assert!(
        pong.is_ok(),
        "no PING answer on the idle, polite connection"
    );
}

/// What one client can make the proxy hold through Watch: watch creates
/// with keys of 1 MiB are refused with a reason (1,500 of them once took
/// 1.5 GB); a stream holds at most 1,000 watchers; and 20 watches created
/// at a past revision with prev_kv, on a stream that is never read, replay
/// in parts that wait for the reader instead of 20 histories cloned into
/// memory at once (they took 559 MB). Memory stays far under the deploy
/// limit and another client keeps being answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_bounds_what_one_client_can_make_it_hold_through_watch() {
    use etcd_client::WatchOptions;
    /// etcdserverpb.WatchCreateRequest, the fields used here (etcd-client
    /// does not export the type).
    #[derive(Clone, PartialEq, prost::Message)]
    struct Create {
        #[prost(bytes = "vec", tag = "1")]
        key: Vec<u8>,
        #[prost(bytes = "vec", tag = "2")]
        range_end: Vec<u8>,
        #[prost(int64, tag = "3")]
        start_revision: i64,
        #[prost(bool, tag = "6")]
        prev_kv: bool,
        #[prost(int64, tag = "7")]
        watch_id: i64,
    }
    /// etcdserverpb.WatchRequest with its create_request.
    #[derive(Clone, PartialEq, prost::Message)]
    struct Request {
        #[prost(message, optional, tag = "1")]
        create: Option<Create>,
    }
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let pid = proxy.pid().unwrap();
    let mut up = etcd.connect().await.unwrap();
    // History: 500 events (the proxy's --history-events) of 60 KiB values
    // over 50 keys, so each has a prev_kv as large: a replay of it with
    // prev_kv is about 60 MB.
    let start = up
        .put(format!("{PREFIX}h/0"), "v".repeat(60 << 10), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    for i in 1..500 {
        up.put(format!("{PREFIX}h/{}", i % 50), "v".repeat(60 << 10), None)
            .await
            .unwrap();
    }
    let mut c = proxy.connect().await.unwrap();
    let end = up
        .get("x", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    loop {
        let r = c.get(format!("{PREFIX}h/0"), None).await.unwrap();
        if r.header().unwrap().revision() >= end {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // 1. Keys of 1 MiB: refused, each with the reason.
    let huge = format!("{PREFIX}{}", "k".repeat(1 << 20));
    let mut stream = c.watch(huge.clone(), None).await.unwrap();
    let mut refused = 0;
    for i in 0..100 {
        if i > 0 {
            stream.watch(huge.clone(), None).await.unwrap();
        }
        let r = stream.message().await.unwrap().unwrap();
        assert!(r.canceled(), "a watch on a 1 MiB key was created");
        assert!(
            r.cancel_reason().contains("at most 4096"),
            "{}",
            r.cancel_reason()
        );
        refused += 1;
    }
    eprintln!("1 MiB keys: {refused} refused");

    // 2. At most 1,000 watchers on one stream.
    let mut stream = c
        .watch(
            format!("{PREFIX}w/0"),
            Some(WatchOptions::new().with_watch_id(1)),
        )
        .await
        .unwrap();
    assert!(stream.message().await.unwrap().unwrap().created());
    for i in 2..=1001i64 {
        stream
            .watch(
                format!("{PREFIX}w/{i}"),
                Some(WatchOptions::new().with_watch_id(i)),
            )
            .await
            .unwrap();
    }
    let mut created = 1;
    let last = loop {
        let r = stream.message().await.unwrap().unwrap();
        if r.canceled() {
            break r;
        }
        created += 1;
    };
    assert_eq!(created, 1000);
    assert!(
        last.cancel_reason().contains("1000 watchers"),
        "{}",
        last.cancel_reason()
    );
    drop(stream);

    // 3. 20 replays with prev_kv on a stream nobody reads.
    let create = |id: i64| {
        prost::Message::encode_to_vec(&Request {
            create: Some(Create {
                key: PREFIX.into(),
                range_end: prefix_end().into(),
                start_revision: start,
                prev_kv: true,
                watch_id: id,
            }),
        })
    };
    let creates: Vec<Vec<u8>> = (1..=20).map(create).collect();
    let mut raw = RawGrpc::connect(addr(&proxy), proxy.pki().ca(), proxy.client())
        .await
        .unwrap();
    let (_answer, _open) = raw
        .stream("/etcdserverpb.Watch/Watch", &creates)
        .await
        .unwrap();
    // Meanwhile another client is answered.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let t = Instant::now();
    let r = c.get(format!("{PREFIX}h/1"), None).await.unwrap();
    assert_eq!(r.kvs().len(), 1);
    let other = t.elapsed();
    let peak = peak_rss(pid).unwrap();
    eprintln!(
        "20 unread replays of ~60 MB each: peak RSS {} MiB, other client answered in {other:?}",
        peak >> 20
    );
    assert!(
        peak < DEPLOY_LIMIT / 2,
        "peak RSS {} MiB with unread replays",
        peak >> 20
    );
    assert!(other < std::time::Duration::from_secs(5), "{other:?}");
    // A client that reads gets the whole replay, in parts.
    let mut s = c
        .watch(
            PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(start)
                    .with_prev_key(),
            ),
        )
        .await
        .unwrap();
    let mut events = 0;
    let mut parts = 0;
    while events < 500 {
        let r = s.message().await.unwrap().unwrap();
        assert!(!r.canceled(), "{}", r.cancel_reason());
        if !r.events().is_empty() {
            parts += 1;
            events += r.events().len();
        }
    }
    assert_eq!(events, 500);
    eprintln!("a reader got the 500 events of the replay in {parts} parts");
    assert!(parts > 1);
    drop(raw);
}

/// The proxy started with a soft limit of 256 open files (as container
/// runtimes often set 1,024) takes its hard limit at start; 600 idle TCP
/// connections to its unauthenticated metrics port are held at most 64 at a
/// time (more are closed at once), so the proxy's descriptors stay few and
/// an mTLS client is served meanwhile (1,050 idle ones once blocked the
/// mTLS port for everyone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_takes_its_hard_open_files_limit_and_bounds_its_metrics_port() {
    let etcd = Etcd::start().unwrap();
    let mut proxy = Proxy::start(&etcd, &[]).unwrap();
    tokio::task::block_in_place(|| proxy.restart_with_soft_nofile(256)).unwrap();
    let pid = proxy.pid().unwrap();
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap()
        .to_string();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    eprintln!("{line}");
    assert_eq!(
        nums[0], nums[1],
        "soft limit not raised to the hard one: {line}"
    );
    assert_ne!(nums[0], "256", "{line}");

    let metrics: SocketAddr = format!("127.0.0.1:{}", proxy.metrics_port())
        .parse()
        .unwrap();
    let mut idle = Vec::new();
    for _ in 0..600 {
        if let Ok(s) = tokio::net::TcpStream::connect(metrics).await {
            idle.push(s);
        }
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    eprintln!("600 idle connections to the metrics port: the proxy holds {fds} descriptors");
    assert!(
        fds < 200,
        "{fds} descriptors with 600 idle metrics connections"
    );
    let mut c = proxy.connect().await.unwrap();
    let t = Instant::now();
    c.get("podmesh/v1/x", None).await.unwrap();
    eprintln!("mTLS client answered in {:?}", t.elapsed());
    drop(idle);
}
