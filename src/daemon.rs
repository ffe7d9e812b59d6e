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

impl Shutdown {
    /// Installs the signal handlers. Must run inside the runtime.
    pub fn on_signals() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        let (sender, receiver) = watch::channel(false);
        let mut terminate = signal(SignalKind::terminate())?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        tokio::spawn(async move {
            let name = tokio::select! {
                _ = terminate.recv() => "SIGTERM",
                _ = interrupt.recv() => "SIGINT",
            };
            tracing::info!(signal = name, "shutting down");
            let _ = sender.send(true);
        });
        Ok(Shutdown { receiver })
    }

    /// Resolves once shutdown has been asked for.
    pub async fn wait(&mut self) {
        let _ = self.receiver.wait_for(|stop| *stop).await;
    }
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
