//! A throw-away certificate authority: CA, server and client certificates as PEM files.
use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct CertFiles {
    /// PEM certificate.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// A CA whose files live in a directory (a temp dir unless given one).
pub struct Pki {
    dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    issuer: Issuer<'static, KeyPair>,
    ca: PathBuf,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").field("dir", &self.dir).finish()
    }
}

/// What kind of certificate to issue.
#[derive(Clone, Debug)]
pub struct CertSpec<'a> {
    /// File stem and common name ("" gives a certificate without a CN).
    pub name: &'a str,
    /// File stem (defaults to `name`).
    pub file: Option<&'a str>,
    /// DNS names and IP addresses.
    pub sans: Vec<String>,
    /// Usable as a TLS server certificate.
    pub server: bool,
    /// Usable as a TLS client certificate.
    pub client: bool,
    /// Already expired.
    pub expired: bool,
}

impl Pki {
    /// A new CA in a fresh temp dir.
    pub fn new(label: &str) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("podmesh-pki-{label}-"))
            .tempdir()?;
        let mut pki = Self::in_dir(tmp.path(), label)?;
        pki._tmp = Some(tmp);
        Ok(pki)
    }

    /// A new CA whose files are written into `dir` (created if needed).
    pub fn in_dir(dir: &Path, label: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("podmesh test CA {label}"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        let ca = dir.join("ca.crt");
        std::fs::write(&ca, cert.pem())?;
        std::fs::write(dir.join("ca.key"), key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            _tmp: None,
            issuer: Issuer::new(params, key),
            ca,
        })
    }

    /// The CA certificate (PEM).
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A server certificate for `name` with these SANs (IPs or DNS names).
    pub fn server(&self, name: &str, sans: &[&str]) -> anyhow::Result<CertFiles> {
        self.issue(&CertSpec {
            name,
            file: None,
            sans: sans.iter().map(|s| s.to_string()).collect(),
            server: true,
            client: true,
            expired: false,
        })
    }

    /// A client certificate with common name `name`.
    pub fn client(&self, name: &str) -> anyhow::Result<CertFiles> {
        self.issue(&CertSpec {
            name,
            file: None,
            sans: vec![],
            server: false,
            client: true,
            expired: false,
        })
    }

    /// Issues a certificate as `spec` says and writes `<file>.crt` and `<file>.key`.
    pub fn issue(&self, spec: &CertSpec<'_>) -> anyhow::Result<CertFiles> {
        self.issue_with(spec, |_| {})
    }

    /// Like [`Pki::issue`], with `adjust` given the parameters last (for
    /// certificates the spec cannot describe: unusual key usages, …).
    pub fn issue_with(
        &self,
        spec: &CertSpec<'_>,
        adjust: impl FnOnce(&mut CertificateParams),
    ) -> anyhow::Result<CertFiles> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        for s in &spec.sans {
            params.subject_alt_names.push(match s.parse::<IpAddr>() {
                Ok(ip) => rcgen::SanType::IpAddress(ip),
                Err(_) => rcgen::SanType::DnsName(s.as_str().try_into().context("DNS SAN")?),
            });
        }
        // rcgen's default subject carries a CN; "" must really mean none.
        params.distinguished_name = rcgen::DistinguishedName::new();
        if !spec.name.is_empty() {
            params
                .distinguished_name
                .push(DnType::CommonName, spec.name);
        }
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        if spec.server {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        if spec.client {
            params
                .extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        if spec.expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        adjust(&mut params);
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let stem = spec.file.unwrap_or(if spec.name.is_empty() {
            "nocn"
        } else {
            spec.name
        });
        let files = CertFiles {
            cert: self.dir.join(format!("{stem}.crt")),
            key: self.dir.join(format!("{stem}.key")),
        };
        std::fs::write(&files.cert, cert.pem())?;
        std::fs::write(&files.key, key.serialize_pem())?;
        Ok(files)
    }
}
