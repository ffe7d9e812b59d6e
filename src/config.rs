//! Configuration: TOML files and flags merged into validated settings.
//!
//! Everything that can be wrong with a configuration is found here, at start-up, with the file
//! and field named: a daemon that starts is a daemon whose certificates load, whose key matches
//! its certificate and whose addresses resolve.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::{ClientArgs, ServerArgs};
use crate::pki;
use ntp_dtls_proto::admission::Limits;
use ntp_dtls_proto::engine::{ClientSettings, Identity, ServerSettings};
use ntp_dtls_proto::health::HealthPolicy;
use ntp_dtls_proto::verify::RevocationMode;
use rustls_pki_types::CertificateDer;

pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:123";
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:1123";
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:123";
pub const DEFAULT_STRATUM: u8 = 2;
/// The server relay's port when `--server` or `server =` names none.
pub const DEFAULT_SERVER_PORT: u16 = 1123;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    // Causes are part of the message, not `source`s: anyhow's `{:#}` would print them twice.
    #[error("{path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {cause}")]
    Pki {
        context: String,
        cause: pki::PkiError,
    },
    #[error("{context}: {message}")]
    Engine { context: String, message: String },
}

/// One client tunnel: a local listener bound to one upstream server relay.
#[derive(Clone)]
pub struct Tunnel {
    /// "tunnel N" or the listen address, for logs.
    pub name: String,
    pub listen: SocketAddr,
    /// HOST:PORT as written: resolved by the tunnel each time it makes an association, so one
    /// name that does not resolve (yet) stops no other tunnel.
    pub server_spec: String,
    /// The server relay's address when `server_spec` is an address literal.
    pub server: Option<SocketAddr>,
    pub settings: ClientSettings,
    /// Dead-association detection, rekey and keepalive.
    pub policy: HealthPolicy,
    /// Where `settings` came from (re-read at every SIGHUP).
    pub files: TunnelFiles,
    /// The revocation mode in force and the CRLs loaded (also in `settings.verification`).
    pub revocation: Revocation,
}

/// Revocation as configured: the mode in force and the CRLs read (pki-verify).
#[derive(Debug, Clone, Default)]
pub struct Revocation {
    pub mode: RevocationMode,
    pub crls: Vec<pki::crl::LoadedCrl>,
}

/// The CRL files and the mode asked for (flags or file), before loading.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RevocationSpec {
    pub crls: Vec<PathBuf>,
    pub mode: Option<RevocationMode>,
}

impl RevocationSpec {
    fn from_file(crl: Option<&Vec<PathBuf>>, mode: Option<&str>) -> Result<Self, ConfigError> {
        let mode = match mode {
            Some(text) => Some(RevocationMode::parse(text).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "revocation = {text:?}: must be \"require\", \"if-available\" or \"off\""
                ))
            })?),
            None => None,
        };
        Ok(RevocationSpec {
            crls: crl.cloned().unwrap_or_default(),
            mode,
        })
    }

    fn from_args(args: &crate::cli::RevocationArgs) -> Self {
        RevocationSpec {
            crls: args.crls.clone(),
            mode: args.revocation.map(RevocationMode::from),
        }
    }

    /// Reads the CRLs (checking those of `roots` against them) and settles the mode.
    pub fn load(&self, roots: &[CertificateDer<'static>]) -> Result<Revocation, ConfigError> {
        let crls = pki::crl::load_crls(&self.crls, roots)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        let mode = pki::crl::resolve_mode(self.mode, &crls)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        Ok(Revocation { mode, crls })
    }
}

/// The files a tunnel's certificate material is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// `--crl` / `crl`: re-read at every SIGHUP.
    pub crls: Vec<PathBuf>,
}

pub struct ClientConfig {
    pub tunnels: Vec<Tunnel>,
    pub daemon: DaemonSettings,
    /// Correct NTP replies' timestamps for the residence in this relay (docs/TIMESTAMPS.md).
    pub timestamp_correction: bool,
    /// The flags it was built from: a reload reads the same file with the same flags.
    pub args: ClientArgs,
}

/// A client configuration read tunnel by tunnel, each tunnel's problem kept apart from the
/// others': what `client --check` reports. [`ClientConfig::from_args`] stops at the first.
pub struct ClientCandidate {
    /// Each `[[tunnel]]` (or the one tunnel of the flags), in order, with its name for
    /// messages ("tunnel 2", or the listen address).
    pub tunnels: Vec<(String, Result<Tunnel, ConfigError>)>,
    pub daemon: DaemonSettings,
    /// The association upkeep every tunnel shares.
    pub policy: HealthPolicy,
    /// Correct NTP replies' timestamps for the residence in this relay.
    pub timestamp_correction: bool,
    pub args: ClientArgs,
}

/// What both daemons take besides their own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// Whom to become once the sockets are bound.
    pub user: Option<String>,
    /// Every file the daemon reads again at SIGHUP (the config file, certificates, keys, CA
    /// files), labelled by its key: after `user` takes over, that user must be able to read
    /// them.
    pub files: Vec<(String, PathBuf)>,
    /// How long a relay loop reads its sockets without sleeping after each receive
    /// (`busy_poll_us`, see [`crate::relay::timer::BusyPoll`]).
    pub busy_poll: Duration,
}

/// The server relay's `busy_poll_us` when neither the flag nor the file sets it. Its time
/// server answers a forwarded request within tens of microseconds, and under load the next
/// request follows sooner still: polling 200 us meets both awake. Measured on the 2-vCPU
/// development VM (docs/BENCHMARKS.md, "Busy polling"): replies/s at 16 clients +25%, and
/// chronyd's basic offset p90 through the chain 23-30 us -> 9-20 us; the price is CPU while
/// traffic flows (the relay never sleeps under sustained load). `busy_poll_us = 0` on a host
/// whose CPU is better spent elsewhere.
pub const DEFAULT_SERVER_BUSY_POLL_US: u64 = 200;
/// The client relay's: off. Its replies come back over the network, later than a window
/// worth polling, and on a device its CPU is the device's NTP client's too.
pub const DEFAULT_CLIENT_BUSY_POLL_US: u64 = 0;
/// Its bound: polling is for the gap between a request and its reply, not a way to spin.
pub const MAX_BUSY_POLL_US: u64 = 10_000;

