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
//!
//! A DTLS association is bound to its 4-tuple. On a socket bound to a wildcard address the
//! shell says which local address each datagram was sent to ([`Endpoint::handle_datagram_to`]);
//! the one a peer's ClientHello came to is the association's, and every datagram to that peer
//! names it ([`Transmit::local`]) so that the shell sends from it: a client's connected socket
//! drops a reply from any other source.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tracing::{debug, warn};

use crate::admission::{Admission, AuditLimiter, Expiry, Limits, Refusal};
use crate::engine::{
    DtlsEngine, Engine, Event, Failure, PeerIdentity, ServerSettings, SettingsError,
};
use crate::forward::{Departure, Forward, ReplyFate, ReplyStamp};
use crate::ntp::{self, BuiltinSource, NtpTimestamp};
use crate::stats::{Counter, RttGauge, Stats};
use crate::time_server_tx::NextHop;

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
    /// The source address to send from (to a peer: the local address its association's
    /// ClientHello was sent to); None when the shell did not say, or to the time server: the
    /// kernel's choice.
    pub local: Option<IpAddr>,
    /// On a forwarded request or a reply: to be reported with the datagram's kernel transmit
    /// timestamp ([`Endpoint::departed`]).
    pub departure: Option<Departure>,
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
    /// The relay's own query about a held reply ([`crate::time_server_tx`]), not a client's
    /// request: not counted as forwarded, its departure not measured.
    query: bool,
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
    /// WARN lines for the pre-parser's refusals, apart from the handshake audit lines.
    defence_limiter: AuditLimiter,
    forward: Forward<SocketAddr>,
    source: TimeSource,
    upstream: UpstreamHealth,
    stats: Arc<Stats>,
    /// Handshake retransmission deadlines, per peer. Entries may be stale: the engine's own
    /// poll_timeout is checked when one comes due.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
    /// The local address each peer's association was opened on, when the shell gave one.
    /// Entries of peers the engine forgot are swept when the map outgrows the associations.
    locals: HashMap<SocketAddr, IpAddr>,
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
        let mut forward = Forward::new(PENDING_CAPACITY, PENDING_TTL, stats.clone(), rtt);
        forward.set_time_server_tx(matches!(source, TimeSource::Forward), NextHop::TimeServer);
        Ok(Endpoint {
            engine: Engine::server(settings)?,
            admission: Admission::new(limits),
            audit_limiter: AuditLimiter::new(AUDIT_RATE, AUDIT_BURST),
            defence_limiter: AuditLimiter::new(AUDIT_RATE, AUDIT_BURST),
            forward,
            source,
            upstream: UpstreamHealth::default(),
            stats,
            timers: BinaryHeap::new(),
            locals: HashMap::new(),
            to_time_server: VecDeque::new(),
            to_peers: VecDeque::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            expired: Vec::new(),
        })
    }

    /// Turns the residence correction of forwarded replies on or off (docs/TIMESTAMPS.md),
    /// and with it the measuring of the time server's transmit times for basic replies
    /// ([`crate::time_server_tx`]). The builtin source always stamps its own receive and
    /// transmit times.
    pub fn set_timestamp_correction(&mut self, on: bool) {
        self.forward.set_correction(on);
        self.forward.set_time_server_tx(
            on && matches!(self.source, TimeSource::Forward),
            NextHop::TimeServer,
        );
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

    /// A datagram from `peer`, received at `rx`, on a socket whose local address is fixed (or
    /// unknown): the kernel's choice of source address is the right one.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        rx: SystemTime,
        peer: SocketAddr,
        datagram: &[u8],
    ) {
        self.handle_datagram_to(now, rx, peer, None, datagram)
    }

    /// A datagram from `peer` to the local address `local` (IP_PKTINFO on a socket bound to a
    /// wildcard address), received at `rx`. What goes back to the peer leaves from the address
    /// its ClientHello came to ([`Transmit::local`]).
    pub fn handle_datagram_to(
        &mut self,
        now: Instant,
        rx: SystemTime,
        peer: SocketAddr,
        local: Option<IpAddr>,
        datagram: &[u8],
    ) {
        // An established association's records take one admission look-up, whose activity
        // mark is kept for after the engine (the common case); the rest take the full path.
        let admitted = match self.admission.admit_established(now, peer, datagram) {
            Some(verdict) => verdict.map(Some),
            None => self
                .admission
                .admit_datagram(now, peer, datagram)
                .map(|()| None),
        };
        let activity = match admitted {
            Ok(activity) => activity,
            Err(refusal) => {
                self.refuse_datagram(now, peer, datagram.len(), refusal);
                if refusal == Refusal::HandshakeBytes {
                    self.engine.abandon_handshake(now, peer);
                    self.admission.handshake_failed(peer);
                    self.drain_engine(now);
                }
                return;
            }
        };
        let mut events = std::mem::take(&mut self.scratch);
        // The engine's timeout for the peer is taken with the datagram (what `schedule` would
        // ask it after drain_engine, which leaves the engine's associations as they are).
        let Some(timeout) = self
            .engine
            .receive_then_poll_timeout(now, peer, datagram, &mut events)
        else {
            self.stats.incr(Counter::DropNotHandshake);
            self.admission.removed(peer);
            self.scratch = events;
            return;
        };
        // Authenticated application data is the association's activity. Without a mark (a
        // datagram that completed a handshake and carried data) it is recorded by look-up.
        let data = events.iter().any(|e| matches!(e, Event::Data { .. }));
        match activity {
            Some(activity) if data => activity.record(now),
            None if data => self.admission.activity(now, peer),
            _ => {}
        }
        if crate::record::is_client_hello(datagram) {
            // Before drain_engine: the ServerHello already leaves from this address.
            self.bind_local(peer, local);
        }
        self.drain_engine(now);
        if let Some(due) = timeout {
            self.timers.push(Reverse((due, peer)));
        }
        for event in events.drain(..) {
            match event {
                Event::Data { peer, payload } => {
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
        let (route, datagram) = match self.forward.time_server_reply(now, rx, &mut datagram) {
            ReplyFate::Route(route) => (route, datagram),
            ReplyFate::Held { query } => {
                // The reply waits for the time server to say when it sent it.
                self.upstream_answered(now);
                self.stats.incr(Counter::TimeServerTxQueries);
                self.to_time_server.push_back(QueuedRequest {
                    transmit: ntp::check_request(&query).map_or(0, |q| q.transmit.0),
                    datagram: BytesMut::from(&query[..]),
                    query: true,
                });
                return;
            }
            ReplyFate::Released { route, reply } => (route, BytesMut::from(&reply[..])),
            ReplyFate::Dropped => return,
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
        if let Some((route, reply)) = self.forward.release_overdue(now) {
            self.to_peers.push_back(ToPeer::Reply {
                peer: route.to,
                datagram: BytesMut::from(&reply[..]),
                stamp: route.stamp,
            });
        }
        while let Some(Reverse((due, peer))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            if self.engine.poll_timeout(peer).is_some_and(|due| due <= now) {
                let mut events = std::mem::take(&mut self.scratch);
                self.engine.handle_timeout(now, peer, &mut events);
                self.drain_engine(now);
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
        self.drain_engine(now);
    }

    // ----------------------------------------------------------------------------------------
    // Output
    // ----------------------------------------------------------------------------------------

    /// The next request for the time server, if any (what [`Endpoint::poll_transmit`] would
    /// return first): a shell sends these before it finishes replies, so a reply's transmit
    /// time is not taken before a system call it then waits behind.
    #[inline]
    pub fn poll_request(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit> {
        // Inlined emptiness test: with the builtin source, or between requests, the shell's
        // per-pass calls cost no call (callgrind: 36 instructions a reply, once the query
        // branch below made the whole function too large to inline).
        if self.to_time_server.is_empty() {
            return None;
        }
        self.next_request(now, wall)
    }

    fn next_request(&mut self, now: Instant, wall: SystemTime) -> Option<Transmit> {
        let request = self.to_time_server.pop_front()?;
        if request.query {
            return Some(Transmit {
                destination: Destination::TimeServer,
                datagram: request.datagram,
                ntp: false,
                local: None,
                departure: None,
            });
        }
        let departure = self.forward.request_sent(now, wall, request.transmit);
        self.upstream_asked(now);
        Some(Transmit {
            destination: Destination::TimeServer,
            datagram: request.datagram,
            ntp: true,
            local: None,
            departure: Some(departure),
        })
    }

    /// A datagram sent for a [`Transmit`]'s `departure` left at `transmitted` (its kernel
    /// transmit timestamp, checked by the shell to lie between the departure's clock read and
    /// the end of the send): see [`Forward::departed`].
    /// A buffer the caller is done with (a datagram sent): the DTLS engine may decrypt a
    /// later datagram into it.
    pub fn recycle(&mut self, buffer: BytesMut) {
        self.engine.recycle(buffer);
    }

    pub fn departed(&mut self, departure: &Departure, transmitted: SystemTime) -> bool {
        self.forward.departed(departure, transmitted)
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
                    let sent = self.forward.reply_sent(now, wall, &mut datagram, &stamp);
                    self.send_reply(now, peer, &datagram, sent.departure);
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
                    // T3 at the wire: the clock read plus the send lag of earlier replies.
                    let departure = self.forward.own_reply_departure(wall, received);
                    match source.reply(
                        &request,
                        NtpTimestamp::from_system_time(received),
                        NtpTimestamp::from_system_time(self.forward.predicted_departure(wall)),
                    ) {
                        Ok(reply) => {
                            // Answered in-process: the builtin time source's "forwarding".
                            self.stats.incr(Counter::RequestsForwarded);
                            // The request has been read: its buffer can hold the reply's record.
                            self.send_reply_reusing(now, peer, &reply, request, departure)
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
                        query: false,
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
            self.drain_engine(now);
        }
    }

    fn send_reply(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        departure: Departure,
    ) {
        self.send_reply_reusing(now, peer, datagram, BytesMut::new(), departure)
    }

    /// [`Endpoint::send_reply`], the record made in `buffer` where the engine can.
    fn send_reply_reusing(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
        buffer: BytesMut,
        departure: Departure,
    ) {
        match self.engine.send_reusing(now, peer, datagram, buffer) {
            // No admission.activity here: idleness is the peer's silence, and its request
            // has just counted.
            Ok(()) => {
                while let Some(transmit) = self.engine.poll_transmit() {
                    self.transmits.push_back(Transmit {
                        destination: Destination::Peer(transmit.peer),
                        local: self.local_of(transmit.peer),
                        datagram: transmit.datagram,
                        ntp: true,
                        departure: Some(departure),
                    });
                }
            }
            Err(error) => {
                self.stats.incr(Counter::DropNoAssociation);
                debug!(%peer, %error, "reply dropped");
            }
        }
    }

    /// Counts a refused datagram by reason; the pre-parser's refusals (someone probing the
    /// relay's defences) get a WARN line each at most at the audit rate, the flood limits'
    /// (garbage, floods of ClientHellos) a debug line.
    fn refuse_datagram(&mut self, now: Instant, peer: SocketAddr, len: usize, refusal: Refusal) {
        self.stats.incr(refusal.counter());
        if refusal.is_defence() {
            if let Some(suppressed) = self.defence_limiter.allow(now) {
                warn!(%peer, len, reason = refusal.label(), suppressed, "datagram refused");
                return;
            }
        }
        debug!(%peer, len, reason = refusal.label(), "datagram dropped");
    }

    fn drain_engine(&mut self, now: Instant) {
        while let Some(transmit) = self.engine.poll_transmit() {
            if let Err(refusal) = self.admission.outbound(transmit.peer, &transmit.datagram) {
                self.refuse_datagram(now, transmit.peer, transmit.datagram.len(), refusal);
                continue;
            }
            self.transmits.push_back(Transmit {
                destination: Destination::Peer(transmit.peer),
                local: self.local_of(transmit.peer),
                datagram: transmit.datagram,
                ntp: false,
                departure: None,
            });
        }
    }

    /// Fixes the local address of `peer`'s association (a ClientHello opens or replaces it).
    fn bind_local(&mut self, peer: SocketAddr, local: Option<IpAddr>) {
        match local {
            Some(local) => {
                self.locals.insert(peer, local);
                // Amortised sweep: the map stays within twice the associations held.
                if self.locals.len() > 2 * self.admission.associations() + 64 {
                    let engine = &self.engine;
                    self.locals.retain(|peer, _| engine.knows(*peer));
                }
            }
            None => {
                self.locals.remove(&peer);
            }
        }
    }

    fn local_of(&self, peer: SocketAddr) -> Option<IpAddr> {
        if self.locals.is_empty() {
            return None;
        }
        self.locals.get(&peer).copied()
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
        self.drain_engine(now);
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
