//! `ntp-dtls client --check` and `ntp-dtls server --check`: everything the daemon would do
//! before it serves, without serving. The configuration is read exactly as the daemon reads it
//! (same flags, same `--config`), every certificate and key is loaded, names are resolved,
//! the listen and metrics addresses are probed, and the files a reload reads are checked
//! against `--user`. One line per tunnel (or for the server's listen, upstream, workers, mutual
//! authentication and limits) says what would run; one line per problem says what is wrong.
//!
//! A configuration that does not parse is an error like the daemon's (one line, exit 1); a
//! problem found after that is reported with the others, and the exit status is 1 if there is
//! any.

use std::fmt::Write as _;
use std::net::{SocketAddr, ToSocketAddrs};
use std::process::ExitCode;

use crate::cli::{ClientArgs, ServerArgs};
use crate::config::{ClientCandidate, DaemonSettings, ServerConfig, Upstream};
use crate::ops::metrics::state::{days_until, expires_soon, format_utc, unix_now};
use crate::ops::privileges;

/// What a check found: the report lines, and the problems among them.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: Vec<String>,
    pub problems: usize,
}

impl Report {
    fn line(&mut self, line: impl Into<String>) {
        self.lines.push(line.into());
    }

    fn problem(&mut self, problem: impl std::fmt::Display) {
        self.problems += 1;
        self.lines.push(format!("problem: {problem}"));
    }

    fn warning(&mut self, warning: impl std::fmt::Display) {
        self.lines.push(format!("warning: {warning}"));
    }

    /// The report as printed, ending with the verdict line.
    pub fn text(&self, what: &str) -> String {
        let mut out = String::new();
        for line in &self.lines {
            let _ = writeln!(out, "{line}");
        }
        let _ = match self.problems {
            0 => writeln!(out, "check: OK: the {what} would start"),
            1 => writeln!(out, "check: 1 problem"),
            n => writeln!(out, "check: {n} problems"),
        };
        out
    }

    pub fn exit_code(&self) -> ExitCode {
        if self.problems == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        }
    }
}

/// `ntp-dtls client --check`.
pub fn client(args: &ClientArgs) -> anyhow::Result<ExitCode> {
    let report = check_client(args)?;
    print!("{}", report.text("client relay"));
    Ok(report.exit_code())
}

/// `ntp-dtls server --check`.
pub fn server(args: &ServerArgs) -> anyhow::Result<ExitCode> {
    let report = check_server(args)?;
    print!("{}", report.text("server relay"));
    Ok(report.exit_code())
}

