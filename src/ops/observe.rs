//! What a running relay knows about itself, shared by its tasks (and the server's worker
//! threads) and read by the metrics endpoint, `/status.json` and the systemd status line:
//! counters, refusals by reason, association gauges, tunnel and upstream states, round-trip
//! times, residence histograms, timestamp corrections, certificate expiry.
//!
//! Everything a datagram's path writes is an atomic, reached without a lock: the loops take
//! their handles ([`Observatory::rtt_gauge`], [`Observatory::upstream_health`],
//! [`Observatory::timestamp_counter`]) when they start. Locks are taken only to register a
//! label and by the scrape.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use tokio::sync::Notify;
use tracing::warn;

use crate::ops::metrics::state::{
    Associations, CertificateExpiry, FailureCounts, Histogram, NamedCount, RESIDENCE_BUCKETS,
    Snapshot, TimestampCount, TimestampResult, TunnelStatus, UpstreamStatus, days_until,
    expires_soon, format_utc, not_after_unix, unix_now,
};
use crate::ops::metrics::{exposition, process};
use ntp_dtls_proto::stats::{Counter, RttGauge, Stats};
use ntp_dtls_proto::tunnel::TunnelState;

/// Which way a datagram crosses the relay, for [`Observatory::observe_residence`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the NTP client towards the time server.
    Request,
    /// From the time server back to the NTP client.
    Reply,
}

impl Direction {
    pub const ALL: [Direction; 2] = [Direction::Request, Direction::Reply];

    pub fn label(self) -> &'static str {
        match self {
            Direction::Request => "request",
            Direction::Reply => "reply",
        }
    }
}

pub struct Observatory {
    role: &'static str,
    pub stats: Arc<Stats>,
    /// Refusals by reason: one `incr` per "association refused" line.
    pub failures: FailureCounts,
    /// Per worker (or tunnel): (established, half-open).
    gauges: Vec<(AtomicU64, AtomicU64)>,
    /// Per client tunnel: its state and labels, once the shell has reported them.
    tunnels: Vec<TunnelSlot>,
    /// Round-trip gauges by upstream label, written lock-free by the relay loops.
    rtts: Mutex<BTreeMap<String, Arc<RttGauge>>>,
    /// Up/down of each upstream, by label.
    upstreams: Mutex<BTreeMap<String, Arc<UpstreamHealth>>>,
    certificates: Mutex<Vec<CertificateExpiry>>,
    /// One per [`Direction`], in [`Direction::ALL`] order.
    residence: [Histogram; 2],
    timestamps: Mutex<Vec<(TimestampResult, String, Arc<AtomicU64>)>>,
    /// Whether the relay corrects NTP replies for its residence time: set at start and by a
    /// reload, read by every loop before each batch.
    timestamp_correction: AtomicBool,
    /// Woken whenever a state the systemd status line shows changes.
    changed: Arc<Notify>,
}

#[derive(Default)]
struct TunnelSlot {
    /// 0 before the first report, else 1 + the index in [`TunnelState::ALL`].
    state: AtomicU8,
    /// (tunnel name, server) as first reported.
    labels: OnceLock<(String, String)>,
}

impl Observatory {
    /// `slots`: how many tasks report association gauges (server workers, client tunnels).
    pub fn new(role: &'static str, slots: usize) -> Self {
        let slots = slots.max(1);
        Observatory {
            role,
            stats: Arc::new(Stats::default()),
            failures: FailureCounts::default(),
            gauges: (0..slots)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            tunnels: (0..slots).map(|_| TunnelSlot::default()).collect(),
            rtts: Mutex::new(BTreeMap::new()),
            upstreams: Mutex::new(BTreeMap::new()),
            certificates: Mutex::new(Vec::new()),
            residence: [
                Histogram::new(RESIDENCE_BUCKETS),
                Histogram::new(RESIDENCE_BUCKETS),
            ],
            timestamps: Mutex::new(Vec::new()),
            timestamp_correction: AtomicBool::new(true),
            changed: Arc::new(Notify::new()),
        }
    }

