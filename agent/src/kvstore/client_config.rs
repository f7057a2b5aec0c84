//! The etcd client YAML that Cilium and etcd use (DESIGN.md, "Remote cluster configuration"):
//! parsed by `podmesh_plumbing::etcd_config`, which the etcd proxy shares.
pub use podmesh_plumbing::etcd_config::{
    ClientConfigError, EtcdClientConfig, MAX_CONFIG_LEN, TlsFiles,
};
