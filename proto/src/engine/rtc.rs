//! The rtc-dtls engine: the only file that names rtc_dtls types.
//!
//! rtc-dtls's `Endpoint` already multiplexes associations by address and is sans-I/O. What this
//! wrapper adds is policy it lacks: the declared policy of [`crate::policy`] (two AES-128-GCM
//! suites, two NIST groups, four SHA-256/384 signature schemes, the extended master secret
//! required, peer keys and chains checked), our own signing keys (ring: ECDSA P-256 and P-384,
//! RSA, each with SHA-256 and SHA-384, which rtc-crypto's keys cannot all do), failures
//! classified into [`Failure`] and the failed association removed (rtc-dtls leaves it in its
//! table, stuck), and an established association kept alive through unauthenticated garbage.

use std::collections::VecDeque;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::BytesMut;

use rtc_dtls::cipher_suite::CipherSuiteId;
use rtc_dtls::config::{
    ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig,
    VerifyPeerCertificateFn,
};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::{
    ActiveKeyExchange, AeadAlgorithm, AeadCipher, BlockCipherAlgorithm, CbcAlgorithm, CbcCipher,
    CryptoAlgorithm, CryptoError, HashAlgorithm, HmacAlgorithm, KeyExchangeAlgorithm, Mac,
    PublicKey, RTCCrypto, RTCCryptoProvider, RTCRandom, SignatureScheme as KeyScheme, SigningKey,
    StreamCipher, StreamCipherAlgorithm,
};
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_dtls::signature_hash_algorithm::SignatureScheme;
use rtc_shared::TransportProtocol;
use rtc_shared::error::Error as RtcError;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::hash::{AddrKey, KeyedMap, KeyedState, keyed_map};
use crate::identity::KeyKind;
use crate::verify::{PeerRole, PeerVerifier, Refusal, Verification};
use crate::{policy, record};

use super::{
    ClientSettings, DtlsEngine, Event, Failure, Identity, PeerIdentity, SendError, ServerSettings,
    SettingsError, Transmit,
};

/// An rtc-dtls endpoint in one role, with our security policy.
pub struct RtcEngine {
    /// Two endpoints, so that a peer can handshake anew while its established association goes
    /// on serving: rtc-dtls keys associations by address alone, and takes a ClientHello from an
    /// address it knows for a retransmission. A replacement handshake runs in the other slot and
    /// takes over only when it completes, so a spoofed ClientHello never ends a live association.
    slots: [Endpoint<KeyedState>; 2],
    peers: KeyedMap<AddrKey, Peer>,
    /// Present in the client role: the config each `connect` uses.
    client_config: Option<Arc<HandshakeConfig>>,
    /// Drained from the endpoints after every call, so that the close_notify rtc-dtls queues
    /// when we drop a failed association can be told apart and discarded.
    transmits: VecDeque<Transmit>,
    /// In the server role, the suite our key signs (the only one the server can choose).
    server_suite: &'static str,
    /// The last chain our policy hook refused, taken when rtc-dtls reports the failure (the
    /// hook can only hand rtc-dtls a string).
    refusal: RefusalSlot,
    /// The reference identifier (client role), for name-mismatch audit lines.
    server_name: Option<String>,
    /// rtc-dtls's events of one datagram, kept so that no datagram allocates a vector for them.
    slot_events: Vec<EndpointEvent>,
    /// Buffers of datagrams sent, for received data to be decrypted into (rtc-dtls patch p14):
    /// a request's buffer becomes its reply's datagram (p12), and once that is sent, the next
    /// request's data. At most [`MAX_SPARES`].
    spares: Vec<BytesMut>,
}

/// Spare buffers kept: a receive batch's worth.
const MAX_SPARES: usize = 32;

type RefusalSlot = Arc<Mutex<Option<Refusal>>>;

/// rtc-dtls's verify-peer-certificate hook, run after its own rustls verification succeeded:
/// our policy and revocation checks ([`crate::verify`]) on the presented chain.
fn policy_hook(
    role: PeerRole,
    roots: &[CertificateDer<'static>],
    verification: &Verification,
    slot: RefusalSlot,
) -> Result<VerifyPeerCertificateFn, SettingsError> {
    let verifier = PeerVerifier::new(role, roots, verification).map_err(SettingsError::Roots)?;
    Ok(Arc::new(move |presented: &[Vec<u8>], _| {
        // The declared key policy first (as the default hook in `policy` does), then ours.
        policy::check_chain(presented).map_err(policy_refusal)?;
        verifier.verify(presented).map_err(|refusal| {
            let message = format!("ntp-dtls certificate policy: {refusal}");
            *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(*refusal);
            RtcError::Other(message)
        })
    }))
}

/// Where a peer's associations live.
#[derive(Debug, Clone, Copy)]
struct Peer {
    /// The slot of its association (established, or its first handshake).
    slot: usize,
    established: bool,
    /// The slot of a replacement handshake in progress, always the other one.
    replacement: Option<usize>,
}

fn provider() -> Result<Arc<dyn RTCCryptoProvider>, SettingsError> {
    let inner = rtc_dtls::crypto_provider::default_provider()
        .map_err(|e| SettingsError::Config(e.to_string()))?;
    Ok(Arc::new(NistCurvesOnly { inner }))
}

/// The default provider with X25519 hidden. rtc-dtls offers every curve its provider supports
/// (P-256, X25519, P-384) and has no setting for it; NDcPP's DTLS elements allow the NIST
/// curves only, so the provider simply stops claiming X25519.
struct NistCurvesOnly {
    inner: Arc<dyn RTCCryptoProvider>,
}

impl RTCCryptoProvider for NistCurvesOnly {
    fn name(&self) -> &'static str {
        "ring, NIST curves only"
    }
    fn crypto(&self) -> &dyn RTCCrypto {
        self
    }
    fn random(&self) -> &dyn RTCRandom {
        self.inner.random()
    }
}

