//! Admission control for the server relay: who may hold state, how much, and for how long.
//!
//! rtc-dtls has no protective limits of its own: it keeps half-open handshakes forever, buffers
//! next-epoch records without bound before a handshake completes, and never forgets a silent
//! association. This table sits in front of the engine and bounds all of it. It is pure: the
//! shell tells it what arrived and when, and asks it what has expired.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::hash::{AddrKey, KeyedMap, keyed_map};
use crate::record::{self, Fragment};
use crate::stats::Counter;

/// The server relay's limits. Every one has a config key (`[limits]` in the server's file).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Associations held at once, established or not.
    pub max_associations: usize,
    /// Handshakes in progress at once (first ones and replacements).
    pub max_half_open: usize,
    /// A handshake not complete after this is abandoned.
    pub handshake_timeout: Duration,
    /// New handshakes per second one source address may start, sustained...
    pub handshake_rate: f64,
    /// ...and in a burst.
    pub handshake_burst: f64,
    /// Bytes a peer may send before its handshake completes (rtc-dtls buffers next-epoch
    /// records until then).
    pub max_handshake_bytes: usize,
    /// An association silent this long is removed. Longer than NTP's longest usual poll
    /// interval (1024 s); the client relay sends keepalives well within it.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_associations: 100_000,
            max_half_open: 4_096,
            handshake_timeout: Duration::from_secs(10),
            handshake_rate: 5.0,
            handshake_burst: 20.0,
            max_handshake_bytes: 64 * 1024,
            idle_timeout: Duration::from_secs(3_600),
        }
    }
}

/// What a datagram looks like from its first record header, before any decryption.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// An epoch-0 ClientHello: the only thing that may open an association.
    ClientHello,
    /// Another handshake or ChangeCipherSpec record.
    Handshake,
    /// Anything else (application data, alerts, garbage).
    Other,
}

/// Why a datagram was dropped before the engine saw it. Labels are stable: they are counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotClientHello,
    AssociationLimit,
    HalfOpenLimit,
    SourceRateLimit,
    /// The peer sent more than max_handshake_bytes before completing its handshake: the caller
    /// must forget it.
    HandshakeBytes,
    /// A ClientHello beside other records, or in fragments when it is longer than
    /// [`HandshakeLimits::max_fragmented_hello_len`], or a first datagram that is not its
    /// start: before the cookie exchange reassembly must cost next to nothing.
    FragmentedClientHello,
    /// Records or handshake fragment headers that do not add up.
    MalformedHandshake,
    /// A handshake message this side never receives, or a message_seq or a number of
    /// messages no handshake reaches.
    UnexpectedHandshake,
    /// A handshake message declared longer than [`HandshakeLimits::max_message_len`].
    HandshakeTooLong,
    /// A zero-length fragment of a non-empty message: it can bring nothing.
    EmptyFragment,
    /// More fragments of one message, or of one handshake, than any handshake needs.
    HandshakeFragments,
    /// A plaintext handshake record after the handshake completed that is not part of the
    /// peer's final flight (the only one a peer retransmits then).
    LateHandshake,
    /// A plausible final-flight retransmission, but over the per-peer rate, the window after
    /// the handshake, or the total allowed.
    LateHandshakeRate,
    /// Our own datagram to an address that has not proved itself (no cookie echoed yet) that
    /// would make it receive more than it sent, or a second HelloVerifyRequest for one
    /// ClientHello: not sent.
    Amplification,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotClientHello => "not_client_hello",
            Refusal::AssociationLimit => "association_limit",
            Refusal::HalfOpenLimit => "half_open_limit",
            Refusal::SourceRateLimit => "source_rate_limit",
            Refusal::HandshakeBytes => "handshake_bytes",
            Refusal::FragmentedClientHello => "fragmented_client_hello",
            Refusal::MalformedHandshake => "malformed_handshake",
            Refusal::UnexpectedHandshake => "unexpected_handshake",
            Refusal::HandshakeTooLong => "handshake_too_long",
            Refusal::EmptyFragment => "empty_fragment",
            Refusal::HandshakeFragments => "handshake_fragments",
            Refusal::LateHandshake => "late_handshake",
            Refusal::LateHandshakeRate => "late_handshake_rate",
            Refusal::Amplification => "amplification",
        }
    }

    /// One of the pre-parser's defences (worth an audit line, at the audit rate), rather than
    /// a flood limit.
    pub fn is_defence(self) -> bool {
        !matches!(
            self,
            Refusal::NotClientHello
                | Refusal::AssociationLimit
                | Refusal::HalfOpenLimit
                | Refusal::SourceRateLimit
                | Refusal::HandshakeBytes
        )
    }

    /// The counter this refusal is counted in.
    pub fn counter(self) -> Counter {
        match self {
            Refusal::NotClientHello => Counter::DropNotHandshake,
            Refusal::AssociationLimit => Counter::DropAssociationLimit,
            Refusal::HalfOpenLimit => Counter::DropHalfOpenLimit,
            Refusal::SourceRateLimit => Counter::DropSourceRateLimit,
            Refusal::HandshakeBytes => Counter::DropHandshakeBytes,
            Refusal::FragmentedClientHello => Counter::DropFragmentedClientHello,
            Refusal::MalformedHandshake => Counter::DropMalformedHandshake,
            Refusal::UnexpectedHandshake => Counter::DropUnexpectedHandshake,
            Refusal::HandshakeTooLong => Counter::DropHandshakeTooLong,
            Refusal::EmptyFragment => Counter::DropEmptyFragment,
            Refusal::HandshakeFragments => Counter::DropHandshakeFragments,
            Refusal::LateHandshake => Counter::DropLateHandshake,
            Refusal::LateHandshakeRate => Counter::DropLateHandshakeRate,
            Refusal::Amplification => Counter::DropAmplification,
        }
    }
}

/// What `expire` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// A first handshake that did not complete in time. `answered` is true when the peer sent
    /// more than its first datagram, i.e. it proved its address through the cookie exchange:
    /// worth an audit line, where a lone (possibly spoofed) ClientHello is not.
    HandshakeTimeout { peer: SocketAddr, answered: bool },
    /// A replacement handshake that did not complete; the established association stays.
    ReplacementTimeout { peer: SocketAddr },
    /// An established association that was silent for idle_timeout.
    Idle { peer: SocketAddr },
}

#[derive(Debug, Clone, Copy)]
struct Handshake {
    since: Instant,
    bytes: usize,
    datagrams: u32,
    /// Its plaintext handshake input, message by message.
    guard: HandshakeGuard,
    /// What we sent back while the address was unproven, and how many HelloVerifyRequests
    /// for how many whole ClientHellos.
    bytes_out: usize,
    client_hellos: u32,
    hello_verify_requests: u32,
    /// The peer echoed a cookie (the engine answered with a ServerHello): its address is
    /// proven and what we send it is no longer capped by what it sent.
    verified: bool,
}

impl Handshake {
    /// A handshake opened by a ClientHello of `len` bytes, already counted by `guard`.
    fn started(now: Instant, len: usize, guard: HandshakeGuard) -> Self {
        Handshake {
            since: now,
            bytes: len,
            datagrams: 1,
            guard,
            bytes_out: 0,
            client_hellos: 1,
            hello_verify_requests: 0,
            verified: false,
        }
    }

    /// Counts one more datagram; refuses once the handshake has sent more than `max_bytes`.
    fn add(&mut self, len: usize, max_bytes: usize) -> Result<(), Refusal> {
        self.bytes = self.bytes.saturating_add(len);
        self.datagrams = self.datagrams.saturating_add(1);
        if self.bytes > max_bytes {
            return Err(Refusal::HandshakeBytes);
        }
        Ok(())
    }

