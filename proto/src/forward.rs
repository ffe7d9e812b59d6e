//! One forward path for NTP requests and their replies, used by both relays.
//!
//! A relay multiplexes many requesters over one path (local sockets over one DTLS association
//! on the client side, DTLS peers over one socket to the time server on the server side), and
//! the only thing tying a reply to its request is a timestamp. Each step here does the same
//! checks in the same order on both relays:
//!
//! - a request: NTP checks ([`ntp::check_request`]), then remembered in the [`PendingTable`]
//!   under its transmit timestamp (and, for chronyd's interleaved mode, its receive field);
//! - it leaves: [`Forward::request_sent`] notes when, for the round trip and the residence time;
//!   once the kernel says when it really went ([`Forward::departed`], its transmit timestamp),
//!   that time replaces the clock read;
//! - its reply: NTP checks, then matched by origin to the request and its requester; the round
//!   trip sampled;
//! - the reply leaves: [`Forward::reply_sent`], right before it goes on: its receive and
//!   transmit timestamps are corrected for the time the exchange spent in this relay
//!   ([`crate::residence`]), unless that cannot be done safely. Its departure is predicted: the
//!   clock read plus the send lag the kernel's transmit timestamps showed on earlier replies
//!   ([`SendLag`]); the real one, once known, refines what an interleaved reply will use.
//!
//! A request whose origin is a receive timestamp this relay corrected (chronyd's interleaved
//! mode) gets the original back before it goes on, so the time server recognises it.
//!
//! A basic client's exchange may also be measured at the time server
//! ([`crate::time_server_tx`]): the request is marked, its reply held until the next hop (the
//! server relay, or on the server relay the time server) has said when it really left, and
//! then corrected for that too.
//!
//! Every drop lands in exactly one counter (what is sent is counted by the shell that sends it). Nothing here allocates or locks per datagram: the
//! table's maps are sized up front, the round trip goes into atomics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::debug;

use crate::ntp::{self, ReplyView, RequestView};
use crate::pending::{Matched, PendingTable};
use crate::residence::{
    self, Corrected, Direction, Observer, Outcome, Residences, SendLag, Translation, Translations,
    Unchanged,
};
use crate::stats::{Counter, RttGauge, Stats};
use crate::time_server_tx::{self, Answer, NextHop, Shift, TimeServerTx};

/// What a relay keeps with each outstanding request.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// When the request arrived (the kernel's receive timestamp where there is one).
    pub request_rx: SystemTime,
    /// When it left for the next hop, once it has.
    pub request_tx: Option<SystemTime>,
    /// Likewise on the monotonic clock, for the round trip.
    sent: Option<Instant>,
    /// The request's origin was a receive timestamp this relay had corrected (interleaved
    /// mode) and was translated back: the residence here of the reply that carried it, whose
    /// transmit time an interleaved reply to this request carries.
    pub previous_reply: Option<Duration>,
    /// The request was marked for the time server's transmit timestamp (its reply is held).
    marked: bool,
}

/// Where a reply goes, and what its last step needs.
#[derive(Debug, Clone, Copy)]
pub struct Route<A> {
    pub to: A,
    pub stamp: ReplyStamp,
}

/// What [`Forward::reply_sent`] needs of a reply: its exchange and when the reply arrived.
#[derive(Debug, Clone, Copy)]
pub struct ReplyStamp {
    pub exchange: Exchange,
    pub reply_rx: SystemTime,
    /// Basic or interleaved: which key of the request the reply's origin matched.
    pub matched: Matched,
    /// The time server's own send lag for this basic reply, when it gave it.
    pub time_server_lag: Option<crate::time_server_tx::Shift>,
}

/// What became of a datagram from the time server ([`Forward::time_server_reply`]).
#[derive(Debug)]
pub enum ReplyFate<A> {
    /// It goes on now, in the buffer it came in (corrected by [`Forward::reply_sent`]).
    Route(Route<A>),
    /// It is held for the time server's transmit timestamp: this query goes to the time server.
    Held { query: [u8; ntp::HEADER_LEN] },
    /// The answer to a query: the reply it held goes on now, in these bytes.
    Released {
        route: Route<A>,
        reply: [u8; ntp::HEADER_LEN],
    },
    /// Dropped (counted), or a late answer to a query.
    Dropped,
}

