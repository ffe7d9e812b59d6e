//! The client relay's tunnel: one local listener's requests over one persistent DTLS
//! association towards one server relay, as a state machine.
//!
//! Like quinn-proto's `Connection`, a [`Tunnel`] owns no socket and reads no clock. The shell
//! feeds it what arrived ([`Tunnel::handle_request`] from local NTP clients,
//! [`Tunnel::handle_datagram`] and [`Tunnel::handle_unreachable`] from an association's socket,
//! [`Tunnel::resolved`] when a name lookup ends), calls [`Tunnel::handle_timeout`] when
//! [`Tunnel::poll_timeout`] is due, and executes every [`Action`] that [`Tunnel::poll_action`]
//! hands back: resolve the server's name, open a socket for a new association (always from a
//! fresh ephemeral port), send, deliver a reply to a local client, close a socket.
//! [`Tunnel::poll_event`] tells what an operator should read about.
//!
//! Lifecycle, in one place:
//! - **connect**: resolve the name (each time a new association is made, so a changed record is
//!   followed), then handshake with each address in the resolver's order, moving on when one
//!   fails; when all have failed, back off (1 s doubling to 60 s, jittered) and start over.
//! - **up**: requests go through the current association; replies find their requester
//!   through the pending table. The association is judged by DTLS-level evidence
//!   ([`crate::health`]): unanswered requests or an ICMP error start a check with keepalives,
//!   which the server relay acknowledges; acknowledged means the time server behind it is down
//!   (state `upstream_down`, no handshake), unacknowledged means dead.
//! - **dead**: the association drains (late replies still arrive) and a new one is made at
//!   once; repeated deaths back off like refusals.
//! - **rekey** (after a number of records or an age): make before break. A second association
//!   is made beside the current one and takes over when it is up; the old one drains for a
//!   moment. A failed rekey retries on its own backoff and never delays a reconnect.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::BytesMut;
use tracing::{debug, warn};

use crate::admission::{AuditLimiter, HandshakeGuard, HandshakeLimits, Side};
use crate::backoff::Backoff;
use crate::engine::{ClientSettings, DtlsEngine, Engine, Event, Failure, PeerIdentity};
use crate::forward::{Departure, Forward, ReplyFate, ReplyStamp};
use crate::health::{DeathCause, Health, HealthPolicy, Verdict};
use crate::ntp;
use crate::stats::{Counter, RttGauge, Stats};
use crate::time_server_tx::NextHop;

/// Outstanding requests per tunnel. NTP clients poll at most a few times a second each; this
/// leaves room for bursts from many local clients.
pub const PENDING_CAPACITY: usize = 4096;
/// How long a request waits for its reply. ntpdate and sntp give up after a second or two.
pub const PENDING_TTL: Duration = Duration::from_secs(8);
const BACKOFF_INITIAL: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);
/// A replaced association stays this long for replies to requests it carried.
pub const DRAIN: Duration = Duration::from_secs(2);

/// What a tunnel is doing, as the `ntp_dtls_tunnel_state` gauge and `status` show it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TunnelState {
    /// Resolving the server relay's name or handshaking with it; no association yet.
    Connecting,
    /// An association is up and the time server behind it answers.
    Up,
    /// The association is up (the server relay acknowledges keepalives) but NTP requests go
    /// unanswered: the time server behind the server relay is down.
    UpstreamDown,
    /// The last attempt failed (unreachable, timed out, name unresolvable); waiting to retry.
    BackingOff,
    /// The server relay or its certificate was refused (unknown CA, name mismatch, ...);
    /// waiting to retry. Usually needs an operator.
    Refused,
}

impl TunnelState {
    pub const ALL: [TunnelState; 5] = [
        TunnelState::Connecting,
        TunnelState::Up,
        TunnelState::UpstreamDown,
        TunnelState::BackingOff,
        TunnelState::Refused,
    ];

    /// Stable snake_case label for metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            TunnelState::Connecting => "connecting",
            TunnelState::Up => "up",
            TunnelState::UpstreamDown => "upstream_down",
            TunnelState::BackingOff => "backing_off",
            TunnelState::Refused => "refused",
        }
    }

    /// Whether time flows through the tunnel in this state.
    pub fn is_up(self) -> bool {
        self == TunnelState::Up
    }
}

/// Which association of a tunnel a socket belongs to; chosen by the tunnel, used by the shell
/// to tell its sockets apart.
pub type AssociationId = u64;

/// What the shell must do.
#[derive(Debug)]
pub enum Action {
    /// Resolve the server's HOST:PORT and report with [`Tunnel::resolved`].
    Resolve,
    /// Open a UDP socket from a fresh ephemeral port, connected to `peer`, for association
    /// `id`; report a failure with [`Tunnel::open_failed`].
    Open { id: AssociationId, peer: SocketAddr },
    /// Send a datagram on association `id`'s socket. `ntp` marks a forwarded NTP request (the
    /// rest is handshake, keepalive and alert traffic), for the shell's counters.
    /// `departure`, on a forwarded request, is to be reported with the datagram's kernel
    /// transmit timestamp ([`Tunnel::departed`]).
    Send {
        id: AssociationId,
        datagram: BytesMut,
        ntp: bool,
        departure: Option<Departure>,
    },
    /// Send a reply to the local client at `to`; report `departure` as for `Send`.
    Deliver {
        to: SocketAddr,
        datagram: BytesMut,
        departure: Departure,
    },
    /// Close association `id`'s socket: nothing more will be sent on it.
    Close { id: AssociationId },
}

