//! What both daemons share: logging, the shutdown and reload signals, what they tell systemd
//! (READY=1, STATUS=, RELOADING=1, STOPPING=1), the metrics endpoint, and dropping root.
//!
//! Log levels, by meaning (the relays' shells follow the same table): refusals, failed
//! handshakes, tunnels down, upstream down, reload failures, a reload that needs a restart and
//! files the service user cannot read are WARN; set-up, tear-down, recoveries, readiness and
//! successful reloads are INFO; per-datagram detail is DEBUG.

use std::io::IsTerminal;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::cli::LogFormat;
use crate::config::{ConfigError, DaemonSettings, ReloadPlan};
use crate::ops::observe::Observatory;
use tracing_subscriber::EnvFilter;

/// At most one STATUS= update per this long: the status line is for people.
pub const STATUS_INTERVAL: Duration = Duration::from_secs(1);

/// Logs go to stderr, one line per event. RUST_LOG, if set, overrides `level`. In JSON, every
/// event is one object with stable field names: `timestamp`, `level`, `target`, and under
/// `fields` the `message` (e.g. "association established") and the event's own fields (`peer`,
/// `reason`, `subject`, ...).
pub fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => {
            let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
            builder.with_ansi(ansi).try_init()
        }
    };
}

/// The one line a failed command prints on stderr: `ntp-dtls: error: ...` in text, and with
/// `--log-format json` a JSON object shaped like the log lines (`timestamp`, `level`,
/// `target`, `fields.message`, `fields.error`), so a log collector parses start-up errors too.
pub fn error_line(format: LogFormat, error: &anyhow::Error) -> String {
    let text = format!("{error:#}");
    match format {
        LogFormat::Text => format!("ntp-dtls: error: {text}"),
        LogFormat::Json => serde_json::json!({
            "timestamp": rfc3339_now(),
            "level": "ERROR",
            "target": "ntp_dtls",
            "fields": { "message": "ntp-dtls: error", "error": text },
        })
        .to_string(),
    }
}

/// "2026-01-05T10:00:00.123456Z", as the JSON log lines write it.
fn rfc3339_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
    let date = crate::ops::metrics::format_utc(seconds);
    // "YYYY-MM-DD HH:MM:SS UTC" -> "YYYY-MM-DDTHH:MM:SS.uuuuuuZ"
    let (day, rest) = date.split_once(' ').unwrap_or((&date, ""));
    let time = rest.trim_end_matches(" UTC");
    format!("{day}T{time}.{:06}Z", now.subsec_micros())
}

/// A shutdown signal every task can wait on, fired by SIGINT or SIGTERM.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// Fired by SIGHUP: reload certificates, keys and CA files.
pub struct Reload {
    receiver: watch::Receiver<u64>,
    /// The last reload systemd has been told is finished.
    finished: u64,
}

/// Fires a [`Shutdown`] made by [`Shutdown::manual`]: what a test (or an embedding program)
/// uses instead of a signal.
pub struct ShutdownTrigger(watch::Sender<bool>);

impl ShutdownTrigger {
    pub fn fire(&self) {
        let _ = self.0.send(true);
    }
}

impl Shutdown {
    /// A shutdown fired by the returned trigger rather than by a signal.
    pub fn manual() -> (ShutdownTrigger, Self) {
        let (sender, receiver) = watch::channel(false);
        (ShutdownTrigger(sender), Shutdown { receiver })
    }

    /// Installs the signal handlers. Must run inside the runtime.
    ///
    /// SIGHUP tells systemd `RELOADING=1` (with `MONOTONIC_USEC=`, as systemd 253 and later
    /// want) before the reload runs, and the reload handler's next [`Reload::next`] tells it
    /// `READY=1`. SIGTERM and SIGINT tell it `STOPPING=1`.
    pub fn on_signals() -> std::io::Result<(Self, Reload)> {
        use tokio::signal::unix::{SignalKind, signal};
        let (sender, receiver) = watch::channel(false);
        let (reload_sender, reload_receiver) = watch::channel(0u64);
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut hangup = signal(SignalKind::hangup())?;
        tokio::spawn(async move {
            let name = loop {
                tokio::select! {
                    _ = terminate.recv() => break "SIGTERM",
                    _ = interrupt.recv() => break "SIGINT",
                    _ = hangup.recv() => {
                        notify(&reloading_message());
                        reload_sender.send_modify(|generation| *generation += 1);
                    }
                }
            };
            notify("STOPPING=1\n");
            info!(signal = name, "shutting down");
            let _ = sender.send(true);
        });
        Ok((
            Shutdown { receiver },
            Reload {
                receiver: reload_receiver,
                finished: 0,
            },
        ))
    }

