//! The rtc-dtls engine: the only file that names rtc_dtls types.
//!
//! rtc-dtls's `Endpoint` already multiplexes associations by address and is sans-I/O. What this
//! wrapper adds is policy it lacks: one cipher suite, one signature scheme, the extended master
//! secret required, failures classified into [`Failure`] and the failed association removed
//! (rtc-dtls leaves it in its table, stuck), and an established association kept alive through
//! unauthenticated garbage.

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use rtc_dtls::cipher_suite::CipherSuiteId;
use rtc_dtls::config::{ClientAuthType, ConfigBuilder, ExtendedMasterSecretType, HandshakeConfig};
use rtc_dtls::crypto::Certificate;
use rtc_dtls::crypto_provider::{RTCCryptoProvider, SignatureScheme as KeyScheme};
use rtc_dtls::endpoint::{Endpoint, EndpointEvent};
use rtc_dtls::signature_hash_algorithm::SignatureScheme;
use rtc_shared::TransportProtocol;
use rtc_shared::error::Error as RtcError;
use rustls_pki_types::{CertificateDer, ServerName};

use super::{
    ClientSettings, DtlsEngine, Event, Failure, Identity, PeerIdentity, SendError, ServerSettings,
    SettingsError, Transmit,
};

/// An rtc-dtls endpoint in one role, with our security policy.
pub struct RtcEngine {
    endpoint: Endpoint,
    /// Present in the client role: the config each `connect` uses.
    client_config: Option<Arc<HandshakeConfig>>,
    established: HashSet<SocketAddr>,
    /// Drained from the endpoint after every call, so that the close_notify rtc-dtls queues
    /// when we drop a failed association can be told apart and discarded.
    transmits: VecDeque<Transmit>,
}

