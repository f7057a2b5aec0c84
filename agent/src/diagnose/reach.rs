//! The reach layer: per endpoint of a cluster's entry, DNS, TCP and the TLS
//! handshake, with the evidence of [`super::tls`] and the cause classifier
//! the agent uses ([`crate::remote::hint::classify`]). A cluster is
//! reachable when one endpoint passes; the other endpoints' failures are
//! then warnings.
use std::{net::SocketAddr, path::Path, time::Duration};

use rustls::pki_types::ServerName;

use super::{Check, Layer, Severity, check, config, tls};
use crate::{
    kvstore::client_config::EtcdClientConfig,
    remote::hint::{self, Cause, classify},
};

const L: Layer = Layer::Reach;

/// `(host, port)` of an `http(s)://host:port[/…]` endpoint (brackets of an IPv6 host removed).
pub fn host_port(endpoint: &str) -> Option<(String, u16)> {
    let rest = endpoint.split_once("://").map_or(endpoint, |(_, r)| r);
    let authority = rest.split('/').next()?;
    let (host, port) = if let Some(r) = authority.strip_prefix('[') {
        let (h, p) = r.split_once(']')?;
        (h, p.strip_prefix(':').unwrap_or(""))
    } else {
        authority.rsplit_once(':').unwrap_or((authority, ""))
    };
    let port = if port.is_empty() {
        2379
    } else {
        port.parse().ok()?
    };
    (!host.is_empty()).then(|| (host.to_string(), port))
}

/// The reach checks of every endpoint of `cfg`.
pub async fn check_cluster(
    cluster: &str,
    path: &Path,
    cfg: &EtcdClientConfig,
    wait: Duration,
) -> Vec<Check> {
    let mut per_endpoint = Vec::new();
    for e in &cfg.endpoints {
        per_endpoint.push(check_endpoint(cluster, path, cfg, e, wait).await);
    }
    let any_ok = per_endpoint
        .iter()
        .any(|cs| !cs.iter().any(Check::is_failure));
    per_endpoint
        .into_iter()
        .flatten()
        .map(|mut c| {
            if any_ok && c.is_failure() {
                c.severity = Severity::Warning;
                c.fix = format!(
                    "{} (another endpoint answers, so the cluster is reachable)",
                    c.fix
                );
            }
            c
        })
        .collect()
}

async fn check_endpoint(
    cluster: &str,
    path: &Path,
    cfg: &EtcdClientConfig,
    endpoint: &str,
    wait: Duration,
) -> Vec<Check> {
    let c = Some(cluster);
    let mut out = Vec::new();
    let Some((host, port)) = host_port(endpoint) else {
        out.push(Check::fail(
            L,
            c,
            check::DNS,
            format!("{endpoint}: no host and port"),
            "write endpoints as https://host:port",
        ));
        return out;
    };
    let addrs: Vec<SocketAddr> = match tokio::time::timeout(
        wait,
        tokio::net::lookup_host((host.as_str(), port)),
    )
    .await
    {
        Ok(Ok(a)) => a.collect(),
        Ok(Err(e)) => {
            out.push(Check::fail(L, c, check::DNS, format!("{endpoint}: {host} does not resolve: {e}"), "the endpoint must be the remote proxy Service's external DNS name or address (`kubectl -n podmesh get svc podmesh-etcd-proxy` in the remote cluster); check this node's resolver"));
            return out;
        }
        Err(_) => {
            out.push(Check::fail(
                L,
                c,
                check::DNS,
                format!(
                    "{endpoint}: resolving {host} took longer than {}s",
                    wait.as_secs()
                ),
                "check this node's DNS resolver",
            ));
            return out;
        }
    };
    if addrs.is_empty() {
        out.push(Check::fail(
            L,
            c,
            check::DNS,
            format!("{endpoint}: {host} has no address"),
            "publish an address for the name, or use the remote proxy's address",
        ));
        return out;
    }
    let list = addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    out.push(Check::pass(
        L,
        c,
        check::DNS,
        format!("{endpoint}: {host} is {list}"),
    ));
    let mut reached = None;
    let mut errors = Vec::new();
    for a in &addrs {
        match tokio::time::timeout(wait, tokio::net::TcpStream::connect(a)).await {
            Ok(Ok(_)) => {
                reached = Some(*a);
                break;
            }
            Ok(Err(e)) => errors.push(format!("{a}: {e}")),
            Err(_) => errors.push(format!(
                "{a}: no answer within {}s (dropped by a firewall?)",
                wait.as_secs()
            )),
        }
    }
    let Some(addr) = reached else {
        out.push(Check::fail(
            L,
            c,
            check::TCP,
            format!("{endpoint}: {}", errors.join("; ")),
            format!("nothing accepts connections there: {}; the remote proxy pods must be Ready and its Service reachable from this node on TCP {port} (firewalls, security groups, loadBalancerSourceRanges)", hint::UNREACHABLE),
        ));
        return out;
    };
    out.push(Check::pass(
        L,
        c,
        check::TCP,
        format!("{endpoint}: connected to {addr}"),
    ));
    if !endpoint.starts_with("https://") {
        return out;
    }
    out.extend(check_tls(cluster, path, cfg, endpoint, &host, addr, wait).await);
    out
}