impl DaemonSettings {
    fn resolve(
        args: &crate::cli::DaemonArgs,
        metrics: Option<&str>,
        user: Option<&str>,
        busy_poll_us: Option<u64>,
        default_busy_poll_us: u64,
    ) -> Result<Self, ConfigError> {
        let metrics = match args.metrics.as_deref().or(metrics) {
            Some(spec) => Some(resolve(spec, "metrics")?),
            None => None,
        };
        let busy_poll_us = args
            .busy_poll_us
            .or(busy_poll_us)
            .unwrap_or(default_busy_poll_us);
        if busy_poll_us > MAX_BUSY_POLL_US {
            return Err(ConfigError::Invalid(format!(
                "busy_poll_us: {busy_poll_us} is more than {MAX_BUSY_POLL_US} (10 ms)"
            )));
        }
        Ok(DaemonSettings {
            metrics,
            user: args.user.clone().or(user.map(str::to_owned)),
            files: Vec::new(),
            busy_poll: Duration::from_micros(busy_poll_us),
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Upstream {
    Udp(SocketAddr),
    /// Answer from this host's clock, with this stratum.
    Builtin {
        stratum: u8,
    },
}

pub struct ServerConfig {
    pub listen: SocketAddr,
    pub upstream: Upstream,
    pub settings: ServerSettings,
    /// Where the material came from, for reloads.
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client_ca_path: Option<PathBuf>,
    /// Client certificates' revocation (with `client_ca`): the files, the mode, the CRLs read.
    pub crl_paths: Vec<PathBuf>,
    pub revocation: Revocation,
    pub limits: Limits,
    /// Sockets (and threads) sharing the listen address.
    pub workers: usize,
    /// Correct forwarded NTP replies' timestamps for the residence in this relay.
    pub timestamp_correction: bool,
    pub daemon: DaemonSettings,
    /// The flags it was built from: a reload reads the same file with the same flags.
    pub args: ServerArgs,
}

impl ServerConfig {
    /// What a worker thread needs of the configuration.
    pub fn clone_for_worker(&self) -> ServerConfig {
        ServerConfig {
            listen: self.listen,
            upstream: self.upstream,
            settings: self.settings.clone(),
            cert_path: self.cert_path.clone(),
            key_path: self.key_path.clone(),
            client_ca_path: self.client_ca_path.clone(),
            crl_paths: self.crl_paths.clone(),
            revocation: self.revocation.clone(),
            limits: self.limits.clone(),
            workers: self.workers,
            timestamp_correction: self.timestamp_correction,
            daemon: self.daemon.clone(),
            args: self.args.clone(),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ClientFile {
    metrics: Option<String>,
    user: Option<String>,
    /// Defaults for every tunnel.
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    /// CRL files and the revocation mode, for every tunnel.
    crl: Option<Vec<PathBuf>>,
    revocation: Option<String>,
    /// Association upkeep, for every tunnel.
    rekey_after_records: Option<u64>,
    rekey_after_secs: Option<f64>,
    keepalive_secs: Option<f64>,
    dead_after_unanswered: Option<u32>,
    dead_after_secs: Option<f64>,
    /// Residence-time correction of NTP replies (default on).
    timestamp_correction: Option<bool>,
    busy_poll_us: Option<u64>,
    #[serde(default)]
    tunnel: Vec<TunnelFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TunnelFile {
    listen: String,
    server: String,
    server_name: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ServerFile {
    metrics: Option<String>,
    user: Option<String>,
    listen: Option<String>,
    upstream: Option<String>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    /// CRL files and the revocation mode, for client certificates.
    crl: Option<Vec<PathBuf>>,
    revocation: Option<String>,
    stratum: Option<u8>,
    workers: Option<usize>,
    /// Residence-time correction of forwarded NTP replies (default on).
    timestamp_correction: Option<bool>,
    busy_poll_us: Option<u64>,
    #[serde(default)]
    limits: LimitsFile,
}

/// `[limits]` of the server's file; absent keys keep the defaults of [`Limits`].
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    max_associations: Option<usize>,
    max_half_open: Option<usize>,
    handshake_timeout_secs: Option<f64>,
    handshake_rate: Option<f64>,
    handshake_burst: Option<f64>,
    max_handshake_bytes: Option<usize>,
    idle_timeout_secs: Option<f64>,
}

fn seconds(value: f64, key: &str) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            ConfigError::Invalid(format!(
                "{key} = {value}: must be a positive number of seconds"
            ))
        })
}

impl ClientFile {
    fn policy(&self) -> Result<HealthPolicy, ConfigError> {
        let mut policy = HealthPolicy::default();
        let at_least_one =
            |key: &str| ConfigError::Invalid(format!("{key} = 0: must be at least 1"));
        if let Some(v) = self.rekey_after_records {
            if v == 0 {
                return Err(at_least_one("rekey_after_records"));
            }
            policy.rekey_after_records = v;
        }
        if let Some(v) = self.dead_after_unanswered {
            if v == 0 {
                return Err(at_least_one("dead_after_unanswered"));
            }
            policy.dead_after_unanswered = v;
        }
        if let Some(v) = self.rekey_after_secs {
            policy.rekey_after = seconds(v, "rekey_after_secs")?;
        }
        if let Some(v) = self.keepalive_secs {
            policy.keepalive_after = seconds(v, "keepalive_secs")?;
        }
        if let Some(v) = self.dead_after_secs {
            policy.dead_after = seconds(v, "dead_after_secs")?;
        }
        Ok(policy)
    }
}

impl LimitsFile {
    fn resolve(&self) -> Result<Limits, ConfigError> {
        let mut limits = Limits::default();
        let positive = |value: usize, key: &str| {
            if value == 0 {
                Err(ConfigError::Invalid(format!(
                    "[limits] {key} = 0: must be at least 1"
                )))
            } else {
                Ok(value)
            }
        };
        if let Some(v) = self.max_associations {
            limits.max_associations = positive(v, "max_associations")?;
        }
        if let Some(v) = self.max_half_open {
            limits.max_half_open = positive(v, "max_half_open")?;
        }
        if let Some(v) = self.max_handshake_bytes {
            limits.max_handshake_bytes = positive(v, "max_handshake_bytes")?;
        }
        if let Some(v) = self.handshake_timeout_secs {
            limits.handshake_timeout = seconds(v, "[limits] handshake_timeout_secs")?;
        }
        if let Some(v) = self.idle_timeout_secs {
            limits.idle_timeout = seconds(v, "[limits] idle_timeout_secs")?;
        }
        for (value, key) in [
            (self.handshake_rate, "handshake_rate"),
            (self.handshake_burst, "handshake_burst"),
        ] {
            if let Some(v) = value {
                if !(v.is_finite() && v > 0.0) {
                    return Err(ConfigError::Invalid(format!(
                        "[limits] {key} = {v}: must be positive"
                    )));
                }
            }
        }
        limits.handshake_rate = self.handshake_rate.unwrap_or(limits.handshake_rate);
        limits.handshake_burst = self
            .handshake_burst
            .unwrap_or(limits.handshake_burst)
            .max(1.0);
        Ok(limits)
    }
}

fn read_toml<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|cause| ConfigError::Read {
        path: path.to_owned(),
        cause,
    })?;
    parse_toml(path, &text)
}

/// One line: "FILE: line L, column C: what is wrong" (toml's own rendering spans lines).
fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (place, source_line) = match e.span() {
            Some(span) => {
                let start = span.start.min(text.len());
                let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
                let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
                let line = text[..start].matches('\n').count() + 1;
                let column = start - line_start + 1;
                (
                    format!("line {line}, column {column}: "),
                    // The line itself names the field when the message does not.
                    format!(" (in `{}`)", text[line_start..line_end].trim()),
                )
            }
            None => (String::new(), String::new()),
        };
        // A key in the wrong table (appended after `[limits]`, say) reads as an unknown field
        // of that table: say which table the line is in.
        let table = match e.span() {
            Some(span) if e.message().contains("unknown field") => {
                enclosing_table(text, span.start.min(text.len()))
            }
            _ => String::new(),
        };
        ConfigError::Parse {
            path: path.to_owned(),
            // toml's own message may span lines: the error must stay one line.
            message: format!(
                "{place}{}{source_line}{table}",
                e.message()
                    .trim_end()
                    .lines()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    })
}

/// "; the line is in the [limits] table, which starts at line 12 (top-level keys go above the
/// first table)", or nothing for a top-level line.
fn enclosing_table(text: &str, offset: usize) -> String {
    let mut header = None;
    let mut tunnels = 0;
    for (number, line) in text[..offset].lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.split("]]").next()) {
            let name = name.trim();
            tunnels += usize::from(name == "tunnel");
            let which = if name == "tunnel" {
                format!("[[tunnel]] entry {tunnels}")
            } else {
                format!("[[{name}]] entry")
            };
            header = Some((which, number + 1));
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.split(']').next()) {
            header = Some((format!("[{}] table", name.trim()), number + 1));
        }
    }
    match header {
        Some((which, line)) => format!(
            "; the line is in the {which}, which starts at line {line} \
             (top-level keys go above the first table)"
        ),
        None => String::new(),
    }
}

