//! Prometheus text exposition format 0.0.4 of a [`Snapshot`]: pure, no clock, no I/O.
//!
//! Hand-written (some 200 lines) rather than `prometheus-client`: the snapshot is already the
//! registry, and the format is small. `promtool check metrics` checks the result in
//! tests/operations.rs against a live relay.
//!
//! Conventions kept: counters end in `_total`, units are in the names (`_seconds`, `_bytes`),
//! one family per thing measured with the variants as labels (drops by `reason`, tunnel states
//! by `state`), every label value of a family listed from the start so rates work from 0, and
//! label values without spaces (see [`label_value`]).

use std::fmt::Write as _;

use ntp_dtls_proto::stats::Counter;
use ntp_dtls_proto::tunnel::TunnelState;

use super::state::{Snapshot, expires_soon};

/// Every metric name of this crate starts with this; the `process_*` ones are the standard
/// unprefixed names.
pub const PREFIX: &str = "ntp_dtls_";
/// The Content-Type of the text written.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The snapshot as exposition text. Families appear in a fixed order; a family with no sample
/// (no tunnel on the server relay, say) is left out.
pub fn render(snapshot: &Snapshot) -> String {
    let mut out = Families::default();
    let role = if snapshot.role.is_empty() {
        "unknown"
    } else {
        &snapshot.role
    };
    out.family(
        "build_info",
        "gauge",
        "Always 1; the labels say which relay and version this is",
        [(
            vec![
                ("role", role.to_string()),
                ("version", snapshot.version.clone()),
            ],
            1.0,
        )],
    );
    for counter in &snapshot.counters {
        let help = Counter::ALL
            .iter()
            .find(|c| c.label() == counter.name)
            .map_or("see docs/OPERATIONS.md", |c| c.help());
        out.family(
            &format!("{}_total", counter.name),
            "counter",
            help,
            [(vec![], counter.value as f64)],
        );
    }
    out.family(
        "dropped_total",
        "counter",
        "Datagrams dropped, by reason (docs/OPERATIONS.md lists them)",
        snapshot
            .drops
            .iter()
            .map(|d| (vec![("reason", d.name.clone())], d.value as f64)),
    );
    out.family(
        "handshakes_failed_total",
        "counter",
        "DTLS handshakes refused, by reason; they sum to associations_refused_total",
        snapshot
            .handshake_failures
            .iter()
            .map(|f| (vec![("reason", f.name.clone())], f.value as f64)),
    );
    out.family(
        "associations",
        "gauge",
        "DTLS associations held now, by state",
        [
            (
                vec![("state", "established".to_string())],
                snapshot.associations.established as f64,
            ),
            (
                vec![("state", "half_open".to_string())],
                snapshot.associations.half_open as f64,
            ),
        ],
    );
    out.family(
        "tunnel_state",
        "gauge",
        "1 for the state each client tunnel is in, 0 for the others",
        snapshot.tunnels.iter().flat_map(|t| {
            TunnelState::ALL.iter().map(|state| {
                (
                    vec![
                        ("tunnel", t.tunnel.clone()),
                        ("server", t.server.clone()),
                        ("state", state.label().to_string()),
                    ],
                    if t.state == state.label() { 1.0 } else { 0.0 },
                )
            })
        }),
    );
    out.family(
        "upstream_up",
        "gauge",
        "1 while the upstream answers, 0 while it does not",
        snapshot.upstreams.iter().filter_map(|u| {
            u.up.map(|up| {
                (
                    vec![("upstream", u.upstream.clone())],
                    if up { 1.0 } else { 0.0 },
                )
            })
        }),
    );
    out.family(
        "upstream_rtt_seconds",
        "gauge",
        "Round-trip time of the last request the upstream answered; absent while it does not",
        snapshot.upstreams.iter().filter_map(|u| {
            u.rtt_seconds
                .map(|v| (vec![("upstream", u.upstream.clone())], v))
        }),
    );
    out.family(
        "upstream_rtt_smoothed_seconds",
        "gauge",
        "Smoothed round-trip time to the upstream (RFC 6298 weights)",
        snapshot.upstreams.iter().filter_map(|u| {
            u.rtt_smoothed_seconds
                .map(|v| (vec![("upstream", u.upstream.clone())], v))
        }),
    );
    out.histograms(
        "residence_seconds",
        "Time an NTP datagram spends inside the relay, by direction",
        "direction",
        snapshot,
    );
    out.family(
        "timestamps_total",
        "counter",
        "NTP timestamps the relay corrected for its own residence time or left unchanged, by reason",
        snapshot.timestamps.iter().map(|t| {
            (
                vec![
                    ("result", t.result.label().to_string()),
                    ("reason", t.reason.clone()),
                ],
                t.value as f64,
            )
        }),
    );
    out.family(
        "certificate_expiry_timestamp_seconds",
        "gauge",
        "When the certificate stops being valid (notAfter), as unix time",
        snapshot
            .certificates
            .iter()
            .map(|c| (vec![("cert", c.cert.clone())], c.not_after_unix as f64)),
    );
    out.family(
        "certificate_expiry_warning",
        "gauge",
        "1 when the certificate expires within 30 days (or has expired), else 0",
        snapshot.certificates.iter().map(|c| {
            let soon = expires_soon(c.not_after_unix, snapshot.now_unix);
            (vec![("cert", c.cert.clone())], if soon { 1.0 } else { 0.0 })
        }),
    );
    if let Some(p) = &snapshot.process {
        let mut process = |name: &str, kind: &str, help: &str, value: f64| {
            out.raw_family(name, kind, help, [(vec![], value)]);
        };
        process(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes",
            p.resident_memory_bytes as f64,
        );
        process(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes",
            p.virtual_memory_bytes as f64,
        );
        process(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds",
            p.cpu_seconds,
        );
        process(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors",
            p.open_fds as f64,
        );
        if let Some(max) = p.max_fds {
            process(
                "process_max_fds",
                "gauge",
                "Maximum number of open file descriptors",
                max as f64,
            );
        }
        process(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds",
            p.start_time_seconds,
        );
    }
    out.text
}