#[allow(clippy::too_many_arguments)]
async fn check_tls(
    cluster: &str,
    path: &Path,
    cfg: &EtcdClientConfig,
    endpoint: &str,
    host: &str,
    addr: SocketAddr,
    wait: Duration,
) -> Vec<Check> {
    let c = Some(cluster);
    let mut out = Vec::new();
    // The config layer passed: the files are there and parse.
    let Ok(files) = cfg.read_tls_files(path) else {
        return out;
    };
    let cas = files.ca.as_deref().map(config::certs).unwrap_or_default();
    let identity = files
        .identity
        .as_ref()
        .and_then(|(cert, key)| Some((config::certs(cert), config::key(key)?)));
    let client_issuer = identity
        .as_ref()
        .and_then(|(ch, _)| ch.first())
        .map(|l| config::issuer(l))
        .unwrap_or_default();
    let ca_subject = cas.first().map(|c| config::subject(c)).unwrap_or_default();
    let ca_file = cfg
        .trusted_ca_file
        .as_deref()
        .unwrap_or(Path::new("?"))
        .display()
        .to_string();
    let name = match ServerName::try_from(host.to_string()) {
        Ok(n) => n,
        Err(e) => {
            out.push(Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!("{endpoint}: {host} is no TLS server name: {e}"),
                "write the endpoint with a DNS name or an IP address",
            ));
            return out;
        }
    };
    let hs = match tls::handshake(addr, name, &cas, identity, wait).await {
        Ok(h) => h,
        Err(e) => {
            out.push(Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!("{endpoint}: {e}"),
                "fix the entry's TLS files",
            ));
            return out;
        }
    };
    let server = hs.server_chain.first();
    let server_desc = server
        .map(|s| {
            format!(
                "server certificate \"{}\" issued by \"{}\"",
                config::subject(s),
                config::issuer(s)
            )
        })
        .unwrap_or_else(|| "no server certificate".into());
    let accepts = match &hs.acceptable_cas {
        Some(v) if v.is_empty() => {
            "the server asked for a client certificate without naming CAs".to_string()
        }
        Some(v) => format!(
            "the server accepts client certificates issued by: {}",
            v.iter()
                .map(|n| format!("\"{n}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        None => "the server asked for no client certificate".to_string(),
    };
    if let Some(e) = &hs.server_error {
        use rustls::{CertificateError as C, Error as R};
        let names = server
            .and_then(|s| config::with_x509(s, sans))
            .unwrap_or_default();
        let check = match e {
            R::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
                Check::fail(
                    L,
                    c,
                    check::SERVER_CERT_NAME,
                    format!("{endpoint}: the server certificate names [{names}], not {host}"),
                    "the remote proxy's server certificate must carry the name or address of `endpoints:` as a subject alternative name: reissue it, or write an endpoint it names",
                )
            }
            R::InvalidCertificate(
                C::Expired
                | C::ExpiredContext { .. }
                | C::NotValidYet
                | C::NotValidYetContext { .. },
            ) => Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!("{endpoint}: {server_desc}: {e}"),
                hint::SERVER_EXPIRED,
            ),
            _ => Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!(
                    "{endpoint}: {server_desc}: {e}; trusted-ca-file {ca_file} holds \"{ca_subject}\""
                ),
                format!(
                    "{}: put the CA that issued the remote proxy's certificate (the ca.crt of the remote's podmesh-etcd-proxy-tls) into trusted-ca-file",
                    hint::SERVER_UNTRUSTED
                ),
            ),
        };
        out.push(check);
        return out;
    }
    if let Some(f) = &hs.failure {
        let cause = classify(f);
        let refused = cause == Some(Cause::ClientCertRefused)
            || (hs.version.is_some()
                && matches!(cause, Some(Cause::ConnectionLost | Cause::HandshakeEof)));
        let check = if refused {
            Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!(
                    "{endpoint}: the server refused this node's client certificate ({f}); {accepts}; cert-file is issued by \"{client_issuer}\""
                ),
                hint::CLIENT_CERT_REFUSED,
            )
        } else if matches!(cause, Some(Cause::NotTls | Cause::HandshakeEof)) {
            Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!("{endpoint}: {f}"),
                hint::NOT_TLS,
            )
        } else if matches!(cause, Some(Cause::TimedOut)) {
            Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!(
                    "{endpoint}: the endpoint accepted the connection but did not complete the TLS handshake or answer in {}s",
                    wait.as_secs()
                ),
                "a hung etcd proxy, or a load balancer with no healthy backend: check the remote's etcd proxy",
            )
        } else {
            Check::fail(
                L,
                c,
                check::TLS_HANDSHAKE,
                format!("{endpoint}: {f}; {server_desc}; {accepts}"),
                "check trusted-ca-file, cert-file and key-file of this cluster's entry",
            )
        };
        out.push(check);
        return out;
    }
    out.push(Check::pass(
        L,
        c,
        check::SERVER_CERT_NAME,
        format!("{endpoint}: {server_desc} names {host}"),
    ));
    out.push(Check::pass(
        L,
        c,
        check::TLS_HANDSHAKE,
        format!(
            "{endpoint}: {} accepted; {accepts}",
            hs.version.as_deref().unwrap_or("TLS")
        ),
    ));
    out
}

/// The subject alternative names of a certificate, as text.
fn sans(c: &x509_parser::certificate::X509Certificate<'_>) -> String {
    c.subject_alternative_name()
        .ok()
        .flatten()
        .map(|s| {
            s.value
                .general_names
                .iter()
                .map(|n| match n {
                    x509_parser::extensions::GeneralName::DNSName(d) => d.to_string(),
                    x509_parser::extensions::GeneralName::IPAddress(b) => match b.len() {
                        4 => std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                        16 => {
                            std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                                .to_string()
                        }
                        _ => format!("{b:?}"),
                    },
                    other => other.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::host_port;

    #[test]
    fn endpoints_split() {
        assert_eq!(
            host_port("https://10.0.0.1:2379"),
            Some(("10.0.0.1".into(), 2379))
        );
        assert_eq!(
            host_port("https://[fd00::1]:32379/x"),
            Some(("fd00::1".into(), 32379))
        );
        assert_eq!(
            host_port("https://mesh.example.com"),
            Some(("mesh.example.com".into(), 2379))
        );
        assert_eq!(host_port("https://:1"), None);
    }
}
