//! Who a relay is: its certificate chain and the private key of the leaf.
//!
//! The key bytes are wiped when dropped (zeroize) and never printed. Making one from a file,
//! with every check an operator needs to see at start-up, is the shell's job (`pki::load`).
//! Which keys the declared policy allows, for us and for peers, is [`crate::policy`]'s.

use std::fmt;

use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

/// The algorithm of a private key, which decides the cipher suite and signature schemes a
/// relay offers with it. Every kind here can be loaded and signs in a handshake:
/// ECDSA keys with TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256, RSA keys with
/// TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (RSASSA-PKCS1-v1_5 signatures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    /// An RSA key whose modulus has `bits` bits (2048..=4096 under the policy).
    Rsa {
        bits: usize,
    },
}

impl KeyKind {
    /// The cipher suite a relay with this key uses.
    pub fn cipher_suite(self) -> &'static str {
        match self {
            KeyKind::EcdsaP256 | KeyKind::EcdsaP384 => "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
            KeyKind::Rsa { .. } => "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::EcdsaP256 => f.write_str("ECDSA P-256"),
            KeyKind::EcdsaP384 => f.write_str("ECDSA P-384"),
            KeyKind::Rsa { bits } => write!(f, "RSA {bits}"),
        }
    }
}

/// A validated private key in PKCS#8 DER form.
#[derive(Clone)]
pub struct PrivateKey {
    kind: KeyKind,
    pkcs8_der: Zeroizing<Vec<u8>>,
}

impl PrivateKey {
    /// Wraps PKCS#8 DER the caller has already checked is a key of `kind`.
    pub fn from_pkcs8(kind: KeyKind, pkcs8_der: Vec<u8>) -> Self {
        PrivateKey {
            kind,
            pkcs8_der: Zeroizing::new(pkcs8_der),
        }
    }

    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The PKCS#8 `PrivateKeyInfo` DER.
    pub fn pkcs8_der(&self) -> &[u8] {
        &self.pkcs8_der
    }
}

/// Never print key bytes: a `{:?}` in a log line must not leak the key.
impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey(..)")
    }
}

/// A certificate chain (leaf first) and the private key of its leaf.
#[derive(Clone)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKey,
}