    pub fn role(&self) -> &'static str {
        self.role
    }

    /// One task's current association counts. Cheap (two atomic swaps): call it after every
    /// batch.
    pub fn set_associations(&self, slot: usize, established: usize, half_open: usize) {
        if let Some((e, h)) = self.gauges.get(slot) {
            let before_e = e.swap(established as u64, Ordering::Relaxed);
            let before_h = h.swap(half_open as u64, Ordering::Relaxed);
            if before_e != established as u64 || before_h != half_open as u64 {
                self.changed.notify_one();
            }
        }
    }

    /// Client tunnel `index` is now in `state`; `name` and `server` label it (the first report
    /// fixes them; `server` must be the label given to [`Observatory::rtt_gauge`]). Returns
    /// true when the state changed. Leaving `up` clears the tunnel's round-trip gauge: a
    /// server relay that answers nothing has no round trip. Cheap: call it after every batch.
    pub fn set_tunnel_state(
        &self,
        index: usize,
        state: TunnelState,
        name: &str,
        server: &str,
    ) -> bool {
        let Some(slot) = self.tunnels.get(index) else {
            return false;
        };
        let labels = slot
            .labels
            .get_or_init(|| (name.to_string(), server.to_string()));
        let code = TunnelState::ALL
            .iter()
            .position(|s| *s == state)
            .map_or(0, |i| i as u8 + 1);
        let before = slot.state.swap(code, Ordering::Relaxed);
        if before == code {
            return false;
        }
        if state != TunnelState::Up {
            self.clear_rtt(&labels.1);
        }
        self.changed.notify_one();
        true
    }

    /// The state last reported for tunnel `index`.
    pub fn tunnel_state(&self, index: usize) -> Option<TunnelState> {
        let code = self.tunnels.get(index)?.state.load(Ordering::Relaxed);
        TunnelState::ALL
            .get(usize::from(code).checked_sub(1)?)
            .copied()
    }

    /// The round-trip gauge of `upstream` ("host:port"), created on first use. Called when a
    /// loop starts, not per datagram: the loop keeps the gauge and writes it without a lock.
    pub fn rtt_gauge(&self, upstream: &str) -> Arc<RttGauge> {
        match self.rtts.lock() {
            Ok(mut rtts) => rtts.entry(upstream.to_string()).or_default().clone(),
            Err(_) => Arc::default(),
        }
    }

    /// Forgets the round trips of `upstream`: it went away, and its last RTT is no longer true.
    pub fn clear_rtt(&self, upstream: &str) {
        if let Ok(rtts) = self.rtts.lock() {
            if let Some(gauge) = rtts.get(upstream) {
                gauge.clear();
            }
        }
    }

    /// The up/down gauge of `upstream`, created on first use, for `reporters` loops (server
    /// workers) that each judge it on their own. Take it when a loop starts.
    pub fn upstream_health(&self, upstream: &str, reporters: usize) -> Arc<UpstreamHealth> {
        let rtt = self.rtt_gauge(upstream);
        match self.upstreams.lock() {
            Ok(mut map) => map
                .entry(upstream.to_string())
                .or_insert_with(|| {
                    Arc::new(UpstreamHealth::new(reporters, rtt, self.changed.clone()))
                })
                .clone(),
            Err(_) => Arc::new(UpstreamHealth::new(reporters, rtt, self.changed.clone())),
        }
    }

    /// `upstream` is up or down, as one reporter sees it: the cold-path form of
    /// [`UpstreamHealth::report`] (takes a lock). Some(new state) when the gauge changed.
    pub fn set_upstream_up(&self, upstream: &str, up: bool) -> Option<bool> {
        self.upstream_health(upstream, 1).report(0, up)
    }

    /// Turns the residence-time correction on or off for every loop of this relay.
    pub fn set_timestamp_correction(&self, on: bool) {
        self.timestamp_correction.store(on, Ordering::Relaxed);
    }

    /// Whether the relay corrects NTP replies for its residence time (on unless configured
    /// off). Lock-free.
    pub fn timestamp_correction(&self) -> bool {
        self.timestamp_correction.load(Ordering::Relaxed)
    }

    /// One datagram's time inside the relay, in seconds. Lock-free.
    pub fn observe_residence(&self, direction: Direction, seconds: f64) {
        let index = usize::from(direction == Direction::Reply);
        if let Some(histogram) = self.residence.get(index) {
            histogram.observe(seconds);
        }
    }

    /// The counter of timestamps with this result and reason, created (at 0) on first use:
    /// take it when a loop starts and `fetch_add` it per datagram, without a lock.
    pub fn timestamp_counter(&self, result: TimestampResult, reason: &str) -> Arc<AtomicU64> {
        let Ok(mut counters) = self.timestamps.lock() else {
            return Arc::default();
        };
        if let Some((_, _, counter)) = counters
            .iter()
            .find(|(r, name, _)| *r == result && name == reason)
        {
            return counter.clone();
        }
        let counter = Arc::new(AtomicU64::new(0));
        counters.push((result, reason.to_string(), counter.clone()));
        counter
    }

    /// Counts one timestamp (takes a lock: prefer [`Observatory::timestamp_counter`] on the
    /// datagram path).
    pub fn count_timestamp(&self, result: TimestampResult, reason: &str) {
        self.timestamp_counter(result, reason)
            .fetch_add(1, Ordering::Relaxed);
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
                    not_after = %format_utc(not_after), "certificate expires soon");
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

    /// Resolves when a state the status line shows may have changed.
    pub async fn changed(&self) {
        self.changed.notified().await
    }

    /// This moment, as plain data.
    pub fn snapshot(&self) -> Snapshot {
        let mut counters = Vec::new();
        let mut drops = Vec::new();
        for counter in Counter::ALL {
            let label = counter.label();
            match label.strip_prefix("drop_") {
                Some(reason) => drops.push(NamedCount::new(reason, self.stats.get(*counter))),
                // One truth for refusals: the reasons counted with each "association refused"
                // line, whichever part of the relay refused.
                None if *counter == Counter::AssociationsRefused => {
                    counters.push(NamedCount::new(label, self.failures.total()))
                }
                None => counters.push(NamedCount::new(label, self.stats.get(*counter))),
            }
        }
        let mut associations = Associations::default();
        for (e, h) in &self.gauges {
            associations.established += e.load(Ordering::Relaxed);
            associations.half_open += h.load(Ordering::Relaxed);
        }
        let tunnels = self
            .tunnels
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                let (name, server) = slot.labels.get()?;
                Some(TunnelStatus {
                    tunnel: name.clone(),
                    server: server.clone(),
                    state: self.tunnel_state(index)?.label().to_string(),
                })
            })
            .collect();
        let mut upstreams: BTreeMap<String, UpstreamStatus> = BTreeMap::new();
        if let Ok(rtts) = self.rtts.lock() {
            for (upstream, gauge) in rtts.iter() {
                let sample = gauge.get();
                upstreams.insert(
                    upstream.clone(),
                    UpstreamStatus {
                        upstream: upstream.clone(),
                        up: None,
                        rtt_seconds: sample.map(|(last, _)| last.as_secs_f64()),
                        rtt_smoothed_seconds: sample.map(|(_, smoothed)| smoothed.as_secs_f64()),
                    },
                );
            }
        }
        if let Ok(health) = self.upstreams.lock() {
            for (upstream, health) in health.iter() {
                upstreams
                    .entry(upstream.clone())
                    .or_insert_with(|| UpstreamStatus {
                        upstream: upstream.clone(),
                        ..UpstreamStatus::default()
                    })
                    .up = Some(health.is_up());
            }
        }
        let timestamps = match self.timestamps.lock() {
            Ok(counters) => {
                let mut list: Vec<TimestampCount> = counters
                    .iter()
                    .map(|(result, reason, value)| TimestampCount {
                        result: *result,
                        reason: reason.clone(),
                        value: value.load(Ordering::Relaxed),
                    })
                    .collect();
                list.sort_by(|a, b| (a.result, &a.reason).cmp(&(b.result, &b.reason)));
                list
            }
            Err(_) => Vec::new(),
        };
        Snapshot {
            role: self.role.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            now_unix: unix_now(),
            counters,
            drops,
            handshake_failures: self.failures.snapshot(),
            associations,
            tunnels,
            upstreams: upstreams.into_values().collect(),
            certificates: self
                .certificates
                .lock()
                .map(|c| c.clone())
                .unwrap_or_default(),
            residence: Direction::ALL
                .iter()
                .zip(&self.residence)
                .map(|(direction, histogram)| histogram.snapshot(direction.label()))
                .collect(),
            timestamps,
            process: process::read(),
        }
    }

    /// The Prometheus text of this moment.
    pub fn render(&self) -> String {
        exposition::render(&self.snapshot())
    }

    /// `/status.json`: this moment as JSON.
    pub fn status_json(&self) -> String {
        serde_json::to_string(&self.snapshot()).unwrap_or_else(|_| "{}".to_string())
    }

    /// What systemd's status line should say now, e.g. "2 of 3 tunnels up (tunnel 2:
    /// backing_off); 2 associations established" or "5 associations, 1 half-open; time server
    /// up". Reads atomics only (and the upstream map's lock).
    pub fn status_line(&self) -> String {
        let (mut established, mut half_open) = (0, 0);
        for (e, h) in &self.gauges {
            established += e.load(Ordering::Relaxed);
            half_open += h.load(Ordering::Relaxed);
        }
        let mut line = String::new();
        let reported: Vec<(&str, TunnelState)> = self
            .tunnels
            .iter()
            .enumerate()
            .filter_map(|(index, slot)| {
                Some((slot.labels.get()?.0.as_str(), self.tunnel_state(index)?))
            })
            .collect();
        if !reported.is_empty() {
            let up = reported
                .iter()
                .filter(|(_, s)| *s == TunnelState::Up)
                .count();
            line.push_str(&format!("{up} of {} tunnels up", reported.len()));
            let others: Vec<String> = reported
                .iter()
                .filter(|(_, s)| *s != TunnelState::Up)
                .map(|(name, s)| format!("{name}: {}", s.label()))
                .collect();
            if !others.is_empty() {
                line.push_str(&format!(" ({})", others.join(", ")));
            }
            line.push_str("; ");
        }
        line.push_str(&format!(
            "{established} association{} established, {half_open} handshaking",
            if established == 1 { "" } else { "s" }
        ));
        if let Ok(upstreams) = self.upstreams.lock() {
            for (upstream, health) in upstreams.iter() {
                let state = if health.is_up() { "up" } else { "DOWN" };
                line.push_str(&format!("; upstream {upstream} {state}"));
            }
        }
        line
    }
}

