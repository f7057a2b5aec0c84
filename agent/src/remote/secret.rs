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

/// One name of the Secret directory that is a cluster name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Listed {
    /// The file, read.
    File(RemoteFile),
    /// Listed, but its content could not be read now (a symlink dangling
    /// while the kubelet swaps `..data`, out of file descriptors): not a
    /// removal. Whoever follows it keeps the last content it read.
    Unreadable {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The Secret directory itself could not be read (missing, out of file
/// descriptors, permissions): nothing can be concluded about any entry.
#[derive(Debug, thiserror::Error)]
#[error("cannot read the clustermesh Secret directory {}: {source}", dir.display())]
pub struct ScanError {
    /// The directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl ScanError {
    /// The directory does not exist (no Secret mounted, or not yet).
    pub fn is_missing(&self) -> bool {
        self.source.kind() == std::io::ErrorKind::NotFound
    }
}

/// Reads the directory now: every name that is a cluster name, read or not.
/// A name that is not listed is absent; one listed but unreadable is not.
pub fn scan(dir: &Path) -> Result<BTreeMap<ClusterName, Listed>, ScanError> {
    let err = |source| ScanError {
        dir: dir.to_path_buf(),
        source,
    };
    let mut out = BTreeMap::new();
    for ent in std::fs::read_dir(dir).map_err(err)? {
        // An error while listing leaves the listing incomplete: a name
        // missing from it would look removed.
        let ent = ent.map_err(err)?;
        let Some(name) = ent.file_name().to_str().map(str::to_string) else {
            continue;
        };
        let Ok(cluster) = ClusterName::new(name) else {
            continue;
        };
        let path = ent.path();
        // Follows the symlink into ..data.
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                let reason = if e.kind() == std::io::ErrorKind::NotFound {
                    "it is a symlink to nothing (the kubelet may be updating the Secret)"
                        .to_string()
                } else {
                    e.to_string()
                };
                out.insert(cluster, Listed::Unreadable { path, reason });
                continue;
            }
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
            Listed::File(RemoteFile {
                path,
                config,
                fingerprint,
            }),
        );
    }
    Ok(out)
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
        let files = |dir: &Path| -> BTreeMap<ClusterName, RemoteFile> {
            scan(dir)
                .unwrap()
                .into_iter()
                .map(|(k, l)| match l {
                    Listed::File(f) => (k, f),
                    other => panic!("{other:?}"),
                })
                .collect()
        };
        let s1 = files(d.path());
        assert_eq!(s1.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["east"]);
        // Rotation: same YAML, new CA.
        project(d.path(), 2, &[("east", yaml), ("east.ca.crt", "CA2")]);
        let s2 = files(d.path());
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
        let s3 = files(d.path());
        assert_eq!(s3.len(), 2);
        assert_eq!(s3[&east].fingerprint, s2[&east].fingerprint);
        assert!(s3[&ClusterName::new("west").unwrap()].config.is_err());
        // Remove east.
        project(d.path(), 4, &[("west", "endpoints: [\n")]);
        let s4 = files(d.path());
        assert_eq!(s4.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["west"]);
    }

    #[test]
    fn a_dangling_link_is_listed_unreadable_and_a_missing_directory_is_an_error() {
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("..data/east", d.path().join("east")).unwrap();
        let s = scan(d.path()).unwrap();
        assert!(
            matches!(&s[&ClusterName::new("east").unwrap()], Listed::Unreadable { reason, .. } if reason.contains("symlink to nothing")),
            "{s:?}"
        );
        let e = scan(&d.path().join("nope")).unwrap_err();
        assert!(e.is_missing(), "{e}");
    }
}
