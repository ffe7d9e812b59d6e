//! The declared DTLS policy, in one place: what both relays offer, and what they accept from a
//! peer. `engine::rtc` configures rtc-dtls from these lists and calls the checks below on every
//! peer certificate chain and every handshake signature; nothing (no flag, no config key)
//! widens any of it.
//!
//! - Protocol: DTLS 1.2 only, the extended master secret (RFC 7627) required.
//! - Key exchange: ECDHE over secp256r1 or secp384r1 (the server prefers secp256r1).
//! - Cipher suites: TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256 and
//!   TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256 (the one matching the server's key).
//! - Certificates (ours and the peer's whole chain): ECDSA keys on P-256 or P-384, RSA keys of
//!   2048 to 4096 bits; signed with ECDSA or RSASSA-PKCS1-v1_5 over SHA-256 or SHA-384.
//! - Handshake signatures (ServerKeyExchange, CertificateVerify): ecdsa_secp256r1_sha256,
//!   ecdsa_secp384r1_sha384, rsa_pkcs1_sha256, rsa_pkcs1_sha384 (in TLS 1.2 the ECDSA pairs
//!   name a hash, not a curve: a P-256 key may sign with SHA-384 and a P-384 key with SHA-256).
//!
//! Trust anchors are checked at start-up (their key must be in the policy); presented
//! certificates during the handshake, with an audit reason naming the certificate.

use x509_parser::certificate::X509Certificate;
use x509_parser::oid_registry::{
    OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_SIG_ECDSA_WITH_SHA256,
    OID_SIG_ECDSA_WITH_SHA384, Oid,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::{PublicKey, RSAPublicKey};
use x509_parser::x509::SubjectPublicKeyInfo;

use crate::identity::KeyKind;

/// The policy in one line, for `--help`, logs and refusals.
pub const SUMMARY: &str = "DTLS 1.2 with the extended master secret; ECDHE over secp256r1/secp384r1; AES-128-GCM; ECDSA P-256/P-384 or RSA 2048-4096 certificates; SHA-256/SHA-384 signatures";

/// The cipher suites both roles offer, by their IANA names.
pub const CIPHER_SUITES: &[&str] = &[
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
];

/// The ECDHE groups, in the server's order of preference.
pub const GROUPS: &[&str] = &["secp256r1", "secp384r1"];

/// The signature_algorithms both roles send, by their TLS 1.3 names.
pub const SIGNATURE_SCHEMES: &[&str] = &[
    "ecdsa_secp256r1_sha256",
    "ecdsa_secp384r1_sha384",
    "rsa_pkcs1_sha256",
    "rsa_pkcs1_sha384",
];

/// RSA moduli outside this range are refused, ours and the peer's.
pub const RSA_MIN_BITS: usize = 2048;
pub const RSA_MAX_BITS: usize = 4096;

/// The key types the policy allows, for messages.
pub const KEY_TYPES: &str = "ECDSA P-256, ECDSA P-384, RSA 2048-4096 bits";

/// Marks a refusal as a policy one in the error strings rtc-dtls carries back to us.
pub(crate) const VIOLATION_MARKER: &str = "outside the key policy: ";

/// The kind of key in a SubjectPublicKeyInfo, or why the policy refuses it.
pub fn check_public_key(spki: &SubjectPublicKeyInfo<'_>) -> Result<KeyKind, String> {
    let alg = &spki.algorithm.algorithm;
    if *alg == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok());
        return match curve {
            Some(c) if c == OID_EC_P256 => Ok(KeyKind::EcdsaP256),
            Some(c) if c == OID_NIST_EC_P384 => Ok(KeyKind::EcdsaP384),
            Some(c) => Err(format!(
                "an ECDSA key on curve {} (P-256 or P-384 only)",
                curve_name(&c)
            )),
            None => Err("an ECDSA key without a named curve (P-256 or P-384 only)".into()),
        };
    }
    if *alg == OID_PKCS1_RSAENCRYPTION {
        return match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa_kind(modulus_bits(rsa.modulus)),
            _ => Err("a malformed RSA public key".into()),
        };
    }
    let name = algorithm_name(alg);
    let article = if name.starts_with(['E', 'R']) {
        "an"
    } else {
        "a"
    };
    Err(format!("{article} {name} key ({KEY_TYPES} only)"))
}

