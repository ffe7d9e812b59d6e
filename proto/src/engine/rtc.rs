//! The rtc-dtls engine: the only file that names rtc_dtls types.
//!
//! rtc-dtls's `Endpoint` already multiplexes associations by address and is sans-I/O. What this
//! wrapper adds is policy it lacks: one cipher suite, one signature scheme, the extended master
//! secret required, failures classified into [`Failure`] and the failed association removed
//! (rtc-dtls leaves it in its table, stuck), and an established association kept alive through
//! unauthenticated garbage.

use std::collections::{HashMap, VecDeque};
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

use crate::record;
use crate::verify::{PeerRole, PeerVerifier, Refusal, Verification};

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
    slots: [Endpoint; 2],
    peers: HashMap<SocketAddr, Peer>,
    /// Present in the client role: the config each `connect` uses.
    client_config: Option<Arc<HandshakeConfig>>,
    /// Drained from the endpoints after every call, so that the close_notify rtc-dtls queues
    /// when we drop a failed association can be told apart and discarded.
    transmits: VecDeque<Transmit>,
    /// The last chain our policy hook refused, taken when rtc-dtls reports the failure (the
    /// hook can only hand rtc-dtls a string).
    refusal: RefusalSlot,
    /// The reference identifier (client role), for name-mismatch audit lines.
    server_name: Option<String>,
}

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
        self.inner
            .crypto()
            .verify_signature(scheme, public_key, message, signature)
    }
}

/// The policy both roles share. No switch weakens any of it.
fn policy(provider: Arc<dyn RTCCryptoProvider>) -> ConfigBuilder {
    ConfigBuilder::default()
        .with_crypto_provider(provider)
        .with_cipher_suites(vec![CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256])
        .with_signature_schemes(vec![SignatureScheme::EcdsaWithP256AndSha256])
        .with_extended_master_secret(ExtendedMasterSecretType::Require)
        .with_insecure_skip_verify(false)
        .with_insecure_hashes(false)
        .with_insecure_verification(false)
}