    /// Resolves once shutdown has been asked for. (A relay loop, which selects per datagram,
    /// hears it through a [`crate::ops::control::Control`] instead: cheaper to poll.)
    pub async fn wait(&mut self) {
        let _ = self.receiver.wait_for(|stop| *stop).await;
    }
}

/// Fires a [`Reload`] made by [`Reload::manual`].
pub struct ReloadTrigger(watch::Sender<u64>);

impl ReloadTrigger {
    pub fn fire(&self) {
        self.0.send_modify(|generation| *generation += 1);
    }
}

impl Reload {
    /// A reload fired by the returned trigger rather than by SIGHUP.
    pub fn manual() -> (ReloadTrigger, Self) {
        let (sender, receiver) = watch::channel(0u64);
        (
            ReloadTrigger(sender),
            Reload {
                receiver,
                finished: 0,
            },
        )
    }

    /// Resolves at the next SIGHUP (never, once the signal task is gone). Called again after
    /// handling one, it first tells systemd that reload is finished (`READY=1`).
    pub async fn next(&mut self) {
        self.finished();
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Tells systemd the reload being handled is finished (`READY=1`); once per SIGHUP,
    /// however often it is called. [`Reload::next`] calls it.
    pub fn finished(&mut self) {
        let generation = *self.receiver.borrow();
        if generation > self.finished {
            self.finished = generation;
            notify("READY=1\n");
        }
    }
}

/// `RELOADING=1` with the CLOCK_MONOTONIC time systemd 253 and later match it against.
fn reloading_message() -> String {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => {
            let micros = now.tv_sec() as u128 * 1_000_000 + now.tv_nsec() as u128 / 1000;
            format!("RELOADING=1\nMONOTONIC_USEC={micros}\n")
        }
        Err(_) => "RELOADING=1\n".to_string(),
    }
}

/// Serves metrics (if asked to), keeps systemd's status line current (if systemd listens),
/// warns about files the service user will not be able to read at the next SIGHUP, and then
/// gives up root (if asked to): after the caller has bound its sockets and read its files.
/// Must run inside a LocalSet.
pub async fn start_services(
    settings: &DaemonSettings,
    obs: &Arc<Observatory>,
    shutdown: &Shutdown,
) -> anyhow::Result<Option<std::net::SocketAddr>> {
    use anyhow::Context;
    let mut metrics_addr = None;
    if let Some(addr) = settings.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot serve metrics on {addr}"))?;
        metrics_addr = listener.local_addr().ok();
        let obs = obs.clone();
        let mut shutdown = shutdown.clone();
        tokio::task::spawn_local(crate::ops::metrics::http::serve(
            listener,
            move |path| pages(&obs, path),
            async move { shutdown.wait().await },
        ));
    }
    if std::env::var_os("NOTIFY_SOCKET").is_some() {
        tokio::task::spawn_local(report_status(obs.clone(), shutdown.clone()));
    }
    if let Some(user) = &settings.user {
        warn_unreadable(user, &settings.files);
        crate::ops::privileges::drop_to(user)
            .with_context(|| format!("cannot switch to user {user}"))?;
        info!(%user, "privileges dropped");
    }
    Ok(metrics_addr)
}

/// What the metrics endpoint serves.
fn pages(obs: &Observatory, path: &str) -> Option<crate::ops::metrics::http::Page> {
    use crate::ops::metrics::http::Page;
    match path {
        "/metrics" => Some(Page {
            content_type: crate::ops::metrics::CONTENT_TYPE,
            body: obs.render(),
        }),
        "/status.json" => Some(Page {
            content_type: "application/json",
            body: obs.status_json(),
        }),
        _ => None,
    }
}

