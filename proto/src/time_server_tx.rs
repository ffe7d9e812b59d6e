//! The time server's own transmit time for a basic reply, asked of it in its interleaved mode.
//!
//! A time server in basic mode reads its transmit timestamp (T3) before it sends, and the rest
//! of its send (the system call, the route lookup, cold after an idle second) happens after:
//! chronyd 4.3 on the development VM takes 5-22 us (p50, idle pace) from its T3 to its kernel
//! transmit timestamp (docs/TIMESTAMPS.md). A basic client counts all of it as way back, so its
//! offset is off by half. A relay's own reply departure is predicted too (it must carry it).
//! But the time server can say when a reply left: chronyd (4.0 and later) keeps the kernel
//! transmit timestamp of its reply to any request "formed in the interleaved mode" (version 4,
//! origin with its lowest bit set, receive field unlike the transmit field), and sends it as the
//! transmit timestamp of an interleaved reply to a later request whose origin is that reply's
//! receive timestamp; a server relay in between translates such a request and adds the
//! residence it measured for that reply. So a relay, at a device's pace:
//!
//! 1. marks a basic client's request: origin := [`MARK`] (lowest bit set, no receive timestamp
//!    of any server), which a basic reply never echoes (it echoes the transmit timestamp);
//! 2. holds the reply, and sends its next hop a query: origin := the reply's receive
//!    timestamp, receive and transmit := two values of its own;
//! 3. the interleaved answer (its origin is the query's receive field) carries the time the
//!    reply really left the next hop: the held reply's T3 moves by the difference ([`Shift`]),
//!    both read off the time server's clock, so nothing is assumed of the relay's. Then the
//!    reply goes on, its own residence (the hold included) corrected as any other.
//!
//! The client relay does it through the server relay ([`NextHop::ServerRelay`]: chronyd's lag
//! and the server relay's prediction error both go); the server relay, for requests that reach
//! it unmarked, of the time server ([`NextHop::TimeServer`]). A next hop that answers in basic
//! mode (ntpd, ntpsec, a chronyd without the client log), a lost query or an unbelievable shift
//! releases the reply as it is (today's correction). Three such in a row and no request is
//! marked for [`RETRY_AFTER`].
//!
//! At most one exchange is measured at a time and [`RATE`] a second (burst [`BURST`]): each one
//! costs the time server a second exchange and two entries of its interleaved table (2 048 by
//! default in chronyd, `clientloglimit`), which its interleaved clients need to outlive their
//! polling interval. Devices polling every few seconds are all measured; under load a sample is,
//! and the others keep their predicted T3.

use std::time::{Duration, Instant};

use crate::ntp::{self, NtpTimestamp, ReplyView, RequestView};

/// The origin a marked request carries: lowest bit set (what chronyd looks for), and no receive
/// timestamp any server sends (it is in 1900).
pub const MARK: NtpTimestamp = NtpTimestamp(1);

/// How long a reply is held for the query's answer before it goes on without it. Far above a
/// loopback or LAN round trip; a reply is late by this much only when the query was lost.
pub const HOLD_LIMIT: Duration = Duration::from_millis(10);

/// The longest a reply is held behind a long path (a client relay's tunnel across a WAN):
/// the device's own timeout is a second or more, and the hold is corrected for like any
/// residence.
pub const MAX_HOLD_LIMIT: Duration = Duration::from_millis(100);

/// How long a marked request's reply is looked for (then the next request may be marked).
pub const MARK_LIMIT: Duration = Duration::from_secs(1);

/// Measured exchanges per second, sustained.
pub const RATE: u32 = 8;

/// Measured exchanges in a burst (devices that poll at the same moment).
pub const BURST: u32 = 16;

/// A time server that answered this many queries in a row in basic mode is not asked again
/// for [`RETRY_AFTER`].
pub const BASIC_ANSWERS_TO_GIVE_UP: u32 = 3;
pub const RETRY_AFTER: Duration = Duration::from_secs(600);

/// The time server's send lag is believed up to this (a clock step in between, or another
/// reply's timestamp, gives more).
pub const MAX_LAG: Duration = Duration::from_millis(10);

/// A lag below zero by less than this is the time server's random fill of the bits below its
/// precision (chronyd's), and taken as zero.
const FUZZ: Duration = Duration::from_micros(1);

/// How far a held reply's T3 moves when the answer comes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// Later: the time server's send lag (or, behind a server relay, the lag its prediction
    /// missed).
    Later(Duration),
    /// Earlier: behind a server relay only, whose predicted departure was later than the one
    /// it measured.
    Earlier(Duration),
}

