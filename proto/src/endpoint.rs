//! The server relay's endpoint: every DTLS association of one listening socket, and the one
//! path to the time server they share, as a state machine.
//!
//! Like quinn-proto's `Endpoint`, it owns no socket and reads no clock. The shell feeds it
//! datagrams from peers ([`Endpoint::handle_datagram`]) and from the time server
//! ([`Endpoint::handle_time_server_reply`], [`Endpoint::handle_time_server_error`]), calls
//! [`Endpoint::handle_timeout`] when [`Endpoint::poll_timeout`] is due, sends what
//! [`Endpoint::poll_transmit`] hands back and logs what [`Endpoint::poll_event`] reports.
//! Inside, in step: admission (who may hold state, how much, how long: rtc-dtls bounds none of
//! it), the DTLS engine and its retransmission timers, the forward path with its pending table
//! (replies matched by origin timestamp to the peer that asked), and the time server's health.
//!
//! Only NTP client requests (mode 3) are forwarded: the relay never opens chronyd's control
//! surface (modes 6 and 7) to the network. A keepalive probe from an established peer
//! ([`crate::ntp::keepalive`]) is answered here, with the same bytes, never forwarded: that is
//! how a client relay tells "association dead" from "time server down".

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tracing::debug;

use crate::admission::{Admission, Arrival, AuditLimiter, Expiry, Limits, Refusal};
use crate::engine::{
    DtlsEngine, Engine, Event, Failure, PeerIdentity, ServerSettings, SettingsError,
};
use crate::forward::{Forward, ReplyStamp};
use crate::ntp::{self, BuiltinSource, NtpTimestamp};
use crate::record;
use crate::stats::{Counter, RttGauge, Stats};

/// Requests in flight to the time server at once; chronyd answers within microseconds, so this
/// only fills when the time server is down.
pub const PENDING_CAPACITY: usize = 65_536;
/// chronyd answers at once or never: a request unanswered after this is lost.
pub const PENDING_TTL: Duration = Duration::from_secs(2);
/// Refusal audit lines per second, sustained and in a burst; beyond that they are counted and
/// the count rides on the next line written.
const AUDIT_RATE: f64 = 20.0;
const AUDIT_BURST: f64 = 200.0;
/// The time server is down when this many requests in a row got no reply within
/// [`PENDING_TTL`], or when it answers with an ICMP error.
const UPSTREAM_DOWN_AFTER: u32 = 3;

/// Where requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeSource {
    /// A real time server (chronyd), through the shell's socket.
    Forward,
    /// This host's clock, answered in-process.
    Builtin(BuiltinSource),
}

/// Where a [`Transmit`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Peer(SocketAddr),
    TimeServer,
}

/// A datagram to send.
#[derive(Debug)]
pub struct Transmit {
    pub destination: Destination,
    pub datagram: BytesMut,
    /// A forwarded NTP request or an NTP reply (the rest is handshake, keepalive and alert
    /// traffic), for the shell's counters.
    pub ntp: bool,
}

/// Whether an event deserves its audit line now: refusals from the open network are capped,
/// so a flood of them does not become a flood of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Audit {
    /// Write it; `suppressed` lines were held back before it.
    Log { suppressed: u64 },
    /// Over the rate: a debug line at most (it is counted all the same).
    Quiet,
}

/// What an operator (and an evaluator) reads about.
#[derive(Debug, Clone, PartialEq)]
pub enum EndpointEvent {
    Established {
        peer: SocketAddr,
        identity: PeerIdentity,
    },
    Refused {
        peer: SocketAddr,
        failure: Failure,
        audit: Audit,
    },
    Closed {
        peer: SocketAddr,
        reason: &'static str,
    },
    /// The time server stopped answering (`cause` says how we know).
    UpstreamDown {
        cause: String,
    },
    UpstreamBack {
        down_for: Duration,
    },
}