    /// Whether we may send `datagram` to this handshake's peer: nothing larger in total than
    /// what the peer sent while its address is unproven, and one HelloVerifyRequest per whole
    /// ClientHello.
    fn outbound(&mut self, datagram: &[u8]) -> Result<(), Refusal> {
        if self.verified {
            return Ok(());
        }
        let (mut server_hello, mut hello_verify) = (false, false);
        for record in record::records(datagram).flatten() {
            if record.is_plaintext_handshake() {
                for fragment in record::fragments(record.body).flatten() {
                    server_hello |= fragment.msg_type == record::HANDSHAKE_SERVER_HELLO;
                    hello_verify |= fragment.msg_type == record::HANDSHAKE_HELLO_VERIFY_REQUEST;
                }
            }
        }
        if server_hello {
            // rtc-dtls answers with a ServerHello only to a ClientHello with a valid cookie.
            self.verified = true;
            return Ok(());
        }
        if (hello_verify && self.hello_verify_requests >= self.client_hellos)
            || self.bytes_out.saturating_add(datagram.len()) > self.bytes
        {
            return Err(Refusal::Amplification);
        }
        self.bytes_out += datagram.len();
        self.hello_verify_requests += u32::from(hello_verify);
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    HalfOpen(Handshake),
    Established {
        last_activity: Instant,
        /// Plaintext handshake input after the handshake: its final flight only.
        guard: HandshakeGuard,
        /// The deadline of this peer's one live idle entry in the timer heap; other entries
        /// for it are stale.
        idle_timer: Instant,
        replacement: Option<Handshake>,
    },
}

/// Whether a datagram that arrives as `arrival` from a peer with an established association
/// is that association's, as the engine routes it: a ClientHello opens a replacement, and
/// while one is in progress handshake records are its; everything else is the association's.
fn to_established(arrival: Arrival, replacing: bool) -> bool {
    match arrival {
        Arrival::ClientHello => false,
        Arrival::Handshake => !replacing,
        Arrival::Other => true,
    }
}

/// An established association's last-activity mark, lent by
/// [`Admission::admit_established`] so that the caller marks it without a second look-up.
pub struct Activity<'a>(&'a mut Instant);

