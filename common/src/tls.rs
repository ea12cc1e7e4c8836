//! rustls configurations that authenticate QUIC peers by their ed25519 keys.
//!
//! Each side presents a self-signed certificate made from its identity key. The
//! node pins the broker's key (given with the broker's address); the broker accepts
//! any node key and learns it from the handshake. No certificate authority, name or
//! validity period is involved: the key is the identity. TLS 1.3 only (QUIC).

use std::sync::Arc;

use ed25519_dalek::SigningKey;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::identity::PeerId;

/// DER prefix of an ed25519 SubjectPublicKeyInfo; the 32 key bytes follow it.
const ED25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// DER prefix of an ed25519 PKCS#8 v1 private key; the 32 seed bytes follow it.
const ED25519_PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// Building a TLS configuration failed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("certificate generation: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = cipher_suites(aes_in_hardware()).to_vec();
    Arc::new(provider)
}

/// QUIC's packet protection, in the order the node asks for it (the broker
/// takes the node's first choice it supports). With AES instructions,
/// AES-128-GCM: four fewer rounds per block than rustls's default first
/// choice, AES-256-GCM, on every byte a relay forwards, and smaller keys per
/// connection. Without them ChaCha20-Poly1305 is the faster one.
fn cipher_suites(aes: bool) -> [rustls::SupportedCipherSuite; 3] {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256 as AES_128, TLS13_AES_256_GCM_SHA384 as AES_256,
        TLS13_CHACHA20_POLY1305_SHA256 as CHACHA,
    };
    if aes {
        [AES_128, AES_256, CHACHA]
    } else {
        [CHACHA, AES_128, AES_256]
    }
}

/// Whether this CPU runs AES-GCM in hardware: AES rounds and carry-less
/// multiplication (GHASH).
pub fn aes_in_hardware() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("aes")
            && std::arch::is_x86_feature_detected!("pclmulqdq")
    }
    #[cfg(target_arch = "aarch64")]
    {
        std::arch::is_aarch64_feature_detected!("aes")
            && std::arch::is_aarch64_feature_detected!("pmull")
    }
    #[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
    {
        false
    }
}

/// The self-signed certificate and key that present `key` in a handshake.
fn certificate(
    key: &SigningKey,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let mut pkcs8 = ED25519_PKCS8_PREFIX.to_vec();
    pkcs8.extend_from_slice(&key.to_bytes());
    let der = PrivatePkcs8KeyDer::from(pkcs8);
    let pair = rcgen::KeyPair::try_from(&der)?;
    let cert = rcgen::CertificateParams::new(vec!["jusy".to_owned()])?.self_signed(&pair)?;
    Ok((vec![cert.der().clone()], PrivateKeyDer::Pkcs8(der)))
}

/// The ed25519 key a certificate carries, if it carries one.
pub fn peer_id_of(cert: &CertificateDer<'_>) -> Option<PeerId> {
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    let spki = parsed.subject_public_key_info();
    let key = spki.as_ref().strip_prefix(&ED25519_SPKI_PREFIX[..])?;
    Some(PeerId(key.try_into().ok()?))
}

/// Client (node) side: presents the node key, accepts only the pinned broker key.
pub fn client_config(
    key: &SigningKey,
    broker: PeerId,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, TlsError> {
    let (chain, private) = certificate(key)?;
    let verifier = Arc::new(PinnedServer {
        expected: broker,
        algs: provider().signature_verification_algorithms,
    });
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, private)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Server (broker) side: presents the broker key, requires an ed25519 client key.
pub fn server_config(key: &SigningKey, alpn: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    let (chain, private) = certificate(key)?;
    let verifier = Arc::new(AnyEd25519Client {
        algs: provider().signature_verification_algorithms,
    });
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, private)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

fn not_ed25519() -> rustls::Error {
    rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding)
}

fn tls13_only() -> Result<HandshakeSignatureValid, rustls::Error> {
    Err(rustls::Error::PeerIncompatible(
        rustls::PeerIncompatible::Tls12NotOffered,
    ))
}

#[derive(Debug)]
struct PinnedServer {
    expected: PeerId,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match peer_id_of(end_entity) {
            Some(id) if id == self.expected => Ok(ServerCertVerified::assertion()),
            Some(_) => Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            )),
            None => Err(not_ed25519()),
        }
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_only()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[derive(Debug)]
struct AnyEd25519Client {
    algs: WebPkiSupportedAlgorithms,
}