/// The client's report; Err only for what stops the daemon before any tunnel (the file).
pub fn check_client(args: &ClientArgs) -> anyhow::Result<Report> {
    let candidate = ClientCandidate::from_args(args)?;
    let mut report = Report::default();
    if let Some(path) = &args.config {
        report.line(format!("config {}", path.display()));
    }
    let mut files = Vec::new();
    for (name, tunnel) in &candidate.tunnels {
        let tunnel = match tunnel {
            Ok(tunnel) => tunnel,
            // A file's tunnel errors name the file and the tunnel already; the flags' do not.
            Err(e) if args.config.is_none() => {
                report.problem(format!("{name}: {e}"));
                continue;
            }
            Err(e) => {
                report.problem(e);
                continue;
            }
        };
        let resolved = match tunnel.server {
            Some(addr) => format!("{addr}"),
            None => match tunnel.server_spec.to_socket_addrs() {
                Ok(addrs) => {
                    let list: Vec<String> = addrs.map(|a| a.to_string()).collect();
                    if list.is_empty() {
                        report.problem(format!(
                            "{name}: server {} resolves to no address now (the daemon would \
                             keep retrying)",
                            tunnel.server_spec
                        ));
                    }
                    format!("{} = {}", tunnel.server_spec, list.join(","))
                }
                Err(e) => {
                    report.problem(format!(
                        "{name}: server {} does not resolve now (the daemon would keep \
                         retrying): {e}",
                        tunnel.server_spec
                    ));
                    format!("{} unresolved", tunnel.server_spec)
                }
            },
        };
        let identity = match &tunnel.settings.identity {
            Some(identity) => format!(
                "client certificate {}",
                describe_leaf(
                    &mut report,
                    name,
                    identity.chain.first().map(|c| c.as_ref())
                )
            ),
            None => "no client certificate".to_string(),
        };
        report.line(format!(
            "{name}: listen {} -> server {} ({resolved}), expecting {} in its certificate, \
             CA {} ({} certificate{}), {identity}",
            tunnel.listen,
            tunnel.server_spec,
            tunnel.settings.server_name,
            tunnel.files.ca.display(),
            tunnel.settings.roots.len(),
            if tunnel.settings.roots.len() == 1 {
                ""
            } else {
                "s"
            },
        ));
        // CRL hook: once ClientSettings carries revocation lists (the --crl / `crl` branch),
        // load and describe them here, and add their files to `files` below.
        probe_udp(&mut report, name, tunnel.listen);
        files.push((format!("{name} ca"), tunnel.files.ca.clone()));
        for (key, path) in [("cert", &tunnel.files.cert), ("key", &tunnel.files.key)] {
            if let Some(path) = path {
                files.push((format!("{name} {key}"), path.clone()));
            }
        }
    }
    let p = &candidate.policy;
    report.line(format!(
        "upkeep: dead after {} unanswered or {} s, rekey after {} records or {} s, keepalive \
         after {} s",
        p.dead_after_unanswered,
        p.dead_after.as_secs_f64(),
        p.rekey_after_records,
        p.rekey_after.as_secs_f64(),
        p.keepalive_after.as_secs_f64()
    ));
    report.line(timestamp_line(candidate.timestamp_correction));
    if let Some(path) = &args.config {
        files.insert(0, ("config".into(), path.clone()));
    }
    daemon(&mut report, &candidate.daemon, &files);
    Ok(report)
}

/// The server's report; Err for what stops the daemon before it binds (the file, the
/// certificate and key, the upstream's address).
pub fn check_server(args: &ServerArgs) -> anyhow::Result<Report> {
    let config = ServerConfig::from_args(args)?;
    let mut report = Report::default();
    if let Some(path) = &args.config {
        report.line(format!("config {}", path.display()));
    }
    let upstream = match config.upstream {
        Upstream::Udp(addr) => format!("time server {addr}"),
        Upstream::Builtin { stratum } => format!("builtin time source (stratum {stratum})"),
    };
    report.line(format!(
        "listen {}, {} worker{}, upstream {upstream}",
        config.listen,
        config.workers,
        if config.workers == 1 { "" } else { "s" }
    ));
    probe_udp(&mut report, "listen", config.listen);
    let leaf = describe_leaf(
        &mut report,
        "server",
        config.settings.identity.chain.first().map(|c| c.as_ref()),
    );
    report.line(format!(
        "certificate {} ({leaf}), key {} matches it",
        config.cert_path.display(),
        config.key_path.display()
    ));
    match (&config.client_ca_path, &config.settings.client_roots) {
        (Some(path), Some(roots)) => report.line(format!(
            "mutual authentication: on, client certificates must chain to {} ({} certificate{})",
            path.display(),
            roots.len(),
            if roots.len() == 1 { "" } else { "s" }
        )),
        _ => report.line("mutual authentication: off (any client relay may associate)"),
    }
    // CRL hook: once ServerSettings carries revocation lists (the --crl / `crl` branch), load
    // and describe them here; config.daemon.files then lists their files for the check below.
    let l = &config.limits;
    report.line(format!(
        "limits: max_associations={} max_half_open={} handshake_timeout_secs={} \
         handshake_rate={} handshake_burst={} max_handshake_bytes={} idle_timeout_secs={}",
        l.max_associations,
        l.max_half_open,
        l.handshake_timeout.as_secs_f64(),
        l.handshake_rate,
        l.handshake_burst,
        l.max_handshake_bytes,
        l.idle_timeout.as_secs_f64()
    ));
    report.line(match (config.timestamp_correction, config.upstream) {
        (_, Upstream::Builtin { .. }) => {
            "timestamp correction: n/a (the builtin source stamps receive and transmit at its \
             socket)"
                .to_string()
        }
        (on, Upstream::Udp(_)) => timestamp_line(on),
    });
    daemon(&mut report, &config.daemon, &config.daemon.files);
    Ok(report)
}