impl Activity<'_> {
    /// Authenticated traffic arrived at `now`.
    pub fn record(self, now: Instant) {
        *self.0 = now;
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Source addresses whose handshake rate is tracked at once; beyond it the map is reset.
const MAX_TRACKED_SOURCES: usize = 65_536;

pub struct Admission {
    limits: Limits,
    handshake_limits: HandshakeLimits,
    peers: KeyedMap<AddrKey, Phase>,
    half_open: usize,
    buckets: KeyedMap<IpAddr, Bucket>,
    /// (deadline, peer); entries may be stale and are re-checked when they come due.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            handshake_limits: HandshakeLimits::default(),
            peers: keyed_map(0),
            half_open: 0,
            buckets: keyed_map(0),
            timers: BinaryHeap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Other bounds on handshake input than the defaults (tests, fuzzing).
    pub fn with_handshake_limits(mut self, limits: HandshakeLimits) -> Self {
        self.handshake_limits = limits;
        self
    }

    pub fn handshake_limits(&self) -> &HandshakeLimits {
        &self.handshake_limits
    }

    /// [`Admission::admit_datagram`] for a datagram to `peer`'s established association (its
    /// records, not a ClientHello nor a replacement's handshake), with the one look-up kept
    /// for the caller: the guard's verdict, and with it the association's [`Activity`], to be
    /// marked once the engine has authenticated what the datagram carried. None when the
    /// datagram is not the established association's: `admit_datagram` decides those.
    pub fn admit_established(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
    ) -> Option<Result<Activity<'_>, Refusal>> {
        let arrival = classify(datagram);
        let limits = self.handshake_limits;
        match self.peers.get_mut(&AddrKey(peer))? {
            Phase::Established {
                replacement,
                guard,
                last_activity,
                ..
            } if to_established(arrival, replacement.is_some()) => Some(
                guard
                    .check(now, datagram, &limits)
                    .map(|()| Activity(last_activity)),
            ),
            _ => None,
        }
    }

    /// Decides whether `datagram` from `peer` may reach the engine: the pre-parser's checks
    /// on its plaintext handshake content (see [`HandshakeGuard`]), then [`Admission::admit`]
    /// on its first record. Nothing is counted for a datagram the pre-parser refuses.
    pub fn admit_datagram(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        datagram: &[u8],
    ) -> Result<(), Refusal> {
        let arrival = classify(datagram);
        let limits = self.handshake_limits;
        // One ClientHello fragment alone in one record, and in fragments only a small one.
        // (Its length is the guard's to judge, below.)
        let hello = match arrival {
            Arrival::ClientHello => match record::lone_client_hello(datagram) {
                Some(f) if f.is_whole() || f.length <= limits.max_fragmented_hello_len => Some(f),
                _ => return Err(Refusal::FragmentedClientHello),
            },
            _ => None,
        };
        // A whole ClientHello, or the last piece of one: what may earn a HelloVerifyRequest.
        let hello_ends = hello.is_some_and(|f| f.offset + f.fragment_length == f.length);
        enum Target {
            /// A ClientHello that opens a handshake (a first one, or a replacement).
            New,
            /// The handshake in progress (a first one, or a replacement).
            Handshake,
        }
        let target = match self.peers.get_mut(&AddrKey(peer)) {
            None => Target::New,
            Some(Phase::HalfOpen(_)) => Target::Handshake,
            Some(Phase::Established {
                replacement, guard, ..
            }) => {
                if to_established(arrival, replacement.is_some()) {
                    // Only its guard has a say (`admit` takes everything else an established
                    // peer sends), with this one look-up.
                    return guard.check(now, datagram, &limits);
                }
                match arrival {
                    Arrival::ClientHello if replacement.is_none() => Target::New,
                    _ => Target::Handshake,
                }
            }
        };
        match target {
            Target::New => {
                if hello.is_some_and(|f| f.offset != 0) {
                    // State opens only with a ClientHello's start.
                    return Err(Refusal::FragmentedClientHello);
                }
                let mut guard = HandshakeGuard::new(Side::Server);
                if arrival == Arrival::ClientHello {
                    guard.check(now, datagram, &limits)?;
                }
                self.admit(now, peer, datagram.len(), arrival)?;
                if let Some(handshake) = self.handshake_mut(peer) {
                    handshake.guard = guard;
                    handshake.client_hellos = u32::from(hello_ends);
                }
                Ok(())
            }
            Target::Handshake => {
                if let Some(handshake) = self.handshake_mut(peer) {
                    handshake.guard.check(now, datagram, &limits)?;
                }
                self.admit(now, peer, datagram.len(), arrival)?;
                if hello_ends {
                    if let Some(handshake) = self.handshake_mut(peer) {
                        handshake.client_hellos = handshake.client_hellos.saturating_add(1);
                    }
                }
                Ok(())
            }
        }
    }

    /// The handshake in progress with `peer`: its first, or a replacement.
    fn handshake_mut(&mut self, peer: SocketAddr) -> Option<&mut Handshake> {
        match self.peers.get_mut(&AddrKey(peer))? {
            Phase::HalfOpen(handshake) => Some(handshake),
            Phase::Established { replacement, .. } => replacement.as_mut(),
        }
    }

    /// Whether we may send `datagram` to `peer`: to an address that has not yet echoed a
    /// cookie, never more bytes than it sent us, and one HelloVerifyRequest per ClientHello
    /// (RFC 6347 §4.2.1 and RFC 9147 §5.1's amplification limit). Handshake traffic to a peer
    /// with a replacement in progress counts against the replacement; its established
    /// association's records go freely.
    pub fn outbound(&mut self, peer: SocketAddr, datagram: &[u8]) -> Result<(), Refusal> {
        match self.peers.get_mut(&AddrKey(peer)) {
            Some(Phase::HalfOpen(handshake)) => handshake.outbound(datagram),
            Some(Phase::Established {
                replacement: Some(handshake),
                ..
            }) if record::records(datagram)
                .flatten()
                .any(|r| r.is_plaintext_handshake()) =>
            {
                handshake.outbound(datagram)
            }
            _ => Ok(()),
        }
    }

    /// Associations tracked, established or not.
    pub fn associations(&self) -> usize {
        self.peers.len()
    }

    /// Handshakes in progress (first ones and replacements).
    pub fn half_open(&self) -> usize {
        self.half_open
    }

    /// Decides whether a datagram from `peer` may reach the engine.
    pub fn admit(
        &mut self,
        now: Instant,
        peer: SocketAddr,
        len: usize,
        arrival: Arrival,
    ) -> Result<(), Refusal> {
        let limits = &self.limits;
        match self.peers.get_mut(&AddrKey(peer)) {
            None => {
                if arrival != Arrival::ClientHello {
                    return Err(Refusal::NotClientHello);
                }
                if self.peers.len() >= limits.max_associations {
                    return Err(Refusal::AssociationLimit);
                }
                if self.half_open >= limits.max_half_open {
                    return Err(Refusal::HalfOpenLimit);
                }
                self.take_token(now, peer.ip())?;
                self.peers.insert(
                    AddrKey(peer),
                    Phase::HalfOpen(Handshake::started(
                        now,
                        len,
                        HandshakeGuard::new(Side::Server),
                    )),
                );
                self.half_open += 1;
                self.timers
                    .push(Reverse((now + self.limits.handshake_timeout, peer)));
                Ok(())
            }
            Some(Phase::HalfOpen(handshake)) => handshake.add(len, limits.max_handshake_bytes),
            Some(Phase::Established { replacement, .. }) => match (arrival, replacement) {
                (Arrival::ClientHello, None) => {
                    if self.half_open >= limits.max_half_open {
                        return Err(Refusal::HalfOpenLimit);
                    }
                    self.take_token(now, peer.ip())?;
                    if let Some(Phase::Established { replacement, .. }) =
                        self.peers.get_mut(&AddrKey(peer))
                    {
                        *replacement = Some(Handshake::started(
                            now,
                            len,
                            HandshakeGuard::new(Side::Server),
                        ));
                    }
                    self.half_open += 1;
                    self.timers
                        .push(Reverse((now + self.limits.handshake_timeout, peer)));
                    Ok(())
                }
                // Over the limit, only the replacement is at fault: the caller abandons it.
                (Arrival::ClientHello | Arrival::Handshake, Some(handshake)) => {
                    handshake.add(len, limits.max_handshake_bytes)
                }
                // Everything else to the established association (`admit_datagram` relies on
                // this to skip the call).
                _ => Ok(()),
            },
        }
    }

    fn take_token(&mut self, now: Instant, source: IpAddr) -> Result<(), Refusal> {
        if self.buckets.len() >= MAX_TRACKED_SOURCES && !self.buckets.contains_key(&source) {
            self.forget_full_buckets(now);
            if self.buckets.len() >= MAX_TRACKED_SOURCES {
                // Bounded memory first: under a flood from this many sources, start afresh.
                self.buckets.clear();
            }
        }
        let (rate, burst) = (self.limits.handshake_rate, self.limits.handshake_burst);
        let bucket = self.buckets.entry(source).or_insert(Bucket {
            tokens: burst,
            last: now,
        });
        let elapsed = now.saturating_duration_since(bucket.last).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(burst);
        bucket.last = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Refusal::SourceRateLimit)
        }
    }

    /// A bucket that has refilled completely carries no information.
    fn forget_full_buckets(&mut self, now: Instant) {
        let (rate, burst) = (self.limits.handshake_rate, self.limits.handshake_burst);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
        });
    }

    /// A handshake completed: a first one, or a replacement that took over.
    pub fn established(&mut self, now: Instant, peer: SocketAddr) {
        let idle = self.limits.idle_timeout;
        let limits = self.handshake_limits;
        match self.peers.get_mut(&AddrKey(peer)) {
            Some(phase @ Phase::HalfOpen(_)) => {
                let mut guard = match phase {
                    Phase::HalfOpen(handshake) => handshake.guard,
                    Phase::Established { guard, .. } => *guard,
                };
                guard.established(now, &limits);
                *phase = Phase::Established {
                    last_activity: now,
                    guard,
                    idle_timer: now + idle,
                    replacement: None,
                };
                self.half_open -= 1;
                self.timers.push(Reverse((now + idle, peer)));
            }
            Some(Phase::Established {
                last_activity,
                replacement,
                guard,
                ..
            }) => {
                *last_activity = now;
                if let Some(handshake) = replacement.take() {
                    self.half_open -= 1;
                    *guard = handshake.guard;
                    guard.established(now, &limits);
                }
            }
            // Nothing the engine could have completed without being admitted.
            None => {}
        }
    }

    /// Authenticated traffic arrived on (or was sent into) an established association.
    pub fn activity(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(Phase::Established { last_activity, .. }) = self.peers.get_mut(&AddrKey(peer)) {
            *last_activity = now;
        }
    }

    /// A handshake failed in the engine: a first one is gone, a replacement leaves the
    /// established association as it was.
    pub fn handshake_failed(&mut self, peer: SocketAddr) {
        match self.peers.get_mut(&AddrKey(peer)) {
            Some(Phase::HalfOpen(_)) => {
                self.peers.remove(&AddrKey(peer));
                self.half_open -= 1;
            }
            Some(Phase::Established {
                replacement: replacement @ Some(_),
                ..
            }) => {
                *replacement = None;
                self.half_open -= 1;
            }
            _ => {}
        }
    }

    /// The engine no longer holds anything for `peer`.
    pub fn removed(&mut self, peer: SocketAddr) {
        match self.peers.remove(&AddrKey(peer)) {
            Some(Phase::HalfOpen(_))
            | Some(Phase::Established {
                replacement: Some(_),
                ..
            }) => self.half_open -= 1,
            _ => {}
        }
    }

    /// Everything that expired by `now`. The caller acts on each in the engine, which does not
    /// report back (the table is already updated).
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<Expiry>) {
        while let Some(Reverse((due, peer))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            let timeout = self.limits.handshake_timeout;
            let idle = self.limits.idle_timeout;
            let Entry::Occupied(mut entry) = self.peers.entry(AddrKey(peer)) else {
                continue;
            };
            match entry.get_mut() {
                Phase::HalfOpen(handshake) => {
                    if handshake.since + timeout <= now {
                        let answered = handshake.datagrams > 1;
                        entry.remove();
                        self.half_open -= 1;
                        expired.push(Expiry::HandshakeTimeout { peer, answered });
                    }
                }
                Phase::Established {
                    last_activity,
                    idle_timer,
                    replacement,
                    ..
                } => {
                    if replacement.is_some_and(|h| h.since + timeout <= now) {
                        *replacement = None;
                        self.half_open -= 1;
                        expired.push(Expiry::ReplacementTimeout { peer });
                    }
                    if due != *idle_timer {
                        continue; // a handshake timer, handled above, or stale
                    }
                    if *last_activity + idle <= now {
                        if replacement.is_some() {
                            self.half_open -= 1;
                        }
                        entry.remove();
                        expired.push(Expiry::Idle { peer });
                    } else {
                        *idle_timer = *last_activity + idle;
                        self.timers.push(Reverse((*idle_timer, peer)));
                    }
                }
            }
        }
        if self.buckets.len() > MAX_TRACKED_SOURCES / 2 {
            self.forget_full_buckets(now);
        }
    }

    /// When `expire` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((due, _))| *due)
    }
}

