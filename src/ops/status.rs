//! `ntp-dtls status ADDR`: reads a relay's `/status.json` and prints a short summary.

use std::time::Duration;

use anyhow::Context;

use crate::ops::metrics::http::{FetchError, fetch};
use crate::ops::metrics::{Snapshot, summary::summary, unix_now};

/// How long `status` waits for the relay.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// The summary of the relay whose metrics endpoint is `addr`, or an error that says what to
/// check.
pub async fn run(addr: &str) -> anyhow::Result<String> {
    let body = fetch(addr, "/status.json", TIMEOUT)
        .await
        .map_err(|e| hint(addr, e))?;
    let snapshot: Snapshot = serde_json::from_str(&body).with_context(|| {
        format!("{addr}/status.json: not the status of an ntp-dtls relay of this version")
    })?;
    Ok(summary(&snapshot, unix_now()))
}

fn hint(addr: &str, error: FetchError) -> anyhow::Error {
    let hint = match &error {
        FetchError::Refused { .. } => format!(
            "nothing listens there: is the relay running, with --metrics {addr} (or \
             `metrics = \"{addr}\"` in its config file)? Without it a relay serves no status"
        ),
        FetchError::Status { .. } => {
            "is this the --metrics address of an ntp-dtls relay of this version?".to_string()
        }
        FetchError::TimedOut { .. } => {
            "the address answers TCP but not HTTP, or a firewall drops the packets".to_string()
        }
        FetchError::Io { .. } | FetchError::Malformed { .. } => {
            format!("is {addr} the --metrics address of an ntp-dtls relay?")
        }
    };
    anyhow::anyhow!("cannot read the relay's status: {error} ({hint})")
}