/// A datagram of this path on its way out, for the shell to report back with the kernel's
/// transmit timestamp ([`Forward::departed`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Departure {
    /// The clock read it was stamped with: its transmit timestamp cannot be earlier.
    pub read: SystemTime,
    pub what: Departing,
    /// Whether its kernel transmit timestamp is wanted ([`SendLag::due`]): every datagram at a
    /// device's pace, a sample under load. The others leave at their predicted time.
    pub measure: bool,
    /// What a clock read right before the send may move ([`Departure::restamp`]).
    pub movable: Movable,
}

/// How much of a departure's stamp a later clock read may move. Only a datagram sent as it is
/// (not encrypted) can be restamped: a DTLS record's bytes are fixed once it is sealed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Movable {
    /// Neither: a request, or a record (its reply was stamped before encryption).
    Fixed,
    /// The clock read only: the reply's transmit timestamp is not its own departure (an
    /// interleaved reply carries the previous one's) or was left as the time server sent it.
    Read,
    /// The clock read and the reply's transmit timestamp, stamped from it (a corrected basic
    /// reply).
    ReadAndTransmit,
}

impl Departure {
    /// The datagram is about to be sent, and the clock read right before it says `later`:
    /// whatever happened since the stamp (the rest of the pass, the flush's own work) is not
    /// left to the prediction. A corrected basic reply's T3 moves forward by the difference,
    /// and [`Departure::read`] with it, so the send lag later measured from it is the system
    /// call's alone, which is what the next prediction adds. Nothing moves backwards, and a
    /// [`Movable::Fixed`] departure (a record, a request) is left alone.
    pub fn restamp(&mut self, datagram: &mut [u8], later: SystemTime) {
        let Ok(delay) = later.duration_since(self.read) else {
            return;
        };
        match self.movable {
            Movable::Fixed => return,
            Movable::Read => {}
            Movable::ReadAndTransmit => {
                if !ntp::advance_transmit(datagram, delay) {
                    return;
                }
            }
        }
        self.read = later;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Departing {
    /// A request, by its transmit timestamp (the pending table's key).
    Request { transmit: u64 },
    /// A reply received at `received`; `corrected_receive` is the receive timestamp this
    /// relay wrote into it, under which its translation for an interleaved request is kept.
    Reply {
        received: SystemTime,
        corrected_receive: Option<ntp::NtpTimestamp>,
    },
}

/// What [`Forward::reply_sent`] did to a reply, and how to report its departure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplySent {
    pub outcome: Outcome,
    /// For a reply that is sealed into a record before it is sent ([`Movable::Fixed`]).
    pub departure: Departure,
}

impl ReplySent {
    /// The departure of a reply sent as it is, not encrypted (the client relay's to its local
    /// clients): restampable ([`Departure::restamp`]).
    pub fn unencrypted(&self) -> Departure {
        let movable = match self.outcome {
            Outcome::Corrected(Corrected::Basic | Corrected::TimeServerTx) => {
                Movable::ReadAndTransmit
            }
            _ => Movable::Read,
        };
        Departure {
            movable,
            ..self.departure
        }
    }
}

pub struct Forward<A> {
    pending: PendingTable<A, Exchange>,
    stats: Arc<Stats>,
    rtt: Arc<RttGauge>,
    /// Whether replies' timestamps are corrected for the residence here (on by default).
    correction: bool,
    translations: Translations,
    /// Clock read -> kernel transmit timestamp, measured on this path's requests and replies.
    request_lag: SendLag,
    reply_lag: SendLag,
    observer: Option<Arc<dyn Observer>>,
    time_server_tx: TimeServerTx<Route<A>>,
}

impl<A: Copy + Eq + std::fmt::Debug> Forward<A> {
    /// `capacity` outstanding requests, each waiting at most `ttl` for its reply.
    pub fn new(capacity: usize, ttl: Duration, stats: Arc<Stats>, rtt: Arc<RttGauge>) -> Self {
        Forward {
            pending: PendingTable::new(capacity, ttl),
            stats,
            rtt,
            correction: true,
            translations: Translations::default(),
            request_lag: SendLag::default(),
            reply_lag: SendLag::default(),
            observer: None,
            time_server_tx: TimeServerTx::default(),
        }
    }