/// Why an established association ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    Dead(DeathCause),
    /// The server relay sent close_notify or a fatal alert.
    PeerClosed(String),
    Shutdown,
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Dead(cause) => write!(f, "{cause}"),
            CloseReason::PeerClosed(reason) => f.write_str(reason),
            CloseReason::Shutdown => f.write_str("shutdown"),
        }
    }
}

impl CloseReason {
    pub fn label(&self) -> &'static str {
        match self {
            CloseReason::Dead(_) => "dead",
            CloseReason::PeerClosed(_) => "peer_closed",
            CloseReason::Shutdown => "shutdown",
        }
    }
}

/// What an operator reads about: the shell logs each as one line.
#[derive(Debug, Clone, PartialEq)]
pub enum TunnelEvent {
    Resolved {
        addresses: Vec<SocketAddr>,
    },
    ResolveFailed {
        error: String,
        retry_in: Duration,
    },
    HandshakeStarted {
        peer: SocketAddr,
        rekey: bool,
    },
    Established {
        peer: SocketAddr,
        identity: PeerIdentity,
        rekey: bool,
    },
    Refused {
        peer: SocketAddr,
        failure: Failure,
        rekey: bool,
        /// When the next attempt comes; None when the next address is tried at once.
        retry_in: Option<Duration>,
        /// The same reason as the previous refusal: worth a debug line, not another warning.
        repeated: bool,
    },
    Closed {
        peer: SocketAddr,
        reason: CloseReason,
    },
    StateChanged {
        from: TunnelState,
        to: TunnelState,
    },
}

/// One tunnel's settings.
#[derive(Clone)]
pub struct TunnelConfig {
    /// "tunnel N", for logs.
    pub name: String,
    /// HOST:PORT as written, for logs; resolved by the shell when `server_addr` is None.
    pub server_spec: String,
    /// The server relay's address when `server_spec` is an address literal.
    pub server_addr: Option<SocketAddr>,
    pub settings: ClientSettings,
    pub policy: HealthPolicy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The one requests go through (or its first handshake).
    Current,
    /// A rekey in progress: made before the current one is broken.
    Next,
    /// A replaced association, kept until this moment for replies still in flight.
    Draining(Instant),
}

struct Association {
    id: AssociationId,
    peer: SocketAddr,
    role: Role,
    engine: Engine,
    /// The pre-parser: what of the server relay's plaintext handshake input (forgeable by
    /// anyone who knows the addresses) may reach the engine.
    guard: HandshakeGuard,
    /// Present once the handshake has completed.
    health: Option<Health>,
}

/// Lines per second (sustained, burst) for the pre-parser's refusals, per tunnel.
const DEFENCE_LOG_RATE: f64 = 20.0;
const DEFENCE_LOG_BURST: f64 = 200.0;

/// A request waiting to be encrypted and sent, with its pending-table key.
struct QueuedRequest {
    transmit: u64,
    datagram: BytesMut,
    /// The relay's own query about a held reply ([`crate::time_server_tx`]), not a local
    /// client's request: no departure, not counted as forwarded.
    query: bool,
}

struct QueuedReply {
    to: SocketAddr,
    datagram: BytesMut,
    stamp: ReplyStamp,
}

/// A small PRNG for backoff jitter: quality barely matters, determinism in tests does.
#[derive(Debug, Clone)]
struct Jitter(u64);

