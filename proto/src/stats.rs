//! Counters shared by a relay's tasks: every forwarded, delivered and dropped datagram lands in
//! exactly one of them, so an operator can account for all traffic.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($variant:ident => $label:literal, $help:literal;)*) => {
        /// One counter. Labels are stable: logs and metrics use them.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Counter { $($variant),* }

        impl Counter {
            pub const ALL: &'static [Counter] = &[$(Counter::$variant),*];
            pub fn label(self) -> &'static str {
                match self { $(Counter::$variant => $label),* }
            }
            pub fn help(self) -> &'static str {
                match self { $(Counter::$variant => $help),* }
            }
        }
    };
}

counters! {
    RequestsForwarded => "requests_forwarded", "NTP requests sent on towards the time server";
    RepliesDelivered => "replies_delivered", "NTP replies delivered to the client that asked";
    DropTooShort => "drop_too_short", "datagrams shorter than an NTP header";
    DropTooLong => "drop_too_long", "datagrams longer than one NTP packet may be";
    DropBadVersion => "drop_bad_version", "NTP packets with a version other than 1 to 4";
    DropControlMode => "drop_control_mode", "NTP mode 6 (control) packets: never forwarded";
    DropPrivateMode => "drop_private_mode", "NTP mode 7 (private) packets: never forwarded";
    DropWrongMode => "drop_wrong_mode", "NTP packets of a mode other than client (3) or server (4)";
    DropUnmatchedReply => "drop_unmatched_reply", "replies matching no outstanding request (late, duplicate or forged)";
    DropCollision => "drop_timestamp_collision", "requests whose transmit timestamp another client already has outstanding";
    DropNoAssociation => "drop_no_association", "requests that arrived while no association was up";
    DropNotHandshake => "drop_not_client_hello", "datagrams from unknown addresses that were not a DTLS ClientHello";
    DropUpstreamError => "drop_upstream_error", "datagrams the socket towards the next hop could not send";
    DropDeliveryFailed => "drop_delivery_failed", "replies the socket back to a local NTP client could not send";
    DropAssociationLimit => "drop_association_limit", "ClientHellos refused: the association limit was reached";
    DropHalfOpenLimit => "drop_half_open_limit", "ClientHellos refused: the half-open handshake limit was reached";
    DropSourceRateLimit => "drop_source_rate_limit", "ClientHellos refused: their source address exceeded its handshake rate";
    DropHandshakeBytes => "drop_handshake_bytes", "handshakes abandoned: the peer sent too much before completing";
    DropFragmentedClientHello => "drop_fragmented_client_hello", "ClientHellos in fragments or beside other records: only a whole one in one record is taken";
    DropMalformedHandshake => "drop_malformed_handshake", "datagrams whose records or handshake fragment headers do not add up";
    DropUnexpectedHandshake => "drop_unexpected_handshake", "handshake messages this side never receives, or beyond any handshake's message count";
    DropHandshakeTooLong => "drop_handshake_too_long", "handshake messages declared longer than any handshake needs";
    DropEmptyFragment => "drop_empty_fragment", "zero-length fragments of non-empty handshake messages";
    DropHandshakeFragments => "drop_handshake_fragments", "handshake fragments over the per-message or per-handshake cap";
    DropLateHandshake => "drop_late_handshake", "plaintext handshake records after the handshake that are no retransmitted final flight";
    DropLateHandshakeRate => "drop_late_handshake_rate", "retransmitted final flights over the per-peer rate, window or total";
    DropAmplification => "drop_amplification", "our datagrams not sent: larger than what an unproven address sent, or a second HelloVerifyRequest";
    HandshakeTimeouts => "handshake_timeouts", "handshakes abandoned unfinished after the handshake timeout";
    IdleClosed => "associations_idle_closed", "associations closed after the idle timeout";
    Keepalives => "keepalives", "keepalive records sent (client relay) or received (server relay)";
    KeepaliveAcks => "keepalive_acks", "keepalives acknowledged: answered (server relay) or answers received (client relay)";
    UpstreamUnreachable => "upstream_unreachable", "ICMP errors (port unreachable, ...) on a socket towards the next hop; checked, not believed";
    EvictedPending => "pending_evicted", "outstanding requests evicted to make room for new ones";
    ExpiredPending => "pending_expired", "outstanding requests that got no reply in time";
    TimeServerTxQueries => "time_server_tx_queries", "queries asking the time server, in its interleaved mode, when a held basic reply left (not in requests_forwarded)";
    TimeServerTxUnavailable => "time_server_tx_unavailable", "replies held for the time server's transmit timestamp that went on without it (answered in basic mode, lost, or unbelievable)";
    AssociationsEstablished => "associations_established", "DTLS associations set up";
    AssociationsRefused => "associations_refused", "DTLS handshakes that failed";
    AssociationsClosed => "associations_closed", "established DTLS associations torn down";
}