/// Bounds on plaintext handshake input, checked by [`HandshakeGuard`] before the engine sees
/// it (both relays, every association). rtc-dtls reassembles whatever fragments a peer sends;
/// these are what a real handshake needs, with room for retransmissions, and no more.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HandshakeLimits {
    /// The longest handshake message taken (a certificate chain of a few certificates is a
    /// few kB; TLS itself caps a record at 16 kB).
    pub max_message_len: u32,
    /// Fragments of one message (counting retransmitted ones): a chain at an MTU of 1200 is a
    /// handful, retransmitted a few times.
    pub max_fragments_per_message: u32,
    /// Fragments of one handshake, all messages together.
    pub max_fragments_per_handshake: u32,
    /// A ClientHello may come in fragments (OpenSSL at a small MTU) only up to this length...
    pub max_fragmented_hello_len: u32,
    /// ...and in this many fragments (retransmissions included).
    pub max_hello_fragments: u32,
    /// Distinct messages one handshake may bring (a server relay receives five: two
    /// ClientHellos, Certificate, ClientKeyExchange, CertificateVerify; a client relay six).
    pub max_messages: usize,
    /// The highest message_seq a handshake reaches, with room.
    pub max_message_seq: u16,
    /// After the handshake: fragments of the peer's final flight taken again (its
    /// retransmission when our last flight was lost), sustained per second...
    pub late_rate: f64,
    /// ...in a burst,
    pub late_burst: f64,
    /// ...in all,
    pub late_max: u32,
    /// ...and only this long after the handshake completed.
    pub late_window: Duration,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_message_len: 16 * 1024,
            max_fragments_per_message: 32,
            max_fragments_per_handshake: 128,
            max_fragmented_hello_len: 2048,
            max_hello_fragments: 16,
            max_messages: 8,
            max_message_seq: 16,
            late_rate: 2.0,
            late_burst: 16.0,
            late_max: 64,
            late_window: Duration::from_secs(60),
        }
    }
}

/// Which side of the handshake a guard stands on: what it may receive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A server relay: receives ClientHello, Certificate, ClientKeyExchange and
    /// CertificateVerify in plaintext; the last three make the final flight it may see again.
    Server,
    /// A client relay: receives HelloVerifyRequest, ServerHello, Certificate,
    /// ServerKeyExchange, CertificateRequest and ServerHelloDone; the server's final flight is
    /// ChangeCipherSpec and an encrypted Finished, so nothing plaintext comes after.
    Client,
}

impl Side {
    fn expects(self, msg_type: u8) -> bool {
        use record::*;
        match self {
            Side::Server => matches!(
                msg_type,
                HANDSHAKE_CLIENT_HELLO
                    | HANDSHAKE_CERTIFICATE
                    | HANDSHAKE_CLIENT_KEY_EXCHANGE
                    | HANDSHAKE_CERTIFICATE_VERIFY
            ),
            Side::Client => matches!(
                msg_type,
                HANDSHAKE_HELLO_VERIFY_REQUEST
                    | HANDSHAKE_SERVER_HELLO
                    | HANDSHAKE_CERTIFICATE
                    | HANDSHAKE_SERVER_KEY_EXCHANGE
                    | HANDSHAKE_CERTIFICATE_REQUEST
                    | HANDSHAKE_SERVER_HELLO_DONE
            ),
        }
    }

    /// Part of the final flight this side receives, which a peer may retransmit after we
    /// consider the handshake complete.
    fn final_flight(self, msg_type: u8) -> bool {
        use record::*;
        self == Side::Server
            && matches!(
                msg_type,
                HANDSHAKE_CERTIFICATE
                    | HANDSHAKE_CLIENT_KEY_EXCHANGE
                    | HANDSHAKE_CERTIFICATE_VERIFY
            )
    }
}

/// What a guard remembers of one handshake message.
#[derive(Debug, Clone, Copy, Default)]
struct MessageTally {
    seq: u16,
    msg_type: u8,
    length: u32,
    fragments: u32,
}

/// One association's plaintext handshake input, checked datagram by datagram before the engine
/// sees it: the relay's own pre-parser. Each fragment counts, zero-length ones too; a datagram
/// with one fragment over a limit is refused whole (nothing of it reaches the engine). Pure,
/// fixed-size, and `now` is a parameter.
#[derive(Debug, Clone, Copy)]
pub struct HandshakeGuard {
    side: Side,
    messages: [MessageTally; 8],
    count: usize,
    fragments: u32,
    /// When the handshake completed: from then on only the final flight, at the late rate.
    established: Option<Instant>,
    late_tokens: f64,
    late_last: Option<Instant>,
    late_total: u32,
}

impl HandshakeGuard {
    pub fn new(side: Side) -> Self {
        HandshakeGuard {
            side,
            messages: [MessageTally::default(); 8],
            count: 0,
            fragments: 0,
            established: None,
            late_tokens: 0.0,
            late_last: None,
            late_total: 0,
        }
    }

    /// The handshake completed at `now`.
    pub fn established(&mut self, now: Instant, limits: &HandshakeLimits) {
        if self.established.is_none() {
            self.established = Some(now);
            self.late_tokens = limits.late_burst;
            self.late_last = Some(now);
        }
    }

    pub fn is_established(&self) -> bool {
        self.established.is_some()
    }

    /// Fragments counted so far, during the handshake and after it.
    pub fn fragments(&self) -> u32 {
        self.fragments.saturating_add(self.late_total)
    }

    fn tally(&self, seq: u16) -> Option<&MessageTally> {
        let count = self.count.min(self.messages.len());
        self.messages[..count].iter().find(|m| m.seq == seq)
    }

    /// Whether the plaintext handshake content of `datagram` may reach the engine. Records of
    /// other kinds pass untouched (the engine authenticates them).
    pub fn check(
        &mut self,
        now: Instant,
        datagram: &[u8],
        limits: &HandshakeLimits,
    ) -> Result<(), Refusal> {
        // First every header, without counting anything: a malformed datagram costs nothing.
        let mut fragments = 0u32;
        for record in record::records(datagram) {
            let record = record.map_err(|_| Refusal::MalformedHandshake)?;
            if !record.is_plaintext_handshake() {
                continue;
            }
            if record.body.is_empty() {
                return Err(Refusal::MalformedHandshake);
            }
            for fragment in record::fragments(record.body) {
                let fragment = fragment.map_err(|_| Refusal::MalformedHandshake)?;
                self.plausible(&fragment, limits)?;
                fragments = fragments.saturating_add(1);
            }
        }
        if fragments == 0 {
            return Ok(());
        }
        if let Some(since) = self.established {
            return self.take_late(now, since, fragments, limits);
        }
        if self.fragments.saturating_add(fragments) > limits.max_fragments_per_handshake {
            return Err(Refusal::HandshakeFragments);
        }
        // Then count, message by message, on a copy: a datagram refused is not counted.
        let mut counted = *self;
        for record in record::records(datagram).flatten() {
            if !record.is_plaintext_handshake() {
                continue;
            }
            for fragment in record::fragments(record.body).flatten() {
                counted.count_fragment(&fragment, limits)?;
            }
        }
        *self = counted;
        Ok(())
    }