impl RTCCrypto for NistCurvesOnly {
    fn supports(&self, algorithm: CryptoAlgorithm) -> bool {
        !matches!(
            algorithm,
            CryptoAlgorithm::KeyExchange(KeyExchangeAlgorithm::X25519)
        ) && self.inner.crypto().supports(algorithm)
    }
    fn hash(&self, algorithm: HashAlgorithm, data: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.inner.crypto().hash(algorithm, data)
    }
    fn block_encrypt(
        &self,
        algorithm: BlockCipherAlgorithm,
        key: &[u8],
        block: &mut [u8],
    ) -> Result<(), CryptoError> {
        self.inner.crypto().block_encrypt(algorithm, key, block)
    }
    fn new_hmac(&self, algorithm: HmacAlgorithm, key: &[u8]) -> Result<Box<dyn Mac>, CryptoError> {
        self.inner.crypto().new_hmac(algorithm, key)
    }
    fn new_stream_cipher(
        &self,
        algorithm: StreamCipherAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn StreamCipher>, CryptoError> {
        self.inner.crypto().new_stream_cipher(algorithm, key)
    }
    fn new_aead(
        &self,
        algorithm: AeadAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn AeadCipher>, CryptoError> {
        self.inner.crypto().new_aead(algorithm, key)
    }
    fn new_cbc(
        &self,
        algorithm: CbcAlgorithm,
        key: &[u8],
    ) -> Result<Box<dyn CbcCipher>, CryptoError> {
        self.inner.crypto().new_cbc(algorithm, key)
    }
    fn start_key_exchange(
        &self,
        algorithm: KeyExchangeAlgorithm,
    ) -> Result<Box<dyn ActiveKeyExchange>, CryptoError> {
        if algorithm == KeyExchangeAlgorithm::X25519 {
            return Err(CryptoError::UnsupportedAlgorithm(
                CryptoAlgorithm::KeyExchange(algorithm),
            ));
        }
        self.inner.crypto().start_key_exchange(algorithm)
    }
    fn generate_signing_key(&self, scheme: KeyScheme) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().generate_signing_key(scheme)
    }
    fn import_signing_key(
        &self,
        scheme: KeyScheme,
        pkcs8_der: &[u8],
    ) -> Result<Arc<dyn SigningKey>, CryptoError> {
        self.inner.crypto().import_signing_key(scheme, pkcs8_der)
    }
    fn verify_signature(
        &self,
        scheme: KeyScheme,
        public_key: PublicKey<'_>,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), CryptoError> {
        verify_in_policy(scheme, public_key, message, signature)
    }
}

/// Verifies a handshake signature (ServerKeyExchange, CertificateVerify) by the peer's leaf key,
/// within the policy: ECDSA P-256 or P-384 keys with SHA-256 or SHA-384, RSA keys of 2048-4096
/// bits with PKCS#1 v1.5 and SHA-256 or SHA-384; anything else is refused with the reason.
///
/// rtc-dtls names a TLS 1.2 (ecdsa, sha384) pair `EcdsaP384Sha384` whatever the curve, and
/// rtc-crypto then verifies with P-384: a P-256 key signing with SHA-384 (which TLS 1.2
/// allows, and OpenSSL does when the client lists only ecdsa_secp384r1_sha384) would fail.
/// Here the curve comes from the key, the hash from the scheme.
fn verify_in_policy(
    scheme: KeyScheme,
    public_key: PublicKey<'_>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), CryptoError> {
    use ring::signature as sig;
    use rtc_dtls::crypto_provider::PublicKeyEncoding;
    let refuse = |reason: String| {
        Err(CryptoError::Provider(format!(
            "{}the peer's leaf has {reason}",
            policy::VIOLATION_MARKER
        )))
    };
    let algorithm: &dyn sig::VerificationAlgorithm = match public_key.encoding {
        PublicKeyEncoding::EcUncompressedPoint => {
            let p384 = match public_key.bytes.len() {
                65 => false,
                97 => true,
                n => {
                    return refuse(format!("an ECDSA key of {n} bytes (P-256 or P-384 only)"));
                }
            };
            match (scheme, p384) {
                (KeyScheme::EcdsaP256Sha256 | KeyScheme::EcdsaP384Sha256, false) => {
                    &sig::ECDSA_P256_SHA256_ASN1
                }
                (KeyScheme::EcdsaP384Sha384, false) => &sig::ECDSA_P256_SHA384_ASN1,
                (KeyScheme::EcdsaP256Sha256 | KeyScheme::EcdsaP384Sha256, true) => {
                    &sig::ECDSA_P384_SHA256_ASN1
                }
                (KeyScheme::EcdsaP384Sha384, true) => &sig::ECDSA_P384_SHA384_ASN1,
                (other, _) => return refuse(format!("signed with {other:?}")),
            }
        }
        PublicKeyEncoding::RsaPkcs1Der => {
            let bits = policy::rsa_public_key_bits(public_key.bytes).unwrap_or(0);
            if let Err(reason) = policy::rsa_kind(bits) {
                return refuse(reason);
            }
            match scheme {
                KeyScheme::RsaPkcs1Sha256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                KeyScheme::RsaPkcs1Sha384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                other => return refuse(format!("signed with {other:?}")),
            }
        }
        other => return refuse(format!("a key of type {other:?}")),
    };
    sig::UnparsedPublicKey::new(algorithm, public_key.bytes)
        .verify(message, signature)
        .map_err(|_| CryptoError::InvalidSignature)
}

/// Our private key as rtc-dtls signs with it, through ring. rtc-crypto's own keys sign RSA with
/// SHA-256 only and cannot import P-384. ring signs with ECDSA P-256 over SHA-256 and P-384 over
/// SHA-384 only (its key pairs are tied to one curve-hash pair), so a P-256 key cannot answer a
/// peer that accepts only ecdsa_secp384r1_sha384, and the reverse: the handshake then fails
/// with handshake_failure (patch h), which is TLS 1.3's curve-bound reading of these names.
struct PolicySigningKey {
    signer: Signer,
    public_key: Vec<u8>,
    encoding: rtc_dtls::crypto_provider::PublicKeyEncoding,
}

enum Signer {
    /// The scheme (in rtc-crypto's naming: the hash) the key pair signs with.
    Ecdsa(ring::signature::EcdsaKeyPair, KeyScheme),
    Rsa(ring::signature::RsaKeyPair),
}

impl PolicySigningKey {
    fn new(kind: KeyKind, pkcs8: &[u8]) -> Result<Self, String> {
        use ring::signature::{self as sig, KeyPair};
        use rtc_dtls::crypto_provider::PublicKeyEncoding;
        let rng = ring::rand::SystemRandom::new();
        let ecdsa = |algorithm, scheme| -> Result<Self, String> {
            let key = sig::EcdsaKeyPair::from_pkcs8(algorithm, pkcs8, &rng)
                .map_err(|e| format!("not a usable {kind} key: {e}"))?;
            Ok(PolicySigningKey {
                public_key: key.public_key().as_ref().to_vec(),
                encoding: PublicKeyEncoding::EcUncompressedPoint,
                signer: Signer::Ecdsa(key, scheme),
            })
        };
        match kind {
            KeyKind::EcdsaP256 => ecdsa(
                &sig::ECDSA_P256_SHA256_ASN1_SIGNING,
                KeyScheme::EcdsaP256Sha256,
            ),
            KeyKind::EcdsaP384 => ecdsa(
                &sig::ECDSA_P384_SHA384_ASN1_SIGNING,
                KeyScheme::EcdsaP384Sha384,
            ),
            KeyKind::Rsa { .. } => {
                let key = sig::RsaKeyPair::from_pkcs8(pkcs8)
                    .map_err(|e| format!("not a usable RSA key: {e}"))?;
                let bits = key.public().modulus_len() * 8;
                policy::rsa_kind(bits).map_err(|reason| format!("the key is {reason}"))?;
                Ok(PolicySigningKey {
                    public_key: key.public().as_ref().to_vec(),
                    encoding: PublicKeyEncoding::RsaPkcs1Der,
                    signer: Signer::Rsa(key),
                })
            }
        }
    }
}

impl SigningKey for PolicySigningKey {
    fn supports(&self, scheme: KeyScheme) -> bool {
        // rtc-dtls maps (ecdsa, sha256) to EcdsaP256Sha256 and (ecdsa, sha384) to
        // EcdsaP384Sha384 whatever the curve of the key: the names mean the hash here.
        match self.signer {
            Signer::Ecdsa(_, own) => scheme == own,
            Signer::Rsa(_) => matches!(
                scheme,
                KeyScheme::RsaPkcs1Sha256 | KeyScheme::RsaPkcs1Sha384
            ),
        }
    }

    fn public_key(&self) -> PublicKey<'_> {
        PublicKey {
            encoding: self.encoding,
            bytes: &self.public_key,
        }
    }

    fn sign(&self, scheme: KeyScheme, message: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let rng = ring::rand::SystemRandom::new();
        let failed = |_| CryptoError::Provider("signature generation failed".into());
        match (&self.signer, scheme) {
            (Signer::Ecdsa(key, own), _) if scheme == *own => key
                .sign(&rng, message)
                .map(|s| s.as_ref().to_vec())
                .map_err(failed),
            (Signer::Rsa(key), KeyScheme::RsaPkcs1Sha256 | KeyScheme::RsaPkcs1Sha384) => {
                let padding = if scheme == KeyScheme::RsaPkcs1Sha256 {
                    &ring::signature::RSA_PKCS1_SHA256
                } else {
                    &ring::signature::RSA_PKCS1_SHA384
                };
                let mut signature = vec![0; key.public().modulus_len()];
                key.sign(padding, &rng, message, &mut signature)
                    .map_err(failed)?;
                Ok(signature)
            }
            _ => Err(CryptoError::UnsupportedAlgorithm(
                CryptoAlgorithm::Signature(scheme),
            )),
        }
    }
}

/// The policy both roles share ([`crate::policy`]). No switch weakens any of it.
///
/// The signature schemes are in the order the server prefers them for its key (patch h: the
/// server takes the first of its own schemes the client lists and its key can make); the
/// client sends them all. A P-384 key prefers SHA-384, every other key SHA-256.
fn policy(provider: Arc<dyn RTCCryptoProvider>, own_key: Option<KeyKind>) -> ConfigBuilder {
    let mut schemes = vec![
        SignatureScheme::EcdsaWithP256AndSha256,
        SignatureScheme::EcdsaWithP384AndSha384,
        SignatureScheme::Pkcs1WithSha256,
        SignatureScheme::Pkcs1WithSha384,
    ];
    if own_key == Some(KeyKind::EcdsaP384) {
        schemes.swap(0, 1);
    }
    ConfigBuilder::default()
        .with_crypto_provider(provider)
        .with_cipher_suites(vec![
            CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
            CipherSuiteId::Tls_Ecdhe_Rsa_With_Aes_128_Gcm_Sha256,
        ])
        .with_signature_schemes(schemes)
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
        .with_insecure_skip_verify(false)
        .with_insecure_hashes(false)
        .with_insecure_verification(false)
        .with_verify_peer_certificate(Some(Arc::new(
            |presented: &[Vec<u8>], _: &[CertificateDer<'static>]| {
                policy::check_chain(presented).map_err(policy_refusal)
            },
        )))
}