/// Parses the text of a client config file and runs every check that needs no file, socket or
/// name lookup: the TOML itself, at least one `[[tunnel]]`, and the association upkeep keys.
/// Exists for fuzzing and config linting; the daemon goes through [`ClientConfig::from_args`].
pub fn check_client_toml(text: &str) -> Result<(), String> {
    let file: ClientFile =
        parse_toml(Path::new("client config"), text).map_err(|e| e.to_string())?;
    if file.tunnel.is_empty() {
        return Err("no [[tunnel]] entry".into());
    }
    file.policy().map_err(|e| e.to_string())?;
    Ok(())
}

/// Parses the text of a server config file and runs every check that needs no file, socket or
/// name lookup: the TOML itself, the stratum and the `[limits]` table.
/// Exists for fuzzing and config linting; the daemon goes through [`ServerConfig::from_args`].
pub fn check_server_toml(text: &str) -> Result<(), String> {
    let file: ServerFile =
        parse_toml(Path::new("server config"), text).map_err(|e| e.to_string())?;
    let stratum = file.stratum.unwrap_or(DEFAULT_STRATUM);
    if !(1..=15).contains(&stratum) {
        return Err(format!("stratum {stratum}: must be 1 to 15"));
    }
    file.limits.resolve().map_err(|e| e.to_string())?;
    Ok(())
}

/// Resolves HOST:PORT (names at start-up, once), preferring the first address returned.
pub fn resolve(spec: &str, what: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(addr);
    }
    let mut addrs = spec.to_socket_addrs().map_err(|e| {
        ConfigError::Invalid(format!(
            "{what} {spec:?}: not an address or resolvable HOST:PORT ({e})"
        ))
    })?;
    addrs
        .next()
        .ok_or_else(|| ConfigError::Invalid(format!("{what} {spec:?}: resolves to no address")))
}

/// Checks a server relay's HOST:PORT without resolving it: the address when it is a literal,
/// None for a name (looked up when the tunnel connects).
pub fn server_address(spec: &str, what: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        return Ok(Some(addr));
    }
    let invalid = |why: &str| ConfigError::Invalid(format!("{what} {spec:?}: {why}"));
    let (host, port) = spec
        .rsplit_once(':')
        .ok_or_else(|| invalid("expected HOST:PORT"))?;
    port.parse::<u16>()
        .map_err(|_| invalid("the port is not a number from 0 to 65535"))?;
    if host.is_empty() || host.contains(['[', ']', ' ', '/']) {
        return Err(invalid("not an address or a host name"));
    }
    Ok(None)
}

/// HOST:PORT with `port` added when `spec` names only a host or an address:
/// `127.0.0.1` is `127.0.0.1:1123`, `::1` and `[::1]` are `[::1]:1123`, `time.example.net` is
/// `time.example.net:1123`. Anything else is returned as it is, for [`server_address`] to judge.
pub fn with_default_port(spec: &str, port: u16) -> String {
    if spec.parse::<SocketAddr>().is_ok() {
        return spec.to_string();
    }
    match spec.parse::<std::net::IpAddr>() {
        Ok(ip) => return SocketAddr::new(ip, port).to_string(),
        Err(_) if spec.starts_with('[') && spec.ends_with(']') => {
            return format!("{spec}:{port}");
        }
        Err(_) => {}
    }
    if !spec.is_empty() && !spec.contains(':') {
        return format!("{spec}:{port}");
    }
    spec.to_string()
}

/// The host part of HOST:PORT, without IPv6 brackets: the default reference identifier.
pub fn host_of(spec: &str) -> String {
    let host = match spec.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => spec,
    };
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

fn pki_context<T>(
    result: Result<T, pki::PkiError>,
    context: impl Into<String>,
) -> Result<T, ConfigError> {
    result.map_err(|cause| ConfigError::Pki {
        context: context.into(),
        cause,
    })
}

/// Loads a certificate chain and its key, and checks they belong together.
pub fn load_identity(cert: &Path, key: &Path) -> Result<Identity, ConfigError> {
    let chain = pki_context(pki::load_certificates(cert), "certificate")?;
    let key_material = pki_context(pki::load_private_key(key), "private key")?;
    let Some(leaf) = chain.first() else {
        return Err(ConfigError::Invalid(format!(
            "{}: no certificate in file",
            cert.display()
        )));
    };
    if !pki_context(pki::public_key_matches(leaf, &key_material), "private key")? {
        return Err(ConfigError::Invalid(pki::files::chain_mismatch(
            &chain,
            &key_material,
            cert,
            key,
        )));
    }
    if let Some(warning) = pki::files::key_permission_warning(key) {
        tracing::warn!("{warning}");
    }
    Ok(Identity {
        chain,
        key: key_material,
    })
}

