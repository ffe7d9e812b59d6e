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

pub const DEFAULT_CLIENT_LISTEN: &str = "127.0.0.1:123";
pub const DEFAULT_SERVER_LISTEN: &str = "0.0.0.0:1123";
pub const DEFAULT_UPSTREAM: &str = "127.0.0.1:123";
pub const DEFAULT_STRATUM: u8 = 2;

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
}

pub struct ClientConfig {
    pub tunnels: Vec<Tunnel>,
    pub daemon: DaemonSettings,
}

/// What both daemons take besides their own settings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DaemonSettings {
    /// Where to serve Prometheus metrics.
    pub metrics: Option<SocketAddr>,
    /// Whom to become once the sockets are bound.
    pub user: Option<String>,
}

impl DaemonSettings {
    fn resolve(
        args: &crate::cli::DaemonArgs,
        metrics: Option<&str>,
        user: Option<&str>,
    ) -> Result<Self, ConfigError> {
        let metrics = match args.metrics.as_deref().or(metrics) {
            Some(spec) => Some(resolve(spec, "metrics")?),
            None => None,
        };
        Ok(DaemonSettings {
            metrics,
            user: args.user.clone().or(user.map(str::to_owned)),
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
    pub limits: Limits,
    /// Sockets (and threads) sharing the listen address.
    pub workers: usize,
    pub daemon: DaemonSettings,
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
            limits: self.limits.clone(),
            workers: self.workers,
            daemon: self.daemon.clone(),
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
    /// Association upkeep, for every tunnel.
    rekey_after_records: Option<u64>,
    rekey_after_secs: Option<f64>,
    keepalive_secs: Option<f64>,
    dead_after_unanswered: Option<u32>,
    dead_after_secs: Option<f64>,
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
    stratum: Option<u8>,
    workers: Option<usize>,
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
        ConfigError::Parse {
            path: path.to_owned(),
            // toml's own message may span lines: the error must stay one line.
            message: format!(
                "{place}{}{source_line}",
                e.message()
                    .trim_end()
                    .lines()
                    .collect::<Vec<_>>()
                    .join("; ")
            ),
        }
    })
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
        return Err(ConfigError::Invalid(format!(
            "{} does not match the certificate {}",
            key.display(),
            cert.display()
        )));
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

/// Builds the settings of one client tunnel, checking everything a handshake will need.
pub fn client_settings(
    server_spec: &str,
    server_name: Option<&str>,
    ca: &Path,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<ClientSettings, ConfigError> {
    let roots = pki_context(pki::load_ca_roots(ca), "CA file")?;
    let settings = ClientSettings {
        roots,
        server_name: server_name
            .map(str::to_owned)
            .unwrap_or_else(|| host_of(server_spec)),
        identity: optional_identity(cert, key)?,
    };
    // Build an engine once so that every policy error surfaces now.
    ntp_dtls_proto::engine::Engine::client(&settings).map_err(|e| ConfigError::Engine {
        context: format!("tunnel to {server_spec}"),
        message: e.to_string(),
    })?;
    Ok(settings)
}

impl ClientConfig {
    pub fn from_args(args: &ClientArgs) -> Result<Self, ConfigError> {
        if let Some(path) = &args.config {
            let file: ClientFile = read_toml(path)?;
            let daemon = DaemonSettings::resolve(
                &args.daemon,
                file.metrics.as_deref(),
                file.user.as_deref(),
            )?;
            let mut config = Self::from_file(path, file)?;
            config.daemon = daemon;
            return Ok(config);
        }
        let server = args
            .server
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid("--server is required".into()))?;
        let ca = args
            .ca
            .as_deref()
            .ok_or_else(|| ConfigError::Invalid("--ca is required".into()))?;
        let listen_spec = args.listen.as_deref().unwrap_or(DEFAULT_CLIENT_LISTEN);
        let tunnel = Tunnel {
            name: listen_spec.to_string(),
            listen: resolve(listen_spec, "--listen")?,
            server_spec: server.to_string(),
            server: server_address(server, "--server")?,
            settings: client_settings(
                server,
                args.server_name.as_deref(),
                ca,
                args.cert.as_deref(),
                args.key.as_deref(),
            )?,
            policy: HealthPolicy::default(),
        };
        Ok(ClientConfig {
            tunnels: vec![tunnel],
            daemon: DaemonSettings::resolve(&args.daemon, None, None)?,
        })
    }

    fn from_file(path: &Path, file: ClientFile) -> Result<Self, ConfigError> {
        if file.tunnel.is_empty() {
            return Err(ConfigError::Invalid(format!(
                "{}: no [[tunnel]] entry",
                path.display()
            )));
        }
        let policy = file
            .policy()
            .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))?;
        let mut tunnels = Vec::with_capacity(file.tunnel.len());
        for (index, entry) in file.tunnel.iter().enumerate() {
            let name = format!("{}: tunnel {}", path.display(), index + 1);
            let ca = entry.ca.as_deref().or(file.ca.as_deref()).ok_or_else(|| {
                ConfigError::Invalid(format!("{name}: missing field `ca` (or a top-level `ca`)"))
            })?;
            let cert = entry.cert.as_deref().or(file.cert.as_deref());
            let key = entry.key.as_deref().or(file.key.as_deref());
            let settings =
                client_settings(&entry.server, entry.server_name.as_deref(), ca, cert, key)
                    .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            let listen = resolve(&entry.listen, "listen")
                .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?;
            if listen.port() != 0 && tunnels.iter().any(|t: &Tunnel| t.listen == listen) {
                return Err(ConfigError::Invalid(format!(
                    "{name}: listen address {listen} is used by an earlier tunnel"
                )));
            }
            tunnels.push(Tunnel {
                name: format!("tunnel {}", index + 1),
                listen,
                server_spec: entry.server.clone(),
                server: server_address(&entry.server, "server")
                    .map_err(|e| ConfigError::Invalid(format!("{name}: {e}")))?,
                settings,
                policy: policy.clone(),
            });
        }
        Ok(ClientConfig {
            tunnels,
            daemon: DaemonSettings::default(),
        })
    }
}

impl ServerConfig {
    pub fn from_args(args: &ServerArgs) -> Result<Self, ConfigError> {
        let file: ServerFile = match &args.config {
            Some(path) => read_toml(path)?,
            None => ServerFile::default(),
        };
        let daemon =
            DaemonSettings::resolve(&args.daemon, file.metrics.as_deref(), file.user.as_deref())?;
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
        let settings = Self::load_settings(&cert_path, &key_path, client_ca_path.as_deref())?;
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
        Ok(ServerConfig {
            daemon,
            limits,
            workers,
            listen: resolve(&listen_spec, "listen")?,
            upstream,
            settings,
            cert_path,
            key_path,
            client_ca_path,
        })
    }

    /// Loads (or reloads) the server's certificate material and checks the engine accepts it.
    pub fn load_settings(
        cert: &Path,
        key: &Path,
        client_ca: Option<&Path>,
    ) -> Result<ServerSettings, ConfigError> {
        let identity = load_identity(cert, key)?;
        let client_roots = match client_ca {
            Some(path) => Some(pki_context(pki::load_ca_roots(path), "client CA file")?),
            None => None,
        };
        let settings = ServerSettings {
            identity,
            client_roots,
        };
        ntp_dtls_proto::engine::Engine::server(&settings).map_err(|e| ConfigError::Engine {
            context: "server certificate".into(),
            message: e.to_string(),
        })?;
        Ok(settings)
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
