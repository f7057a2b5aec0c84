//! The config layer: the clustermesh Secret directory as the agent reads it
//! ([`crate::remote::secret::scan`]), and per cluster entry its TLS files:
//! present, PEM, a pair, the certificate issued by the trusted CA, valid now
//! and for 30 days more.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{Check, Layer, check};
use crate::{
    kvstore::client_config::EtcdClientConfig,
    model::ClusterName,
    remote::secret::{Listed, scan},
};

/// Days of validity under which a certificate is a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

const L: Layer = Layer::Config;

/// The Secret directory, read: every cluster entry, and the node-wide checks.
#[derive(Debug)]
pub struct SecretDir {
    /// The directory.
    pub dir: PathBuf,
    /// Every entry whose name is a cluster name.
    pub entries: BTreeMap<ClusterName, Listed>,
}

/// Reads `dir` as the agent does; `Err` when the directory itself cannot be read.
pub fn read_dir(dir: &Path, checks: &mut Vec<Check>) -> Result<SecretDir, String> {
    let entries = scan(dir).map_err(|e| e.to_string())?;
    checks.push(Check::pass(
        L,
        None,
        check::SECRET_DIR,
        format!("{}: {} cluster entries", dir.display(), entries.len()),
    ));
    // Files no entry names and that are no cluster name: a typo the agent ignores.
    let named: BTreeSet<PathBuf> = entries
        .values()
        .filter_map(|l| match l {
            Listed::File(f) => f.config.as_ref().ok(),
            Listed::Unreadable { .. } => None,
        })
        .flat_map(|c| [&c.trusted_ca_file, &c.cert_file, &c.key_file])
        .flatten()
        .filter_map(|p| p.file_name().map(PathBuf::from))
        .collect();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("..")
                || ClusterName::new(name.clone()).is_ok()
                || named.contains(Path::new(&name))
            {
                continue;
            }
            let looks_like_entry =
                std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("endpoints"));
            if looks_like_entry {
                let why = crate::model::cluster_name_problem(&name).unwrap_or("not a cluster name");
                checks.push(Check::warn(
                    L,
                    None,
                    check::SECRET_ENTRY_IGNORED,
                    format!("{name} holds an etcd client config but its name is no cluster name ({why}): the agent ignores it"),
                    "name the Secret key after the remote cluster exactly (a DNS label: `west`, not `west.yaml`)",
                ));
            }
        }
    }
    Ok(SecretDir {
        dir: dir.to_path_buf(),
        entries,
    })
}

/// The PEM certificates of `pem`.
pub fn certs(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    rustls_pemfile::certs(&mut &pem[..])
        .filter_map(Result::ok)
        .collect()
}

/// The first private key of `pem`.
pub fn key(pem: &[u8]) -> Option<PrivateKeyDer<'static>> {
    rustls_pemfile::private_key(&mut &pem[..]).ok().flatten()
}

