//! The clustermesh Secret directory: one etcd client YAML per remote cluster.
//!
//! Kubernetes updates a Secret volume by writing a new timestamped directory
//! and swapping the `..data` symlink; the visible files are symlinks through
//! it. Scanning by path (following symlinks) each period sees every add,
//! change and removal, and hashing the referenced certificate files as well
//! sees a rotation. Files whose name is not a cluster name (`east.ca.crt`,
//! `..data`) are not cluster configs.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use crate::{kvstore::client_config::EtcdClientConfig, model::ClusterName};

/// One remote cluster's entry in the Secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RemoteFile {
    /// The file.
    pub path: PathBuf,
    /// Its parsed content, or why it cannot be used.
    pub config: Result<EtcdClientConfig, String>,
    /// Changes whenever the file or a certificate it names changes.
    pub fingerprint: u64,
}

/// Reads the directory now. A missing directory is an empty Secret.
pub fn scan(dir: &Path) -> BTreeMap<ClusterName, RemoteFile> {
    let mut out = BTreeMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for ent in rd.flatten() {
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(cluster) = ClusterName::new(name) else {
            continue;
        };
        let path = ent.path();
        // Follows the symlink into ..data; a dangling one is skipped.
        if !path.is_file() {
            continue;
        }
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(_) => continue,
        };
        let config = EtcdClientConfig::parse(&bytes, &path).map_err(|e| e.to_string());
        let fingerprint = match &config {
            Ok(c) => c.fingerprint(),
            Err(_) => {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                bytes.hash(&mut h);
                h.finish()
            }
        };
        out.insert(
            cluster,
            RemoteFile {
                path,
                config,
                fingerprint,
            },
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes the files as the kubelet does: a new data dir, then a `..data` swap.
    fn project(root: &Path, generation: u32, files: &[(&str, &str)]) {
        let data = root.join(format!("..2026_{generation}"));
        std::fs::create_dir(&data).unwrap();
        for (n, c) in files {
            std::fs::write(data.join(n), c).unwrap();
        }
        let tmp = root.join("..data_tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(data.file_name().unwrap(), &tmp).unwrap();
        std::fs::rename(&tmp, root.join("..data")).unwrap();
        for (n, _) in files {
            let link = root.join(n);
            if link.symlink_metadata().is_err() {
                std::os::unix::fs::symlink(Path::new("..data").join(n), &link).unwrap();
            }
        }
        // Remove top-level links whose target vanished, like the kubelet.
        for e in std::fs::read_dir(root).unwrap().flatten() {
            let n = e.file_name().to_string_lossy().to_string();
            if !n.starts_with("..") && !files.iter().any(|(f, _)| *f == n) {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }

    #[test]
    fn symlink_swaps_add_change_remove_and_rotate() {
        let d = tempfile::tempdir().unwrap();
        let yaml = "endpoints: [https://127.0.0.1:2379]\ntrusted-ca-file: east.ca.crt\n";
        project(d.path(), 1, &[("east", yaml), ("east.ca.crt", "CA1")]);
        let east = ClusterName::new("east").unwrap();
        let s1 = scan(d.path());
        assert_eq!(s1.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["east"]);
        // Rotation: same YAML, new CA.
        project(d.path(), 2, &[("east", yaml), ("east.ca.crt", "CA2")]);
        let s2 = scan(d.path());
        assert_ne!(s1[&east].fingerprint, s2[&east].fingerprint);
        // Add west (with a broken config), keep east.
        project(
            d.path(),
            3,
            &[
                ("east", yaml),
                ("east.ca.crt", "CA2"),
                ("west", "endpoints: [\n"),
            ],
        );
        let s3 = scan(d.path());
        assert_eq!(s3.len(), 2);
        assert_eq!(s3[&east].fingerprint, s2[&east].fingerprint);
        assert!(s3[&ClusterName::new("west").unwrap()].config.is_err());
        // Remove east.
        project(d.path(), 4, &[("west", "endpoints: [\n")]);
        let s4 = scan(d.path());
        assert_eq!(s4.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["west"]);
    }
}