/// The error a policy refusal travels back through rtc-dtls as.
fn policy_refusal(reason: String) -> RtcError {
    RtcError::Other(format!(
        "peer certificate {}{reason}",
        policy::VIOLATION_MARKER
    ))
}

fn certificate(identity: &Identity) -> Result<Certificate, SettingsError> {
    let kind = identity.key.kind();
    let key = PolicySigningKey::new(kind, identity.key.pkcs8_der()).map_err(SettingsError::Key)?;
    // Our own leaf must be in the policy too, or every conforming peer would refuse it.
    if let Some(leaf) = identity.chain.first() {
        policy::check_chain(std::slice::from_ref(leaf)).map_err(|reason| {
            SettingsError::Key(format!(
                "our certificate is {}{reason}",
                policy::VIOLATION_MARKER
            ))
        })?;
    }
    Ok(Certificate::from_signing_key(
        identity.chain.clone(),
        Arc::new(key),
    ))
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<rustls::RootCertStore, SettingsError> {
    let mut store = rustls::RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        // A trust anchor's key signs what it issues: one outside the policy could only sign
        // certificates the policy refuses, so say so now rather than at every handshake.
        let (_, cert) = x509_parser::parse_x509_certificate(root)
            .map_err(|e| SettingsError::Roots(format!("CA certificate {}: {e}", i + 1)))?;
        policy::check_public_key(cert.public_key()).map_err(|reason| {
            SettingsError::Roots(format!(
                "CA certificate {} (\"{}\") is {}{reason}",
                i + 1,
                cert.subject(),
                policy::VIOLATION_MARKER
            ))
        })?;
        store
            .add(root.clone())
            .map_err(|e| SettingsError::Roots(e.to_string()))?;
    }
    if store.is_empty() {
        return Err(SettingsError::Roots(
            "the CA file holds no certificate".into(),
        ));
    }
    Ok(store)
}

fn client_config(
    settings: &ClientSettings,
    slot: RefusalSlot,
) -> Result<HandshakeConfig, SettingsError> {
    // rtc-dtls checks names through rustls; refuse a name it could never match now rather than
    // at every handshake.
    ServerName::try_from(settings.server_name.as_str()).map_err(|e| SettingsError::ServerName {
        name: settings.server_name.clone(),
        reason: e.to_string(),
    })?;
    let provider = provider()?;
    let own_key = settings.identity.as_ref().map(|i| i.key.kind());
    let mut builder = policy(provider, own_key)
        .with_roots_cas(root_store(&settings.roots)?)
        .with_server_name(settings.server_name.clone())
        .with_verify_peer_certificate(Some(policy_hook(
            PeerRole::Server,
            &settings.roots,
            &settings.verification,
            slot,
        )?));
    if let Some(identity) = &settings.identity {
        builder = builder.with_certificates(vec![certificate(identity)?]);
    }
    builder
        .build(true, None)
        .map_err(|e| SettingsError::Config(e.to_string()))
}

fn server_config(
    settings: &ServerSettings,
    slot: RefusalSlot,
) -> Result<HandshakeConfig, SettingsError> {
    let provider = provider()?;
    let mut builder = policy(provider, Some(settings.identity.key.kind()))
        .with_certificates(vec![certificate(&settings.identity)?]);
    if let Some(roots) = &settings.client_roots {
        builder = builder
            .with_client_auth(ClientAuthType::RequireAndVerifyClientCert)
            .with_client_cas(root_store(roots)?)
            .with_verify_peer_certificate(Some(policy_hook(
                PeerRole::Client,
                roots,
                &settings.verification,
                slot,
            )?));
    }
    builder
        .build(false, None)
        .map_err(|e| SettingsError::Config(e.to_string()))
}

/// Maps an rtc-dtls handshake error to a reason an operator can act on.
fn classify(err: &RtcError) -> Failure {
    match err {
        RtcError::ErrClientCertificateRequired | RtcError::ErrInvalidCertificate => {
            Failure::NoClientCertificate
        }
        // No suite, no group, or no signature scheme in common (patch h refuses the last).
        RtcError::ErrCipherSuiteNoIntersection
        | RtcError::ErrNoSupportedEllipticCurves
        | RtcError::ErrNoAvailableSignatureSchemes => Failure::NoSharedCipher,
        RtcError::ErrClientRequiredButNoServerEms | RtcError::ErrServerRequiredButNoClientEms => {
            Failure::NoExtendedMasterSecret
        }
        RtcError::ErrUnsupportedProtocolVersion => Failure::ProtocolVersion,
        RtcError::ErrInvalidFsmTransition => Failure::HandshakeTimeout,
        // rtc-dtls does not say which fatal alert arrived; the peer's own log does.
        RtcError::ErrAlertFatalOrClose => {
            Failure::PeerAlert("the peer ended the handshake with a fatal alert".into())
        }
        RtcError::Other(message) | RtcError::Crypto(message) => classify_message(message),
        other => Failure::Other(other.to_string()),
    }
}

/// rtc-dtls passes rustls verification errors and received alerts on as strings.
fn classify_message(message: &str) -> Failure {
    let detail = message
        .trim_start_matches("invalid peer certificate: ")
        .to_string();
    if let Some(alert) = message.strip_prefix("Error of Alert ") {
        return Failure::PeerAlert(alert.to_string());
    }
    if let Some(at) = message.find(policy::VIOLATION_MARKER) {
        return Failure::KeyPolicy(message[at + policy::VIOLATION_MARKER.len()..].to_string());
    }
    let m = message;
    // EndEntityUsedAsCa: an issuer in the chain is not a CA (CA:FALSE or no basicConstraints),
    // so the chain does not lead to a trusted CA either.
    if m.contains("UnknownIssuer")
        || m.contains("CaUsedAsEndEntity")
        || m.contains("EndEntityUsedAsCa")
    {
        Failure::UnknownCa(detail)
    } else if m.contains("not valid for name") || m.contains("NotValidForName") {
        Failure::NameMismatch(detail)
    } else if m.contains("certificate expired") || m.contains("Expired") {
        Failure::Expired(detail)
    } else if m.contains("not valid yet") || m.contains("NotValidYet") {
        Failure::NotYetValid(detail)
    } else if m.contains("extended key usage") || m.contains("InvalidPurpose") {
        Failure::WrongUsage(detail)
    } else if m.starts_with("invalid peer certificate") {
        Failure::BadCertificate(detail)
    } else {
        Failure::Other(message.to_string())
    }
}

const CONTENT_ALERT: u8 = 21;

/// The description of the first plaintext (epoch 0) alert in `datagram`, by its RFC 5246 name.
/// rtc-dtls reports every fatal alert as the same error; during the handshake the alert is
/// still in the clear, so the reason the peer gave can be read off the datagram.
fn plaintext_alert(datagram: &[u8]) -> Option<String> {
    let mut rest = datagram;
    while let Some(header) = record::first_record(rest) {
        let end = record::RECORD_HEADER_LEN + header.length;
        let body = &rest[record::RECORD_HEADER_LEN..end];
        if header.content_type == CONTENT_ALERT && header.epoch == 0 && body.len() == 2 {
            return Some(alert_name(body[1]));
        }
        rest = &rest[end..];
    }
    None
}

fn alert_name(description: u8) -> String {
    let name = match description {
        0 => "close_notify",
        10 => "unexpected_message",
        20 => "bad_record_mac",
        21 => "decryption_failed",
        22 => "record_overflow",
        30 => "decompression_failure",
        40 => "handshake_failure",
        41 => "no_certificate",
        42 => "bad_certificate",
        43 => "unsupported_certificate",
        44 => "certificate_revoked",
        45 => "certificate_expired",
        46 => "certificate_unknown",
        47 => "illegal_parameter",
        48 => "unknown_ca",
        49 => "access_denied",
        50 => "decode_error",
        51 => "decrypt_error",
        60 => "export_restriction",
        70 => "protocol_version",
        71 => "insufficient_security",
        80 => "internal_error",
        86 => "inappropriate_fallback",
        90 => "user_canceled",
        100 => "no_renegotiation",
        110 => "unsupported_extension",
        112 => "unrecognized_name",
        115 => "unknown_psk_identity",
        120 => "no_application_protocol",
        other => return format!("alert {other}"),
    };
    name.to_string()
}

