//! Our DTLS interface: a sans-I/O engine that holds every association of one UDP socket.
//!
//! The relays talk only to the types in this file. The one implementation today, [`rtc`], wraps
//! rtc-dtls and is the only place that names rtc_dtls types; a second engine (DTLS 1.3, say) can
//! be added beside it without touching the relay logic.
//!
//! Like quinn-proto, an engine owns no socket and reads no clock: the caller feeds it datagrams
//! with the time they arrived, sends what [`DtlsEngine::poll_transmit`] hands back, and calls
//! [`DtlsEngine::handle_timeout`] when a peer's [`DtlsEngine::poll_timeout`] is due.

pub mod rtc;

use std::fmt;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use rustls_pki_types::CertificateDer;

pub use crate::identity::Identity;
pub use crate::verify::Verification;

pub use rtc::RtcEngine;

/// The engine the relays use.
pub type Engine = RtcEngine;

/// The cipher suites both sides offer and accept (the server uses the one its key signs):
/// ECDHE for forward secrecy, ECDSA or RSA certificates, AES-128-GCM. The whole policy, with
/// groups, key sizes and signature schemes, is [`crate::policy`].
pub const CIPHER_SUITE: &str =
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 or TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256";

/// What a client-role engine needs: whom it trusts, whom it expects, and what it shows.
#[derive(Clone)]
pub struct ClientSettings {
    /// Trust anchors for the server's chain.
    pub roots: Vec<CertificateDer<'static>>,
    /// Reference identifier checked against the server certificate's DNS or IP SANs.
    pub server_name: String,
    /// Presented when the server asks for a client certificate (mutual authentication).
    pub identity: Option<Identity>,
    /// Revocation and the wall clock the server's chain is judged by ([`crate::verify`]).
    pub verification: Verification,
}

/// What a server-role engine needs.
#[derive(Clone)]
pub struct ServerSettings {
    pub identity: Identity,
    /// With roots, every client must present a certificate chaining to them.
    pub client_roots: Option<Vec<CertificateDer<'static>>>,
    /// Revocation and the wall clock client chains are judged by ([`crate::verify`]).
    pub verification: Verification,
}

/// Why an engine could not be built from settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    /// The key or our own certificate cannot be used under the policy
    /// (ECDSA P-256, ECDSA P-384, RSA 2048-4096 bits).
    #[error("the private key cannot be used: {0}")]
    Key(String),
    #[error("no trust anchor could be used: {0}")]
    Roots(String),
    #[error("invalid server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
    #[error("DTLS configuration rejected: {0}")]
    Config(String),
}

/// Why an operation on one association failed. The association's state is unchanged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SendError {
    #[error("no association with {0}")]
    NoAssociation(SocketAddr),
    #[error("association with {0} is not established")]
    NotEstablished(SocketAddr),
    #[error("DTLS engine refused the operation: {0}")]
    Engine(String),
}

/// Why an association never came up or went down. Stable labels for logs and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The peer's chain does not lead to a trusted CA (or is self-signed, or an issuer is no CA).
    UnknownCa(String),
    /// The certificate's SANs do not contain the reference identifier.
    NameMismatch(String),
    Expired(String),
    NotYetValid(String),
    /// Wrong extended key usage (serverAuth / clientAuth) or key usage.
    WrongUsage(String),
    /// Some other certificate problem (bad signature, unsupported algorithm, ...).
    BadCertificate(String),
    /// A certificate the peer presented (or its handshake signature) is outside the declared
    /// key policy: another key type or curve, an RSA modulus outside 2048-4096 bits, a
    /// signature algorithm other than ECDSA/RSA-PKCS#1 with SHA-256/384. Says which and why.
    KeyPolicy(String),
    /// A certificate of the chain is listed in its issuer's CRL.
    Revoked(String),
    /// Revocation status could not be established as `revocation` requires (no CRL for an
    /// issuer, an expired one, one not signed by the issuer or by an issuer without cRLSign).
    RevocationUnknown(String),
    /// Mutual authentication is on and the client sent no certificate.
    NoClientCertificate,
    /// The peer offered no cipher suite or curve we accept.
    NoSharedCipher,
    /// The peer does not support the extended master secret (RFC 7627).
    NoExtendedMasterSecret,
    /// The peer offered a protocol version other than DTLS 1.2.
    ProtocolVersion,
    /// The peer rejected us with a fatal alert.
    PeerAlert(String),
    /// The peer never completed the handshake in time.
    HandshakeTimeout,
    Other(String),
}