/// A relay's counters. Lock-free: the hot path only increments.
pub struct Stats {
    values: Vec<AtomicU64>,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            values: Counter::ALL.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl Stats {
    pub fn incr(&self, counter: Counter) {
        self.add(counter, 1);
    }

    pub fn add(&self, counter: Counter, n: u64) {
        if let Some(value) = self.values.get(counter as usize) {
            value.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(&self, counter: Counter) -> u64 {
        self.values
            .get(counter as usize)
            .map_or(0, |value| value.load(Ordering::Relaxed))
    }

    /// Counts what remembering a request in the pending table did. False when the request must
    /// be dropped: its transmit timestamp cannot be matched (zero, or another client's).
    pub fn pending_inserted(
        &self,
        result: Result<crate::pending::InsertOutcome, crate::pending::InsertError>,
    ) -> bool {
        use crate::pending::InsertOutcome;
        match result {
            Ok(InsertOutcome::InsertedEvictingOldest) => {
                self.incr(Counter::EvictedPending);
                true
            }
            Ok(_) => true,
            Err(_) => {
                self.incr(Counter::DropCollision);
                false
            }
        }
    }

    /// The counters that are not zero, for the summary a daemon logs when it stops.
    pub fn nonzero(&self) -> Vec<(&'static str, u64)> {
        Counter::ALL
            .iter()
            .map(|c| (c.label(), self.get(*c)))
            .filter(|(_, v)| *v > 0)
            .collect()
    }
}

impl From<crate::ntp::Rejection> for Counter {
    fn from(rejection: crate::ntp::Rejection) -> Self {
        use crate::ntp::Rejection;
        match rejection {
            Rejection::TooShort(_) => Counter::DropTooShort,
            Rejection::TooLong(_) => Counter::DropTooLong,
            Rejection::BadVersion(_) => Counter::DropBadVersion,
            Rejection::WrongMode(6) => Counter::DropControlMode,
            Rejection::WrongMode(7) => Counter::DropPrivateMode,
            Rejection::WrongMode(_) => Counter::DropWrongMode,
        }
    }
}

/// The round trip to one upstream (the server relay, or the time server): the last sample and
/// a smoothed value (1/8 gain, as TCP's SRTT). Written on the datagram path without a lock or
/// an allocation, read by the metrics endpoint. Zero means no sample; [`RttGauge::clear`]
/// forgets the samples of an upstream that went away, so a dead upstream shows none.
#[derive(Debug, Default)]
pub struct RttGauge {
    last_nanos: AtomicU64,
    smoothed_nanos: AtomicU64,
}

impl RttGauge {
    pub fn observe(&self, rtt: std::time::Duration) {
        // At least 1 ns, so a sample is never mistaken for "none".
        let sample = u64::try_from(rtt.as_nanos()).unwrap_or(u64::MAX).max(1);
        self.last_nanos.store(sample, Ordering::Relaxed);
        let smoothed = match self.smoothed_nanos.load(Ordering::Relaxed) {
            0 => sample,
            s => (s - s / 8).saturating_add(sample / 8).max(1),
        };
        self.smoothed_nanos.store(smoothed, Ordering::Relaxed);
    }

    pub fn clear(&self) {
        self.last_nanos.store(0, Ordering::Relaxed);
        self.smoothed_nanos.store(0, Ordering::Relaxed);
    }

    /// (last, smoothed), or None before the first sample.
    pub fn get(&self) -> Option<(std::time::Duration, std::time::Duration)> {
        let last = self.last_nanos.load(Ordering::Relaxed);
        let smoothed = self.smoothed_nanos.load(Ordering::Relaxed);
        (last != 0).then(|| {
            (
                std::time::Duration::from_nanos(last),
                std::time::Duration::from_nanos(smoothed),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_counts_on_its_own() {
        let stats = Stats::default();
        stats.incr(Counter::RequestsForwarded);
        stats.add(Counter::DropControlMode, 3);
        assert_eq!(stats.get(Counter::RequestsForwarded), 1);
        assert_eq!(stats.get(Counter::DropControlMode), 3);
        assert_eq!(stats.get(Counter::DropPrivateMode), 0);
        assert_eq!(
            stats.nonzero(),
            vec![("requests_forwarded", 1), ("drop_control_mode", 3)]
        );
    }

    #[test]
    fn the_rtt_gauge_smooths_and_clears() {
        use std::time::Duration;
        let gauge = RttGauge::default();
        assert_eq!(gauge.get(), None);
        gauge.observe(Duration::from_micros(800));
        gauge.observe(Duration::from_micros(0));
        let (last, smoothed) = gauge.get().expect("samples");
        assert_eq!(last, Duration::from_nanos(1));
        assert_eq!(smoothed, Duration::from_micros(700));
        gauge.clear();
        assert_eq!(gauge.get(), None);
    }

    #[test]
    fn labels_are_unique() {
        let mut labels: Vec<_> = Counter::ALL.iter().map(|c| c.label()).collect();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), Counter::ALL.len());
    }
}
