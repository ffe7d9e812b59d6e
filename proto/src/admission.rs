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

use crate::hash::{KeyedMap, keyed_map};

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
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotClientHello => "not_client_hello",
            Refusal::AssociationLimit => "association_limit",
            Refusal::HalfOpenLimit => "half_open_limit",
            Refusal::SourceRateLimit => "source_rate_limit",
            Refusal::HandshakeBytes => "handshake_bytes",
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
}

impl Handshake {
    /// A handshake opened by a ClientHello of `len` bytes.
    fn started(now: Instant, len: usize) -> Self {
        Handshake {
            since: now,
            bytes: len,
            datagrams: 1,
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
}

#[derive(Debug, Clone, Copy)]
enum Phase {
    HalfOpen(Handshake),
    Established {
        last_activity: Instant,
        /// The deadline of this peer's one live idle entry in the timer heap; other entries
        /// for it are stale.
        idle_timer: Instant,
        replacement: Option<Handshake>,
    },
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
    peers: KeyedMap<SocketAddr, Phase>,
    half_open: usize,
    buckets: KeyedMap<IpAddr, Bucket>,
    /// (deadline, peer); entries may be stale and are re-checked when they come due.
    timers: BinaryHeap<Reverse<(Instant, SocketAddr)>>,
}

impl Admission {
    pub fn new(limits: Limits) -> Self {
        Admission {
            limits,
            peers: keyed_map(0),
            half_open: 0,
            buckets: keyed_map(0),
            timers: BinaryHeap::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
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
        match self.peers.get_mut(&peer) {
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
                self.peers
                    .insert(peer, Phase::HalfOpen(Handshake::started(now, len)));
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
                    if let Some(Phase::Established { replacement, .. }) = self.peers.get_mut(&peer)
                    {
                        *replacement = Some(Handshake::started(now, len));
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
        match self.peers.get_mut(&peer) {
            Some(phase @ Phase::HalfOpen(_)) => {
                *phase = Phase::Established {
                    last_activity: now,
                    idle_timer: now + idle,
                    replacement: None,
                };
                self.half_open -= 1;
                self.timers.push(Reverse((now + idle, peer)));
            }
            Some(Phase::Established {
                last_activity,
                replacement,
                ..
            }) => {
                *last_activity = now;
                if replacement.take().is_some() {
                    self.half_open -= 1;
                }
            }
            // Nothing the engine could have completed without being admitted.
            None => {}
        }
    }

    /// Authenticated traffic arrived on (or was sent into) an established association.
    pub fn activity(&mut self, now: Instant, peer: SocketAddr) {
        if let Some(Phase::Established { last_activity, .. }) = self.peers.get_mut(&peer) {
            *last_activity = now;
        }
    }

    /// A handshake failed in the engine: a first one is gone, a replacement leaves the
    /// established association as it was.
    pub fn handshake_failed(&mut self, peer: SocketAddr) {
        match self.peers.get_mut(&peer) {
            Some(Phase::HalfOpen(_)) => {
                self.peers.remove(&peer);
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
        match self.peers.remove(&peer) {
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
            let Entry::Occupied(mut entry) = self.peers.entry(peer) else {
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
}