impl Failure {
    /// A stable snake_case label for metrics and log fields.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::UnknownCa(_) => "unknown_ca",
            Failure::NameMismatch(_) => "name_mismatch",
            Failure::Expired(_) => "expired",
            Failure::NotYetValid(_) => "not_yet_valid",
            Failure::WrongUsage(_) => "wrong_usage",
            Failure::BadCertificate(_) => "bad_certificate",
            Failure::KeyPolicy(_) => "key_policy",
            Failure::Revoked(_) => "revoked",
            Failure::RevocationUnknown(_) => "revocation_unknown",
            Failure::NoClientCertificate => "no_client_certificate",
            Failure::NoSharedCipher => "no_shared_cipher",
            Failure::NoExtendedMasterSecret => "no_extended_master_secret",
            Failure::ProtocolVersion => "protocol_version",
            Failure::PeerAlert(_) => "peer_alert",
            Failure::HandshakeTimeout => "handshake_timeout",
            Failure::Other(_) => "other",
        }
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::UnknownCa(d) => write!(f, "certificate not issued by a trusted CA ({d})"),
            Failure::NameMismatch(d) => write!(f, "certificate name mismatch ({d})"),
            Failure::Expired(d) => write!(f, "certificate expired ({d})"),
            Failure::NotYetValid(d) => write!(f, "certificate not yet valid ({d})"),
            Failure::WrongUsage(d) => write!(f, "certificate not valid for this purpose ({d})"),
            Failure::BadCertificate(d) => write!(f, "bad certificate ({d})"),
            Failure::KeyPolicy(d) => write!(f, "certificate outside the key policy ({d})"),
            Failure::Revoked(d) => write!(f, "certificate revoked ({d})"),
            Failure::RevocationUnknown(d) => {
                write!(f, "certificate revocation status unknown ({d})")
            }
            Failure::NoClientCertificate => write!(f, "client presented no certificate"),
            Failure::NoSharedCipher => write!(
                f,
                "no shared cipher suite, group or signature scheme ({})",
                crate::policy::SUMMARY
            ),
            Failure::NoExtendedMasterSecret => {
                write!(f, "peer does not support the extended master secret")
            }
            Failure::ProtocolVersion => write!(f, "protocol version other than DTLS 1.2"),
            Failure::PeerAlert(d) => write!(f, "peer sent a fatal alert ({d})"),
            Failure::HandshakeTimeout => write!(f, "handshake timed out"),
            Failure::Other(d) => write!(f, "{d}"),
        }
    }
}

/// Who the peer proved to be.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerIdentity {
    /// Subject of the peer's leaf certificate; None when it presented none.
    pub subject: Option<String>,
    /// The cipher suite the association uses (the one the server's key signs).
    pub cipher_suite: &'static str,
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.subject.as_deref().unwrap_or("-"))
    }
}

/// What happened on an association. The engine has already dropped its state for `Failed` and
/// `Closed`.
#[derive(Debug)]
pub enum Event {
    Established {
        peer: SocketAddr,
        identity: PeerIdentity,
    },
    /// One decrypted DTLS record: with us, exactly one NTP datagram.
    Data { peer: SocketAddr, payload: BytesMut },
    /// The handshake failed, locally or at the peer.
    Failed { peer: SocketAddr, failure: Failure },
    /// An established association ended: the peer closed it, or sent a fatal alert.
    Closed { peer: SocketAddr, reason: String },
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    pub peer: SocketAddr,
    pub datagram: BytesMut,
}