    /// One fragment's header against the limits and what this side can receive now.
    fn plausible(&self, f: &Fragment, limits: &HandshakeLimits) -> Result<(), Refusal> {
        if self.established.is_some() {
            // Only the final flight, as it was: same message_seq, type and length.
            let seen = self
                .tally(f.message_seq)
                .is_some_and(|m| m.msg_type == f.msg_type && m.length == f.length);
            if !self.side.final_flight(f.msg_type) || !seen {
                return Err(Refusal::LateHandshake);
            }
        }
        if !self.side.expects(f.msg_type) || f.message_seq > limits.max_message_seq {
            return Err(Refusal::UnexpectedHandshake);
        }
        if f.length > limits.max_message_len {
            return Err(Refusal::HandshakeTooLong);
        }
        if f.msg_type == record::HANDSHAKE_CLIENT_HELLO
            && !f.is_whole()
            && f.length > limits.max_fragmented_hello_len
        {
            return Err(Refusal::FragmentedClientHello);
        }
        if f.is_empty_of_nonempty() {
            return Err(Refusal::EmptyFragment);
        }
        if let Some(m) = self.tally(f.message_seq) {
            if m.msg_type != f.msg_type || m.length != f.length {
                // Not part of the message this sequence number already carries.
                return Err(Refusal::MalformedHandshake);
            }
        }
        Ok(())
    }

    fn count_fragment(&mut self, f: &Fragment, limits: &HandshakeLimits) -> Result<(), Refusal> {
        let count = self.count.min(self.messages.len());
        let index = match self.messages[..count]
            .iter()
            .position(|m| m.seq == f.message_seq)
        {
            Some(index) => index,
            None => {
                if count >= limits.max_messages.min(self.messages.len()) {
                    return Err(Refusal::UnexpectedHandshake);
                }
                self.messages[count] = MessageTally {
                    seq: f.message_seq,
                    msg_type: f.msg_type,
                    length: f.length,
                    fragments: 0,
                };
                self.count = count + 1;
                count
            }
        };
        let message = &mut self.messages[index];
        let cap = if message.msg_type == record::HANDSHAKE_CLIENT_HELLO {
            limits.max_hello_fragments
        } else {
            limits.max_fragments_per_message
        };
        if message.fragments >= cap {
            return Err(Refusal::HandshakeFragments);
        }
        message.fragments += 1;
        self.fragments = self.fragments.saturating_add(1);
        Ok(())
    }

    fn take_late(
        &mut self,
        now: Instant,
        since: Instant,
        fragments: u32,
        limits: &HandshakeLimits,
    ) -> Result<(), Refusal> {
        if now.saturating_duration_since(since) > limits.late_window
            || self.late_total.saturating_add(fragments) > limits.late_max
        {
            return Err(Refusal::LateHandshakeRate);
        }
        if let Some(last) = self.late_last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.late_tokens =
                (self.late_tokens + elapsed * limits.late_rate).min(limits.late_burst);
        }
        self.late_last = Some(now);
        let cost = f64::from(fragments);
        if self.late_tokens < cost {
            return Err(Refusal::LateHandshakeRate);
        }
        self.late_tokens -= cost;
        self.late_total += fragments;
        Ok(())
    }
}

/// What a datagram looks like from its first record header, before any decryption.
pub fn classify(datagram: &[u8]) -> Arrival {
    if record::is_client_hello(datagram) {
        return Arrival::ClientHello;
    }
    match record::first_record(datagram).map(|r| r.content_type) {
        Some(record::CONTENT_HANDSHAKE | record::CONTENT_CHANGE_CIPHER_SPEC) => Arrival::Handshake,
        _ => Arrival::Other,
    }
}

/// Caps audit lines for refused handshakes: a flood of malformed ClientHellos from spoofed
/// addresses must not become a flood of log lines. A token bucket; what it holds back is
/// counted and reported with the next line that goes out.
#[derive(Debug, Clone)]
pub struct AuditLimiter {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
    suppressed: u64,
}

impl AuditLimiter {
    pub fn new(rate: f64, burst: f64) -> Self {
        AuditLimiter {
            rate,
            burst,
            tokens: burst,
            last: None,
            suppressed: 0,
        }
    }

