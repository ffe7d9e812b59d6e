//! Certificates and keys for ntp-dtls.
//!
//! Three jobs live here:
//!
//! * `ntp-dtls certs`: [`generate_lab_pki`] mints a throw-away CA plus one
//!   server and one client leaf (ECDSA P-256 by default, or P-384 or RSA-3072,
//!   [`KeyType`]), so a lab can run the relay without touching OpenSSL;
//!   [`generate_request`] writes a key and a PKCS#10 request for an
//!   operator's own CA (`keys.rs`).
//! * Start-up loading: [`load_certificates`], [`load_ca_roots`] and
//!   [`load_private_key`] read PEM files and reject anything the DTLS stack
//!   could not use *now*, with the file path in the message, instead of
//!   letting it fail later as an opaque handshake error.
//! * Audit: [`summarize`] turns a certificate into the few fields an operator
//!   looks at (names, validity, serial).
//!
//! The relay signs its handshakes with ECDSA P-256 or P-384 keys
//! (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) or RSA keys of 2048-4096 bits
//! (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256); everything else is refused at load
//! time with a message that says so.

mod keys;
pub use keys::{
    CLIENT_CSR_FILE, CsrRequest, KeyType, RequestRole, SERVER_CSR_FILE, generate_request,
};

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;

/// File names written by [`generate_lab_pki`], in the order they are checked
/// and written (the "first existing file" in the overwrite error follows it).
pub const CA_CERT_FILE: &str = "ca.pem";
pub const CA_KEY_FILE: &str = "ca.key.pem";
pub const SERVER_CERT_FILE: &str = "server.pem";
pub const SERVER_KEY_FILE: &str = "server.key.pem";
pub const CLIENT_CERT_FILE: &str = "client.pem";
pub const CLIENT_KEY_FILE: &str = "client.key.pem";

/// Client name used when the request names none: a client certificate
/// identifies the relay's client side, and a lab rarely cares what it says.
pub const DEFAULT_CLIENT_NAME: &str = "ntp-dtls-client";

/// Upper bound for `days`. Far beyond any sensible lab validity, and it keeps
/// `not_after` well inside what X.509 time encodings (and the `time` crate
/// arithmetic rcgen relies on, which panics on overflow) can represent.
pub const MAX_VALIDITY_DAYS: u32 = 36_500;

const CA_COMMON_NAME: &str = "ntp-dtls lab CA";
const LAB_ORGANIZATION: &str = "ntp-dtls lab";

/// Backdating of `not_before`, so a peer whose clock is a little behind ours
/// does not reject a certificate minted seconds ago. An NTP relay is exactly
/// the kind of thing that runs on hosts whose clocks are not yet right.
const CLOCK_SLACK: Duration = Duration::from_secs(3600);

const SUITE: &str = "ntp-dtls uses ECDSA P-256, ECDSA P-384 or RSA 2048-4096 bit keys";

/// Everything that can go wrong in this module.
///
/// Messages are complete sentences for an operator: they name the file and,
/// where one exists, the OS error. Underlying errors are folded into the
/// message rather than exposed through `source()`, so printing the chain
/// (e.g. anyhow's `{:#}`) does not repeat them.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: cannot read: {io}", path.display())]
    Read { path: PathBuf, io: io::Error },

    #[error("{}: cannot write: {io}", path.display())]
    Write { path: PathBuf, io: io::Error },

    #[error("{}: cannot create directory: {io}", path.display())]
    CreateDir { path: PathBuf, io: io::Error },

    #[error("{}: already exists; pass --force to overwrite the lab PKI (nothing was written)", path.display())]
    AlreadyExists { path: PathBuf },

    #[error("invalid certificate request: {0}")]
    InvalidRequest(String),

    #[error("generating the {what} failed: {detail}")]
    Generate { what: &'static str, detail: String },

    #[error(
        "the system clock reads before 1970-01-01, so certificate validity cannot be set; fix the clock first"
    )]
    ClockBeforeEpoch,

    #[error("{}: malformed PEM: {detail}", path.display())]
    PemSyntax { path: PathBuf, detail: String },

    /// The file is readable but holds no PEM block of the kind asked for.
    #[error("{}: no {expected} found; {found}", path.display())]
    NoPemBlock {
        path: PathBuf,
        expected: &'static str,
        /// What the file holds instead, with a hint when it looks like a mix-up.
        found: String,
    },

    #[error("{}: certificate #{index} is not a valid X.509 certificate: {detail}", path.display())]
    BadCertificate {
        path: PathBuf,
        /// 1-based position among the file's CERTIFICATE blocks.
        index: usize,
        detail: String,
    },

    #[error(
        "{}: certificate #{index} ({subject}) is neither a CA (basicConstraints CA:TRUE) nor self-signed, so it cannot be a trust root; give the CA certificate (e.g. ca.pem), not a leaf",
        path.display()
    )]
    NotCa {
        path: PathBuf,
        index: usize,
        subject: String,
    },

    /// `what` is a plural noun phrase, e.g. "RSA keys".
    #[error("{}: {what} are not supported: {SUITE}", path.display())]
    UnsupportedKey { path: PathBuf, what: String },

    #[error(
        "{}: encrypted private keys are not supported (the daemon starts unattended and cannot ask for a passphrase); decrypt it, e.g. `openssl pkey -in {0} -out plain.key.pem`, and keep the result mode 0600",
        path.display()
    )]
    EncryptedKey { path: PathBuf },

    #[error(
        "{}: the EC private key does not contain its public key (written with -no_public?), which the crypto library requires; rewrite it with `openssl ec -in {0} -out fixed.key.pem` (which restores it)",
        path.display()
    )]
    KeyWithoutPublicKey { path: PathBuf },

    #[error("{}: {count} private keys found; expected exactly one", path.display())]
    MultipleKeys { path: PathBuf, count: usize },

    #[error("{}: malformed private key: {detail}", path.display())]
    MalformedKey { path: PathBuf, detail: String },

    /// From [`summarize`] / [`public_key_matches`], which get bytes, not a file.
    #[error("invalid certificate: {0}")]
    InvalidCertificate(String),

    #[error("private key rejected by the crypto library: {0}")]
    KeyRejected(String),
}

// ---------------------------------------------------------------------------
// Secrets in memory
// ---------------------------------------------------------------------------

/// Bytes that held key material: zeroed on drop.
///
/// Best effort only. Without `unsafe` (volatile writes) or the zeroize crate
/// the compiler may in principle drop stores to memory that is about to be
/// freed; `black_box` makes the buffer escape so it cannot prove that. Copies
/// made inside ring/rcgen (e.g. `KeyPair::serialized_der`) and freed capacity
/// from earlier reallocations are outside our reach.
struct SecretBytes(Vec<u8>);

impl Drop for SecretBytes {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

fn wipe(bytes: &mut [u8]) {
    bytes.iter_mut().for_each(|b| *b = 0);
    std::hint::black_box(bytes);
}

pub use ntp_dtls_proto::identity::{KeyKind, PrivateKey};

// ---------------------------------------------------------------------------
// Generation
// ---------------------------------------------------------------------------

/// What `ntp-dtls certs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPkiRequest {
    pub out_dir: PathBuf,
    /// DNS names or IP addresses of the server; the first is also its CN.
    pub server_names: Vec<String>,
    /// Names for the client certificate; empty means [`DEFAULT_CLIENT_NAME`].
    pub client_names: Vec<String>,
    /// Validity from now, 1..=[`MAX_VALIDITY_DAYS`].
    pub days: u32,
    /// Overwrite existing files instead of refusing.
    pub force: bool,
    /// The type of every key (CA, server, client).
    pub key_type: KeyType,
}

