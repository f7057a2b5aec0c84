//! Client certificates must be made for TLS client authentication: extendedKeyUsage clientAuth, and a keyUsage (when present) that allows signing.
//!
//! webpki checks the chain, the validity period and, when the certificate
//! names its purposes, that clientAuth is among them. A certificate that
//! names none is accepted by it for any purpose (RFC 5280 4.2.1.12), and a
//! keyUsage of keyCertSign alone (a CA's) is not looked at. The proxy is the
//! door to a cluster's mesh state: it takes only certificates issued for
//! this use, and says what is missing.
use std::sync::Arc;

use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};

/// Why a client certificate is not for client authentication.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Purpose {
    #[error(
        "the client certificate has no extendedKeyUsage; issue it with extendedKeyUsage=clientAuth"
    )]
    NoExtendedKeyUsage,
    #[error(
        "the client certificate's extendedKeyUsage does not include clientAuth; issue it with extendedKeyUsage=clientAuth"
    )]
    NotClientAuth,
    #[error(
        "the client certificate's keyUsage does not include digitalSignature (a CA's keyCertSign alone does not sign handshakes)"
    )]
    NoDigitalSignature,
    #[error("the client certificate cannot be parsed: {0}")]
    Unparsable(String),
}

/// Checks the purposes of a client's end-entity certificate.
pub fn check(der: &[u8]) -> Result<(), Purpose> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| Purpose::Unparsable(e.to_string()))?;
    match cert
        .extended_key_usage()
        .map_err(|e| Purpose::Unparsable(e.to_string()))?
    {
        None => return Err(Purpose::NoExtendedKeyUsage),
        Some(eku) if !eku.value.client_auth && !eku.value.any => {
            return Err(Purpose::NotClientAuth);
        }
        Some(_) => {}
    }
    if let Some(ku) = cert
        .key_usage()
        .map_err(|e| Purpose::Unparsable(e.to_string()))?
        && !ku.value.digital_signature()
    {
        return Err(Purpose::NoDigitalSignature);
    }
    Ok(())
}

/// A client verifier that adds [`check`] to another's.
#[derive(Debug)]
pub struct ClientAuthOnly(pub Arc<dyn ClientCertVerifier>);

impl ClientCertVerifier for ClientAuthOnly {
    fn offer_client_auth(&self) -> bool {
        self.0.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.0.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.0.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self.0.verify_client_cert(end_entity, intermediates, now)?;
        check(end_entity).map_err(|p| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(p))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose as E, KeyPair, KeyUsagePurpose as K};

    fn cert(eku: &[E], ku: &[K]) -> Vec<u8> {
        let mut p = CertificateParams::new(vec!["agent".to_string()]).unwrap();
        p.extended_key_usages = eku.to_vec();
        p.key_usages = ku.to_vec();
        p.self_signed(&KeyPair::generate().unwrap())
            .unwrap()
            .der()
            .to_vec()
    }

    #[test]
    fn only_client_auth_certificates_pass() {
        assert_eq!(check(&cert(&[E::ClientAuth], &[])), Ok(()));
        assert_eq!(
            check(&cert(
                &[E::ClientAuth],
                &[K::DigitalSignature, K::KeyEncipherment]
            )),
            Ok(())
        );
        assert_eq!(
            check(&cert(
                &[E::ServerAuth, E::ClientAuth],
                &[K::DigitalSignature]
            )),
            Ok(())
        );
        assert_eq!(check(&cert(&[], &[])), Err(Purpose::NoExtendedKeyUsage));
        assert_eq!(
            check(&cert(&[E::ServerAuth], &[])),
            Err(Purpose::NotClientAuth)
        );
        assert_eq!(
            check(&cert(&[E::ClientAuth], &[K::KeyCertSign])),
            Err(Purpose::NoDigitalSignature)
        );
        assert!(matches!(check(b"junk"), Err(Purpose::Unparsable(_))));
    }
}
