//! `ntp-dtls status ADDR`: a short human summary of a relay's [`Snapshot`].

use std::fmt::Write as _;

use super::state::{EXPIRY_WARNING_DAYS, Snapshot, days_until, expires_soon, format_utc};

/// The summary `status` prints, as of `now_unix` (for the days-to-expiry lines).
pub fn summary(snapshot: &Snapshot, now_unix: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ntp-dtls {} relay, version {}",
        if snapshot.role.is_empty() {
            "?"
        } else {
            &snapshot.role
        },
        snapshot.version
    );
    let _ = writeln!(
        out,
        "associations: {} established, {} half-open (since start: {} set up, {} refused, {} closed)",
        snapshot.associations.established,
        snapshot.associations.half_open,
        snapshot.counter("associations_established"),
        snapshot.counter("associations_refused"),
        snapshot.counter("associations_closed"),
    );
    for tunnel in &snapshot.tunnels {
        let _ = writeln!(
            out,
            "{}: {} (server {})",
            tunnel.tunnel, tunnel.state, tunnel.server
        );
    }
    let _ = writeln!(
        out,
        "traffic: {} requests forwarded, {} replies delivered",
        snapshot.counter("requests_forwarded"),
        snapshot.counter("replies_delivered"),
    );
    let drops = nonzero(snapshot.drops.iter().map(|d| (d.name.as_str(), d.value)));
    let _ = writeln!(
        out,
        "drops: {}",
        if drops.is_empty() {
            "none".to_string()
        } else {
            drops
        }
    );
    let pending = nonzero(
        snapshot
            .counters
            .iter()
            .filter(|c| c.name.starts_with("pending_"))
            .map(|c| (c.name.as_str(), c.value)),
    );
    if !pending.is_empty() {
        let _ = writeln!(out, "pending table: {pending}");
    }
    let failures = nonzero(
        snapshot
            .handshake_failures
            .iter()
            .map(|f| (f.name.as_str(), f.value)),
    );
    if !failures.is_empty() {
        let _ = writeln!(out, "handshakes failed: {failures}");
    }
    for upstream in &snapshot.upstreams {
        let _ = write!(out, "upstream {}:", upstream.upstream);
        match upstream.up {
            Some(true) => out.push_str(" up"),
            Some(false) => out.push_str(" DOWN"),
            None => {}
        }
        match (upstream.rtt_seconds, upstream.rtt_smoothed_seconds) {
            (Some(last), Some(smoothed)) => {
                let _ = write!(
                    out,
                    "{} rtt {}, smoothed {}",
                    if upstream.up.is_some() { "," } else { "" },
                    format_ms(last),
                    format_ms(smoothed)
                );
            }
            _ => {
                let _ = write!(
                    out,
                    "{} no round trip measured",
                    if upstream.up.is_some() { "," } else { "" }
                );
            }
        }
        out.push('\n');
    }
    for cert in &snapshot.certificates {
        let not_after = cert.not_after_unix;
        let days = days_until(not_after, now_unix);
        let _ = writeln!(
            out,
            "certificate {}: expires {} ({})",
            cert.cert,
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
                "WARNING: certificate {} {}: renew it",
                cert.cert,
                if not_after <= now_unix {
                    "has expired".to_string()
                } else {
                    format!("expires in {days} days (under {EXPIRY_WARNING_DAYS})")
                }
            );
        }
    }
    if let Some(p) = &snapshot.process {
        let _ = writeln!(
            out,
            "process: {:.1} MiB resident, {:.2} s CPU, {} open files{}",
            p.resident_memory_bytes as f64 / (1024.0 * 1024.0),
            p.cpu_seconds,
            p.open_fds,
            p.max_fds
                .map(|m| format!(" (limit {m})"))
                .unwrap_or_default()
        );
    }
    out
}

/// `a=1 b=2` for the values that are not zero.
fn nonzero<'a>(values: impl Iterator<Item = (&'a str, u64)>) -> String {
    values
        .filter(|(_, v)| *v > 0)
        .map(|(name, v)| format!("{name}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn format_ms(seconds: f64) -> String {
    format!("{:.3} ms", seconds * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::metrics::state::{
        Associations, CertificateExpiry, NamedCount, SECONDS_PER_DAY, TunnelStatus, UpstreamStatus,
    };

    fn snapshot() -> Snapshot {
        Snapshot {
            role: "client".into(),
            version: "1.2.3".into(),
            counters: vec![
                NamedCount::new("requests_forwarded", 12),
                NamedCount::new("associations_refused", 3),
                NamedCount::new("pending_expired", 1),
            ],
            drops: vec![
                NamedCount::new("control_mode", 2),
                NamedCount::new("too_short", 0),
            ],
            handshake_failures: vec![NamedCount::new("unknown_ca", 3)],
            associations: Associations {
                established: 1,
                half_open: 0,
            },
            tunnels: vec![
                TunnelStatus {
                    tunnel: "tunnel 1".into(),
                    server: "time1.example.net:1123".into(),
                    state: "up".into(),
                },
                TunnelStatus {
                    tunnel: "tunnel 2".into(),
                    server: "time2.example.net:1123".into(),
                    state: "backing_off".into(),
                },
            ],
            upstreams: vec![
                UpstreamStatus {
                    upstream: "time1.example.net:1123".into(),
                    up: None,
                    rtt_seconds: Some(0.0015),
                    rtt_smoothed_seconds: Some(0.00125),
                },
                UpstreamStatus {
                    upstream: "time2.example.net:1123".into(),
                    up: Some(false),
                    rtt_seconds: None,
                    rtt_smoothed_seconds: None,
                },
            ],
            certificates: vec![CertificateExpiry {
                cert: "/etc/ntp-dtls/client.pem".into(),
                not_after_unix: 1_800_000_000,
            }],
            now_unix: 0,
            ..Snapshot::default()
        }
    }

    #[test]
    fn the_summary_names_tunnels_traffic_drops_rtt_and_expiry() {
        let text = summary(&snapshot(), 1_800_000_000 - 10 * SECONDS_PER_DAY);
        let expected = "\
ntp-dtls client relay, version 1.2.3
associations: 1 established, 0 half-open (since start: 0 set up, 3 refused, 0 closed)
tunnel 1: up (server time1.example.net:1123)
tunnel 2: backing_off (server time2.example.net:1123)
traffic: 12 requests forwarded, 0 replies delivered
drops: control_mode=2
pending table: pending_expired=1
handshakes failed: unknown_ca=3
upstream time1.example.net:1123: rtt 1.500 ms, smoothed 1.250 ms
upstream time2.example.net:1123: DOWN, no round trip measured
certificate /etc/ntp-dtls/client.pem: expires 2027-01-15 08:00:00 UTC (in 10 days)
WARNING: certificate /etc/ntp-dtls/client.pem expires in 10 days (under 30): renew it
";
        assert_eq!(text, expected);
    }

    #[test]
    fn no_warning_far_from_expiry_and_a_clear_one_after() {
        let far = summary(&snapshot(), 1_800_000_000 - 90 * SECONDS_PER_DAY);
        assert!(
            far.contains("(in 90 days)") && !far.contains("WARNING"),
            "{far}"
        );
        let after = summary(&snapshot(), 1_800_000_000 + 5);
        assert!(after.contains("(EXPIRED)"), "{after}");
        assert!(after.contains("WARNING: certificate /etc/ntp-dtls/client.pem has expired"));
    }
}
