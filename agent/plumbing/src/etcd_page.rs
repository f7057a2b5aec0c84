//! One page of an etcd range, read again in smaller pages while an answer
//! passes the client's receive limit: the agent's remote lists and the
//! proxy's upstream list and continuity check page the same way.
use etcd_client::{GetOptions, GetResponse, KvClient};

/// Reads the keys from `from` up to `end` (exclusive), at most `*limit` of
/// them, at `revision` (0: the current one), values too unless `keys_only`.
/// While the answer passes the client's receive limit, `*limit` shrinks
/// (by 8, down to one key) and the page is read again; the caller keeps the
/// smaller limit for its next pages.
pub async fn get_page(
    kv: &mut KvClient,
    from: &[u8],
    end: &[u8],
    revision: i64,
    limit: &mut i64,
    keys_only: bool,
) -> Result<GetResponse, etcd_client::Error> {
    loop {
        let mut opts = GetOptions::new()
            .with_range(end.to_vec())
            .with_limit(*limit);
        if revision > 0 {
            opts = opts.with_revision(revision);
        }
        if keys_only {
            opts = opts.with_keys_only();
        }
        match kv.get(from.to_vec(), Some(opts)).await {
            Err(e) if too_large(&e) && *limit > 1 => {
                *limit = (*limit / 8).max(1);
                tracing::debug!(
                    page = *limit,
                    "a page passed the receive limit; reading smaller pages"
                );
            }
            other => return other,
        }
    }
}

/// tonic's refusal of an answer over the receive limit. It has no code of
/// its own (`OUT_OF_RANGE`, shared with etcd's compacted revision), so its
/// text tells it apart.
pub fn too_large(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if s.code() == tonic::Code::OutOfRange && s.message().contains("message length too large"))
}