impl Jitter {
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

pub struct Tunnel {
    config: TunnelConfig,
    stats: Arc<Stats>,
    forward: Forward<SocketAddr>,
    associations: Vec<Association>,
    next_id: AssociationId,
    /// The server relay's addresses, in the resolver's order, and the one to try next.
    candidates: Vec<SocketAddr>,
    cursor: usize,
    /// The candidates came from a lookup made for this round of attempts.
    candidates_fresh: bool,
    resolving: bool,
    /// When to make the next attempt while there is no current association.
    retry_at: Option<Instant>,
    /// When to make the next rekey attempt.
    rekey_at: Option<Instant>,
    /// Failed attempts at a current association (refusals, timeouts, deaths).
    connect_backoff: Backoff,
    /// Failed rekeys, apart: a rekey that fails must not delay the next reconnect.
    rekey_backoff: Backoff,
    /// When the last rekey or replacement handshake failed.
    next_failed_at: Option<Instant>,
    jitter: Jitter,
    /// The label of the last refusal, so a failing server is reported once, not every retry.
    last_failure: Option<&'static str>,
    /// The last failure was a refusal (a policy decision), not unreachability.
    refused: bool,
    state: TunnelState,
    /// Keepalives sent, numbering each probe.
    keepalives_sent: u64,
    requests: VecDeque<QueuedRequest>,
    replies: VecDeque<QueuedReply>,
    actions: VecDeque<Action>,
    events: VecDeque<TunnelEvent>,
    scratch: Vec<Event>,
    handshake_limits: HandshakeLimits,
    defence_limiter: AuditLimiter,
}

impl Tunnel {
    /// A tunnel that starts connecting at `now`. `seed` drives the backoff jitter (give each
    /// tunnel of each process a different one); `rtt` receives its round-trip samples.
    pub fn new(
        config: TunnelConfig,
        now: Instant,
        stats: Arc<Stats>,
        rtt: Arc<RttGauge>,
        seed: u64,
    ) -> Self {
        let mut tunnel = Tunnel {
            candidates: config.server_addr.into_iter().collect(),
            candidates_fresh: config.server_addr.is_some(),
            forward: Forward::new(PENDING_CAPACITY, PENDING_TTL, stats.clone(), rtt),
            config,
            stats,
            associations: Vec::new(),
            next_id: 1,
            cursor: 0,
            resolving: false,
            retry_at: None,
            rekey_at: None,
            connect_backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
            rekey_backoff: Backoff::new(BACKOFF_INITIAL, BACKOFF_MAX),
            next_failed_at: None,
            jitter: Jitter(seed | 1),
            last_failure: None,
            refused: false,
            state: TunnelState::Connecting,
            keepalives_sent: 0,
            requests: VecDeque::new(),
            replies: VecDeque::new(),
            actions: VecDeque::new(),
            events: VecDeque::new(),
            scratch: Vec::new(),
            handshake_limits: HandshakeLimits::default(),
            defence_limiter: AuditLimiter::new(DEFENCE_LOG_RATE, DEFENCE_LOG_BURST),
        };
        tunnel.connect(now);
        tunnel
    }

    /// Turns the residence correction of replies on or off (docs/TIMESTAMPS.md), and with it
    /// the asking, through the server relay, when a basic reply really left it and the time
    /// server ([`crate::time_server_tx`]).
    pub fn set_timestamp_correction(&mut self, on: bool) {
        self.forward.set_correction(on);
        self.forward.set_time_server_tx(on, NextHop::ServerRelay);
    }

