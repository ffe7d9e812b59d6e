//! An in-memory lab PKI for the protocol core's tests: a CA, server and client leaves, as
//! `ntp-dtls certs` makes them (ECDSA P-256, CA:TRUE with keyCertSign and cRLSign, leaves
//! CA:FALSE with digitalSignature and the one EKU of their role). No file is written. CAs and
//! leaves can also be ECDSA P-384 or RSA ([`TestKey`]); RSA keys are fixed ones from
//! `testdata/` (ring generates no RSA keys), RSA-3072 for CAs and RSA-2048 for leaves.
//!
//! Compiled for this crate's tests, and for other crates' tests with the `test-pki` feature.

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384,
    PKCS_RSA_SHA256, SanType,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::PrivatePkcs8KeyDer;

use crate::engine::{ClientSettings, ServerSettings};
use crate::identity::{Identity, KeyKind, PrivateKey};

/// The key type of a test CA or leaf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TestKey {
    EcdsaP256,
    EcdsaP384,
    Rsa,
}

const RSA_CA_KEY: &[u8] = include_bytes!("testdata/rsa3072.pk8.der");
const RSA_LEAF_KEY: &[u8] = include_bytes!("testdata/rsa2048.pk8.der");

impl TestKey {
    fn generate(self, ca: bool) -> (KeyPair, KeyKind) {
        match self {
            TestKey::EcdsaP256 => (
                KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key"),
                KeyKind::EcdsaP256,
            ),
            TestKey::EcdsaP384 => (
                KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("P-384 key"),
                KeyKind::EcdsaP384,
            ),
            TestKey::Rsa => {
                let (der, bits) = if ca {
                    (RSA_CA_KEY, 3072)
                } else {
                    (RSA_LEAF_KEY, 2048)
                };
                let key = KeyPair::from_pkcs8_der_and_sign_algo(
                    &PrivatePkcs8KeyDer::from(der),
                    &PKCS_RSA_SHA256,
                )
                .expect("RSA test key");
                (key, KeyKind::Rsa { bits })
            }
        }
    }
}

/// One CA and what it issues.
pub struct TestPki {
    pub ca: CertificateDer<'static>,
    ca_key: KeyPair,
    ca_params: CertificateParams,
}

impl TestPki {
    pub fn new(ca_name: &str) -> TestPki {
        Self::with_key(ca_name, TestKey::EcdsaP256)
    }

    /// A CA whose own key is `key`.
    pub fn with_key(ca_name: &str, key: TestKey) -> TestPki {
        let (ca_key, _) = key.generate(true);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, ca_name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = params.self_signed(&ca_key).expect("CA certificate");
        TestPki {
            ca: ca.der().clone(),
            ca_key,
            ca_params: params,
        }
    }

    /// A leaf for `names` (DNS names or IP addresses; the first is also the CN).
    pub fn leaf(&self, names: &[&str], eku: ExtendedKeyUsagePurpose) -> Identity {
        self.leaf_with(names, eku, TestKey::EcdsaP256)
    }

    /// A leaf whose key is `key`.
    pub fn leaf_with(
        &self,
        names: &[&str],
        eku: ExtendedKeyUsagePurpose,
        key: TestKey,
    ) -> Identity {
        let (key, kind) = key.generate(false);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, names.first().copied().unwrap_or("leaf"));
        params.distinguished_name = dn;
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*name).try_into().expect("DNS name")),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![eku];
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).expect("leaf certificate");
        Identity {
            chain: vec![cert.der().clone()],
            key: PrivateKey::from_pkcs8(kind, key.serialize_der()),
        }
    }

    pub fn server(&self, names: &[&str]) -> Identity {
        self.leaf(names, ExtendedKeyUsagePurpose::ServerAuth)
    }

    pub fn client(&self, name: &str) -> Identity {
        self.leaf(&[name], ExtendedKeyUsagePurpose::ClientAuth)
    }

    /// Client settings trusting this CA and expecting `server_name`.
    pub fn client_settings(&self, server_name: &str, identity: Option<Identity>) -> ClientSettings {
        ClientSettings {
            roots: vec![self.ca.clone()],
            server_name: server_name.into(),
            identity,
        }
    }

    /// Server settings for a leaf of this CA named `names`, optionally requiring clients of
    /// `client_ca`.
    pub fn server_settings(&self, names: &[&str], client_ca: Option<&TestPki>) -> ServerSettings {
        ServerSettings {
            identity: self.server(names),
            client_roots: client_ca.map(|ca| vec![ca.ca.clone()]),
        }
    }
}

/// A self-signed certificate for `name`, DER.
pub fn self_signed(name: &str) -> Vec<u8> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    CertificateParams::new(vec![name.to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate")
        .der()
        .to_vec()
}
