//! Arbitrary bytes as an etcd client YAML (a clustermesh Secret entry): never
//! panic; what is accepted has endpoints with a scheme and consistent TLS files.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use podmesh_agent::kvstore::client_config::EtcdClientConfig;

fuzz_target!(|data: &[u8]| {
    match EtcdClientConfig::parse(data, Path::new("/etc/podmesh/clustermesh/east")) {
        Ok(c) => {
            assert!(!c.endpoints.is_empty());
            for e in &c.endpoints {
                assert!(e.starts_with("https://") || e.starts_with("http://"), "{e}");
            }
            assert_eq!(c.cert_file.is_some(), c.key_file.is_some());
            if c.endpoints.iter().any(|e| e.starts_with("https://")) {
                assert!(c.trusted_ca_file.is_some());
            }
            for f in [&c.trusted_ca_file, &c.cert_file, &c.key_file].into_iter().flatten() {
                assert!(f.is_absolute(), "{}", f.display());
            }
            let _ = c.fingerprint();
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
        }
    }
});
