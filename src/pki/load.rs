//! Start-up loading: certificates, trust roots and the private key, read from PEM files and
//! checked for what the DTLS stack can use, so a bad file fails at start-up with its path in
//! the message instead of as an opaque handshake error. SEC1 and PKCS#1 keys are converted
//! to the PKCS#8 the crypto library signs with.

use std::fs;
use std::path::Path;

use rcgen::KeyPair;
use rustls_pki_types::pem::{self, PemObject, SectionKind};
use rustls_pki_types::{CertificateDer, PrivatePkcs8KeyDer};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::ParsedExtension;
use zeroize::Zeroizing;

use der::asn1::{AnyRef, ObjectIdentifier};
use der::{Decode, Encode, Tag, Tagged};
use pkcs8::{AlgorithmIdentifierRef, PrivateKeyInfo};
use sec1::{EcParameters, EcPrivateKey};

use ntp_dtls_proto::policy;
use ntp_dtls_proto::x509::parse_cert;

use super::describe::{Expected, describe_contents, pem_labels};
use super::keys::rcgen_algorithm;
use super::{KeyKind, PkiError, PrivateKey};

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
    let bytes = Zeroizing::new(read_file(path)?);
    // Before the PEM parser: legacy encrypted PEM ("Proc-Type: 4,ENCRYPTED"
    // headers) would otherwise surface as a confusing base64 error.
    if is_encrypted_pem(&bytes) {
        return Err(PkiError::EncryptedKey {
            path: path.to_path_buf(),
        });
    }
    let mut keys: Vec<(SectionKind, Zeroizing<Vec<u8>>)> = Vec::new();
    for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
        let (kind, der) = section.map_err(|e| pem_syntax(path, &e))?;
        let der = Zeroizing::new(der);
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
                found: describe_contents(&bytes, Expected::Key),
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
            let kind = check_pkcs8(&der).map_err(|p| p.into_error(path))?;
            (kind, der)
        }
        SectionKind::EcPrivateKey => sec1_to_pkcs8(&der).map_err(|p| p.into_error(path))?,
        // Only RsaPrivateKey is left (filtered above).
        _ => pkcs1_to_pkcs8(&der).map_err(|p| p.into_error(path))?,
    };
    usable_key(path, kind, pkcs8)
}

