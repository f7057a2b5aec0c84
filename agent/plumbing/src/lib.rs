//! What `podmesh-agent` and `podmesh-etcd-proxy` share: one copy of the plumbing between a
//! process and the systems it talks to.
//!
//! - [`backoff`]: capped exponential backoff with jitter;
//! - [`duration`]: the one syntax of every duration flag (`500ms`, `10s`, `2m`);
//! - [`etcd_config`]: the etcd client YAML (Cilium's and etcd's format);
//! - [`etcd_page`]: one page of an etcd range, smaller while it is too large;
//! - [`flags`]: the `--config` YAML file of a binary's flags;
//! - [`http`]: the plain-HTTP endpoints, with connection, header and idle bounds;
//! - [`lifecycle`]: connect under a deadline, run a session, back off, report;
//! - [`limits`]: the open-files limit raised to what the process may have;
//! - [`yaml`]: YAML with one-line errors.

#![warn(unused_crate_dependencies)]

pub mod backoff;
pub mod duration;
pub mod etcd_config;
pub mod etcd_page;
pub mod flags;
pub mod http;
pub mod lifecycle;
pub mod limits;
pub mod yaml;
