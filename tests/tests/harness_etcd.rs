//! The harness's etcd: mTLS works, and is refused without a client certificate,
//! with a certificate from another CA, and in plaintext.
use std::{sync::Arc, time::Duration};

use podmesh_tests::{
    etcd::{Etcd, connect},
    pki::Pki,
    require_root,
};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs a get with these credentials; true when it succeeded within 15 s.
async fn get_succeeds(etcd: &Etcd, client: Option<&podmesh_tests::pki::CertFiles>) -> bool {
    let attempt = async {
        let mut c = connect(&[etcd.endpoint()], etcd.pki().ca(), client).await?;
        c.get("podmesh/v1/clusters/east", None).await?;
        anyhow::Ok(())
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(15), attempt).await,
        Ok(Ok(()))
    )
}

#[test]
fn etcd_over_mtls_reads_writes_and_refuses_strangers() {
    if !require_root("etcd_over_mtls_reads_writes_and_refuses_strangers") {
        return;
    }
    let etcd = Etcd::start_with(Arc::new(Pki::new("mtls").unwrap()), "mtls").unwrap();
    rt().block_on(async {
        let mut c = etcd.connect().await.unwrap();
        c.put(
            "podmesh/v1/clusters/east",
            r#"{"name":"east","id":1}"#,
            None,
        )
        .await
        .unwrap();
        let r = c.get("podmesh/v1/clusters/east", None).await.unwrap();
        assert_eq!(r.kvs()[0].value_str().unwrap(), r#"{"name":"east","id":1}"#);

        // The same call with the right certificate succeeds...
        assert!(get_succeeds(&etcd, Some(etcd.root_client())).await);
        // ...without a client certificate it is refused,
        assert!(
            !get_succeeds(&etcd, None).await,
            "no client certificate was accepted"
        );
        // ...and with a client certificate from another CA too.
        let other = Pki::new("other").unwrap();
        let stranger = other.client("stranger").unwrap();
        assert!(
            !get_succeeds(&etcd, Some(&stranger)).await,
            "a foreign CA was accepted"
        );
    });

    // Plaintext against the TLS port fails.
    let out = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &format!("http://127.0.0.1:{}", etcd.port())])
        .args([
            "--dial-timeout",
            "2s",
            "--command-timeout",
            "3s",
            "get",
            "podmesh/v1/clusters/east",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "plaintext get succeeded: {out:?}");

    // etcdctl with the right certificates sees the value.
    let out = etcd
        .etcdctl(&["get", "--print-value-only", "podmesh/v1/clusters/east"])
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"east\""));
}

#[test]
fn etcd_restart_keeps_data_and_restart_empty_drops_it() {
    if !require_root("etcd_restart_keeps_data_and_restart_empty_drops_it") {
        return;
    }
    let mut etcd = Etcd::start().unwrap();
    assert!(
        etcd.etcdctl(&["put", "podmesh/v1/k", "v"])
            .unwrap()
            .status
            .success()
    );
    etcd.restart().unwrap();
    let out = etcd
        .etcdctl(&["get", "--print-value-only", "podmesh/v1/k"])
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "v");
    etcd.restart_empty().unwrap();
    let out = etcd
        .etcdctl(&["get", "--print-value-only", "podmesh/v1/k"])
        .unwrap();
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "");
    assert!(etcd.metric("etcd_debugging_mvcc_watcher_total").is_ok());
}