    /// Whether basic exchanges are measured at the time server too ([`crate::time_server_tx`]):
    /// only on a path whose next hop is the time server, and only while replies are corrected.
    /// `next_hop`: the time server (the server relay) or a server relay (the client relay).
    pub fn set_time_server_tx(&mut self, on: bool, next_hop: NextHop) {
        self.time_server_tx.set_enabled(on);
        self.time_server_tx.set_next_hop(next_hop);
    }

    /// Turns the residence correction of replies on or off. Translations already made still
    /// apply to the requests that echo them.
    pub fn set_correction(&mut self, on: bool) {
        self.correction = on;
        if !on {
            self.time_server_tx.set_enabled(false);
        }
    }

    pub fn correction(&self) -> bool {
        self.correction
    }

    /// Where residence times and correction outcomes are reported.
    pub fn set_observer(&mut self, observer: Arc<dyn Observer>) {
        self.observer = Some(observer);
    }

    /// A request from `from`, received at `rx`: checked and remembered. Returns its view (the
    /// transmit timestamp is its key) when it may go on, None when it was dropped (counted).
    pub fn request(
        &mut self,
        now: Instant,
        rx: SystemTime,
        from: A,
        datagram: &mut [u8],
    ) -> Option<RequestView> {
        let mut request = match ntp::check_request(datagram) {
            Ok(request) => request,
            Err(rejection) => {
                self.stats.incr(rejection.into());
                debug!(?from, %rejection, "request dropped");
                return None;
            }
        };
        let mut previous_reply = None;
        // Only a plain header: a MAC or extension field would cover the origin.
        if datagram.len() == ntp::HEADER_LEN
            && let Some(translation) = self.translations.get(now, request.origin)
            && ntp::set_origin(datagram, translation.original)
        {
            debug!(?from, "interleaved request: origin translated back");
            request.origin = translation.original;
            previous_reply = Some(translation.reply_residence);
        }
        let marked = self.correction
            && self
                .time_server_tx
                .mark(now, &request, previous_reply.is_some(), datagram);
        let exchange = Exchange {
            request_rx: rx,
            request_tx: None,
            sent: None,
            previous_reply,
            marked,
        };
        let inserted =
            self.pending
                .insert_with(now, request.transmit.0, request.receive.0, from, exchange);
        if !self.stats.pending_inserted(inserted) {
            debug!(
                ?from,
                "request dropped: transmit timestamp unusable for matching"
            );
            return None;
        }
        Some(request)
    }

    /// The request keyed `transmit` leaves now (`wall` read right before it is sent): it is
    /// taken to depart at its predicted time, until the shell reports the kernel's transmit
    /// timestamp for the departure returned (when it is to be measured).
    pub fn request_sent(&mut self, now: Instant, wall: SystemTime, transmit: u64) -> Departure {
        let predicted = wall + self.request_lag.predict();
        // An interleaved client's request: measured whatever the load, as its replies are.
        let mut interleaved = false;
        if let Some(exchange) = self.pending.value_mut(transmit) {
            exchange.request_tx = Some(predicted);
            exchange.sent = Some(now);
            interleaved = exchange.previous_reply.is_some();
        }
        Departure {
            read: wall,
            what: Departing::Request { transmit },
            measure: self.request_lag.due(wall) || interleaved,
            movable: Movable::Fixed,
        }
    }

    /// A datagram of this path left at `transmitted` (the kernel's transmit timestamp; the
    /// shell has checked it lies between the clock read and the end of the send). A request's
    /// departure becomes exact; a reply's lag teaches the prediction for the next replies, and
    /// its real residence replaces the predicted one for the interleaved reply that will carry
    /// its transmit time. False when nothing was left to update (the reply came back first,
    /// an unbelievable lag).
    pub fn departed(&mut self, departure: &Departure, transmitted: SystemTime) -> bool {
        match departure.what {
            Departing::Request { transmit } => {
                if !self.request_lag.observe(departure.read, transmitted) {
                    return false;
                }
                match self.pending.value_mut(transmit) {
                    Some(exchange) => {
                        exchange.request_tx = Some(transmitted);
                        true
                    }
                    None => false,
                }
            }
            Departing::Reply {
                received,
                corrected_receive,
            } => {
                let predicted = self.reply_lag.predict();
                if !self.reply_lag.observe(departure.read, transmitted) {
                    return false;
                }
                debug!(
                    lag_ns = transmitted
                        .duration_since(departure.read)
                        .map_or(0, |d| d.as_nanos() as u64),
                    predicted_ns = predicted.as_nanos() as u64,
                    "reply departure measured (kernel transmit timestamp)"
                );
                if let (Some(corrected), Ok(residence)) = (
                    corrected_receive,
                    residence::residence(received, transmitted),
                ) {
                    self.translations.refine(corrected, residence);
                }
                true
            }
        }
    }

