//! What a running relay knows about itself, shared by its tasks (and the server's worker
//! threads) and read by the metrics endpoint: counters, refusals by reason, association gauges,
//! round-trip times, certificate expiry. Writes are atomics or short locks off the hot path.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::ops::metrics::{
    self, CertificateExpiry, FailureCounts, MetricsSnapshot, UpstreamRtt, days_until, expires_soon,
    not_after_unix, unix_now,
};
use ntp_dtls_proto::stats::{RttGauge, Stats};

pub struct Observatory {
    role: &'static str,
    pub stats: Arc<Stats>,
    pub failures: FailureCounts,
    /// Per worker (or tunnel): (established, half-open).
    gauges: Vec<(AtomicU64, AtomicU64)>,
    /// Round-trip gauges by upstream label, written lock-free by the relay loops.
    rtts: Mutex<BTreeMap<String, Arc<RttGauge>>>,
    certificates: Mutex<Vec<CertificateExpiry>>,
}

impl Observatory {
    /// `slots`: how many tasks report association gauges (server workers, client tunnels).
    pub fn new(role: &'static str, slots: usize) -> Self {
        Observatory {
            role,
            stats: Arc::new(Stats::default()),
            failures: FailureCounts::default(),
            gauges: (0..slots.max(1))
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            rtts: Mutex::new(BTreeMap::new()),
            certificates: Mutex::new(Vec::new()),
        }
    }

    /// One task's current association counts.
    pub fn set_associations(&self, slot: usize, established: usize, half_open: usize) {
        if let Some((e, h)) = self.gauges.get(slot) {
            e.store(established as u64, Ordering::Relaxed);
            h.store(half_open as u64, Ordering::Relaxed);
        }
    }

    /// The round-trip gauge of `upstream` ("host:port"), created on first use. Called when a
    /// loop starts, not per datagram: the loop keeps the gauge and writes it without a lock.
    pub fn rtt_gauge(&self, upstream: &str) -> Arc<RttGauge> {
        match self.rtts.lock() {
            Ok(mut rtts) => rtts.entry(upstream.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Records the certificates in service (leaf DER by name) and warns about any that expire
    /// within 30 days.
    pub fn set_certificates(&self, certificates: &[(String, &[u8])]) {
        let now = unix_now();
        let mut expiries = Vec::new();
        for (name, der) in certificates {
            let Some(not_after) = not_after_unix(der) else {
                continue;
            };
            if expires_soon(not_after, now) {
                warn!(cert = %name, days_left = days_until(not_after, now),
                    not_after = %metrics::format_utc(not_after), "certificate expires soon");
            }
            expiries.push(CertificateExpiry {
                cert: name.clone(),
                not_after_unix: not_after,
            });
        }
        if let Ok(mut slot) = self.certificates.lock() {
            *slot = expiries;
        }
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let mut snapshot = MetricsSnapshot::new(self.role, &self.stats);
        for (e, h) in &self.gauges {
            snapshot.associations_established += e.load(Ordering::Relaxed);
            snapshot.associations_half_open += h.load(Ordering::Relaxed);
        }
        if let Ok(rtts) = self.rtts.lock() {
            snapshot.upstreams = rtts
                .iter()
                .map(|(upstream, gauge)| {
                    let sample = gauge.get();
                    UpstreamRtt {
                        upstream: upstream.clone(),
                        last_seconds: sample.map(|(last, _)| last.as_secs_f64()),
                        smoothed_seconds: sample.map(|(_, smoothed)| smoothed.as_secs_f64()),
                    }
                })
                .collect();
        }
        if let Ok(certificates) = self.certificates.lock() {
            snapshot.certificates = certificates.clone();
        }
        snapshot.handshake_failures = self.failures.snapshot();
        snapshot
    }

    /// The Prometheus text of this moment.
    pub fn render(&self) -> String {
        metrics::render(&self.snapshot())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ntp_dtls_proto::stats::Counter;
    use std::time::Duration;

    #[test]
    fn the_snapshot_sums_gauges_and_carries_counters_rtts_and_failures() {
        let o = Observatory::new("server", 2);
        o.stats.incr(Counter::RequestsForwarded);
        o.failures.incr("unknown_ca");
        o.set_associations(0, 3, 1);
        o.set_associations(1, 2, 0);
        o.rtt_gauge("127.0.0.1:123")
            .observe(Duration::from_micros(80));
        let s = o.snapshot();
        assert_eq!(
            (s.associations_established, s.associations_half_open),
            (5, 1)
        );
        assert_eq!(s.upstreams.len(), 1);
        assert!(
            s.handshake_failures
                .contains(&("unknown_ca".to_string(), 1))
        );
        let text = o.render();
        assert!(
            text.contains("ntp_dtls_requests_forwarded_total 1"),
            "{text}"
        );
    }
}
