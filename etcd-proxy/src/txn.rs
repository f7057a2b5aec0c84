//! Read-only Txn: refused when any branch writes or any key escapes the prefix, else answered from the cache at one revision.
use etcd_client::proto::{
    PbRangeResponse, PbResponseHeader, PbResponseOp, PbTxnOpRequest, PbTxnOpResponse, PbTxnRequest,
    PbTxnResponse,
};

use crate::budget::{Exhausted, MAX_KEY_BYTES, MAX_TXN_OPS};
use crate::cache::{Cache, RangeError};
use crate::prefix::{Escape, Prefix};

/// Why a Txn is refused; `at` names the offending part (`success[0]`,
/// `failure[1].txn.compare[0]`, …) so the client can find it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TxnRefusal {
    #[error("Txn with a {op} ({at})")]
    Write { op: &'static str, at: String },
    #[error("Txn {at}: {source}")]
    Escape {
        at: String,
        #[source]
        source: Escape,
    },
    /// etcd's own message for its `--max-txn-ops`, so clients recognise it.
    #[error(
        "etcdserver: too many operations in txn request ({ops} compares and requests, nested ones included; at most {MAX_TXN_OPS})"
    )]
    TooManyOps { ops: usize },
    #[error("Txn {at}: a key or range end of {bytes} bytes (at most {MAX_KEY_BYTES})")]
    KeyTooLong { at: String, bytes: usize },
}

impl TxnRefusal {
    /// Label for the refused-requests metric.
    pub fn reason(&self) -> &'static str {
        match self {
            TxnRefusal::Write { .. } => "read_only",
            TxnRefusal::Escape { source, .. } => source.reason(),
            TxnRefusal::TooManyOps { .. } => "too_many_ops",
            TxnRefusal::KeyTooLong { .. } => "key_too_long",
        }
    }
}

/// Accepts a Txn only when every compare key and every operation of both
/// branches (nested Txns included) is a read inside the prefix. Both branches
/// are checked, whichever the compares would pick: the answer must not
/// depend on the data.
/// Its size is bounded first: at most [`MAX_TXN_OPS`] operations in all and
/// keys of at most [`MAX_KEY_BYTES`].
pub fn check(prefix: &Prefix, req: &PbTxnRequest) -> Result<(), TxnRefusal> {
    let ops = count_ops(req);
    if ops > MAX_TXN_OPS {
        return Err(TxnRefusal::TooManyOps { ops });
    }
    check_at(prefix, req, "")
}

/// Compares and requests of a Txn, nested Txns' included (counting stops
/// early past the bound, so a huge request costs no more than a small one).
fn count_ops(req: &PbTxnRequest) -> usize {
    let mut n = req.compare.len() + req.success.len() + req.failure.len();
    for op in req.success.iter().chain(&req.failure) {
        if n > MAX_TXN_OPS {
            break;
        }
        if let Some(PbTxnOpRequest::RequestTxn(t)) = &op.request {
            n += count_ops(t);
        }
    }
    n
}

fn key_len(at: &str, key: &[u8], range_end: &[u8]) -> Result<(), TxnRefusal> {
    let bytes = key.len().max(range_end.len());
    if bytes > MAX_KEY_BYTES {
        return Err(TxnRefusal::KeyTooLong {
            at: at.to_string(),
            bytes,
        });
    }
    Ok(())
}

fn check_at(prefix: &Prefix, req: &PbTxnRequest, path: &str) -> Result<(), TxnRefusal> {
    for (i, c) in req.compare.iter().enumerate() {
        key_len(&format!("{path}compare[{i}]"), &c.key, &c.range_end)?;
        prefix
            .check(&c.key, &c.range_end)
            .map_err(|source| TxnRefusal::Escape {
                at: format!("{path}compare[{i}]"),
                source,
            })?;
    }
    for (branch, ops) in [("success", &req.success), ("failure", &req.failure)] {
        for (i, op) in ops.iter().enumerate() {
            let at = format!("{path}{branch}[{i}]");
            match &op.request {
                None => {}
                Some(PbTxnOpRequest::RequestRange(r)) => {
                    key_len(&at, &r.key, &r.range_end)?;
                    prefix
                        .check(&r.key, &r.range_end)
                        .map_err(|source| TxnRefusal::Escape { at, source })?
                }
                Some(PbTxnOpRequest::RequestPut(_)) => {
                    return Err(TxnRefusal::Write { op: "Put", at });
                }
                Some(PbTxnOpRequest::RequestDeleteRange(_)) => {
                    return Err(TxnRefusal::Write {
                        op: "DeleteRange",
                        at,
                    });
                }
                Some(PbTxnOpRequest::RequestTxn(t)) => check_at(prefix, t, &format!("{at}.txn."))?,
            }
        }
    }
    Ok(())
}