fn optional_identity(
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<Identity>, ConfigError> {
    match (cert, key) {
        (Some(cert), Some(key)) => Ok(Some(load_identity(cert, key)?)),
        (None, None) => Ok(None),
        (Some(_), None) => Err(ConfigError::Invalid("cert is set but key is not".into())),
        (None, Some(_)) => Err(ConfigError::Invalid("key is set but cert is not".into())),
    }
}

/// Builds the settings of one client tunnel, checking everything a handshake will need; no
/// revocation check ([`client_settings_with`] has one).
pub fn client_settings(
    server_spec: &str,
    server_name: Option<&str>,
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientSettings, ConfigError> {
    client_settings_with(
        server_spec,
        server_name,
        ca,
        cert,
        key,
        &RevocationSpec::default(),
    )
    .map(|(settings, _)| settings)
}

/// [`client_settings`] with CRLs and a revocation mode; also returns what was loaded.
pub fn client_settings_with(
    server_spec: &str,
    server_name: Option<&str>,
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
    revocation: &RevocationSpec,
) -> Result<(ClientSettings, Revocation), ConfigError> {
    let roots = pki_context(pki::load_ca_roots(ca), "CA file")?;
    let loaded = revocation.load(&roots)?;
    pki::crl::warn_expired(&loaded.crls, loaded.mode, server_spec);
    let settings = ClientSettings {
        roots,
        server_name: server_name
            .map(str::to_owned)
            .unwrap_or_else(|| host_of(server_spec)),
        identity: optional_identity(cert, key)?,
        verification: pki::crl::verification(loaded.mode, &loaded.crls),
    };
    // Build an engine once so that every policy error surfaces now.
    ntp_dtls_proto::engine::Engine::client(&settings).map_err(|e| ConfigError::Engine {
        context: format!("tunnel to {server_spec}"),
        message: e.to_string(),
    })?;
    Ok((settings, loaded))
}

impl ClientConfig {
    /// The configuration the daemon runs: every tunnel must load.
    pub fn from_args(args: &ClientArgs) -> Result<Self, ConfigError> {
        let candidate = ClientCandidate::from_args(args)?;
        let mut tunnels = Vec::with_capacity(candidate.tunnels.len());
        for (_, tunnel) in candidate.tunnels {
            tunnels.push(tunnel?);
        }
        let mut daemon = candidate.daemon;
        if let Some(path) = &args.config {
            daemon.files.push(("config".into(), path.clone()));
        }
        for tunnel in &tunnels {
            let mut push = |key: &str, path: &Path| {
                if !daemon.files.iter().any(|(_, p)| p == path) {
                    daemon
                        .files
                        .push((format!("{} {key}", tunnel.name), path.to_owned()));
                }
            };
            push("ca", &tunnel.files.ca);
            for (key, path) in [("cert", &tunnel.files.cert), ("key", &tunnel.files.key)] {
                if let Some(path) = path {
                    push(key, path);
                }
            }
            for path in &tunnel.files.crls {
                push("crl", path);
            }
        }
        Ok(ClientConfig {
            tunnels,
            daemon,
            timestamp_correction: candidate.timestamp_correction,
            args: args.clone(),
        })
    }

    /// Reads the configuration again (SIGHUP) with the same flags, and says what of the
    /// difference a running relay can apply.
    pub fn reload(&self) -> Result<(ClientConfig, ReloadPlan), ConfigError> {
        let new = ClientConfig::from_args(&self.args)?;
        let plan = reload_plan(self, &new);
        Ok((new, plan))
    }
}

impl ClientCandidate {
    /// Reads the flags and the file; an error here (the file, the upkeep keys, `metrics`)
    /// concerns every tunnel, one tunnel's problem is kept in its entry.
    pub fn from_args(args: &ClientArgs) -> Result<Self, ConfigError> {
        let Some(path) = &args.config else {
            return Self::from_flags(args);
        };
        let file: ClientFile = read_toml(path)?;
        let daemon = DaemonSettings::resolve(
            &args.daemon,
            file.metrics.as_deref(),
            file.user.as_deref(),
            file.busy_poll_us,
            DEFAULT_CLIENT_BUSY_POLL_US,
        )?;
        if file.tunnel.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{}: no [[tunnel]] entry",
                path.display()
            )));
        }
        let policy = file
            .policy()
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        let mut tunnels: Vec<(String, Result<Tunnel, ConfigError>)> =
            Vec::with_capacity(file.tunnel.len());
        for (index, entry) in file.tunnel.iter().enumerate() {
            let name = format!("tunnel {}", index + 1);
            let context = format!("{}: {name}", path.display());
            let tunnel = tunnel_from_file(&file, entry, &name, &policy)
                .map_err(|e| ConfigError::Invalid(format!("{context}: {e}")))
                .and_then(|tunnel| {
                    let earlier = tunnels
                        .iter()
                        .filter_map(|(_, t)| t.as_ref().ok())
                        .any(|t| t.listen == tunnel.listen);
                    if tunnel.listen.port() != 0 && earlier {
                        return Err(ConfigError::Invalid(format!(
                            "{context}: listen address {} is used by an earlier tunnel",
                            tunnel.listen
                        )));
                    }
                    Ok(tunnel)
                });
            tunnels.push((name, tunnel));
        }
        Ok(ClientCandidate {
            tunnels,
            daemon,
            policy,
            timestamp_correction: !args.no_timestamp_correction
                && file.timestamp_correction.unwrap_or(true),
            args: args.clone(),
        })
    }

    fn from_flags(args: &ClientArgs) -> Result<Self, ConfigError> {
        let server = args
            .server
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid("--server is required".into()))?;
        let ca = args
            .ca
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid("--ca is required".into()))?;
        let listen_spec = args.listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN);
        let daemon =
            DaemonSettings::resolve(&args.daemon, None, None, None, DEFAULT_CLIENT_BUSY_POLL_US)?;
        let server_spec = with_default_port(server, DEFAULT_SERVER_PORT);
        let spec = RevocationSpec::from_args(&args.revocation);
        let tunnel = (|| {
            let listen = resolve(listen_spec, "--listen")?;
            let server = server_address(&server_spec, "--server")?;
            let (settings, revocation) = client_settings_with(
                &server_spec,
                args.server_name.as_deref(),
                ca,
                args.cert.as_deref(),
                args.key.as_deref(),
                &spec,
            )?;
            Ok(Tunnel {
                name: listen_spec.to_string(),
                listen,
                server,
                settings,
                server_spec,
                policy: HealthPolicy::default(),
                files: TunnelFiles {
                    ca: ca.to_owned(),
                    cert: args.cert.clone(),
                    key: args.key.clone(),
                    crls: spec.crls.clone(),
                },
                revocation,
            })
        })();
        Ok(ClientCandidate {
            tunnels: vec![(listen_spec.to_string(), tunnel)],
            daemon,
            policy: HealthPolicy::default(),
            timestamp_correction: !args.no_timestamp_correction,
            args: args.clone(),
        })
    }
}

/// One `[[tunnel]]` of a client file, with the file's defaults.
fn tunnel_from_file(
    file: &ClientFile,
    entry: &TunnelFile,
    name: &str,
    policy: &HealthPolicy,
) -> Result<Tunnel, ConfigError> {
    let ca =
        entry.ca.as_deref().or(file.ca.as_deref()).ok_or_else(|| {
            ConfigError::Invalid("missing field `ca` (or a top-level `ca`)".into())
        })?;
    let cert = entry.cert.as_deref().or(file.cert.as_deref());
    let key = entry.key.as_deref().or(file.key.as_deref());
    let server_spec = with_default_port(&entry.server, DEFAULT_SERVER_PORT);
    let spec = RevocationSpec::from_file(file.crl.as_ref(), file.revocation.as_deref())?;
    let (settings, revocation) = client_settings_with(
        &server_spec,
        entry.server_name.as_deref(),
        ca,
        cert,
        key,
        &spec,
    )?;
    Ok(Tunnel {
        name: name.to_string(),
        listen: resolve(&entry.listen, "listen")?,
        server: server_address(&server_spec, "server")?,
        server_spec,
        settings,
        policy: policy.clone(),
        files: TunnelFiles {
            ca: ca.to_owned(),
            cert: cert.map(Path::to_owned),
            key: key.map(Path::to_owned),
            crls: spec.crls,
        },
        revocation,
    })
}