/// An RSA key of `bits`, or why the policy refuses it.
pub fn rsa_kind(bits: usize) -> Result<KeyKind, String> {
    if (RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
        Ok(KeyKind::Rsa { bits })
    } else {
        Err(format!(
            "an RSA key of {bits} bits ({RSA_MIN_BITS} to {RSA_MAX_BITS} only)"
        ))
    }
}

/// Bits in a big-endian unsigned integer (an RSA modulus as DER holds it).
pub fn modulus_bits(bytes: &[u8]) -> usize {
    let Some(start) = bytes.iter().position(|&b| b != 0) else {
        return 0;
    };
    (bytes.len() - start) * 8 - bytes[start].leading_zeros() as usize
}

/// Bits of the modulus of a PKCS#1 RSAPublicKey (what a handshake signature is checked with).
pub fn rsa_public_key_bits(der: &[u8]) -> Option<usize> {
    RSAPublicKey::from_der(der)
        .ok()
        .map(|(_, key)| modulus_bits(key.modulus))
}

/// Checks one certificate's own key and the algorithm its issuer signed it with.
pub fn check_certificate(cert: &X509Certificate<'_>) -> Result<KeyKind, String> {
    let kind = check_public_key(cert.public_key())?;
    let sig = &cert.signature_algorithm.algorithm;
    let allowed = [
        OID_SIG_ECDSA_WITH_SHA256,
        OID_SIG_ECDSA_WITH_SHA384,
        OID_PKCS1_SHA256WITHRSA,
        OID_PKCS1_SHA384WITHRSA,
    ];
    if !allowed.contains(sig) {
        return Err(format!(
            "signed with {} (ECDSA or RSA PKCS#1 with SHA-256 or SHA-384 only)",
            algorithm_name(sig)
        ));
    }
    Ok(kind)
}

/// Checks every certificate a peer presented (leaf first). The error names the certificate
/// (its position and subject) and what about it the policy refuses.
pub fn check_chain<C: AsRef<[u8]>>(chain: &[C]) -> Result<(), String> {
    for (i, der) in chain.iter().enumerate() {
        let what = if i == 0 {
            "leaf".to_string()
        } else {
            format!("chain certificate {}", i + 1)
        };
        let (_, cert) = X509Certificate::from_der(der.as_ref())
            .map_err(|e| format!("{what}: not a certificate: {e}"))?;
        check_certificate(&cert)
            .map_err(|reason| format!("{what} \"{}\": {reason}", cert.subject()))?;
    }
    Ok(())
}

fn curve_name(oid: &Oid<'_>) -> String {
    match oid.to_id_string().as_str() {
        "1.3.132.0.35" => "secp521r1 (P-521)".into(),
        "1.3.132.0.10" => "secp256k1".into(),
        "1.3.132.0.33" => "secp224r1 (P-224)".into(),
        "1.2.840.10045.3.1.1" => "prime192v1 (P-192)".into(),
        "1.3.36.3.3.2.8.1.1.7" => "brainpoolP256r1".into(),
        other => other.into(),
    }
}

