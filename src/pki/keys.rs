//! Key types: which private keys a relay loads, which `certs --key-type` generates, and the
//! certificate requests `certs --request` writes for an operator's own CA.
//!
//! Loadable: ECDSA P-256 and P-384 (PKCS#8 "PRIVATE KEY" or SEC1 "EC PRIVATE KEY"), RSA with a
//! 2048- to 4096-bit modulus (PKCS#8 or PKCS#1 "RSA PRIVATE KEY"), all of which the engine signs
//! handshakes with (ring; see `ntp_dtls_proto::engine::rtc`). Everything else is refused at
//! start-up with the file named and the supported types listed. The structure checks stay in
//! the hand-written DER reader of `super` (it already names every key type and curve in its
//! refusals); this file adds the RSA and P-384 parts and the key generation.

use std::fs;
use std::path::{Path, PathBuf};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256,
};
use rustls_pki_types::PrivatePkcs8KeyDer;

use ntp_dtls_proto::policy;

use super::{
    DEFAULT_CLIENT_NAME, FileKind, KeyKind, KeyProblem, PkiError, PrivateKey, SecretBytes, der,
    leaf_params_for, oid, write_file,
};

/// A key `certs` can generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KeyType {
    #[default]
    EcdsaP256,
    EcdsaP384,
    Rsa3072,
}

impl KeyType {
    /// The `--key-type` spelling.
    pub fn name(self) -> &'static str {
        match self {
            KeyType::EcdsaP256 => "ecdsa-p256",
            KeyType::EcdsaP384 => "ecdsa-p384",
            KeyType::Rsa3072 => "rsa-3072",
        }
    }

    /// A fresh key pair of this type, as rcgen signs with it.
    pub(super) fn generate(self, what: &'static str) -> Result<KeyPair, PkiError> {
        let failed = |detail: String| PkiError::Generate { what, detail };
        match self {
            KeyType::EcdsaP256 => {
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| failed(e.to_string()))
            }
            KeyType::EcdsaP384 => {
                KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).map_err(|e| failed(e.to_string()))
            }
            KeyType::Rsa3072 => {
                // ring cannot generate RSA keys; the rsa crate can, and writes PKCS#8 that
                // rcgen (ring) loads for signing.
                use rsa::pkcs8::EncodePrivateKey;
                let key = rsa::RsaPrivateKey::new(&mut rand_core::OsRng, 3072)
                    .map_err(|e| failed(e.to_string()))?;
                let pkcs8 = key.to_pkcs8_der().map_err(|e| failed(e.to_string()))?;
                KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(pkcs8.as_bytes()),
                    &PKCS_RSA_SHA256,
                )
                .map_err(|e| failed(e.to_string()))
            }
        }
    }
}

/// The rcgen (ring) algorithm that loads and signs with a key of `kind`.
pub(super) fn rcgen_algorithm(kind: KeyKind) -> &'static rcgen::SignatureAlgorithm {
    match kind {
        KeyKind::EcdsaP256 => &PKCS_ECDSA_P256_SHA256,
        KeyKind::EcdsaP384 => &PKCS_ECDSA_P384_SHA384,
        KeyKind::Rsa { .. } => &PKCS_RSA_SHA256,
    }
}

/// Has ring check what only it can (scalar range, the public key consistent with the private
/// one, RSA's CRT parameters), so a broken key fails at start-up, not at the first handshake.
pub(super) fn usable_key(
    path: &Path,
    kind: KeyKind,
    mut pkcs8: SecretBytes,
) -> Result<PrivateKey, PkiError> {
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.0.as_slice()),
        rcgen_algorithm(kind),
    )
    .map_err(|e| PkiError::MalformedKey {
        path: path.to_path_buf(),
        detail: format!("not a usable {kind} key: {e}"),
    })?;
    // Move the bytes out (the wrapper is left empty), rather than clone: one fewer copy of
    // the key to wipe.
    Ok(PrivateKey::from_pkcs8(kind, std::mem::take(&mut pkcs8.0)))
}

