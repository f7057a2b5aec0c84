//! The key-value store the agent needs, as a narrow trait owned by its consumer (STYLE.md 3).
//!
//! [`KvStore::list_and_watch`] yields the current contents of a prefix, then
//! one [`KvEvent::ListDone`] with the list's revision, then live changes from
//! the next revision on. Publishing needs leases, a plain put and a
//! create-if-absent. [`etcd::EtcdStore`] talks to a real etcd with the TLS
//! settings of an etcd client YAML ([`client_config`]); [`memory::MemoryStore`]
//! is for unit tests.
use std::{future::Future, pin::Pin, time::Duration};

use futures::Stream;

pub mod client_config;
pub mod etcd;
pub mod memory;

/// A lease ID as the store hands it out.
pub type LeaseId = i64;

/// A key with its value and revisions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyValue {
    /// The key (lossily decoded as UTF-8).
    pub key: String,
    /// The raw value.
    pub value: Vec<u8>,
    /// Revision at which the key was created; decides who is the newcomer within one cluster.
    pub create_revision: i64,
    /// Revision of the last modification.
    pub mod_revision: i64,
}

/// One item of a [`KvStore::list_and_watch`] stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvEvent {
    /// A key exists (during the list) or was created/changed (while watching).
    Put(KeyValue),
    /// A key was deleted (or its lease expired).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the deletion.
        revision: i64,
    },
    /// The list is complete: every key under the prefix at `revision` was yielded.
    ListDone {
        /// The revision the list was taken at; the watch starts at the next one.
        revision: i64,
    },
}

/// The stream returned by [`KvStore::list_and_watch`]. It ends with an error
/// (never silently): the caller re-lists.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<KvEvent, KvError>> + Send>>;

/// A key-value store failure.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// Cannot reach or talk to the store. The message shows the whole
    /// cause chain on one line (the TLS reason sits deep in it); the cause
    /// itself stays the source, so that it can be told apart by type
    /// (`crate::remote::hint`).
    #[error("{op} at {endpoints}: {}", one_line(source.as_ref()))]
    Unavailable {
        /// What was attempted.
        op: &'static str,
        /// The endpoints tried.
        endpoints: String,
        /// The transport's error (the etcd client's, or the store's own).
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The watch's start revision was compacted away; the caller must re-list.
    #[error("watch compacted at revision {compact_revision}; re-listing")]
    Compacted {
        /// The store's compaction revision.
        compact_revision: i64,
    },
    /// The watch stream ended or was cancelled by the server.
    #[error("watch closed by the server: {reason}")]
    WatchClosed {
        /// The server's reason, if it gave one.
        reason: String,
    },
    /// The etcd client configuration cannot be used.
    #[error(transparent)]
    Config(#[from] client_config::ClientConfigError),
}

/// `e` and the messages of its sources on one line, each source only when
/// the text so far does not already hold it (clients often repeat their
/// cause in their own message).
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut msg = e.to_string();
    let mut src = e.source();
    while let Some(s) = src {
        let t = s.to_string();
        if !msg.contains(&t) {
            msg.push_str(": ");
            msg.push_str(&t);
        }
        src = s.source();
    }
    msg
}

/// What the agent needs from a key-value store. Implementations are cheap to clone.
pub trait KvStore: Clone + Send + Sync + 'static {
    /// The contents of `prefix`, then one `ListDone`, then live changes.
    fn list_and_watch(
        &self,
        prefix: &str,
    ) -> impl Future<Output = Result<EventStream, KvError>> + Send;
    /// The current value of `key`.
    fn get(&self, key: &str) -> impl Future<Output = Result<Option<KeyValue>, KvError>> + Send;
    /// Writes `key`, bound to `lease` when given.
    fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> impl Future<Output = Result<(), KvError>> + Send;
    /// Writes `key` only if it does not exist; returns the existing entry otherwise.
    fn create(
        &self,
        key: &str,
        value: Vec<u8>,
    ) -> impl Future<Output = Result<Option<KeyValue>, KvError>> + Send;
    /// Grants a lease that expires `ttl` after the last keep-alive.
    fn grant_lease(&self, ttl: Duration) -> impl Future<Output = Result<LeaseId, KvError>> + Send;
    /// Refreshes `lease`; `Ok(false)` when the store no longer knows it (expired, or the store was wiped).
    fn keep_alive(&self, lease: LeaseId) -> impl Future<Output = Result<bool, KvError>> + Send;
}