    /// When a reply finished now (`wall`) will be on the wire: the clock read plus the send
    /// lag measured on earlier replies.
    pub fn predicted_departure(&self, wall: SystemTime) -> SystemTime {
        wall + self.reply_lag.predict()
    }

    /// The departure of a reply this relay made itself (the builtin time source), received at
    /// `received` and finished now (`wall`).
    pub fn own_reply_departure(&mut self, wall: SystemTime, received: SystemTime) -> Departure {
        Departure {
            read: wall,
            what: Departing::Reply {
                received,
                corrected_receive: None,
            },
            measure: self.reply_lag.due(wall),
            movable: Movable::Fixed,
        }
    }

    /// A reply received at `rx`: checked and matched to its request. Returns where it goes,
    /// None when it was dropped (counted). For a path that never measures the time server
    /// (the client relay's); see [`Forward::time_server_reply`].
    pub fn reply(&mut self, now: Instant, rx: SystemTime, datagram: &mut [u8]) -> Option<Route<A>> {
        match self.time_server_reply(now, rx, datagram) {
            ReplyFate::Route(route) => Some(route),
            // Not without set_time_server_tx: a released reply goes on without its lag.
            ReplyFate::Released { route, .. } => Some(route),
            ReplyFate::Held { .. } | ReplyFate::Dropped => None,
        }
    }

    /// A datagram from the time server, received at `rx`: a reply, checked and matched to its
    /// request, or the answer to a query about a held one.
    pub fn time_server_reply(
        &mut self,
        now: Instant,
        rx: SystemTime,
        datagram: &mut [u8],
    ) -> ReplyFate<A> {
        let reply: ReplyView = match ntp::check_reply(datagram) {
            Ok(reply) => reply,
            Err(rejection) => {
                self.stats.incr(rejection.into());
                debug!(%rejection, "reply dropped");
                return ReplyFate::Dropped;
            }
        };
        if self.time_server_tx.enabled() {
            match self.time_server_tx.answer(now, &reply) {
                Answer::NotOurs => {}
                Answer::Release(held, lag) => {
                    let mut route = held.route;
                    route.stamp.time_server_lag = lag;
                    if lag.is_none() {
                        self.stats.incr(Counter::TimeServerTxUnavailable);
                    }
                    debug!(
                        shift_ns = lag.map(|shift| match shift {
                            Shift::Later(by) => by.as_nanos() as i64,
                            Shift::Earlier(by) => -(by.as_nanos() as i64),
                        }),
                        "time server's transmit timestamp for a held reply"
                    );
                    return ReplyFate::Released {
                        route,
                        reply: held.reply,
                    };
                }
                Answer::Stale => return ReplyFate::Dropped,
            }
        }
        let Some(taken) = self.pending.take_entry(now, reply.origin.0) else {
            self.stats.incr(Counter::DropUnmatchedReply);
            debug!("reply dropped: matches no outstanding request");
            return ReplyFate::Dropped;
        };
        if let Some(sent) = taken.value.sent {
            self.rtt.observe(now.saturating_duration_since(sent));
        }
        let route = Route {
            to: taken.addr,
            stamp: ReplyStamp {
                exchange: taken.value,
                reply_rx: rx,
                matched: taken.matched,
                time_server_lag: None,
            },
        };
        if !taken.value.marked {
            return ReplyFate::Route(route);
        }
        match self.time_server_tx.hold(
            now,
            self.hold_limit(),
            taken.transmit,
            &reply,
            datagram,
            route,
        ) {
            Ok(query) => ReplyFate::Held { query },
            Err(route) => ReplyFate::Route(route),
        }
    }

    /// How long a held reply waits for its query's answer: [`time_server_tx::HOLD_LIMIT`], or
    /// behind a longer path (the client relay's tunnel) four of its smoothed round trips, up to
    /// [`time_server_tx::MAX_HOLD_LIMIT`].
    fn hold_limit(&self) -> Duration {
        let path = self
            .rtt
            .get()
            .map_or(Duration::ZERO, |(_, smoothed)| smoothed * 4);
        path.clamp(time_server_tx::HOLD_LIMIT, time_server_tx::MAX_HOLD_LIMIT)
    }

