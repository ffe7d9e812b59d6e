//! Certificates and keys for ntp-dtls.
//!
//! Three jobs live here, one file each:
//!
//! * `ntp-dtls certs` (`generate.rs`): [`generate_lab_pki`] mints a throw-away
//!   CA plus one server and one client leaf (ECDSA P-256 by default, or P-384
//!   or RSA-3072, [`KeyType`]), so a lab can run the relay without touching
//!   OpenSSL; [`generate_request`] writes a key and a PKCS#10 request for an
//!   operator's own CA (`keys.rs`).
//! * Start-up loading (`load.rs`): [`load_certificates`], [`load_ca_roots`]
//!   and [`load_private_key`] read PEM files and reject anything the DTLS
//!   stack could not use *now*, with the file path in the message, instead of
//!   letting it fail later as an opaque handshake error.
//! * Audit (`describe.rs`): [`summarize`] turns a certificate into the few
//!   fields an operator looks at (names, validity, serial), and the loaders'
//!   "what this file holds instead" explanations live beside it.
//!
//! This file keeps what all three share: the error type, the file names and
//! limits, and the re-exports callers use (`pki::load_private_key`, ...), so
//! the split is invisible outside the module.
//!
//! The relay signs its handshakes with ECDSA P-256 or P-384 keys
//! (TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256) or RSA keys of 2048-4096 bits
//! (TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256); everything else is refused at load
//! time with a message that says so.

use std::io;
use std::path::PathBuf;

mod describe;
mod generate;
mod keys;
mod load;

pub use describe::{CertSummary, summarize};
pub use generate::{LabPkiRequest, generate_lab_pki};
pub use keys::{
    CLIENT_CSR_FILE, CsrRequest, KeyType, RequestRole, SERVER_CSR_FILE, generate_request,
};
pub use load::{load_ca_roots, load_certificates, load_private_key, public_key_matches};

// Revocation lists, and file checks beyond syntax (pki-verify): kept out of this file.
pub mod crl;
pub mod files;

#[cfg(test)]
mod test_support;

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

// Secrets in memory: every buffer that holds key material here (key files as read, PEM and
// DER of keys, the PKCS#8 we build) is a `zeroize::Zeroizing<Vec<u8>>`, wiped on drop with
// writes the compiler may not elide. Copies made inside ring/rcgen (e.g.
// `KeyPair::serialized_der`) are outside our reach; the loaded key itself is wiped by
// `PrivateKey` (ntp-dtls-proto, also zeroize).

pub use ntp_dtls_proto::identity::{KeyKind, PrivateKey};