/// Whether `cert`'s public key is the public half of `key`, i.e. whether the
/// pair can be served together. `Ok(false)` for a different key (including a
/// certificate for another algorithm).
pub fn public_key_matches(cert: &CertificateDer<'_>, key: &PrivateKey) -> Result<bool, PkiError> {
    let parsed = parse_cert(cert).map_err(PkiError::InvalidCertificate)?;
    let pair = KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(key.pkcs8_der()),
        rcgen_algorithm(key.kind()),
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

fn is_encrypted_pem(bytes: &[u8]) -> bool {
    pem_labels(bytes)
        .iter()
        .any(|l| l == "ENCRYPTED PRIVATE KEY")
        || bytes
            .windows(b"Proc-Type: 4,ENCRYPTED".len())
            .any(|w| w == b"Proc-Type: 4,ENCRYPTED")
}

// ---------------------------------------------------------------------------
// Key structure checks (PKCS#8, SEC1, PKCS#1)
// ---------------------------------------------------------------------------
//
// The DER itself (tags, lengths, the three structures) is decoded by the RustCrypto crates
// `der`, `pkcs8`, `sec1` and `pkcs1`. What stays here is the policy they do not know: which
// algorithms and curves the relay can sign with, what the refusal says, and that ring needs
// the public key inside an EC key.

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

/// A DER decoding or encoding failure in `what` (e.g. "ECPrivateKey"), worded as before the
/// crates did the decoding: "bad DER: <structure>: <what the decoder found>".
fn bad_der(what: &str, e: der::Error) -> KeyProblem {
    KeyProblem::Malformed(format!("bad DER: {what}: {e}"))
}

mod oid {
    //! The object identifiers a refusal names. rsaEncryption is `pkcs1::ALGORITHM_OID`.
    use der::asn1::ObjectIdentifier as Oid;

    pub const EC_PUBLIC_KEY: Oid = Oid::new_unwrap("1.2.840.10045.2.1");
    pub const PRIME256V1: Oid = Oid::new_unwrap("1.2.840.10045.3.1.7");
    pub const PRIME192V1: Oid = Oid::new_unwrap("1.2.840.10045.3.1.1");
    pub const SECP384R1: Oid = Oid::new_unwrap("1.3.132.0.34");
    pub const SECP521R1: Oid = Oid::new_unwrap("1.3.132.0.35");
    pub const SECP256K1: Oid = Oid::new_unwrap("1.3.132.0.10");
    pub const SECP224R1: Oid = Oid::new_unwrap("1.3.132.0.33");
    pub const BRAINPOOL_P256R1: Oid = Oid::new_unwrap("1.3.36.3.3.2.8.1.1.7");
    pub const RSASSA_PSS: Oid = Oid::new_unwrap("1.2.840.113549.1.1.10");
    pub const DSA: Oid = Oid::new_unwrap("1.2.840.10040.4.1");
    pub const X25519: Oid = Oid::new_unwrap("1.3.101.110");
    pub const X448: Oid = Oid::new_unwrap("1.3.101.111");
    pub const ED25519: Oid = Oid::new_unwrap("1.3.101.112");
    pub const ED448: Oid = Oid::new_unwrap("1.3.101.113");
}

fn curve_name(curve: ObjectIdentifier) -> String {
    match curve {
        oid::PRIME256V1 => "prime256v1 (P-256)".into(),
        oid::SECP384R1 => "secp384r1 (P-384)".into(),
        oid::SECP521R1 => "secp521r1 (P-521)".into(),
        oid::SECP256K1 => "secp256k1".into(),
        oid::SECP224R1 => "secp224r1 (P-224)".into(),
        oid::PRIME192V1 => "prime192v1 (P-192)".into(),
        oid::BRAINPOOL_P256R1 => "brainpoolP256r1".into(),
        other => other.to_string(),
    }
}

const EXPLICIT_CURVE: &str = "EC keys with explicit curve parameters (openssl -param_enc explicit) instead of the named curve prime256v1 or secp384r1";
const NOT_A_CURVE: &str = "EC curve parameters are neither a named curve nor explicit parameters";

/// P-256 and P-384 are the curves ring signs with; any other named curve is refused by name.
fn check_named_curve(curve: ObjectIdentifier) -> Result<KeyKind, KeyProblem> {
    match curve {
        oid::PRIME256V1 => Ok(KeyKind::EcdsaP256),
        oid::SECP384R1 => Ok(KeyKind::EcdsaP384),
        other => Err(KeyProblem::Unsupported(format!(
            "EC keys on curve {}",
            curve_name(other)
        ))),
    }
}

/// Checks ECParameters as found in a PKCS#8 AlgorithmIdentifier: a named curve OID, explicit
/// parameters (a SEQUENCE), or anything else (e.g. implicitCA NULL). Returns the curve too, for
/// the comparison with the one inside the ECPrivateKey.
fn check_curve_params(params: AnyRef<'_>) -> Result<(KeyKind, ObjectIdentifier), KeyProblem> {
    match params.tag() {
        Tag::ObjectIdentifier => {
            let curve = ObjectIdentifier::try_from(params).map_err(|e| bad_der("curve OID", e))?;
            Ok((check_named_curve(curve)?, curve))
        }
        Tag::Sequence => Err(KeyProblem::Unsupported(EXPLICIT_CURVE.into())),
        _ => Err(KeyProblem::Malformed(NOT_A_CURVE.into())),
    }
}

/// ECPrivateKey ::= SEQUENCE { version INTEGER 1, privateKey OCTET STRING,
///   parameters [0] ECParameters OPTIONAL, publicKey [1] BIT STRING OPTIONAL }
///
/// `sec1` models only the named-curve form of the [0] parameters (the only one PKIX allows),
/// so other forms come back as a tag error while decoding them: the one place in the structure
/// where an OBJECT IDENTIFIER is expected. Those, and a wrong version (the one INTEGER sec1
/// checks the value of), are turned back into the refusals operators got before.
fn decode_sec1(input: &[u8]) -> Result<EcPrivateKey<'_>, KeyProblem> {
    let key = EcPrivateKey::from_der(input).map_err(|e| match e.kind() {
        der::ErrorKind::TagUnexpected {
            expected: Some(Tag::ObjectIdentifier),
            actual: Tag::Sequence,
        } => KeyProblem::Unsupported(EXPLICIT_CURVE.into()),
        der::ErrorKind::TagUnexpected {
            expected: Some(Tag::ObjectIdentifier),
            ..
        } => KeyProblem::Malformed(NOT_A_CURVE.into()),
        der::ErrorKind::Value { tag: Tag::Integer } => {
            KeyProblem::Malformed("ECPrivateKey version is not 1".into())
        }
        _ => bad_der("ECPrivateKey", e),
    })?;
    if key.private_key.is_empty() {
        return Err(KeyProblem::Malformed("empty EC private scalar".into()));
    }
    Ok(key)
}