type Labels = Vec<(&'static str, String)>;

#[derive(Default)]
struct Families {
    text: String,
}

impl Families {
    /// A family of this crate's (prefixed) name.
    fn family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        self.raw_family(&format!("{PREFIX}{name}"), kind, help, samples);
    }

    fn raw_family(
        &mut self,
        name: &str,
        kind: &str,
        help: &str,
        samples: impl IntoIterator<Item = (Labels, f64)>,
    ) {
        let mut samples = samples.into_iter().peekable();
        if samples.peek().is_none() {
            return;
        }
        self.header(name, kind, help);
        for (labels, value) in samples {
            self.sample(name, &labels, value);
        }
    }

    fn header(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.text, "# HELP {name} {}", escape_help(help));
        let _ = writeln!(self.text, "# TYPE {name} {kind}");
    }

    fn sample(&mut self, name: &str, labels: &[(&str, String)], value: f64) {
        self.text.push_str(name);
        if !labels.is_empty() {
            self.text.push('{');
            for (i, (key, value)) in labels.iter().enumerate() {
                if i > 0 {
                    self.text.push(',');
                }
                let _ = write!(self.text, "{key}=\"{}\"", escape_label(&label_value(value)));
            }
            self.text.push('}');
        }
        let _ = writeln!(self.text, " {}", format_value(value));
    }

    fn histograms(&mut self, name: &str, help: &str, label: &'static str, snapshot: &Snapshot) {
        if snapshot.residence.is_empty() {
            return;
        }
        let name = format!("{PREFIX}{name}");
        self.header(&name, "histogram", help);
        for h in &snapshot.residence {
            let bucket = format!("{name}_bucket");
            for (bound, count) in h.buckets.iter().copied() {
                let labels = [(label, h.label.clone()), ("le", format_value(bound))];
                self.sample(&bucket, &labels, count as f64);
            }
            let labels = [(label, h.label.clone()), ("le", "+Inf".to_string())];
            self.sample(&bucket, &labels, h.count as f64);
            let labels = [(label, h.label.clone())];
            self.sample(&format!("{name}_sum"), &labels, h.sum);
            self.sample(&format!("{name}_count"), &labels, h.count as f64);
        }
    }
}