    /// Some(n) when a line may be written now, n being how many were held back before it.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        self.last = Some(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_lines_are_capped_and_the_rest_counted() {
        let t0 = Instant::now();
        let mut limiter = AuditLimiter::new(1.0, 3.0);
        assert_eq!(
            (0..5).map(|_| limiter.allow(t0)).collect::<Vec<_>>(),
            vec![Some(0), Some(0), Some(0), None, None]
        );
        assert_eq!(limiter.allow(t0 + Duration::from_secs(1)), Some(2));
    }

    fn addr(n: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], n))
    }

    fn limits() -> Limits {
        Limits {
            max_associations: 10,
            max_half_open: 4,
            handshake_timeout: Duration::from_secs(5),
            handshake_rate: 1.0,
            handshake_burst: 3.0,
            max_handshake_bytes: 1000,
            idle_timeout: Duration::from_secs(100),
        }
    }

    fn expire(a: &mut Admission, now: Instant) -> Vec<Expiry> {
        let mut out = Vec::new();
        a.expire(now, &mut out);
        out
    }

    #[test]
    fn only_a_client_hello_opens_state() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        assert_eq!(
            a.admit(t0, addr(1), 48, Arrival::Other),
            Err(Refusal::NotClientHello)
        );
        assert_eq!(
            a.admit(t0, addr(1), 100, Arrival::Handshake),
            Err(Refusal::NotClientHello)
        );
        assert_eq!(a.associations(), 0);
        assert_eq!(a.admit(t0, addr(1), 100, Arrival::ClientHello), Ok(()));
        assert_eq!((a.associations(), a.half_open()), (1, 1));
    }

    #[test]
    fn half_open_handshakes_are_bounded_and_expire() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        for port in 1..=4 {
            // distinct sources: the per-source rate does not bite
            let peer = SocketAddr::from(([127, 0, 0, port as u8], port));
            assert_eq!(a.admit(t0, peer, 100, Arrival::ClientHello), Ok(()));
        }
        assert_eq!(
            a.admit(
                t0,
                SocketAddr::from(([127, 0, 0, 9], 9)),
                100,
                Arrival::ClientHello
            ),
            Err(Refusal::HalfOpenLimit)
        );
        assert!(expire(&mut a, t0 + Duration::from_secs(4)).is_empty());
        let gone = expire(&mut a, t0 + Duration::from_secs(5));
        assert_eq!(gone.len(), 4);
        assert!(gone.iter().all(|e| matches!(
            e,
            Expiry::HandshakeTimeout {
                answered: false,
                ..
            }
        )));
        assert_eq!((a.associations(), a.half_open()), (0, 0));
        assert_eq!(a.next_deadline(), None);
    }

    #[test]
    fn one_source_is_rate_limited_and_refills() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        for port in 1..=3 {
            assert_eq!(a.admit(t0, addr(port), 100, Arrival::ClientHello), Ok(()));
        }
        assert_eq!(
            a.admit(t0, addr(4), 100, Arrival::ClientHello),
            Err(Refusal::SourceRateLimit)
        );
        let later = t0 + Duration::from_secs(1);
        assert_eq!(a.admit(later, addr(4), 100, Arrival::ClientHello), Ok(()));
    }

    #[test]
    fn bytes_before_the_handshake_completes_are_bounded() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        assert_eq!(a.admit(t0, addr(1), 400, Arrival::ClientHello), Ok(()));
        assert_eq!(a.admit(t0, addr(1), 500, Arrival::Other), Ok(()));
        assert_eq!(
            a.admit(t0, addr(1), 200, Arrival::Other),
            Err(Refusal::HandshakeBytes)
        );
        a.removed(addr(1));
        assert_eq!((a.associations(), a.half_open()), (0, 0));
    }

    #[test]
    fn an_answered_handshake_that_times_out_is_worth_an_audit_line() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        assert_eq!(
            expire(&mut a, t0 + Duration::from_secs(5)),
            vec![Expiry::HandshakeTimeout {
                peer: addr(1),
                answered: true
            }]
        );
    }

    #[test]
    fn silent_associations_expire_and_activity_keeps_them() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        for port in [1, 2] {
            a.admit(t0, addr(port), 100, Arrival::ClientHello).ok();
            a.established(t0, addr(port));
        }
        assert_eq!(a.half_open(), 0);
        a.activity(t0 + Duration::from_secs(60), addr(2));
        assert_eq!(
            expire(&mut a, t0 + Duration::from_secs(100)),
            vec![Expiry::Idle { peer: addr(1) }]
        );
        assert!(expire(&mut a, t0 + Duration::from_secs(159)).is_empty());
        assert_eq!(
            expire(&mut a, t0 + Duration::from_secs(160)),
            vec![Expiry::Idle { peer: addr(2) }]
        );
        assert_eq!(a.associations(), 0);
    }

    #[test]
    fn an_established_associations_records_lend_its_activity_mark() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        let data = record(23, 1, &[0u8; 40]);
        // No association, then a half-open one: not the fast path's to decide.
        assert!(a.admit_established(t0, addr(1), &data).is_none());
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        assert!(a.admit_established(t0, addr(1), &data).is_none());
        a.established(t0, addr(1));
        // A ClientHello opens a replacement: admit_datagram's too.
        assert!(a.admit_established(t0, addr(1), &hello(0)).is_none());
        // The association's own records are; their mark moves the idle deadline...
        let mark = a.admit_established(t0, addr(1), &data);
        let Some(Ok(mark)) = mark else {
            panic!("an established association's record was not admitted");
        };
        mark.record(t0 + Duration::from_secs(60));
        assert!(expire(&mut a, t0 + Duration::from_secs(100)).is_empty());
        assert_eq!(
            expire(&mut a, t0 + Duration::from_secs(160)),
            vec![Expiry::Idle { peer: addr(1) }]
        );
        // ... and a mark not recorded (nothing authenticated) does not.
        a.admit(t0, addr(2), 100, Arrival::ClientHello).ok();
        a.established(t0, addr(2));
        assert!(matches!(
            a.admit_established(t0, addr(2), &data),
            Some(Ok(_))
        ));
        assert_eq!(
            expire(&mut a, t0 + Duration::from_secs(200)),
            vec![Expiry::Idle { peer: addr(2) }]
        );
    }

    #[test]
    fn a_replacement_handshake_is_half_open_and_may_time_out_alone() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        a.established(t0, addr(1));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(a.admit(t1, addr(1), 100, Arrival::ClientHello), Ok(()));
        assert_eq!(a.half_open(), 1);
        a.activity(t1, addr(1));
        assert_eq!(
            expire(&mut a, t1 + Duration::from_secs(5)),
            vec![Expiry::ReplacementTimeout { peer: addr(1) }]
        );
        assert_eq!((a.associations(), a.half_open()), (1, 0));
        // ... and the association itself still idles out on its own schedule.
        assert_eq!(
            expire(&mut a, t1 + Duration::from_secs(100)),
            vec![Expiry::Idle { peer: addr(1) }]
        );
    }

    #[test]
    fn a_completed_replacement_takes_over() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        a.established(t0, addr(1));
        a.admit(t0, addr(1), 100, Arrival::ClientHello).ok();
        a.admit(t0, addr(1), 300, Arrival::Handshake).ok();
        a.established(t0, addr(1));
        assert_eq!((a.associations(), a.half_open()), (1, 0));
    }

    #[test]
    fn the_association_limit_holds() {
        let t0 = Instant::now();
        let mut a = Admission::new(Limits {
            max_half_open: 100,
            handshake_burst: 100.0,
            ..limits()
        });
        for port in 0..10 {
            a.admit(t0, addr(port), 100, Arrival::ClientHello).ok();
            a.established(t0, addr(port));
        }
        assert_eq!(
            a.admit(t0, addr(99), 100, Arrival::ClientHello),
            Err(Refusal::AssociationLimit)
        );
    }

    #[test]
    fn a_long_random_run_keeps_every_count_consistent_and_bounded() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut now = t0;
        let mut out = Vec::new();
        for _ in 0..100_000 {
            now += Duration::from_millis(next() % 50);
            let peer = SocketAddr::from(([127, 0, (next() % 4) as u8, 1], (next() % 32) as u16));
            match next() % 6 {
                0 => {
                    let _ = a.admit(now, peer, 200, Arrival::ClientHello);
                }
                1 => {
                    let _ = a.admit(now, peer, 300, Arrival::Other);
                }
                2 => a.established(now, peer),
                3 => a.handshake_failed(peer),
                4 => a.removed(peer),
                _ => a.expire(now, &mut out),
            }
            let half_open = a
                .peers
                .values()
                .filter(|p| {
                    matches!(
                        p,
                        Phase::HalfOpen(_)
                            | Phase::Established {
                                replacement: Some(_),
                                ..
                            }
                    )
                })
                .count();
            assert_eq!(a.half_open(), half_open);
            assert!(a.associations() <= 10 + 4);
        }
        // Everything drains: no state or timer outlives its deadline.
        a.expire(now + Duration::from_secs(86_400), &mut out);
        assert_eq!((a.associations(), a.half_open(), a.timers.len()), (0, 0, 0));
    }

    // ---- the pre-parser's limits ------------------------------------------------------------

    /// A DTLS 1.2 record of `content_type` in `epoch`.
    fn record(content_type: u8, epoch: u16, body: &[u8]) -> Vec<u8> {
        let mut out = vec![content_type, 0xfe, 0xfd];
        out.extend_from_slice(&epoch.to_be_bytes());
        out.extend_from_slice(&[0, 0, 0, 0, 0, 1]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// A handshake fragment: type, message length, message_seq, offset, and `data` bytes.
    fn fragment(msg_type: u8, length: u32, seq: u16, offset: u32, data: usize) -> Vec<u8> {
        let mut out = vec![msg_type];
        out.extend_from_slice(&length.to_be_bytes()[1..]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(&offset.to_be_bytes()[1..]);
        out.extend_from_slice(&(data as u32).to_be_bytes()[1..]);
        out.extend(std::iter::repeat_n(0x5a, data));
        out
    }

    /// One epoch-0 handshake record holding one fragment.
    fn hs(msg_type: u8, length: u32, seq: u16, offset: u32, data: usize) -> Vec<u8> {
        record(22, 0, &fragment(msg_type, length, seq, offset, data))
    }

    fn hello(seq: u16) -> Vec<u8> {
        hs(1, 120, seq, 0, 120)
    }

    /// An admission table with `addr(1)` half-open after one whole ClientHello.
    fn half_open(t0: Instant) -> Admission {
        let mut a = Admission::new(Limits {
            max_handshake_bytes: 1 << 20,
            ..limits()
        });
        assert_eq!(a.admit_datagram(t0, addr(1), &hello(0)), Ok(()));
        a
    }

    #[test]
    fn before_the_cookie_a_client_hello_is_taken_only_whole_in_one_record() {
        let t0 = Instant::now();
        let mut a = Admission::new(limits());
        // The attack: a 60 000-byte ClientHello in one-byte fragments at ascending offsets.
        for offset in 0..100 {
            assert_eq!(
                a.admit_datagram(t0, addr(1), &hs(1, 60_000, 0, offset, 1)),
                Err(Refusal::FragmentedClientHello)
            );
        }
        // A whole one beside another record, two in one record, one over the length cap.
        let mut beside = hello(0);
        beside.extend(record(20, 0, &[1]));
        let mut two = fragment(1, 120, 0, 0, 120);
        two.extend(fragment(1, 120, 0, 0, 120));
        for datagram in [beside, record(22, 0, &two)] {
            assert_eq!(
                a.admit_datagram(t0, addr(1), &datagram),
                Err(Refusal::FragmentedClientHello)
            );
        }
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(1, 20_000, 0, 0, 20_000)),
            Err(Refusal::HandshakeTooLong)
        );
        // A small one in fragments (OpenSSL at a small MTU), but not opened by its middle.
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(1, 120, 0, 60, 60)),
            Err(Refusal::FragmentedClientHello)
        );
        assert_eq!(a.associations(), 0, "none of it opened state");
        assert_eq!(a.admit_datagram(t0, addr(2), &hs(1, 120, 0, 0, 60)), Ok(()));
        assert_eq!(
            a.admit_datagram(t0, addr(2), &hs(1, 120, 0, 60, 60)),
            Ok(())
        );
        assert_eq!(a.admit_datagram(t0, addr(1), &hello(0)), Ok(()));
        assert_eq!(a.half_open(), 2);
        // During the handshake, small fragments up to their cap (the amplification finding's
        // 26-byte fragments with message_seq 1), a large one's never.
        let hl = HandshakeLimits::default();
        for _ in 0..hl.max_hello_fragments {
            assert_eq!(a.admit_datagram(t0, addr(1), &hs(1, 120, 1, 0, 1)), Ok(()));
        }
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(1, 120, 1, 0, 1)),
            Err(Refusal::HandshakeFragments)
        );
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(1, 4000, 2, 0, 1)),
            Err(Refusal::FragmentedClientHello)
        );
    }

    #[test]
    fn fragments_are_capped_per_message_and_per_handshake() {
        let t0 = Instant::now();
        let hl = HandshakeLimits::default();
        let mut a = half_open(t0);
        for i in 0..hl.max_fragments_per_message {
            assert_eq!(
                a.admit_datagram(t0, addr(1), &hs(11, 4000, 2, i * 10, 10)),
                Ok(()),
                "fragment {i}"
            );
        }
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(11, 4000, 2, 400, 10)),
            Err(Refusal::HandshakeFragments)
        );
        // Other messages go on until the handshake's cap: 1 ClientHello + 32 so far.
        let mut taken = 1 + hl.max_fragments_per_message;
        'outer: for seq in 3..=4u16 {
            for i in 0..hl.max_fragments_per_message {
                let msg_type = if seq == 3 { 16 } else { 15 };
                if a.admit_datagram(t0, addr(1), &hs(msg_type, 4000, seq, i, 1))
                    == Err(Refusal::HandshakeFragments)
                {
                    break 'outer;
                }
                taken += 1;
            }
        }
        assert_eq!(taken, 1 + 3 * hl.max_fragments_per_message);
        let mut a = half_open(t0);
        // Several fragments in one datagram count one each; over the cap, refused whole.
        let mut body = Vec::new();
        for i in 0..hl.max_fragments_per_message + 1 {
            body.extend(fragment(11, 4000, 2, i, 1));
        }
        assert_eq!(
            a.admit_datagram(t0, addr(1), &record(22, 0, &body)),
            Err(Refusal::HandshakeFragments)
        );
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(11, 4000, 2, 0, 1)),
            Ok(()),
            "the refused datagram counted nothing"
        );
        let limited = HandshakeLimits {
            max_fragments_per_handshake: 3,
            ..hl
        };
        let mut a = Admission::new(limits()).with_handshake_limits(limited);
        a.admit_datagram(t0, addr(1), &hello(0)).expect("hello");
        assert_eq!(a.admit_datagram(t0, addr(1), &hs(11, 40, 2, 0, 1)), Ok(()));
        assert_eq!(a.admit_datagram(t0, addr(1), &hs(16, 40, 3, 0, 1)), Ok(()));
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(15, 40, 4, 0, 1)),
            Err(Refusal::HandshakeFragments)
        );
    }

    #[test]
    fn zero_length_fragments_count_and_empty_pieces_of_a_message_are_refused() {
        let t0 = Instant::now();
        let mut a = half_open(t0);
        for _ in 0..1000 {
            assert_eq!(
                a.admit_datagram(t0, addr(1), &hs(11, 4000, 2, 0, 0)),
                Err(Refusal::EmptyFragment)
            );
        }
        // A zero-length message (ServerHelloDone) in zero-length fragments: each one counts.
        let hl = HandshakeLimits::default();
        let mut guard = HandshakeGuard::new(Side::Client);
        let done = hs(14, 0, 5, 0, 0);
        for _ in 0..hl.max_fragments_per_message {
            assert_eq!(guard.check(t0, &done, &hl), Ok(()));
        }
        assert_eq!(
            guard.check(t0, &done, &hl),
            Err(Refusal::HandshakeFragments)
        );
        assert_eq!(guard.fragments(), hl.max_fragments_per_message);
    }

    #[test]
    fn messages_a_side_never_receives_or_too_long_are_refused() {
        let t0 = Instant::now();
        let hl = HandshakeLimits::default();
        let mut a = half_open(t0);
        for (datagram, refusal) in [
            (hs(2, 40, 1, 0, 40), Refusal::UnexpectedHandshake), // a ServerHello to a server
            (hs(0, 0, 1, 0, 0), Refusal::UnexpectedHandshake),   // HelloRequest
            (hs(11, 40, 17, 0, 40), Refusal::UnexpectedHandshake), // message_seq too high
            (hs(11, 20_000, 2, 0, 100), Refusal::HandshakeTooLong),
            (record(22, 0, &[11, 0, 0]), Refusal::MalformedHandshake),
            (record(22, 0, &[]), Refusal::MalformedHandshake),
            (hs(11, 40, 2, 39, 2), Refusal::MalformedHandshake), // past its message
        ] {
            assert_eq!(a.admit_datagram(t0, addr(1), &datagram), Err(refusal));
        }
        // A second message under a sequence number already used by another.
        assert_eq!(a.admit_datagram(t0, addr(1), &hs(11, 40, 2, 0, 10)), Ok(()));
        assert_eq!(
            a.admit_datagram(t0, addr(1), &hs(16, 40, 2, 10, 10)),
            Err(Refusal::MalformedHandshake)
        );
        // A client relay never takes a ClientHello; distinct messages are capped.
        let mut guard = HandshakeGuard::new(Side::Client);
        assert_eq!(
            guard.check(t0, &hello(0), &hl),
            Err(Refusal::UnexpectedHandshake)
        );
        for seq in 0..hl.max_messages as u16 {
            assert_eq!(guard.check(t0, &hs(11, 10, seq, 0, 10), &hl), Ok(()));
        }
        assert_eq!(
            guard.check(t0, &hs(11, 10, 9, 0, 10), &hl),
            Err(Refusal::UnexpectedHandshake)
        );
        // Application data, alerts and encrypted handshake records pass untouched.
        assert_eq!(guard.check(t0, &record(23, 1, &[0; 40]), &hl), Ok(()));
        assert_eq!(guard.check(t0, &record(22, 1, &[0; 40]), &hl), Ok(()));
    }

    /// The server relay's view of a completed handshake with `addr(1)`: ClientHello twice,
    /// then Certificate (seq 2), ClientKeyExchange (3), CertificateVerify (4).
    fn established(t0: Instant) -> Admission {
        let mut a = half_open(t0);
        a.admit_datagram(t0, addr(1), &hello(1)).expect("hello");
        let mut flight = hs(11, 900, 2, 0, 900);
        flight.extend(hs(16, 66, 3, 0, 66));
        flight.extend(hs(15, 72, 4, 0, 72));
        a.admit_datagram(t0, addr(1), &flight)
            .expect("final flight");
        a.established(t0, addr(1));
        a
    }

    #[test]
    fn after_the_handshake_only_the_final_flight_again_and_at_a_rate() {
        let t0 = Instant::now();
        let hl = HandshakeLimits::default();
        let mut a = established(t0);
        // Not the final flight (type, sequence number or length differ): refused at once.
        for datagram in [
            hs(11, 900, 3, 0, 10),
            hs(16, 67, 3, 0, 10),
            hs(12, 66, 3, 0, 10),
            hs(1, 60_000, 0, 0, 1),
            hs(11, 60_000, 2, 100, 1),
        ] {
            assert!(matches!(
                a.admit_datagram(t0, addr(1), &datagram),
                Err(Refusal::LateHandshake | Refusal::FragmentedClientHello)
            ));
        }
        // The final flight retransmitted, fragment by fragment: a burst, then the rate.
        let cke = hs(16, 66, 3, 0, 66);
        let mut taken = 0;
        while a.admit_datagram(t0, addr(1), &cke).is_ok() {
            taken += 1;
            assert!(taken <= 100, "never refused");
        }
        assert_eq!(taken, hl.late_burst as u32);
        assert_eq!(
            a.admit_datagram(t0, addr(1), &cke),
            Err(Refusal::LateHandshakeRate)
        );
        let later = t0 + Duration::from_millis(500);
        assert_eq!(a.admit_datagram(later, addr(1), &cke), Ok(()));
        assert_eq!(
            a.admit_datagram(later, addr(1), &cke),
            Err(Refusal::LateHandshakeRate)
        );
        // Zero-length fragments: useless, refused; and nothing after the window.
        assert_eq!(
            a.admit_datagram(later, addr(1), &hs(16, 66, 3, 0, 0)),
            Err(Refusal::EmptyFragment)
        );
        let after = t0 + hl.late_window + Duration::from_secs(1);
        assert_eq!(
            a.admit_datagram(after, addr(1), &cke),
            Err(Refusal::LateHandshakeRate)
        );
        // Application data is no concern of the pre-parser.
        assert_eq!(
            a.admit_datagram(after, addr(1), &record(23, 1, &[0; 40])),
            Ok(())
        );
    }

    #[test]
    fn late_fragments_have_a_total_cap_whatever_the_pace() {
        let t0 = Instant::now();
        let hl = HandshakeLimits::default();
        let mut a = established(t0);
        let cke = hs(16, 66, 3, 0, 66);
        let mut taken = 0;
        for i in 0..1000u64 {
            // Every 50 ms for 50 s: within the window, and the rate would allow 116.
            let now = t0 + Duration::from_millis(i * 50);
            if a.admit_datagram(now, addr(1), &cke).is_ok() {
                taken += 1;
            }
        }
        assert_eq!(taken, hl.late_max);
    }

    #[test]
    fn a_client_relay_takes_no_plaintext_handshake_after_its_handshake() {
        let t0 = Instant::now();
        let hl = HandshakeLimits::default();
        let mut guard = HandshakeGuard::new(Side::Client);
        for (seq, msg_type) in [(0, 3), (1, 2), (2, 11), (3, 12), (4, 13), (5, 14)] {
            let len = if msg_type == 14 { 0 } else { 50 };
            assert_eq!(
                guard.check(t0, &hs(msg_type, len, seq, 0, len as usize), &hl),
                Ok(())
            );
        }
        guard.established(t0, &hl);
        for (seq, msg_type) in [(0, 3), (1, 2), (2, 11), (3, 12), (5, 14)] {
            let len = if msg_type == 14 { 0 } else { 50 };
            assert_eq!(
                guard.check(t0, &hs(msg_type, len, seq, 0, len as usize), &hl),
                Err(Refusal::LateHandshake)
            );
        }
        // ChangeCipherSpec and encrypted records are the engine's to judge.
        assert_eq!(guard.check(t0, &record(20, 0, &[1]), &hl), Ok(()));
        assert_eq!(guard.check(t0, &record(22, 1, &[0; 40]), &hl), Ok(()));
    }

    #[test]
    fn an_unproven_address_gets_one_hello_verify_request_per_hello_and_no_more_bytes() {
        let t0 = Instant::now();
        let mut a = half_open(t0);
        let hvr = hs(3, 35, 0, 0, 35); // 60 bytes
        assert_eq!(a.outbound(addr(1), &hvr), Ok(()));
        assert_eq!(a.outbound(addr(1), &hvr), Err(Refusal::Amplification));
        // Another whole ClientHello (a retransmission) earns another.
        a.admit_datagram(t0, addr(1), &hello(0)).expect("hello");
        assert_eq!(a.outbound(addr(1), &hvr), Ok(()));
        assert_eq!(a.outbound(addr(1), &hvr), Err(Refusal::Amplification));
        // No more bytes than it sent (two ClientHellos, 290 bytes; 120 sent).
        assert_eq!(a.outbound(addr(1), &record(21, 0, &[0; 150])), Ok(()));
        assert_eq!(
            a.outbound(addr(1), &record(21, 0, &[0; 10])),
            Err(Refusal::Amplification)
        );
        // A ServerHello: the engine checked the echoed cookie; from now on, no cap.
        let mut flight = hs(2, 70, 1, 0, 70);
        flight.extend(hs(11, 900, 2, 0, 900));
        assert_eq!(a.outbound(addr(1), &flight), Ok(()));
        assert_eq!(a.outbound(addr(1), &record(22, 0, &[0; 1000])), Ok(()));
        // Unknown and established peers are not the table's to cap.
        assert_eq!(a.outbound(addr(9), &hvr), Ok(()));
    }

    #[test]
    fn a_replacement_handshake_is_capped_like_a_first_one() {
        let t0 = Instant::now();
        let mut a = established(t0);
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(a.admit_datagram(t1, addr(1), &hello(0)), Ok(()));
        let hvr = hs(3, 35, 0, 0, 35);
        assert_eq!(a.outbound(addr(1), &hvr), Ok(()));
        assert_eq!(a.outbound(addr(1), &hvr), Err(Refusal::Amplification));
        // The live association's own records (application data) are not capped.
        assert_eq!(a.outbound(addr(1), &record(23, 1, &[0; 500])), Ok(()));
        assert_eq!(
            a.admit_datagram(t1, addr(1), &hs(1, 60_000, 1, 0, 10)),
            Err(Refusal::FragmentedClientHello)
        );
    }
}