fn certificate(
    identity: &Identity,
    provider: &Arc<dyn RTCCryptoProvider>,
) -> Result<Certificate, SettingsError> {
    let key = provider
        .crypto()
        .import_signing_key(KeyScheme::EcdsaP256Sha256, identity.key.pkcs8_der())
        .map_err(|e| SettingsError::Key(e.to_string()))?;
    Ok(Certificate::from_signing_key(identity.chain.clone(), key))
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<rustls::RootCertStore, SettingsError> {
    let mut store = rustls::RootCertStore::empty();
    for root in roots {
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
    let mut builder = policy(provider.clone())
        .with_roots_cas(root_store(&settings.roots)?)
        .with_server_name(settings.server_name.clone())
        .with_verify_peer_certificate(Some(policy_hook(
            PeerRole::Server,
            &settings.roots,
            &settings.verification,
            slot,
        )?));
    if let Some(identity) = &settings.identity {
        builder = builder.with_certificates(vec![certificate(identity, &provider)?]);
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
    let mut builder = policy(provider.clone())
        .with_certificates(vec![certificate(&settings.identity, &provider)?]);
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
        RtcError::ErrCipherSuiteNoIntersection | RtcError::ErrNoSupportedEllipticCurves => {
            Failure::NoSharedCipher
        }
        RtcError::ErrClientRequiredButNoServerEms | RtcError::ErrServerRequiredButNoClientEms => {
            Failure::NoExtendedMasterSecret
        }
        RtcError::ErrUnsupportedProtocolVersion => Failure::ProtocolVersion,
        RtcError::ErrInvalidFsmTransition => Failure::HandshakeTimeout,
        // rtc-dtls does not say which fatal alert arrived; the peer's own log does.
        RtcError::ErrAlertFatalOrClose => {
            Failure::PeerAlert("the peer ended the handshake with a fatal alert".into())
        }
        RtcError::Other(message) => classify_message(message),
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
                Endpoint::new(local, TransportProtocol::UDP, server.clone()),
                Endpoint::new(local, TransportProtocol::UDP, server),
            ],
            peers: HashMap::new(),
            client_config: client,
            transmits: VecDeque::new(),
            refusal,
            server_name,
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
        Ok(Self::new(Some(config), None, slot, None))
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
        let subject = self.slots[slot]
            .get_connection_state(peer)
            .and_then(|state| state.peer_certificates.first())
            .and_then(|der| crate::x509::summarize(der).ok())
            .map(|summary| summary.subject);
        PeerIdentity { subject }
    }

    /// Which slot a datagram from a known peer belongs to.
    fn route(&mut self, peer: SocketAddr, datagram: &[u8]) -> usize {
        let Some(state) = self.peers.get_mut(&peer) else {
            return 0;
        };
        if !state.established {
            return state.slot;
        }
        let other = 1 - state.slot;
        if self.client_config.is_none() && record::is_client_hello(datagram) {
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

    fn on_slot_events(
        &mut self,
        now: Instant,
        slot: usize,
        peer: SocketAddr,
        result: Result<Vec<EndpointEvent>, RtcError>,
        datagram: Option<&[u8]>,
        events: &mut Vec<Event>,
    ) {
        let Some(state) = self.peers.get(&peer).copied() else {
            return;
        };
        let is_replacement = state.replacement == Some(slot);
        let was_established = state.established && !is_replacement;
        match result {
            Ok(happened) => {
                for event in happened {
                    match event {
                        EndpointEvent::HandshakeComplete => {
                            if is_replacement {
                                // The new association proved the address: the old one goes.
                                self.drop_slot(now, state.slot, peer);
                            }
                            self.peers.insert(
                                peer,
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
                    if let Some(state) = self.peers.get_mut(&peer) {
                        state.replacement = None;
                    }
                } else {
                    self.peers.remove(&peer);
                }
                let failure = match (&err, datagram.and_then(plaintext_alert)) {
                    (RtcError::ErrAlertFatalOrClose, Some(alert)) => Failure::PeerAlert(alert),
                    _ => match refusal {
                        Some(refusal) => Failure::from(refusal),
                        None => classify(&err),
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
            peer,
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
        let new_peer = !self.peers.contains_key(&peer);
        if new_peer {
            // rtc-dtls would create an association for any datagram from a new address.
            if !self.is_server() || !record::is_client_hello(datagram) {
                return false;
            }
            self.peers.insert(
                peer,
                Peer {
                    slot: 0,
                    established: false,
                    replacement: None,
                },
            );
        }
        let slot = self.route(peer, datagram);
        let result = self.slots[slot].read(now, peer, None, BytesMut::from(datagram));
        self.drain();
        self.on_slot_events(now, slot, peer, result, Some(datagram), events);
        // The first ClientHello may have been refused before rtc-dtls kept any state. (Only a
        // new peer's: a known peer's own slot holds its association; checked only then, as
        // these lookups would otherwise cost every datagram two more hashes of its address.)
        if new_peer {
            if let Some(state) = self.peers.get(&peer).copied() {
                if self.slots[state.slot].get_connection_state(peer).is_none() {
                    self.peers.remove(&peer);
                }
            }
        }
        true
    }

    fn send(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) -> Result<(), SendError> {
        let Some(state) = self.peers.get(&peer).copied() else {
            return Err(SendError::NoAssociation(peer));
        };
        if !state.established {
            return Err(SendError::NotEstablished(peer));
        }
        let result = self.slots[state.slot].write(now, peer, payload);
        self.drain();
        result.map_err(|e| SendError::Engine(e.to_string()))
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn poll_timeout(&self, peer: SocketAddr) -> Option<Instant> {
        let state = self.peers.get(&peer)?;
        let own = self.slots[state.slot].poll_timeout(&peer);
        let replacement = state
            .replacement
            .and_then(|slot| self.slots[slot].poll_timeout(&peer));
        own.into_iter().chain(replacement).min()
    }

    fn handle_timeout(&mut self, now: Instant, peer: SocketAddr, events: &mut Vec<Event>) {
        let Some(state) = self.peers.get(&peer).copied() else {
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
                self.on_slot_events(now, slot, peer, Err(err), None, events);
            }
        }
    }

    fn close(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(state) = self.peers.remove(&peer) {
            if let Some(replacement) = state.replacement {
                self.drop_slot(now, replacement, peer);
            }
            self.slots[state.slot].stop(now, peer);
            self.drain();
        }
    }

    fn forget(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(state) = self.peers.remove(&peer) {
            for slot in [Some(state.slot), state.replacement].into_iter().flatten() {
                self.drop_slot(now, slot, peer);
            }
        }
    }

    fn abandon_handshake(&mut self, now: Instant, peer: SocketAddr) {
        let Some(state) = self.peers.get(&peer).copied() else {
            return;
        };
        if let Some(replacement) = state.replacement {
            self.drop_slot(now, replacement, peer);
            if let Some(state) = self.peers.get_mut(&peer) {
                state.replacement = None;
            }
        } else if !state.established {
            self.forget(now, peer);
        }
    }

    fn knows(&self, peer: SocketAddr) -> bool {
        self.peers.contains_key(&peer)
    }

    fn is_established(&self, peer: SocketAddr) -> bool {
        self.peers.get(&peer).is_some_and(|p| p.established)
    }

    fn associations(&self) -> usize {
        self.peers.len()
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.peers.keys().copied().collect()
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
        assert_eq!(established(&s), Some(PeerIdentity { subject: None }));

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
        let bare = pki.ca.leaf_with(
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
