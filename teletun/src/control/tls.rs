//! TLS 1.3 configurations for the control channel: both sides present a
//! throw-away self-signed certificate and accept only the pinned peer key.

use std::sync::Arc;

use anyhow::{Context, Result};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, SignatureScheme};

use crate::keys::{Identity, PinnedKey};
use crate::tunnel::ChannelBinding;

/// The server name the client asks for. Nothing checks it: the pin is the identity.
pub const SERVER_NAME: &str = "teletun";

/// The exporter label of the data plane's channel binding.
const BINDING_LABEL: &[u8] = b"EXPORTER-teletun-data-plane-binding";

/// The channel binding of an established control connection: keying
/// material exported from its TLS session (RFC 8446 §7.5), the same on both
/// ends and known to nobody else.
pub fn channel_binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<ChannelBinding> {
    let secret = conn
        .export_keying_material([0u8; 32], BINDING_LABEL, None)
        .context("cannot export keying material from the control connection")?;
    Ok(ChannelBinding(secret))
}

#[derive(Debug)]
struct Pinned {
    pin: PinnedKey,
    algorithms: WebPkiSupportedAlgorithms,
}

impl Pinned {
    fn new(pin: PinnedKey) -> Self {
        Pinned {
            pin,
            algorithms: ring::default_provider().signature_verification_algorithms,
        }
    }

    fn check(&self, end_entity: &CertificateDer<'_>) -> Result<(), Error> {
        if self.pin.matches_cert_der(end_entity) {
            Ok(())
        } else {
            // Sent to the peer as an access_denied alert; see `explain`.
            Err(Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        self.check(end_entity).map(|_| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.check(end_entity).map(|_| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

fn cert_and_key(identity: &Identity) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let cert = CertificateDer::from(identity.cert.to_der()?);
    let key = PrivatePkcs8KeyDer::from(identity.key.private_key_to_pkcs8()?);
    Ok((vec![cert], key.into()))
}

/// The client's configuration: present `identity`, accept only `server_key`.
pub fn client_config(identity: &Identity, server_key: PinnedKey) -> Result<Arc<rustls::ClientConfig>> {
    let (certs, key) = cert_and_key(identity)?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned::new(server_key)))
        .with_client_auth_cert(certs, key)
        .context("cannot use the client key for TLS")?;
    Ok(Arc::new(config))
}

/// The server's configuration: present `identity`, require exactly `client_key`.
pub fn server_config(identity: &Identity, client_key: PinnedKey) -> Result<Arc<rustls::ServerConfig>> {
    let (certs, key) = cert_and_key(identity)?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(Pinned::new(client_key)))
        .with_single_cert(certs, key)
        .context("cannot use the server key for TLS")?;
    Ok(Arc::new(config))
}

/// Which side's key a failed handshake points at, if it was a pinning failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyMismatch {
    /// We checked the peer's certificate and it is not the pinned key.
    PeerKeyNotPinned,
    /// The peer refused our key (we received an access_denied alert).
    OurKeyRefused,
}

/// Classifies an I/O error from a TLS stream.
pub fn key_mismatch(err: &std::io::Error) -> Option<KeyMismatch> {
    match err.get_ref()?.downcast_ref::<Error>()? {
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure) => {
            Some(KeyMismatch::PeerKeyNotPinned)
        }
        Error::AlertReceived(rustls::AlertDescription::AccessDenied) => Some(KeyMismatch::OurKeyRefused),
        _ => None,
    }
}
