//! Command-line definitions. Parsing only: `config` turns these into validated settings.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ntp-dtls",
    version,
    about = "Carry NTP over DTLS 1.2, one NTP datagram per DTLS record, so unmodified NTP clients \
             and servers exchange time over an authenticated channel.",
    after_help = "Security policy (fixed, no switch weakens it): DTLS 1.2 only, extended master \
                  secret required, TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 or \
                  TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256, ECDHE over secp256r1/secp384r1, ECDSA \
                  P-256/P-384 or RSA 2048-4096 certificates with SHA-256/SHA-384 signatures, \
                  cookie exchange, certificate chain and DNS/IP SAN checks.\n\n\
                  Typical use:\n  \
                  ntp-dtls certs --out certs --server-name time.example.net\n  \
                  ntp-dtls server --cert certs/server.pem --key certs/server.key.pem\n  \
                  ntp-dtls client --server time.example.net:1123 --ca certs/ca.pem\n  \
                  ntpdate -q 127.0.0.1"
)]
pub struct Cli {
    /// Log level filter (error, warn, info, debug, trace); RUST_LOG overrides it
    #[arg(long, global = true, default_value = "info", env = "NTP_DTLS_LOG")]
    pub log_level: String,

    /// Log format: human-readable text, or one JSON object per line for log collectors
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Client-side relay: local NTP clients in, one persistent DTLS association per upstream out
    Client(ClientArgs),
    /// Server-side relay: DTLS associations in, plain NTP to the time server (chronyd) out
    Server(ServerArgs),
    /// Generate a lab PKI (CA, server and client certificates and keys), or with --request a key
    /// and a certificate request for your own CA
    #[command(after_help = "Examples:\n  \
        ntp-dtls certs --out certs --server-name time.example.net\n  \
        ntp-dtls certs --out certs --server-name time.example.net --key-type rsa-3072\n  \
        ntp-dtls certs --out req --request server --server-name time.example.net\n  \
        openssl x509 -req -in req/server.csr.pem -CA ca.pem -CAkey ca.key -copy_extensions copy \\\n      \
        -days 365 -out req/server.pem\n  \
        ntp-dtls certs --out req --request client --client-name device-1")]
    Certs(CertsArgs),
    /// Query an NTP server, plain or over DTLS, and print offset, delay and stratum
    Query(QueryArgs),
    /// Print a short summary of a relay's metrics endpoint (see --metrics)
    Status(StatusArgs),
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The relay's metrics address, HOST:PORT
    #[arg(value_name = "HOST:PORT")]
    pub addr: String,
}

/// What both daemons take besides their own settings.
#[derive(Debug, Clone, Args)]
pub struct DaemonArgs {
    /// Serve Prometheus metrics on this TCP address (off by default; keep it on loopback)
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<String>,

    /// Once the sockets are bound, switch to this user (when started as root without systemd)
    #[arg(long, value_name = "NAME")]
    pub user: Option<String>,

    /// After each receive, keep reading the sockets for this many microseconds before
    /// sleeping: a reply that comes within the window is met awake, without a wake-up's
    /// latency, for CPU spent while traffic flows. 0 turns it off, at most 10000
    /// [default: 200 for the server relay, 0 for the client relay]
    #[arg(long, value_name = "MICROSECONDS")]
    pub busy_poll_us: Option<u64>,

    /// Check the configuration and exit: load every file, resolve names, check that the
    /// listen addresses are free and that --user can read the files a reload reads, and
    /// print what would run. Exit status 0 when the daemon would start cleanly, else 1
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// TOML file with one or more [[tunnel]] entries (see README); excludes the tunnel flags
    #[arg(long, short = 'c', conflicts_with_all = ["listen", "server", "server_name", "ca", "cert", "key", "crls", "revocation"])]
    pub config: Option<PathBuf>,

    /// Local UDP address the NTP clients query [default: 127.0.0.1:123]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Server relay to connect to, HOST[:PORT] (port 1123 when omitted); a host name is looked
    /// up each time an association is made
    #[arg(long, value_name = "HOST[:PORT]", required_unless_present = "config")]
    pub server: Option<String>,

    /// Name expected in the server certificate's DNS or IP SAN [default: the host of --server]
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// CA certificate(s) the server's chain must lead to (PEM)
    #[arg(long, value_name = "FILE", required_unless_present = "config")]
    pub ca: Option<PathBuf>,

    /// Client certificate chain (PEM), for servers that require mutual authentication
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Private key of --cert (PEM: ECDSA P-256/P-384 as PKCS#8 or SEC1, RSA 2048-4096 as PKCS#8 or PKCS#1)
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Leave NTP replies' receive and transmit timestamps as they arrive instead of correcting
    /// them for the time spent in this relay, and do not ask (in chronyd's interleaved mode)
    /// when a basic reply left (docs/TIMESTAMPS.md); overrides the file
    #[arg(long)]
    pub no_timestamp_correction: bool,
    #[command(flatten)]
    pub revocation: RevocationArgs,
}

/// Certificate revocation: CRL files and what to do when a certificate's status is unknown.
#[derive(Debug, Clone, Default, Args)]
pub struct RevocationArgs {
    /// CRL (PEM or DER) checked against every certificate of the peer's chain but its trust
    /// anchor; repeat for each issuing CA's CRL. Re-read at SIGHUP
    #[arg(long = "crl", value_name = "FILE")]
    pub crls: Vec<PathBuf>,

