//! Key types: which private keys a relay loads, which `certs --key-type` generates, and the
//! certificate requests `certs --request` writes for an operator's own CA.
//!
//! Loadable: ECDSA P-256 and P-384 (PKCS#8 "PRIVATE KEY" or SEC1 "EC PRIVATE KEY"), RSA with a
//! 2048- to 4096-bit modulus (PKCS#8 or PKCS#1 "RSA PRIVATE KEY"), all of which the engine signs
//! handshakes with (ring; see `ntp_dtls_proto::engine::rtc`). Everything else is refused at
//! start-up with the file named and the supported types listed. Those load-time checks live in
//! `load.rs`; this file has the key types and their generation.

use std::fs;
use std::path::PathBuf;

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_RSA_SHA256,
};
use rustls_pki_types::PrivatePkcs8KeyDer;
use zeroize::Zeroizing;

use super::generate::{FileKind, leaf_params_for, write_file};
use super::{DEFAULT_CLIENT_NAME, KeyKind, PkiError};

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
    let key_pem = Zeroizing::new(key.serialize_pem().into_bytes());
    write_file(&paths[0], &key_pem, FileKind::Secret, req.force)?;
    write_file(
        &paths[1],
        csr_pem.as_bytes(),
        FileKind::Certificate,
        req.force,
    )?;
    Ok(paths.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{LabPkiRequest, generate_lab_pki, load_certificates, load_private_key};
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::prelude::FromDer;

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ntp-dtls-keys-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn every_key_type_makes_a_lab_pki_that_loads_back() {
        for (key_type, kind) in [
            (KeyType::EcdsaP256, KeyKind::EcdsaP256),
            (KeyType::EcdsaP384, KeyKind::EcdsaP384),
            (KeyType::Rsa3072, KeyKind::Rsa { bits: 3072 }),
        ] {
            let dir = temp_dir(key_type.name());
            generate_lab_pki(&LabPkiRequest {
                out_dir: dir.clone(),
                server_names: vec!["localhost".into()],
                client_names: vec![],
                days: 1,
                force: false,
                key_type,
            })
            .expect("lab PKI");
            for (cert, key) in [
                ("server.pem", "server.key.pem"),
                ("client.pem", "client.key.pem"),
            ] {
                let loaded = load_private_key(&dir.join(key)).expect("key loads");
                assert_eq!(loaded.kind(), kind, "{key_type:?} {key}");
                let chain = load_certificates(&dir.join(cert)).expect("cert loads");
                assert!(super::super::public_key_matches(&chain[0], &loaded).expect("match"));
                let (_, parsed) = x509_parser::parse_x509_certificate(&chain[0]).expect("x509");
                assert_eq!(
                    ntp_dtls_proto::policy::check_certificate(&parsed),
                    Ok(kind),
                    "{key_type:?}: in the policy"
                );
            }
            let ca = load_certificates(&dir.join(super::super::CA_CERT_FILE)).expect("CA");
            let (_, ca) = x509_parser::parse_x509_certificate(&ca[0]).expect("x509");
            assert!(ntp_dtls_proto::policy::check_certificate(&ca).is_ok());
            let _ = fs::remove_dir_all(&dir);
        }
    }

    fn request_of(path: &Path) -> Vec<u8> {
        use rustls_pki_types::CertificateSigningRequestDer;
        use rustls_pki_types::pem::PemObject;
        let pem = fs::read(path).expect("csr");
        let der =
            CertificateSigningRequestDer::from_pem_slice(&pem).expect("PEM CERTIFICATE REQUEST");
        der.as_ref().to_vec()
    }

    #[test]
    fn a_request_has_the_names_the_role_and_a_private_key_file() {
        let dir = temp_dir("csr");
        let written = generate_request(&CsrRequest {
            out_dir: dir.clone(),
            role: RequestRole::Server,
            names: vec!["time.example.net".into(), "192.0.2.10".into()],
            key_type: KeyType::EcdsaP384,
            force: false,
        })
        .expect("request");
        assert_eq!(
            written,
            vec![dir.join("server.key.pem"), dir.join(SERVER_CSR_FILE)]
        );
        let mode = fs::metadata(&written[0]).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(
            load_private_key(&written[0]).expect("key loads").kind(),
            KeyKind::EcdsaP384
        );
        let der = request_of(&written[1]);
        let (_, csr) = X509CertificationRequest::from_der(&der).expect("PKCS#10");
        let info = &csr.certification_request_info;
        assert_eq!(info.subject.to_string(), "CN=time.example.net");
        let mut sans = Vec::new();
        let mut server_auth = None;
        for ext in csr.requested_extensions().into_iter().flatten() {
            match ext {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        match name {
                            GeneralName::DNSName(d) => sans.push(format!("DNS:{d}")),
                            GeneralName::IPAddress(ip) => sans.push(format!("IP:{ip:?}")),
                            _ => {}
                        }
                    }
                }
                ParsedExtension::ExtendedKeyUsage(eku) => {
                    server_auth = Some((eku.server_auth, eku.client_auth))
                }
                _ => {}
            }
        }
        assert_eq!(sans, vec!["DNS:time.example.net", "IP:[192, 0, 2, 10]"]);
        assert_eq!(server_auth, Some((true, false)));

        // Nothing is overwritten without force; a server request needs a name.
        assert!(matches!(
            generate_request(&CsrRequest {
                out_dir: dir.clone(),
                role: RequestRole::Server,
                names: vec!["x".into()],
                key_type: KeyType::EcdsaP256,
                force: false,
            }),
            Err(PkiError::AlreadyExists { .. })
        ));
        assert!(matches!(
            generate_request(&CsrRequest {
                out_dir: dir.clone(),
                role: RequestRole::Server,
                names: vec![],
                key_type: KeyType::EcdsaP256,
                force: true,
            }),
            Err(PkiError::InvalidRequest(_))
        ));
        // A client request defaults its name and asks for clientAuth.
        let written = generate_request(&CsrRequest {
            out_dir: dir.clone(),
            role: RequestRole::Client,
            names: vec![],
            key_type: KeyType::EcdsaP256,
            force: false,
        })
        .expect("client request");
        let der = request_of(&written[1]);
        let (_, csr) = X509CertificationRequest::from_der(&der).expect("PKCS#10");
        assert_eq!(
            csr.certification_request_info.subject.to_string(),
            format!("CN={DEFAULT_CLIENT_NAME}")
        );
        let eku = csr
            .requested_extensions()
            .into_iter()
            .flatten()
            .find_map(|e| match e {
                ParsedExtension::ExtendedKeyUsage(eku) => Some((eku.server_auth, eku.client_auth)),
                _ => None,
            });
        assert_eq!(eku, Some((false, true)));
        let _ = fs::remove_dir_all(&dir);
    }
}