impl Shift {
    /// A reply residence with this shift added; None if it would be negative.
    pub fn apply(self, residence: Duration) -> Option<Duration> {
        match self {
            Shift::Later(by) => residence.checked_add(by),
            Shift::Earlier(by) => residence.checked_sub(by),
        }
    }
}

/// Whom the queries reach, which says what their answers' T3 is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextHop {
    /// The time server itself (the server relay): T3 is its kernel transmit time, never
    /// earlier than the T3 it wrote.
    TimeServer,
    /// A server relay (the client relay): T3 is the time server's kernel transmit time plus
    /// the server relay's measured residence, which may be earlier or later than the
    /// residence it predicted for the held reply.
    ServerRelay,
}

/// A reply held for its query's answer.
#[derive(Debug, Clone)]
pub struct Held<R> {
    /// Whatever the caller needs to send it on (its route).
    pub route: R,
    pub reply: [u8; ntp::HEADER_LEN],
    t3: NtpTimestamp,
    query_receive: u64,
    query_transmit: u64,
    deadline: Instant,
}

#[derive(Debug, Clone)]
enum Slot<R> {
    Free,
    /// A marked request is out: its transmit timestamp, and until when its reply is looked for.
    Marked {
        transmit: u64,
        until: Instant,
    },
    Held(Held<R>),
}

/// What became of a reply from the time server.
#[derive(Debug, Clone)]
pub enum Answer<R> {
    /// Not a query's answer: the caller routes it.
    NotOurs,
    /// The held reply goes on, with the time server's send lag to correct its T3 by (`Some`),
    /// or without (`None`: answered in basic mode, or a lag that cannot be believed).
    Release(Held<R>, Option<Shift>),
    /// A query's answer for a reply no longer held (released at its deadline).
    Stale,
}

/// The measuring of the time server's transmit times: which request to mark, the held reply,
/// the query and its answer. Driven by the server relay's forward path; no clock of its own.
#[derive(Debug, Clone)]
pub struct TimeServerTx<R> {
    enabled: bool,
    slot: Slot<R>,
    next_hop: NextHop,
    /// Generic cell rate: the theoretical arrival time of the next measurement.
    next_allowed: Option<Instant>,
    /// Queries answered in basic mode or not at all, in a row.
    basic_answers: u32,
    retry_at: Option<Instant>,
    /// The last query's answer keys, after its reply was released at the deadline: a late
    /// answer is recognised (and dropped) rather than counted as an unmatched reply.
    stale: Option<(u64, u64)>,
}

impl<R> Default for TimeServerTx<R> {
    fn default() -> Self {
        TimeServerTx {
            enabled: false,
            next_hop: NextHop::TimeServer,
            slot: Slot::Free,
            next_allowed: None,
            basic_answers: 0,
            retry_at: None,
            stale: None,
        }
    }
}