    /// Where residence times and correction outcomes are reported.
    pub fn set_timestamp_observer(&mut self, observer: Arc<dyn crate::residence::Observer>) {
        self.forward.set_observer(observer);
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    pub fn config(&self) -> &TunnelConfig {
        &self.config
    }

    pub fn state(&self) -> TunnelState {
        self.state
    }

    /// The server relay the current association goes to, once there is one.
    pub fn peer(&self) -> Option<SocketAddr> {
        self.current().map(|a| a.peer)
    }

    #[cfg(test)]
    pub fn debug_state(&self, now: Instant) -> String {
        let roles: Vec<String> = self
            .associations
            .iter()
            .map(|a| {
                format!(
                    "{}:{:?} engine={:?} health={:?}",
                    a.id,
                    a.role,
                    a.engine
                        .poll_timeout(a.peer)
                        .map(|t| t.saturating_duration_since(now)),
                    a.health.as_ref().map(|h| h
                        .next_deadline(&self.config.policy, false)
                        .saturating_duration_since(now))
                )
            })
            .collect();
        format!(
            "{roles:?} retry={:?} rekey={:?} pending={:?}",
            self.retry_at.map(|t| t.saturating_duration_since(now)),
            self.rekey_at.map(|t| t.saturating_duration_since(now)),
            self.forward
                .next_deadline()
                .map(|t| t.saturating_duration_since(now))
        )
    }

    /// The server relay association `id` goes to.
    pub fn peer_of(&self, id: AssociationId) -> Option<SocketAddr> {
        self.associations
            .iter()
            .find(|a| a.id == id)
            .map(|a| a.peer)
    }

    /// (established, handshaking) associations, for the gauges.
    pub fn association_counts(&self) -> (usize, usize) {
        let established = usize::from(
            self.current()
                .is_some_and(|association| association.health.is_some()),
        );
        let handshaking = self
            .associations
            .iter()
            .filter(|a| a.health.is_none() && !matches!(a.role, Role::Draining(_)))
            .count();
        (established, handshaking)
    }

    /// New certificate material for the next handshake; live associations keep theirs.
    pub fn set_settings(&mut self, settings: ClientSettings) {
        self.config.settings = settings;
    }

    // ----------------------------------------------------------------------------------------
    // Input
    // ----------------------------------------------------------------------------------------

    /// A request from the local NTP client at `from`, received at `rx`.
    pub fn handle_request(
        &mut self,
        now: Instant,
        rx: SystemTime,
        from: SocketAddr,
        datagram: &[u8],
    ) {
        if self.current().is_none_or(|a| a.health.is_none()) {
            self.stats.incr(Counter::DropNoAssociation);
            debug!(tunnel = %self.config.name, %from, "request dropped: no association up");
            return;
        }
        let mut datagram = BytesMut::from(datagram);
        let Some(request) = self.forward.request(now, rx, from, &mut datagram) else {
            return;
        };
        if let Some(health) = self.current_mut().and_then(|a| a.health.as_mut()) {
            health.request_sent(now);
        }
        self.requests.push_back(QueuedRequest {
            transmit: request.transmit.0,
            datagram,
            query: false,
        });
    }

    /// A datagram received at `rx` on association `id`'s socket.
    pub fn handle_datagram(
        &mut self,
        now: Instant,
        rx: SystemTime,
        id: AssociationId,
        datagram: &[u8],
    ) {
        let limits = self.handshake_limits;
        let Some(association) = self.association_mut(id) else {
            return;
        };
        let peer = association.peer;
        if let Err(refusal) = association.guard.check(now, datagram, &limits) {
            // Forged, or a peer gone wrong: never the engine's work, and no verdict on the
            // association (anyone can send this with the server relay's address).
            self.stats.incr(refusal.counter());
            match self.defence_limiter.allow(now) {
                Some(suppressed) => warn!(
                    tunnel = %self.config.name, %peer, len = datagram.len(),
                    reason = refusal.label(), suppressed, "datagram refused"
                ),
                None => debug!(%peer, reason = refusal.label(), "datagram dropped"),
            }
            return;
        }
        let mut events = std::mem::take(&mut self.scratch);
        if let Some(association) = self.association_mut(id) {
            association.engine.receive(now, peer, datagram, &mut events);
        }
        self.drain_engine(id, false);
        for event in events.drain(..) {
            self.on_engine_event(now, rx, id, event);
        }
        self.scratch = events;
        self.update_state();
    }

    /// An ICMP error (port unreachable, ...) on association `id`'s socket. Possibly forged: an
    /// established association is checked, not given up.
    pub fn handle_unreachable(&mut self, now: Instant, id: AssociationId, error: &str) {
        self.stats.incr(Counter::UpstreamUnreachable);
        let Some(association) = self.association_mut(id) else {
            return;
        };
        debug!(%error, peer = %association.peer, "server relay reported unreachable");
        match (association.role, association.health.as_mut()) {
            (Role::Current, Some(health)) => health.unreachable(now),
            (Role::Draining(_), _) => self.remove(id),
            (Role::Current | Role::Next, None) | (Role::Next, Some(_)) => {
                let failure = Failure::Other(format!("server relay unreachable ({error})"));
                self.handshake_failed(now, id, failure);
            }
        }
        self.check_health(now);
        self.update_state();
    }

    /// The shell could not open association `id`'s socket.
    pub fn open_failed(&mut self, now: Instant, id: AssociationId, error: &str) {
        let failure = Failure::Other(format!("cannot open a socket: {error}"));
        self.handshake_failed(now, id, failure);
        self.update_state();
    }

    /// The result of an [`Action::Resolve`].
    pub fn resolved(&mut self, now: Instant, result: Result<Vec<SocketAddr>, String>) {
        self.resolving = false;
        match result {
            Ok(mut addresses) if !addresses.is_empty() => {
                let mut seen = Vec::with_capacity(addresses.len());
                addresses.retain(|a| {
                    let new = !seen.contains(a);
                    seen.push(*a);
                    new
                });
                self.events.push_back(TunnelEvent::Resolved {
                    addresses: addresses.clone(),
                });
                self.candidates = addresses;
                self.cursor = 0;
                self.candidates_fresh = true;
                if self.current().is_none() {
                    self.connect(now);
                }
            }
            result => {
                let error = match result {
                    Err(error) => error,
                    Ok(_) => "the name resolves to no address".to_string(),
                };
                let delay = self.connect_backoff.next_delay(self.jitter.unit());
                self.retry_at = Some(now + delay);
                self.refused = false;
                self.events.push_back(TunnelEvent::ResolveFailed {
                    error,
                    retry_in: delay,
                });
            }
        }
        self.update_state();
    }

    /// Time passed: retransmissions, expiries, checks, retries and rekeys due by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.forward.expire(now);
        if let Some((route, reply)) = self.forward.release_overdue(now) {
            self.replies.push_back(QueuedReply {
                to: route.to,
                datagram: BytesMut::from(&reply[..]),
                stamp: route.stamp,
            });
        }
        let due: Vec<AssociationId> = self
            .associations
            .iter()
            .filter(|a| a.engine.poll_timeout(a.peer).is_some_and(|t| t <= now))
            .map(|a| a.id)
            .collect();
        for id in due {
            let mut events = std::mem::take(&mut self.scratch);
            if let Some(association) = self.association_mut(id) {
                let peer = association.peer;
                association.engine.handle_timeout(now, peer, &mut events);
            }
            self.drain_engine(id, false);
            for event in events.drain(..) {
                self.on_engine_event(now, SystemTime::UNIX_EPOCH, id, event);
            }
            self.scratch = events;
        }
        let drained: Vec<AssociationId> = self
            .associations
            .iter()
            .filter(|a| matches!(a.role, Role::Draining(until) if until <= now))
            .map(|a| a.id)
            .collect();
        for id in drained {
            self.close_association(now, id);
            debug!(tunnel = %self.config.name, "replaced association closed");
        }
        self.check_health(now);
        if self.retry_at.is_some_and(|due| due <= now) {
            self.retry_at = None;
            self.connect(now);
        }
        if self.rekey_at.is_some_and(|due| due <= now) && self.next().is_none() {
            self.rekey_at = None;
            if let Some(peer) = self.peer() {
                self.open(now, Role::Next, peer);
            }
        }
        self.update_state();
    }

