//! Metrics: Prometheus text exposition (format 0.0.4), a minimal HTTP server for it, and the
//! parser behind `ntp-dtls status ADDR`.
//!
//! The pieces are separate so each is tested on its own:
//!
//! - [`MetricsSnapshot`] is a plain struct the relays fill: the [`Stats`] counters, association
//!   gauges, per-upstream round-trip times ([`RttEstimator`]), certificate expiry times, and
//!   handshake failures by reason ([`FailureCounts`]).
//! - [`render`] turns a snapshot into exposition text: pure, no clock, no I/O.
//! - [`serve`] answers `GET /metrics` with whatever text a closure returns.
//! - [`parse`] and [`summary`] read exposition text back, for `ntp-dtls status`.
//!
//! Metric names (stable; dashboards and alerts use them):
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ntp_dtls_build_info` | gauge (1) | `role`, `version` |
//! | `ntp_dtls_<counter>_total` | counter | one per [`Counter`], e.g. `ntp_dtls_requests_forwarded_total` |
//! | `ntp_dtls_handshakes_failed_total` | counter | `reason` ([`FAILURE_REASONS`]) |
//! | `ntp_dtls_associations` | gauge | `state` = `established` or `half_open` |
//! | `ntp_dtls_upstream_rtt_seconds` | gauge | `upstream` = `host:port` |
//! | `ntp_dtls_upstream_rtt_smoothed_seconds` | gauge | `upstream` |
//! | `ntp_dtls_certificate_expiry_timestamp_seconds` | gauge | `cert` = `server`, `client` or a path |
//! | `ntp_dtls_certificate_expiry_warning` | gauge (0/1) | `cert`: 1 within [`EXPIRY_WARNING_DAYS`] |

use std::fmt::Write as _;
use std::future::Future;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use ntp_dtls_proto::stats::{Counter, Stats};

/// Every metric name starts with this.
pub const PREFIX: &str = "ntp_dtls_";
/// The Content-Type of the exposition format we write.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
/// A certificate that expires within this many days is warned about, in the log and in the
/// `ntp_dtls_certificate_expiry_warning` gauge.
pub const EXPIRY_WARNING_DAYS: i64 = 30;
const SECONDS_PER_DAY: i64 = 86_400;

/// Every handshake failure reason, as [`ntp_dtls_proto::engine::Failure::label`] spells them. The
/// `ntp_dtls_handshakes_failed_total` family always lists all of them, so rates work from 0.
pub const FAILURE_REASONS: &[&str] = &[
    "unknown_ca",
    "name_mismatch",
    "expired",
    "not_yet_valid",
    "wrong_usage",
    "bad_certificate",
    "no_client_certificate",
    "no_shared_cipher",
    "no_extended_master_secret",
    "protocol_version",
    "peer_alert",
    "handshake_timeout",
    "other",
];

/// Everything one relay exposes, at one moment. The relays build one per scrape.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricsSnapshot {
    /// "client" or "server": which relay this is.
    pub role: String,
    /// Counter values, in [`Counter::ALL`] order or any order; see [`MetricsSnapshot::counters_from`].
    pub counters: Vec<(Counter, u64)>,
    /// DTLS associations established right now.
    pub associations_established: u64,
    /// DTLS associations whose handshake has started and not yet finished.
    pub associations_half_open: u64,
    /// One entry per upstream: the server relay (client side) or the time server (server side).
    pub upstreams: Vec<UpstreamRtt>,
    /// Certificates in service and when they expire.
    pub certificates: Vec<CertificateExpiry>,
    /// Handshake failures by reason label; see [`FailureCounts::snapshot`].
    pub handshake_failures: Vec<(String, u64)>,
    /// Unix time the snapshot was taken, for the expiry warning gauge.
    pub now_unix: i64,
}

/// Round-trip times towards one upstream, in seconds. None until a first sample.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UpstreamRtt {
    /// "host:port", as configured.
    pub upstream: String,
    pub last_seconds: Option<f64>,
    pub smoothed_seconds: Option<f64>,
}

/// When one certificate stops being valid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// "server", "client", or the file's path.
    pub cert: String,
    /// The certificate's notAfter, as unix time.
    pub not_after_unix: i64,
}

impl MetricsSnapshot {
    /// The counters of `stats`, every one of them, in [`Counter::ALL`] order.
    pub fn counters_from(stats: &Stats) -> Vec<(Counter, u64)> {
        Counter::ALL.iter().map(|c| (*c, stats.get(*c))).collect()
    }

    /// A snapshot with the counters of `stats` and the current time; the caller adds the rest.
    pub fn new(role: &str, stats: &Stats) -> Self {
        MetricsSnapshot {
            role: role.to_string(),
            counters: Self::counters_from(stats),
            now_unix: unix_now(),
            ..MetricsSnapshot::default()
        }
    }
}

/// The current time as unix seconds (0 before 1970, which no clock we run on shows).
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
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

/// Handshake failures by reason. Lock-free like [`Stats`]; shared by the relay's tasks.
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
    /// Counts one failure; `reason` is [`ntp_dtls_proto::engine::Failure::label`]. Unknown labels count
    /// as "other".
    pub fn incr(&self, reason: &str) {
        let index = FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(FAILURE_REASONS.len() - 1);
        self.values[index].fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self, reason: &str) -> u64 {
        FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .map_or(0, |i| self.values[i].load(Ordering::Relaxed))
    }

    /// Every reason with its count, in [`FAILURE_REASONS`] order, for [`MetricsSnapshot`].
    pub fn snapshot(&self) -> Vec<(String, u64)> {
        FAILURE_REASONS
            .iter()
            .zip(&self.values)
            .map(|(r, v)| (r.to_string(), v.load(Ordering::Relaxed)))
            .collect()
    }
}

/// Last and smoothed round-trip time towards one upstream. The smoothing is RFC 6298's
/// (SRTT = 7/8 SRTT + 1/8 sample), so one slow reply moves it little.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RttEstimator {
    last: Option<f64>,
    smoothed: Option<f64>,
}

impl RttEstimator {
    pub fn observe(&mut self, rtt: Duration) {
        let sample = rtt.as_secs_f64();
        self.last = Some(sample);
        self.smoothed = Some(match self.smoothed {
            None => sample,
            Some(s) => s + (sample - s) / 8.0,
        });
    }

    pub fn last(&self) -> Option<f64> {
        self.last
    }

    pub fn smoothed(&self) -> Option<f64> {
        self.smoothed
    }

    /// This estimator as a snapshot entry for `upstream` ("host:port").
    pub fn to_snapshot(&self, upstream: &str) -> UpstreamRtt {
        UpstreamRtt {
            upstream: upstream.to_string(),
            last_seconds: self.last,
            smoothed_seconds: self.smoothed,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Rendering
// ---------------------------------------------------------------------------------------------

/// The snapshot as Prometheus text exposition format 0.0.4. Families appear in a fixed order;
/// a family with no sample (no upstream yet, say) is left out.
pub fn render(snapshot: &MetricsSnapshot) -> String {
    let mut out = String::new();
    let role = if snapshot.role.is_empty() {
        "unknown"
    } else {
        &snapshot.role
    };
    family(
        &mut out,
        "build_info",
        "gauge",
        "Always 1; the labels say which relay and version this is",
        &[(
            vec![("role", role), ("version", env!("CARGO_PKG_VERSION"))],
            1.0,
        )],
    );
    for (counter, value) in &snapshot.counters {
        family(
            &mut out,
            &format!("{}_total", counter.label()),
            "counter",
            counter.help(),
            &[(vec![], *value as f64)],
        );
    }
    let failures: Vec<_> = snapshot
        .handshake_failures
        .iter()
        .map(|(reason, n)| (vec![("reason", reason.as_str())], *n as f64))
        .collect();
    family(
        &mut out,
        "handshakes_failed_total",
        "counter",
        "DTLS handshakes that failed, by reason",
        &failures,
    );
    family(
        &mut out,
        "associations",
        "gauge",
        "DTLS associations held now, by state",
        &[
            (
                vec![("state", "established")],
                snapshot.associations_established as f64,
            ),
            (
                vec![("state", "half_open")],
                snapshot.associations_half_open as f64,
            ),
        ],
    );
    let rtt = |pick: fn(&UpstreamRtt) -> Option<f64>| -> Vec<(Vec<(&str, &str)>, f64)> {
        snapshot
            .upstreams
            .iter()
            .filter_map(|u| pick(u).map(|v| (vec![("upstream", u.upstream.as_str())], v)))
            .collect()
    };
    family(
        &mut out,
        "upstream_rtt_seconds",
        "gauge",
        "Round-trip time of the last request answered by the upstream",
        &rtt(|u| u.last_seconds),
    );
    family(
        &mut out,
        "upstream_rtt_smoothed_seconds",
        "gauge",
        "Smoothed round-trip time to the upstream (RFC 6298 weights)",
        &rtt(|u| u.smoothed_seconds),
    );
    let certs = |value: &dyn Fn(&CertificateExpiry) -> f64| -> Vec<(Vec<(&str, &str)>, f64)> {
        snapshot
            .certificates
            .iter()
            .map(|c| (vec![("cert", c.cert.as_str())], value(c)))
            .collect()
    };
    family(
        &mut out,
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate stops being valid (notAfter), as unix time",
        &certs(&|c| c.not_after_unix as f64),
    );
    family(
        &mut out,
        "certificate_expiry_warning",
        "gauge",
        "1 when the certificate expires within 30 days (or has expired), else 0",
        &certs(&|c| {
            if expires_soon(c.not_after_unix, snapshot.now_unix) {
                1.0
            } else {
                0.0
            }
        }),
    );
    out
}

type Labels<'a> = Vec<(&'a str, &'a str)>;

fn family(out: &mut String, name: &str, kind: &str, help: &str, samples: &[(Labels<'_>, f64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {PREFIX}{name} {}", escape_help(help));
    let _ = writeln!(out, "# TYPE {PREFIX}{name} {kind}");
    for (labels, value) in samples {
        out.push_str(PREFIX);
        out.push_str(name);
        if !labels.is_empty() {
            out.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                let _ = write!(out, "{key}=\"{}\"", escape_label(value));
            }
            out.push('}');
        }
        let _ = writeln!(out, " {}", format_value(*value));
    }
}

fn escape_help(s: &str) -> String {
    s.replace('\\', "\\\\").replace('\n', "\\n")
}

fn escape_label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction, other values as Rust prints them (never an exponent), and the
/// special values as Prometheus spells them.
fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

/// One sample line of exposition text.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// The samples of exposition text, in order. Comments, blank lines and lines that do not parse
/// are skipped: `status` shows what it can read.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<Sample> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .unwrap_or(line.len());
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remaining) = parse_labels(after)?;
        labels = parsed;
        rest = remaining;
    }
    // The value, then an optional timestamp we ignore.
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// Parses `key="value",...}`; returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(Vec<(String, String)>, &str)> {
    let mut labels = Vec::new();
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Some((labels, rest));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_string();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (_, c) => value.push(c),
            }
        };
        labels.push((key, value));
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Summary for `ntp-dtls status`
// ---------------------------------------------------------------------------------------------

/// A short human summary of exposition text, as `ntp-dtls status ADDR` prints it.
pub fn summary(text: &str) -> String {
    summary_at(text, unix_now())
}

/// [`summary`] at a given time (for the days-to-expiry lines).
pub fn summary_at(text: &str, now_unix: i64) -> String {
    let samples = parse(text);
    let value = |name: &str| -> u64 {
        samples
            .iter()
            .find(|s| s.name == format!("{PREFIX}{name}") && s.labels.is_empty())
            .map_or(0, |s| s.value as u64)
    };
    let labelled = |name: &str| -> Vec<&Sample> {
        samples
            .iter()
            .filter(|s| s.name == format!("{PREFIX}{name}"))
            .collect()
    };
    let with_label = |name: &str, key: &str, val: &str| -> u64 {
        labelled(name)
            .iter()
            .find(|s| s.label(key) == Some(val))
            .map_or(0, |s| s.value as u64)
    };

    let mut out = String::new();
    if let Some(info) = labelled("build_info").first() {
        let _ = writeln!(
            out,
            "ntp-dtls {} relay, version {}",
            info.label("role").unwrap_or("?"),
            info.label("version").unwrap_or("?")
        );
    }
    let _ = writeln!(
        out,
        "associations: {} established, {} half-open (since start: {} set up, {} refused, {} closed)",
        with_label("associations", "state", "established"),
        with_label("associations", "state", "half_open"),
        value("associations_established_total"),
        value("associations_refused_total"),
        value("associations_closed_total"),
    );
    let _ = writeln!(
        out,
        "traffic: {} requests forwarded, {} replies delivered",
        value("requests_forwarded_total"),
        value("replies_delivered_total"),
    );
    let nonzero = |prefix: &str, strip: &str| -> Vec<String> {
        samples
            .iter()
            .filter(|s| s.value > 0.0 && s.labels.is_empty())
            .filter_map(|s| {
                let bare = s.name.strip_prefix(PREFIX)?.strip_suffix("_total")?;
                bare.starts_with(prefix)
                    .then(|| format!("{}={}", bare.trim_start_matches(strip), s.value as u64))
            })
            .collect()
    };
    let drops = nonzero("drop_", "drop_");
    let _ = writeln!(
        out,
        "drops: {}",
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops.join(" ")
        }
    );
    let pending = nonzero("pending_", "");
    if !pending.is_empty() {
        let _ = writeln!(out, "pending table: {}", pending.join(" "));
    }
    let failures: Vec<String> = labelled("handshakes_failed_total")
        .iter()
        .filter(|s| s.value > 0.0)
        .map(|s| format!("{}={}", s.label("reason").unwrap_or("?"), s.value as u64))
        .collect();
    if !failures.is_empty() {
        let _ = writeln!(out, "handshakes failed: {}", failures.join(" "));
    }
    let smoothed = labelled("upstream_rtt_smoothed_seconds");
    for last in labelled("upstream_rtt_seconds") {
        let upstream = last.label("upstream").unwrap_or("?");
        let _ = write!(out, "upstream {upstream}: rtt {}", format_ms(last.value));
        if let Some(s) = smoothed
            .iter()
            .find(|s| s.label("upstream") == Some(upstream))
        {
            let _ = write!(out, ", smoothed {}", format_ms(s.value));
        }
        out.push('\n');
    }
    for cert in labelled("certificate_expiry_timestamp_seconds") {
        let name = cert.label("cert").unwrap_or("?");
        let not_after = cert.value as i64;
        let days = days_until(not_after, now_unix);
        let _ = writeln!(
            out,
            "certificate {name}: expires {} ({})",
            format_utc(not_after),
            if not_after <= now_unix {
                "EXPIRED".to_string()
            } else {
                format!("in {days} days")
            }
        );
        if expires_soon(not_after, now_unix) {
            let _ = writeln!(
                out,
                "WARNING: certificate {name} {}: renew it",
                if not_after <= now_unix {
                    "has expired".to_string()
                } else {
                    format!("expires in {days} days (under {EXPIRY_WARNING_DAYS})")
                }
            );
        }
    }
    out
}

fn format_ms(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1000.0)
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

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// Longest request head we read; a scraper's is a few hundred bytes.
pub const MAX_REQUEST_LEN: usize = 8192;
/// Time a client has to send its request and read the answer.
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 32;

/// Serves `GET /metrics` on `listener` until `shutdown` resolves: 200 with `snapshot()` as
/// [`CONTENT_TYPE`], 404 for any other path or method, 400 for a malformed request, 431 for a
/// request head over [`MAX_REQUEST_LEN`]. One task per connection, each bounded by
/// [`CONNECTION_TIMEOUT`]; `Connection: close`, no keep-alive.
///
/// Must run inside a [`tokio::task::LocalSet`] (connection tasks are `spawn_local`ed), so
/// `snapshot` need not be `Send` and may read the relay's `Rc`/`RefCell` state directly. It is
/// called once per `GET /metrics`, on the relay's thread: keep it cheap.
pub async fn serve(
    listener: TcpListener,
    snapshot: impl Fn() -> String + 'static,
    shutdown: impl Future<Output = ()>,
) {
    serve_with_timeout(listener, snapshot, shutdown, CONNECTION_TIMEOUT).await
}

async fn serve_with_timeout(
    listener: TcpListener,
    snapshot: impl Fn() -> String + 'static,
    shutdown: impl Future<Output = ()>,
    connection_timeout: Duration,
) {
    let snapshot: Rc<dyn Fn() -> String> = Rc::new(snapshot);
    let active = Rc::new(std::cell::Cell::new(0usize));
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: pause instead of spinning.
                tracing::debug!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if active.get() >= MAX_CONNECTIONS {
            drop(stream);
            continue;
        }
        active.set(active.get() + 1);
        let snapshot = snapshot.clone();
        let active = active.clone();
        tokio::task::spawn_local(async move {
            let _ = tokio::time::timeout(connection_timeout, handle(stream, &*snapshot)).await;
            active.set(active.get() - 1);
        });
    }
}

async fn handle(mut stream: TcpStream, snapshot: &dyn Fn() -> String) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let head_complete = loop {
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            break true;
        }
        if buf.len() > MAX_REQUEST_LEN {
            break false;
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            // Closed before a full head: answer what we can if the request line is there.
            break buf.contains(&b'\n');
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let response = if !head_complete {
        response(
            431,
            "Request Header Fields Too Large",
            "request too large\n",
        )
    } else {
        let line = buf.split(|b| *b == b'\n').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        match (parts.next(), parts.next(), parts.next()) {
            (Some(method), Some(target), Some(version)) if version.starts_with("HTTP/1.") => {
                let path = target.split('?').next().unwrap_or(target);
                if method == "GET" && path == "/metrics" {
                    let body = snapshot();
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: {CONTENT_TYPE}\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    )
                } else {
                    response(404, "Not Found", "not found: try GET /metrics\n")
                }
            }
            _ => response(400, "Bad Request", "bad request\n"),
        }
    };
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await?;
    // Read what the client may still send (the rest of an oversized request) until it closes:
    // closing with unread data would reset the connection and could discard our answer.
    let mut drained = 0;
    while drained < 64 * 1024 {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => drained += n,
        }
    }
    Ok(())
}

fn response(code: u16, reason: &str, body: &str) -> String {
    format!(
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// Fetches `GET /metrics` from `addr` ("host:port") and returns the body: the client side of
/// `ntp-dtls status ADDR`.
pub async fn fetch(addr: &str, timeout: Duration) -> std::io::Result<String> {
    let work = async {
        let mut stream = TcpStream::connect(addr).await?;
        let host = addr;
        stream
            .write_all(
                format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut raw = Vec::new();
        stream.take(16 * 1024 * 1024).read_to_end(&mut raw).await?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text
            .split_once("\r\n\r\n")
            .ok_or_else(|| std::io::Error::other("malformed HTTP response"))?;
        let status = head.lines().next().unwrap_or_default();
        if status.split_whitespace().nth(1) != Some("200") {
            return Err(std::io::Error::other(format!(
                "{addr}: {status} (is this the --metrics address of an ntp-dtls relay?)"
            )));
        }
        Ok(body.to_string())
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "timed out"))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_snapshot() -> MetricsSnapshot {
        MetricsSnapshot {
            role: "client".into(),
            counters: vec![
                (Counter::RequestsForwarded, 12),
                (Counter::DropControlMode, 2),
            ],
            associations_established: 1,
            associations_half_open: 0,
            upstreams: vec![
                UpstreamRtt {
                    upstream: "time1.example.net:1123".into(),
                    last_seconds: Some(0.0015),
                    smoothed_seconds: Some(0.00125),
                },
                UpstreamRtt {
                    upstream: "192.0.2.30:1123".into(),
                    last_seconds: None,
                    smoothed_seconds: None,
                },
            ],
            certificates: vec![CertificateExpiry {
                cert: "/etc/ntp-dtls/client.pem".into(),
                not_after_unix: 1_800_000_000,
            }],
            handshake_failures: vec![("unknown_ca".into(), 3), ("expired".into(), 0)],
            now_unix: 1_800_000_000 - 10 * SECONDS_PER_DAY,
        }
    }

    #[test]
    fn render_writes_the_exact_exposition_text() {
        let expected = format!(
            "\
# HELP ntp_dtls_build_info Always 1; the labels say which relay and version this is
# TYPE ntp_dtls_build_info gauge
ntp_dtls_build_info{{role=\"client\",version=\"{version}\"}} 1
# HELP ntp_dtls_requests_forwarded_total NTP requests sent on towards the time server
# TYPE ntp_dtls_requests_forwarded_total counter
ntp_dtls_requests_forwarded_total 12
# HELP ntp_dtls_drop_control_mode_total NTP mode 6 (control) packets: never forwarded
# TYPE ntp_dtls_drop_control_mode_total counter
ntp_dtls_drop_control_mode_total 2
# HELP ntp_dtls_handshakes_failed_total DTLS handshakes that failed, by reason
# TYPE ntp_dtls_handshakes_failed_total counter
ntp_dtls_handshakes_failed_total{{reason=\"unknown_ca\"}} 3
ntp_dtls_handshakes_failed_total{{reason=\"expired\"}} 0
# HELP ntp_dtls_associations DTLS associations held now, by state
# TYPE ntp_dtls_associations gauge
ntp_dtls_associations{{state=\"established\"}} 1
ntp_dtls_associations{{state=\"half_open\"}} 0
# HELP ntp_dtls_upstream_rtt_seconds Round-trip time of the last request answered by the upstream
# TYPE ntp_dtls_upstream_rtt_seconds gauge
ntp_dtls_upstream_rtt_seconds{{upstream=\"time1.example.net:1123\"}} 0.0015
# HELP ntp_dtls_upstream_rtt_smoothed_seconds Smoothed round-trip time to the upstream (RFC 6298 weights)
# TYPE ntp_dtls_upstream_rtt_smoothed_seconds gauge
ntp_dtls_upstream_rtt_smoothed_seconds{{upstream=\"time1.example.net:1123\"}} 0.00125
# HELP ntp_dtls_certificate_expiry_timestamp_seconds When the certificate stops being valid (notAfter), as unix time
# TYPE ntp_dtls_certificate_expiry_timestamp_seconds gauge
ntp_dtls_certificate_expiry_timestamp_seconds{{cert=\"/etc/ntp-dtls/client.pem\"}} 1800000000
# HELP ntp_dtls_certificate_expiry_warning 1 when the certificate expires within 30 days (or has expired), else 0
# TYPE ntp_dtls_certificate_expiry_warning gauge
ntp_dtls_certificate_expiry_warning{{cert=\"/etc/ntp-dtls/client.pem\"}} 1
",
            version = env!("CARGO_PKG_VERSION")
        );
        assert_eq!(render(&small_snapshot()), expected);
    }

    #[test]
    fn every_counter_is_rendered_with_a_total_suffix() {
        let stats = Stats::default();
        stats.add(Counter::DropPrivateMode, 7);
        let text = render(&MetricsSnapshot::new("server", &stats));
        for counter in Counter::ALL {
            let name = format!("ntp_dtls_{}_total", counter.label());
            assert!(text.contains(&format!("# TYPE {name} counter\n")), "{name}");
        }
        assert!(
            text.contains("\nntp_dtls_drop_private_mode_total 7\n"),
            "{text}"
        );
    }

    #[test]
    fn parse_reads_back_what_render_wrote() {
        let snapshot = small_snapshot();
        let samples = parse(&render(&snapshot));
        let find = |name: &str, label: Option<(&str, &str)>| -> Option<f64> {
            samples
                .iter()
                .find(|s| {
                    s.name == name
                        && match label {
                            None => s.labels.is_empty(),
                            Some((k, v)) => s.label(k) == Some(v),
                        }
                })
                .map(|s| s.value)
        };
        // One sample per line that is not a comment.
        let lines = render(&snapshot)
            .lines()
            .filter(|l| !l.starts_with('#'))
            .count();
        assert_eq!(samples.len(), lines);
        assert_eq!(find("ntp_dtls_requests_forwarded_total", None), Some(12.0));
        assert_eq!(find("ntp_dtls_drop_control_mode_total", None), Some(2.0));
        assert_eq!(
            find(
                "ntp_dtls_handshakes_failed_total",
                Some(("reason", "unknown_ca"))
            ),
            Some(3.0)
        );
        assert_eq!(
            find("ntp_dtls_associations", Some(("state", "established"))),
            Some(1.0)
        );
        assert_eq!(
            find(
                "ntp_dtls_upstream_rtt_seconds",
                Some(("upstream", "time1.example.net:1123"))
            ),
            Some(0.0015)
        );
        assert_eq!(
            find(
                "ntp_dtls_certificate_expiry_timestamp_seconds",
                Some(("cert", "/etc/ntp-dtls/client.pem"))
            ),
            Some(1_800_000_000.0)
        );
        assert_eq!(
            find(
                "ntp_dtls_build_info",
                Some(("version", env!("CARGO_PKG_VERSION")))
            ),
            Some(1.0)
        );
    }

    #[test]
    fn label_values_are_escaped_and_unescaped() {
        let snapshot = MetricsSnapshot {
            certificates: vec![CertificateExpiry {
                cert: "a\"b\\c\nd".into(),
                not_after_unix: 5,
            }],
            ..MetricsSnapshot::default()
        };
        let text = render(&snapshot);
        assert!(text.contains(r#"{cert="a\"b\\c\nd"} 5"#), "{text}");
        let sample = parse(&text)
            .into_iter()
            .find(|s| s.name == "ntp_dtls_certificate_expiry_timestamp_seconds")
            .expect("sample");
        assert_eq!(sample.label("cert"), Some("a\"b\\c\nd"));
    }

    #[test]
    fn parse_skips_what_it_cannot_read_and_keeps_the_rest() {
        let samples = parse(
            "# HELP x y\n\nnot a sample line\nfoo{a=\"1\"} 2.5 1700000000000\nbar +Inf\n\
             baz{unterminated=\"x} 1\nqux NaN\n",
        );
        assert_eq!(samples.len(), 3, "{samples:?}");
        assert_eq!(samples[0].name, "foo");
        assert_eq!(samples[0].label("a"), Some("1"));
        assert_eq!(samples[0].value, 2.5);
        assert_eq!(samples[1].value, f64::INFINITY);
        assert!(samples[2].value.is_nan());
    }

    #[test]
    fn summary_names_associations_traffic_drops_rtt_and_expiry() {
        let snapshot = small_snapshot();
        let text = summary_at(&render(&snapshot), snapshot.now_unix);
        let expected = format!(
            "\
ntp-dtls client relay, version {}
associations: 1 established, 0 half-open (since start: 0 set up, 0 refused, 0 closed)
traffic: 12 requests forwarded, 0 replies delivered
drops: control_mode=2
handshakes failed: unknown_ca=3
upstream time1.example.net:1123: rtt 1.500 ms, smoothed 1.250 ms
certificate /etc/ntp-dtls/client.pem: expires 2027-01-15 08:00:00 UTC (in 10 days)
WARNING: certificate /etc/ntp-dtls/client.pem expires in 10 days (under 30): renew it
",
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(text, expected);
    }

    #[test]
    fn no_warning_far_from_expiry_and_a_clear_one_after() {
        let mut snapshot = small_snapshot();
        snapshot.now_unix = 1_800_000_000 - 90 * SECONDS_PER_DAY;
        let far = summary_at(&render(&snapshot), snapshot.now_unix);
        assert!(
            far.contains("(in 90 days)") && !far.contains("WARNING"),
            "{far}"
        );
        assert!(render(&snapshot).contains("_warning{cert=\"/etc/ntp-dtls/client.pem\"} 0\n"));
        let after = summary_at(&render(&snapshot), 1_800_000_000 + 5);
        assert!(after.contains("(EXPIRED)"), "{after}");
        assert!(after.contains("WARNING: certificate /etc/ntp-dtls/client.pem has expired"));
    }

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
        let snapshot = counts.snapshot();
        assert_eq!(snapshot.len(), FAILURE_REASONS.len());
        assert_eq!(snapshot[0], ("unknown_ca".to_string(), 1));
    }

    #[test]
    fn rtt_smoothing_follows_rfc_6298_weights() {
        let mut rtt = RttEstimator::default();
        assert_eq!(rtt.to_snapshot("a:1").last_seconds, None);
        rtt.observe(Duration::from_millis(8));
        assert_eq!(rtt.smoothed(), Some(0.008));
        rtt.observe(Duration::from_millis(16));
        assert_eq!(rtt.last(), Some(0.016));
        assert!((rtt.smoothed().unwrap_or_default() - 0.009).abs() < 1e-12);
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

    /// Sends `request` raw and returns the whole response.
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await.expect("read");
        String::from_utf8(response).expect("utf-8")
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_metrics_and_404_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Not Send: the point of running in a LocalSet.
        let scrapes = Rc::new(std::cell::Cell::new(0u32));
        let seen = scrapes.clone();
        let snapshot = move || {
            seen.set(seen.get() + 1);
            render(&small_snapshot())
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let local = tokio::task::LocalSet::new();
        let server = local.spawn_local(serve(listener, snapshot, async {
            let _ = stopped.await;
        }));
        local
            .run_until(async {
                let ok = exchange(addr, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
                let (head, body) = ok.split_once("\r\n\r\n").expect("head");
                assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
                assert!(
                    head.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
                    "{head}"
                );
                assert!(head.contains(&format!("Content-Length: {}", body.len())));
                assert_eq!(body, render(&small_snapshot()));

                let query = exchange(addr, b"GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
                assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");

                for request in [
                    &b"GET / HTTP/1.1\r\n\r\n"[..],
                    b"GET /metricsx HTTP/1.1\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                ] {
                    let answer = exchange(addr, request).await;
                    assert!(answer.starts_with("HTTP/1.1 404 Not Found\r\n"), "{answer}");
                }
                let bad = exchange(addr, b"hello\r\n\r\n").await;
                assert!(bad.starts_with("HTTP/1.1 400 "), "{bad}");

                let mut huge = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
                huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_LEN + 10));
                let too_big = exchange(addr, &huge).await;
                assert!(too_big.starts_with("HTTP/1.1 431 "), "{too_big}");

                let body = fetch(&addr.to_string(), Duration::from_secs(5))
                    .await
                    .expect("fetch");
                assert!(summary(&body).contains("1 established"));
                assert_eq!(scrapes.get(), 3);
            })
            .await;
        let _ = stop.send(());
        local.await;
        assert!(server.is_finished());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_silent_client_is_cut_off_by_the_timeout() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let timeout = Duration::from_millis(200);
        let local = tokio::task::LocalSet::new();
        local.spawn_local(serve_with_timeout(
            listener,
            String::new,
            std::future::pending(),
            timeout,
        ));
        local
            .run_until(async {
                let started = std::time::Instant::now();
                let mut stream = TcpStream::connect(addr).await.expect("connect");
                // Half a request line, then silence: the server must hang up on its own.
                stream.write_all(b"GET /met").await.expect("write");
                let mut buf = Vec::new();
                let read =
                    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buf))
                        .await
                        .expect("the server closed the connection");
                assert!(read.is_ok() && buf.is_empty(), "{read:?} {buf:?}");
                assert!(started.elapsed() >= timeout);
            })
            .await;
    }
}