    /// require: a certificate whose issuer has no CRL, or whose CRL is expired or badly signed,
    /// is refused; if-available: only a CRL present counts; off: no revocation check
    /// [default: require with a CRL, off without]
    #[arg(long, value_enum, value_name = "MODE")]
    pub revocation: Option<RevocationArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RevocationArg {
    Require,
    IfAvailable,
    Off,
}

impl From<RevocationArg> for ntp_dtls_proto::verify::RevocationMode {
    fn from(arg: RevocationArg) -> Self {
        use ntp_dtls_proto::verify::RevocationMode;
        match arg {
            RevocationArg::Require => RevocationMode::Require,
            RevocationArg::IfAvailable => RevocationMode::IfAvailable,
            RevocationArg::Off => RevocationMode::Off,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct ServerArgs {
    #[command(flatten)]
    pub daemon: DaemonArgs,

    /// TOML file with the server settings (see README); flags given as well override it
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,

    /// UDP address to accept DTLS associations on [default: 0.0.0.0:1123]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Time server to forward to, HOST:PORT, or "builtin" to answer from this host's clock
    /// [default: 127.0.0.1:123]
    #[arg(long, value_name = "ADDR|builtin")]
    pub upstream: Option<String>,

    /// Server certificate chain (PEM)
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,

    /// Private key of --cert (PEM: ECDSA P-256/P-384 as PKCS#8 or SEC1, RSA 2048-4096 as PKCS#8 or PKCS#1)
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,

    /// Require every client to present a certificate chaining to this CA (mutual authentication)
    #[arg(long, value_name = "FILE")]
    pub client_ca: Option<PathBuf>,

    /// Stratum the builtin time source announces [default: 2]
    #[arg(long, value_name = "N")]
    pub stratum: Option<u8>,

    /// Worker threads, each with its own SO_REUSEPORT socket [default: the number of cores]
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,

    /// Leave NTP replies' receive and transmit timestamps as the time server sent them instead
    /// of correcting them for the time spent in this relay, and do not ask the time server
    /// (in chronyd's interleaved mode) when a basic reply left (docs/TIMESTAMPS.md); overrides
    /// the file
    #[arg(long)]
    pub no_timestamp_correction: bool,
    // Client certificates' revocation (with --client-ca); --crl replaces the file's `crl`.
    #[command(flatten)]
    pub revocation: RevocationArgs,
}

#[derive(Debug, Args)]
pub struct CertsArgs {
    /// Directory to write the PKI into
    #[arg(long, value_name = "DIR", default_value = "certs")]
    pub out: PathBuf,

    /// DNS name or IP address for the server certificate (repeat for more; the first is the CN)
    #[arg(
        long = "server-name",
        value_name = "NAME",
        required_unless_present = "request"
    )]
    pub server_names: Vec<String>,

    /// DNS name or IP address for the client certificate [default: ntp-dtls-client]
    #[arg(long = "client-name", value_name = "NAME")]
    pub client_names: Vec<String>,

    /// Validity in days
    #[arg(long, default_value_t = 365)]
    pub days: u32,

    /// Overwrite existing files
    #[arg(long)]
    pub force: bool,

    /// Key type of every key written (RSA keys use TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)
    #[arg(long = "key-type", value_enum, default_value_t = KeyTypeArg::EcdsaP256)]
    pub key_type: KeyTypeArg,

    /// Instead of a lab PKI, write a key (0600) and a PKCS#10 request for your own CA: "server"
    /// (server.key.pem, server.csr.pem: the --server-name SANs, EKU serverAuth) or "client"
    /// (client.key.pem, client.csr.pem: the --client-name SANs, EKU clientAuth)
    #[arg(long, value_enum, value_name = "ROLE")]
    pub request: Option<RequestRole>,
}

/// `certs --key-type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum KeyTypeArg {
    /// ECDSA on P-256, signatures with SHA-256
    #[value(name = "ecdsa-p256")]
    EcdsaP256,
    /// ECDSA on P-384, signatures with SHA-384
    #[value(name = "ecdsa-p384")]
    EcdsaP384,
    /// RSA with a 3072-bit modulus, PKCS#1 v1.5 signatures with SHA-256
    #[value(name = "rsa-3072")]
    Rsa3072,
}

/// `certs --request`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RequestRole {
    Server,
    Client,
}

#[derive(Debug, Args)]
pub struct QueryArgs {
    /// NTP server (or server relay with --dtls), HOST:PORT
    #[arg(value_name = "HOST:PORT")]
    pub server: String,

    /// Number of queries
    #[arg(long, short = 'n', default_value_t = 1)]
    pub count: u32,

    /// Seconds between queries
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,

    /// Seconds to wait for each reply (and for the DTLS handshake)
    #[arg(long, default_value_t = 2.0)]
    pub timeout: f64,

    /// Speak DTLS to a server relay instead of plain NTP
    #[arg(long, requires = "ca")]
    pub dtls: bool,

    /// CA certificate(s) the server relay's chain must lead to (with --dtls)
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,

    /// Name expected in the server certificate [default: the host of HOST:PORT]
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,

    /// Client certificate chain (PEM), for mutual authentication
    #[arg(long, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,

    /// Private key of --cert
    #[arg(long, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,

    /// Output format
    #[arg(long, value_enum, default_value_t = QueryFormat::Text)]
    pub format: QueryFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum QueryFormat {
    Text,
    /// One line per reply: offset_s delay_s stratum
    Raw,
}
