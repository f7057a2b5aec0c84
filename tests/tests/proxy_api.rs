//! podmesh-etcd-proxy in front of a real etcd with mTLS: etcdctl 3.4 and etcd-client read and
//! watch through it; every write/admin RPC and every prefix escape is refused; TLS strangers are refused.
use std::{process::Output, time::Duration};

use etcd_client::{GetOptions, WatchOptions};
use podmesh_tests::{daemon, describe_output, etcd::Etcd, eventually, pki::Pki, proxy::Proxy};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn seed(etcd: &Etcd) {
    for (k, v) in [
        ("podmesh/v1/clusters/east", r#"{"name":"east","id":1}"#),
        ("podmesh/v1/nodes/east/n1", r#"{"name":"n1"}"#),
        ("podmesh/v1/nodes/east/n2", r#"{"name":"n2"}"#),
        ("podmesh/v10", "just past the prefix"),
        ("secret/admin", "must never leak"),
    ] {
        let o = etcd.etcdctl(&["put", k, v]).unwrap();
        assert!(o.status.success(), "{}", describe_output(&o));
    }
}

#[test]
fn proxy_etcdctl_reads_watches_and_reports_itself() {
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let c = Some(proxy.client());

    let o = proxy
        .etcdctl(c, &["get", "--prefix", "podmesh/v1/"])
        .unwrap();
    assert!(o.status.success(), "{}", describe_output(&o));
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains("podmesh/v1/clusters/east") && s.contains("podmesh/v1/nodes/east/n2"),
        "{s}"
    );
    assert!(!s.contains("podmesh/v10") && !s.contains("secret"), "{s}");

    let o = proxy
        .etcdctl(
            c,
            &["get", "podmesh/v1/nodes/east/n1", "--print-value-only"],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout).trim(),
        r#"{"name":"n1"}"#,
        "{}",
        describe_output(&o)
    );

    let o = proxy
        .etcdctl(
            c,
            &[
                "get",
                "--prefix",
                "podmesh/v1/nodes/",
                "--limit",
                "1",
                "-w",
                "json",
            ],
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("\"count\":2"),
        "{}",
        describe_output(&o)
    );

    // endpoint status and member list name the proxy, never the etcd behind it.
    let o = proxy
        .etcdctl(c, &["endpoint", "status", "-w", "json"])
        .unwrap();
    assert!(o.status.success(), "{}", describe_output(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&proxy.endpoint()),
        "{}",
        describe_output(&o)
    );
    let o = proxy
        .etcdctl(c, &["member", "list", "-w", "simple"])
        .unwrap();
    let s = String::from_utf8_lossy(&o.stdout);
    assert!(
        s.contains(&proxy.endpoint()) && !s.contains(&etcd.endpoint()),
        "{}",
        describe_output(&o)
    );

    // etcdctl watch --prefix sees a write made directly to the upstream etcd.
    let mut cmd = proxy
        .etcdctl_command(c, &["watch", "--prefix", "podmesh/v1/nodes/"])
        .unwrap();
    let log = tempfile::NamedTempFile::new().unwrap();
    let mut child = cmd
        .stdout(log.reopen().unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Writes until the watcher has printed one (the watch may start after the first put).
    let seen = eventually(Duration::from_secs(20), || {
        etcd.etcdctl(&["put", "podmesh/v1/nodes/east/n3", r#"{"name":"n3"}"#])
            .map_err(|e| e.to_string())?;
        let s = std::fs::read_to_string(log.path()).map_err(|e| e.to_string())?;
        if s.contains("PUT") && s.contains("podmesh/v1/nodes/east/n3") {
            Ok(s)
        } else {
            Err(s)
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    seen.unwrap();
    // And a Range after the write shows it (the cache follows the upstream watch).
    eventually(Duration::from_secs(10), || {
        let o = proxy
            .etcdctl(
                c,
                &["get", "podmesh/v1/nodes/east/n3", "--print-value-only"],
            )
            .map_err(|e| e.to_string())?;
        let s = String::from_utf8_lossy(&o.stdout).trim().to_string();
        if s == r#"{"name":"n3"}"# {
            Ok(())
        } else {
            Err(s)
        }
    })
    .unwrap();
}

#[test]
fn proxy_etcd_client_reads_and_watches_with_replay() {
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    rt().block_on(async {
        let mut up = etcd.connect().await.unwrap();
        let mut c = proxy.connect().await.unwrap();
        let r = c
            .get("podmesh/v1/", Some(GetOptions::new().with_prefix()))
            .await
            .unwrap();
        let keys: Vec<&str> = r.kvs().iter().map(|kv| kv.key_str().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "podmesh/v1/clusters/east",
                "podmesh/v1/nodes/east/n1",
                "podmesh/v1/nodes/east/n2"
            ]
        );
        let list_rev = r.header().unwrap().revision();
        let upstream = up.get("podmesh/v1/nodes/east/n1", None).await.unwrap();
        assert_eq!(r.kvs()[1].mod_revision(), upstream.kvs()[0].mod_revision());
        assert_eq!(
            r.kvs()[1].create_revision(),
            upstream.kvs()[0].create_revision()
        );

        // Limit, keys-only.
        let r = c
            .get(
                "podmesh/v1/",
                Some(
                    GetOptions::new()
                        .with_prefix()
                        .with_limit(1)
                        .with_keys_only(),
                ),
            )
            .await
            .unwrap();
        assert_eq!((r.kvs().len(), r.count(), r.more()), (1, 3, true));
        assert!(r.kvs()[0].value().is_empty());

        // Changes made upstream after the list, then a watch from list_rev + 1:
        // the replay from history delivers them, with prev_kv, then live ones follow.
        up.put("podmesh/v1/nodes/east/n1", "v2", None)
            .await
            .unwrap();
        up.delete("podmesh/v1/nodes/east/n2", None).await.unwrap();
        up.put("secret/admin", "x", None).await.unwrap();
        let mut w = c
            .watch(
                "podmesh/v1/",
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(list_rev + 1)
                        .with_prev_key(),
                ),
            )
            .await
            .unwrap();
        up.put("podmesh/v1/nodes/east/n4", "v1", None)
            .await
            .unwrap();
        let mut got = Vec::new();
        while got.len() < 3 {
            let resp = tokio::time::timeout(Duration::from_secs(15), w.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(!resp.canceled(), "{}", resp.cancel_reason());
            for e in resp.events() {
                let kv = e.kv().unwrap();
                got.push((
                    format!("{:?}", e.event_type()),
                    kv.key_str().unwrap().to_string(),
                    e.prev_kv().map(|p| p.value_str().unwrap().to_string()),
                ));
            }
        }
        assert_eq!(
            got,
            vec![
                (
                    "Put".into(),
                    "podmesh/v1/nodes/east/n1".into(),
                    Some(r#"{"name":"n1"}"#.into())
                ),
                (
                    "Delete".into(),
                    "podmesh/v1/nodes/east/n2".into(),
                    Some(r#"{"name":"n2"}"#.into())
                ),
                ("Put".into(), "podmesh/v1/nodes/east/n4".into(), None),
            ]
        );

        // A Range at a past revision still in the proxy's history is what
        // the upstream etcd answers at that revision.
        let kvs = |r: &etcd_client::GetResponse| -> Vec<(String, String, i64)> {
            r.kvs()
                .iter()
                .map(|kv| {
                    (
                        kv.key_str().unwrap().to_string(),
                        kv.value_str().unwrap().to_string(),
                        kv.mod_revision(),
                    )
                })
                .collect()
        };
        for rev in [list_rev, list_rev + 1, list_rev + 2] {
            let opts = || Some(GetOptions::new().with_prefix().with_revision(rev));
            let ours = c.get("podmesh/v1/", opts()).await.unwrap();
            let theirs = up.get("podmesh/v1/", opts()).await.unwrap();
            assert_eq!(kvs(&ours), kvs(&theirs), "at revision {rev}");
        }
        let old_n2 = c
            .get(
                "podmesh/v1/nodes/east/n2",
                Some(GetOptions::new().with_revision(list_rev)),
            )
            .await
            .unwrap();
        assert_eq!(old_n2.kvs().len(), 1, "deleted later, present then");

        // A watch from before the proxy's first list gets the compacted answer.
        let mut old = c
            .watch(
                "podmesh/v1/",
                Some(WatchOptions::new().with_prefix().with_start_revision(1)),
            )
            .await
            .unwrap();
        let compacted = loop {
            let resp = tokio::time::timeout(Duration::from_secs(15), old.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if resp.canceled() {
                break resp;
            }
        };
        assert!(compacted.compact_revision() > 0, "{compacted:?}");

        // A progress request is answered with the stream's revision.
        w.request_progress().await.unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(15), w.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(resp.header().unwrap().revision() >= list_rev + 3);
    });
}

fn denied(o: &Output, why: &str) {
    let s = describe_output(o);
    assert!(!o.status.success(), "must be refused: {s}");
    assert!(
        s.contains("permission denied") || s.contains("PermissionDenied"),
        "{s}"
    );
    assert!(s.contains(why), "message must say {why:?}: {s}");
}

/// An etcd-client error that is a gRPC PermissionDenied saying the proxy
/// is read-only and naming `what`.
fn grpc_denied(e: etcd_client::Error, what: &str) {
    let etcd_client::Error::GRpcStatus(s) = &e else {
        panic!("{what}: not a gRPC status: {e}");
    };
    assert_eq!(format!("{:?}", s.code()), "PermissionDenied", "{what}: {s}");
    assert!(
        s.message().contains("podmesh-etcd-proxy is read-only") && s.message().contains(what),
        "{what}: {s}"
    );
}

#[test]
fn proxy_refuses_writes_admin_and_prefix_escapes() {
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let c = Some(proxy.client());
    let ro = "read-only";
    for args in [
        vec!["put", "podmesh/v1/clusters/east", "x"],
        vec!["del", "podmesh/v1/clusters/east"],
        vec!["del", "--prefix", "podmesh/v1/"],
        vec!["compaction", "2"],
        vec!["lease", "grant", "60"],
        vec!["lease", "list"],
        vec!["lease", "timetolive", "1234"],
        vec!["lease", "revoke", "1234"],
        vec!["member", "add", "m2", "--peer-urls", "http://127.0.0.1:1"],
        vec!["member", "remove", "1234"],
        vec![
            "member",
            "update",
            "1234",
            "--peer-urls",
            "http://127.0.0.1:1",
        ],
        vec!["auth", "enable"],
        vec!["user", "add", "eve:pw"],
        vec!["user", "list"],
        vec!["role", "add", "r"],
        vec!["defrag"],
        vec!["move-leader", "1234"],
        vec!["endpoint", "hashkv"],
        // Both take a lease first (etcd's concurrency package), refused.
        vec!["lock", "podmesh/v1/lock"],
        vec!["elect", "podmesh/v1/election", "candidate"],
    ] {
        let o = proxy.etcdctl(c, &args).unwrap();
        denied(&o, ro);
    }
    // Alarm GET is answered (no alarms, so `alarm disarm` has nothing to
    // disarm); raising or clearing an alarm is refused.
    for args in [["alarm", "list"], ["alarm", "disarm"]] {
        let o = proxy.etcdctl(c, &args).unwrap();
        assert!(
            o.status.success() && o.stdout.is_empty(),
            "{}",
            describe_output(&o)
        );
    }
    rt().block_on(async {
        use etcd_client::{AlarmAction, AlarmOptions, AlarmType};
        let mut cl = proxy.connect().await.unwrap();
        for action in [AlarmAction::Activate, AlarmAction::Deactivate] {
            let mut opts = AlarmOptions::new();
            opts.with_member(1);
            let e = cl
                .alarm(action, AlarmType::Nospace, Some(opts))
                .await
                .unwrap_err();
            assert!(e.to_string().contains(ro), "{action:?}: {e}");
        }
        // What etcdctl 3.4 has no command for.
        let e = cl.member_promote(1234).await.unwrap_err();
        assert!(e.to_string().contains(ro), "MemberPromote: {e}");
        let e = cl.hash().await.unwrap_err();
        assert!(e.to_string().contains(ro), "Hash: {e}");
        // LeaseKeepAlive is a stream: refused when it opens or on its first answer.
        let refused = match cl.lease_keep_alive(1234).await {
            Err(e) => e.to_string(),
            Ok((mut keeper, mut stream)) => {
                let _ = keeper.keep_alive().await;
                match stream.message().await {
                    Err(e) => e.to_string(),
                    Ok(m) => panic!("LeaseKeepAlive answered: {m:?}"),
                }
            }
        };
        assert!(refused.contains(ro), "LeaseKeepAlive: {refused}");

        // etcd's Lock and Election gRPC services, which etcdctl 3.4 does
        // not call: PermissionDenied with the service named, not Unimplemented.
        let lock = "v3lockpb.Lock";
        grpc_denied(cl.lock("podmesh/v1/lock", None).await.unwrap_err(), lock);
        grpc_denied(cl.unlock("podmesh/v1/lock/1").await.unwrap_err(), lock);
        let election = "v3electionpb.Election";
        let name = "podmesh/v1/election";
        grpc_denied(cl.campaign(name, "me", 0).await.unwrap_err(), election);
        grpc_denied(cl.leader(name).await.unwrap_err(), election);
        grpc_denied(cl.proclaim("me", None).await.unwrap_err(), election);
        grpc_denied(cl.resign(None).await.unwrap_err(), election);
        match cl.observe(name).await {
            Err(e) => grpc_denied(e, election),
            Ok(mut s) => grpc_denied(s.message().await.unwrap_err(), election),
        }
        // Snapshot is a stream: refused when it opens or on its first answer.
        match cl.snapshot().await {
            Err(e) => grpc_denied(e, "Snapshot"),
            Ok(mut s) => grpc_denied(s.message().await.unwrap_err(), "Snapshot"),
        }
    });
    // A Txn with writes, and snapshot.
    let mut txn = proxy.etcdctl_command(c, &["txn"]).unwrap();
    txn.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = txn.spawn().unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"value(\"podmesh/v1/clusters/east\") = \"x\"\n\nput podmesh/v1/x y\n\nput podmesh/v1/y z\n\n")
        .unwrap();
    denied(&child.wait_with_output().unwrap(), ro);
    let snap = tempfile::TempDir::new().unwrap();
    // etcdctl 3.4 reports a refused snapshot stream only as "EOF" (the
    // message is checked through etcd-client above); no snapshot may be written.
    let db = snap.path().join("s.db");
    let o = proxy
        .etcdctl(c, &["snapshot", "save", db.to_str().unwrap()])
        .unwrap();
    assert!(
        !o.status.success() && !db.exists(),
        "{}",
        describe_output(&o)
    );

    // Prefix escapes: other keys, the whole keyspace, from-key, range ends past the prefix.
    for args in [
        vec!["get", "secret/admin"],
        vec!["get", "podmesh/v10"],
        vec!["get", "--prefix", "podmesh/"],
        vec!["get", "--prefix", ""],
        vec!["get", "--from-key", "podmesh/v1/"],
        vec!["get", "--from-key", ""],
        vec!["get", "podmesh/v1/a", "podmesh/v2"],
        vec!["get", "podmesh/v1/a", "zzz"],
    ] {
        let o = proxy.etcdctl(c, &args).unwrap();
        denied(&o, "podmesh/v1/");
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("leak"),
            "{}",
            describe_output(&o)
        );
    }
    rt().block_on(async {
        let mut cl = proxy.connect().await.unwrap();
        for (key, opts) in [
            ("secret/", WatchOptions::new().with_prefix()),
            ("podmesh/v1/", WatchOptions::new().with_from_key()),
            ("", WatchOptions::new().with_all_keys()),
            ("podmesh/v1/a", WatchOptions::new().with_range("podmesh/v2")),
        ] {
            let mut w = cl.watch(key, Some(opts)).await.unwrap();
            let resp = tokio::time::timeout(Duration::from_secs(10), w.message())
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            assert!(
                resp.canceled(),
                "watch of {key:?} must be refused: {resp:?}"
            );
            assert!(
                resp.cancel_reason().contains("podmesh/v1/"),
                "{}",
                resp.cancel_reason()
            );
        }
        let e = cl
            .get("", Some(GetOptions::new().with_all_keys()))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("podmesh/v1/"), "{e}");
    });
    // Nothing was written upstream through the proxy.
    let o = etcd.etcdctl(&["get", "podmesh/v1/x"]).unwrap();
    assert!(o.stdout.is_empty(), "{}", describe_output(&o));
    assert!(
        proxy
            .metric("podmesh_proxy_refused_requests_total", "read_only")
            .unwrap()
            >= 20.0
    );
    assert!(
        proxy
            .metric("podmesh_proxy_refused_requests_total", "from_key")
            .unwrap()
            >= 1.0
    );
}

/// Runs `etcdctl txn` with `script` (compares, blank line, success ops,
/// blank line, failure ops) on stdin.
fn etcdctl_txn(proxy: &Proxy, script: &str) -> Output {
    use std::io::Write;
    let mut cmd = proxy
        .etcdctl_command(Some(proxy.client()), &["txn"])
        .unwrap();
    cmd.stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn proxy_serves_read_only_txn_from_the_cache_and_refuses_txn_writes() {
    use etcd_client::{Compare, CompareOp, Txn, TxnOp, TxnOpResponse};
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let keys = |r: &TxnOpResponse| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .iter()
            .map(|kv| format!("{}={}", kv.key_str().unwrap(), kv.value_str().unwrap()))
            .collect::<Vec<_>>(),
        other => panic!("not a get: {other:?}"),
    };
    rt().block_on(async {
        let mut up = etcd.connect().await.unwrap();
        let mut c = proxy.connect().await.unwrap();
        // A write made upstream after the proxy listed: the Txn sees it like Range does.
        up.put("podmesh/v1/nodes/east/n1", r#"{"name":"n1","v":2}"#, None)
            .await
            .unwrap();
        let range = podmesh_tests::eventually_async(Duration::from_secs(10), || {
            let mut c = c.clone();
            async move {
                let r = c
                    .get("podmesh/v1/", Some(GetOptions::new().with_prefix()))
                    .await
                    .map_err(|e| e.to_string())?;
                if r.kvs()
                    .iter()
                    .any(|kv| kv.value_str().unwrap().contains("\"v\":2"))
                {
                    Ok(r)
                } else {
                    Err(format!("{r:?}"))
                }
            }
        })
        .await
        .unwrap();
        let n1 = &range.kvs()[1];
        let txn = |compare: Compare| {
            Txn::new()
                .when(vec![compare])
                .and_then(vec![
                    TxnOp::get("podmesh/v1/", Some(GetOptions::new().with_prefix())),
                    TxnOp::txn(
                        Txn::new().and_then(vec![TxnOp::get("podmesh/v1/clusters/east", None)]),
                    ),
                ])
                .or_else(vec![TxnOp::get("podmesh/v1/nodes/east/n2", None)])
        };
        let ok = c
            .txn(txn(Compare::mod_revision(
                "podmesh/v1/nodes/east/n1",
                CompareOp::Equal,
                n1.mod_revision(),
            )))
            .await
            .unwrap();
        assert!(ok.succeeded());
        assert_eq!(
            ok.header().unwrap().revision(),
            range.header().unwrap().revision()
        );
        let ops = ok.op_responses();
        let listed: Vec<String> = range
            .kvs()
            .iter()
            .map(|kv| format!("{}={}", kv.key_str().unwrap(), kv.value_str().unwrap()))
            .collect();
        assert_eq!(keys(&ops[0]), listed, "Txn range must equal Range");
        match &ops[1] {
            TxnOpResponse::Txn(t) => {
                assert!(t.succeeded());
                assert_eq!(
                    keys(&t.op_responses()[0]),
                    [r#"podmesh/v1/clusters/east={"name":"east","id":1}"#]
                );
            }
            other => panic!("not a nested txn: {other:?}"),
        }
        // A compare that does not hold picks the failure branch.
        let not = c
            .txn(txn(Compare::value(
                "podmesh/v1/nodes/east/n1",
                CompareOp::Equal,
                r#"{"name":"n1"}"#,
            )))
            .await
            .unwrap();
        assert!(!not.succeeded());
        assert_eq!(
            keys(&not.op_responses()[0]),
            [r#"podmesh/v1/nodes/east/n2={"name":"n2"}"#]
        );

        // Writes anywhere (even in the branch that would not run, even nested) are refused.
        let refused = [
            (
                Txn::new().and_then(vec![TxnOp::put("podmesh/v1/x", "y", None)]),
                "Put (success[0])",
            ),
            (
                Txn::new()
                    .when(vec![Compare::version(
                        "podmesh/v1/x",
                        CompareOp::Greater,
                        99,
                    )])
                    .and_then(vec![TxnOp::get("podmesh/v1/x", None)])
                    .or_else(vec![TxnOp::delete("podmesh/v1/nodes/east/n1", None)]),
                "DeleteRange (failure[0])",
            ),
            (
                Txn::new().and_then(vec![TxnOp::txn(Txn::new().and_then(vec![TxnOp::put(
                    "podmesh/v1/x",
                    "y",
                    None,
                )]))]),
                "Put (success[0].txn.success[0])",
            ),
            (
                Txn::new().when(vec![Compare::version(
                    "secret/admin",
                    CompareOp::Greater,
                    0,
                )]),
                "compare[0]",
            ),
            (
                Txn::new().and_then(vec![TxnOp::get("secret/admin", None)]),
                "success[0]",
            ),
            (
                Txn::new().and_then(vec![TxnOp::get(
                    "podmesh/v1/",
                    Some(GetOptions::new().with_from_key()),
                )]),
                "success[0]",
            ),
        ];
        for (t, why) in refused {
            let e = c.txn(t).await.unwrap_err();
            let s = e.to_string();
            // tonic's text for PermissionDenied, or the proxy's own words.
            assert!(
                s.contains("does not have permission") || s.contains("permission denied"),
                "{s}"
            );
            assert!(s.contains(why), "message must name {why:?}: {s}");
        }
    });

    // etcdctl txn: a read-only one is answered, one with a put is refused.
    let o = etcdctl_txn(
        &proxy,
        "version(\"podmesh/v1/clusters/east\") > \"0\"\n\nget podmesh/v1/clusters/east\n\nget podmesh/v1/nodes/east/n2\n\n",
    );
    let s = describe_output(&o);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{s}");
    assert!(
        stdout.starts_with("SUCCESS")
            && stdout.contains(r#"{"name":"east","id":1}"#)
            && !stdout.contains("n2"),
        "{s}"
    );
    let o = etcdctl_txn(
        &proxy,
        "value(\"podmesh/v1/clusters/east\") = \"x\"\n\nget podmesh/v1/clusters/east\n\nput podmesh/v1/x y\n\n",
    );
    denied(&o, "Put (failure[0])");
    // Nothing was written upstream.
    let o = etcd.etcdctl(&["get", "podmesh/v1/x"]).unwrap();
    assert!(o.stdout.is_empty(), "{}", describe_output(&o));
}

#[test]
fn proxy_refuses_plaintext_no_cert_and_foreign_ca_and_reloads_its_certificate() {
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let mut proxy = Proxy::start(&etcd, &[]).unwrap();
    let get = ["get", "podmesh/v1/clusters/east", "--print-value-only"];

    let o = proxy.etcdctl(None, &get).unwrap();
    assert!(
        !o.status.success() && o.stdout.is_empty(),
        "no client cert must be refused: {}",
        describe_output(&o)
    );
    let other = Pki::new("other").unwrap();
    let stranger = other.client("stranger").unwrap();
    let o = proxy.etcdctl(Some(&stranger), &get).unwrap();
    assert!(
        !o.status.success() && o.stdout.is_empty(),
        "foreign CA must be refused: {}",
        describe_output(&o)
    );
    // Certificates of the proxy's own CA, but not made for client
    // authentication: no extendedKeyUsage at all, and a CA-like keyUsage.
    let spec = |name| podmesh_tests::pki::CertSpec {
        name,
        file: None,
        sans: vec![],
        server: false,
        client: false,
        expired: false,
    };
    let no_eku = proxy.pki().issue(&spec("no-eku")).unwrap();
    let cert_sign = proxy
        .pki()
        .issue_with(&spec("cert-sign"), |p| {
            p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
        })
        .unwrap();
    for (what, c) in [
        ("no extendedKeyUsage", &no_eku),
        ("keyCertSign only", &cert_sign),
    ] {
        let o = proxy.etcdctl(Some(c), &get).unwrap();
        assert!(
            !o.status.success() && o.stdout.is_empty(),
            "a client certificate with {what} must be refused: {}",
            describe_output(&o)
        );
    }
    let log = proxy.log();
    assert!(
        log.contains("has no extendedKeyUsage")
            && log.contains("does not include digitalSignature"),
        "{}",
        proxy.log_tail()
    );
    // Plaintext gRPC against the TLS port.
    let mut cmd = std::process::Command::new("etcdctl");
    let o = daemon::without_etcd_env(&mut cmd)
        .env("ETCDCTL_API", "3")
        .args([
            "--endpoints",
            &proxy.endpoint().replace("https://", "http://"),
            "--dial-timeout",
            "3s",
            "--command-timeout",
            "5s",
        ])
        .args(get)
        .output()
        .unwrap();
    assert!(
        !o.status.success() && o.stdout.is_empty(),
        "plaintext must be refused: {}",
        describe_output(&o)
    );
    assert!(
        proxy
            .metric("podmesh_proxy_refused_requests_total", "tls_handshake")
            .unwrap()
            >= 4.0
    );
    let o = proxy.etcdctl(Some(proxy.client()), &get).unwrap();
    assert!(o.status.success(), "{}", describe_output(&o));

    // Rotate the server certificate onto a new CA: the proxy serves the new
    // one without a restart (a client trusting only the new CA gets through).
    let fresh = Pki::new("rotated").unwrap();
    let new_server = fresh.server("proxy-server-2", &["127.0.0.1"]).unwrap();
    let pid = proxy.pid();
    std::fs::copy(&new_server.key, &proxy.server_cert().key).unwrap();
    std::fs::copy(&new_server.cert, &proxy.server_cert().cert).unwrap();
    let mk = || {
        let mut cmd = daemon::etcdctl_command(&proxy.endpoint(), fresh.ca(), Some(proxy.client()));
        cmd.args(["--dial-timeout", "3s", "--command-timeout", "5s"])
            .args(get);
        cmd
    };
    eventually(Duration::from_secs(20), || {
        let o = mk().output().map_err(|e| e.to_string())?;
        if o.status.success() {
            Ok(())
        } else {
            Err(describe_output(&o))
        }
    })
    .unwrap();
    assert_eq!(proxy.pid(), pid);
    assert!(proxy.metric("podmesh_proxy_tls_reloads_total", "").unwrap() >= 1.0);

    // SIGTERM: a clean exit.
    let st = proxy.terminate().unwrap();
    assert!(st.success(), "{st}");
}

/// Bad configuration exits 64 with one line that names what is wrong. An
/// address that cannot be bound (in use, or not an address of this host) is
/// not bad configuration (the same flags work once the port is free, and the
/// agent treats its status address the same way): exit 1, also one line.
#[test]
fn proxy_config_errors_exit_64_and_bind_failures_exit_1_with_one_line() {
    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let empty_ca = tempfile::NamedTempFile::new().unwrap();
    let bad_upstream = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        bad_upstream.path(),
        format!(
            "endpoints:\n- {}\ntrusted-ca-file: /nonexistent/upstream-ca.crt\n",
            etcd.endpoint()
        ),
    )
    .unwrap();
    // Each flag once (clap refuses a repeated flag, which would hide the
    // error under test), with free addresses unless the case says otherwise.
    let run = |flag: &str, value: &str| {
        let mut flags = vec![
            (
                "--listen",
                format!("127.0.0.1:{}", podmesh_tests::free_port()),
            ),
            (
                "--metrics-addr",
                format!("127.0.0.1:{}", podmesh_tests::free_port()),
            ),
            ("--upstream-config", path(proxy.upstream_config())),
            ("--tls-cert", path(&proxy.server_cert().cert)),
            ("--tls-key", path(&proxy.server_cert().key)),
            ("--client-ca", path(proxy.pki().ca())),
        ];
        flags.retain(|(f, _)| *f != flag);
        flags.push((flag, value.to_owned()));
        let bin = podmesh_tests::proxy::binary().unwrap();
        let mut cmd = std::process::Command::new(bin);
        for (f, v) in &flags {
            cmd.arg(f).arg(v);
        }
        let o = cmd.env("RUST_LOG", "info").output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        (o, err)
    };
    let in_use = proxy.endpoint().replace("https://", "");
    let metrics_in_use = format!("127.0.0.1:{}", proxy.metrics_port());
    let bad_upstream = path(bad_upstream.path());
    let empty_ca = path(empty_ca.path());
    for (flag, value, code, says) in [
        (
            "--upstream-config",
            "/nonexistent/upstream.yaml",
            64,
            "/nonexistent/upstream.yaml",
        ),
        (
            "--upstream-config",
            bad_upstream.as_str(),
            64,
            "/nonexistent/upstream-ca.crt",
        ),
        (
            "--tls-cert",
            "/nonexistent/tls.crt",
            64,
            "/nonexistent/tls.crt",
        ),
        ("--client-ca", empty_ca.as_str(), 64, "holds no PEM"),
        ("--allow-prefix", "", 64, "--allow-prefix"),
        ("--listen", "not-an-address", 64, "--listen"),
        ("--listen", in_use.as_str(), 1, "cannot listen on"),
        (
            "--metrics-addr",
            metrics_in_use.as_str(),
            1,
            "--metrics-addr",
        ),
        ("--metrics-addr", "192.0.2.1:9091", 1, "--metrics-addr"),
    ] {
        let (o, err) = run(flag, value);
        assert_eq!(
            o.status.code(),
            Some(code),
            "{flag} {value:?}: {}",
            describe_output(&o)
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(
            err.starts_with("podmesh-etcd-proxy: ") && err.contains(says),
            "{flag} {value:?} must say {says:?}: {err}"
        );
    }
}

fn path(p: &std::path::Path) -> String {
    p.to_str().unwrap().to_owned()
}

/// Kills the child on drop (also when an assertion fails).
struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn proxy_config_file_gives_the_flags_and_the_command_line_overrides_it() {
    let etcd = Etcd::start().unwrap();
    seed(&etcd);
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    let dir = tempfile::TempDir::new().unwrap();
    etcd.client_config(&dir.path().join("upstream.yaml"))
        .unwrap();
    let (port, metrics) = (podmesh_tests::free_port(), podmesh_tests::free_port());
    let cfg = dir.path().join("proxy.yaml");
    // Relative paths are taken relative to the file; allow-prefix is overridden below.
    std::fs::write(
        &cfg,
        format!(
            "listen: 127.0.0.1:{port}\nmetrics-addr: 127.0.0.1:{metrics}\nupstream-config: upstream.yaml\ntls-cert: {}\ntls-key: {}\nclient-ca: {}\nallow-prefix: podmesh/v1/nodes/\nhistory-events: 100\n",
            proxy.server_cert().cert.display(),
            proxy.server_cert().key.display(),
            proxy.pki().ca().display()
        ),
    )
    .unwrap();
    let bin = podmesh_tests::proxy::binary().unwrap();
    let child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&cfg)
        .args(["--allow-prefix", "podmesh/v1/"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let _child = Killed(child);
    eventually(Duration::from_secs(30), || {
        let b = podmesh_tests::etcd::http_get(metrics, "/readyz").map_err(|e| e.to_string())?;
        if b.contains(" 200 ") { Ok(()) } else { Err(b) }
    })
    .unwrap();
    rt().block_on(async {
        let mut c = podmesh_tests::etcd::connect(
            &[format!("https://127.0.0.1:{port}")],
            proxy.pki().ca(),
            Some(proxy.client()),
        )
        .await
        .unwrap();
        // Outside the file's prefix, inside the command line's: served.
        let r = c.get("podmesh/v1/clusters/east", None).await.unwrap();
        assert_eq!(r.kvs().len(), 1, "{r:?}");
    });

    // Unknown field, bad value: exit 64 with one line naming the field.
    for (text, field) in [
        (
            "listen: 127.0.0.1:1\nlisten-port: 2379\n",
            "\"listen-port\"",
        ),
        ("watch-buffer: lots\n", "\"watch-buffer\""),
        ("listen: nowhere\n", "\"listen\""),
    ] {
        std::fs::write(&cfg, text).unwrap();
        let o = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(
            o.status.code(),
            Some(64),
            "{text:?}: {}",
            describe_output(&o)
        );
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(field), "{text:?} must name {field}: {err}");
    }
}

/// Watch filters and cancel through etcd-client: a NOPUT watch sees only
/// deletes, a NODELETE watch only puts, both on one stream; a cancelled
/// watch is confirmed and gets nothing more while the other one goes on.
#[test]
fn proxy_watch_filters_and_cancel_through_etcd_client() {
    use etcd_client::{EventType, WatchFilterType, WatchResponse, WatchStream};

    async fn next(s: &mut WatchStream) -> WatchResponse {
        tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("no watch response within 10 s")
            .unwrap()
            .expect("watch stream ended")
    }

    let etcd = Etcd::start().unwrap();
    let proxy = Proxy::start(&etcd, &[]).unwrap();
    rt().block_on(async {
        let mut up = etcd.connect().await.unwrap();
        let cl = proxy.connect().await.unwrap();
        let prefix = "podmesh/v1/nodes/";
        let opts = |f| Some(WatchOptions::new().with_prefix().with_filters([f]));
        let mut s = cl
            .watch_client()
            .watch(prefix, opts(WatchFilterType::NoPut))
            .await
            .unwrap();
        s.watch(prefix, opts(WatchFilterType::NoDelete))
            .await
            .unwrap();
        let mut ids = Vec::new();
        while ids.len() < 2 {
            let r = next(&mut s).await;
            assert!(r.created(), "expected created, got {r:?}");
            ids.push(r.watch_id());
        }
        let (no_put, no_delete) = (ids[0], ids[1]);
        up.put(format!("{prefix}east/a"), "1", None).await.unwrap();
        up.delete(format!("{prefix}east/a"), None).await.unwrap();
        let mut seen: Vec<(i64, EventType)> = Vec::new();
        while seen.len() < 2 {
            let r = next(&mut s).await;
            seen.extend(r.events().iter().map(|e| (r.watch_id(), e.event_type())));
        }
        assert!(
            seen.contains(&(no_put, EventType::Delete))
                && seen.contains(&(no_delete, EventType::Put))
                && seen.len() == 2,
            "filters not applied: {seen:?}"
        );

        s.cancel(no_delete).await.unwrap();
        let r = next(&mut s).await;
        assert!(r.canceled() && r.watch_id() == no_delete, "{r:?}");
        // After the cancel only the other watch answers.
        up.put(format!("{prefix}east/b"), "1", None).await.unwrap();
        up.delete(format!("{prefix}east/b"), None).await.unwrap();
        let r = next(&mut s).await;
        assert_eq!(r.watch_id(), no_put, "a cancelled watch got {r:?}");
        assert_eq!(r.events().len(), 1);
        assert_eq!(r.events()[0].event_type(), EventType::Delete);
    });
}
