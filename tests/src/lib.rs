//! Test harness: network namespaces, topologies, a real etcd with mTLS.