/// Plaintext waiting to be finished (stamped) and encrypted at the moment it leaves.
enum ToPeer {
    Reply {
        peer: SocketAddr,
        datagram: BytesMut,
        stamp: ReplyStamp,
    },
    Builtin {
        peer: SocketAddr,
        request: BytesMut,
        received: SystemTime,
    },
}

struct QueuedRequest {
    transmit: u64,
    datagram: BytesMut,
}

#[derive(Debug, Default)]
struct UpstreamHealth {
    down_since: Option<Instant>,
    unanswered: u32,
    oldest_unanswered: Option<Instant>,
}

pub struct Endpoint {
    engine: Engine,
    admission: Admission,
    audit_limiter: AuditLimiter,
    forward: Forward<SocketAddr>,
    source: TimeSource,
    upstream: UpstreamHealth,
    stats: Arc<Stats>,
    /// Handshake retransmission deadlines, per peer. Entries may be stale: the engine's own
    /// poll_timeout is checked when one comes due.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    to_time_server: VecDeque<QueuedRequest>,
    to_peers: VecDeque<ToPeer>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<EndpointEvent>,
    scratch: Vec<Event>,
    expired: Vec<Expiry>,
}

impl Endpoint {
    pub fn new(
        settings: &ServerSettings,
        limits: Limits,
        source: TimeSource,
        stats: Arc<Stats>,
        rtt: Arc<RttGauge>,
    ) -> Result<Self, SettingsError> {
        Ok(Endpoint {
            engine: Engine::server(settings)?,
            admission: Admission::new(limits),
            audit_limiter: AuditLimiter::new(AUDIT_RATE, AUDIT_BURST),
            forward: Forward::new(PENDING_CAPACITY, PENDING_TTL, stats.clone(), rtt),
            source,
            upstream: UpstreamHealth::default(),
            stats,
            timers: BinaryHeap::new(),
            to_time_server: VecDeque::new(),
            to_peers: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            expired: Vec::new(),
        })
    }

    /// Turns the residence correction of forwarded replies on or off (docs/TIMESTAMPS.md).
    /// The builtin source always stamps its own receive and transmit times.
    pub fn set_timestamp_correction(&mut self, on: bool) {
        self.forward.set_correction(on);
    }

    /// Where residence times and correction outcomes are reported.
    pub fn set_timestamp_observer(&mut self, observer: Arc<dyn crate::residence::Observer>) {
        self.forward.set_observer(observer);
    }

    /// New material for handshakes from now on; live associations keep theirs.
    pub fn replace_settings(&mut self, settings: &ServerSettings) -> Result<(), SettingsError> {
        self.engine.replace_server_settings(settings)
    }

    /// (established, half-open) associations, for the gauges.
    pub fn association_counts(&self) -> (usize, usize) {
        let half_open = self.admission.half_open();
        (
            self.admission.associations().saturating_sub(half_open),
            half_open,
        )
    }

    /// Whether the time server answers (always, for the builtin source).
    pub fn upstream_up(&self) -> bool {
        self.upstream.down_since.is_none()
    }

    // ----------------------------------------------------------------------------------------
    // Input
    // ----------------------------------------------------------------------------------------

