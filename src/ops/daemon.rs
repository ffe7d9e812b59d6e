//! What both daemons share: logging, the shutdown signal, and telling a supervisor we are ready.

use std::io::IsTerminal;

use tokio::sync::watch;

use crate::cli::LogFormat;
use tracing_subscriber::EnvFilter;

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

/// A shutdown signal every task can wait on, fired by SIGINT or SIGTERM.
#[derive(Clone)]
pub struct Shutdown {
    receiver: watch::Receiver<bool>,
}

/// Fired by SIGHUP: reload certificates, keys and CA files.
pub struct Reload {
    receiver: watch::Receiver<u64>,
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
                        reload_sender.send_modify(|generation| *generation += 1);
                    }
                }
            };
            tracing::info!(signal = name, "shutting down");
            let _ = sender.send(true);
        });
        Ok((
            Shutdown { receiver },
            Reload {
                receiver: reload_receiver,
            },
        ))
    }

    /// Resolves once shutdown has been asked for.
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
        (ReloadTrigger(sender), Reload { receiver })
    }

    /// Resolves at the next SIGHUP (never, once the signal task is gone).
    pub async fn next(&mut self) {
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Serves metrics (if asked to) and then gives up root (if asked to): both after the caller
/// has bound its sockets and read its files. Must run inside a LocalSet.
pub async fn start_services(
    settings: &crate::config::DaemonSettings,
    obs: &std::sync::Arc<crate::ops::observe::Observatory>,
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
        tokio::task::spawn_local(crate::ops::metrics::serve(
            listener,
            move || obs.render(),
            async move { shutdown.wait().await },
        ));
    }
    if let Some(user) = &settings.user {
        crate::ops::privileges::drop_to(user)
            .with_context(|| format!("cannot switch to user {user}"))?;
        tracing::info!(%user, "privileges dropped");
    }
    Ok(metrics_addr)
}

/// Tells systemd (Type=notify) that we are ready, if it is listening. Tests and people read the
/// `ready` log line the caller emits alongside.
///
/// NOTIFY_SOCKET is a filesystem path, or an abstract socket name written with a leading '@'
/// (what systemd uses in containers and some service managers use everywhere).
pub fn notify_ready(status: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};

    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("READY=1\nSTATUS={status}\n");
    let result = UnixDatagram::unbound().and_then(|socket| {
        let address = match path.as_bytes().strip_prefix(b"@") {
            Some(name) => SocketAddr::from_abstract_name(name)?,
            None => SocketAddr::from_pathname(&path)?,
        };
        socket.send_to_addr(message.as_bytes(), &address)
    });
    if let Err(e) = result {
        tracing::warn!(error = %e, socket = ?path, "could not notify systemd of readiness");
    }
}
