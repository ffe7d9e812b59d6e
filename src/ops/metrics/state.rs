//! The domain of the metrics: what a relay reports about itself, as plain data.
//!
//! [`Snapshot`] is one moment of one relay: counters, drops and refusals by reason, gauges,
//! tunnel and upstream states, histograms, certificate expiry and process figures. The live
//! side ([`crate::ops::observe::Observatory`]) builds one per scrape; [`super::exposition`]
//! turns it into Prometheus text and `/status.json` is its serde form, which `ntp-dtls status`
//! reads back. Nothing here does I/O or reads a clock, except [`unix_now`].
//!
//! The live counterparts that the datagram path writes are here too, because they are plain
//! data with atomics: [`FailureCounts`] and [`Histogram`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// A certificate that expires within this many days is warned about, in the log, in the
/// `ntp_dtls_certificate_expiry_warning` gauge and by `ntp-dtls status`.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
pub const SECONDS_PER_DAY: i64 = 86_400;

/// Every handshake failure reason, as [`ntp_dtls_proto::engine::Failure::label`] spells them. The
/// `ntp_dtls_handshakes_failed_total` family always lists all of them, so rates work from 0.
pub const FAILURE_REASONS: &[&str] = &[
    "unknown_ca",
    "name_mismatch",
    "expired",
    "not_yet_valid",
    "wrong_usage",
    "bad_certificate",
    "key_policy",
    "no_client_certificate",
    "no_shared_cipher",
    "no_extended_master_secret",
    "protocol_version",
    "peer_alert",
    "handshake_timeout",
    "other",
];

/// Upper bounds (seconds) of the residence-time histogram buckets: a relay adds tens of
/// microseconds when warm and milliseconds when something is wrong.
pub const RESIDENCE_BUCKETS: &[f64] = &[
    0.000_005, 0.000_01, 0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005,
    0.01, 0.025, 0.1,
];

/// Everything one relay exposes, at one moment.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// "client" or "server": which relay this is.
    pub role: String,
    pub version: String,
    /// Unix time the snapshot was taken, for the expiry warning.
    pub now_unix: i64,
    /// Every counter but the drops, by its stable label (`requests_forwarded`, ...).
    pub counters: Vec<NamedCount>,
    /// Datagrams dropped, by reason (`too_short`, `no_association`, ...), every reason listed.
    pub drops: Vec<NamedCount>,
    /// Handshakes refused, by [`FAILURE_REASONS`]; their sum is `associations_refused`.
    pub handshake_failures: Vec<NamedCount>,
    pub associations: Associations,
    /// The client relay's tunnels, in configuration order (empty on the server relay).
    pub tunnels: Vec<TunnelStatus>,
    /// Each upstream: the server relay (client side) or the time server (server side).
    pub upstreams: Vec<UpstreamStatus>,
    pub certificates: Vec<CertificateExpiry>,
    /// Time a datagram spends inside the relay, per direction.
    pub residence: Vec<HistogramSnapshot>,
    /// Timestamps the relay corrected or left unchanged, by reason.
    pub timestamps: Vec<TimestampCount>,
    /// This process, from /proc/self; None where that cannot be read.
    pub process: Option<ProcessStats>,
}

/// A counter value under its label.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedCount {
    pub name: String,
    pub value: u64,
}

impl NamedCount {
    pub fn new(name: &str, value: u64) -> Self {
        NamedCount {
            name: name.to_string(),
            value,
        }
    }
}

/// DTLS associations held now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Associations {
    pub established: u64,
    /// Handshakes started and not finished.
    pub half_open: u64,
}

/// One client tunnel as the operator sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TunnelStatus {
    /// "tunnel 1", or the listen address of a tunnel given by flags.
    pub tunnel: String,
    /// The server relay, HOST:PORT as configured.
    pub server: String,
    /// One of [`ntp_dtls_proto::tunnel::TunnelState::label`].
    pub state: String,
}

/// One upstream: is it answering, and how fast.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct UpstreamStatus {
    /// "host:port" as configured, or "builtin".
    pub upstream: String,
    /// None until the relay has judged it.
    pub up: Option<bool>,
    /// Last and smoothed round trip; None before a sample or once the upstream went away.
    pub rtt_seconds: Option<f64>,
    pub rtt_smoothed_seconds: Option<f64>,
}