/// Writes a lab CA, a server leaf and a client leaf (certificate + key each)
/// into `req.out_dir` and returns the paths written, CA first.
///
/// Validation, the overwrite check and all key/certificate generation happen
/// before the first write, so the usual failures (bad name, existing files
/// without `force`) write nothing. A failure *while* writing (disk full, a
/// file created concurrently) can leave the earlier files in place; rerunning
/// with `force` replaces them.
pub fn generate_lab_pki(req: &LabPkiRequest) -> Result<Vec<PathBuf>, PkiError> {
    if req.server_names.is_empty() {
        return Err(PkiError::InvalidRequest(
            "at least one server name (DNS name or IP address) is required".into(),
        ));
    }
    if req.days == 0 || req.days > MAX_VALIDITY_DAYS {
        return Err(PkiError::InvalidRequest(format!(
            "validity must be 1..={MAX_VALIDITY_DAYS} days, got {}",
            req.days
        )));
    }
    let client_names: Vec<String> = if req.client_names.is_empty() {
        vec![DEFAULT_CLIENT_NAME.to_string()]
    } else {
        req.client_names.clone()
    };

    let file_names = [
        CA_CERT_FILE,
        CA_KEY_FILE,
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        CLIENT_CERT_FILE,
        CLIENT_KEY_FILE,
    ];
    let paths: Vec<PathBuf> = file_names.iter().map(|n| req.out_dir.join(n)).collect();
    if !req.force {
        // symlink_metadata, not exists(): a dangling symlink is still
        // something we would clobber, so it counts as existing.
        if let Some(p) = paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
            return Err(PkiError::AlreadyExists { path: p.clone() });
        }
    }

    let validity = Validity::starting_now(req.days)?;

    // Generate everything before touching the disk, so a bad name (e.g. a
    // non-ASCII DNS name) leaves no half-written PKI behind.
    let ca_key = req.key_type.generate("CA key")?;
    let ca_params = ca_params(validity, &ca_key);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| PkiError::Generate {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
    let ca = Issuer::new(ca_params, &ca_key);

    let server_key = req.key_type.generate("server key")?;
    let server_cert = leaf_params(
        &req.server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        validity,
    )?
    .signed_by(&server_key, &ca)
    .map_err(|e| PkiError::Generate {
        what: "server certificate",
        detail: e.to_string(),
    })?;

    let client_key = req.key_type.generate("client key")?;
    let client_cert = leaf_params(&client_names, ExtendedKeyUsagePurpose::ClientAuth, validity)?
        .signed_by(&client_key, &ca)
        .map_err(|e| PkiError::Generate {
            what: "client certificate",
            detail: e.to_string(),
        })?;

    fs::create_dir_all(&req.out_dir).map_err(|io| PkiError::CreateDir {
        path: req.out_dir.clone(),
        io,
    })?;

    let contents: [(Vec<u8>, FileKind); 6] = [
        (ca_cert.pem().into_bytes(), FileKind::Certificate),
        (ca_key.serialize_pem().into_bytes(), FileKind::Secret),
        (server_cert.pem().into_bytes(), FileKind::Certificate),
        (server_key.serialize_pem().into_bytes(), FileKind::Secret),
        (client_cert.pem().into_bytes(), FileKind::Certificate),
        (client_key.serialize_pem().into_bytes(), FileKind::Secret),
    ];
    for (path, (bytes, kind)) in paths.iter().zip(contents) {
        let bytes = SecretBytes(bytes);
        write_file(path, &bytes.0, kind, req.force)?;
    }
    Ok(paths)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FileKind {
    Certificate,
    Secret,
}

impl FileKind {
    fn mode(self) -> u32 {
        match self {
            FileKind::Certificate => 0o644,
            FileKind::Secret => 0o600,
        }
    }
}

/// Writes `bytes` to `path`, creating the file with its final mode so a key
/// is never readable by others, not even for a moment.
///
/// Without `force` we open with `create_new`: the existence check above is
/// racy, this is not. With `force` we write a fresh temporary file and rename
/// it over the target: `mode()` only applies when a file is *created*, so
/// truncating an existing 0644 key file in place would keep it 0644.
fn write_file(path: &Path, bytes: &[u8], kind: FileKind, force: bool) -> Result<(), PkiError> {
    let werr = |io| PkiError::Write {
        path: path.to_path_buf(),
        io,
    };
    if !force {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(kind.mode())
            .open(path)
            .map_err(|io| {
                if io.kind() == io::ErrorKind::AlreadyExists {
                    PkiError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    werr(io)
                }
            })?;
        return f.write_all(bytes).and_then(|()| f.sync_all()).map_err(werr);
    }

    let tmp = temp_path(path);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(kind.mode())
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(io) = result {
        // Best effort: don't leave a stray temporary (possibly a key) behind.
        let _ = fs::remove_file(&tmp);
        return Err(werr(io));
    }
    Ok(())
}

/// A hidden sibling of `path`, unique per process and moment, so concurrent
/// runs (or a stale file from a crash) never collide with `create_new`.
fn temp_path(path: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{nanos}", std::process::id()))
}

/// Certificate validity as offsets from the Unix epoch. Kept as
/// `Duration`s and turned into rcgen's `time::OffsetDateTime` only when
/// applied, so this crate needs no direct dependency on `time`.
#[derive(Clone, Copy)]
struct Validity {
    not_before: Duration,
    not_after: Duration,
}

impl Validity {
    fn starting_now(days: u32) -> Result<Self, PkiError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| PkiError::ClockBeforeEpoch)?;
        // Whole seconds: X.509 times carry none, so don't make rcgen round.
        let now = Duration::from_secs(now.as_secs());
        Ok(Validity {
            not_before: now.saturating_sub(CLOCK_SLACK),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        })
    }

    fn apply(self, params: &mut CertificateParams) {
        // `days` is capped by MAX_VALIDITY_DAYS, so these additions stay far
        // inside `time`'s range (its `+` panics on overflow).
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + self.not_before;
        params.not_after = epoch + self.not_after;
    }
}

fn ca_params(validity: Validity, key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Each lab CA gets its own name: chain building matches issuers by name, so two labs'
    // CAs with one name would make a foreign chain fail as "bad signature" instead of the
    // accurate "unknown issuer". The suffix is the start of the CA's public key (of the EC
    // point's x, or of the RSA modulus past its DER header).
    let raw = key.public_key_raw();
    let skip = if raw.first() == Some(&0x30) { 9 } else { 1 };
    let tag: String = raw
        .iter()
        .skip(skip)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    // CN first so x509-parser (which prints in encoded order) shows
    // "CN=ntp-dtls lab CA 1a2b3c4d, O=ntp-dtls lab" in audit lines.
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    dn.push(DnType::OrganizationName, LAB_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity.apply(&mut params);
    params
}

fn leaf_params(
    names: &[String],
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let mut params = leaf_params_for(names, eku)?;
    validity.apply(&mut params);
    Ok(params)
}

/// A leaf's names and extensions, without validity (a request carries none).
fn leaf_params_for(
    names: &[String],
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, PkiError> {
    let mut sans = Vec::with_capacity(names.len());
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if name.is_empty() {
                    return Err(PkiError::InvalidRequest("empty name".into()));
                }
                let dns = rcgen::string::Ia5String::try_from(name.as_str()).map_err(|_| {
                    PkiError::InvalidRequest(format!(
                        "{name:?} is neither an IP address nor an ASCII DNS name (use the punycode xn-- form for internationalised names)"
                    ))
                })?;
                SanType::DnsName(dns)
            }
        };
        sans.push(san);
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Callers guarantee `names` is non-empty; the fallback only avoids a panic.
    dn.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    // Explicit CA:FALSE rather than omitting basicConstraints, so no
    // verifier can be talked into treating a leaf as an issuer.
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDHE with ECDSA or RSA signatures: the leaf key only signs the handshake.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

// ---------------------------------------------------------------------------
// Loading
// ---------------------------------------------------------------------------

fn read_file(path: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(path).map_err(|io| PkiError::Read {
        path: path.to_path_buf(),
        io,
    })
}

/// All CERTIFICATE blocks of a PEM file, in file order. Each must parse as
/// X.509, so a corrupt chain fails at start-up with the file named.
pub fn load_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let bytes = read_file(path)?;
    let mut certs = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
        let (kind, der) = section.map_err(|e| pem_syntax(path, &e))?;
        if kind == SectionKind::Certificate {
            certs.push(CertificateDer::from(der));
        }
    }
    if certs.is_empty() {
        return Err(PkiError::NoPemBlock {
            path: path.to_path_buf(),
            expected: "certificate (PEM block \"CERTIFICATE\")",
            found: describe_contents(&bytes, Expected::Certificate),
        });
    }
    for (i, der) in certs.iter().enumerate() {
        parse_cert(der).map_err(|detail| PkiError::BadCertificate {
            path: path.to_path_buf(),
            index: i + 1,
            detail,
        })?;
    }
    Ok(certs)
}

/// Like [`load_certificates`], but every certificate must be usable as a
/// trust root: basicConstraints CA:TRUE, or self-signed (a pinned
/// self-signed peer certificate).
///
/// "Self-signed" is judged by the names (issuer == subject, byte for byte)
/// and, when both are present, authority key id == subject key id. The
/// signature itself is not checked: x509-parser verifies only with its
/// optional `verify` feature, and the handshake verifies chains anyway.
pub fn load_ca_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = load_certificates(path)?;
    for (i, der) in certs.iter().enumerate() {
        let bad = |detail| PkiError::BadCertificate {
            path: path.to_path_buf(),
            index: i + 1,
            detail,
        };
        let cert = parse_cert(der).map_err(bad)?;
        let is_ca = cert
            .basic_constraints()
            .map_err(|e| bad(format!("basicConstraints: {e}")))?
            .is_some_and(|bc| bc.value.ca);
        if !is_ca && !is_self_signed(&cert) {
            return Err(PkiError::NotCa {
                path: path.to_path_buf(),
                index: i + 1,
                subject: cert.subject().to_string(),
            });
        }
    }
    Ok(certs)
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    if cert.subject().as_raw() != cert.issuer().as_raw() {
        return false;
    }
    let mut ski = None;
    let mut aki = None;
    for ext in cert.extensions() {
        match ext.parsed_extension() {
            ParsedExtension::SubjectKeyIdentifier(id) => ski = Some(id.0),
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                aki = a.key_identifier.as_ref().map(|id| id.0);
            }
            _ => {}
        }
    }
    match (ski, aki) {
        (Some(s), Some(a)) => s == a,
        _ => true,
    }
}