/// `f(parsed certificate)` for DER `der`.
pub fn with_x509<T>(der: &[u8], f: impl FnOnce(&X509Certificate<'_>) -> T) -> Option<T> {
    X509Certificate::from_der(der).ok().map(|(_, c)| f(&c))
}

/// The subject of a DER certificate, as text.
pub fn subject(der: &[u8]) -> String {
    with_x509(der, |c| c.subject().to_string()).unwrap_or_else(|| "(unparsable)".into())
}

/// The issuer of a DER certificate, as text.
pub fn issuer(der: &[u8]) -> String {
    with_x509(der, |c| c.issuer().to_string()).unwrap_or_else(|| "(unparsable)".into())
}

/// The checks of one cluster's entry, up to the first failure.
pub fn check_entry(cluster: &str, listed: &Listed, local: Option<&str>) -> Vec<Check> {
    let c = Some(cluster);
    let mut out = Vec::new();
    let (path, cfg) = match listed {
        Listed::Unreadable { path, reason } => {
            out.push(Check::fail(
                L,
                c,
                check::SECRET_PARSES,
                format!("{}: cannot be read: {reason}", path.display()),
                "check the Secret: `kubectl -n podmesh get secret podmesh-clustermesh -o yaml`; a dangling link clears once the kubelet has swapped the Secret's data",
            ));
            return out;
        }
        Listed::File(f) => match &f.config {
            Ok(cfg) => (&f.path, cfg),
            Err(e) => {
                out.push(Check::fail(
                    L,
                    c,
                    check::SECRET_PARSES,
                    e.clone(),
                    "write the entry as an etcd client YAML: endpoints (https://host:port), trusted-ca-file, cert-file, key-file (`podmesh secret render` writes one)",
                ));
                return out;
            }
        },
    };
    out.push(Check::pass(
        L,
        c,
        check::SECRET_PARSES,
        format!("{}: endpoints {}", path.display(), cfg.endpoints.join(", ")),
    ));
    match local {
        Some(l) if l == cluster => {
            out.push(Check::fail(
                L,
                c,
                check::LOCAL_CLUSTER_LISTED,
                format!("the Secret lists {cluster}, this agent's own cluster; the agent ignores the entry"),
                "remove this cluster's own entry from its clustermesh Secret (each cluster lists only the others)",
            ));
            return out;
        }
        Some(_) => out.push(Check::pass(
            L,
            c,
            check::LOCAL_CLUSTER_LISTED,
            "not this agent's own cluster",
        )),
        None => {}
    }
    out.extend(check_tls(cluster, path, cfg));
    out
}

/// Stops collecting at the first failure.
struct Walk {
    out: Vec<Check>,
}

impl Walk {
    fn push(&mut self, c: Check) -> bool {
        let failed = c.is_failure();
        self.out.push(c);
        !failed
    }
}

fn check_tls(cluster: &str, path: &Path, cfg: &EtcdClientConfig) -> Vec<Check> {
    let c = Some(cluster);
    let mut w = Walk { out: Vec::new() };
    if !cfg.uses_tls() {
        w.push(Check::warn(
            L,
            c,
            check::TLS_FILES,
            format!("{}: plaintext endpoints, no TLS files", path.display()),
            "a podmesh etcd proxy speaks only TLS with client certificates: use https:// with trusted-ca-file, cert-file and key-file",
        ));
        return w.out;
    }
    let tls = match cfg.read_tls_files(path) {
        Ok(t) => t,
        Err(e) => {
            w.push(Check::fail(
                L,
                c,
                check::TLS_FILES,
                e.to_string(),
                "the files an entry names must be in the same Secret (`<cluster>.ca.crt`, `<cluster>.client.crt`, `<cluster>.client.key`)",
            ));
            return w.out;
        }
    };
    let cas = tls.ca.as_deref().map(certs).unwrap_or_default();
    let Some(ca) = cas.first().cloned() else {
        w.push(Check::fail(
            L,
            c,
            check::TLS_FILES,
            format!(
                "trusted-ca-file {} holds no PEM certificate",
                cfg.trusted_ca_file
                    .as_deref()
                    .unwrap_or(Path::new("?"))
                    .display()
            ),
            "put the remote proxy's CA certificate (PEM) into the entry's trusted-ca-file",
        ));
        return w.out;
    };
    let Some((cert_pem, key_pem)) = &tls.identity else {
        w.push(Check::fail(
            L,
            c,
            check::TLS_FILES,
            "no cert-file and key-file: the remote's etcd proxy refuses clients without a certificate",
            "add the client certificate and key the remote cluster issued for this one (`podmesh secret render`)",
        ));
        return w.out;
    };
    let chain = certs(cert_pem);
    let cert_file = cfg
        .cert_file
        .as_deref()
        .unwrap_or(Path::new("?"))
        .display()
        .to_string();
    let key_file = cfg
        .key_file
        .as_deref()
        .unwrap_or(Path::new("?"))
        .display()
        .to_string();
    let Some(leaf) = chain.first().cloned() else {
        w.push(Check::fail(
            L,
            c,
            check::TLS_FILES,
            format!("cert-file {cert_file} holds no PEM certificate"),
            "put the client certificate (PEM) into cert-file",
        ));
        return w.out;
    };
    let Some(key) = key(key_pem) else {
        w.push(Check::fail(
            L,
            c,
            check::TLS_FILES,
            format!("key-file {key_file} holds no PEM private key"),
            "put the client certificate's private key (PEM, PKCS#8, PKCS#1 or SEC1) into key-file",
        ));
        return w.out;
    };
    if !w.push(Check::pass(
        L,
        c,
        check::TLS_FILES,
        format!(
            "CA \"{}\", certificate \"{}\"",
            subject(&ca),
            subject(&leaf)
        ),
    )) {
        return w.out;
    }
    // A pair: the key's public half is the certificate's.
    let provider = rustls::crypto::ring::default_provider();
    let pair = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| e.to_string())
        .and_then(|k| {
            rustls::sign::CertifiedKey::new(chain.clone(), k)
                .keys_match()
                .map_err(|e| e.to_string())
        });
    let ok = match pair {
        Ok(()) => Check::pass(
            L,
            c,
            check::CERT_KEY_PAIR,
            format!("{key_file} is the key of {cert_file}"),
        ),
        Err(e) => Check::fail(
            L,
            c,
            check::CERT_KEY_PAIR,
            format!("key-file {key_file} is not the key of cert-file {cert_file} ({e})"),
            "put the certificate and the key issued together into the entry (a rotation wrote one without the other?)",
        ),
    };
    if !w.push(ok) {
        return w.out;
    }
    if !w.push(expiry(cluster, "client certificate", &cert_file, &leaf)) {
        return w.out;
    }
    let ca_file = cfg
        .trusted_ca_file
        .as_deref()
        .unwrap_or(Path::new("?"))
        .display()
        .to_string();
    if !w.push(expiry(cluster, "CA certificate", &ca_file, &ca)) {
        return w.out;
    }
    w.push(chains_to(
        cluster,
        &leaf,
        &chain[1..],
        &cas,
        &cert_file,
        &ca_file,
    ));
    w.out
}