impl ServerConfig {
    pub fn from_args(args: &ServerArgs) -> Result<Self, ConfigError> {
        let file: ServerFile = match &args.config {
            Some(path) => read_toml(path)?,
            None => ServerFile::default(),
        };
        let daemon = DaemonSettings::resolve(
            &args.daemon,
            file.metrics.as_deref(),
            file.user.as_deref(),
            file.busy_poll_us,
            DEFAULT_SERVER_BUSY_POLL_US,
        )?;
        let listen_spec = args
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| DEFAULT_SERVER_LISTEN.to_string());
        let upstream_spec = args
            .upstream
            .clone()
            .or(file.upstream)
            .unwrap_or_else(|| DEFAULT_UPSTREAM.to_string());
        let stratum = args.stratum.or(file.stratum).unwrap_or(DEFAULT_STRATUM);
        if !(1..=15).contains(&stratum) {
            return Err(ConfigError::Invalid(format!(
                "stratum {stratum}: must be 1 to 15"
            )));
        }
        let upstream = if upstream_spec == "builtin" {
            Upstream::Builtin { stratum }
        } else {
            Upstream::Udp(resolve(&upstream_spec, "upstream")?)
        };
        let cert_path = args.cert.clone().or(file.cert).ok_or_else(|| {
            ConfigError::Invalid(
                "the server needs a certificate: --cert FILE (or `cert` in the config file)".into(),
            )
        })?;
        let key_path = args.key.clone().or(file.key).ok_or_else(|| {
            ConfigError::Invalid(
                "the server needs a private key: --key FILE (or `key` in the config file)".into(),
            )
        })?;
        let client_ca_path = args.client_ca.clone().or(file.client_ca);
        let mut spec = RevocationSpec::from_file(file.crl.as_ref(), file.revocation.as_deref())?;
        let flags = RevocationSpec::from_args(&args.revocation);
        if !flags.crls.is_empty() {
            spec.crls = flags.crls;
        }
        spec.mode = flags.mode.or(spec.mode);
        if client_ca_path.is_none() && !spec.crls.is_empty() {
            return Err(ConfigError::Invalid(
                "crl is set but client_ca is not: the server relay checks revocation of client \
                 certificates only, under mutual authentication (--client-ca)"
                    .into(),
            ));
        }
        let (settings, revocation) =
            Self::load_settings_with(&cert_path, &key_path, client_ca_path.as_deref(), &spec)?;
        let limits = file.limits.resolve()?;
        let workers = args
            .workers
            .or(file.workers)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if workers == 0 || workers > 256 {
            return Err(ConfigError::Invalid(format!(
                "workers = {workers}: must be 1 to 256"
            )));
        }
        let timestamp_correction =
            !args.no_timestamp_correction && file.timestamp_correction.unwrap_or(true);
        let mut daemon = daemon;
        if let Some(path) = &args.config {
            daemon.files.push(("config".into(), path.clone()));
        }
        daemon.files.push(("cert".into(), cert_path.clone()));
        daemon.files.push(("key".into(), key_path.clone()));
        if let Some(path) = &client_ca_path {
            daemon.files.push(("client_ca".into(), path.clone()));
        }
        for path in &spec.crls {
            daemon.files.push(("crl".into(), path.clone()));
        }
        Ok(ServerConfig {
            crl_paths: spec.crls.clone(),
            revocation,
            args: args.clone(),
            daemon,
            limits,
            workers,
            timestamp_correction,
            listen: resolve(&listen_spec, "listen")?,
            upstream,
            settings,
            cert_path,
            key_path,
            client_ca_path,
        })
    }

    /// Loads (or reloads) the server's certificate material and checks the engine accepts it;
    /// no revocation check ([`ServerConfig::load_settings_with`] has one).
    pub fn load_settings(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerSettings, ConfigError> {
        Self::load_settings_with(cert, key, client_ca, &RevocationSpec::default())
            .map(|(settings, _)| settings)
    }

    /// [`ServerConfig::load_settings`] with CRLs for client certificates and a mode.
    pub fn load_settings_with(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
        revocation: &RevocationSpec,
    ) -> Result<(ServerSettings, Revocation), ConfigError> {
        let identity = load_identity(cert, key)?;
        let client_roots = match client_ca {
            Some(path) => Some(pki_context(pki::load_ca_roots(path), "client CA file")?),
            None => None,
        };
        let loaded = revocation.load(client_roots.as_deref().unwrap_or_default())?;
        pki::crl::warn_expired(&loaded.crls, loaded.mode, "client certificates");
        let settings = ServerSettings {
            identity,
            client_roots,
            verification: pki::crl::verification(loaded.mode, &loaded.crls),
        };
        ntp_dtls_proto::engine::Engine::server(&settings).map_err(|e| ConfigError::Engine {
            context: "server certificate".into(),
            message: e.to_string(),
        })?;
        Ok((settings, loaded))
    }
}

impl ServerConfig {
    /// Reads the configuration again (SIGHUP) with the same flags, and says what of the
    /// difference a running relay can apply.
    pub fn reload(&self) -> Result<(ServerConfig, ReloadPlan), ConfigError> {
        let new = ServerConfig::from_args(&self.args)?;
        let plan = reload_plan(self, &new);
        Ok((new, plan))
    }
}

/// What a reload (SIGHUP) does with a configuration read again: what it puts into service,
/// and every changed key it cannot apply without a restart.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Keys whose new values (and files) a running relay takes: certificates, keys, CA files
    /// (read again even when their paths did not change), and the reference identifier.
    pub applied: Vec<String>,
    /// Keys that changed but need a restart, as the file spells them (`listen`,
    /// `limits.max_half_open`, `tunnel[2].server`, `tunnel[3]` for a tunnel added or removed).
    pub restart_required: Vec<String>,
}

impl ReloadPlan {
    pub fn needs_restart(&self) -> bool {
        !self.restart_required.is_empty()
    }

    fn apply(&mut self, key: &str) {
        if !self.applied.iter().any(|k| k == key) {
            self.applied.push(key.to_string());
        }
    }

    fn restart_if(&mut self, changed: bool, key: impl Into<String>) {
        if changed {
            self.restart_required.push(key.into());
        }
    }
}

/// A configuration a running relay can reload.
pub trait Reloadable {
    fn reload_plan(&self, new: &Self) -> ReloadPlan;
}

/// What reloading from `old` to `new` applies and what needs a restart.
pub fn reload_plan<C: Reloadable>(old: &C, new: &C) -> ReloadPlan {
    old.reload_plan(new)
}

fn daemon_plan(plan: &mut ReloadPlan, old: &DaemonSettings, new: &DaemonSettings) {
    plan.restart_if(old.metrics != new.metrics, "metrics");
    plan.restart_if(old.user != new.user, "user");
    plan.restart_if(old.busy_poll != new.busy_poll, "busy_poll_us");
}

impl Reloadable for ClientConfig {
    fn reload_plan(&self, new: &ClientConfig) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        daemon_plan(&mut plan, &self.daemon, &new.daemon);
        if self.timestamp_correction != new.timestamp_correction {
            plan.apply("timestamp_correction");
        }
        if let (Some(old), Some(new)) = (self.tunnels.first(), new.tunnels.first()) {
            let (a, b) = (&old.policy, &new.policy);
            plan.restart_if(
                a.dead_after_unanswered != b.dead_after_unanswered,
                "dead_after_unanswered",
            );
            plan.restart_if(a.dead_after != b.dead_after, "dead_after_secs");
            plan.restart_if(
                a.rekey_after_records != b.rekey_after_records,
                "rekey_after_records",
            );
            plan.restart_if(a.rekey_after != b.rekey_after, "rekey_after_secs");
            plan.restart_if(a.keepalive_after != b.keepalive_after, "keepalive_secs");
        }
        for (index, (old, new)) in self.tunnels.iter().zip(&new.tunnels).enumerate() {
            let key = |k: &str| format!("tunnel[{}].{k}", index + 1);
            plan.restart_if(old.listen != new.listen, key("listen"));
            plan.restart_if(old.server_spec != new.server_spec, key("server"));
            // Certificate material and the name to expect go into every new handshake.
            plan.apply("ca");
            if new.files.cert.is_some() || old.files.cert.is_some() {
                plan.apply("cert");
                plan.apply("key");
            }
            if old.settings.server_name != new.settings.server_name {
                plan.apply("server_name");
            }
            if !old.files.crls.is_empty() || !new.files.crls.is_empty() {
                plan.apply("crl");
            }
            if old.revocation.mode != new.revocation.mode {
                plan.apply("revocation");
            }
        }
        let (shorter, longer) = if self.tunnels.len() < new.tunnels.len() {
            (self.tunnels.len(), new.tunnels.len())
        } else {
            (new.tunnels.len(), self.tunnels.len())
        };
        for index in shorter..longer {
            plan.restart_required.push(format!("tunnel[{}]", index + 1));
        }
        plan
    }
}