/// Evaluates a checked Txn against the cache: the compares pick the branch,
/// whose ranges are answered like Range (same revision rules). Everything is
/// read under one cache lock, so the whole Txn sees one revision.
pub fn evaluate(
    cache: &Cache,
    req: &PbTxnRequest,
    header: &PbResponseHeader,
    take: &mut dyn FnMut(usize) -> Result<(), Exhausted>,
) -> Result<PbTxnResponse, RangeError> {
    let succeeded = req.compare.iter().all(|c| cache.compare(c));
    let ops = if succeeded {
        &req.success
    } else {
        &req.failure
    };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        let response = match &op.request {
            Some(PbTxnOpRequest::RequestRange(r)) => {
                let r = cache.range_within(r, take)?;
                Some(PbTxnOpResponse::ResponseRange(PbRangeResponse {
                    header: Some(*header),
                    kvs: r.kvs,
                    more: r.more,
                    count: r.count,
                }))
            }
            Some(PbTxnOpRequest::RequestTxn(t)) => Some(PbTxnOpResponse::ResponseTxn(evaluate(
                cache, t, header, take,
            )?)),
            // check() refused these before; an empty op answers empty.
            Some(PbTxnOpRequest::RequestPut(_) | PbTxnOpRequest::RequestDeleteRange(_)) | None => {
                None
            }
        };
        responses.push(PbResponseOp { response });
    }
    Ok(PbTxnResponse {
        header: Some(*header),
        succeeded,
        responses,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use etcd_client::CompareOp;
    use etcd_client::proto::{
        PbCompare, PbCompareTarget, PbDeleteRequest, PbKeyValue, PbPutRequest, PbRangeRequest,
        PbTargetUnion, PbTxnRequestOp,
    };

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

    fn cache() -> Cache {
        let mut c = Cache::new(8);
        c.reset(
            vec![
                kv("p/a", "1", 2, 2, 1),
                kv("p/b", "2", 3, 7, 3),
                kv("p/c", "3", 4, 5, 2),
            ],
            10,
        );
        c
    }

    fn cmp(key: &str, target: PbCompareTarget, result: CompareOp, u: PbTargetUnion) -> PbCompare {
        PbCompare {
            result: result as i32,
            target: target as i32,
            key: key.into(),
            range_end: Vec::new(),
            target_union: Some(u),
        }
    }

    fn get(key: &str, end: &str) -> PbTxnRequestOp {
        PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestRange(PbRangeRequest {
                key: key.into(),
                range_end: end.into(),
                ..Default::default()
            })),
        }
    }

    fn keys(r: &PbResponseOp) -> Vec<String> {
        match &r.response {
            Some(PbTxnOpResponse::ResponseRange(r)) => r
                .kvs
                .iter()
                .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
                .collect(),
            other => panic!("not a range response: {other:?}"),
        }
    }

    fn prefix() -> Prefix {
        Prefix::new("p/").unwrap()
    }

    #[test]
    fn compares_pick_the_branch_like_etcd() {
        let c = cache();
        let h = PbResponseHeader::default();
        let value_eq = cmp(
            "p/a",
            PbCompareTarget::Value,
            CompareOp::Equal,
            PbTargetUnion::Value(b"1".to_vec()),
        );
        let txn = |compare: Vec<PbCompare>| PbTxnRequest {
            compare,
            success: vec![get("p/a", "")],
            failure: vec![get("p/", "p0"), get("p/c", "")],
        };
        let r = evaluate(&c, &txn(vec![value_eq.clone()]), &h, &mut |_| Ok(())).unwrap();
        assert!(r.succeeded);
        assert_eq!(r.responses.len(), 1);
        assert_eq!(keys(&r.responses[0]), ["p/a"]);

        let mut value_ne = value_eq.clone();
        value_ne.result = CompareOp::NotEqual as i32;
        let r = evaluate(&c, &txn(vec![value_eq.clone(), value_ne]), &h, &mut |_| {
            Ok(())
        })
        .unwrap();
        assert!(!r.succeeded);
        assert_eq!(keys(&r.responses[0]), ["p/a", "p/b", "p/c"]);
        assert_eq!(keys(&r.responses[1]), ["p/c"]);

        let t = |key, target, op, u| {
            evaluate(&c, &txn(vec![cmp(key, target, op, u)]), &h, &mut |_| Ok(()))
        };
        use PbCompareTarget::*;
        let yes = [
            t(
                "p/b",
                Mod,
                CompareOp::Greater,
                PbTargetUnion::ModRevision(6),
            ),
            t("p/b", Version, CompareOp::Equal, PbTargetUnion::Version(3)),
            t(
                "p/b",
                Create,
                CompareOp::Less,
                PbTargetUnion::CreateRevision(4),
            ),
            t("p/b", Lease, CompareOp::Equal, PbTargetUnion::Lease(0)),
            // A missing key compares as the zero key-value (version 0 = "does not exist") ...
            t("p/z", Version, CompareOp::Equal, PbTargetUnion::Version(0)),
            t(
                "p/z",
                Create,
                CompareOp::Equal,
                PbTargetUnion::CreateRevision(0),
            ),
        ];
        assert!(yes.iter().all(|r| r.as_ref().unwrap().succeeded), "{yes:?}");
        let no = [
            t("p/b", Mod, CompareOp::Less, PbTargetUnion::ModRevision(7)),
            t(
                "p/a",
                Value,
                CompareOp::Greater,
                PbTargetUnion::Value(b"1".to_vec()),
            ),
            // ... except that comparing its value always fails.
            t(
                "p/z",
                Value,
                CompareOp::NotEqual,
                PbTargetUnion::Value(b"x".to_vec()),
            ),
        ];
        assert!(no.iter().all(|r| !r.as_ref().unwrap().succeeded), "{no:?}");

        // A range compare holds only when it holds for every key in it.
        let mut all = cmp("p/", Mod, CompareOp::Greater, PbTargetUnion::ModRevision(1));
        all.range_end = b"p0".to_vec();
        assert!(
            evaluate(&c, &txn(vec![all.clone()]), &h, &mut |_| Ok(()))
                .unwrap()
                .succeeded
        );
        all.target_union = Some(PbTargetUnion::ModRevision(4));
        assert!(
            !evaluate(&c, &txn(vec![all]), &h, &mut |_| Ok(()))
                .unwrap()
                .succeeded
        );
        // No compares: success.
        assert!(
            evaluate(&c, &txn(vec![]), &h, &mut |_| Ok(()))
                .unwrap()
                .succeeded
        );
    }

    #[test]
    fn nested_read_txn_and_revision_rules() {
        let c = cache();
        let h = PbResponseHeader::default();
        let inner = PbTxnRequest {
            compare: vec![],
            success: vec![get("p/b", "")],
            failure: vec![],
        };
        let outer = PbTxnRequest {
            compare: vec![],
            success: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(inner)),
            }],
            failure: vec![],
        };
        assert_eq!(check(&prefix(), &outer), Ok(()));
        let r = evaluate(&c, &outer, &h, &mut |_| Ok(())).unwrap();
        match &r.responses[0].response {
            Some(PbTxnOpResponse::ResponseTxn(t)) => assert_eq!(keys(&t.responses[0]), ["p/b"]),
            other => panic!("{other:?}"),
        }
        let mut future = get("p/a", "");
        if let Some(PbTxnOpRequest::RequestRange(r)) = &mut future.request {
            r.revision = 11;
        }
        let t = PbTxnRequest {
            compare: vec![],
            success: vec![future],
            failure: vec![],
        };
        assert!(matches!(
            evaluate(&c, &t, &h, &mut |_| Ok(())),
            Err(RangeError::Future { .. })
        ));
    }

    #[test]
    fn refuses_writes_anywhere_and_keys_outside() {
        let p = prefix();
        let put = PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestPut(PbPutRequest {
                key: b"p/a".to_vec(),
                ..Default::default()
            })),
        };
        let del = PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestDeleteRange(PbDeleteRequest {
                key: b"p/a".to_vec(),
                ..Default::default()
            })),
        };
        let t = |compare, success, failure| PbTxnRequest {
            compare,
            success,
            failure,
        };
        // A write in the branch the compares would not pick is refused as well.
        let e = check(&p, &t(vec![], vec![get("p/a", "")], vec![put.clone()])).unwrap_err();
        assert_eq!(
            e,
            TxnRefusal::Write {
                op: "Put",
                at: "failure[0]".into()
            }
        );
        let e = check(&p, &t(vec![], vec![del], vec![])).unwrap_err();
        assert_eq!(e.reason(), "read_only");
        assert!(e.to_string().contains("DeleteRange (success[0])"), "{e}");
        let nested = PbTxnRequestOp {
            request: Some(PbTxnOpRequest::RequestTxn(t(vec![], vec![], vec![put]))),
        };
        let e = check(&p, &t(vec![], vec![get("p/a", ""), nested], vec![])).unwrap_err();
        assert!(e.to_string().contains("success[1].txn.failure[0]"), "{e}");

        let outside = cmp(
            "q/a",
            PbCompareTarget::Version,
            CompareOp::Equal,
            PbTargetUnion::Version(0),
        );
        let e = check(&p, &t(vec![outside], vec![], vec![])).unwrap_err();
        assert_eq!(e.reason(), "key_outside_prefix");
        assert!(e.to_string().contains("compare[0]"), "{e}");
        let e = check(&p, &t(vec![], vec![], vec![get("p/", "\0")])).unwrap_err();
        assert_eq!(e.reason(), "from_key");
        let e = check(&p, &t(vec![], vec![get("p/a", "q")], vec![])).unwrap_err();
        assert_eq!(e.reason(), "range_end_outside_prefix");
    }

    #[test]
    fn a_txn_is_bounded_in_operations_and_key_length() {
        let p = prefix();
        let many = PbTxnRequest {
            success: (0..MAX_TXN_OPS).map(|_| get("p/a", "")).collect(),
            ..Default::default()
        };
        assert_eq!(check(&p, &many), Ok(()));
        let nested = PbTxnRequest {
            success: vec![PbTxnRequestOp {
                request: Some(PbTxnOpRequest::RequestTxn(many.clone())),
            }],
            ..Default::default()
        };
        assert_eq!(
            check(&p, &nested),
            Err(TxnRefusal::TooManyOps {
                ops: MAX_TXN_OPS + 1
            })
        );
        let long = format!("p/{}", "x".repeat(MAX_KEY_BYTES));
        let t = PbTxnRequest {
            failure: vec![get("p/a", ""), get(&long, "")],
            ..Default::default()
        };
        assert!(matches!(
            check(&p, &t),
            Err(TxnRefusal::KeyTooLong { at, .. }) if at == "failure[1]"
        ));
    }

    #[test]
    fn a_txn_answer_is_charged_before_it_is_built() {
        let c = cache();
        let h = PbResponseHeader::default();
        let t = PbTxnRequest {
            success: vec![get("p/", "p0"), get("p/", "p0")],
            ..Default::default()
        };
        let mut charged = Vec::new();
        evaluate(&c, &t, &h, &mut |n| {
            charged.push(n);
            Ok(())
        })
        .unwrap();
        // Three keys of 3 bytes, values of 1 byte, per range.
        assert_eq!(charged, vec![3 * (3 + 1 + 32); 2]);
        let r = evaluate(&c, &t, &h, &mut |_| Err(Exhausted::TooLarge { limit: 1 }));
        assert_eq!(
            r,
            Err(RangeError::Exhausted(Exhausted::TooLarge { limit: 1 }))
        );
    }
}