/// Reads the one private key in `path` (PKCS#8 "PRIVATE KEY", SEC1
/// "EC PRIVATE KEY" or PKCS#1 "RSA PRIVATE KEY"; other PEM blocks such as
/// certificates or "EC PARAMETERS" are ignored) and checks it is an ECDSA
/// P-256/P-384 or RSA 2048-4096 key the crypto library accepts. SEC1 and
/// PKCS#1 keys are converted to PKCS#8.
pub fn load_private_key(path: &Path) -> Result<PrivateKey, PkiError> {
    let bytes = SecretBytes(read_file(path)?);
    // Before the PEM parser: legacy encrypted PEM ("Proc-Type: 4,ENCRYPTED"
    // headers) would otherwise surface as a confusing base64 error.
    if is_encrypted_pem(&bytes.0) {
        return Err(PkiError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    let mut keys: Vec<(SectionKind, SecretBytes)> = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes.0) {
        let (kind, der) = section.map_err(|e| pem_syntax(path, &e))?;
        let der = SecretBytes(der);
        if matches!(
            kind,
            SectionKind::PrivateKey | SectionKind::EcPrivateKey | SectionKind::RsaPrivateKey
        ) {
            keys.push((kind, der));
        }
    }
    let (kind, der) = match keys.len() {
        0 => {
            return Err(PkiError::NoPemBlock {
                path: path.to_path_buf(),
                expected: "private key (PEM block \"PRIVATE KEY\", \"EC PRIVATE KEY\" or \"RSA PRIVATE KEY\")",
                found: describe_contents(&bytes.0, Expected::Key),
            });
        }
        1 => keys.remove(0),
        count => {
            return Err(PkiError::MultipleKeys {
                path: path.to_path_buf(),
                count,
            });
        }
    };

    let (kind, pkcs8) = match kind {
        SectionKind::PrivateKey => {
            let kind = check_pkcs8(&der.0).map_err(|p| p.into_error(path))?;
            (kind, der)
        }
        SectionKind::EcPrivateKey => sec1_to_pkcs8(&der.0).map_err(|p| p.into_error(path))?,
        // Only RsaPrivateKey is left (filtered above).
        _ => keys::pkcs1_to_pkcs8(&der.0).map_err(|p| p.into_error(path))?,
    };
    keys::usable_key(path, kind, pkcs8)
}

/// Whether `cert`'s public key is the public half of `key`, i.e. whether the
/// pair can be served together. `Ok(false)` for a different key (including a
/// certificate for another algorithm).
pub fn public_key_matches(cert: &CertificateDer<'_>, key: &PrivateKey) -> Result<bool, PkiError> {
    let parsed = parse_cert(cert).map_err(PkiError::InvalidCertificate)?;
    let pair = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(key.pkcs8_der()),
        keys::rcgen_algorithm(key.kind()),
    )
    .map_err(|e| PkiError::KeyRejected(e.to_string()))?;
    let cert_key: &[u8] = &parsed.public_key().subject_public_key.data;
    Ok(cert_key == pair.public_key_raw())
}

fn pem_syntax(path: &Path, err: &pem::Error) -> PkiError {
    // pki-types' Display prints byte vectors as `[45, 45, ...]`; say it in text.
    let detail = match err {
        pem::Error::MissingSectionEnd { end_marker } => format!(
            "block \"{}\" has no END line",
            String::from_utf8_lossy(end_marker)
        ),
        pem::Error::IllegalSectionStart { line } => format!(
            "bad BEGIN line {:?}",
            String::from_utf8_lossy(line)
                .chars()
                .take(80)
                .collect::<String>()
        ),
        pem::Error::Base64Decode(_) => "invalid base64 inside a PEM block".to_string(),
        other => other.to_string(),
    };
    PkiError::PemSyntax {
        path: path.to_path_buf(),
        detail,
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Expected {
    Certificate,
    Key,
}

/// Explains what a file holds when it lacks what we wanted, with a hint for
/// the usual mix-ups (key and certificate swapped, DER instead of PEM).
fn describe_contents(bytes: &[u8], expected: Expected) -> String {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return "the file is empty".into();
    }
    let labels = pem_labels(bytes);
    if labels.is_empty() {
        let der_hint = if bytes.first() == Some(&0x30) {
            " (it may be DER; convert it to PEM, e.g. with `openssl x509 -inform DER` or `openssl pkey -inform DER`)"
        } else {
            ""
        };
        return format!("the file contains no PEM block at all{der_hint}");
    }
    let list = labels
        .iter()
        .map(|l| format!("\"{l}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match expected {
        Expected::Key if labels.iter().any(|l| l == "CERTIFICATE") => {
            " (is this the certificate rather than its key?)"
        }
        Expected::Certificate if labels.iter().any(|l| l.ends_with("PRIVATE KEY")) => {
            " (is this the private key rather than the certificate?)"
        }
        _ => "",
    };
    format!("the file holds only {list}{hint}")
}

/// Labels of all `-----BEGIN X-----` lines, deduplicated, sanitised for
/// printing (a hostile file must not inject control characters into logs).
fn pem_labels(bytes: &[u8]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        let Some(rest) = line.strip_prefix(b"-----BEGIN ") else {
            continue;
        };
        let Some(label) = rest.strip_suffix(b"-----") else {
            continue;
        };
        let label: String = label
            .iter()
            .take(64)
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect();
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    labels
}

fn is_encrypted_pem(bytes: &[u8]) -> bool {
    pem_labels(bytes)
        .iter()
        .any(|l| l == "ENCRYPTED PRIVATE KEY")
        || bytes
            .windows(b"Proc-Type: 4,ENCRYPTED".len())
            .any(|w| w == b"Proc-Type: 4,ENCRYPTED")
}

// ---------------------------------------------------------------------------
// Key structure checks (PKCS#8, SEC1)
// ---------------------------------------------------------------------------

/// Why a key was refused, before we know the file name.
#[derive(Debug, PartialEq, Eq)]
enum KeyProblem {
    Unsupported(String),
    Malformed(String),
    NoPublicKey,
}

impl KeyProblem {
    fn into_error(self, path: &Path) -> PkiError {
        let path = path.to_path_buf();
        match self {
            KeyProblem::Unsupported(what) => PkiError::UnsupportedKey { path, what },
            KeyProblem::Malformed(detail) => PkiError::MalformedKey { path, detail },
            KeyProblem::NoPublicKey => PkiError::KeyWithoutPublicKey { path },
        }
    }
}

impl From<der::DerError> for KeyProblem {
    fn from(e: der::DerError) -> Self {
        KeyProblem::Malformed(format!("bad DER: {}", e.0))
    }
}

mod oid {
    // DER contents (no tag/length) of the object identifiers we recognise.
    pub const EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
    pub const PRIME256V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    pub const PRIME192V1: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x01];
    pub const SECP384R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x22];
    pub const SECP521R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x23];
    pub const SECP256K1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x0a];
    pub const SECP224R1: &[u8] = &[0x2b, 0x81, 0x04, 0x00, 0x21];
    pub const BRAINPOOL_P256R1: &[u8] = &[0x2b, 0x24, 0x03, 0x03, 0x02, 0x08, 0x01, 0x01, 0x07];
    pub const RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
    pub const RSASSA_PSS: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0a];
    pub const DSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x38, 0x04, 0x01];
    pub const X25519: &[u8] = &[0x2b, 0x65, 0x6e];
    pub const X448: &[u8] = &[0x2b, 0x65, 0x6f];
    pub const ED25519: &[u8] = &[0x2b, 0x65, 0x70];
    pub const ED448: &[u8] = &[0x2b, 0x65, 0x71];
}

fn curve_name(curve: &[u8]) -> String {
    match curve {
        oid::PRIME256V1 => "prime256v1 (P-256)".into(),
        oid::SECP384R1 => "secp384r1 (P-384)".into(),
        oid::SECP521R1 => "secp521r1 (P-521)".into(),
        oid::SECP256K1 => "secp256k1".into(),
        oid::SECP224R1 => "secp224r1 (P-224)".into(),
        oid::PRIME192V1 => "prime192v1 (P-192)".into(),
        oid::BRAINPOOL_P256R1 => "brainpoolP256r1".into(),
        other => der::oid_to_string(other),
    }
}

/// Checks an EC curve given as the TLV of ECParameters (named curve OID,
/// explicit parameters, or implicitCA NULL).
fn check_curve_tlv(tag: u8, contents: &[u8]) -> Result<KeyKind, KeyProblem> {
    match tag {
        der::OID if contents == oid::PRIME256V1 => Ok(KeyKind::EcdsaP256),
        der::OID if contents == oid::SECP384R1 => Ok(KeyKind::EcdsaP384),
        der::OID => Err(KeyProblem::Unsupported(format!(
            "EC keys on curve {}",
            curve_name(contents)
        ))),
        der::SEQUENCE => Err(KeyProblem::Unsupported(
            "EC keys with explicit curve parameters (openssl -param_enc explicit) instead of the named curve prime256v1 or secp384r1"
                .into(),
        )),
        _ => Err(KeyProblem::Malformed(
            "EC curve parameters are neither a named curve nor explicit parameters".into(),
        )),
    }
}

/// What a SEC1 `ECPrivateKey` says about itself.
struct Sec1Info<'a> {
    /// The [0] parameters as (tag, contents), if present.
    curve: Option<(u8, &'a [u8])>,
    has_public_key: bool,
}