/// The size of a PKCS#1 RSAPrivateKey, refused outside the policy's 2048-4096 bits.
///
/// RSAPrivateKey ::= SEQUENCE { version INTEGER, modulus INTEGER, publicExponent INTEGER, ... }
pub(super) fn rsa_kind(pkcs1: &[u8]) -> Result<KeyKind, KeyProblem> {
    let mut outer = der::Reader::new(pkcs1);
    let seq = outer.expect(der::SEQUENCE, "RSAPrivateKey SEQUENCE")?;
    if !outer.is_empty() {
        return Err(KeyProblem::Malformed(
            "trailing data after RSAPrivateKey".into(),
        ));
    }
    let mut r = der::Reader::new(seq);
    let version = r.expect(der::INTEGER, "RSAPrivateKey version")?;
    if version != [0] {
        return Err(KeyProblem::Malformed(
            "RSAPrivateKey version is not 0 (multi-prime keys are not supported)".into(),
        ));
    }
    let modulus = r.expect(der::INTEGER, "RSAPrivateKey modulus")?;
    let bits = policy::modulus_bits(modulus);
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
pub(super) fn pkcs1_to_pkcs8(pkcs1: &[u8]) -> Result<(KeyKind, SecretBytes), KeyProblem> {
    let kind = rsa_kind(pkcs1)?;
    let alg_len = der::tlv_len(oid::RSA_ENCRYPTION.len()) + der::tlv_len(0);
    let body_len = der::tlv_len(1) + der::tlv_len(alg_len) + der::tlv_len(pkcs1.len());
    // Exact capacities: no reallocation leaves a stray copy of the key behind.
    let mut body = SecretBytes(Vec::with_capacity(body_len));
    der::push_tlv(&mut body.0, der::INTEGER, &[0])?;
    der::push_header(&mut body.0, der::SEQUENCE, alg_len)?;
    der::push_tlv(&mut body.0, der::OID, oid::RSA_ENCRYPTION)?;
    der::push_tlv(&mut body.0, der::NULL, &[])?;
    der::push_tlv(&mut body.0, der::OCTET_STRING, pkcs1)?;
    let mut out = SecretBytes(Vec::with_capacity(der::tlv_len(body.0.len())));
    der::push_tlv(&mut out.0, der::SEQUENCE, &body.0)?;
    Ok((kind, out))
}

// ---------------------------------------------------------------------------
// Certificate requests
// ---------------------------------------------------------------------------

/// Which certificate a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestRole {
    Server,
    Client,
}

/// What `ntp-dtls certs --request` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CsrRequest {
    pub out_dir: PathBuf,
    pub role: RequestRole,
    /// DNS names or IP addresses (the SANs; the first is also the CN). For a client, empty
    /// means [`DEFAULT_CLIENT_NAME`].
    pub names: Vec<String>,
    pub key_type: KeyType,
    pub force: bool,
}

pub const SERVER_CSR_FILE: &str = "server.csr.pem";
pub const CLIENT_CSR_FILE: &str = "client.csr.pem";

/// Writes a fresh key (mode 0600) and a PKCS#10 request for it into `req.out_dir`: the names as
/// DNS or IP SANs (the first also the subject CN), keyUsage digitalSignature, extendedKeyUsage
/// serverAuth or clientAuth, basicConstraints CA:FALSE, all in the request's extensionRequest
/// attribute for the CA to copy. Returns the paths written, the key first.
pub fn generate_request(req: &CsrRequest) -> Result<Vec<PathBuf>, PkiError> {
    let (key_file, csr_file, eku) = match req.role {
        RequestRole::Server => (
            super::SERVER_KEY_FILE,
            SERVER_CSR_FILE,
            ExtendedKeyUsagePurpose::ServerAuth,
        ),
        RequestRole::Client => (
            super::CLIENT_KEY_FILE,
            CLIENT_CSR_FILE,
            ExtendedKeyUsagePurpose::ClientAuth,
        ),
    };
    let names = match (req.role, req.names.is_empty()) {
        (RequestRole::Server, true) => {
            return Err(PkiError::InvalidRequest(
                "a server request needs at least one --server-name (DNS name or IP address)".into(),
            ));
        }
        (RequestRole::Client, true) => vec![DEFAULT_CLIENT_NAME.to_string()],
        _ => req.names.clone(),
    };
    let paths = [req.out_dir.join(key_file), req.out_dir.join(csr_file)];
    if !req.force {
        if let Some(p) = paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
            return Err(PkiError::AlreadyExists { path: p.clone() });
        }
    }

    let mut params: CertificateParams = leaf_params_for(&names, eku)?;
    // The CA sets the validity and its own identifiers; a request carries neither.
    params.use_authority_key_identifier_extension = false;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[0].as_str());
    params.distinguished_name = dn;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    let key = req.key_type.generate("request key")?;
    let csr = params
        .serialize_request(&key)
        .map_err(|e| PkiError::Generate {
            what: "certificate request",
            detail: e.to_string(),
        })?;
    let csr_pem = csr.pem().map_err(|e| PkiError::Generate {
        what: "certificate request",
        detail: e.to_string(),
    })?;

    fs::create_dir_all(&req.out_dir).map_err(|io| PkiError::CreateDir {
        path: req.out_dir.clone(),
        io,
    })?;
    let key_pem = SecretBytes(key.serialize_pem().into_bytes());
    write_file(&paths[0], &key_pem.0, FileKind::Secret, req.force)?;
    write_file(
        &paths[1],
        csr_pem.as_bytes(),
        FileKind::Certificate,
        req.force,
    )?;
    Ok(paths.to_vec())
}