/// ring signs only with EC keys that carry their public point (an empty point is no key).
fn has_public_key(key: &EcPrivateKey<'_>) -> bool {
    key.public_key.is_some_and(|point| !point.is_empty())
}

/// Checks a PKCS#8 PrivateKeyInfo is ecPublicKey on prime256v1 or secp384r1
/// with an embedded public key, or rsaEncryption of 2048-4096 bits, naming the
/// key type when it is something else.
fn check_pkcs8(input: &[u8]) -> Result<KeyKind, KeyProblem> {
    let info = PrivateKeyInfo::from_der(input).map_err(|e| match e.kind() {
        // The version is the structure's only INTEGER whose value pkcs8 checks.
        der::ErrorKind::Value { tag: Tag::Integer } => {
            KeyProblem::Malformed("PrivateKeyInfo version is neither 0 nor 1".into())
        }
        _ => bad_der("PrivateKeyInfo", e),
    })?;
    match info.algorithm.oid {
        oid::EC_PUBLIC_KEY => {}
        pkcs1::ALGORITHM_OID => return rsa_kind(info.private_key),
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
                "keys of algorithm {other}"
            )));
        }
    }
    let sec1 = decode_sec1(info.private_key)?;
    let inner = sec1.parameters.and_then(EcParameters::named_curve);
    // The curve normally sits in the AlgorithmIdentifier; the inner [0] is
    // optional there but, if present, must agree.
    let kind = match (info.algorithm.parameters, inner) {
        (Some(params), inner) => {
            let (kind, curve) = check_curve_params(params)?;
            if inner.is_some_and(|inner| inner != curve) {
                return Err(KeyProblem::Malformed(
                    "curve in AlgorithmIdentifier and in ECPrivateKey disagree".into(),
                ));
            }
            kind
        }
        (None, Some(curve)) => {
            check_named_curve(curve)?;
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
    if !has_public_key(&sec1) {
        return Err(KeyProblem::NoPublicKey);
    }
    Ok(kind)
}

/// Wraps a SEC1 ECPrivateKey into PKCS#8 PrivateKeyInfo:
/// SEQUENCE { INTEGER 0, SEQUENCE { ecPublicKey, namedCurve }, OCTET STRING sec1 }.
fn sec1_to_pkcs8(sec1: &[u8]) -> Result<(KeyKind, Zeroizing<Vec<u8>>), KeyProblem> {
    let key = decode_sec1(sec1)?;
    let Some(curve) = key.parameters.and_then(EcParameters::named_curve) else {
        return Err(KeyProblem::Malformed(
            "the EC PRIVATE KEY does not name its curve (no [0] parameters)".into(),
        ));
    };
    let kind = check_named_curve(curve)?;
    if !has_public_key(&key) {
        return Err(KeyProblem::NoPublicKey);
    }
    let algorithm = AlgorithmIdentifierRef {
        oid: oid::EC_PUBLIC_KEY,
        parameters: Some(AnyRef::from(&curve)),
    };
    Ok((kind, encode_pkcs8(algorithm, sec1)?))
}

/// PKCS#8 PrivateKeyInfo (version 0, no attributes, no public key) around `private_key`,
/// encoded into a buffer of exactly its length: no reallocation leaves a stray copy of the
/// key behind.
fn encode_pkcs8(
    algorithm: AlgorithmIdentifierRef<'_>,
    private_key: &[u8],
) -> Result<Zeroizing<Vec<u8>>, KeyProblem> {
    let info = PrivateKeyInfo::new(algorithm, private_key);
    let encode = |e| bad_der("PrivateKeyInfo", e);
    let len = info.encoded_len().map_err(encode)?;
    let len = usize::try_from(len).map_err(encode)?;
    let mut out = Zeroizing::new(vec![0; len]);
    info.encode_to_slice(&mut out).map_err(encode)?;
    Ok(out)
}

/// Has ring check what only it can (scalar range, the public key consistent with the private
/// one, RSA's CRT parameters), so a broken key fails at start-up, not at the first handshake.
fn usable_key(
    path: &Path,
    kind: KeyKind,
    mut pkcs8: Zeroizing<Vec<u8>>,
) -> Result<PrivateKey, PkiError> {
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.as_slice()),
        rcgen_algorithm(kind),
    )
    .map_err(|e| PkiError::MalformedKey {
        path: path.to_path_buf(),
        detail: format!("not a usable {kind} key: {e}"),
    })?;
    // Move the bytes out (the wrapper is left empty), rather than clone: one fewer copy of
    // the key to wipe.
    Ok(PrivateKey::from_pkcs8(kind, std::mem::take(&mut *pkcs8)))
}