fn provider() -> Result<Arc<dyn RTCCryptoProvider>, SettingsError> {
    rtc_dtls::crypto_provider::default_provider().map_err(|e| SettingsError::Config(e.to_string()))
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

fn client_config(settings: &ClientSettings) -> Result<HandshakeConfig, SettingsError> {
    // rtc-dtls checks names through rustls; refuse a name it could never match now rather than
    // at every handshake.
    ServerName::try_from(settings.server_name.as_str()).map_err(|e| SettingsError::ServerName {
        name: settings.server_name.clone(),
        reason: e.to_string(),
    })?;
    let provider = provider()?;
    let mut builder = policy(provider.clone())
        .with_roots_cas(root_store(&settings.roots)?)
        .with_server_name(settings.server_name.clone());
    if let Some(identity) = &settings.identity {
        builder = builder.with_certificates(vec![certificate(identity, &provider)?]);
    }
    builder
        .build(true, None)
        .map_err(|e| SettingsError::Config(e.to_string()))
}

fn server_config(settings: &ServerSettings) -> Result<HandshakeConfig, SettingsError> {
    let provider = provider()?;
    let mut builder = policy(provider.clone())
        .with_certificates(vec![certificate(&settings.identity, &provider)?]);
    if let Some(roots) = &settings.client_roots {
        builder = builder
            .with_client_auth(ClientAuthType::RequireAndVerifyClientCert)
            .with_client_cas(root_store(roots)?);
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
    if m.contains("UnknownIssuer") || m.contains("CaUsedAsEndEntity") {
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

impl RtcEngine {
    fn new(server: Option<Arc<HandshakeConfig>>, client: Option<Arc<HandshakeConfig>>) -> Self {
        // rtc-dtls only copies the local address into its transmit metadata, which we ignore.
        let local = SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0));
        RtcEngine {
            endpoint: Endpoint::new(local, TransportProtocol::UDP, server),
            client_config: client,
            established: HashSet::new(),
            transmits: VecDeque::new(),
        }
    }

    /// An engine that connects to servers.
    pub fn client(settings: &ClientSettings) -> Result<Self, SettingsError> {
        Ok(Self::new(None, Some(Arc::new(client_config(settings)?))))
    }

    /// An engine that accepts clients.
    pub fn server(settings: &ServerSettings) -> Result<Self, SettingsError> {
        Ok(Self::new(Some(Arc::new(server_config(settings)?)), None))
    }

    /// New material for handshakes from now on; live associations keep theirs.
    pub fn replace_server_settings(
        &mut self,
        settings: &ServerSettings,
    ) -> Result<(), SettingsError> {
        let config = server_config(settings)?;
        self.endpoint.set_server_config(Some(Arc::new(config)));
        Ok(())
    }

    fn drain_endpoint(&mut self) {
        while let Some(message) = self.endpoint.poll_transmit() {
            self.transmits.push_back(Transmit {
                peer: message.transport.peer_addr,
                datagram: message.message,
            });
        }
    }

    /// Removes an association rtc-dtls would keep, without the close_notify its `stop` queues:
    /// after a failure the peer has had its alert already.
    fn drop_silently(&mut self, now: Instant, peer: SocketAddr) {
        self.drain_endpoint();
        self.endpoint.stop(now, peer);
        while self.endpoint.poll_transmit().is_some() {}
        self.established.remove(&peer);
    }

    fn identity_of(&self, peer: SocketAddr) -> PeerIdentity {
        let subject = self
            .endpoint
            .get_connection_state(peer)
            .and_then(|state| state.peer_certificates.first())
            .and_then(|der| crate::pki::summarize(der).ok())
            .map(|summary| summary.subject);
        PeerIdentity { subject }
    }
}

impl DtlsEngine for RtcEngine {
    fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<(), SendError> {
        let config = self
            .client_config
            .clone()
            .ok_or_else(|| SendError::Engine("a server engine cannot connect".into()))?;
        let result = self.endpoint.connect(now, peer, config, None);
        self.drain_endpoint();
        result.map_err(|e| SendError::Engine(e.to_string()))
    }

    fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        events: &mut Vec<Event>,
    ) {
        let was_established = self.established.contains(&peer);
        let result = self
            .endpoint
            .read(now, peer, None, BytesMut::from(datagram));
        self.drain_endpoint();
        match result {
            Ok(happened) => {
                for event in happened {
                    match event {
                        EndpointEvent::HandshakeComplete => {
                            self.established.insert(peer);
                            events.push(Event::Established {
                                peer,
                                identity: self.identity_of(peer),
                            });
                        }
                        EndpointEvent::ApplicationData(payload) => {
                            events.push(Event::Data { peer, payload })
                        }
                        EndpointEvent::PeerClosed => {
                            self.established.remove(&peer);
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
            Err(RtcError::ErrInvalidPacketLength) => {}
            Err(RtcError::NoServerConfig) => {}
            Err(err) if was_established => {
                // Only an authenticated fatal alert ends an established association: forged
                // plaintext in the old epoch never gets this far (rtc-dtls drops it).
                if matches!(err, RtcError::ErrAlertFatalOrClose) {
                    self.drop_silently(now, peer);
                    events.push(Event::Closed {
                        peer,
                        reason: "peer sent a fatal alert".into(),
                    });
                }
            }
            Err(err) => {
                // rtc-dtls leaves a failed handshake stuck in its table: remove it.
                self.drop_silently(now, peer);
                events.push(Event::Failed {
                    peer,
                    failure: classify(&err),
                });
            }
        }
    }

    fn send(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) -> Result<(), SendError> {
        if !self.knows(peer) {
            return Err(SendError::NoAssociation(peer));
        }
        if !self.established.contains(&peer) {
            return Err(SendError::NotEstablished(peer));
        }
        let result = self.endpoint.write(now, peer, payload);
        self.drain_endpoint();
        result.map_err(|e| SendError::Engine(e.to_string()))
    }

    fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    fn poll_timeout(&self, peer: SocketAddr) -> Option<Instant> {
        self.endpoint.poll_timeout(&peer)
    }

    fn handle_timeout(&mut self, now: Instant, peer: SocketAddr, events: &mut Vec<Event>) {
        let result = self.endpoint.handle_timeout(peer, now);
        self.drain_endpoint();
        if let Err(err) = result {
            if matches!(err, RtcError::InvalidRemoteAddress(_)) {
                return;
            }
            self.drop_silently(now, peer);
            let failure = match err {
                // Retransmissions exhausted: the peer never answered.
                RtcError::ErrInvalidFsmTransition => Failure::HandshakeTimeout,
                other => classify(&other),
            };
            events.push(Event::Failed { peer, failure });
        }
    }

    fn close(&mut self, now: Instant, peer: SocketAddr) {
        self.endpoint.stop(now, peer);
        self.established.remove(&peer);
        self.drain_endpoint();
    }

    fn forget(&mut self, now: Instant, peer: SocketAddr) {
        self.drop_silently(now, peer);
    }

    fn knows(&self, peer: SocketAddr) -> bool {
        self.endpoint.get_connection_state(peer).is_some()
    }

    fn is_established(&self, peer: SocketAddr) -> bool {
        self.established.contains(&peer)
    }

    fn associations(&self) -> usize {
        self.endpoint.get_connections_keys().len()
    }

    fn peers(&self) -> Vec<SocketAddr> {
        self.endpoint.get_connections_keys().copied().collect()
    }
}