    /// Ends every association with a close_notify (shutdown).
    pub fn close(&mut self, now: Instant) {
        let ids: Vec<AssociationId> = self.associations.iter().map(|a| a.id).collect();
        for id in ids {
            let established = self
                .association_mut(id)
                .is_some_and(|a| a.health.is_some() && a.role == Role::Current);
            if let Some(peer) = self.association_mut(id).map(|a| a.peer) {
                if established {
                    self.stats.incr(Counter::AssociationsClosed);
                    self.events.push_back(TunnelEvent::Closed {
                        peer,
                        reason: CloseReason::Shutdown,
                    });
                }
            }
            self.close_association(now, id);
        }
        self.retry_at = None;
        self.rekey_at = None;
    }

    // ----------------------------------------------------------------------------------------
    // Output
    // ----------------------------------------------------------------------------------------

    /// The next thing to do. `wall` is read by the shell right before the call: requests are
    /// encrypted and replies finished at this moment, so the time a datagram leaves is known.
    pub fn poll_action(&mut self, now: Instant, wall: SystemTime) -> Option<Action> {
        loop {
            if let Some(action) = self.actions.pop_front() {
                return Some(action);
            }
            if let Some(request) = self.requests.pop_front() {
                self.send_request(now, wall, request);
                continue;
            }
            let mut reply = self.replies.pop_front()?;
            let sent = self
                .forward
                .reply_sent(now, wall, &mut reply.datagram, &reply.stamp);
            return Some(Action::Deliver {
                to: reply.to,
                datagram: reply.datagram,
                // Sent as it is: the shell restamps it right before the send.
                departure: sent.unencrypted(),
            });
        }
    }

    /// A datagram sent for an action's `departure` left at `transmitted` (its kernel transmit
    /// timestamp, checked by the shell to lie between the departure's clock read and the end
    /// of the send): see [`Forward::departed`].
    /// A buffer the caller is done with (a datagram sent): the DTLS engine may decrypt a
    /// later datagram into it.
    pub fn recycle(&mut self, buffer: BytesMut) {
        // The serving association's: it decrypts nearly every reply.
        if let Some(current) = self.current_mut() {
            current.engine.recycle(buffer);
        }
    }

    pub fn departed(&mut self, departure: &Departure, transmitted: SystemTime) -> bool {
        self.forward.departed(departure, transmitted)
    }

    pub fn poll_event(&mut self) -> Option<TunnelEvent> {
        self.events.pop_front()
    }

    /// When [`Tunnel::handle_timeout`] is next due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let policy = &self.config.policy;
        let engines = self
            .associations
            .iter()
            .filter_map(|a| a.engine.poll_timeout(a.peer));
        let draining = self.associations.iter().filter_map(|a| match a.role {
            Role::Draining(until) => Some(until),
            _ => None,
        });
        let rekeying = self.next().is_some() || self.rekey_at.is_some();
        let health = self
            .current()
            .and_then(|a| a.health.as_ref())
            .map(|h| h.next_deadline(policy, rekeying));
        engines
            .chain(draining)
            .chain(
                [
                    self.forward.next_deadline(),
                    self.retry_at,
                    self.rekey_at,
                    health,
                ]
                .into_iter()
                .flatten(),
            )
            .min()
    }

    // ----------------------------------------------------------------------------------------
    // Lifecycle
    // ----------------------------------------------------------------------------------------

    fn current(&self) -> Option<&Association> {
        self.associations.iter().find(|a| a.role == Role::Current)
    }

    fn current_mut(&mut self) -> Option<&mut Association> {
        self.associations
            .iter_mut()
            .find(|a| a.role == Role::Current)
    }

    fn next(&self) -> Option<&Association> {
        self.associations.iter().find(|a| a.role == Role::Next)
    }

    fn association_mut(&mut self, id: AssociationId) -> Option<&mut Association> {
        self.associations.iter_mut().find(|a| a.id == id)
    }

    /// Starts the next attempt at a current association: a lookup first when the candidates
    /// are not from one made for this round.
    fn connect(&mut self, now: Instant) {
        if self.current().is_some() {
            return;
        }
        if !self.candidates_fresh && self.config.server_addr.is_none() {
            if !self.resolving {
                self.resolving = true;
                self.actions.push_back(Action::Resolve);
            }
            return;
        }
        let Some(&peer) = self
            .candidates
            .get(self.cursor % self.candidates.len().max(1))
        else {
            return;
        };
        self.open(now, Role::Current, peer);
    }