impl ClientCertVerifier for AnyEd25519Client {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        peer_id_of(end_entity)
            .map(|_| ClientCertVerified::assertion())
            .ok_or_else(not_ed25519)
    }

    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &CertificateDer<'_>,
        _: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        tls13_only()
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        vec![SignatureScheme::ED25519]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certificate_carries_the_identity_key() {
        let key = SigningKey::from_bytes(&[3u8; 32]);
        let (chain, _) = certificate(&key).expect("cert");
        let first = chain.first().expect("one cert");
        assert_eq!(peer_id_of(first), Some(PeerId::from_signing_key(&key)));
    }

    /// Runs a whole handshake in memory; returns the node identity the
    /// broker learnt and the suite both sides agreed, or the first error.
    fn handshake(
        client: rustls::ClientConfig,
        server: rustls::ServerConfig,
    ) -> Result<(Option<PeerId>, rustls::SupportedCipherSuite), rustls::Error> {
        let name = ServerName::try_from("jusy").expect("name");
        let mut c = rustls::ClientConnection::new(Arc::new(client), name)?;
        let mut s = rustls::ServerConnection::new(Arc::new(server))?;
        /// Moves what `from` has to send into `to`.
        fn pass(
            from: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
            to: &mut impl std::ops::DerefMut<Target = rustls::ConnectionCommon<impl Sized>>,
        ) -> Result<(), rustls::Error> {
            let mut buf = Vec::new();
            while from.wants_write() {
                from.write_tls(&mut buf).expect("write to memory");
            }
            let mut rd = &buf[..];
            while !rd.is_empty() {
                to.read_tls(&mut rd).expect("read from memory");
                to.process_new_packets()?;
            }
            Ok(())
        }
        while c.is_handshaking() || s.is_handshaking() {
            pass(&mut c, &mut s)?;
            pass(&mut s, &mut c)?;
        }
        let node = s
            .peer_certificates()
            .and_then(|certs| peer_id_of(certs.first()?));
        let suite = c
            .negotiated_cipher_suite()
            .expect("suite after the handshake");
        assert_eq!(Some(suite), s.negotiated_cipher_suite());
        Ok((node, suite))
    }

    #[test]
    fn a_handshake_authenticates_the_node_and_picks_the_fast_cipher() {
        let node = SigningKey::from_bytes(&[6u8; 32]);
        let broker = SigningKey::from_bytes(&[7u8; 32]);
        let broker_id = PeerId::from_signing_key(&broker);
        let client = client_config(&node, broker_id, b"x").expect("client config");
        let server = server_config(&broker, b"x").expect("server config");
        let (seen, suite) = handshake(client, server).expect("handshake");
        assert_eq!(seen, Some(PeerId::from_signing_key(&node)));
        let expected = if aes_in_hardware() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
        } else {
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        };
        assert_eq!(suite.suite(), expected);
    }

    #[test]
    fn the_suite_order_follows_the_hardware() {
        let first = |aes| cipher_suites(aes)[0].suite();
        assert_eq!(first(true), rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
        assert_eq!(
            first(false),
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256
        );
        for aes in [true, false] {
            let mut all: Vec<_> = cipher_suites(aes).iter().map(|s| s.suite()).collect();
            all.sort_by_key(|s| u16::from(*s));
            let mut default: Vec<_> = rustls::crypto::ring::DEFAULT_CIPHER_SUITES
                .iter()
                .map(|s| s.suite())
                .collect();
            default.sort_by_key(|s| u16::from(*s));
            assert_eq!(all, default, "every suite rustls accepts stays accepted");
        }
    }

    #[test]
    fn a_node_pinned_to_another_broker_fails_the_handshake() {
        let node = SigningKey::from_bytes(&[6u8; 32]);
        let broker = SigningKey::from_bytes(&[7u8; 32]);
        let other = PeerId::from_signing_key(&SigningKey::from_bytes(&[8u8; 32]));
        let client = client_config(&node, other, b"x").expect("client config");
        let server = server_config(&broker, b"x").expect("server config");
        let err = handshake(client, server).expect_err("a wrong broker key ends the handshake");
        assert!(
            matches!(err, rustls::Error::InvalidCertificate(_)),
            "unexpected error: {err}"
        );
    }

    #[test]
    fn configs_build() {
        let key = SigningKey::from_bytes(&[4u8; 32]);
        let other = PeerId::from_signing_key(&SigningKey::from_bytes(&[5u8; 32]));
        assert!(client_config(&key, other, b"x").is_ok());
        assert!(server_config(&key, b"x").is_ok());
    }
}
