//! What `podmesh-agent` and `podmesh-etcd-proxy` share: one copy of the plumbing between a
//! process and the systems it talks to.
//!
//! - [`backoff`]: capped exponential backoff with jitter;
//! - [`duration`]: the one syntax of every duration flag (`500ms`, `10s`, `2m`).

pub mod backoff;
pub mod duration;