/// A label value as exposed: whitespace becomes `_` ("tunnel 1 ca" is `tunnel_1_ca`), so
/// values survive shells, PromQL regexes and logfmt-minded tools unquoted.
pub fn label_value(value: &str) -> String {
    value
        .chars()
        .map(|c| if c.is_whitespace() { '_' } else { c })
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::state::{
        Associations, CertificateExpiry, HistogramSnapshot, NamedCount, ProcessStats,
        SECONDS_PER_DAY, TimestampCount, TimestampResult, TunnelStatus, UpstreamStatus,
    };

    pub(crate) fn small_snapshot() -> Snapshot {
        Snapshot {
            role: "client".into(),
            version: "1.2.3".into(),
            counters: vec![
                NamedCount::new("requests_forwarded", 12),
                NamedCount::new("associations_refused", 3),
            ],
            drops: vec![
                NamedCount::new("control_mode", 2),
                NamedCount::new("too_short", 0),
            ],
            handshake_failures: vec![
                NamedCount::new("unknown_ca", 3),
                NamedCount::new("expired", 0),
            ],
            associations: Associations {
                established: 1,
                half_open: 0,
            },
            tunnels: vec![TunnelStatus {
                tunnel: "tunnel 1".into(),
                server: "time1.example.net:1123".into(),
                state: "up".into(),
            }],
            upstreams: vec![
                UpstreamStatus {
                    upstream: "time1.example.net:1123".into(),
                    up: None,
                    rtt_seconds: Some(0.0015),
                    rtt_smoothed_seconds: Some(0.00125),
                },
                UpstreamStatus {
                    upstream: "192.0.2.30:1123".into(),
                    up: Some(false),
                    rtt_seconds: None,
                    rtt_smoothed_seconds: None,
                },
            ],
            certificates: vec![CertificateExpiry {
                cert: "tunnel 1 ca".into(),
                not_after_unix: 1_800_000_000,
            }],
            residence: vec![HistogramSnapshot {
                label: "request".into(),
                buckets: vec![(0.00001, 1), (0.001, 4)],
                sum: 0.0021,
                count: 5,
            }],
            timestamps: vec![TimestampCount {
                result: TimestampResult::Corrected,
                reason: "residence".into(),
                value: 7,
            }],
            process: Some(ProcessStats {
                resident_memory_bytes: 5_000_000,
                virtual_memory_bytes: 9_000_000,
                cpu_seconds: 1.5,
                open_fds: 9,
                max_fds: Some(1024),
                start_time_seconds: 1_700_000_000.25,
            }),
            now_unix: 1_800_000_000 - 10 * SECONDS_PER_DAY,
        }
    }

    #[test]
    fn render_writes_the_exact_exposition_text() {
        let expected = "\
# HELP ntp_dtls_build_info Always 1; the labels say which relay and version this is
# TYPE ntp_dtls_build_info gauge
ntp_dtls_build_info{role=\"client\",version=\"1.2.3\"} 1
# HELP ntp_dtls_requests_forwarded_total NTP requests sent on towards the time server
# TYPE ntp_dtls_requests_forwarded_total counter
ntp_dtls_requests_forwarded_total 12
# HELP ntp_dtls_associations_refused_total DTLS handshakes that failed
# TYPE ntp_dtls_associations_refused_total counter
ntp_dtls_associations_refused_total 3
# HELP ntp_dtls_dropped_total Datagrams dropped, by reason (docs/OPERATIONS.md lists them)
# TYPE ntp_dtls_dropped_total counter
ntp_dtls_dropped_total{reason=\"control_mode\"} 2
ntp_dtls_dropped_total{reason=\"too_short\"} 0
# HELP ntp_dtls_handshakes_failed_total DTLS handshakes refused, by reason; they sum to associations_refused_total
# TYPE ntp_dtls_handshakes_failed_total counter
ntp_dtls_handshakes_failed_total{reason=\"unknown_ca\"} 3
ntp_dtls_handshakes_failed_total{reason=\"expired\"} 0
# HELP ntp_dtls_associations DTLS associations held now, by state
# TYPE ntp_dtls_associations gauge
ntp_dtls_associations{state=\"established\"} 1
ntp_dtls_associations{state=\"half_open\"} 0
# HELP ntp_dtls_tunnel_state 1 for the state each client tunnel is in, 0 for the others
# TYPE ntp_dtls_tunnel_state gauge
ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1.example.net:1123\",state=\"connecting\"} 0
ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1.example.net:1123\",state=\"up\"} 1
ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1.example.net:1123\",state=\"upstream_down\"} 0
ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1.example.net:1123\",state=\"backing_off\"} 0
ntp_dtls_tunnel_state{tunnel=\"tunnel_1\",server=\"time1.example.net:1123\",state=\"refused\"} 0
# HELP ntp_dtls_upstream_up 1 while the upstream answers, 0 while it does not
# TYPE ntp_dtls_upstream_up gauge
ntp_dtls_upstream_up{upstream=\"192.0.2.30:1123\"} 0
# HELP ntp_dtls_upstream_rtt_seconds Round-trip time of the last request the upstream answered; absent while it does not
# TYPE ntp_dtls_upstream_rtt_seconds gauge
ntp_dtls_upstream_rtt_seconds{upstream=\"time1.example.net:1123\"} 0.0015
# HELP ntp_dtls_upstream_rtt_smoothed_seconds Smoothed round-trip time to the upstream (RFC 6298 weights)
# TYPE ntp_dtls_upstream_rtt_smoothed_seconds gauge
ntp_dtls_upstream_rtt_smoothed_seconds{upstream=\"time1.example.net:1123\"} 0.00125
# HELP ntp_dtls_residence_seconds Time an NTP datagram spends inside the relay, by direction
# TYPE ntp_dtls_residence_seconds histogram
ntp_dtls_residence_seconds_bucket{direction=\"request\",le=\"0.00001\"} 1
ntp_dtls_residence_seconds_bucket{direction=\"request\",le=\"0.001\"} 4
ntp_dtls_residence_seconds_bucket{direction=\"request\",le=\"+Inf\"} 5
ntp_dtls_residence_seconds_sum{direction=\"request\"} 0.0021
ntp_dtls_residence_seconds_count{direction=\"request\"} 5
# HELP ntp_dtls_timestamps_total NTP timestamps the relay corrected for its own residence time or left unchanged, by reason
# TYPE ntp_dtls_timestamps_total counter
ntp_dtls_timestamps_total{result=\"corrected\",reason=\"residence\"} 7
# HELP ntp_dtls_certificate_expiry_timestamp_seconds When the certificate stops being valid (notAfter), as unix time
# TYPE ntp_dtls_certificate_expiry_timestamp_seconds gauge
ntp_dtls_certificate_expiry_timestamp_seconds{cert=\"tunnel_1_ca\"} 1800000000
# HELP ntp_dtls_certificate_expiry_warning 1 when the certificate expires within 30 days (or has expired), else 0
# TYPE ntp_dtls_certificate_expiry_warning gauge
ntp_dtls_certificate_expiry_warning{cert=\"tunnel_1_ca\"} 1
# HELP process_resident_memory_bytes Resident memory size in bytes
# TYPE process_resident_memory_bytes gauge
process_resident_memory_bytes 5000000
# HELP process_virtual_memory_bytes Virtual memory size in bytes
# TYPE process_virtual_memory_bytes gauge
process_virtual_memory_bytes 9000000
# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 1.5
# HELP process_open_fds Number of open file descriptors
# TYPE process_open_fds gauge
process_open_fds 9
# HELP process_max_fds Maximum number of open file descriptors
# TYPE process_max_fds gauge
process_max_fds 1024
# HELP process_start_time_seconds Start time of the process since unix epoch in seconds
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1700000000.25
";
        assert_eq!(render(&small_snapshot()), expected);
    }

    #[test]
    fn label_values_are_escaped_and_spaces_replaced() {
        let snapshot = Snapshot {
            certificates: vec![CertificateExpiry {
                cert: "a\"b\\c\nd e".into(),
                not_after_unix: 5,
            }],
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        // The newline is whitespace too: replaced before escaping.
        assert!(text.contains(r#"{cert="a\"b\\c_d_e"} 5"#), "{text}");
    }

    #[test]
    fn every_sample_line_belongs_to_a_declared_family() {
        let text = render(&small_snapshot());
        let mut declared: Vec<&str> = Vec::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split_whitespace().next().expect("name");
                assert!(!declared.contains(&name), "{name} declared twice");
                declared.push(name);
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().expect("name");
                let family = declared.last().expect("a family first");
                assert!(
                    name == *family
                        || [
                            format!("{family}_bucket"),
                            format!("{family}_sum"),
                            format!("{family}_count"),
                        ]
                        .iter()
                        .any(|n| n == name),
                    "{name} under {family}"
                );
            }
        }
    }
}