    /// A new association from a new socket: nothing of a previous one is reused.
    fn open(&mut self, now: Instant, role: Role, peer: SocketAddr) {
        let id = self.next_id;
        self.next_id += 1;
        let engine = Engine::client(&self.config.settings)
            .map_err(|e| e.to_string())
            .and_then(|mut engine| {
                engine.connect(now, peer).map_err(|e| e.to_string())?;
                Ok(engine)
            });
        let engine = match engine {
            Ok(engine) => engine,
            Err(error) => {
                // Settings the engine refuses fail every attempt alike: reported, backed off.
                self.report_failure(now, peer, role, Failure::Other(error));
                return;
            }
        };
        self.associations.push(Association {
            id,
            peer,
            role,
            engine,
            guard: HandshakeGuard::new(Side::Client),
            health: None,
        });
        self.actions.push_back(Action::Open { id, peer });
        self.drain_engine(id, false);
        self.events.push_back(TunnelEvent::HandshakeStarted {
            peer,
            rekey: role == Role::Next,
        });
    }

    fn on_engine_event(&mut self, now: Instant, rx: SystemTime, id: AssociationId, event: Event) {
        match event {
            Event::Data { payload, .. } => self.on_record(now, rx, id, payload),
            Event::Established { peer, identity } => self.on_established(now, id, peer, identity),
            Event::Failed { failure, .. } => {
                self.stats.incr(Counter::AssociationsRefused);
                self.handshake_failed(now, id, failure);
            }
            Event::Closed { peer, reason } => {
                let Some(role) = self.association_mut(id).map(|a| a.role) else {
                    return;
                };
                self.remove(id);
                match role {
                    Role::Current => {
                        self.stats.incr(Counter::AssociationsClosed);
                        self.events.push_back(TunnelEvent::Closed {
                            peer,
                            reason: CloseReason::PeerClosed(reason),
                        });
                        // The server relay went away cleanly (restart, idle): come back now,
                        // looking its name up again.
                        self.candidates_fresh = self.config.server_addr.is_some();
                        self.connect(now);
                    }
                    Role::Next => {
                        self.rekey_at =
                            Some(now + self.rekey_backoff.next_delay(self.jitter.unit()));
                    }
                    Role::Draining(_) => {}
                }
            }
        }
    }

    /// A decrypted record: a reply to route, or a keepalive acknowledgement.
    fn on_record(
        &mut self,
        now: Instant,
        rx: SystemTime,
        id: AssociationId,
        mut payload: BytesMut,
    ) {
        let is_current = self
            .association_mut(id)
            .is_some_and(|a| a.role == Role::Current);
        if ntp::keepalive_nonce(&payload).is_some() {
            self.stats.incr(Counter::KeepaliveAcks);
            if let Some(health) = self.association_mut(id).and_then(|a| a.health.as_mut()) {
                health.acknowledgement_received(now);
            }
            return;
        }
        let fate = self.forward.time_server_reply(now, rx, &mut payload);
        // A reply held for its query's answer came all the same: the association is alive.
        if is_current && !matches!(fate, ReplyFate::Dropped) {
            let rtt = self.forward.rtt().get().map(|(last, _)| last);
            if let Some(health) = self.current_mut().and_then(|a| a.health.as_mut()) {
                health.reply_received(now, rtt);
            }
        }
        let (route, payload) = match fate {
            ReplyFate::Route(route) => (route, payload),
            ReplyFate::Held { query } => {
                // The reply waits for the server relay to say when it, and the time server,
                // really sent it: the query goes the same way.
                self.stats.incr(Counter::TimeServerTxQueries);
                self.requests.push_back(QueuedRequest {
                    transmit: 0,
                    datagram: BytesMut::from(&query[..]),
                    query: true,
                });
                return;
            }
            ReplyFate::Released { route, reply } => (route, BytesMut::from(&reply[..])),
            ReplyFate::Dropped => return,
        };
        self.replies.push_back(QueuedReply {
            to: route.to,
            datagram: payload,
            stamp: route.stamp,
        });
    }

