//! Who a relay is: its certificate chain and the private key of the leaf.
//!
//! The key bytes are wiped when dropped (zeroize) and never printed. Making one from a file,
//! with every check an operator needs to see at start-up, is the shell's job (`pki::load`).

use std::fmt;

use rustls_pki_types::CertificateDer;
use zeroize::Zeroizing;

/// The algorithm of a private key, which decides the cipher suite and signature schemes a
/// relay offers with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
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