    /// A datagram from `peer`, received at `rx`.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        rx: SystemTime,
        peer: SocketAddr,
        datagram: &[u8],
    ) {
        let arrival = if record::is_client_hello(datagram) {
            Arrival::ClientHello
        } else {
            match record::first_record(datagram).map(|r| r.content_type) {
                Some(record::CONTENT_HANDSHAKE | record::CONTENT_CHANGE_CIPHER_SPEC) => {
                    Arrival::Handshake
                }
                _ => Arrival::Other,
            }
        };
        if let Err(refusal) = self.admission.admit(now, peer, datagram.len(), arrival) {
            self.stats.incr(match refusal {
                Refusal::NotClientHello => Counter::DropNotHandshake,
                Refusal::AssociationLimit => Counter::DropAssociationLimit,
                Refusal::HalfOpenLimit => Counter::DropHalfOpenLimit,
                Refusal::SourceRateLimit => Counter::DropSourceRateLimit,
                Refusal::HandshakeBytes => Counter::DropHandshakeBytes,
            });
            if refusal == Refusal::HandshakeBytes {
                self.engine.abandon_handshake(now, peer);
                self.admission.handshake_failed(peer);
                self.drain_engine();
            }
            debug!(%peer, len = datagram.len(), reason = refusal.label(), "datagram dropped");
            return;
        }
        let mut events = std::mem::take(&mut self.scratch);
        if !self.engine.receive(now, peer, datagram, &mut events) {
            self.stats.incr(Counter::DropNotHandshake);
            self.admission.removed(peer);
            self.scratch = events;
            return;
        }
        self.drain_engine();
        self.schedule(peer);
        for event in events.drain(..) {
            match event {
                Event::Data { peer, payload } => {
                    self.admission.activity(now, peer);
                    if ntp::keepalive_nonce(&payload).is_some() {
                        self.keepalive(now, peer, &payload);
                    } else if payload.is_empty() {
                        // An earlier client relay's keepalive: it expects no answer.
                        self.stats.incr(Counter::Keepalives);
                    } else {
                        self.on_request(now, rx, peer, payload);
                    }
                }
                other => self.audit(now, other),
            }
        }
        self.scratch = events;
    }

    /// A reply from the time server, received at `rx`.
    pub fn handle_time_server_reply(&mut self, now: Instant, rx: SystemTime, datagram: &[u8]) {
        let mut datagram = BytesMut::from(datagram);
        let Some(route) = self.forward.reply(now, rx, &mut datagram) else {
            return;
        };
        self.upstream_answered(now);
        self.to_peers.push_back(ToPeer::Reply {
            peer: route.to,
            datagram,
            stamp: route.stamp,
        });
    }

    /// An error on the socket to the time server: ICMP port unreachable when it is not
    /// running.
    pub fn handle_time_server_error(&mut self, now: Instant, error: &str) {
        self.stats.incr(Counter::UpstreamUnreachable);
        self.upstream_failed(now, format!("time server unreachable ({error})"));
    }

    /// Time passed: retransmissions and expiries due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.forward.expire(now);
        while let Some(Reverse((due, peer))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            if self.engine.poll_timeout(peer).is_some_and(|due| due <= now) {
                let mut events = std::mem::take(&mut self.scratch);
                self.engine.handle_timeout(now, peer, &mut events);
                self.drain_engine();
                self.schedule(peer);
                for event in events.drain(..) {
                    self.audit(now, event);
                }
                self.scratch = events;
            }
        }
        let mut expired = std::mem::take(&mut self.expired);
        self.admission.expire(now, &mut expired);
        for expiry in expired.drain(..) {
            self.on_expiry(now, expiry);
        }
        self.expired = expired;
        if let Some(oldest) = self.upstream.oldest_unanswered {
            if self.upstream.unanswered >= UPSTREAM_DOWN_AFTER && oldest + PENDING_TTL <= now {
                let cause = format!("no reply to the last {} requests", self.upstream.unanswered);
                self.upstream_failed(now, cause);
            }
        }
    }

    /// Tells every established peer we are going (close_notify), so client relays reconnect at
    /// once when we are back.
    pub fn close_all(&mut self, now: Instant) {
        for peer in self.engine.peers() {
            if self.engine.is_established(peer) {
                self.engine.close(now, peer);
                self.stats.incr(Counter::AssociationsClosed);
                self.events.push_back(EndpointEvent::Closed {
                    peer,
                    reason: "shutdown",
                });
            }
        }
        self.drain_engine();
    }

    // ----------------------------------------------------------------------------------------
    // Output
    // ----------------------------------------------------------------------------------------

    /// The next request for the time server, if any (what [`Endpoint::poll_transmit`] would
    /// return first): a shell sends these before it finishes replies, so a reply's transmit
    /// time is not taken before a system call it then waits behind.
    pub fn poll_request(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit> {
        let request = self.to_time_server.pop_front()?;
        self.forward.request_sent(now, wall, request.transmit);
        self.upstream_asked(now);
        Some(Transmit {
            destination: Destination::TimeServer,
            datagram: request.datagram,
            ntp: true,
        })
    }

    /// The next datagram to send. `wall` is read by the shell right before the call: a reply
    /// is finished and encrypted at this moment, and a request's departure noted. Requests to
    /// the time server go first: their replies take longest to come back.
    pub fn poll_transmit(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit> {
        loop {
            if let Some(request) = self.poll_request(now, wall) {
                return Some(request);
            }
            if let Some(transmit) = self.transmits.pop_front() {
                return Some(transmit);
            }
            match self.to_peers.pop_front()? {
                ToPeer::Reply {
                    peer,
                    mut datagram,
                    stamp,
                } => {
                    self.forward.reply_sent(now, wall, &mut datagram, &stamp);
                    self.send_reply(now, peer, &datagram);
                }
                ToPeer::Builtin {
                    peer,
                    request,
                    received,
                } => {
                    let source = match self.source {
                        TimeSource::Builtin(source) => source,
                        TimeSource::Forward => continue,
                    };
                    match source.reply(
                        &request,
                        NtpTimestamp::from_system_time(received),
                        NtpTimestamp::from_system_time(wall),
                    ) {
                        Ok(reply) => {
                            // Answered in-process: the builtin time source's "forwarding".
                            self.stats.incr(Counter::RequestsForwarded);
                            self.send_reply(now, peer, &reply)
                        }
                        Err(rejection) => self.stats.incr(rejection.into()),
                    }
                }
            }
        }
    }

    pub fn poll_event(&mut self) -> Option<EndpointEvent> {
        self.events.pop_front()
    }

    /// When [`Endpoint::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let upstream = self
            .upstream
            .oldest_unanswered
            .filter(|_| self.upstream.unanswered >= UPSTREAM_DOWN_AFTER)
            .map(|oldest| oldest + PENDING_TTL);
        [
            self.timers.peek().map(|Reverse((due, _))| *due),
            self.forward.next_deadline(),
            self.admission.next_deadline(),
            upstream,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    // ----------------------------------------------------------------------------------------
    // Inside
    // ----------------------------------------------------------------------------------------

    /// A request out of an association: checked, then to the time server.
    fn on_request(
        &mut self,
        now: Instant,
        rx: SystemTime,
        peer: SocketAddr,
        mut payload: BytesMut,
    ) {
        match self.source {
            TimeSource::Builtin(_) => match crate::ntp::check_request(&payload) {
                Ok(_) => self.to_peers.push_back(ToPeer::Builtin {
                    peer,
                    request: payload,
                    received: rx,
                }),
                Err(rejection) => {
                    self.stats.incr(rejection.into());
                    debug!(%peer, %rejection, "request dropped");
                }
            },
            TimeSource::Forward => {
                if let Some(request) = self.forward.request(now, rx, peer, &mut payload) {
                    self.to_time_server.push_back(QueuedRequest {
                        transmit: request.transmit.0,
                        datagram: payload,
                    });
                }
            }
        }
    }

    /// The client relay keeping a quiet association warm, or checking it is alive: the probe
    /// back, from us and not the time server, says so.
    fn keepalive(&mut self, now: Instant, peer: SocketAddr, probe: &[u8]) {
        self.stats.incr(Counter::Keepalives);
        if self.engine.send(now, peer, probe).is_ok() {
            self.stats.incr(Counter::KeepaliveAcks);
            self.drain_engine();
        }
    }

    fn send_reply(&mut self, now: Instant, peer: SocketAddr, datagram: &[u8]) {
        match self.engine.send(now, peer, datagram) {
            // No admission.activity here: idleness is the peer's silence, and its request
            // has just counted.
            Ok(()) => {
                while let Some(transmit) = self.engine.poll_transmit() {
                    self.transmits.push_back(Transmit {
                        destination: Destination::Peer(transmit.peer),
                        datagram: transmit.datagram,
                        ntp: true,
                    });
                }
            }
            Err(error) => {
                self.stats.incr(Counter::DropNoAssociation);
                debug!(%peer, %error, "reply dropped");
            }
        }
    }

    fn drain_engine(&mut self) {
        while let Some(transmit) = self.engine.poll_transmit() {
            self.transmits.push_back(Transmit {
                destination: Destination::Peer(transmit.peer),
                datagram: transmit.datagram,
                ntp: false,
            });
        }
    }

    fn schedule(&mut self, peer: SocketAddr) {
        if let Some(due) = self.engine.poll_timeout(peer) {
            self.timers.push(Reverse((due, peer)));
        }
    }

    /// One event per association set up, refused or torn down: what an evaluator reads.
    fn audit(&mut self, now: Instant, event: Event) {
        match event {
            Event::Established { peer, identity } => {
                self.admission.established(now, peer);
                self.stats.incr(Counter::AssociationsEstablished);
                self.events
                    .push_back(EndpointEvent::Established { peer, identity });
            }
            Event::Failed { peer, failure } => {
                self.admission.handshake_failed(peer);
                self.refused(now, peer, failure);
            }
            Event::Closed { peer, reason } => {
                self.admission.removed(peer);
                self.stats.incr(Counter::AssociationsClosed);
                let reason = if reason.contains("close_notify") {
                    "peer sent close_notify"
                } else {
                    "peer sent a fatal alert"
                };
                self.events
                    .push_back(EndpointEvent::Closed { peer, reason });
            }
            Event::Data { .. } => {}
        }
    }

    fn refused(&mut self, now: Instant, peer: SocketAddr, failure: Failure) {
        self.stats.incr(Counter::AssociationsRefused);
        let audit = match self.audit_limiter.allow(now) {
            Some(suppressed) => Audit::Log { suppressed },
            None => Audit::Quiet,
        };
        self.events.push_back(EndpointEvent::Refused {
            peer,
            failure,
            audit,
        });
    }

    fn on_expiry(&mut self, now: Instant, expiry: Expiry) {
        match expiry {
            Expiry::HandshakeTimeout { peer, answered } => {
                self.engine.abandon_handshake(now, peer);
                self.stats.incr(Counter::HandshakeTimeouts);
                if answered {
                    // The peer proved its address and then stalled: a refusal worth a line.
                    self.refused(now, peer, Failure::HandshakeTimeout);
                } else {
                    // A lone ClientHello, possibly spoofed: counted, not logged.
                    debug!(%peer, "half-open handshake expired");
                }
            }
            Expiry::ReplacementTimeout { peer } => {
                self.engine.abandon_handshake(now, peer);
                self.stats.incr(Counter::HandshakeTimeouts);
                debug!(%peer, "replacement handshake expired; the association stays");
            }
            Expiry::Idle { peer } => {
                self.engine.close(now, peer);
                self.stats.incr(Counter::IdleClosed);
                self.stats.incr(Counter::AssociationsClosed);
                self.events.push_back(EndpointEvent::Closed {
                    peer,
                    reason: "idle",
                });
            }
        }
        self.drain_engine();
    }

    fn upstream_asked(&mut self, now: Instant) {
        self.upstream.unanswered = self.upstream.unanswered.saturating_add(1);
        self.upstream.oldest_unanswered.get_or_insert(now);
    }

    fn upstream_answered(&mut self, now: Instant) {
        self.upstream.unanswered = 0;
        self.upstream.oldest_unanswered = None;
        if let Some(since) = self.upstream.down_since.take() {
            self.events.push_back(EndpointEvent::UpstreamBack {
                down_for: now.saturating_duration_since(since),
            });
        }
    }

    fn upstream_failed(&mut self, now: Instant, cause: String) {
        // Counted afresh: the gauge stays down until a reply, the line is written once.
        self.upstream.unanswered = 0;
        self.upstream.oldest_unanswered = None;
        if self.upstream.down_since.is_none() {
            self.upstream.down_since = Some(now);
            self.events.push_back(EndpointEvent::UpstreamDown { cause });
        }
    }
}