    fn on_established(
        &mut self,
        now: Instant,
        id: AssociationId,
        peer: SocketAddr,
        identity: PeerIdentity,
    ) {
        let Some(role) = self.association_mut(id).map(|a| a.role) else {
            return;
        };
        let limits = self.handshake_limits;
        if let Some(association) = self.association_mut(id) {
            association.health = Some(Health::new(now));
            association.guard.established(now, &limits);
        }
        self.stats.incr(Counter::AssociationsEstablished);
        match role {
            Role::Next => {
                // A replacement made while the current association's check went unanswered:
                // the old one is given up as dead, as its verdict would have.
                let policy = &self.config.policy;
                let unacknowledged = self
                    .current()
                    .and_then(|a| a.health.as_ref())
                    .and_then(|health| health.unanswered_check(policy));
                if let (Some(sent), Some(old_peer)) = (unacknowledged, self.peer()) {
                    self.stats.incr(Counter::AssociationsClosed);
                    self.events.push_back(TunnelEvent::Closed {
                        peer: old_peer,
                        reason: CloseReason::Dead(DeathCause::NoAcknowledgement(sent)),
                    });
                }
                // Make before break: new requests go through the new association; the old one
                // stays a moment for replies already on their way.
                self.retire_current(now);
                if let Some(association) = self.association_mut(id) {
                    association.role = Role::Current;
                }
                self.rekey_backoff.reset();
                self.rekey_at = None;
            }
            Role::Current => {
                self.connect_backoff.reset();
                self.last_failure = None;
                self.refused = false;
                self.retry_at = None;
            }
            Role::Draining(_) => {}
        }
        self.events.push_back(TunnelEvent::Established {
            peer,
            identity,
            rekey: role == Role::Next,
        });
        self.check_health(now);
    }

    /// An association that never came up (refused, timed out, unreachable) is removed; the
    /// next address is tried, or, when every address of this round has failed, the next round
    /// waits out the backoff.
    fn handshake_failed(&mut self, now: Instant, id: AssociationId, failure: Failure) {
        let Some((role, peer)) = self.association_mut(id).map(|a| (a.role, a.peer)) else {
            return;
        };
        self.remove(id);
        self.report_failure(now, peer, role, failure);
    }

    fn report_failure(&mut self, now: Instant, peer: SocketAddr, role: Role, failure: Failure) {
        let repeated = self.last_failure == Some(failure.label());
        match role {
            Role::Current => {
                self.last_failure = Some(failure.label());
                self.refused = !matches!(failure, Failure::HandshakeTimeout | Failure::Other(_));
                self.cursor += 1;
                let retry_in = if self.cursor < self.candidates.len() {
                    None
                } else {
                    // Every address failed: a new round, with a fresh lookup, after the backoff.
                    self.cursor = 0;
                    self.candidates_fresh = self.config.server_addr.is_some();
                    let delay = self.connect_backoff.next_delay(self.jitter.unit());
                    self.retry_at = Some(now + delay);
                    Some(delay)
                };
                self.events.push_back(TunnelEvent::Refused {
                    peer,
                    failure,
                    rekey: false,
                    retry_in,
                    repeated,
                });
                if retry_in.is_none() {
                    // The next address at once.
                    self.connect(now);
                }
            }
            Role::Next => {
                let delay = self.rekey_backoff.next_delay(self.jitter.unit());
                self.rekey_at = Some(now + delay);
                self.next_failed_at = Some(now);
                self.events.push_back(TunnelEvent::Refused {
                    peer,
                    failure,
                    rekey: true,
                    retry_in: Some(delay),
                    repeated,
                });
            }
            Role::Draining(_) => {}
        }
    }

    /// What the current association's health asks for.
    fn check_health(&mut self, now: Instant) {
        let policy = self.config.policy.clone();
        let next_pending = self.next().is_some() || self.rekey_at.is_some();
        let nonce = self.keepalives_sent + 1;
        let Some(association) = self.current_mut() else {
            return;
        };
        let Some(health) = association.health.as_mut() else {
            return;
        };
        match health.verdict(now, &policy) {
            Verdict::Fine => {}
            Verdict::KeepAlive => {
                let (id, peer) = (association.id, association.peer);
                let probe = ntp::keepalive(nonce);
                if association.engine.send(now, peer, &probe).is_ok() {
                    let mut replace = false;
                    if let Some(health) = association.health.as_mut() {
                        health.keepalive_sent(now, &policy);
                        // The last keepalive of a check: no deadline comes before its wait
                        // ends, so the replacement is asked for now.
                        replace = health.unanswered_check(&policy).is_some();
                    }
                    self.stats.incr(Counter::Keepalives);
                    self.keepalives_sent = nonce;
                    self.drain_engine(id, false);
                    if replace && !next_pending {
                        self.start_replacement(now);
                    }
                }
            }
            Verdict::Rekey => {
                if !next_pending {
                    debug!(
                        records = health.records_sent(),
                        "rekey: making a fresh association"
                    );
                    self.rekey_at = Some(now);
                }
            }
            Verdict::Replace => {
                if !next_pending {
                    self.start_replacement(now);
                }
            }
            Verdict::Dead(cause) => self.declare_dead(now, cause),
        }
    }

    /// A check's keepalives have all gone unanswered so far: a replacement handshake starts
    /// (in this call's [`Tunnel::handle_timeout`], or at the next) beside the association.
    fn start_replacement(&mut self, now: Instant) {
        debug!(
            tunnel = %self.config.name,
            "no keepalive acknowledged yet: a replacement handshake beside the association"
        );
        self.rekey_at = Some(now);
    }