impl RtcEngine {
    fn new(
        server: Option<Arc<HandshakeConfig>>,
        client: Option<Arc<HandshakeConfig>>,
        refusal: RefusalSlot,
        server_name: Option<String>,
    ) -> Self {
        // rtc-dtls only copies the local address into its transmit metadata, which we ignore.
        let local = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        RtcEngine {
            slots: [
                Endpoint::with_hasher(local, TransportProtocol::UDP, server.clone(), KeyedState),
                Endpoint::with_hasher(local, TransportProtocol::UDP, server, KeyedState),
            ],
            peers: keyed_map(0),
            client_config: client,
            transmits: VecDeque::new(),
            server_suite: "",
            refusal,
            server_name,
            slot_events: Vec::new(),
            spares: Vec::new(),
        }
    }

    /// An engine that connects to servers.
    pub fn client(settings: &ClientSettings) -> Result<Self, SettingsError> {
        let slot = RefusalSlot::default();
        let config = Arc::new(client_config(settings, slot.clone())?);
        Ok(Self::new(
            None,
            Some(config),
            slot,
            Some(settings.server_name.clone()),
        ))
    }

    /// An engine that accepts clients.
    pub fn server(settings: &ServerSettings) -> Result<Self, SettingsError> {
        let slot = RefusalSlot::default();
        let config = Arc::new(server_config(settings, slot.clone())?);
        let mut engine = Self::new(Some(config), None, slot, None);
        engine.server_suite = settings.identity.key.kind().cipher_suite();
        Ok(engine)
    }

    /// New material for handshakes from now on; live associations keep theirs.
    pub fn replace_server_settings(
        &mut self,
        settings: &ServerSettings,
    ) -> Result<(), SettingsError> {
        let config = Arc::new(server_config(settings, self.refusal.clone())?);
        for slot in &mut self.slots {
            slot.set_server_config(Some(config.clone()));
        }
        self.server_suite = settings.identity.key.kind().cipher_suite();
        Ok(())
    }

    fn is_server(&self) -> bool {
        self.client_config.is_none()
    }

    fn drain(&mut self) {
        for slot in &mut self.slots {
            while let Some(message) = slot.poll_transmit() {
                self.transmits.push_back(Transmit {
                    peer: message.transport.peer_addr,
                    datagram: message.message,
                });
            }
        }
    }

    /// Removes one association rtc-dtls would keep, without the close_notify its `stop`
    /// queues: after a failure the peer has had its alert already.
    fn drop_slot(&mut self, now: Instant, slot: usize, peer: SocketAddr) {
        self.drain();
        self.slots[slot].stop(now, peer);
        while self.slots[slot].poll_transmit().is_some() {}
    }

    /// What PKG_TLS asks of a reference-identifier audit line: the reference identifier and
    /// the identifiers the certificate presented, in plain text.
    fn name_mismatch_detail(&self, presented: Option<Vec<u8>>, rustls: String) -> String {
        let reference = self.server_name.as_deref().unwrap_or("-");
        match presented.and_then(|der| crate::x509::summarize(&der).ok()) {
            Some(leaf) => format!(
                "reference identifier {reference}; presented {} (subject \"{}\", serial {})",
                leaf.identifiers(),
                leaf.subject,
                leaf.serial_hex
            ),
            None => format!("reference identifier {reference}; {rustls}"),
        }
    }

    fn identity_of(&self, slot: usize, peer: SocketAddr) -> PeerIdentity {
        let leaf = self.slots[slot]
            .get_connection_state(peer)
            .and_then(|state| state.peer_certificates.first());
        let subject = leaf
            .and_then(|der| crate::x509::summarize(der).ok())
            .map(|summary| summary.subject);
        // The suite follows the server's key: ours as a server, the peer's leaf as a client.
        let cipher_suite = if self.is_server() {
            self.server_suite
        } else {
            leaf.and_then(|der| x509_parser::parse_x509_certificate(der).ok())
                .and_then(|(_, cert)| policy::check_public_key(cert.public_key()).ok())
                .map_or("", KeyKind::cipher_suite)
        };
        PeerIdentity {
            subject,
            cipher_suite,
        }
    }

    /// Why the certificates `peer` presented on `slot` are outside the policy, if they are.
    fn presented_violation(&self, slot: usize, peer: SocketAddr) -> Option<String> {
        let state = self.slots[slot].get_connection_state(peer)?;
        policy::check_chain(&state.peer_certificates).err()
    }

    /// Which slot a datagram from a known peer, whose state is `state`, belongs to (`server`:
    /// the engine's role).
    fn route(state: &mut Peer, server: bool, datagram: &[u8]) -> usize {
        if !state.established {
            return state.slot;
        }
        let other = 1 - state.slot;
        if server && record::is_client_hello(datagram) {
            // A new handshake from an address with a live association: a client that restarted
            // on the same port, a NAT rebinding, or a spoofer. Only completing it proves which.
            state.replacement = Some(other);
            return other;
        }
        match (state.replacement, record::first_record(datagram)) {
            // Handshake and ChangeCipherSpec records belong to the handshake in progress;
            // application data and alerts to the live association.
            (Some(replacement), Some(header))
                if header.content_type == record::CONTENT_HANDSHAKE
                    || header.content_type == record::CONTENT_CHANGE_CIPHER_SPEC =>
            {
                replacement
            }
            _ => state.slot,
        }
    }

    /// What rtc-dtls reported for `peer`, whose state (as the caller just looked it up) is
    /// `state`, on `slot`.
    fn on_slot_events(
        &mut self,
        now: Instant,
        (slot, peer, state): (usize, SocketAddr, Peer),
        result: Result<&mut Vec<EndpointEvent>, RtcError>,
        datagram: Option<&[u8]>,
        events: &mut Vec<Event>,
    ) {
        let is_replacement = state.replacement == Some(slot);
        let was_established = state.established && !is_replacement;
        match result {
            Ok(happened) => {
                for event in happened.drain(..) {
                    match event {
                        EndpointEvent::HandshakeComplete => {
                            if is_replacement {
                                // The new association proved the address: the old one goes.
                                self.drop_slot(now, state.slot, peer);
                            }
                            self.peers.insert(
                                AddrKey(peer),
                                Peer {
                                    slot,
                                    established: true,
                                    replacement: None,
                                },
                            );
                            events.push(Event::Established {
                                peer,
                                identity: self.identity_of(slot, peer),
                            });
                        }
                        EndpointEvent::ApplicationData(payload) => {
                            events.push(Event::Data { peer, payload })
                        }
                        EndpointEvent::PeerClosed => {
                            self.forget(now, peer);
                            events.push(Event::Closed {
                                peer,
                                reason: "peer sent close_notify".into(),
                            });
                        }
                        _ => {}
                    }
                }
            }
            // A datagram that is not a sequence of records: dropped, whoever sent it.
            Err(RtcError::ErrInvalidPacketLength) | Err(RtcError::NoServerConfig) => {}
            Err(err) if was_established => {
                // Only an authenticated fatal alert ends an established association: forged
                // plaintext in the old epoch never gets this far (rtc-dtls drops it).
                if matches!(err, RtcError::ErrAlertFatalOrClose) {
                    self.forget(now, peer);
                    events.push(Event::Closed {
                        peer,
                        reason: "peer sent a fatal alert".into(),
                    });
                }
            }
            Err(err) => {
                // A peer whose certificates are outside the policy is refused for that, whatever
                // step noticed first (rtc-dtls checks an RSA signature's length, and the
                // signature itself, before the chain): the reason names the certificate.
                let violation = self.presented_violation(slot, peer);
                let refusal = self
                    .refusal
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                let presented = self.slots[slot]
                    .get_connection_state(peer)
                    .and_then(|state| state.peer_certificates.first().cloned());
                // rtc-dtls leaves a failed handshake stuck in its table: remove it. A failed
                // replacement leaves the live association as it was.
                self.drop_slot(now, slot, peer);
                if is_replacement {
                    if let Some(state) = self.peers.get_mut(&AddrKey(peer)) {
                        state.replacement = None;
                    }
                } else {
                    self.peers.remove(&AddrKey(peer));
                }
                let failure = match (&err, datagram.and_then(plaintext_alert)) {
                    (RtcError::ErrAlertFatalOrClose, Some(alert)) => Failure::PeerAlert(alert),
                    _ => match (violation, refusal) {
                        (Some(reason), _) => Failure::KeyPolicy(reason),
                        (None, Some(refusal)) => Failure::from(refusal),
                        (None, None) => classify(&err),
                    },
                };
                let failure = match failure {
                    Failure::NameMismatch(detail) => {
                        Failure::NameMismatch(self.name_mismatch_detail(presented, detail))
                    }
                    other => other,
                };
                events.push(Event::Failed { peer, failure });
            }
        }
    }
}