    /// A reply held for the time server's transmit timestamp whose query went unanswered goes
    /// on as it is, once its deadline has passed (counted).
    pub fn release_overdue(&mut self, now: Instant) -> Option<(Route<A>, [u8; ntp::HEADER_LEN])> {
        let held = self.time_server_tx.expire(now)?;
        self.stats.incr(Counter::TimeServerTxUnavailable);
        debug!("held reply released: the time server did not answer its query");
        Some((held.route, held.reply))
    }

    /// The reply leaves now (`wall` read right before it is sent): its receive and transmit
    /// timestamps are corrected for this relay's residence up to its predicted departure, or
    /// left as they are (see [`crate::residence`]). Returns what was done (also reported to
    /// the observer) and the departure for the shell to report.
    pub fn reply_sent(
        &mut self,
        now: Instant,
        wall: SystemTime,
        datagram: &mut [u8],
        stamp: &ReplyStamp,
    ) -> ReplySent {
        let exchange = &stamp.exchange;
        let request = exchange
            .request_tx
            .map_or(Err(Unchanged::UnknownResidence), |tx| {
                residence::residence(exchange.request_rx, tx)
            });
        let reply = residence::residence(stamp.reply_rx, self.predicted_departure(wall));
        let mut corrected_receive = None;
        if let Some(observer) = &self.observer {
            if let Ok(r) = request {
                observer.residence(Direction::Request, r.as_secs_f64());
            }
            if let Ok(r) = reply {
                observer.residence(Direction::Reply, r.as_secs_f64());
            }
        }
        let outcome = if self.correction {
            let residences = Residences {
                request,
                reply,
                interleaved_previous: match stamp.matched {
                    Matched::Transmit => None,
                    Matched::Receive => {
                        Some(exchange.previous_reply.ok_or(Unchanged::UnknownResidence))
                    }
                },
                time_server_lag: stamp.time_server_lag,
            };
            match residence::correct(datagram, &residences) {
                Ok(correction) => {
                    corrected_receive = Some(correction.rewritten.receive_after);
                    if let Ok(reply) = reply {
                        self.translations.insert(
                            now,
                            correction.rewritten.receive_after,
                            Translation {
                                original: correction.rewritten.receive_before,
                                reply_residence: reply,
                            },
                        );
                    }
                    Outcome::Corrected(correction.kind)
                }
                Err(why) => Outcome::Unchanged(why),
            }
        } else {
            Outcome::Unchanged(Unchanged::Disabled)
        };
        debug!(
            reason = outcome.reason(),
            corrected = outcome.is_corrected(),
            "reply timestamps"
        );
        if let Some(observer) = &self.observer {
            observer.outcome(outcome);
        }
        // An interleaved client's next reply carries this one's departure: measure each.
        let interleaved = stamp.matched == Matched::Receive || exchange.previous_reply.is_some();
        let measure = self.reply_lag.due(wall) || (interleaved && corrected_receive.is_some());
        ReplySent {
            outcome,
            departure: Departure {
                read: wall,
                what: Departing::Reply {
                    received: stamp.reply_rx,
                    corrected_receive,
                },
                measure,
                movable: Movable::Fixed,
            },
        }
    }