/// A DTLS engine for one UDP socket, in one role.
pub trait DtlsEngine {
    /// Starts a handshake with `peer` (client role).
    fn connect(&mut self, now: Instant, peer: SocketAddr) -> Result<(), SendError>;
    /// Feeds one datagram received from `peer`. Problems are reported as events, or dropped
    /// silently as RFC 6347 §4.1.2.7 asks for invalid records. Returns false when the datagram
    /// was dropped without creating state: in the server role, only a ClientHello (see
    /// [`crate::record::is_client_hello`]) may open an association for an unknown address.
    fn receive(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        events: &mut Vec<Event>,
    ) -> bool;
    /// [`DtlsEngine::receive`], then (unless that returned false: None)
    /// [`DtlsEngine::poll_timeout`] for `peer`, in one call, which an engine may answer with
    /// fewer look-ups of `peer`.
    fn receive_then_poll_timeout(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        events: &mut Vec<Event>,
    ) -> Option<Option<Instant>> {
        if !self.receive(now, peer, datagram, events) {
            return None;
        }
        Some(self.poll_timeout(peer))
    }
    /// Queues one application datagram to `peer` as one record.
    fn send(&mut self, now: Instant, peer: SocketAddr, payload: &[u8]) -> Result<(), SendError>;
    /// [`DtlsEngine::send`], with a buffer the caller is done with (its contents are discarded)
    /// that an engine may make the datagram in, saving an allocation.
    fn send_reusing(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        payload: &[u8],
        buffer: BytesMut,
    ) -> Result<(), SendError> {
        drop(buffer);
        self.send(now, peer, payload)
    }
    /// A buffer the caller is done with (a datagram sent), that an engine may decrypt a later
    /// datagram's data into, saving an allocation. Its contents are discarded.
    fn recycle(&mut self, buffer: BytesMut) {
        drop(buffer);
    }
    /// The next datagram to put on the wire.
    fn poll_transmit(&mut self) -> Option<Transmit>;
    /// When `peer` next needs [`DtlsEngine::handle_timeout`] (handshake retransmission).
    fn poll_timeout(&self, peer: SocketAddr) -> Option<Instant>;
    fn handle_timeout(&mut self, now: Instant, peer: SocketAddr, events: &mut Vec<Event>);
    /// Ends an association with a close_notify.
    fn close(&mut self, now: Instant, peer: SocketAddr);
    /// Forgets an association without a word to the peer (half-open timeouts, evictions).
    fn forget(&mut self, now: Instant, peer: SocketAddr);
    /// Drops a handshake in progress with `peer` (a first one, or one that would replace its
    /// established association), leaving an established association alone.
    fn abandon_handshake(&mut self, now: Instant, peer: SocketAddr);
    fn knows(&self, peer: SocketAddr) -> bool;
    fn is_established(&self, peer: SocketAddr) -> bool;
    /// Associations held, established or not.
    fn associations(&self) -> usize;
    /// Addresses of every association held.
    fn peers(&self) -> Vec<SocketAddr>;
}

/// A chain our policy refused ([`crate::verify`]): revocation outcomes keep their own labels,
/// a usage or CA rule is `wrong_usage`, a path webpki would not build `bad_certificate`.
impl From<crate::verify::Refusal> for Failure {
    fn from(refusal: crate::verify::Refusal) -> Failure {
        use crate::verify::Problem;
        let detail = refusal.to_string();
        match &refusal.problem {
            Problem::Revoked { .. } => Failure::Revoked(detail),
            problem if problem.is_revocation() => Failure::RevocationUnknown(detail),
            Problem::Chain(_) | Problem::Malformed(_) => Failure::BadCertificate(detail),
            _ => Failure::WrongUsage(detail),
        }
    }
}