impl<R> TimeServerTx<R> {
    pub fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        if !on {
            self.slot = Slot::Free;
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn set_next_hop(&mut self, next_hop: NextHop) {
        self.next_hop = next_hop;
    }

    /// A request about to go to the time server: marks it (sets its origin to [`MARK`]) when it
    /// is a plain NTPv4 basic request, nothing else is being measured and the rate allows.
    /// `translated`: its origin was an interleaved client's, translated back (never marked).
    /// True when marked: its reply is then to be [`TimeServerTx::hold`]'s.
    pub fn mark(
        &mut self,
        now: Instant,
        request: &RequestView,
        translated: bool,
        datagram: &mut [u8],
    ) -> bool {
        if !self.enabled || translated || datagram.len() != ntp::HEADER_LEN {
            return false;
        }
        // Version 4 only (chronyd answers nothing else interleaved); an origin with its lowest
        // bit set may be an interleaved request the relay did not translate (left as it is);
        // a request whose receive and transmit fields are equal could not be marked.
        if request.version != 4 || request.origin.0 & 1 == 1 || request.receive == request.transmit
        {
            return false;
        }
        if let Slot::Marked { until, .. } = self.slot
            && until <= now
        {
            self.slot = Slot::Free;
        }
        if !matches!(self.slot, Slot::Free) || self.retry_at.is_some_and(|at| now < at) {
            return false;
        }
        let interval = Duration::from_secs(1) / RATE;
        let tolerance = interval * (BURST - 1);
        let tat = self.next_allowed.map_or(now, |t| t.max(now));
        if tat.saturating_duration_since(now) > tolerance {
            return false;
        }
        if !ntp::set_origin(datagram, MARK) {
            return false;
        }
        self.next_allowed = Some(tat + interval);
        self.slot = Slot::Marked {
            transmit: request.transmit.0,
            until: now + MARK_LIMIT,
        };
        true
    }

    /// The reply to a marked request (keyed by its transmit timestamp): returns the query to
    /// send the time server when the reply is held (then it comes back with [`Self::answer`]
    /// or, `limit` from now, [`Self::expire`]); None when it goes on at once.
    pub fn hold(
        &mut self,
        now: Instant,
        limit: Duration,
        transmit: u64,
        reply: &ReplyView,
        datagram: &[u8],
        route: R,
    ) -> Result<[u8; ntp::HEADER_LEN], R> {
        let marked = matches!(self.slot, Slot::Marked { transmit: t, .. } if t == transmit);
        if !marked {
            return Err(route);
        }
        self.slot = Slot::Free;
        // A kiss-o'-death or a reply with more than a header is not held: nothing to measure.
        let Some(bytes) = datagram.first_chunk::<{ ntp::HEADER_LEN }>() else {
            return Err(route);
        };
        if datagram.len() != ntp::HEADER_LEN || reply.stratum == 0 || reply.receive.0 & 1 == 0 {
            return Err(route);
        }
        // The query's own fields, unlike each other and any client's (derived from the marked
        // request's transmit timestamp, which is unique among those outstanding).
        let query_receive = transmit.rotate_left(32) ^ 0x6e74_702d_6474_6c73;
        let query_transmit = !query_receive;
        let mut query = ntp::build_request(NtpTimestamp(query_transmit));
        ntp::set_origin(&mut query, reply.receive);
        ntp::set_receive(&mut query, NtpTimestamp(query_receive));
        self.slot = Slot::Held(Held {
            route,
            reply: *bytes,
            t3: reply.transmit,
            query_receive,
            query_transmit,
            deadline: now + limit,
        });
        self.stale = None;
        Ok(query)
    }

    /// A reply from the time server, checked: whether it answers the query.
    pub fn answer(&mut self, now: Instant, reply: &ReplyView) -> Answer<R> {
        let origin = reply.origin.0;
        if let Some((receive, transmit)) = self.stale
            && (origin == receive || origin == transmit)
        {
            self.stale = None;
            return Answer::Stale;
        }
        let Slot::Held(held) = &self.slot else {
            return Answer::NotOurs;
        };
        let interleaved = origin == held.query_receive;
        if !interleaved && origin != held.query_transmit {
            return Answer::NotOurs;
        }
        let Slot::Held(held) = std::mem::replace(&mut self.slot, Slot::Free) else {
            return Answer::NotOurs;
        };
        if !interleaved {
            self.unmeasured(now);
            return Answer::Release(held, None);
        }
        self.basic_answers = 0;
        let shift = shift(self.next_hop, held.t3, reply.transmit);
        Answer::Release(held, shift)
    }

    /// A query answered in basic mode, or not in time: after a few in a row, the next hop is
    /// not asked for a while (a time server that cannot say, a path too long to wait for).
    fn unmeasured(&mut self, now: Instant) {
        self.basic_answers += 1;
        if self.basic_answers >= BASIC_ANSWERS_TO_GIVE_UP {
            self.basic_answers = 0;
            self.retry_at = Some(now + RETRY_AFTER);
        }
    }

    /// A held reply whose query was not answered by its deadline goes on as it is.
    pub fn expire(&mut self, now: Instant) -> Option<Held<R>> {
        match &self.slot {
            Slot::Held(held) if held.deadline <= now => {}
            _ => return None,
        }
        let Slot::Held(held) = std::mem::replace(&mut self.slot, Slot::Free) else {
            return None;
        };
        self.stale = Some((held.query_receive, held.query_transmit));
        self.unmeasured(now);
        Some(held)
    }

    /// When [`Self::expire`] is next due.
    pub fn next_deadline(&self) -> Option<Instant> {
        match &self.slot {
            Slot::Held(held) => Some(held.deadline),
            _ => None,
        }
    }
}

/// How far the held reply's T3 (`t3`) moves to the answer's (`transmitted`), if believable:
/// from the time server, its send lag (never below zero but for its random fill); from a
/// server relay, either way.
fn shift(next_hop: NextHop, t3: NtpTimestamp, transmitted: NtpTimestamp) -> Option<Shift> {
    let units = transmitted.0.wrapping_sub(t3.0) as i64;
    let by = ntp::duration_of_units(units.unsigned_abs());
    if by > MAX_LAG {
        return None;
    }
    match (units < 0, next_hop) {
        (false, _) => Some(Shift::Later(by)),
        (true, NextHop::ServerRelay) => Some(Shift::Earlier(by)),
        (true, NextHop::TimeServer) => (by < FUZZ).then_some(Shift::Later(Duration::ZERO)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntp::{check_reply, check_request};

    const T1: u64 = 0xE000_0000_1234_5678;
    const T2: u64 = 0xE000_0001_0000_0001;
    const T3: u64 = 0xE000_0001_0001_0000;

    fn request() -> [u8; 48] {
        ntp::build_request(NtpTimestamp(T1))
    }

    fn reply(origin: u64, receive: u64, transmit: u64) -> [u8; 48] {
        let mut p = [0u8; 48];
        p[0] = (4 << 3) | 4;
        p[1] = 2;
        p[24..32].copy_from_slice(&origin.to_be_bytes());
        p[32..40].copy_from_slice(&receive.to_be_bytes());
        p[40..48].copy_from_slice(&transmit.to_be_bytes());
        p
    }

    fn on() -> TimeServerTx<u8> {
        let mut tx = TimeServerTx::default();
        tx.set_enabled(true);
        tx
    }

    /// Marks the request, holds its reply; returns the query.
    fn marked_and_held(tx: &mut TimeServerTx<u8>, now: Instant) -> [u8; 48] {
        let mut datagram = request();
        let view = check_request(&datagram).unwrap();
        assert!(tx.mark(now, &view, false, &mut datagram));
        let marked = check_request(&datagram).unwrap();
        assert_eq!(marked.origin, MARK);
        assert_eq!(marked.transmit, view.transmit, "its key is untouched");
        let answer = reply(T1, T2, T3);
        let query = tx
            .hold(
                now,
                HOLD_LIMIT,
                T1,
                &check_reply(&answer).unwrap(),
                &answer,
                7,
            )
            .expect("held");
        let q = check_request(&query).unwrap();
        assert_eq!(q.version, 4);
        assert_eq!(q.origin, NtpTimestamp(T2), "asks for the held reply");
        assert_ne!(q.receive, q.transmit);
        query
    }

    #[test]
    fn the_interleaved_answer_moves_the_held_replys_t3_by_the_time_servers_lag() {
        let now = Instant::now();
        let mut tx = on();
        let query = marked_and_held(&mut tx, now);
        let q = check_request(&query).unwrap();
        let lag_units = ntp::ntp_units(Duration::from_micros(12));
        let interleaved = reply(q.receive.0, T2 + 0x1000, T3 + lag_units);
        match tx.answer(now, &check_reply(&interleaved).unwrap()) {
            Answer::Release(held, Some(Shift::Later(lag))) => {
                assert_eq!(held.route, 7);
                assert_eq!(held.reply, reply(T1, T2, T3), "as the time server sent it");
                assert!(lag.abs_diff(Duration::from_micros(12)) < Duration::from_nanos(2));
            }
            other => panic!("not released with a lag: {other:?}"),
        }
        assert_eq!(tx.next_deadline(), None);
    }

    #[test]
    fn a_basic_answer_releases_the_reply_unchanged_and_three_stop_the_marking() {
        let mut now = Instant::now();
        let mut tx = on();
        for _ in 0..BASIC_ANSWERS_TO_GIVE_UP {
            let query = marked_and_held(&mut tx, now);
            let q = check_request(&query).unwrap();
            let basic = reply(q.transmit.0, T2 + 2, T3 + 2);
            match tx.answer(now, &check_reply(&basic).unwrap()) {
                Answer::Release(held, None) => assert_eq!(held.reply, reply(T1, T2, T3)),
                other => panic!("{other:?}"),
            }
            now += Duration::from_secs(1);
        }
        let mut datagram = request();
        let view = check_request(&datagram).unwrap();
        assert!(!tx.mark(now, &view, false, &mut datagram), "given up");
        assert_eq!(datagram, request());
        assert!(
            tx.mark(now + RETRY_AFTER, &view, false, &mut datagram),
            "asked again"
        );
    }

    #[test]
    fn an_unanswered_query_releases_the_reply_at_its_deadline_and_its_late_answer_is_dropped() {
        let now = Instant::now();
        let mut tx = on();
        let query = marked_and_held(&mut tx, now);
        assert_eq!(tx.next_deadline(), Some(now + HOLD_LIMIT));
        assert!(
            tx.expire(now + HOLD_LIMIT - Duration::from_nanos(1))
                .is_none()
        );
        let held = tx.expire(now + HOLD_LIMIT).expect("released");
        assert_eq!(held.reply, reply(T1, T2, T3));
        let q = check_request(&query).unwrap();
        let late = reply(q.receive.0, T2 + 2, T3 + 5);
        assert!(matches!(
            tx.answer(now, &check_reply(&late).unwrap()),
            Answer::Stale
        ));
        assert!(matches!(
            tx.answer(now, &check_reply(&late).unwrap()),
            Answer::NotOurs
        ));
    }

    #[test]
    fn only_plain_basic_v4_requests_are_marked_one_at_a_time_and_at_the_rate() {
        let now = Instant::now();
        let mut tx = on();
        let check = |tx: &mut TimeServerTx<u8>, mut datagram: Vec<u8>, translated| {
            let view = check_request(&datagram).unwrap();
            tx.mark(now, &view, translated, &mut datagram)
        };
        let mut v3 = request();
        v3[0] = (3 << 3) | 3;
        assert!(!check(&mut tx, v3.to_vec(), false), "NTPv3");
        let mut xleave = request();
        xleave[24..32].copy_from_slice(&T2.to_be_bytes());
        assert!(
            !check(&mut tx, xleave.to_vec(), false),
            "origin with bit 0 set"
        );
        assert!(!check(&mut tx, request().to_vec(), true), "translated");
        let mut mac = request().to_vec();
        mac.extend_from_slice(&[0; 20]);
        assert!(!check(&mut tx, mac, false), "MAC");
        let mut equal = request();
        equal[32..40].copy_from_slice(&T1.to_be_bytes());
        assert!(!check(&mut tx, equal.to_vec(), false), "receive = transmit");
        let mut off = TimeServerTx::default();
        assert!(!check(&mut off, request().to_vec(), false), "disabled");

        assert!(check(&mut tx, request().to_vec(), false));
        assert!(!check(&mut tx, request().to_vec(), false), "one at a time");
        // The marked request's reply never came: the slot frees after MARK_LIMIT.
        let later = now + MARK_LIMIT;
        let mut counted = 0;
        for i in 0..(BURST * 2) {
            let mut datagram = ntp::build_request(NtpTimestamp(T1 + u64::from(i)));
            let view = check_request(&datagram).unwrap();
            if tx.mark(later, &view, false, &mut datagram) {
                counted += 1;
                // Its reply is a kiss-o'-death: not held, the slot frees.
                let mut kod = reply(T1 + u64::from(i), T2, T3);
                kod[1] = 0;
                assert!(
                    tx.hold(
                        later,
                        HOLD_LIMIT,
                        T1 + u64::from(i),
                        &check_reply(&kod).unwrap(),
                        &kod,
                        1
                    )
                    .is_err()
                );
            }
        }
        // The credit spent at `now` is back a second later: a burst, then none until the rate
        // allows.
        assert_eq!(counted, BURST, "the burst, then the rate");
    }

    #[test]
    fn lags_below_zero_or_beyond_belief_are_not_used() {
        let lag = |t3, transmitted| shift(NextHop::TimeServer, t3, transmitted);
        let t3 = NtpTimestamp(T3);
        let zero = Some(Shift::Later(Duration::ZERO));
        assert_eq!(lag(t3, t3), zero);
        let fuzz = ntp::ntp_units(Duration::from_nanos(200));
        assert_eq!(lag(t3, NtpTimestamp(T3 - fuzz)), zero);
        let back = ntp::ntp_units(Duration::from_micros(5));
        assert_eq!(lag(t3, NtpTimestamp(T3 - back)), None);
        let far = ntp::ntp_units(MAX_LAG + Duration::from_micros(1));
        assert_eq!(lag(t3, NtpTimestamp(T3 + far)), None);
        // Behind a server relay, a departure it predicted too late moves T3 back.
        let relay = |transmitted| shift(NextHop::ServerRelay, t3, transmitted);
        match relay(NtpTimestamp(T3 - back)) {
            Some(Shift::Earlier(by)) => {
                assert!(by.abs_diff(Duration::from_micros(5)) < Duration::from_nanos(2))
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(relay(NtpTimestamp(T3 - far)), None);
        assert_eq!(
            Shift::Earlier(Duration::from_micros(5)).apply(Duration::from_micros(3)),
            None,
            "never a negative residence"
        );
    }

    #[test]
    fn unanswered_queries_in_a_row_stop_the_marking_too() {
        let mut now = Instant::now();
        let mut tx = on();
        for _ in 0..BASIC_ANSWERS_TO_GIVE_UP {
            marked_and_held(&mut tx, now);
            assert!(tx.expire(now + HOLD_LIMIT).is_some());
            now += Duration::from_secs(1);
        }
        let mut datagram = request();
        let view = check_request(&datagram).unwrap();
        assert!(!tx.mark(now, &view, false, &mut datagram), "given up");
    }
}