/// ECPrivateKey ::= SEQUENCE { version INTEGER 1, privateKey OCTET STRING,
///   parameters [0] ECParameters OPTIONAL, publicKey [1] BIT STRING OPTIONAL }
fn parse_sec1(input: &[u8]) -> Result<Sec1Info<'_>, KeyProblem> {
    let mut outer = der::Reader::new(input);
    let seq = outer.expect(der::SEQUENCE, "ECPrivateKey SEQUENCE")?;
    if !outer.is_empty() {
        return Err(KeyProblem::Malformed(
            "trailing data after ECPrivateKey".into(),
        ));
    }
    let mut r = der::Reader::new(seq);
    let version = r.expect(der::INTEGER, "ECPrivateKey version")?;
    if version != [1] {
        return Err(KeyProblem::Malformed(
            "ECPrivateKey version is not 1".into(),
        ));
    }
    let scalar = r.expect(der::OCTET_STRING, "ECPrivateKey privateKey")?;
    if scalar.is_empty() {
        return Err(KeyProblem::Malformed("empty EC private scalar".into()));
    }
    let mut info = Sec1Info {
        curve: None,
        has_public_key: false,
    };
    if r.peek_tag() == Some(der::CONTEXT_0) {
        let params = r.expect(der::CONTEXT_0, "ECPrivateKey parameters")?;
        let mut p = der::Reader::new(params);
        let (tag, contents) = p.read_any()?;
        if !p.is_empty() {
            return Err(KeyProblem::Malformed(
                "trailing data in ECPrivateKey parameters".into(),
            ));
        }
        info.curve = Some((tag, contents));
    }
    if r.peek_tag() == Some(der::CONTEXT_1) {
        let public = r.expect(der::CONTEXT_1, "ECPrivateKey publicKey")?;
        let bits = der::Reader::new(public).expect(der::BIT_STRING, "publicKey BIT STRING")?;
        // First byte is the unused-bit count; an empty point is no key.
        info.has_public_key = bits.len() > 1;
    }
    if !r.is_empty() {
        return Err(KeyProblem::Malformed(
            "unexpected data after ECPrivateKey fields".into(),
        ));
    }
    Ok(info)
}

/// Checks a PKCS#8 PrivateKeyInfo is ecPublicKey on prime256v1 or secp384r1
/// with an embedded public key, or rsaEncryption of 2048-4096 bits, naming the
/// key type when it is something else.
fn check_pkcs8(input: &[u8]) -> Result<KeyKind, KeyProblem> {
    let mut outer = der::Reader::new(input);
    let seq = outer.expect(der::SEQUENCE, "PrivateKeyInfo SEQUENCE")?;
    if !outer.is_empty() {
        return Err(KeyProblem::Malformed(
            "trailing data after PrivateKeyInfo".into(),
        ));
    }
    let mut r = der::Reader::new(seq);
    let version = r.expect(der::INTEGER, "PrivateKeyInfo version")?;
    if version != [0] && version != [1] {
        return Err(KeyProblem::Malformed(
            "PrivateKeyInfo version is neither 0 nor 1".into(),
        ));
    }
    let alg = r.expect(der::SEQUENCE, "AlgorithmIdentifier")?;
    let mut a = der::Reader::new(alg);
    let alg_oid = a.expect(der::OID, "algorithm OID")?;
    let params = if a.is_empty() {
        None
    } else {
        Some(a.read_any()?)
    };
    match alg_oid {
        oid::EC_PUBLIC_KEY => {}
        oid::RSA_ENCRYPTION => {
            let pkcs1 = r.expect(der::OCTET_STRING, "PrivateKeyInfo privateKey")?;
            return keys::rsa_kind(pkcs1);
        }
        oid::RSASSA_PSS => {
            return Err(KeyProblem::Unsupported(
                "RSASSA-PSS keys (rsassaPss; use an rsaEncryption RSA key)".into(),
            ));
        }
        oid::ED25519 => return Err(KeyProblem::Unsupported("Ed25519 keys".into())),
        oid::ED448 => return Err(KeyProblem::Unsupported("Ed448 keys".into())),
        oid::X25519 => return Err(KeyProblem::Unsupported("X25519 keys".into())),
        oid::X448 => return Err(KeyProblem::Unsupported("X448 keys".into())),
        oid::DSA => return Err(KeyProblem::Unsupported("DSA keys".into())),
        other => {
            return Err(KeyProblem::Unsupported(format!(
                "keys of algorithm {}",
                der::oid_to_string(other)
            )));
        }
    }
    let private_key = r.expect(der::OCTET_STRING, "PrivateKeyInfo privateKey")?;
    let sec1 = parse_sec1(private_key)?;
    // The curve normally sits in the AlgorithmIdentifier; the inner [0] is
    // optional there but, if present, must agree.
    let kind = match (params, sec1.curve) {
        (Some((tag, c)), inner) => {
            let kind = check_curve_tlv(tag, c)?;
            if let Some((itag, ic)) = inner {
                if (itag, ic) != (tag, c) {
                    return Err(KeyProblem::Malformed(
                        "curve in AlgorithmIdentifier and in ECPrivateKey disagree".into(),
                    ));
                }
            }
            kind
        }
        (None, Some((tag, c))) => {
            check_curve_tlv(tag, c)?;
            return Err(KeyProblem::Malformed(
                "PKCS#8 AlgorithmIdentifier lacks the curve OID".into(),
            ));
        }
        (None, None) => {
            return Err(KeyProblem::Malformed(
                "the key does not name its curve".into(),
            ));
        }
    };
    if !sec1.has_public_key {
        return Err(KeyProblem::NoPublicKey);
    }
    Ok(kind)
}

/// Wraps a SEC1 ECPrivateKey into PKCS#8 PrivateKeyInfo:
/// SEQUENCE { INTEGER 0, SEQUENCE { ecPublicKey, namedCurve }, OCTET STRING sec1 }.
fn sec1_to_pkcs8(sec1: &[u8]) -> Result<(KeyKind, SecretBytes), KeyProblem> {
    let info = parse_sec1(sec1)?;
    let (kind, curve) = match info.curve {
        Some((tag, c)) => (check_curve_tlv(tag, c)?, c),
        None => {
            return Err(KeyProblem::Malformed(
                "the EC PRIVATE KEY does not name its curve (no [0] parameters)".into(),
            ));
        }
    };
    if !info.has_public_key {
        return Err(KeyProblem::NoPublicKey);
    }

    let alg_len = der::tlv_len(oid::EC_PUBLIC_KEY.len()) + der::tlv_len(curve.len());
    let body_len = der::tlv_len(1) + der::tlv_len(alg_len) + der::tlv_len(sec1.len());
    // Exact capacities: no reallocation leaves a stray copy of the key behind.
    let mut body = SecretBytes(Vec::with_capacity(body_len));
    der::push_tlv(&mut body.0, der::INTEGER, &[0])?;
    der::push_header(&mut body.0, der::SEQUENCE, alg_len)?;
    der::push_tlv(&mut body.0, der::OID, oid::EC_PUBLIC_KEY)?;
    der::push_tlv(&mut body.0, der::OID, curve)?;
    der::push_tlv(&mut body.0, der::OCTET_STRING, sec1)?;
    let mut out = SecretBytes(Vec::with_capacity(der::tlv_len(body.0.len())));
    der::push_tlv(&mut out.0, der::SEQUENCE, &body.0)?;
    Ok((kind, out))
}

/// A minimal DER reader/writer: single-byte tags, definite lengths of up to
/// two bytes (keys of interest are a few hundred bytes; RSA keys, which we
/// only need to *recognise*, stay below 64 KiB). Every access is bounds
/// checked; garbage yields `DerError`, never a panic.
mod der {
    pub const INTEGER: u8 = 0x02;
    pub const BIT_STRING: u8 = 0x03;
    pub const OCTET_STRING: u8 = 0x04;
    pub const NULL: u8 = 0x05;
    pub const OID: u8 = 0x06;
    pub const SEQUENCE: u8 = 0x30;
    pub const CONTEXT_0: u8 = 0xa0;
    pub const CONTEXT_1: u8 = 0xa1;

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct DerError(pub String);