impl Reloadable for ServerConfig {
    fn reload_plan(&self, new: &ServerConfig) -> ReloadPlan {
        let mut plan = ReloadPlan::default();
        daemon_plan(&mut plan, &self.daemon, &new.daemon);
        plan.restart_if(self.listen != new.listen, "listen");
        match (self.upstream, new.upstream) {
            (Upstream::Builtin { stratum: a }, Upstream::Builtin { stratum: b }) => {
                plan.restart_if(a != b, "stratum")
            }
            (a, b) => plan.restart_if(a != b, "upstream"),
        }
        plan.restart_if(self.workers != new.workers, "workers");
        if self.timestamp_correction != new.timestamp_correction {
            plan.apply("timestamp_correction");
        }
        let (a, b) = (&self.limits, &new.limits);
        for (changed, key) in [
            (a.max_associations != b.max_associations, "max_associations"),
            (a.max_half_open != b.max_half_open, "max_half_open"),
            (
                a.handshake_timeout != b.handshake_timeout,
                "handshake_timeout_secs",
            ),
            (a.handshake_rate != b.handshake_rate, "handshake_rate"),
            (a.handshake_burst != b.handshake_burst, "handshake_burst"),
            (
                a.max_handshake_bytes != b.max_handshake_bytes,
                "max_handshake_bytes",
            ),
            (a.idle_timeout != b.idle_timeout, "idle_timeout_secs"),
        ] {
            plan.restart_if(changed, format!("limits.{key}"));
        }
        plan.apply("cert");
        plan.apply("key");
        if self.client_ca_path.is_some() || new.client_ca_path.is_some() {
            plan.apply("client_ca");
        }
        if !self.crl_paths.is_empty() || !new.crl_paths.is_empty() {
            plan.apply("crl");
        }
        if self.revocation.mode != new.revocation.mode {
            plan.apply("revocation");
        }
        plan
    }
}

/// The keys of both config files, read off the structs that parse them, so that docs, example
/// files and man pages can be checked against the parser: (table, key), table "" being the top
/// level, "tunnel" the client's `[[tunnel]]` entries and "limits" the server's `[limits]`.
pub struct ConfigKeys {
    pub client: Vec<(&'static str, &'static str)>,
    pub server: Vec<(&'static str, &'static str)>,
}

pub fn config_keys() -> ConfigKeys {
    let mut client: Vec<_> = introspect::fields::<ClientFile>()
        .iter()
        .map(|k| ("", *k))
        .collect();
    client.extend(
        introspect::fields::<TunnelFile>()
            .iter()
            .map(|k| ("tunnel", *k)),
    );
    let mut server: Vec<_> = introspect::fields::<ServerFile>()
        .iter()
        .map(|k| ("", *k))
        .collect();
    server.extend(
        introspect::fields::<LimitsFile>()
            .iter()
            .map(|k| ("limits", *k)),
    );
    // The tables themselves are keys of their parent, not settings.
    client.retain(|(table, key)| !(table.is_empty() && *key == "tunnel"));
    server.retain(|(table, key)| !(table.is_empty() && *key == "limits"));
    ConfigKeys { client, server }
}

/// A serde Deserializer that only records the field names a struct asks for.
mod introspect {
    use serde::de::{self, Deserialize, Visitor};