impl DtlsEngine for RtcEngine {
    fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<(), SendError> {
        let config = self
            .client_config
            .clone()
            .ok_or_else(|| SendError::Engine("a server engine cannot connect".into()))?;
        let result = self.slots[0].connect(now, peer, config, None);
        self.drain();
        result.map_err(|e| SendError::Engine(e.to_string()))?;
        self.peers.insert(
            AddrKey(peer),
            Peer {
                slot: 0,
                established: false,
                replacement: None,
            },
        );
        Ok(())
    }

    fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        events: &mut Vec<Event>,
    ) -> bool {
        self.receive_then_poll_timeout(now, peer, datagram, events)
            .is_some()
    }

    fn send(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) -> Result<(), SendError> {
        // A spare buffer (a datagram sent earlier) holds the record, if there is one.
        let buffer = self.spares.pop().unwrap_or_default();
        self.send_reusing(now, peer, payload, buffer)
    }

    fn recycle(&mut self, buffer: BytesMut) {
        if self.spares.len() < MAX_SPARES {
            self.spares.push(buffer);
        }
    }

    fn send_reusing(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        payload: &[u8],
        buffer: BytesMut,
    ) -> Result<(), SendError> {
        let Some(state) = self.peers.get(&AddrKey(peer)).copied() else {
            return Err(SendError::NoAssociation(peer));
        };
        if !state.established {
            return Err(SendError::NotEstablished(peer));
        }
        let result = self.slots[state.slot].write_reusing(now, peer, payload, buffer);
        self.drain();
        result.map_err(|e| SendError::Engine(e.to_string()))
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn receive_then_poll_timeout(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        events: &mut Vec<Event>,
    ) -> Option<Option<Instant>> {
        // One look-up of the peer's state: routing updates it in place, and the copy taken then
        // is what on_slot_events, and poll_timeout after a datagram that changed nothing, would
        // look up again (rtc-dtls's read touches none of it).
        let server = self.is_server();
        let (slot, state, new_peer) = match self.peers.get_mut(&AddrKey(peer)) {
            Some(state) => (Self::route(state, server, datagram), *state, false),
            None => {
                // rtc-dtls would create an association for any datagram from a new address.
                if !server || !record::is_client_hello(datagram) {
                    return None;
                }
                let state = Peer {
                    slot: 0,
                    established: false,
                    replacement: None,
                };
                self.peers.insert(AddrKey(peer), state);
                (state.slot, state, true)
            }
        };
        let mut happened = std::mem::take(&mut self.slot_events);
        let result = match self.slots[slot].read_slice_reusing(
            now,
            peer,
            None,
            datagram,
            &mut happened,
            &mut self.spares,
        ) {
            Ok(()) => Ok(&mut happened),
            Err(err) => {
                // As read_slice: a read that fails reports no events.
                happened.clear();
                Err(err)
            }
        };
        // Only application data (or nothing) from a known peer leaves its state as it was.
        let unchanged = !new_peer
            && result.as_ref().is_ok_and(|happened| {
                happened
                    .iter()
                    .all(|event| matches!(event, EndpointEvent::ApplicationData(_)))
            });
        self.drain();
        self.on_slot_events(now, (slot, peer, state), result, Some(datagram), events);
        self.slot_events = happened;
        // The first ClientHello may have been refused before rtc-dtls kept any state. (Only a
        // new peer's: a known peer's own slot holds its association; checked only then, as
        // these lookups would otherwise cost every datagram two more hashes of its address.)
        if new_peer {
            if let Some(state) = self.peers.get(&AddrKey(peer)).copied() {
                if self.slots[state.slot].get_connection_state(peer).is_none() {
                    self.peers.remove(&AddrKey(peer));
                }
            }
        }
        if unchanged && state.established && state.replacement.is_none() {
            // poll_timeout's answer for this state, without its look-up.
            return Some(None);
        }
        Some(self.poll_timeout(peer))
    }

    fn poll_timeout(&self, peer: SocketAddr) -> Option<Instant> {
        let state = self.peers.get(&AddrKey(peer))?;
        if state.established && state.replacement.is_none() {
            // An established association retransmits nothing: rtc-dtls may still hold the timer
            // of its last flight, but its handle_timeout does nothing once the handshake is
            // complete. Skipping the look-up saves a hash on every datagram.
            return None;
        }
        let own = self.slots[state.slot].poll_timeout(&peer);
        let replacement = state
            .replacement
            .and_then(|slot| self.slots[slot].poll_timeout(&peer));
        own.into_iter().chain(replacement).min()
    }

    fn handle_timeout(&mut self, now: Instant, peer: SocketAddr, events: &mut Vec<Event>) {
        let Some(state) = self.peers.get(&AddrKey(peer)).copied() else {
            return;
        };
        for slot in [Some(state.slot), state.replacement].into_iter().flatten() {
            let due = self.slots[slot]
                .poll_timeout(&peer)
                .is_some_and(|due| due <= now);
            if !due {
                continue;
            }
            let result = self.slots[slot].handle_timeout(peer, now);
            self.drain();
            if let Err(err) = result {
                // Retransmissions exhausted (ErrInvalidFsmTransition): a handshake timeout.
                if let Some(state) = self.peers.get(&AddrKey(peer)).copied() {
                    self.on_slot_events(now, (slot, peer, state), Err(err), None, events);
                }
            }
        }
    }

    fn close(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(state) = self.peers.remove(&AddrKey(peer)) {
            if let Some(replacement) = state.replacement {
                self.drop_slot(now, replacement, peer);
            }
            self.slots[state.slot].stop(now, peer);
            self.drain();
        }
    }

    fn forget(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(state) = self.peers.remove(&AddrKey(peer)) {
            for slot in [Some(state.slot), state.replacement].into_iter().flatten() {
                self.drop_slot(now, slot, peer);
            }
        }
    }

    fn abandon_handshake(&mut self, now: Instant, peer: SocketAddr) {
        let Some(state) = self.peers.get(&AddrKey(peer)).copied() else {
            return;
        };
        if let Some(replacement) = state.replacement {
            self.drop_slot(now, replacement, peer);
            if let Some(state) = self.peers.get_mut(&AddrKey(peer)) {
                state.replacement = None;
            }
        } else if !state.established {
            self.forget(now, peer);
        }
    }

    fn knows(&self, peer: SocketAddr) -> bool {
        self.peers.contains_key(&AddrKey(peer))
    }

    fn is_established(&self, peer: SocketAddr) -> bool {
        self.peers
            .get(&AddrKey(peer))
            .is_some_and(|p| p.established)
    }

    fn associations(&self) -> usize {
        self.peers.len()
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.keys().map(|key| key.0).collect()
    }
}

#[cfg(test)]
mod tests {
    //! Two engines wired back to back in memory, with simulated time: the policy and the failure
    //! classification, without a socket.
    use super::*;
    use crate::testpki::TestPki;
    use std::time::Duration;