/// One WARN line per file `user` cannot read; the files are read again at every SIGHUP.
pub fn warn_unreadable(user: &str, files: &[(String, std::path::PathBuf)]) {
    let Ok(account) = crate::ops::privileges::lookup(user) else {
        // drop_to reports the unknown user.
        return;
    };
    for (key, path) in files {
        if let Err(problem) = crate::ops::privileges::readable_by(&account, path) {
            warn!(key = %key, file = %path.display(), user = %user, fix = %format!(
                "chgrp {} {} && chmod {} {}",
                problem.user_group, problem.blocked, problem.fix_mode, problem.blocked
            ), "the service user cannot read this file: the next reload will fail");
        }
    }
}

/// The one line a reload writes, at the level its outcome deserves: `result=ok` (INFO) when
/// everything changed was applied, `result=restart_required` (WARN) naming each changed key
/// that needs a restart, `result=failed` (WARN) when the new configuration did not load (the
/// one in service stays).
pub fn log_reload(outcome: &Result<ReloadPlan, ConfigError>) {
    match outcome {
        Ok(plan) if !plan.needs_restart() => {
            info!(result = %"ok", applied = %plan.applied.join(","), "config reload")
        }
        Ok(plan) => warn!(
            result = %"restart_required",
            applied = %plan.applied.join(","),
            restart_required = %plan.restart_required.join(","),
            "config reload; restart required to apply the rest"
        ),
        Err(e) => warn!(result = %"failed", error = %e,
            "config reload; the material in service stays"),
    }
}

/// The status READY=1 carried; the server's ("listening on ... with N workers") stays in
/// front of the status line's updates.
static READY_STATUS: Mutex<Option<String>> = Mutex::new(None);

/// Tells systemd (Type=notify) that we are ready, if it is listening. Tests and people read the
/// `ready` log line the caller emits alongside.
pub fn notify_ready(status: &str) {
    if let Ok(mut ready) = READY_STATUS.lock() {
        *ready = Some(status.to_string());
    }
    notify(&format!("READY=1\nSTATUS={status}\n"));
}

/// Keeps STATUS= current: composed from the observatory whenever it reports a change, at most
/// once per [`STATUS_INTERVAL`], and only when the text differs from the last one sent.
async fn report_status(obs: Arc<Observatory>, mut shutdown: Shutdown) {
    let mut last_text = String::new();
    let mut last_sent: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = obs.changed() => {}
        }
        if let Some(at) = last_sent {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep_until(at + STATUS_INTERVAL) => {}
            }
        }
        let ready = READY_STATUS.lock().ok().and_then(|r| r.clone());
        let Some(ready) = ready else {
            // Not ready yet: READY=1 carries the first status.
            continue;
        };
        let line = obs.status_line();
        let text = if obs.role() == "server" {
            format!("{ready}; {line}")
        } else {
            line
        };
        if text != last_text {
            notify(&format!("STATUS={text}\n"));
            last_text = text;
            last_sent = Some(tokio::time::Instant::now());
        }
    }
}

/// Sends one sd_notify message, if systemd listens (NOTIFY_SOCKET).
///
/// NOTIFY_SOCKET is a filesystem path, or an abstract socket name written with a leading '@'
/// (what systemd uses in containers and some service managers use everywhere).
pub fn notify(message: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let result = UnixDatagram::unbound().and_then(|socket| {
        let address = match path.as_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(message.as_bytes(), &address)
    });
    if let Err(e) = result {
        let what = message.lines().next().unwrap_or_default();
        warn!(error = %e, socket = ?path, message = %what, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_lines_are_text_or_json() {
        let error = anyhow::anyhow!("/etc/x.pem: No such file").context("certificate");
        assert_eq!(
            error_line(LogFormat::Text, &error),
            "ntp-dtls: error: certificate: /etc/x.pem: No such file"
        );
        let json: serde_json::Value =
            serde_json::from_str(&error_line(LogFormat::Json, &error)).expect("json");
        assert_eq!(json["level"], "ERROR");
        assert_eq!(
            json["fields"]["error"],
            "certificate: /etc/x.pem: No such file"
        );
        let stamp = json["timestamp"].as_str().expect("timestamp");
        assert!(
            stamp.len() == 27 && stamp.ends_with('Z') && stamp.as_bytes()[10] == b'T',
            "{stamp}"
        );
    }

    #[test]
    fn reloading_carries_the_monotonic_clock() {
        let message = reloading_message();
        let micros: u64 = message
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .and_then(|m| m.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("{message:?}"));
        assert!(micros > 0);
    }
}