    /// Forgets requests whose reply is overdue; returns how many (counted).
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired = self.pending.expire(now);
        if expired > 0 {
            self.stats.add(Counter::ExpiredPending, expired as u64);
        }
        expired
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        [
            self.pending.next_deadline(),
            self.time_server_tx.next_deadline(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Requests waiting for their reply.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    pub fn rtt(&self) -> &Arc<RttGauge> {
        &self.rtt
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ntp::{NtpTimestamp, build_request};
    use crate::residence::Corrected;
    use crate::time_server_tx::{HOLD_LIMIT, MARK};

    fn forward() -> Forward<u16> {
        Forward::new(
            16,
            Duration::from_secs(2),
            Arc::new(Stats::default()),
            Arc::new(RttGauge::default()),
        )
    }

    fn reply_to(request: &[u8; 48]) -> [u8; 48] {
        let mut reply = *request;
        reply[0] = (4 << 3) | 4;
        reply[1] = 2;
        reply[24..32].copy_from_slice(&request[40..48]);
        reply[32..40].copy_from_slice(&[0x11; 8]);
        reply[40..48].copy_from_slice(&[0x22; 8]);
        reply
    }

    #[test]
    fn a_request_and_its_reply_go_through_once_and_time_the_round_trip() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut f = forward();
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0001));
        let view = f.request(t0, wall, 7, &mut request).expect("forwarded");
        f.request_sent(t0 + Duration::from_micros(5), wall, view.transmit.0);
        let mut reply = reply_to(&request);
        let route = f
            .reply(t0 + Duration::from_micros(105), wall, &mut reply)
            .expect("routed");
        assert_eq!(route.to, 7);
        assert_eq!(route.stamp.matched, Matched::Transmit);
        assert_eq!(route.stamp.exchange.request_tx, Some(wall));
        assert_eq!(
            f.rtt().get().map(|(last, _)| last),
            Some(Duration::from_micros(100))
        );
        assert!(f.reply(t0, wall, &mut reply).is_none(), "delivered once");
        assert_eq!(f.stats.get(Counter::DropUnmatchedReply), 1);
    }