    pub struct Reader<'a> {
        rest: &'a [u8],
    }

    impl<'a> Reader<'a> {
        pub fn new(input: &'a [u8]) -> Self {
            Reader { rest: input }
        }

        pub fn is_empty(&self) -> bool {
            self.rest.is_empty()
        }

        pub fn peek_tag(&self) -> Option<u8> {
            self.rest.first().copied()
        }

        /// Next element as (tag, contents).
        pub fn read_any(&mut self) -> Result<(u8, &'a [u8]), DerError> {
            let err = |m: &str| DerError(m.to_string());
            let (&tag, rest) = self.rest.split_first().ok_or_else(|| err("truncated"))?;
            if tag & 0x1f == 0x1f {
                return Err(err("multi-byte tags are not supported"));
            }
            let (&first, rest) = rest.split_first().ok_or_else(|| err("truncated"))?;
            let (len, rest) = match first {
                0x00..=0x7f => (usize::from(first), rest),
                0x81 => match rest {
                    [b, rest @ ..] if *b >= 0x80 => (usize::from(*b), rest),
                    [_, ..] => return Err(err("non-minimal length")),
                    [] => return Err(err("truncated")),
                },
                0x82 => match rest {
                    [hi, lo, rest @ ..] if *hi != 0 => {
                        (usize::from(*hi) << 8 | usize::from(*lo), rest)
                    }
                    [_, _, ..] => return Err(err("non-minimal length")),
                    _ => return Err(err("truncated")),
                },
                0x80 => return Err(err("indefinite length (BER, not DER)")),
                _ => return Err(err("element longer than 64 KiB")),
            };
            if rest.len() < len {
                return Err(err("truncated"));
            }
            let (contents, rest) = rest.split_at(len);
            self.rest = rest;
            Ok((tag, contents))
        }

        /// Next element, which must have `tag`; `what` names it in errors.
        pub fn expect(&mut self, tag: u8, what: &str) -> Result<&'a [u8], DerError> {
            let (got, contents) = self
                .read_any()
                .map_err(|e| DerError(format!("{what}: {}", e.0)))?;
            if got != tag {
                return Err(DerError(format!(
                    "{what}: expected tag 0x{tag:02x}, found 0x{got:02x}"
                )));
            }
            Ok(contents)
        }
    }

    /// Bytes taken by a TLV whose contents are `len` bytes long.
    pub fn tlv_len(len: usize) -> usize {
        let header = match len {
            0..=0x7f => 2,
            0x80..=0xff => 3,
            _ => 4,
        };
        header + len
    }

    pub fn push_header(out: &mut Vec<u8>, tag: u8, len: usize) -> Result<(), DerError> {
        out.push(tag);
        match len {
            0..=0x7f => out.push(len as u8),
            0x80..=0xff => out.extend_from_slice(&[0x81, len as u8]),
            0x100..=0xffff => out.extend_from_slice(&[0x82, (len >> 8) as u8, len as u8]),
            _ => return Err(DerError("element longer than 64 KiB".into())),
        }
        Ok(())
    }

    pub fn push_tlv(out: &mut Vec<u8>, tag: u8, contents: &[u8]) -> Result<(), DerError> {
        push_header(out, tag, contents.len())?;
        out.extend_from_slice(contents);
        Ok(())
    }

    /// Dotted form of an OID's DER contents, for messages about unknown
    /// algorithms or curves. Falls back to hex if the encoding is odd.
    pub fn oid_to_string(contents: &[u8]) -> String {
        let mut arcs: Vec<u64> = Vec::new();
        let mut acc: u64 = 0;
        let mut in_arc = false;
        for &b in contents {
            acc = match acc.checked_mul(128) {
                Some(v) => v | u64::from(b & 0x7f),
                None => return hex(contents),
            };
            in_arc = b & 0x80 != 0;
            if !in_arc {
                arcs.push(acc);
                acc = 0;
            }
        }
        let Some((&first, rest)) = arcs.split_first() else {
            return hex(contents);
        };
        if in_arc {
            return hex(contents);
        }
        let (a, b) = match first {
            0..=39 => (0, first),
            40..=79 => (1, first - 40),
            _ => (2, first - 80),
        };
        let mut s = format!("{a}.{b}");
        for arc in rest {
            s.push('.');
            s.push_str(&arc.to_string());
        }
        s
    }

    fn hex(bytes: &[u8]) -> String {
        let digits: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        format!("OID 0x{digits}")
    }
}

// ---------------------------------------------------------------------------
// Summaries
// ---------------------------------------------------------------------------

pub use ntp_dtls_proto::x509::CertSummary;
use ntp_dtls_proto::x509::parse_cert;

