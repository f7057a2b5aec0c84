//! podmesh-agent: the node agent's library and the `podmesh` CLI's core.
//!
//! The wire contract lives in [`model`]; the kernel programs built from
//! `ebpf/podmesh-ebpf` are embedded as [`EBPF_OBJECT`].
#![warn(unused_crate_dependencies)]

// Dependencies of the binaries only (`src/bin/`): the lint above checks
// this crate root, which they share with the library.
use anyhow as _;
use tracing_subscriber as _;
// A dev-dependency of the examples only (plans written as YAML).
#[cfg(test)]
use serde_saphyr as _;

pub mod cli;
pub mod cni;
pub mod compact;
pub mod config;
pub mod datapath;
pub mod desired;
pub mod diagnose;
pub mod k8s;
pub mod kvstore;
pub mod model;
pub mod plan;
pub mod publish;
pub mod reconcile;
pub mod remote;
pub mod runtime;
pub mod status;
pub mod validate;

/// The compiled kernel programs (ELF for `bpfel-unknown-none`), aligned for aya.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/podmesh-ebpf.o"));