/// What `--check` says of the residence-time correction (docs/TIMESTAMPS.md).
fn timestamp_line(on: bool) -> String {
    if on {
        "timestamp correction: on (NTP replies' receive and transmit timestamps are corrected \
         for the time spent in this relay)"
            .to_string()
    } else {
        "timestamp correction: off (NTP replies pass as they arrive)".to_string()
    }
}

/// Metrics, user and file permissions: what both daemons share.
fn daemon(report: &mut Report, settings: &DaemonSettings, files: &[(String, std::path::PathBuf)]) {
    match settings.metrics {
        Some(addr) => {
            let free = std::net::TcpListener::bind(addr);
            match free {
                Ok(_) => report.line(format!("metrics: http://{addr}/metrics (address free)")),
                Err(e) => report.problem(format!("metrics {addr}: cannot listen: {e}")),
            }
        }
        None => report.line("metrics: off"),
    }
    let Some(user) = &settings.user else {
        report.line("user: none (runs as whoever starts it; systemd's units use User=ntp-dtls)");
        return;
    };
    let account = match privileges::lookup(user) {
        Ok(account) => account,
        Err(e) => {
            report.problem(e);
            return;
        }
    };
    report.line(format!(
        "user: {} (uid {}, group {}) once the sockets are bound",
        account.name,
        account.uid,
        privileges::group_name(account.gid)
    ));
    let euid = nix::unistd::geteuid();
    if !euid.is_root() {
        report.problem(format!(
            "user {user}: only a daemon started as root can switch users (this is uid {euid})"
        ));
    }
    for (_, path) in files {
        if let Err(problem) = privileges::readable_by(&account, path) {
            report.problem(problem);
        }
    }
}

/// A problem unless `addr` can be bound right now by a socket without SO_REUSEPORT: exactly
/// what the daemon's own start-up probe does.
fn probe_udp(report: &mut Report, name: &str, addr: SocketAddr) {
    if addr.port() == 0 {
        return;
    }
    if let Err(e) = std::net::UdpSocket::bind(addr) {
        let hint = match e.kind() {
            std::io::ErrorKind::AddrInUse => {
                format!("; `ss -ulpn 'sport = :{}'` shows who holds it", addr.port())
            }
            std::io::ErrorKind::PermissionDenied => {
                "; ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd units grant it)"
                    .to_string()
            }
            _ => String::new(),
        };
        report.problem(format!("{name}: cannot listen on {addr}: {e}{hint}"));
    }
}

/// "CN=..., DNS:a,IP:b, expires DATE (in N days)"; an expired leaf is a problem, one that
/// expires soon a warning.
fn describe_leaf(report: &mut Report, name: &str, der: Option<&[u8]>) -> String {
    let Some(der) = der else {
        return "no certificate".into();
    };
    let summary = match crate::pki::summarize(der) {
        Ok(summary) => summary,
        Err(e) => return format!("unreadable: {e}"),
    };
    let now = unix_now();
    let days = days_until(summary.not_after_unix, now);
    if summary.not_after_unix <= now {
        report.problem(format!(
            "{name}: certificate {} expired on {}",
            summary.subject,
            format_utc(summary.not_after_unix)
        ));
    } else if expires_soon(summary.not_after_unix, now) {
        report.warning(format!(
            "{name}: certificate {} expires in {days} days: renew it",
            summary.subject
        ));
    }
    format!(
        "{}, {}, expires {} (in {days} days)",
        summary.subject,
        summary.identifiers(),
        format_utc(summary.not_after_unix)
    )
}