    #[test]
    fn a_reply_sent_unencrypted_is_restamped_only_where_its_t3_is_its_own_departure() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |us| wall + Duration::from_micros(us);
        let mut f = forward();
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0002));
        let view = f.request(t0, at(0), 7, &mut request).expect("forwarded");
        f.request_sent(t0, at(5), view.transmit.0);
        let mut reply = reply_to(&request);
        let route = f.reply(t0, at(20), &mut reply).expect("routed");
        let sent = f.reply_sent(t0, at(30), &mut reply, &route.stamp);
        assert_eq!(sent.outcome, Outcome::Corrected(Corrected::Basic));
        assert_eq!(sent.departure.movable, Movable::Fixed, "a record's default");
        let mut departure = sent.unencrypted();
        assert_eq!(departure.movable, Movable::ReadAndTransmit);
        // Sent 7 us after the stamp: T3 and the read move by 7 us, nothing else.
        let before = reply;
        departure.restamp(&mut reply, at(37));
        assert_eq!(departure.read, at(37));
        assert_eq!(reply[..40], before[..40]);
        let moved = ntp::check_reply(&reply).unwrap().transmit;
        let stamped = ntp::check_reply(&before).unwrap().transmit;
        assert!((moved.diff_seconds(stamped) - 7e-6).abs() < 1e-8);
        assert_eq!(moved.0 & 1, stamped.0 & 1, "its lowest bit kept");
        // Never backwards.
        departure.restamp(&mut reply, at(36));
        assert_eq!(departure.read, at(37));
        assert_eq!(ntp::check_reply(&reply).unwrap().transmit, moved);
        // A reply left as the time server sent it: only the read moves.
        f.set_correction(false);
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0004));
        let view = f.request(t0, at(0), 7, &mut request).expect("forwarded");
        f.request_sent(t0, at(5), view.transmit.0);
        let mut reply = reply_to(&request);
        let route = f.reply(t0, at(20), &mut reply).expect("routed");
        let mut departure = f
            .reply_sent(t0, at(30), &mut reply, &route.stamp)
            .unencrypted();
        assert_eq!(departure.movable, Movable::Read);
        let before = reply;
        departure.restamp(&mut reply, at(37));
        assert_eq!((departure.read, reply), (at(37), before));
    }

    #[test]
    fn a_basic_reply_held_for_the_time_servers_transmit_time_leaves_as_if_sent_on_the_wire() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let at = |us| wall + Duration::from_micros(us);
        let ntp_at = |us| NtpTimestamp::from_system_time(at(us));
        let mut f = forward();
        f.set_time_server_tx(true, NextHop::TimeServer);
        // The request arrives at 0 us and leaves at 5 us, marked.
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0002));
        let view = f.request(t0, at(0), 7, &mut request).expect("forwarded");
        assert_eq!(ntp::check_request(&request).unwrap().origin, MARK);
        f.request_sent(t0, at(5), view.transmit.0);
        // The time server receives it at 6 us, writes T3 = 8 us, and sends at 20 us; the
        // relay has the reply at 21 us.
        let t2 = NtpTimestamp(ntp_at(6).0 | 1);
        let t3 = NtpTimestamp(ntp_at(8).0 & !1);
        let mut reply = reply_to(&request);
        reply[32..40].copy_from_slice(&t2.0.to_be_bytes());
        reply[40..48].copy_from_slice(&t3.0.to_be_bytes());
        let query = match f.time_server_reply(t0, at(21), &mut reply) {
            ReplyFate::Held { query } => query,
            other => panic!("not held: {other:?}"),
        };
        let q = ntp::check_request(&query).unwrap();
        assert_eq!(q.origin, t2);
        // The interleaved answer: its transmit field is when the held reply left.
        let mut answer = reply_to(&query);
        answer[24..32].copy_from_slice(&q.receive.0.to_be_bytes());
        answer[40..48].copy_from_slice(&ntp_at(20).0.to_be_bytes());
        let (route, mut held) = match f.time_server_reply(t0, at(23), &mut answer) {
            ReplyFate::Released { route, reply } => (route, reply),
            other => panic!("not released: {other:?}"),
        };
        assert_eq!(route.to, 7);
        assert_eq!(held, reply, "held as the time server sent it");
        // It leaves the relay at 30 us: T2 as if received at the relay's wire (0 us + the 1 us
        // link), T3 as if sent there (30 us - the 1 us link).
        let sent = f.reply_sent(t0, at(30), &mut held, &route.stamp);
        assert_eq!(sent.outcome, Outcome::Corrected(Corrected::TimeServerTx));
        let out = ntp::check_reply(&held).unwrap();
        assert!((out.receive.diff_seconds(ntp_at(1))).abs() < 1e-8);
        assert!((out.transmit.diff_seconds(ntp_at(29))).abs() < 1e-8);
        assert_eq!(f.stats.get(Counter::TimeServerTxUnavailable), 0);
    }

    #[test]
    fn a_held_reply_whose_query_is_lost_goes_on_corrected_as_before() {
        let t0 = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut f = forward();
        f.set_time_server_tx(true, NextHop::TimeServer);
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0002));
        let view = f.request(t0, wall, 7, &mut request).expect("forwarded");
        f.request_sent(t0, wall, view.transmit.0);
        let mut reply = reply_to(&request);
        assert!(matches!(
            f.time_server_reply(t0, wall, &mut reply),
            ReplyFate::Held { .. }
        ));
        assert_eq!(f.next_deadline(), Some(t0 + HOLD_LIMIT));
        assert!(f.release_overdue(t0).is_none());
        let (route, mut held) = f.release_overdue(t0 + HOLD_LIMIT).expect("released");
        assert_eq!(route.stamp.time_server_lag, None);
        let sent = f.reply_sent(t0, wall, &mut held, &route.stamp);
        assert_eq!(sent.outcome, Outcome::Corrected(Corrected::Basic));
        assert_eq!(f.stats.get(Counter::TimeServerTxUnavailable), 1);
        // Without correction nothing is marked.
        f.set_correction(false);
        let mut request = build_request(NtpTimestamp(0xE000_0000_0000_0004));
        f.request(t0, wall, 7, &mut request).expect("forwarded");
        assert_eq!(
            ntp::check_request(&request).unwrap().origin,
            NtpTimestamp::ZERO
        );
    }

    #[test]
    fn every_drop_is_counted_once() {
        let t0 = Instant::now();
        let wall = SystemTime::now();
        let mut f = forward();
        let mut control = [0u8; 48];
        control[0] = (4 << 3) | 6;
        assert!(f.request(t0, wall, 1, &mut control).is_none());
        let mut short = [0x23u8; 20];
        assert!(f.request(t0, wall, 1, &mut short).is_none());
        let mut zero = build_request(NtpTimestamp::ZERO);
        assert!(f.request(t0, wall, 1, &mut zero).is_none());
        assert_eq!(f.stats.get(Counter::DropControlMode), 1);
        assert_eq!(f.stats.get(Counter::DropTooShort), 1);
        assert_eq!(f.stats.get(Counter::DropCollision), 1);
        let mut request = build_request(NtpTimestamp(42));
        f.request(t0, wall, 1, &mut request).expect("forwarded");
        assert_eq!(f.expire(t0 + Duration::from_secs(2)), 1);
        assert_eq!(f.stats.get(Counter::ExpiredPending), 1);
        assert_eq!(f.outstanding(), 0);
    }
}