/// The size of a PKCS#1 RSAPrivateKey, refused outside the policy's 2048-4096 bits.
fn rsa_kind(pkcs1: &[u8]) -> Result<KeyKind, KeyProblem> {
    let key = pkcs1::RsaPrivateKey::from_der(pkcs1).map_err(|e| bad_der("RSAPrivateKey", e))?;
    if key.version() != pkcs1::Version::TwoPrime {
        return Err(KeyProblem::Malformed(
            "RSAPrivateKey version is not 0 (multi-prime keys are not supported)".into(),
        ));
    }
    let bits = policy::modulus_bits(key.modulus.as_bytes());
    policy::rsa_kind(bits).map_err(|_| {
        KeyProblem::Unsupported(format!(
            "RSA keys of {bits} bits (the policy allows {} to {})",
            policy::RSA_MIN_BITS,
            policy::RSA_MAX_BITS
        ))
    })
}

/// Wraps a PKCS#1 RSAPrivateKey into PKCS#8 PrivateKeyInfo:
/// SEQUENCE { INTEGER 0, SEQUENCE { rsaEncryption, NULL }, OCTET STRING pkcs1 }.
fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Result<(KeyKind, Zeroizing<Vec<u8>>), KeyProblem> {
    let kind = rsa_kind(pkcs1)?;
    Ok((kind, encode_pkcs8(pkcs1::ALGORITHM_ID, pkcs1)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::generate_lab_pki;
    use crate::pki::test_support::*;
    use rcgen::{CertificateParams, IsCa, PKCS_ECDSA_P256_SHA256};
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

    // ---- DER via the RustCrypto crates -----------------------------------

    #[test]
    fn oid_names() {
        assert_eq!(oid::PRIME256V1.to_string(), "1.2.840.10045.3.1.7");
        assert_eq!(oid::SECP384R1.to_string(), "1.3.132.0.34");
        assert_eq!(oid::ED25519.to_string(), "1.3.101.112");
        assert_eq!(
            ObjectIdentifier::from_bytes(&[0x55, 0x04, 0x03])
                .unwrap()
                .to_string(),
            "2.5.4.3"
        );
        // A truncated or empty OID is a DER error now (the key is malformed), where the
        // hand-written reader printed it as "OID 0x..". So is an OID const-oid cannot hold,
        // such as 2.999 (second arc above 39): the key is refused either way.
        assert!(ObjectIdentifier::from_bytes(&[0x88, 0x37]).is_err());
        assert!(ObjectIdentifier::from_bytes(&[0x2a, 0x86]).is_err());
        assert!(ObjectIdentifier::from_bytes(&[]).is_err());
        assert_eq!(
            curve_name(ObjectIdentifier::from_bytes(&[0x2b, 0x81, 0x04, 0x00, 0x27]).unwrap()),
            "1.3.132.0.39"
        );
        assert_eq!(
            check_named_curve(oid::SECP521R1),
            Err(KeyProblem::Unsupported(
                "EC keys on curve secp521r1 (P-521)".into()
            ))
        );
    }

    #[test]
    fn only_der_is_accepted() {
        use der::asn1::OctetStringRef;
        for len in [0usize, 1, 0x7f, 0x80, 0xff, 0x100, 0xffff] {
            let contents = vec![0xabu8; len];
            let encoded = OctetStringRef::new(&contents).unwrap().to_der().unwrap();
            let decoded = OctetStringRef::from_der(&encoded).unwrap();
            assert_eq!(decoded.as_bytes(), &contents[..]);
        }
        // Non-minimal and indefinite lengths are BER, not DER.
        for bad in [
            &[0x04, 0x81, 0x05, 1, 2, 3, 4, 5][..],
            &[0x04, 0x82, 0x00, 0x05, 1, 2, 3, 4, 5],
            &[0x30, 0x80, 0x00, 0x00],
        ] {
            assert!(OctetStringRef::from_der(bad).is_err(), "{bad:?}");
        }
        // The same holds inside a key: a non-minimal length makes it malformed.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialized_der();
        assert_eq!(pkcs8[0], 0x30);
        assert_eq!(pkcs8[1], 0x81, "a P-256 PKCS#8 key is 128..=255 bytes long");
        let mut long_form = vec![0x30, 0x82, 0x00];
        long_form.extend_from_slice(&pkcs8[2..]);
        assert!(matches!(
            check_pkcs8(&long_form),
            Err(KeyProblem::Malformed(m)) if m.starts_with("bad DER: PrivateKeyInfo: ")
        ));
    }

    #[test]
    fn curve_forms_are_refused_as_before() {
        use der::asn1::{BitStringRef, ContextSpecific, OctetStringRef};
        use der::{Header, TagMode, TagNumber};
        // SEC1 keys with each form of [0] parameters, which sec1's own type cannot hold.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let info = PrivateKeyInfo::from_der(key.serialized_der()).unwrap();
        let inner = EcPrivateKey::from_der(info.private_key).unwrap();
        let sec1_with = |version: u8, params: AnyRef<'_>| {
            let body = [
                version.to_der().unwrap(),
                OctetStringRef::new(inner.private_key)
                    .unwrap()
                    .to_der()
                    .unwrap(),
                ContextSpecific {
                    tag_number: TagNumber::N0,
                    tag_mode: TagMode::Explicit,
                    value: params,
                }
                .to_der()
                .unwrap(),
                ContextSpecific {
                    tag_number: TagNumber::N1,
                    tag_mode: TagMode::Explicit,
                    value: BitStringRef::from_bytes(inner.public_key.unwrap()).unwrap(),
                }
                .to_der()
                .unwrap(),
            ]
            .concat();
            let len = der::Length::try_from(body.len()).unwrap();
            let mut out = Header::new(Tag::Sequence, len).unwrap().to_der().unwrap();
            out.extend_from_slice(&body);
            out
        };
        let refusal = |sec1: Vec<u8>| sec1_to_pkcs8(&sec1).map(|(kind, _)| kind);
        assert_eq!(
            refusal(sec1_with(1, AnyRef::from(&oid::PRIME256V1))),
            Ok(KeyKind::EcdsaP256)
        );
        assert_eq!(
            refusal(sec1_with(
                1,
                AnyRef::new(Tag::Sequence, &[0x02, 0x01, 0x01]).unwrap()
            )),
            Err(KeyProblem::Unsupported(EXPLICIT_CURVE.into()))
        );
        assert_eq!(
            refusal(sec1_with(1, AnyRef::NULL)),
            Err(KeyProblem::Malformed(NOT_A_CURVE.into()))
        );
        assert_eq!(
            refusal(sec1_with(1, AnyRef::from(&oid::SECP256K1))),
            Err(KeyProblem::Unsupported("EC keys on curve secp256k1".into()))
        );
        assert_eq!(
            refusal(sec1_with(2, AnyRef::from(&oid::PRIME256V1))),
            Err(KeyProblem::Malformed(
                "ECPrivateKey version is not 1".into()
            ))
        );
    }

    #[test]
    fn key_parsers_never_panic_on_mangled_input() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pkcs8 = key.serialized_der().to_vec();
        assert_eq!(check_pkcs8(&pkcs8), Ok(KeyKind::EcdsaP256));
        // Pull the SEC1 structure out of the PKCS#8 and re-add the curve, so
        // we also have a realistic SEC1 input.
        let info = PrivateKeyInfo::from_der(&pkcs8).unwrap();
        let inner = decode_sec1(info.private_key).unwrap();
        assert!(has_public_key(&inner));
        assert!(inner.parameters.is_none(), "rcgen omits the inner curve");

        let mut with_curve = inner.clone();
        with_curve.parameters = Some(EcParameters::NamedCurve(oid::PRIME256V1));
        let sec1 = with_curve.to_der().unwrap();
        let converted = sec1_to_pkcs8(&sec1).unwrap();
        assert_eq!(check_pkcs8(&converted.1), Ok(KeyKind::EcdsaP256));
        let pair = KeyPair::try_from(converted.1.as_slice()).unwrap();
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