    pub fn fields<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
        let mut fields: &'static [&'static str] = &[];
        let _ = T::deserialize(Recorder {
            fields: &mut fields,
        });
        fields
    }

    struct Recorder<'a> {
        fields: &'a mut &'static [&'static str],
    }

    #[derive(Debug)]
    struct Stop;

    impl std::fmt::Display for Stop {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("field names recorded")
        }
    }

    impl std::error::Error for Stop {}

    impl de::Error for Stop {
        fn custom<T: std::fmt::Display>(_: T) -> Self {
            Stop
        }
    }

    impl<'de> de::Deserializer<'de> for Recorder<'_> {
        type Error = Stop;

        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
            Err(Stop)
        }

        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Stop> {
            *self.fields = fields;
            Err(Stop)
        }

        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("time.example.net:1123"), "time.example.net");
        assert_eq!(host_of("127.0.0.1:1123"), "127.0.0.1");
        assert_eq!(host_of("[::1]:1123"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }

    #[test]
    fn unknown_fields_name_the_line_and_field() {
        let err = parse_toml::<ClientFile>(
            Path::new("client.toml"),
            "ca = \"ca.pem\"\n[[tunnel]]\nlisten = \"127.0.0.1:123\"\nsevrer = \"x:1\"\n",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("client.toml"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("sevrer"), "{err}");
    }

    #[test]
    fn wrong_types_name_the_field() {
        let err = parse_toml::<ServerFile>(Path::new("server.toml"), "stratum = \"two\"\n")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("line 1") && err.contains("stratum"), "{err}");
    }

    #[test]
    fn limits_default_and_override() {
        let file: ServerFile = parse_toml(
            Path::new("s.toml"),
            "[limits]\nmax_half_open = 10\nidle_timeout_secs = 2048\n",
        )
        .unwrap_or_default();
        let limits = file.limits.resolve().unwrap_or_default();
        assert_eq!(limits.max_half_open, 10);
        assert_eq!(limits.idle_timeout, Duration::from_secs(2048));
        assert_eq!(limits.max_associations, Limits::default().max_associations);
        let file: ServerFile = parse_toml(
            Path::new("s.toml"),
            "[limits]\nhandshake_timeout_secs = 0\n",
        )
        .unwrap_or_default();
        assert!(file.limits.resolve().is_err());
    }

    #[test]
    fn a_tunnel_list_parses() {
        let file: ClientFile = parse_toml(
            Path::new("c.toml"),
            "ca = \"ca.pem\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:123\"\nserver = \"a:1\"\n\
             [[tunnel]]\nlisten = \"127.0.0.2:123\"\nserver = \"b:1\"\nserver_name = \"b.example\"\n\
             [[tunnel]]\nlisten = \"[::1]:123\"\nserver = \"[::1]:1\"\n",
        )
        .unwrap_or_default();
        assert_eq!(file.tunnel.len(), 3);
        assert_eq!(file.tunnel[1].server_name.as_deref(), Some("b.example"));
    }

    #[test]
    fn text_checks_find_what_needs_no_file() {
        let client = "ca = \"ca.pem\"\n[[tunnel]]\nlisten = \"127.0.0.1:123\"\nserver = \"a:1\"\n";
        assert_eq!(check_client_toml(client), Ok(()));
        let none = check_client_toml("ca = \"ca.pem\"\n").unwrap_err();
        assert!(none.contains("[[tunnel]]"), "{none}");
        let zero = check_client_toml(&format!("rekey_after_records = 0\n{client}")).unwrap_err();
        assert!(zero.contains("rekey_after_records"), "{zero}");
        let typed = check_client_toml("[[tunnel]]\nlisten = 1\n").unwrap_err();
        assert!(typed.contains("line 2"), "{typed}");

        assert_eq!(check_server_toml(""), Ok(()));
        let builtin = "upstream = \"builtin\"\nstratum = 1\n[limits]\nmax_half_open = 5\n";
        assert_eq!(check_server_toml(builtin), Ok(()));
        let stratum = check_server_toml("stratum = 16\n").unwrap_err();
        assert!(stratum.contains("stratum"), "{stratum}");
        assert!(check_server_toml("[limits]\nhandshake_rate = nan\n").is_err());
        assert!(check_server_toml("[limits]\nidle_timeout_secs = inf\n").is_err());
    }

    #[test]
    fn server_addresses_are_checked_but_names_not_resolved() {
        assert_eq!(
            server_address("127.0.0.1:1123", "server").ok(),
            Some(Some("127.0.0.1:1123".parse().expect("addr")))
        );
        assert!(matches!(
            server_address("no-such-host.invalid:1123", "server"),
            Ok(None)
        ));
        for bad in ["time.example", "time.example:http", ":1123", "[::1:1123"] {
            let err = server_address(bad, "server")
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(err.contains(bad), "{bad}: {err}");
        }
    }

    #[test]
    fn a_server_without_a_port_gets_1123() {
        assert_eq!(with_default_port("127.0.0.1", 1123), "127.0.0.1:1123");
        assert_eq!(with_default_port("127.0.0.1:99", 1123), "127.0.0.1:99");
        assert_eq!(with_default_port("::1", 1123), "[::1]:1123");
        assert_eq!(with_default_port("[::1]", 1123), "[::1]:1123");
        assert_eq!(with_default_port("[::1]:5", 1123), "[::1]:5");
        assert_eq!(
            with_default_port("time.example.net", 1123),
            "time.example.net:1123"
        );
        // Left for server_address to refuse, with the spec as written.
        assert_eq!(
            with_default_port("time.example:ntp", 1123),
            "time.example:ntp"
        );
        assert_eq!(with_default_port("", 1123), "");
    }

    #[test]
    fn a_key_after_a_table_header_is_said_to_be_in_that_table() {
        let err = check_server_toml(
            "listen = \"0.0.0.0:1123\"\n[limits]\nmax_half_open = 10\nworkers = 2\n",
        )
        .unwrap_err();
        assert!(
            err.contains("line 4")
                && err.contains("workers")
                && err.contains("in the [limits] table, which starts at line 2")
                && err.contains("top-level keys go above the first table"),
            "{err}"
        );
        let client = "ca = \"ca.pem\"\n[[tunnel]]\nlisten = \"127.0.0.1:123\"\nserver = \"a:1\"\n\
                      [[tunnel]]\nlisten = \"127.0.0.2:123\"\nserver = \"b:1\"\nkeepalive_secs = 60\n";
        let err = check_client_toml(client).unwrap_err();
        assert!(
            err.contains("keepalive_secs")
                && err.contains("[[tunnel]] entry 2, which starts at line 5"),
            "{err}"
        );
        // A misspelt top-level key is just that.
        let err = check_server_toml("listne = \"x\"\n").unwrap_err();
        assert!(!err.contains("table"), "{err}");
    }

    #[test]
    fn the_key_lists_come_from_the_structs() {
        let keys = config_keys();
        for key in ["metrics", "user", "ca", "keepalive_secs", "dead_after_secs"] {
            assert!(keys.client.contains(&("", key)), "client {key}");
        }
        for key in ["listen", "server", "server_name", "ca", "cert", "key"] {
            assert!(keys.client.contains(&("tunnel", key)), "tunnel {key}");
        }
        for key in ["metrics", "user", "workers", "stratum", "client_ca"] {
            assert!(keys.server.contains(&("", key)), "server {key}");
        }
        assert!(keys.server.contains(&("limits", "idle_timeout_secs")));
        assert!(!keys.server.contains(&("", "limits")));
        assert!(!keys.client.contains(&("", "tunnel")));
        assert_eq!(keys.client.len(), 20, "{:?}", keys.client);
        assert_eq!(keys.server.len(), 20, "{:?}", keys.server);
    }

    /// A lab PKI and config files in a temporary directory, parsed as main() would.
    struct Lab {
        dir: PathBuf,
    }

    impl Lab {
        fn new() -> Lab {
            static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "ntp-dtls-config-{}-{}",
                std::process::id(),
                COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            pki::generate_lab_pki(&pki::LabPkiRequest {
                out_dir: dir.clone(),
                server_names: vec!["localhost".into()],
                client_names: vec![],
                days: 30,
                force: false,
                key_type: pki::KeyType::EcdsaP256,
            })
            .expect("lab pki");
            Lab { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }

        fn write(&self, name: &str, text: &str) -> String {
            let text = text.replace("DIR", &self.dir.display().to_string());
            std::fs::write(self.dir.join(name), text).expect("write");
            self.path(name)
        }

        fn server(&self, text: &str) -> ServerConfig {
            let path = self.write("server.toml", text);
            match crate::cli::Cli::try_parse_from(["ntp-dtls", "server", "--config", &path])
                .expect("args")
                .command
            {
                crate::cli::Command::Server(args) => {
                    ServerConfig::from_args(&args).expect("server config")
                }
                _ => unreachable!("parsed as the server command"),
            }
        }

        fn client(&self, text: &str) -> ClientConfig {
            let path = self.write("client.toml", text);
            match crate::cli::Cli::try_parse_from(["ntp-dtls", "client", "--config", &path])
                .expect("args")
                .command
            {
                crate::cli::Command::Client(args) => {
                    ClientConfig::from_args(&args).expect("client config")
                }
                _ => unreachable!("parsed as the client command"),
            }
        }
    }

    impl Drop for Lab {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    use clap::Parser as _;

    const SERVER: &str = "listen = \"127.0.0.1:1123\"\nupstream = \"builtin\"\n\
                          cert = \"DIR/server.pem\"\nkey = \"DIR/server.key.pem\"\nworkers = 2\n";

    #[test]
    fn timestamp_correction_is_on_by_default_off_by_file_or_flag_and_reloads_live() {
        let lab = Lab::new();
        let on = lab.server(SERVER);
        assert!(on.timestamp_correction);
        let off = lab.server(&format!("{SERVER}timestamp_correction = false\n"));
        assert!(!off.timestamp_correction);
        let plan = reload_plan(&on, &off);
        assert!(plan.applied.iter().any(|k| k == "timestamp_correction"));
        assert!(!plan.needs_restart(), "{plan:?}");
        let path = lab.write("flag.toml", SERVER);
        let flagged = match crate::cli::Cli::try_parse_from([
            "ntp-dtls",
            "server",
            "--config",
            &path,
            "--no-timestamp-correction",
        ])
        .expect("args")
        .command
        {
            crate::cli::Command::Server(args) => ServerConfig::from_args(&args).expect("config"),
            _ => unreachable!("parsed as the server command"),
        };
        assert!(!flagged.timestamp_correction);

        let tunnel = "[[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"127.0.0.1:1123\"\n\
                      server_name = \"localhost\"\nca = \"DIR/ca.pem\"\n";
        let client_on = lab.client(tunnel);
        assert!(client_on.timestamp_correction);
        let client_off = lab.client(&format!("timestamp_correction = false\n{tunnel}"));
        assert!(!client_off.timestamp_correction);
        let plan = reload_plan(&client_on, &client_off);
        assert!(plan.applied.iter().any(|k| k == "timestamp_correction"));
        assert!(!plan.needs_restart(), "{plan:?}");
    }

    #[test]
    fn busy_polling_defaults_per_relay_is_set_by_file_or_flag_bounded_and_needs_a_restart() {
        let lab = Lab::new();
        let default = lab.server(SERVER);
        assert_eq!(default.daemon.busy_poll, Duration::from_micros(200));
        let off = lab.server(&format!("busy_poll_us = 0\n{SERVER}"));
        assert_eq!(off.daemon.busy_poll, Duration::ZERO);
        let plan = reload_plan(&default, &off);
        assert!(
            plan.restart_required.iter().any(|k| k == "busy_poll_us"),
            "{plan:?}"
        );
        let parse = |extra: &[&str]| {
            let path = lab.write("flag.toml", &format!("busy_poll_us = 0\n{SERVER}"));
            let mut argv = vec!["ntp-dtls", "server", "--config", &path];
            argv.extend_from_slice(extra);
            match crate::cli::Cli::try_parse_from(argv).expect("args").command {
                crate::cli::Command::Server(args) => ServerConfig::from_args(&args),
                _ => unreachable!("parsed as the server command"),
            }
        };
        let flagged = parse(&["--busy-poll-us", "30"]).expect("config");
        assert_eq!(flagged.daemon.busy_poll, Duration::from_micros(30));
        let Err(error) = parse(&["--busy-poll-us", "20000"]) else {
            panic!("a 20 ms busy-poll window was accepted");
        };
        let error = error.to_string();
        assert!(
            error.contains("busy_poll_us") && error.contains("10000"),
            "{error}"
        );

        let tunnel = "[[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"127.0.0.1:1123\"\n\
                      server_name = \"localhost\"\nca = \"DIR/ca.pem\"\n";
        assert_eq!(lab.client(tunnel).daemon.busy_poll, Duration::ZERO);
        let polling = lab.client(&format!("busy_poll_us = 40\n{tunnel}"));
        assert_eq!(polling.daemon.busy_poll, Duration::from_micros(40));
    }

    #[test]
    fn a_server_reload_applies_material_and_names_what_needs_a_restart() {
        let lab = Lab::new();
        let old = lab.server(SERVER);
        let same = lab.server(SERVER);
        let plan = reload_plan(&old, &same);
        assert_eq!(plan.applied, ["cert", "key"]);
        assert!(!plan.needs_restart(), "{plan:?}");

        let changed = lab.server(&format!(
            "{}client_ca = \"DIR/ca.pem\"\nmetrics = \"127.0.0.1:0\"\nstratum = 3\n\
             [limits]\nmax_half_open = 7\nidle_timeout_secs = 60\n",
            SERVER.replace("127.0.0.1:1123", "127.0.0.1:1124")
        ));
        let plan = reload_plan(&old, &changed);
        assert_eq!(plan.applied, ["cert", "key", "client_ca"]);
        assert_eq!(
            plan.restart_required,
            [
                "metrics",
                "listen",
                "stratum",
                "limits.max_half_open",
                "limits.idle_timeout_secs"
            ]
        );
        let upstream = lab.server(&SERVER.replace("builtin", "127.0.0.1:123"));
        assert_eq!(reload_plan(&old, &upstream).restart_required, ["upstream"]);

        // The config keeps the flags it came from: reload reads the file again.
        lab.write("server.toml", &SERVER.replace("workers = 2", "workers = 3"));
        let (new, plan) = old.reload().expect("reload");
        assert_eq!(new.workers, 3);
        assert_eq!(plan.restart_required, ["workers"]);
        // A file that no longer parses is a failed reload, not a partial one.
        lab.write("server.toml", &format!("{SERVER}bogus = 1\n"));
        let err = old
            .reload()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("bogus"), "{err}");
    }

    const CLIENT: &str = "ca = \"DIR/ca.pem\"\n\
                          [[tunnel]]\nlisten = \"127.0.0.1:10123\"\nserver = \"127.0.0.1\"\n\
                          [[tunnel]]\nlisten = \"127.0.0.2:10123\"\nserver = \"localhost:1123\"\n";

    #[test]
    fn a_client_reload_applies_material_and_names_what_needs_a_restart() {
        let lab = Lab::new();
        let old = lab.client(CLIENT);
        assert_eq!(old.tunnels[0].server_spec, "127.0.0.1:1123", "default port");
        assert_eq!(old.tunnels[0].settings.server_name, "127.0.0.1");
        assert_eq!(
            old.daemon
                .files
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["config", "tunnel 1 ca"],
            "the CA file is shared: listed once"
        );
        let plan = reload_plan(&old, &lab.client(CLIENT));
        assert_eq!(
            plan,
            ReloadPlan {
                applied: vec!["ca".into()],
                restart_required: vec![],
            }
        );

        let changed = lab.client(&format!(
            "keepalive_secs = 30\nuser = \"nobody\"\n{}\
             [[tunnel]]\nlisten = \"127.0.0.3:10123\"\nserver = \"localhost\"\n",
            CLIENT
                .replace("127.0.0.2:10123", "127.0.0.4:10123")
                .replace(
                    "server = \"127.0.0.1\"",
                    "server = \"127.0.0.1\"\nserver_name = \"localhost\""
                )
        ));
        let plan = reload_plan(&old, &changed);
        assert_eq!(plan.applied, ["ca", "server_name"]);
        assert_eq!(
            plan.restart_required,
            ["user", "keepalive_secs", "tunnel[2].listen", "tunnel[3]"]
        );
        // Fewer tunnels: the ones gone are named too.
        assert_eq!(
            reload_plan(&changed, &old)
                .restart_required
                .last()
                .map(String::as_str),
            Some("tunnel[3]")
        );
    }

    #[test]
    fn a_client_candidate_keeps_each_tunnels_problem_apart() {
        let lab = Lab::new();
        let path = lab.write(
            "client.toml",
            "ca = \"DIR/ca.pem\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:10123\"\nserver = \"localhost\"\n\
             [[tunnel]]\nlisten = \"127.0.0.2:10123\"\nserver = \"localhost\"\nca = \"DIR/missing.pem\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:10123\"\nserver = \"localhost\"\n",
        );
        let args = match crate::cli::Cli::try_parse_from(["ntp-dtls", "client", "--config", &path])
            .expect("args")
            .command
        {
            crate::cli::Command::Client(args) => args,
            _ => unreachable!("client"),
        };
        let candidate = ClientCandidate::from_args(&args).expect("the file parses");
        assert!(candidate.tunnels[0].1.is_ok());
        let second = candidate.tunnels[1]
            .1
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            second.contains("tunnel 2") && second.contains("missing.pem"),
            "{second}"
        );
        let third = candidate.tunnels[2]
            .1
            .as_ref()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            third.contains("tunnel 3") && third.contains("earlier tunnel"),
            "{third}"
        );
        let err = ClientConfig::from_args(&args)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("tunnel 2"),
            "the daemon stops at the first: {err}"
        );
    }

    #[test]
    fn resolve_reports_what_failed() {
        let err = resolve("no-such-host.invalid:123", "server")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(
            err.contains("server") && err.contains("no-such-host.invalid"),
            "{err}"
        );
        assert!(resolve("127.0.0.1:5", "x").is_ok());
    }
}