/// When one certificate stops being valid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateExpiry {
    /// "server", "client_ca", "tunnel 1 ca", ...
    pub cert: String,
    /// The certificate's notAfter, as unix time.
    pub not_after_unix: i64,
}

/// A histogram at one moment: cumulative counts per upper bound, as Prometheus wants them.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct HistogramSnapshot {
    /// The label value that tells this histogram from its siblings ("request", "reply").
    pub label: String,
    /// (upper bound in seconds, observations at or below it); the +Inf bucket is `count`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

/// Whether the relay corrected a timestamp or left it as it was.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestampResult {
    Corrected,
    Unchanged,
}

impl TimestampResult {
    pub fn label(self) -> &'static str {
        match self {
            TimestampResult::Corrected => "corrected",
            TimestampResult::Unchanged => "unchanged",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimestampCount {
    pub result: TimestampResult,
    pub reason: String,
    pub value: u64,
}

/// What the kernel says about this process.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct ProcessStats {
    pub resident_memory_bytes: u64,
    pub virtual_memory_bytes: u64,
    pub cpu_seconds: f64,
    pub open_fds: u64,
    pub max_fds: Option<u64>,
    pub start_time_seconds: f64,
}

impl Snapshot {
    /// The value of counter `name` (a [`ntp_dtls_proto::stats::Counter`] label), 0 if absent.
    pub fn counter(&self, name: &str) -> u64 {
        self.counters
            .iter()
            .find(|c| c.name == name)
            .map_or(0, |c| c.value)
    }
}

/// The current time as unix seconds (0 before 1970, which no clock we run on shows).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Whole days from `now_unix` until `not_after_unix` (negative once expired).
pub fn days_until(not_after_unix: i64, now_unix: i64) -> i64 {
    (not_after_unix - now_unix).div_euclid(SECONDS_PER_DAY)
}

/// True when a certificate expires within [`EXPIRY_WARNING_DAYS`] (or has expired).
pub fn expires_soon(not_after_unix: i64, now_unix: i64) -> bool {
    not_after_unix - now_unix < EXPIRY_WARNING_DAYS * SECONDS_PER_DAY
}

/// The notAfter of the first (leaf) certificate of a DER chain, as unix time.
pub fn not_after_unix(der: &[u8]) -> Option<i64> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// "YYYY-MM-DD HH:MM:SS UTC" without a date library (Howard Hinnant's civil_from_days).
pub fn format_utc(unix: i64) -> String {
    let days = unix.div_euclid(SECONDS_PER_DAY);
    let secs = unix.rem_euclid(SECONDS_PER_DAY);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Handshake failures by reason. Lock-free; shared by the relay's tasks.
pub struct FailureCounts {
    values: Vec<AtomicU64>,
}

impl Default for FailureCounts {
    fn default() -> Self {
        FailureCounts {
            values: FAILURE_REASONS.iter().map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

impl FailureCounts {
    /// Counts one refusal; `reason` is [`ntp_dtls_proto::engine::Failure::label`]. Unknown
    /// labels count as "other". Every "association refused" log line must come with one call:
    /// `associations_refused_total` is the sum of these.
    pub fn incr(&self, reason: &str) {
        let index = FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(FAILURE_REASONS.len() - 1);
        if let Some(value) = self.values.get(index) {
            value.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn get(&self, reason: &str) -> u64 {
        FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .and_then(|i| self.values.get(i))
            .map_or(0, |v| v.load(Ordering::Relaxed))
    }

    /// Every reason with its count, in [`FAILURE_REASONS`] order.
    pub fn snapshot(&self) -> Vec<NamedCount> {
        FAILURE_REASONS
            .iter()
            .zip(&self.values)
            .map(|(r, v)| NamedCount::new(r, v.load(Ordering::Relaxed)))
            .collect()
    }

    pub fn total(&self) -> u64 {
        self.values.iter().map(|v| v.load(Ordering::Relaxed)).sum()
    }
}

/// A Prometheus histogram written lock-free from the datagram path: one atomic per bucket and
/// the sum in nanoseconds.
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative), the last one for observations above every bound.
    counts: Vec<AtomicU64>,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_nanos: AtomicU64::new(0),
        }
    }

    /// One observation, in seconds. Negative values count as 0 (a clock step between the two
    /// readings), NaN is ignored.
    pub fn observe(&self, seconds: f64) {
        if seconds.is_nan() {
            return;
        }
        let seconds = seconds.max(0.0);
        let bucket = self
            .bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(self.bounds.len());
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        // Saturating float-to-int: an absurd value cannot wrap the sum.
        let nanos = (seconds * 1e9).min(u64::MAX as f64) as u64;
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    pub fn snapshot(&self, label: &str) -> HistogramSnapshot {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(self.bounds.len());
        for (bound, count) in self.bounds.iter().zip(&self.counts) {
            cumulative += count.load(Ordering::Relaxed);
            buckets.push((*bound, cumulative));
        }
        let count = cumulative + self.counts.last().map_or(0, |c| c.load(Ordering::Relaxed));
        HistogramSnapshot {
            label: label.to_string(),
            buckets,
            sum: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            count,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates_are_civil_dates() {
        assert_eq!(format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(format_utc(1_800_000_000), "2027-01-15 08:00:00 UTC");
        assert_eq!(format_utc(-1), "1969-12-31 23:59:59 UTC");
    }

    #[test]
    fn failure_counts_cover_every_engine_label() {
        use ntp_dtls_proto::engine::Failure;
        let every = [
            Failure::UnknownCa(String::new()),
            Failure::NameMismatch(String::new()),
            Failure::Expired(String::new()),
            Failure::NotYetValid(String::new()),
            Failure::WrongUsage(String::new()),
            Failure::BadCertificate(String::new()),
            Failure::KeyPolicy(String::new()),
            Failure::NoClientCertificate,
            Failure::NoSharedCipher,
            Failure::NoExtendedMasterSecret,
            Failure::ProtocolVersion,
            Failure::PeerAlert(String::new()),
            Failure::HandshakeTimeout,
            Failure::Other(String::new()),
        ];
        assert_eq!(every.len(), FAILURE_REASONS.len());
        let counts = FailureCounts::default();
        for failure in &every {
            assert!(FAILURE_REASONS.contains(&failure.label()), "{failure:?}");
            counts.incr(failure.label());
        }
        counts.incr("not_a_reason");
        assert_eq!(counts.get("unknown_ca"), 1);
        assert_eq!(counts.get("other"), 2);
        assert_eq!(counts.total(), 15);
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), FAILURE_REASONS.len());
        assert_eq!(snapshot[0], NamedCount::new("unknown_ca", 1));
    }

    #[test]
    fn the_histogram_is_cumulative_with_an_inf_bucket() {
        static BOUNDS: &[f64] = &[0.001, 0.01];
        let h = Histogram::new(BOUNDS);
        for seconds in [0.0005, 0.001, 0.005, 0.5, -1.0, f64::NAN] {
            h.observe(seconds);
        }
        let s = h.snapshot("request");
        assert_eq!(s.buckets, vec![(0.001, 3), (0.01, 4)]);
        assert_eq!(s.count, 5);
        assert!((s.sum - 0.5065).abs() < 1e-9, "{}", s.sum);
        assert_eq!(s.label, "request");
    }

    #[test]
    fn the_leaf_expiry_is_read_from_der() {
        let mut params =
            rcgen::CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        params.not_after = rcgen::date_time_ymd(2030, 1, 2);
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.self_signed(&key).expect("cert");
        assert_eq!(
            not_after_unix(cert.der()).map(format_utc).as_deref(),
            Some("2030-01-02 00:00:00 UTC")
        );
        assert_eq!(not_after_unix(b"not a certificate"), None);
    }

    #[test]
    fn a_snapshot_survives_json() {
        let snapshot = Snapshot {
            role: "client".into(),
            counters: vec![NamedCount::new("requests_forwarded", 3)],
            upstreams: vec![UpstreamStatus {
                upstream: "a:1".into(),
                up: Some(false),
                rtt_seconds: None,
                rtt_smoothed_seconds: None,
            }],
            timestamps: vec![TimestampCount {
                result: TimestampResult::Corrected,
                reason: "residence".into(),
                value: 2,
            }],
            process: Some(ProcessStats::default()),
            ..Snapshot::default()
        };
        let text = serde_json::to_string(&snapshot).expect("json");
        assert!(text.contains("\"result\":\"corrected\""), "{text}");
        let back: Snapshot = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, snapshot);
        assert_eq!(back.counter("requests_forwarded"), 3);
        assert_eq!(back.counter("nothing"), 0);
    }
}