/// Whether `leaf` is valid now and for [`EXPIRY_WARNING_DAYS`] more.
fn expiry(cluster: &str, what: &str, file: &str, der: &[u8]) -> Check {
    let c = Some(cluster);
    let Some((not_before, not_after)) = with_x509(der, |x| {
        (
            x.validity().not_before.timestamp(),
            x.validity().not_after.timestamp(),
        )
    }) else {
        return Check::fail(
            L,
            c,
            check::CERT_EXPIRY,
            format!("{what} {file} cannot be parsed"),
            "replace it with a valid X.509 certificate (PEM)",
        );
    };
    let now = UnixTime::now().as_secs() as i64;
    let date = |t: i64| {
        x509_parser::time::ASN1Time::from_timestamp(t)
            .map(|t| t.to_string())
            .unwrap_or_else(|_| t.to_string())
    };
    if not_after < now {
        return Check::fail(
            L,
            c,
            check::CERT_EXPIRY,
            format!("{what} {file} expired on {}", date(not_after)),
            format!(
                "issue a new {what} for this cluster's entry and update the clustermesh Secret (the agent picks it up without a restart)"
            ),
        );
    }
    if not_before > now {
        return Check::fail(
            L,
            c,
            check::CERT_EXPIRY,
            format!("{what} {file} is not valid before {}", date(not_before)),
            "check this node's clock, or issue a certificate valid now",
        );
    }
    let days = (not_after - now) / 86_400;
    if days < EXPIRY_WARNING_DAYS {
        return Check::warn(
            L,
            c,
            check::CERT_EXPIRY,
            format!("{what} {file} expires in {days} days ({})", date(not_after)),
            format!(
                "renew the {what} before {} and update the clustermesh Secret",
                date(not_after)
            ),
        );
    }
    Check::pass(
        L,
        c,
        check::CERT_EXPIRY,
        format!(
            "{what} {file} valid until {} ({days} days)",
            date(not_after)
        ),
    )
}

/// Whether `leaf` chains to one of `cas` as a client certificate (what the
/// remote's proxy checks: podmesh's Secrets carry one CA for both the
/// proxy's server certificate and its clients).
fn chains_to(
    cluster: &str,
    leaf: &CertificateDer<'static>,
    intermediates: &[CertificateDer<'static>],
    cas: &[CertificateDer<'static>],
    cert_file: &str,
    ca_file: &str,
) -> Check {
    let c = Some(cluster);
    let mut roots = rustls::RootCertStore::empty();
    for ca in cas {
        let _ = roots.add(ca.clone());
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build();
    let res = verifier.map_err(|e| e.to_string()).and_then(|v| {
        v.verify_client_cert(leaf, intermediates, UnixTime::now())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    match res {
        Ok(()) => Check::pass(
            L,
            c,
            check::CERT_CHAIN,
            format!("{cert_file} is issued by \"{}\" of {ca_file}", issuer(leaf)),
        ),
        Err(e) => Check::warn(
            L,
            c,
            check::CERT_CHAIN,
            format!(
                "{cert_file} (issued by \"{}\") does not chain to {ca_file} (\"{}\"): {e}",
                issuer(leaf),
                cas.first().map(|c| subject(c)).unwrap_or_default()
            ),
            "podmesh's Secrets carry the remote proxy's CA, which also issues its clients' certificates: unless the remote proxy trusts another CA for clients (reach tells), put the certificate that CA issued for this cluster into cert-file",
        ),
    }
}