/// The fields of a certificate an operator looks at.
pub fn summarize(cert_der: &[u8]) -> Result<CertSummary, PkiError> {
    ntp_dtls_proto::x509::summarize(cert_der).map_err(PkiError::InvalidCertificate)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ECDSA_P256_SHA256;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use std::process::Command;
    use std::sync::atomic::{AtomicU32, Ordering};
    use x509_parser::prelude::FromDer;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            static COUNTER: AtomicU32 = AtomicU32::new(0);
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let path = std::env::temp_dir().join(format!(
                "ntp-dtls-pki-{tag}-{}-{}-{nanos}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }

        fn join(&self, name: &str) -> PathBuf {
            self.0.join(name)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn request(out_dir: PathBuf) -> LabPkiRequest {
        LabPkiRequest {
            out_dir,
            server_names: vec![
                "ntp.example.test".into(),
                "192.0.2.10".into(),
                "2001:db8::10".into(),
            ],
            client_names: vec![],
            days: 30,
            force: false,
            key_type: KeyType::EcdsaP256,
        }
    }

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn now_unix() -> i64 {
        i64::try_from(
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap()
    }

    /// Runs openssl in `dir`. Missing openssl is a test failure, never a
    /// silent pass: these tests are the only check against a real
    /// implementation.
    fn openssl(dir: &Path, args: &[&str]) -> std::process::Output {
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "these tests need the `openssl` binary on PATH (apt-get install openssl): {e}"
                )
            })
    }

    fn openssl_ok(dir: &Path, args: &[&str]) -> String {
        let out = openssl(dir, args);
        assert!(
            out.status.success(),
            "openssl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn b64(data: &[u8]) -> String {
        const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b1 = chunk.get(1).copied().unwrap_or(0);
            let b2 = chunk.get(2).copied().unwrap_or(0);
            let n = u32::from(chunk[0]) << 16 | u32::from(b1) << 8 | u32::from(b2);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn pem_block(label: &str, der: &[u8]) -> String {
        let body = b64(der);
        let lines: Vec<&str> = body
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn cert_der(path: &Path) -> CertificateDer<'static> {
        let mut certs = load_certificates(path).unwrap();
        assert_eq!(certs.len(), 1, "{}", path.display());
        certs.remove(0)
    }

    const SUITE_MSG: &str =
        "are not supported: ntp-dtls uses ECDSA P-256, ECDSA P-384 or RSA 2048-4096 bit keys";

    // ---- generation ------------------------------------------------------

    #[test]
    fn generate_then_load_everything_back() {
        let tmp = TempDir::new("roundtrip");
        let req = request(tmp.join("pki"));
        let written = generate_lab_pki(&req).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key.pem",
                "server.pem",
                "server.key.pem",
                "client.pem",
                "client.key.pem"
            ]
        );
        for p in &written {
            assert_eq!(p.parent().unwrap(), req.out_dir);
        }

        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            let path = req.out_dir.join(key);
            assert_eq!(mode(&path), 0o600, "{key}");
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
            let loaded = load_private_key(&path).unwrap();
            // What we wrote is exactly what rcgen serialised: PKCS#8 P-256.
            let pair = KeyPair::try_from(loaded.pkcs8_der()).unwrap();
            assert!(pair.is_compatible(&PKCS_ECDSA_P256_SHA256));
        }
        for cert in ["ca.pem", "server.pem", "client.pem"] {
            let m = mode(&req.out_dir.join(cert));
            assert_eq!(m & !0o644, 0, "{cert} mode {m:o}");
            assert_eq!(m & 0o600, 0o600, "{cert} mode {m:o}");
        }

        let ca = cert_der(&req.out_dir.join("ca.pem"));
        let server = cert_der(&req.out_dir.join("server.pem"));
        let client = cert_der(&req.out_dir.join("client.pem"));
        assert_eq!(
            load_ca_roots(&req.out_dir.join("ca.pem")).unwrap(),
            std::slice::from_ref(&ca)
        );

        let ca_key = load_private_key(&req.out_dir.join("ca.key.pem")).unwrap();
        let server_key = load_private_key(&req.out_dir.join("server.key.pem")).unwrap();
        let client_key = load_private_key(&req.out_dir.join("client.key.pem")).unwrap();
        assert!(public_key_matches(&server, &server_key).unwrap());
        assert!(public_key_matches(&client, &client_key).unwrap());
        assert!(public_key_matches(&ca, &ca_key).unwrap());
        assert!(!public_key_matches(&server, &client_key).unwrap());
        assert!(!public_key_matches(&server, &ca_key).unwrap());
        assert!(!public_key_matches(&client, &server_key).unwrap());

        let now = now_unix();
        let ca_sum = summarize(&ca).unwrap();
        assert!(
            ca_sum.subject.starts_with("CN=ntp-dtls lab CA ")
                && ca_sum.subject.ends_with(", O=ntp-dtls lab"),
            "{}",
            ca_sum.subject
        );
        assert_eq!(ca_sum.issuer, ca_sum.subject);
        assert!(ca_sum.dns_names.is_empty() && ca_sum.ip_addresses.is_empty());

        let s = summarize(&server).unwrap();
        assert_eq!(s.subject, "CN=ntp.example.test");
        assert_eq!(s.issuer, ca_sum.subject);
        assert_eq!(s.dns_names, ["ntp.example.test"]);
        assert_eq!(
            s.ip_addresses,
            [
                "192.0.2.10".parse::<IpAddr>().unwrap(),
                "2001:db8::10".parse::<IpAddr>().unwrap()
            ]
        );
        assert!((s.not_before_unix - (now - 3600)).abs() <= 60, "{s:?}");
        assert!(
            (s.not_after_unix - (now + 30 * 86_400)).abs() <= 60,
            "{s:?}"
        );
        assert!(!s.serial_hex.is_empty());
        assert!(s.serial_hex.chars().all(|c| c.is_ascii_hexdigit()));

        let c = summarize(&client).unwrap();
        assert_eq!(c.subject, "CN=ntp-dtls-client");
        assert_eq!(c.dns_names, [DEFAULT_CLIENT_NAME]);
        assert!(c.ip_addresses.is_empty());
        assert_ne!(c.serial_hex, s.serial_hex);
    }

    #[test]
    fn generated_extensions_are_as_specified() {
        let tmp = TempDir::new("ext");
        let mut req = request(tmp.join("pki"));
        req.client_names = vec!["client-a.example.test".into(), "198.51.100.7".into()];
        generate_lab_pki(&req).unwrap();

        let ca = cert_der(&req.out_dir.join("ca.pem"));
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        let bc = ca.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca, "CA must carry CA:TRUE");
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(!ku.digital_signature());

        for (file, server_auth) in [("server.pem", true), ("client.pem", false)] {
            let der = cert_der(&req.out_dir.join(file));
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(!bc.value.ca, "{file} must not be a CA");
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert_eq!(eku.server_auth, server_auth, "{file}");
            assert_eq!(eku.client_auth, !server_auth, "{file}");
            assert!(!eku.any && eku.other.is_empty(), "{file}");
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.digital_signature() && !ku.key_cert_sign(), "{file}");
            assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        }

        let client = summarize(&cert_der(&req.out_dir.join("client.pem"))).unwrap();
        assert_eq!(client.subject, "CN=client-a.example.test");
        assert_eq!(client.dns_names, ["client-a.example.test"]);
        assert_eq!(
            client.ip_addresses,
            ["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn openssl_accepts_the_generated_pki() {
        let tmp = TempDir::new("verify");
        let req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let dir = &req.out_dir;
        let out = openssl_ok(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslserver",
                "server.pem",
            ],
        );
        assert!(out.contains("server.pem: OK"), "{out}");
        let out = openssl_ok(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslclient",
                "client.pem",
            ],
        );
        assert!(out.contains("client.pem: OK"), "{out}");
        // The EKUs really restrict: a client cert is no server cert.
        let wrong = openssl(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslserver",
                "client.pem",
            ],
        );
        assert!(!wrong.status.success());
        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            openssl_ok(dir, &["pkey", "-in", key, "-noout", "-check"]);
        }
        // serial_hex matches what operators see from openssl.
        let serial = openssl_ok(dir, &["x509", "-in", "server.pem", "-noout", "-serial"]);
        let summary = summarize(&cert_der(&dir.join("server.pem"))).unwrap();
        assert_eq!(serial.trim(), format!("serial={}", summary.serial_hex));
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing() {
        let tmp = TempDir::new("noclobber");
        let req = request(tmp.join("pki"));
        fs::create_dir_all(&req.out_dir).unwrap();
        fs::write(req.out_dir.join("client.key.pem"), "keep me").unwrap();
        fs::write(req.out_dir.join("server.pem"), "keep me too").unwrap();

        let err = generate_lab_pki(&req).unwrap_err();
        match &err {
            PkiError::AlreadyExists { path } => {
                assert_eq!(path, &req.out_dir.join("server.pem"), "first existing file");
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("server.pem") && msg.contains("--force"),
            "{msg}"
        );

        let mut entries: Vec<_> = fs::read_dir(&req.out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, ["client.key.pem", "server.pem"]);
        assert_eq!(
            fs::read_to_string(req.out_dir.join("client.key.pem")).unwrap(),
            "keep me"
        );
        assert_eq!(
            fs::read_to_string(req.out_dir.join("server.pem")).unwrap(),
            "keep me too"
        );
    }

    #[test]
    fn dangling_symlink_counts_as_existing() {
        let tmp = TempDir::new("symlink");
        let req = request(tmp.join("pki"));
        fs::create_dir_all(&req.out_dir).unwrap();
        symlink(tmp.join("nowhere"), req.out_dir.join("ca.key.pem")).unwrap();
        let err = generate_lab_pki(&req).unwrap_err();
        assert!(
            matches!(&err, PkiError::AlreadyExists { path } if path.ends_with("ca.key.pem")),
            "{err:?}"
        );
        assert!(
            !tmp.join("nowhere").exists(),
            "must not write through the link"
        );
    }

    #[test]
    fn force_overwrites_with_fresh_files_and_tight_modes() {
        let tmp = TempDir::new("force");
        let mut req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let old_ca = fs::read(req.out_dir.join("ca.pem")).unwrap();
        let old_key = fs::read(req.out_dir.join("server.key.pem")).unwrap();
        // Someone loosened a key file; a forced run must not inherit that.
        fs::set_permissions(
            req.out_dir.join("server.key.pem"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();

        assert!(matches!(
            generate_lab_pki(&req),
            Err(PkiError::AlreadyExists { .. })
        ));
        req.force = true;
        let written = generate_lab_pki(&req).unwrap();
        assert_eq!(written.len(), 6);
        assert_ne!(fs::read(req.out_dir.join("ca.pem")).unwrap(), old_ca);
        assert_ne!(
            fs::read(req.out_dir.join("server.key.pem")).unwrap(),
            old_key
        );
        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            assert_eq!(mode(&req.out_dir.join(key)), 0o600, "{key}");
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&req.out_dir).unwrap().count(), 6);
        // And the new set is consistent.
        let server = cert_der(&req.out_dir.join("server.pem"));
        let key = load_private_key(&req.out_dir.join("server.key.pem")).unwrap();
        assert!(public_key_matches(&server, &key).unwrap());
    }

    #[test]
    fn invalid_requests_are_refused_before_writing() {
        let tmp = TempDir::new("invalid");
        let base = request(tmp.join("pki"));

        let mut r = base.clone();
        r.server_names.clear();
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.days = 0;
        let err = generate_lab_pki(&r).unwrap_err();
        assert!(err.to_string().contains("days"), "{err}");

        let mut r = base.clone();
        r.days = MAX_VALIDITY_DAYS + 1;
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.days = u32::MAX;
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.server_names.push("ntp.exämple.test".into());
        let err = generate_lab_pki(&r).unwrap_err();
        assert!(err.to_string().contains("ntp.exämple.test"), "{err}");

        let mut r = base.clone();
        r.client_names = vec![String::new()];
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        assert!(!base.out_dir.exists(), "nothing may be written");

        // The longest allowed validity works (no overflow in time arithmetic).
        let mut r = base.clone();
        r.days = MAX_VALIDITY_DAYS;
        generate_lab_pki(&r).unwrap();
    }

    #[test]
    fn out_dir_that_is_a_file_is_a_clear_error() {
        let tmp = TempDir::new("outfile");
        fs::write(tmp.join("pki"), "").unwrap();
        let err = generate_lab_pki(&request(tmp.join("pki"))).unwrap_err();
        assert!(matches!(err, PkiError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("pki"), "{err}");
    }

    // ---- loading keys from OpenSSL ----------------------------------------

    #[test]
    fn sec1_p256_key_is_converted_to_pkcs8() {
        let tmp = TempDir::new("sec1");
        let dir = &tmp.0;
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k.pem",
            ],
        );
        assert!(
            fs::read_to_string(tmp.join("k.pem"))
                .unwrap()
                .starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        let key = load_private_key(&tmp.join("k.pem")).unwrap();
        let pair = KeyPair::try_from(key.pkcs8_der()).unwrap();
        assert!(pair.is_compatible(&PKCS_ECDSA_P256_SHA256));
        assert_eq!(check_pkcs8(key.pkcs8_der()), Ok(KeyKind::EcdsaP256));

        // Same key via OpenSSL's own PKCS#8 conversion: same public key.
        openssl_ok(
            dir,
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "k.pem", "-out", "k8.pem",
            ],
        );
        let via_openssl = load_private_key(&tmp.join("k8.pem")).unwrap();
        let pair2 = KeyPair::try_from(via_openssl.pkcs8_der()).unwrap();
        assert_eq!(pair.public_key_raw(), pair2.public_key_raw());

        // OpenSSL can read (and check) our conversion.
        fs::write(
            tmp.join("ours.pem"),
            pem_block("PRIVATE KEY", key.pkcs8_der()),
        )
        .unwrap();
        openssl_ok(dir, &["pkey", "-in", "ours.pem", "-noout", "-check"]);
        let ours_pub = openssl_ok(dir, &["pkey", "-in", "ours.pem", "-pubout"]);
        let theirs_pub = openssl_ok(dir, &["pkey", "-in", "k.pem", "-pubout"]);
        assert_eq!(ours_pub, theirs_pub);

        // `openssl ecparam -genkey` without -noout prepends an
        // "EC PARAMETERS" block; it must be skipped, not refused.
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-out",
                "kp.pem",
            ],
        );
        assert!(
            fs::read_to_string(tmp.join("kp.pem"))
                .unwrap()
                .contains("EC PARAMETERS")
        );
        load_private_key(&tmp.join("kp.pem")).unwrap();

        // `openssl genpkey` P-256 (PKCS#8 straight away).
        openssl_ok(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-out",
                "g.pem",
            ],
        );
        load_private_key(&tmp.join("g.pem")).unwrap();
    }

    #[test]
    fn key_and_cert_in_one_file_and_cert_matching() {
        let tmp = TempDir::new("combined");
        let dir = &tmp.0;
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k.pem",
            ],
        );
        openssl_ok(
            dir,
            &[
                "req",
                "-new",
                "-x509",
                "-key",
                "k.pem",
                "-subj",
                "/CN=openssl-self",
                "-days",
                "2",
                "-out",
                "c.pem",
            ],
        );
        let combined = format!(
            "{}{}",
            fs::read_to_string(tmp.join("c.pem")).unwrap(),
            fs::read_to_string(tmp.join("k.pem")).unwrap()
        );
        fs::write(tmp.join("both.pem"), combined).unwrap();
        let key = load_private_key(&tmp.join("both.pem")).unwrap();
        let cert = cert_der(&tmp.join("both.pem"));
        assert!(public_key_matches(&cert, &key).unwrap());
        // A self-signed openssl certificate (CA:TRUE by default) is a root.
        load_ca_roots(&tmp.join("c.pem")).unwrap();
    }

    fn assert_unsupported(path: &Path, what: &str) {
        let err = load_private_key(path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, PkiError::UnsupportedKey { .. }), "{err:?}");
        assert!(
            msg.starts_with(&format!("{}: ", path.display())),
            "message must start with the path: {msg}"
        );
        assert!(msg.contains(what), "{msg}");
        assert!(msg.contains(SUITE_MSG), "{msg}");
    }

    #[test]
    fn p384_and_rsa_keys_load_in_every_pem_form() {
        let tmp = TempDir::new("p384-rsa");
        let dir = &tmp.0;
        // P-384: SEC1 ("EC PRIVATE KEY") and PKCS#8.
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "secp384r1",
                "-genkey",
                "-noout",
                "-out",
                "p384.pem",
            ],
        );
        openssl_ok(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                "p384.pem",
                "-out",
                "p384-8.pem",
            ],
        );
        openssl_ok(
            dir,
            &[
                "req", "-x509", "-key", "p384.pem", "-subj", "/CN=p384", "-out", "p384.crt",
            ],
        );
        for f in ["p384.pem", "p384-8.pem"] {
            let key = load_private_key(&tmp.join(f)).unwrap();
            assert_eq!(key.kind(), KeyKind::EcdsaP384, "{f}");
            assert!(public_key_matches(&cert_der(&tmp.join("p384.crt")), &key).unwrap());
        }
        // RSA: OpenSSL 3's genrsa writes PKCS#8 ("PRIVATE KEY" + rsaEncryption);
        // -traditional gives the PKCS#1 "RSA PRIVATE KEY" form.
        openssl_ok(dir, &["genrsa", "-out", "rsa.pem", "2048"]);
        openssl_ok(
            dir,
            &["rsa", "-traditional", "-in", "rsa.pem", "-out", "rsa1.pem"],
        );
        assert!(
            fs::read_to_string(tmp.join("rsa1.pem"))
                .unwrap()
                .starts_with("-----BEGIN RSA PRIVATE KEY-----")
        );
        openssl_ok(
            dir,
            &[
                "req", "-x509", "-key", "rsa.pem", "-subj", "/CN=rsa", "-out", "rsa.crt",
            ],
        );
        for f in ["rsa.pem", "rsa1.pem"] {
            let key = load_private_key(&tmp.join(f)).unwrap();
            assert_eq!(key.kind(), KeyKind::Rsa { bits: 2048 }, "{f}");
            assert!(public_key_matches(&cert_der(&tmp.join("rsa.crt")), &key).unwrap());
            // And the PKCS#8 the loader hands on is what ring signs with.
            KeyPair::from_pkcs8_der_and_sign_algo(
                &PrivatePkcs8KeyDer::from(key.pkcs8_der()),
                &rcgen::PKCS_RSA_SHA256,
            )
            .unwrap();
        }
        // A P-256 certificate does not match an RSA key.
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "p256.pem",
            ],
        );
        openssl_ok(
            dir,
            &[
                "req", "-x509", "-key", "p256.pem", "-subj", "/CN=p256", "-out", "p256.crt",
            ],
        );
        let rsa = load_private_key(&tmp.join("rsa.pem")).unwrap();
        assert!(!public_key_matches(&cert_der(&tmp.join("p256.crt")), &rsa).unwrap());
    }

    #[test]
    fn other_key_types_are_refused_with_a_clear_message() {
        let tmp = TempDir::new("refuse");
        let dir = &tmp.0;

        // RSA outside 2048-4096 bits, in both forms.
        openssl_ok(dir, &["genrsa", "-out", "rsa1024.pem", "1024"]);
        openssl_ok(
            dir,
            &[
                "rsa",
                "-traditional",
                "-in",
                "rsa1024.pem",
                "-out",
                "rsa1024-1.pem",
            ],
        );
        for f in ["rsa1024.pem", "rsa1024-1.pem"] {
            assert_unsupported(
                &tmp.join(f),
                "RSA keys of 1024 bits (the policy allows 2048 to 4096) are not supported",
            );
        }
        openssl_ok(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA-PSS",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                "pss.pem",
            ],
        );
        assert_unsupported(&tmp.join("pss.pem"), "RSASSA-PSS keys");

        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "secp256k1",
                "-genkey",
                "-noout",
                "-out",
                "k1.pem",
            ],
        );
        assert_unsupported(&tmp.join("k1.pem"), "secp256k1");

        openssl_ok(dir, &["genpkey", "-algorithm", "ed25519", "-out", "ed.pem"]);
        assert_unsupported(&tmp.join("ed.pem"), "Ed25519 keys");
        openssl_ok(dir, &["genpkey", "-algorithm", "X25519", "-out", "x.pem"]);
        assert_unsupported(&tmp.join("x.pem"), "X25519 keys");

        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-param_enc",
                "explicit",
                "-out",
                "explicit.pem",
            ],
        );
        assert_unsupported(&tmp.join("explicit.pem"), "explicit curve parameters");
    }

    #[test]
    fn encrypted_and_public_keyless_keys_are_refused() {
        let tmp = TempDir::new("enc");
        let dir = &tmp.0;
        openssl_ok(
            dir,
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                "k.pem",
            ],
        );

        openssl_ok(
            dir,
            &[
                "pkcs8",
                "-topk8",
                "-in",
                "k.pem",
                "-passout",
                "pass:secret",
                "-out",
                "enc.pem",
            ],
        );
        // Legacy OpenSSL encryption: "EC PRIVATE KEY" with Proc-Type headers.
        openssl_ok(
            dir,
            &[
                "ec",
                "-in",
                "k.pem",
                "-aes128",
                "-passout",
                "pass:secret",
                "-out",
                "legacy.pem",
            ],
        );
        for f in ["enc.pem", "legacy.pem"] {
            let path = tmp.join(f);
            let err = load_private_key(&path).unwrap_err();
            assert!(matches!(err, PkiError::EncryptedKey { .. }), "{f}: {err:?}");
            assert!(err.to_string().starts_with(&path.display().to_string()));
        }

        // ring needs the public key inside the key; -no_public drops it.
        openssl_ok(dir, &["ec", "-in", "k.pem", "-no_public", "-out", "np.pem"]);
        openssl_ok(
            dir,
            &[
                "pkcs8", "-topk8", "-nocrypt", "-in", "np.pem", "-out", "np8.pem",
            ],
        );
        for f in ["np.pem", "np8.pem"] {
            let err = load_private_key(&tmp.join(f)).unwrap_err();
            assert!(
                matches!(err, PkiError::KeyWithoutPublicKey { .. }),
                "{f}: {err:?}"
            );
        }
        // The remedy the message suggests works.
        openssl_ok(dir, &["ec", "-in", "np.pem", "-out", "fixed.key.pem"]);
        load_private_key(&tmp.join("fixed.key.pem")).unwrap();
    }

    // ---- bad files -------------------------------------------------------

    #[test]
    fn bad_files_give_clear_errors() {
        let tmp = TempDir::new("badfiles");
        let pki = request(tmp.join("pki"));
        generate_lab_pki(&pki).unwrap();
        let server_pem = pki.out_dir.join("server.pem");
        let server_key = pki.out_dir.join("server.key.pem");

        // Missing file: path and OS error.
        let missing = tmp.join("missing.pem");
        for err in [
            load_private_key(&missing).unwrap_err(),
            load_certificates(&missing).err().unwrap(),
            load_ca_roots(&missing).err().unwrap(),
        ] {
            let msg = err.to_string();
            assert!(matches!(err, PkiError::Read { .. }), "{err:?}");
            assert!(msg.contains("missing.pem"), "{msg}");
            assert!(msg.contains("No such file or directory"), "{msg}");
        }

        // Empty file.
        let empty = tmp.join("empty.pem");
        fs::write(&empty, "").unwrap();
        let msg = load_private_key(&empty).unwrap_err().to_string();
        assert!(msg.contains("empty.pem") && msg.contains("empty"), "{msg}");
        let msg = load_certificates(&empty).unwrap_err().to_string();
        assert!(msg.contains("empty.pem") && msg.contains("empty"), "{msg}");

        // Binary garbage.
        let garbage = tmp.join("garbage.pem");
        let bytes: Vec<u8> = (0u32..4096)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        fs::write(&garbage, &bytes).unwrap();
        for err in [
            load_private_key(&garbage).unwrap_err(),
            load_certificates(&garbage).err().unwrap(),
        ] {
            assert!(matches!(err, PkiError::NoPemBlock { .. }), "{err:?}");
            assert!(err.to_string().contains("garbage.pem"), "{err}");
        }

        // DER instead of PEM gets a hint.
        let der = tmp.join("cert.der");
        fs::write(&der, cert_der(&server_pem).as_ref()).unwrap();
        let msg = load_certificates(&der).unwrap_err().to_string();
        assert!(msg.contains("DER"), "{msg}");

        // Certificate passed as key, key passed as certificate.
        let msg = load_private_key(&server_pem).unwrap_err().to_string();
        assert!(msg.starts_with(&server_pem.display().to_string()), "{msg}");
        assert!(msg.contains("certificate rather than its key"), "{msg}");
        let msg = load_certificates(&server_key).unwrap_err().to_string();
        assert!(msg.starts_with(&server_key.display().to_string()), "{msg}");
        assert!(
            msg.contains("private key rather than the certificate"),
            "{msg}"
        );

        // A leaf is no trust root.
        let err = load_ca_roots(&server_pem).unwrap_err();
        assert!(matches!(err, PkiError::NotCa { index: 1, .. }), "{err:?}");
        assert!(err.to_string().contains("CN=ntp.example.test"), "{err}");

        // Broken PEM syntax.
        let cases: [(&str, String); 3] = [
            (
                "b64.pem",
                "-----BEGIN PRIVATE KEY-----\n@@@not base64@@@\n-----END PRIVATE KEY-----\n".into(),
            ),
            (
                "noend.pem",
                "-----BEGIN PRIVATE KEY-----\nMAMCAQA=\n".into(),
            ),
            (
                "badbegin.pem",
                "-----BEGIN PRIVATE KEY----\nMAMCAQA=\n-----END PRIVATE KEY-----\n".into(),
            ),
        ];
        for (name, text) in cases {
            let path = tmp.join(name);
            fs::write(&path, text).unwrap();
            let err = load_private_key(&path).unwrap_err();
            assert!(matches!(err, PkiError::PemSyntax { .. }), "{name}: {err:?}");
            assert!(err.to_string().contains(name), "{err}");
        }

        // Well-formed PEM, nonsense DER.
        let path = tmp.join("shortkey.pem");
        fs::write(
            &path,
            pem_block("PRIVATE KEY", &[0x30, 0x03, 0x02, 0x01, 0x00]),
        )
        .unwrap();
        let err = load_private_key(&path).unwrap_err();
        assert!(matches!(err, PkiError::MalformedKey { .. }), "{err:?}");
        let path = tmp.join("shortec.pem");
        fs::write(&path, pem_block("EC PRIVATE KEY", b"hello")).unwrap();
        let err = load_private_key(&path).unwrap_err();
        assert!(matches!(err, PkiError::MalformedKey { .. }), "{err:?}");
        let path = tmp.join("badcert.pem");
        let good = fs::read_to_string(&server_pem).unwrap();
        fs::write(
            &path,
            format!("{good}{}", pem_block("CERTIFICATE", b"nonsense")),
        )
        .unwrap();
        let err = load_certificates(&path).unwrap_err();
        assert!(
            matches!(err, PkiError::BadCertificate { index: 2, .. }),
            "{err:?}"
        );

        // Two keys in one file: ambiguous, refused.
        let two = tmp.join("two.pem");
        let k = fs::read_to_string(&server_key).unwrap();
        fs::write(&two, format!("{k}{k}")).unwrap();
        assert!(matches!(
            load_private_key(&two),
            Err(PkiError::MultipleKeys { count: 2, .. })
        ));
    }

    #[test]
    fn load_certificates_keeps_file_order_and_ca_roots_checks_each() {
        let tmp = TempDir::new("order");
        let req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let ca = fs::read_to_string(req.out_dir.join("ca.pem")).unwrap();
        let server = fs::read_to_string(req.out_dir.join("server.pem")).unwrap();
        let chain = tmp.join("chain.pem");
        fs::write(&chain, format!("{server}{ca}")).unwrap();
        let certs = load_certificates(&chain).unwrap();
        assert_eq!(certs.len(), 2);
        assert_eq!(certs[0], cert_der(&req.out_dir.join("server.pem")));
        assert_eq!(certs[1], cert_der(&req.out_dir.join("ca.pem")));
        assert!(matches!(
            load_ca_roots(&chain),
            Err(PkiError::NotCa { index: 1, .. })
        ));

        // A self-signed non-CA certificate (a pinned peer) is accepted.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["pinned.example.test".into()]).unwrap();
        params.is_ca = IsCa::ExplicitNoCa;
        let pinned = params.self_signed(&key).unwrap();
        let path = tmp.join("pinned.pem");
        fs::write(&path, pinned.pem()).unwrap();
        assert_eq!(load_ca_roots(&path).unwrap().len(), 1);
    }

    #[test]
    fn private_key_debug_hides_bytes() {
        let tmp = TempDir::new("debug");
        let req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let key = load_private_key(&req.out_dir.join("server.key.pem")).unwrap();
        assert_eq!(format!("{key:?}"), "PrivateKey(..)");
        assert_eq!(format!("{key:#?}"), "PrivateKey(..)");
    }

    // ---- DER helpers -----------------------------------------------------

    #[test]
    fn oid_names() {
        assert_eq!(der::oid_to_string(oid::PRIME256V1), "1.2.840.10045.3.1.7");
        assert_eq!(der::oid_to_string(oid::SECP384R1), "1.3.132.0.34");
        assert_eq!(der::oid_to_string(oid::ED25519), "1.3.101.112");
        assert_eq!(der::oid_to_string(&[0x88, 0x37]), "2.999");
        assert_eq!(der::oid_to_string(&[0x2a, 0x86]), "OID 0x2a86");
        assert_eq!(der::oid_to_string(&[]), "OID 0x");
        assert_eq!(curve_name(&[0x2b, 0x81, 0x04, 0x00, 0x27]), "1.3.132.0.39");
    }

    #[test]
    fn der_lengths_round_trip() {
        for len in [0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff] {
            let contents = vec![0xabu8; len];
            let mut out = Vec::new();
            der::push_tlv(&mut out, der::OCTET_STRING, &contents).unwrap();
            assert_eq!(out.len(), der::tlv_len(len));
            let mut r = der::Reader::new(&out);
            assert_eq!(r.expect(der::OCTET_STRING, "x").unwrap(), &contents[..]);
            assert!(r.is_empty());
        }
        let mut out = Vec::new();
        assert!(der::push_tlv(&mut out, der::OCTET_STRING, &vec![0; 0x10000]).is_err());
        // Non-minimal and indefinite lengths are not DER.
        for bad in [
            &[0x04, 0x81, 0x05][..],
            &[0x04, 0x82, 0x00, 0x05],
            &[0x30, 0x80],
        ] {
            assert!(der::Reader::new(bad).read_any().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn key_parsers_never_panic_on_mangled_input() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialized_der().to_vec();
        assert_eq!(check_pkcs8(&pkcs8), Ok(KeyKind::EcdsaP256));
        // Pull the SEC1 structure out of the PKCS#8 and re-add the curve, so
        // we also have a realistic SEC1 input.
        let mut r = der::Reader::new(&pkcs8);
        let mut body = der::Reader::new(r.expect(der::SEQUENCE, "").unwrap());
        body.read_any().unwrap();
        body.read_any().unwrap();
        let inner = body.expect(der::OCTET_STRING, "").unwrap();
        let info = parse_sec1(inner).unwrap();
        assert!(info.has_public_key);
        assert!(info.curve.is_none(), "rcgen omits the inner curve");

        let mut fields =
            der::Reader::new(der::Reader::new(inner).expect(der::SEQUENCE, "").unwrap());
        let mut sec1_body = Vec::new();
        while !fields.is_empty() {
            let (tag, contents) = fields.read_any().unwrap();
            der::push_tlv(&mut sec1_body, tag, contents).unwrap();
            if tag == der::OCTET_STRING {
                let mut curve = Vec::new();
                der::push_tlv(&mut curve, der::OID, oid::PRIME256V1).unwrap();
                der::push_tlv(&mut sec1_body, der::CONTEXT_0, &curve).unwrap();
            }
        }
        let mut sec1 = Vec::new();
        der::push_tlv(&mut sec1, der::SEQUENCE, &sec1_body).unwrap();
        let converted = sec1_to_pkcs8(&sec1).unwrap();
        assert_eq!(check_pkcs8(&converted.1.0), Ok(KeyKind::EcdsaP256));
        let pair = KeyPair::try_from(converted.1.0.as_slice()).unwrap();
        assert_eq!(pair.public_key_raw(), key.public_key_raw());

        for input in [&pkcs8, &sec1] {
            for len in 0..input.len() {
                let _ = check_pkcs8(&input[..len]);
                let _ = sec1_to_pkcs8(&input[..len]);
            }
            for i in 0..input.len() {
                for v in [0x00, 0x01, 0x7f, 0x80, 0x81, 0x82, 0x83, 0xff] {
                    let mut m = input.clone();
                    m[i] = v;
                    let _ = check_pkcs8(&m);
                    let _ = sec1_to_pkcs8(&m);
                }
            }
        }
        // Deterministic pseudo-random garbage.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = check_pkcs8(&bytes);
            let _ = sec1_to_pkcs8(&bytes);
        }
    }
}