fn algorithm_name(oid: &Oid<'_>) -> String {
    let name = match oid.to_id_string().as_str() {
        "1.2.840.113549.1.1.5" => "sha1WithRSAEncryption (SHA-1)",
        "1.2.840.113549.1.1.4" => "md5WithRSAEncryption (MD5)",
        "1.2.840.113549.1.1.13" => "sha512WithRSAEncryption (SHA-512)",
        "1.2.840.113549.1.1.14" => "sha224WithRSAEncryption (SHA-224)",
        "1.2.840.113549.1.1.10" => "RSASSA-PSS",
        "1.2.840.10045.4.1" => "ecdsa-with-SHA1 (SHA-1)",
        "1.2.840.10045.4.3.4" => "ecdsa-with-SHA512 (SHA-512)",
        "1.2.840.10040.4.1" => "DSA",
        "1.2.840.10040.4.3" => "dsa-with-SHA1",
        "1.3.101.112" => "Ed25519",
        "1.3.101.113" => "Ed448",
        other => return other.to_string(),
    };
    name.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ECDSA_P384_SHA384, PKCS_ED25519,
    };

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = KeyPair::generate_for(alg).expect("key");
        CertificateParams::new(vec!["x".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert")
            .der()
            .to_vec()
    }

    #[test]
    fn ecdsa_p256_and_p384_are_in_the_policy() {
        assert_eq!(check_chain(&[cert_with(&PKCS_ECDSA_P256_SHA256)]), Ok(()));
        assert_eq!(check_chain(&[cert_with(&PKCS_ECDSA_P384_SHA384)]), Ok(()));
        let der = cert_with(&PKCS_ECDSA_P384_SHA384);
        let (_, cert) = X509Certificate::from_der(&der).expect("parse");
        assert_eq!(check_certificate(&cert), Ok(KeyKind::EcdsaP384));
    }

    #[test]
    fn other_key_types_are_refused_with_the_reason() {
        let err = check_chain(&[cert_with(&PKCS_ED25519)]).expect_err("Ed25519");
        assert_eq!(
            err,
            "leaf \"CN=rcgen self signed cert\": an Ed25519 key (ECDSA P-256, ECDSA P-384, RSA 2048-4096 bits only)"
        );
    }

    #[test]
    fn openssl_made_certificates_outside_the_policy_are_refused() {
        let rsa1024 = include_bytes!("testdata/rsa1024.cert.der");
        assert_eq!(
            check_chain(&[&rsa1024[..]]),
            Err("leaf \"CN=rsa1024\": an RSA key of 1024 bits (2048 to 4096 only)".into())
        );
        let p521 = include_bytes!("testdata/p521.cert.der");
        assert_eq!(
            check_chain(&[&p521[..]]),
            Err(
                "leaf \"CN=p521\": an ECDSA key on curve secp521r1 (P-521) (P-256 or P-384 only)"
                    .into()
            )
        );
        let sha1 = include_bytes!("testdata/rsa2048-sha1.cert.der");
        assert_eq!(
            check_chain(&[&sha1[..]]),
            Err("leaf \"CN=sha1\": signed with sha1WithRSAEncryption (SHA-1) (ECDSA or RSA PKCS#1 with SHA-256 or SHA-384 only)".into())
        );
        // A good leaf does not hide a bad certificate further up.
        let good = cert_with(&PKCS_ECDSA_P256_SHA256);
        let err = check_chain(&[&good[..], &rsa1024[..]]).expect_err("second is bad");
        assert!(
            err.starts_with("chain certificate 2 \"CN=rsa1024\""),
            "{err}"
        );
    }

    #[test]
    fn rsa_sizes_outside_2048_to_4096_are_refused() {
        assert_eq!(rsa_kind(2048), Ok(KeyKind::Rsa { bits: 2048 }));
        assert_eq!(rsa_kind(4096), Ok(KeyKind::Rsa { bits: 4096 }));
        assert_eq!(
            rsa_kind(1024),
            Err("an RSA key of 1024 bits (2048 to 4096 only)".into())
        );
        assert!(rsa_kind(2047).is_err());
        assert!(rsa_kind(4097).is_err());
        assert!(rsa_kind(8192).is_err());
    }

    #[test]
    fn modulus_bits_ignore_the_sign_byte() {
        assert_eq!(modulus_bits(&[0x00, 0x80, 0x00]), 16);
        assert_eq!(modulus_bits(&[0x01, 0xff]), 9);
        assert_eq!(modulus_bits(&[0, 0]), 0);
        assert_eq!(modulus_bits(&[]), 0);
    }
}
