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
//! - its reply: NTP checks, then matched by origin to the request and its requester; the round
//!   trip sampled;
//! - the reply leaves: [`Forward::reply_sent`], right before it goes on.
//!
//! Every drop lands in exactly one counter (what is sent is counted by the shell that sends it). Nothing here allocates or locks per datagram: the
//! table's maps are sized up front, the round trip goes into atomics.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tracing::debug;

use crate::ntp::{self, ReplyView, RequestView};
use crate::pending::{Matched, PendingTable};
use crate::stats::{Counter, RttGauge, Stats};

/// What a relay keeps with each outstanding request.
#[derive(Debug, Clone, Copy)]
pub struct Exchange {
    /// When the request arrived (the kernel's receive timestamp where there is one).
    pub request_rx: SystemTime,
    /// When it left for the next hop, once it has.
    pub request_tx: Option<SystemTime>,
    /// Likewise on the monotonic clock, for the round trip.
    sent: Option<Instant>,
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
}

pub struct Forward<A> {
    pending: PendingTable<A, Exchange>,
    stats: Arc<Stats>,
    rtt: Arc<RttGauge>,
}

impl<A: Copy + Eq + std::fmt::Debug> Forward<A> {
    /// `capacity` outstanding requests, each waiting at most `ttl` for its reply.
    pub fn new(capacity: usize, ttl: Duration, stats: Arc<Stats>, rtt: Arc<RttGauge>) -> Self {
        Forward {
            pending: PendingTable::new(capacity, ttl),
            stats,
            rtt,
        }
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
        let request = match ntp::check_request(datagram) {
            Ok(request) => request,
            Err(rejection) => {
                self.stats.incr(rejection.into());
                debug!(?from, %rejection, "request dropped");
                return None;
            }
        };
        let exchange = Exchange {
            request_rx: rx,
            request_tx: None,
            sent: None,
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

    /// The request keyed `transmit` leaves now (`wall` read right before it is sent).
    pub fn request_sent(&mut self, now: Instant, wall: SystemTime, transmit: u64) {
        if let Some(exchange) = self.pending.value_mut(transmit) {
            exchange.request_tx = Some(wall);
            exchange.sent = Some(now);
        }
    }

    /// A reply received at `rx`: checked and matched to its request. Returns where it goes,
    /// None when it was dropped (counted).
    pub fn reply(&mut self, now: Instant, rx: SystemTime, datagram: &mut [u8]) -> Option<Route<A>> {
        let reply: ReplyView = match ntp::check_reply(datagram) {
            Ok(reply) => reply,
            Err(rejection) => {
                self.stats.incr(rejection.into());
                debug!(%rejection, "reply dropped");
                return None;
            }
        };
        let Some(taken) = self.pending.take_entry(now, reply.origin.0) else {
            self.stats.incr(Counter::DropUnmatchedReply);
            debug!("reply dropped: matches no outstanding request");
            return None;
        };
        if let Some(sent) = taken.value.sent {
            self.rtt.observe(now.saturating_duration_since(sent));
        }
        Some(Route {
            to: taken.addr,
            stamp: ReplyStamp {
                exchange: taken.value,
                reply_rx: rx,
                matched: taken.matched,
            },
        })
    }

    /// The reply leaves now (`wall` read right before it is sent).
    pub fn reply_sent(&mut self, _wall: SystemTime, _datagram: &mut [u8], _stamp: &ReplyStamp) {}

    /// Forgets requests whose reply is overdue; returns how many (counted).
    pub fn expire(&mut self, now: Instant) -> usize {
        let expired = self.pending.expire(now);
        if expired > 0 {
            self.stats.add(Counter::ExpiredPending, expired as u64);
        }
        expired
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.next_deadline()
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