/// Whether one upstream answers, judged by several loops (the server's workers) each from its
/// own traffic. The gauge follows the last loop whose judgement changed: a worker without
/// traffic never changes its mind, so it cannot hide what a busy one sees.
pub struct UpstreamHealth {
    /// Per reporter: 0 not yet reported, 1 up, 2 down.
    reporters: Vec<AtomicU8>,
    up: std::sync::atomic::AtomicBool,
    rtt: Arc<RttGauge>,
    changed: Arc<Notify>,
}

impl UpstreamHealth {
    fn new(reporters: usize, rtt: Arc<RttGauge>, changed: Arc<Notify>) -> Self {
        UpstreamHealth {
            reporters: (0..reporters.max(1)).map(|_| AtomicU8::new(0)).collect(),
            up: std::sync::atomic::AtomicBool::new(true),
            rtt,
            changed,
        }
    }

    /// Reporter `reporter` judges the upstream up or down. Lock-free: call it after every
    /// batch. Returns Some(new state) when the gauge changed, so that exactly one line is
    /// logged for the whole relay; going down clears the upstream's round-trip gauge.
    pub fn report(&self, reporter: usize, up: bool) -> Option<bool> {
        let code = if up { 1 } else { 2 };
        let slot = self.reporters.get(reporter).or(self.reporters.first())?;
        let before = slot.swap(code, Ordering::Relaxed);
        // A first "up" is no news: every upstream starts up.
        if before == code || (before == 0 && up) {
            return None;
        }
        let was_up = self.up.swap(up, Ordering::Relaxed);
        if was_up == up {
            return None;
        }
        if !up {
            self.rtt.clear();
        }
        self.changed.notify_one();
        Some(up)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_snapshot_sums_gauges_and_carries_counters_rtts_and_failures() {
        let o = Observatory::new("server", 2);
        o.stats.incr(Counter::RequestsForwarded);
        o.stats.add(Counter::DropControlMode, 2);
        // The engine's own refusal count is not what the metric shows: the reasons are.
        o.stats.add(Counter::AssociationsRefused, 5);
        o.failures.incr("unknown_ca");
        o.failures.incr("other");
        o.set_associations(0, 3, 1);
        o.set_associations(1, 2, 0);
        o.rtt_gauge("127.0.0.1:123")
            .observe(Duration::from_micros(80));
        let s = o.snapshot();
        assert_eq!(
            (s.associations.established, s.associations.half_open),
            (5, 1)
        );
        assert_eq!(s.upstreams.len(), 1);
        assert_eq!(s.counter("associations_refused"), 2);
        assert!(s.counters.iter().all(|c| !c.name.starts_with("drop_")));
        assert!(s.drops.contains(&NamedCount::new("control_mode", 2)));
        assert!(s.drops.contains(&NamedCount::new("not_client_hello", 0)));
        assert_eq!(s.residence.len(), 2);
        assert!(s.process.is_some());
        let text = o.render();
        assert!(
            text.contains("ntp_dtls_requests_forwarded_total 1\n"),
            "{text}"
        );
        assert!(
            text.contains("ntp_dtls_dropped_total{reason=\"control_mode\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("ntp_dtls_associations_refused_total 2\n"));
        assert!(!text.contains("ntp_dtls_drop_control_mode_total"));
        let json: Snapshot = serde_json::from_str(&o.status_json()).expect("json");
        assert_eq!(json.counter("requests_forwarded"), 1);
    }

    #[test]
    fn tunnel_states_are_labelled_gauges_and_leaving_up_clears_the_rtt() {
        let o = Observatory::new("client", 3);
        let rtt = o.rtt_gauge("time1:1123");
        assert!(o.set_tunnel_state(0, TunnelState::Connecting, "tunnel 1", "time1:1123"));
        assert!(o.set_tunnel_state(0, TunnelState::Up, "tunnel 1", "time1:1123"));
        assert!(!o.set_tunnel_state(0, TunnelState::Up, "tunnel 1", "time1:1123"));
        assert!(o.set_tunnel_state(1, TunnelState::BackingOff, "tunnel 2", "time2:1123"));
        rtt.observe(Duration::from_millis(2));
        assert_eq!(o.tunnel_state(0), Some(TunnelState::Up));
        assert_eq!(o.tunnel_state(2), None);
        let text = o.render();
        assert!(text.contains(
            "ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1:1123\",state=\"up\"} 1\n"
        ));
        assert!(text.contains(
            "ntp_dtls_tunnel_state{tunnel=\"tunnel_2\",server=\"time2:1123\",state=\"up\"} 0\n"
        ));
        assert!(text.contains(
            "ntp_dtls_tunnel_state{tunnel=\"tunnel_2\",server=\"time2:1123\",state=\"backing_off\"} 1\n"
        ));
        assert!(
            !text.contains("tunnel_3"),
            "unreported tunnels are not shown"
        );
        assert!(text.contains("ntp_dtls_upstream_rtt_seconds{upstream=\"time1:1123\"} 0.002\n"));
        assert_eq!(
            o.status_line(),
            "1 of 2 tunnels up (tunnel 2: backing_off); 0 associations established, 0 handshaking"
        );
        assert!(o.set_tunnel_state(0, TunnelState::UpstreamDown, "tunnel 1", "time1:1123"));
        assert_eq!(
            rtt.get(),
            None,
            "a tunnel that is not up keeps no round trip"
        );
        assert!(!o.render().contains("ntp_dtls_upstream_rtt_seconds"));
    }

    #[test]
    fn the_upstream_gauge_follows_the_last_worker_that_changed_its_mind() {
        let o = Observatory::new("server", 2);
        let a = o.upstream_health("127.0.0.1:123", 2);
        let b = o.upstream_health("127.0.0.1:123", 2);
        o.rtt_gauge("127.0.0.1:123")
            .observe(Duration::from_micros(50));
        assert_eq!(a.report(0, true), None, "up from the start");
        assert_eq!(b.report(1, true), None);
        assert_eq!(a.report(0, false), Some(false));
        // Worker 1 has no traffic and keeps saying up: no news, the gauge stays down.
        assert_eq!(b.report(1, true), None);
        assert_eq!(a.report(0, false), None);
        let s = o.snapshot();
        assert_eq!(s.upstreams[0].up, Some(false));
        assert_eq!(
            s.upstreams[0].rtt_seconds, None,
            "a dead upstream has no RTT"
        );
        assert!(
            o.render()
                .contains("ntp_dtls_upstream_up{upstream=\"127.0.0.1:123\"} 0\n")
        );
        assert!(o.status_line().ends_with("; upstream 127.0.0.1:123 DOWN"));
        assert_eq!(a.report(0, true), Some(true));
        assert_eq!(o.set_upstream_up("127.0.0.1:123", true), None);
    }

    #[test]
    fn residence_and_timestamps_are_exposed() {
        let o = Observatory::new("server", 1);
        o.observe_residence(Direction::Request, 0.000_02);
        o.observe_residence(Direction::Reply, 0.003);
        let corrected = o.timestamp_counter(TimestampResult::Corrected, "residence");
        corrected.fetch_add(2, Ordering::Relaxed);
        o.count_timestamp(TimestampResult::Unchanged, "not_server_mode");
        o.count_timestamp(TimestampResult::Corrected, "residence");
        let text = o.render();
        assert!(text.contains(
            "ntp_dtls_residence_seconds_bucket{direction=\"request\",le=\"0.000025\"} 1\n"
        ));
        assert!(text.contains("ntp_dtls_residence_seconds_count{direction=\"reply\"} 1\n"));
        assert!(
            text.contains(
                "ntp_dtls_timestamps_total{result=\"corrected\",reason=\"residence\"} 3\n"
            )
        );
        assert!(text.contains(
            "ntp_dtls_timestamps_total{result=\"unchanged\",reason=\"not_server_mode\"} 1\n"
        ));
    }
}
