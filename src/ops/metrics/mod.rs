//! Metrics, in three parts tested on their own:
//!
//! - [`state`]: the domain as plain data: a [`state::Snapshot`] of counters, gauges, states
//!   and histograms (serde, for `/status.json`), and the lock-free pieces the datagram path
//!   writes. The live, shared side is [`crate::ops::observe::Observatory`].
//! - [`exposition`]: a snapshot as Prometheus text, format 0.0.4. Pure.
//! - [`http`]: the endpoint (`GET /metrics`, `GET /status.json`) and its client.
//!
//! plus [`process`] (the `process_*` figures from /proc/self) and [`summary`] (what
//! `ntp-dtls status` prints from `/status.json`).
//!
//! Metric names (stable; dashboards and alerts use them; docs/OPERATIONS.md explains them):
//!
//! | name | type | labels |
//! | --- | --- | --- |
//! | `ntp_dtls_build_info` | gauge (1) | `role`, `version` |
//! | `ntp_dtls_<counter>_total` | counter | one per non-drop `Counter`, e.g. `ntp_dtls_requests_forwarded_total` |
//! | `ntp_dtls_dropped_total` | counter | `reason`: every `drop_*` `Counter` without its prefix |
//! | `ntp_dtls_handshakes_failed_total` | counter | `reason` ([`state::FAILURE_REASONS`]) |
//! | `ntp_dtls_associations_refused_total` | counter | none: the sum of the one above |
//! | `ntp_dtls_associations` | gauge | `state` = `established` or `half_open` |
//! | `ntp_dtls_tunnel_state` | gauge (0/1) | `tunnel`, `server`, `state` (every `TunnelState` label) |
//! | `ntp_dtls_upstream_up` | gauge (0/1) | `upstream` |
//! | `ntp_dtls_upstream_rtt_seconds`, `_smoothed_seconds` | gauge | `upstream` |
//! | `ntp_dtls_residence_seconds` | histogram | `direction` = `request` or `reply` |
//! | `ntp_dtls_timestamps_total` | counter | `result` = `corrected` or `unchanged`, `reason` |
//! | `ntp_dtls_certificate_expiry_timestamp_seconds` | gauge | `cert` |
//! | `ntp_dtls_certificate_expiry_warning` | gauge (0/1) | `cert` |
//! | `process_resident_memory_bytes`, `process_virtual_memory_bytes`, `process_cpu_seconds_total`, `process_open_fds`, `process_max_fds`, `process_start_time_seconds` | | none |

pub mod exposition;
pub mod http;
pub mod process;
pub mod state;
pub mod summary;

pub use exposition::{CONTENT_TYPE, PREFIX, render};
pub use state::{
    CertificateExpiry, EXPIRY_WARNING_DAYS, FAILURE_REASONS, FailureCounts, Snapshot, days_until,
    expires_soon, format_utc, not_after_unix, unix_now,
};