    /// The current association is gone: it drains, and a new one is made at once (the first
    /// time; repeated deaths back off like refusals), after a fresh lookup of the name.
    fn declare_dead(&mut self, now: Instant, cause: DeathCause) {
        let Some(peer) = self.peer() else {
            return;
        };
        // A replacement made during this check that has already failed (the server relay
        // refused it or is not there, e.g. still restarting): connecting again at once would
        // meet the same, and back off twice; its retry, already scheduled, is the next attempt.
        let check_started = self
            .current()
            .and_then(|a| a.health.as_ref())
            .and_then(Health::check_started);
        let replacement_retry = match (self.next_failed_at.take(), check_started, self.rekey_at) {
            (Some(failed), Some(started), Some(retry)) if failed >= started && retry > now => {
                Some(retry)
            }
            _ => None,
        };
        self.stats.incr(Counter::AssociationsClosed);
        self.events.push_back(TunnelEvent::Closed {
            peer,
            reason: CloseReason::Dead(cause),
        });
        self.retire_current(now);
        self.rekey_at = None;
        if let Some(next) = self.associations.iter_mut().find(|a| a.role == Role::Next) {
            // A replacement is already handshaking (started when the check went unanswered):
            // it becomes the connection attempt rather than being thrown away.
            next.role = Role::Current;
            self.candidates_fresh = self.config.server_addr.is_some();
            self.refused = false;
            return;
        }
        let first = self.connect_backoff.failures() == 0;
        let delay = self.connect_backoff.next_delay(self.jitter.unit());
        self.candidates_fresh = self.config.server_addr.is_some();
        self.refused = false;
        if let Some(retry) = replacement_retry {
            self.retry_at = Some(retry.min(now + delay));
        } else if first {
            self.connect(now);
        } else {
            self.retry_at = Some(now + delay);
        }
    }

    /// The current association drains for a moment, for replies already on their way; an
    /// older draining one goes now (so a tunnel never holds more than three sockets).
    fn retire_current(&mut self, now: Instant) {
        let draining: Vec<AssociationId> = self
            .associations
            .iter()
            .filter(|a| matches!(a.role, Role::Draining(_)))
            .map(|a| a.id)
            .collect();
        for id in draining {
            self.close_association(now, id);
        }
        for association in &mut self.associations {
            if association.role == Role::Current {
                association.role = Role::Draining(now + DRAIN);
            }
        }
    }

    fn send_request(&mut self, now: Instant, wall: SystemTime, request: QueuedRequest) {
        let Some(association) = self
            .associations
            .iter_mut()
            .find(|a| a.role == Role::Current && a.health.is_some())
        else {
            self.stats.incr(Counter::DropNoAssociation);
            return;
        };
        let (id, peer) = (association.id, association.peer);
        let departure =
            (!request.query).then(|| self.forward.request_sent(now, wall, request.transmit));
        match association.engine.send(now, peer, &request.datagram) {
            Ok(()) => self.drain_engine_departing(id, !request.query, departure),
            Err(error) => {
                self.stats.incr(Counter::DropNoAssociation);
                debug!(tunnel = %self.config.name, %error, "request dropped");
            }
        }
    }

    /// Queues what association `id`'s engine has to send.
    fn drain_engine(&mut self, id: AssociationId, ntp: bool) {
        self.drain_engine_departing(id, ntp, None);
    }

    /// Likewise, each datagram tagged with a request's `departure`.
    fn drain_engine_departing(
        &mut self,
        id: AssociationId,
        ntp: bool,
        departure: Option<Departure>,
    ) {
        let Some(association) = self.associations.iter_mut().find(|a| a.id == id) else {
            return;
        };
        while let Some(transmit) = association.engine.poll_transmit() {
            self.actions.push_back(Action::Send {
                id,
                datagram: transmit.datagram,
                ntp,
                departure,
            });
        }
    }

    /// Sends a close_notify on an association, then closes its socket.
    fn close_association(&mut self, now: Instant, id: AssociationId) {
        if let Some(association) = self.association_mut(id) {
            let peer = association.peer;
            association.engine.close(now, peer);
        }
        self.drain_engine(id, false);
        self.remove(id);
    }

    /// Forgets an association and closes its socket (after what it queued has gone).
    fn remove(&mut self, id: AssociationId) {
        self.drain_engine(id, false);
        let before = self.associations.len();
        self.associations.retain(|a| a.id != id);
        if self.associations.len() < before {
            self.actions.push_back(Action::Close { id });
        }
    }

    fn update_state(&mut self) {
        let state = match self.current() {
            Some(Association {
                health: Some(health),
                ..
            }) => {
                if health.upstream_down() {
                    TunnelState::UpstreamDown
                } else {
                    TunnelState::Up
                }
            }
            Some(_) => TunnelState::Connecting,
            None if self.resolving => TunnelState::Connecting,
            None if self
                .retry_at
                .is_some_and(|_| self.last_failure.is_some() && self.refused) =>
            {
                TunnelState::Refused
            }
            None if self.retry_at.is_some() => TunnelState::BackingOff,
            None => TunnelState::Connecting,
        };
        if state != self.state {
            self.events.push_back(TunnelEvent::StateChanged {
                from: self.state,
                to: state,
            });
            self.state = state;
        }
    }
}