    const CLIENT: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40001);
    const SERVER: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 40002);

    /// A CA whose server leaf is named `server_names`, and its client leaf "device-1".
    struct Pki {
        ca: TestPki,
        server_names: Vec<String>,
    }

    impl Pki {
        fn new(tag: &str, server_names: &[&str]) -> Pki {
            Pki {
                ca: TestPki::new(&format!("test CA {tag}")),
                server_names: server_names.iter().map(|s| s.to_string()).collect(),
            }
        }
        fn identity(&self, who: &str) -> Identity {
            match who {
                "server" => {
                    let names: Vec<&str> = self.server_names.iter().map(String::as_str).collect();
                    self.ca.server(&names)
                }
                _ => self.ca.client("device-1"),
            }
        }
        fn roots(&self) -> Vec<CertificateDer<'static>> {
            vec![self.ca.ca.clone()]
        }
    }

    fn client_engine(trust: &Pki, name: &str, identity: Option<Identity>) -> RtcEngine {
        RtcEngine::client(&ClientSettings {
            roots: trust.roots(),
            server_name: name.into(),
            identity,
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("client engine")
    }

    fn server_engine(pki: &Pki, client_roots: Option<&Pki>) -> RtcEngine {
        RtcEngine::server(&ServerSettings {
            identity: pki.identity("server"),
            client_roots: client_roots.map(Pki::roots),
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("server engine")
    }

    /// Moves datagrams both ways until both engines are quiet; returns (client, server) events.
    fn pump(
        client: &mut RtcEngine,
        server: &mut RtcEngine,
        now: Instant,
    ) -> (Vec<Event>, Vec<Event>) {
        let (mut client_events, mut server_events) = (Vec::new(), Vec::new());
        for _ in 0..50 {
            let mut moved = false;
            while let Some(t) = client.poll_transmit() {
                assert_eq!(t.peer, SERVER);
                server.receive(now, CLIENT, &t.datagram, &mut server_events);
                moved = true;
            }
            while let Some(t) = server.poll_transmit() {
                assert_eq!(t.peer, CLIENT);
                client.receive(now, SERVER, &t.datagram, &mut client_events);
                moved = true;
            }
            if !moved {
                break;
            }
        }
        (client_events, server_events)
    }

    fn failure_of(events: &[Event]) -> Option<Failure> {
        events.iter().find_map(|e| match e {
            Event::Failed { failure, .. } => Some(failure.clone()),
            _ => None,
        })
    }

    fn established(events: &[Event]) -> Option<PeerIdentity> {
        events.iter().find_map(|e| match e {
            Event::Established { identity, .. } => Some(identity.clone()),
            _ => None,
        })
    }

    #[test]
    fn a_trusted_server_carries_datagrams_both_ways_unchanged() {
        let pki = Pki::new("ok", &["localhost", "127.0.0.1"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", None);
        let mut server = server_engine(&pki, None);
        client.connect(now, SERVER).expect("connect");
        let (c, s) = pump(&mut client, &mut server, now);
        assert_eq!(
            established(&c).and_then(|i| i.subject),
            Some("CN=localhost".to_string())
        );
        assert_eq!(
            established(&s),
            Some(PeerIdentity {
                subject: None,
                cipher_suite: "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"
            })
        );

        let request = [0x23u8; 48];
        client.send(now, SERVER, &request).expect("send");
        let (_, s) = pump(&mut client, &mut server, now);
        assert!(
            matches!(&s[..], [Event::Data { payload, .. }] if payload[..] == request[..]),
            "{s:?}"
        );
        server.send(now, CLIENT, &[0x24u8; 48]).expect("reply");
        let (c, _) = pump(&mut client, &mut server, now);
        assert!(matches!(&c[..], [Event::Data { payload, .. }] if payload[..] == [0x24u8; 48][..]));
    }

    #[test]
    fn an_ip_reference_identifier_matches_an_ip_san() {
        let pki = Pki::new("ip", &["localhost", "127.0.0.1"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "127.0.0.1", None);
        let mut server = server_engine(&pki, None);
        client.connect(now, SERVER).expect("connect");
        let (c, _) = pump(&mut client, &mut server, now);
        assert!(established(&c).is_some(), "{c:?}");
    }

    #[test]
    fn an_unknown_ca_is_refused_by_the_client() {
        let server_pki = Pki::new("ca-a", &["localhost"]);
        let other = Pki::new("ca-b", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&other, "localhost", None);
        let mut server = server_engine(&server_pki, None);
        client.connect(now, SERVER).expect("connect");
        let (c, s) = pump(&mut client, &mut server, now);
        assert!(
            matches!(failure_of(&c), Some(Failure::UnknownCa(_))),
            "{c:?}"
        );
        assert!(
            matches!(failure_of(&s), Some(Failure::PeerAlert(a)) if a == "bad_certificate"),
            "{s:?}"
        );
        assert_eq!(client.associations(), 0, "a failed association is removed");
        assert_eq!(server.associations(), 0, "the server drops it on the alert");
    }

    #[test]
    fn a_name_mismatch_is_refused_by_the_client() {
        let pki = Pki::new("name", &["time.example.net"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "other.example.net", None);
        let mut server = server_engine(&pki, None);
        client.connect(now, SERVER).expect("connect");
        let (c, _) = pump(&mut client, &mut server, now);
        // The audit detail: the reference identifier and what the certificate presented.
        assert!(
            matches!(failure_of(&c), Some(Failure::NameMismatch(d))
                if d.starts_with("reference identifier other.example.net; presented DNS:time.example.net (subject \"CN=time.example.net\", serial ")),
            "{c:?}"
        );
        // An IP reference identifier needs an IP SAN, not a DNS name that happens to resolve.
        let mut client = client_engine(&pki, "127.0.0.1", None);
        let mut server = server_engine(&pki, None);
        client.connect(now, SERVER).expect("connect");
        let (c, _) = pump(&mut client, &mut server, now);
        assert!(
            matches!(failure_of(&c), Some(Failure::NameMismatch(_))),
            "{c:?}"
        );
    }

    #[test]
    fn the_policy_hook_refuses_leaves_without_eku_in_both_roles() {
        use rcgen::KeyUsagePurpose;
        let pki = Pki::new("no-eku", &["localhost"]);
        let now = Instant::now();
        let bare = pki.ca.leaf_with_usages(
            &["localhost"],
            vec![],
            vec![KeyUsagePurpose::DigitalSignature],
        );
        let mut client = client_engine(&pki, "localhost", None);
        let mut server = RtcEngine::server(&ServerSettings {
            identity: bare.clone(),
            client_roots: None,
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("server engine");
        client.connect(now, SERVER).expect("connect");
        let (c, _) = pump(&mut client, &mut server, now);
        assert!(
            matches!(failure_of(&c), Some(Failure::WrongUsage(d))
                if d.starts_with("server leaf subject=\"CN=localhost\" serial=") && d.contains("no extendedKeyUsage")),
            "{c:?}"
        );
        assert_eq!(client.associations(), 0);

        let mut client = client_engine(&pki, "localhost", Some(bare));
        let mut server = server_engine(&pki, Some(&pki));
        client.connect(now, SERVER).expect("connect");
        let (_, s) = pump(&mut client, &mut server, now);
        assert!(
            matches!(failure_of(&s), Some(Failure::WrongUsage(d)) if d.starts_with("client leaf")),
            "{s:?}"
        );
        assert_eq!(server.associations(), 0);
    }

    #[test]
    fn mutual_authentication_refuses_a_client_without_a_certificate() {
        let pki = Pki::new("mutual-none", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", None);
        let mut server = server_engine(&pki, Some(&pki));
        client.connect(now, SERVER).expect("connect");
        let (_, s) = pump(&mut client, &mut server, now);
        assert_eq!(failure_of(&s), Some(Failure::NoClientCertificate), "{s:?}");
        assert_eq!(server.associations(), 0);
    }

    #[test]
    fn mutual_authentication_accepts_a_client_certificate_from_the_ca() {
        let pki = Pki::new("mutual-ok", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", Some(pki.identity("client")));
        let mut server = server_engine(&pki, Some(&pki));
        client.connect(now, SERVER).expect("connect");
        let (c, s) = pump(&mut client, &mut server, now);
        assert!(established(&c).is_some(), "{c:?}");
        assert_eq!(
            established(&s).and_then(|i| i.subject),
            Some("CN=device-1".to_string())
        );
    }

    #[test]
    fn mutual_authentication_refuses_a_client_certificate_from_another_ca() {
        let pki = Pki::new("mutual-a", &["localhost"]);
        let other = Pki::new("mutual-b", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", Some(other.identity("client")));
        let mut server = server_engine(&pki, Some(&pki));
        client.connect(now, SERVER).expect("connect");
        let (_, s) = pump(&mut client, &mut server, now);
        assert!(
            matches!(failure_of(&s), Some(Failure::UnknownCa(_))),
            "{s:?}"
        );
    }

    #[test]
    fn garbage_does_not_end_an_established_association() {
        let pki = Pki::new("garbage", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", None);
        let mut server = server_engine(&pki, None);
        client.connect(now, SERVER).expect("connect");
        pump(&mut client, &mut server, now);
        let mut events = Vec::new();
        for junk in [
            &[0u8; 0][..],
            &[0xff; 7],
            &[23, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 9, 0, 4, 1, 2, 3, 4],
            &[0x23; 48],
        ] {
            server.receive(now, CLIENT, junk, &mut events);
        }
        assert!(events.is_empty(), "{events:?}");
        assert!(server.is_established(CLIENT));
        client.send(now, SERVER, &[0x23; 48]).expect("send");
        let (_, s) = pump(&mut client, &mut server, now);
        assert!(matches!(&s[..], [Event::Data { .. }]), "{s:?}");
    }

    #[test]
    fn an_unanswered_handshake_gives_up_with_a_timeout() {
        let pki = Pki::new("timeout", &["localhost"]);
        let mut now = Instant::now();
        let mut client = client_engine(&pki, "localhost", None);
        client.connect(now, SERVER).expect("connect");
        let mut events = Vec::new();
        for _ in 0..100 {
            while client.poll_transmit().is_some() {}
            let Some(due) = client.poll_timeout(SERVER) else {
                break;
            };
            now = due.max(now) + Duration::from_millis(1);
            client.handle_timeout(now, SERVER, &mut events);
        }
        assert_eq!(
            failure_of(&events),
            Some(Failure::HandshakeTimeout),
            "{events:?}"
        );
        assert_eq!(client.associations(), 0);
    }

    #[test]
    fn sending_before_the_handshake_is_an_error_not_a_queue() {
        let pki = Pki::new("early", &["localhost"]);
        let now = Instant::now();
        let mut client = client_engine(&pki, "localhost", None);
        assert_eq!(
            client.send(now, SERVER, b"x"),
            Err(SendError::NoAssociation(SERVER))
        );
        client.connect(now, SERVER).expect("connect");
        assert_eq!(
            client.send(now, SERVER, b"x"),
            Err(SendError::NotEstablished(SERVER))
        );
    }

    #[test]
    fn a_client_that_comes_back_on_the_same_address_replaces_its_old_association() {
        let pki = Pki::new("same-port", &["localhost"]);
        let now = Instant::now();
        let mut server = server_engine(&pki, None);
        let mut first = client_engine(&pki, "localhost", None);
        first.connect(now, SERVER).expect("connect");
        pump(&mut first, &mut server, now);
        assert!(server.is_established(CLIENT));

        // The client crashed; a new one starts on the same address and port.
        let mut second = client_engine(&pki, "localhost", None);
        second.connect(now, SERVER).expect("connect");
        let (c, s) = pump(&mut second, &mut server, now);
        assert!(established(&c).is_some(), "{c:?}");
        assert!(established(&s).is_some(), "{s:?}");
        assert_eq!(server.associations(), 1);

        second.send(now, SERVER, &[0x23; 48]).expect("send");
        let (_, s) = pump(&mut second, &mut server, now);
        assert!(matches!(&s[..], [Event::Data { .. }]), "{s:?}");
        server.send(now, CLIENT, &[0x24; 48]).expect("reply");
        let (c, _) = pump(&mut second, &mut server, now);
        assert!(matches!(&c[..], [Event::Data { .. }]), "{c:?}");
    }

    #[test]
    fn a_spoofed_client_hello_never_ends_a_live_association() {
        let pki = Pki::new("spoof", &["localhost"]);
        let now = Instant::now();
        let mut server = server_engine(&pki, None);
        let mut client = client_engine(&pki, "localhost", None);
        client.connect(now, SERVER).expect("connect");
        pump(&mut client, &mut server, now);

        // Someone else's ClientHello, sent with the client's address.
        let mut spoofer = client_engine(&pki, "localhost", None);
        spoofer.connect(now, SERVER).expect("connect");
        let mut events = Vec::new();
        while let Some(t) = spoofer.poll_transmit() {
            assert!(server.receive(now, CLIENT, &t.datagram, &mut events));
        }
        // The HelloVerifyRequest goes to the real client, which ignores it.
        while let Some(t) = server.poll_transmit() {
            client.receive(now, SERVER, &t.datagram, &mut events);
        }
        assert!(events.is_empty(), "{events:?}");
        assert!(server.is_established(CLIENT));

        client.send(now, SERVER, &[0x23; 48]).expect("send");
        let (_, s) = pump(&mut client, &mut server, now);
        assert!(matches!(&s[..], [Event::Data { .. }]), "{s:?}");

        // Abandoning the half-done replacement leaves the association as it was.
        server.abandon_handshake(now, CLIENT);
        assert!(server.is_established(CLIENT));
        server.send(now, CLIENT, &[0x24; 48]).expect("reply");
        let (c, _) = pump(&mut client, &mut server, now);
        assert!(matches!(&c[..], [Event::Data { .. }]), "{c:?}");
    }

    // ---- the declared key policy (crate::policy) ----

    use crate::testpki::TestKey;
    use rcgen::ExtendedKeyUsagePurpose as Eku;

    /// A mutually authenticated handshake between leaves of `ca` with the given key types.
    fn mutual_with(ca: &TestPki, server: TestKey, client: TestKey) -> (Vec<Event>, Vec<Event>) {
        let now = Instant::now();
        let mut client_engine = RtcEngine::client(&ClientSettings {
            roots: vec![ca.ca.clone()],
            server_name: "localhost".into(),
            identity: Some(ca.leaf_with(&["device-1"], Eku::ClientAuth, client)),
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("client engine");
        let mut server_engine = RtcEngine::server(&ServerSettings {
            identity: ca.leaf_with(&["localhost"], Eku::ServerAuth, server),
            client_roots: Some(vec![ca.ca.clone()]),
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("server engine");
        client_engine.connect(now, SERVER).expect("connect");
        pump(&mut client_engine, &mut server_engine, now)
    }

    fn suite_of(events: &[Event]) -> Option<&'static str> {
        established(events).map(|identity| identity.cipher_suite)
    }

    #[test]
    fn rsa_identities_handshake_both_ways_with_the_rsa_suite() {
        let ca = TestPki::with_key("RSA CA", TestKey::Rsa);
        let (c, s) = mutual_with(&ca, TestKey::Rsa, TestKey::Rsa);
        assert_eq!(
            suite_of(&c),
            Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "{c:?}"
        );
        assert_eq!(
            suite_of(&s),
            Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "{s:?}"
        );
        assert_eq!(
            established(&s).and_then(|i| i.subject),
            Some("CN=device-1".to_string())
        );
    }

    #[test]
    fn p384_identities_handshake_both_ways() {
        let ca = TestPki::with_key("P-384 CA", TestKey::EcdsaP384);
        let (c, s) = mutual_with(&ca, TestKey::EcdsaP384, TestKey::EcdsaP384);
        assert_eq!(
            suite_of(&c),
            Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            "{c:?}"
        );
        assert!(established(&s).is_some(), "{s:?}");
    }

    #[test]
    fn key_types_mix_within_one_pki() {
        // An RSA CA issuing ECDSA leaves, an ECDSA server with an RSA client, and the reverse.
        let rsa_ca = TestPki::with_key("RSA CA mixed", TestKey::Rsa);
        let (c, s) = mutual_with(&rsa_ca, TestKey::EcdsaP256, TestKey::EcdsaP384);
        assert_eq!(
            suite_of(&c),
            Some("TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"),
            "{c:?}"
        );
        assert!(established(&s).is_some(), "{s:?}");
        let ec_ca = TestPki::with_key("P-256 CA mixed", TestKey::EcdsaP256);
        let (c, s) = mutual_with(&ec_ca, TestKey::Rsa, TestKey::EcdsaP256);
        assert_eq!(
            suite_of(&c),
            Some("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
            "{c:?}"
        );
        assert!(established(&s).is_some(), "{s:?}");
        let (c, s) = mutual_with(&ec_ca, TestKey::EcdsaP384, TestKey::Rsa);
        assert!(established(&c).is_some(), "{c:?}");
        assert!(established(&s).is_some(), "{s:?}");
    }

    #[test]
    fn a_chain_certificate_outside_the_policy_is_refused_with_the_reason() {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, PKCS_RSA_SHA512};
        use rustls_pki_types::PrivatePkcs8KeyDer;
        // A root whose RSA key signs with SHA-512 (rustls-webpki accepts it) issues an ECDSA
        // intermediate, which issues the server's leaf. Only the policy refuses the chain.
        let root_key = KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(&include_bytes!("../testdata/rsa3072.pk8.der")[..]),
            &PKCS_RSA_SHA512,
        )
        .expect("RSA root key");
        let mut root_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        root_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        root_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "SHA-512 root");
        let root = root_params.self_signed(&root_key).expect("root");
        let mid_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut mid_params = CertificateParams::new(Vec::<String>::new()).expect("params");
        mid_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        mid_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "intermediate");
        let mid = mid_params
            .signed_by(&mid_key, &Issuer::from_params(&root_params, &root_key))
            .expect("intermediate");
        let leaf_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut leaf_params = CertificateParams::new(vec!["localhost".into()]).expect("params");
        leaf_params.extended_key_usages = vec![Eku::ServerAuth];
        let leaf = leaf_params
            .signed_by(&leaf_key, &Issuer::from_params(&mid_params, &mid_key))
            .expect("leaf");
        let now = Instant::now();
        let mut server = RtcEngine::server(&ServerSettings {
            identity: Identity {
                chain: vec![leaf.der().clone(), mid.der().clone()],
                key: crate::identity::PrivateKey::from_pkcs8(
                    KeyKind::EcdsaP256,
                    leaf_key.serialize_der(),
                ),
            },
            client_roots: None,
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("server engine: its own leaf is in the policy");
        let mut client = RtcEngine::client(&ClientSettings {
            roots: vec![root.der().clone()],
            server_name: "localhost".into(),
            identity: None,
            verification: crate::testpki::system_clock_verification(),
        })
        .expect("client engine: the root's key is RSA-3072, in the policy");
        client.connect(now, SERVER).expect("connect");
        let (c, _) = pump(&mut client, &mut server, now);
        assert_eq!(
            failure_of(&c),
            Some(Failure::KeyPolicy(
                "chain certificate 2 \"CN=intermediate\": signed with sha512WithRSAEncryption (SHA-512) (ECDSA or RSA PKCS#1 with SHA-256 or SHA-384 only)".into()
            )),
            "{c:?}"
        );
        assert_eq!(failure_of(&c).map(|f| f.label()), Some("key_policy"));
    }

    #[test]
    fn trust_anchors_and_own_certificates_outside_the_policy_are_refused_at_start() {
        let p521 = CertificateDer::from(include_bytes!("../testdata/p521.cert.der").to_vec());
        let err = RtcEngine::client(&ClientSettings {
            roots: vec![p521],
            server_name: "localhost".into(),
            identity: None,
            verification: crate::testpki::system_clock_verification(),
        })
        .err()
        .expect("a P-521 root is refused");
        assert_eq!(
            err.to_string(),
            "no trust anchor could be used: CA certificate 1 (\"CN=p521\") is outside the key policy: an ECDSA key on curve secp521r1 (P-521) (P-256 or P-384 only)"
        );
        // Our own leaf: an RSA-1024 certificate (with some RSA-2048 key) is refused too.
        let rsa1024 = CertificateDer::from(include_bytes!("../testdata/rsa1024.cert.der").to_vec());
        let err = RtcEngine::server(&ServerSettings {
            identity: Identity {
                chain: vec![rsa1024],
                key: crate::identity::PrivateKey::from_pkcs8(
                    KeyKind::Rsa { bits: 2048 },
                    include_bytes!("../testdata/rsa2048.pk8.der").to_vec(),
                ),
            },
            client_roots: None,
            verification: crate::testpki::system_clock_verification(),
        })
        .err()
        .expect("an RSA-1024 certificate is refused");
        assert!(
            err.to_string()
                .contains("outside the key policy: leaf \"CN=rsa1024\": an RSA key of 1024 bits"),
            "{err}"
        );
    }

    #[test]
    fn handshake_signatures_are_checked_within_the_policy() {
        use rtc_dtls::crypto_provider::PublicKeyEncoding;
        let message = b"client random, server random, ECDHE parameters";
        for (alg, kind, scheme) in [
            (
                &rcgen::PKCS_ECDSA_P256_SHA256,
                KeyKind::EcdsaP256,
                KeyScheme::EcdsaP256Sha256,
            ),
            (
                &rcgen::PKCS_ECDSA_P384_SHA384,
                KeyKind::EcdsaP384,
                KeyScheme::EcdsaP384Sha384,
            ),
        ] {
            let pair = rcgen::KeyPair::generate_for(alg).expect("key");
            let ours = PolicySigningKey::new(kind, &pair.serialize_der()).expect("key");
            assert!(ours.supports(scheme));
            let signature = ours.sign(scheme, message).expect("sign");
            verify_in_policy(scheme, ours.public_key(), message, &signature).expect("verify");
        }
        let rsa = PolicySigningKey::new(
            KeyKind::Rsa { bits: 2048 },
            include_bytes!("../testdata/rsa2048.pk8.der"),
        )
        .expect("RSA key");
        for scheme in [KeyScheme::RsaPkcs1Sha256, KeyScheme::RsaPkcs1Sha384] {
            let signature = rsa.sign(scheme, message).expect("sign");
            verify_in_policy(scheme, rsa.public_key(), message, &signature).expect("verify");
        }
        assert!(matches!(
            verify_in_policy(KeyScheme::RsaPkcs1Sha1, rsa.public_key(), message, &[0; 256]),
            Err(CryptoError::Provider(m)) if m.contains("outside the key policy")
        ));
        // An RSA-1024 leaf's key, as the signature check sees it.
        let der = include_bytes!("../testdata/rsa1024.cert.der");
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse");
        let key = PublicKey {
            encoding: PublicKeyEncoding::RsaPkcs1Der,
            bytes: &cert.public_key().subject_public_key.data,
        };
        match verify_in_policy(KeyScheme::RsaPkcs1Sha256, key, message, &[0; 128]) {
            Err(CryptoError::Provider(m)) => assert_eq!(
                m,
                "outside the key policy: the peer's leaf has an RSA key of 1024 bits (2048 to 4096 only)"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn alert_messages_are_classified() {
        assert_eq!(
            classify_message("invalid peer certificate: UnknownIssuer"),
            Failure::UnknownCa("UnknownIssuer".into())
        );
        assert!(matches!(
            classify_message("invalid peer certificate: certificate expired: verification time 5"),
            Failure::Expired(_)
        ));
        assert!(matches!(
            classify_message(
                "invalid peer certificate: certificate not valid yet: verification time 5"
            ),
            Failure::NotYetValid(_)
        ));
        assert!(matches!(
            classify_message(
                "invalid peer certificate: certificate does not allow extended key usage for server authentication, allows client authentication"
            ),
            Failure::WrongUsage(_)
        ));
        assert!(matches!(
            classify_message("Error of Alert Alert LevelFatal: BadCertificate"),
            Failure::PeerAlert(_)
        ));
        // An intermediate without CA:TRUE (rustls-webpki's wording).
        assert!(matches!(
            classify_message("invalid peer certificate: Other(OtherError(EndEntityUsedAsCa))"),
            Failure::UnknownCa(_)
        ));
    }

    #[test]
    fn a_plaintext_alert_is_named() {
        // A HelloVerifyRequest-sized handshake record, then a fatal handshake_failure alert.
        let mut datagram = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3, 3, 0, 0];
        datagram.extend_from_slice(&[21, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 1, 0, 2, 2, 40]);
        assert_eq!(
            plaintext_alert(&datagram).as_deref(),
            Some("handshake_failure")
        );
        assert_eq!(alert_name(70), "protocol_version");
        assert_eq!(alert_name(200), "alert 200");
        // Encrypted (epoch 1), truncated or absent: nothing to name.
        let encrypted = [21, 0xfe, 0xfd, 0, 1, 0, 0, 0, 0, 0, 1, 0, 2, 2, 40];
        assert_eq!(plaintext_alert(&encrypted), None);
        assert_eq!(plaintext_alert(&datagram[..datagram.len() - 1]), None);
        assert_eq!(plaintext_alert(&[0x23; 48]), None);
    }
}
