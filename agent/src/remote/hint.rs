//! What a failed connection to a remote cluster means, and what to do about
//! it: the cause is told from the types in the error's `source()` chain
//! (rustls, io, tonic, hyper, h2), not from message text.
use std::error::Error;

use crate::kvstore::KvError;

/// Why a connection failed, as far as its cause chain tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cause {
    /// The endpoint does not speak TLS (a plaintext server answered the ClientHello).
    NotTls,
    /// The connection ended in the middle of the TLS handshake.
    HandshakeEof,
    /// The server's certificate is not signed by a trusted CA.
    ServerCertUntrusted,
    /// The server's certificate does not name the endpoint.
    ServerNameMismatch,
    /// The server's certificate expired, or is not valid yet.
    ServerCertExpired,
    /// The server refused this client's certificate (a TLS alert).
    ClientCertRefused,
    /// Another TLS failure.
    Tls,
    /// The server refused the request's authentication or permission.
    Auth,
    /// Nothing answered at the address (refused, unreachable).
    Unreachable,
    /// No answer in time.
    TimedOut,
    /// An established connection broke (reset, broken pipe, closed, GOAWAY).
    ConnectionLost,
}

/// The error `e` wraps, where its `source()` does not say: an `io::Error`
/// wrapping another error (its `source()` skips that error), and the etcd
/// client's error (whose `source()` is always `None`).
fn inner<'a>(e: &'a (dyn Error + 'static)) -> Option<&'a (dyn Error + 'static)> {
    if let Some(io) = e.downcast_ref::<std::io::Error>() {
        return io.get_ref().map(|i| i as &(dyn Error + 'static));
    }
    match e.downcast_ref::<etcd_client::Error>()? {
        etcd_client::Error::GRpcStatus(s) => Some(s),
        etcd_client::Error::TransportError(t) => Some(t),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    }
}

/// `e` and its sources, outermost first (see [`inner`]).
fn chain<'a>(e: &'a (dyn Error + 'static)) -> Vec<&'a (dyn Error + 'static)> {
    let mut out = Vec::new();
    let mut next = Some(e);
    while let Some(e) = next {
        out.push(e);
        next = inner(e).or_else(|| e.source());
    }
    out
}

fn of_rustls(e: &rustls::Error) -> Cause {
    use rustls::{AlertDescription as A, CertificateError as C, Error as R};
    match e {
        R::InvalidCertificate(c) => match c {
            C::UnknownIssuer | C::BadSignature | C::UnhandledCriticalExtension => {
                Cause::ServerCertUntrusted
            }
            C::NotValidForName | C::NotValidForNameContext { .. } => Cause::ServerNameMismatch,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Cause::ServerCertExpired,
            _ => Cause::Tls,
        },
        R::AlertReceived(
            A::BadCertificate
            | A::UnknownCA
            | A::CertificateRequired
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::CertificateRevoked
            | A::UnsupportedCertificate
            | A::AccessDenied,
        ) => Cause::ClientCertRefused,
        R::InvalidMessage(_)
        | R::InappropriateMessage { .. }
        | R::InappropriateHandshakeMessage { .. } => Cause::NotTls,
        _ => Cause::Tls,
    }
}

/// The alerts of a server that refuses the client's certificate, as rustls
/// names them (`AlertDescription`'s Debug).
const CLIENT_CERT_ALERTS: [&str; 8] = [
    "BadCertificate",
    "UnknownCA",
    "CertificateRequired",
    "CertificateExpired",
    "CertificateUnknown",
    "CertificateRevoked",
    "UnsupportedCertificate",
    "AccessDenied",
];

fn of_io(e: &std::io::Error) -> Option<Cause> {
    use std::io::ErrorKind as K;
    Some(match e.kind() {
        K::ConnectionRefused
        | K::HostUnreachable
        | K::NetworkUnreachable
        | K::AddrNotAvailable
        | K::NotFound => Cause::Unreachable,
        K::TimedOut => Cause::TimedOut,
        K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe | K::NotConnected => {
            Cause::ConnectionLost
        }
        K::UnexpectedEof => Cause::HandshakeEof,
        _ => return None,
    })
}

/// The cause of `e`, from the first error in its chain whose type says it:
/// a TLS error wins over the transport errors around it.
pub fn classify(e: &(dyn Error + 'static)) -> Option<Cause> {
    let chain = chain(e);
    if let Some(r) = chain.iter().find_map(|e| e.downcast_ref::<rustls::Error>()) {
        return Some(of_rustls(r));
    }
    for e in &chain {
        if let Some(s) = e.downcast_ref::<tonic::Status>()
            && matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            )
        {
            return Some(Cause::Auth);
        }
    }
    // A TLS alert that arrives after the handshake (TLS 1.3 refuses a client
    // certificate at the first read) can reach here re-wrapped by the
    // transport as io::Error(InvalidData) around the alert's text, its type
    // lost: the text is all there is then.
    for e in &chain {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::InvalidData
            && let Some(text) = io.get_ref().map(|i| i.to_string())
            && let Some(alert) = text.strip_prefix("received fatal alert: ")
            && CLIENT_CERT_ALERTS.contains(&alert)
        {
            return Some(Cause::ClientCertRefused);
        }
    }
    // The innermost transport error is the most precise.
    for e in chain.iter().rev() {
        if let Some(c) = e.downcast_ref::<std::io::Error>().and_then(of_io) {
            return Some(c);
        }
        if let Some(h) = e.downcast_ref::<hyper::Error>() {
            if h.is_timeout() {
                return Some(Cause::TimedOut);
            }
            if h.is_closed() || h.is_incomplete_message() || h.is_canceled() {
                return Some(Cause::ConnectionLost);
            }
        }
        if let Some(h) = e.downcast_ref::<h2::Error>()
            && (h.is_go_away() || h.is_reset() || h.is_io() || h.is_remote())
        {
            return Some(Cause::ConnectionLost);
        }
    }
    None
}

/// What [`classify`] finds in a store error (`None` for the store's own
/// conditions: compaction, a watch the server ended, configuration).
pub fn cause(e: &KvError) -> Option<Cause> {
    match e {
        KvError::Unavailable { source, .. } => classify(source.as_ref()),
        _ => None,
    }
}

/// The endpoint does not speak TLS.
pub const NOT_TLS: &str = "the endpoint closed the TLS handshake: it does not speak TLS (a plaintext etcd or another service): point the https:// endpoint at the remote's TLS etcd proxy, or use http:// without TLS files for a plaintext etcd";

/// The remote refused the client certificate.
pub const CLIENT_CERT_REFUSED: &str = "the remote refused this agent's client certificate (under TLS 1.3 it closes the connection right after the handshake): cert-file must be signed by the CA the remote trusts for clients, and be valid now (renew it in the clustermesh Secret; picked up without a restart)";

/// An established watch broke.
pub const WATCH_BROKE: &str = "the connection broke during the watch: the remote's etcd proxy restarted or stopped answering HTTP/2 keepalives, or the network between the clusters dropped; routes of this cluster stay as last known; reconnecting with backoff";

/// The server certificate is not trusted.
pub const SERVER_UNTRUSTED: &str = "the remote's server certificate is not trusted: trusted-ca-file must be the CA that signed the remote etcd proxy's certificate, and the endpoint's name must be in that certificate";

/// The server certificate expired.
pub const SERVER_EXPIRED: &str = "the remote's server certificate expired (or is not valid yet): the remote etcd proxy must serve a renewed certificate; check the clocks of both clusters";

/// Nothing answers at the endpoint.
pub const UNREACHABLE: &str =
    "check that the remote cluster's etcd proxy is up and reachable at the configured endpoints";

/// The hint for `e`: what the operator can do about it.
pub fn hint(e: &KvError) -> &'static str {
    let (op, https) = match e {
        KvError::Unavailable { op, endpoints, .. } => (*op, endpoints.contains("https://")),
        KvError::Config(_) => return "fix this cluster's entry in the clustermesh Secret",
        KvError::WatchClosed { .. } => {
            return "the remote's etcd proxy ended the watch (it is restarting or shutting down): routes of this cluster stay as last known; reconnecting";
        }
        KvError::Compacted { .. } => return "routes of this cluster stay as last known; retrying",
    };
    // On the first request of a new connection a broken connection is, over
    // TLS 1.3, how a refused client certificate reaches the client (the
    // server checks it after the client finished its handshake); during a
    // watch (the list on this connection succeeded, so the certificates were
    // accepted) it is an outage.
    let watch = op == "watch";
    match cause(e) {
        Some(Cause::NotTls | Cause::HandshakeEof) => NOT_TLS,
        Some(Cause::ServerCertUntrusted | Cause::ServerNameMismatch) => SERVER_UNTRUSTED,
        Some(Cause::ServerCertExpired) => SERVER_EXPIRED,
        Some(Cause::ClientCertRefused) => CLIENT_CERT_REFUSED,
        Some(Cause::ConnectionLost | Cause::TimedOut) if watch => WATCH_BROKE,
        Some(Cause::ConnectionLost) if https => CLIENT_CERT_REFUSED,
        Some(Cause::Tls) => {
            "check trusted-ca-file, cert-file and key-file of this cluster's entry in the clustermesh Secret (CA, expiry, client certificate)"
        }
        Some(Cause::Auth) => {
            "the remote refused this agent's credentials (authentication or permission): the client certificate's name must be allowed to read the podmesh/v1/ prefix on the remote's etcd proxy"
        }
        Some(Cause::Unreachable | Cause::TimedOut) => UNREACHABLE,
        Some(Cause::ConnectionLost) | None => {
            // Causes no type in the chain tells (a DNS failure, a connect
            // timeout of the gRPC channel): the message says them.
            let t = e.to_string().to_ascii_lowercase();
            if [
                "timed out",
                "dns",
                "lookup address",
                "unreachable",
                "connection refused",
            ]
            .iter()
            .any(|w| t.contains(w))
            {
                UNREACHABLE
            } else {
                "routes of this cluster stay as last known; retrying"
            }
        }
    }
}

#[cfg(test)]
mod tests;
