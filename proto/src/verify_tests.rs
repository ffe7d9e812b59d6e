//! The policy and revocation rules over certificates and CRLs generated with rcgen, on a fixed
//! clock.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    PKCS_ECDSA_P256_SHA256, RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;

use super::*;

/// 2026-01-01T00:00:00Z: every certificate here is valid from a year before to a year after.
const NOW: u64 = 1_767_225_600;
const DAY: u64 = 86_400;

/// A date rcgen takes (its `time` type, which this crate does not name).
macro_rules! at {
    ($unix:expr) => {
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs($unix)
    };
}

fn key() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key")
}

fn named(cn: &str, serial: u64) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.serial_number = Some(SerialNumber::from(serial));
    params.not_before = at!(NOW - 365 * DAY);
    params.not_after = at!(NOW + 365 * DAY);
    params.use_authority_key_identifier_extension = true;
    params
}

/// A CA certificate: its DER and what it signs with (`signing` may claim usages the certificate
/// lacks, so that a CRL can be signed by a CA whose certificate has no cRLSign).
struct Ca {
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn root(cn: &str, usages: Vec<KeyUsagePurpose>) -> Ca {
        let key = key();
        let mut params = named(cn, 1);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = usages;
        let cert = params.self_signed(&key).expect("root");
        Ca::signing_as(cert.der().clone(), params, key)
    }

    fn signing_as(der: CertificateDer<'static>, mut params: CertificateParams, key: KeyPair) -> Ca {
        // rcgen refuses to sign a CRL for an issuer whose usages lack cRLSign.
        if !params.key_usages.is_empty() && !params.key_usages.contains(&KeyUsagePurpose::CrlSign) {
            params.key_usages.push(KeyUsagePurpose::CrlSign);
        }
        Ca {
            der,
            issuer: Issuer::new(params, key),
        }
    }

    fn intermediate(&self, cn: &str, serial: u64, is_ca: IsCa, usages: Vec<KeyUsagePurpose>) -> Ca {
        let key = key();
        let mut params = named(cn, serial);
        params.is_ca = is_ca;
        params.key_usages = usages;
        let cert = params.signed_by(&key, &self.issuer).expect("intermediate");
        Ca::signing_as(cert.der().clone(), params, key)
    }

    fn leaf(
        &self,
        serial: u64,
        eku: Vec<ExtendedKeyUsagePurpose>,
        usages: Vec<KeyUsagePurpose>,
    ) -> CertificateDer<'static> {
        let key = key();
        let mut params = named("leaf.test", serial);
        params.subject_alt_names = vec![SanType::DnsName("leaf.test".try_into().expect("name"))];
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = eku;
        params.key_usages = usages;
        params
            .signed_by(&key, &self.issuer)
            .expect("leaf")
            .der()
            .clone()
    }

    fn server_leaf(&self, serial: u64) -> CertificateDer<'static> {
        self.leaf(
            serial,
            vec![ExtendedKeyUsagePurpose::ServerAuth],
            vec![KeyUsagePurpose::DigitalSignature],
        )
    }

    /// A CRL of this CA revoking `serials`, valid from `this_update` to `next_update`.
    fn crl_at(&self, serials: &[u64], this_update: u64, next_update: u64) -> Vec<u8> {
        CertificateRevocationListParams {
            this_update: at!(this_update),
            next_update: at!(next_update),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: serials
                .iter()
                .map(|s| RevokedCertParams {
                    serial_number: SerialNumber::from(*s),
                    revocation_time: at!(NOW - DAY),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.issuer)
        .expect("CRL")
        .der()
        .to_vec()
    }

    fn crl(&self, serials: &[u64]) -> Vec<u8> {
        self.crl_at(serials, NOW - DAY, NOW + 7 * DAY)
    }
}

fn ca_usages() -> Vec<KeyUsagePurpose> {
    vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign]
}

/// root → intermediate (serial 10) → leaf (serial 100).
fn two_level() -> (Ca, Ca, CertificateDer<'static>) {
    let root = Ca::root("test root", ca_usages());
    let inter = root.intermediate(
        "test intermediate",
        10,
        IsCa::Ca(BasicConstraints::Unconstrained),
        ca_usages(),
    );
    let leaf = inter.server_leaf(100);
    (root, inter, leaf)
}

fn verifier(role: PeerRole, root: &Ca, mode: RevocationMode, crls: Vec<Vec<u8>>) -> PeerVerifier {
    PeerVerifier::new(
        role,
        std::slice::from_ref(&root.der),
        &Verification {
            revocation: mode,
            crls,
            clock: WallClock::fixed(NOW),
        },
    )
    .expect("verifier")
}

fn chain(certs: &[&CertificateDer<'static>]) -> Vec<Vec<u8>> {
    certs.iter().map(|c| c.to_vec()).collect()
}

fn refused(result: Result<(), Box<Refusal>>) -> (Position, Problem) {
    let refusal = result.expect_err("refused");
    // Every refusal names the certificate: an audit line needs subject and serial.
    assert_ne!(refusal.subject, "-", "{refusal}");
    assert_ne!(refusal.serial, "-", "{refusal}");
    (refusal.position, refusal.problem)
}

#[test]
fn a_good_chain_is_accepted_in_every_mode() {
    let (root, inter, leaf) = two_level();
    let crls = vec![root.crl(&[]), inter.crl(&[])];
    for mode in [
        RevocationMode::Off,
        RevocationMode::IfAvailable,
        RevocationMode::Require,
    ] {
        let v = verifier(PeerRole::Server, &root, mode, crls.clone());
        assert_eq!(v.verify(&chain(&[&leaf, &inter.der])), Ok(()), "{mode}");
    }
    let client = inter.leaf(
        101,
        vec![ExtendedKeyUsagePurpose::ClientAuth],
        vec![KeyUsagePurpose::DigitalSignature],
    );
    let v = verifier(PeerRole::Client, &root, RevocationMode::Require, crls);
    assert_eq!(v.verify(&chain(&[&client, &inter.der])), Ok(()));
}

#[test]
fn a_leaf_without_eku_is_refused_in_both_roles() {
    let root = Ca::root("root", ca_usages());
    let leaf = root.leaf(5, vec![], vec![KeyUsagePurpose::DigitalSignature]);
    for role in [PeerRole::Server, PeerRole::Client] {
        let v = verifier(role, &root, RevocationMode::Off, vec![]);
        let result = v.verify(&chain(&[&leaf]));
        let text = result.clone().expect_err("refused").to_string();
        assert_eq!(refused(result), (Position::Leaf, Problem::NoEku { role }));
        assert!(
            text.contains("serial=05") && text.contains("no extendedKeyUsage"),
            "{text}"
        );
    }
}

#[test]
fn the_eku_must_name_the_role() {
    let root = Ca::root("root", ca_usages());
    let server = root.server_leaf(6);
    let v = verifier(PeerRole::Client, &root, RevocationMode::Off, vec![]);
    // webpki refuses an EKU that is present and lacks the purpose; so do we (either message).
    assert!(v.verify(&chain(&[&server])).is_err());
    let leaf = root.leaf(
        7,
        vec![ExtendedKeyUsagePurpose::CodeSigning],
        vec![KeyUsagePurpose::DigitalSignature],
    );
    let parsed = parse_cert(&leaf).expect("parse");
    assert_eq!(
        check_end_entity(&parsed, PeerRole::Server),
        Err(Problem::WrongEku {
            role: PeerRole::Server,
            found: "codeSigning".into()
        })
    );
}

#[test]
fn a_leaf_with_key_agreement_only_is_refused_in_both_roles() {
    let root = Ca::root("root", ca_usages());
    for (role, eku) in [
        (PeerRole::Server, ExtendedKeyUsagePurpose::ServerAuth),
        (PeerRole::Client, ExtendedKeyUsagePurpose::ClientAuth),
    ] {
        let leaf = root.leaf(8, vec![eku], vec![KeyUsagePurpose::KeyAgreement]);
        let v = verifier(role, &root, RevocationMode::Off, vec![]);
        let (position, problem) = refused(v.verify(&chain(&[&leaf])));
        assert_eq!(position, Position::Leaf);
        assert!(
            matches!(&problem, Problem::NoDigitalSignature { found } if found == "Key Agreement"),
            "{problem}"
        );
    }
    // No keyUsage at all is allowed for a leaf (RFC 5280 makes it optional there).
    let leaf = root.leaf(9, vec![ExtendedKeyUsagePurpose::ServerAuth], vec![]);
    let v = verifier(PeerRole::Server, &root, RevocationMode::Off, vec![]);
    assert_eq!(v.verify(&chain(&[&leaf])), Ok(()));
}

#[test]
fn an_intermediate_without_key_cert_sign_is_refused() {
    let root = Ca::root("root", ca_usages());
    for usages in [vec![KeyUsagePurpose::DigitalSignature], vec![]] {
        let inter = root.intermediate(
            "no-certsign intermediate",
            11,
            IsCa::Ca(BasicConstraints::Unconstrained),
            usages.clone(),
        );
        let leaf = inter.server_leaf(102);
        let v = verifier(PeerRole::Server, &root, RevocationMode::Off, vec![]);
        let refusal = v.verify(&chain(&[&leaf, &inter.der])).expect_err("refused");
        assert_eq!(refusal.position, Position::Issuer(1), "{usages:?}");
        assert!(
            matches!(refusal.problem, Problem::NoKeyCertSign { .. }),
            "{refusal}"
        );
        assert_eq!(refusal.serial, "0B");
        assert!(refusal.subject.contains("no-certsign"), "{refusal}");
    }
}

#[test]
fn a_revoked_leaf_is_refused_and_named() {
    let (root, inter, leaf) = two_level();
    let crls = vec![root.crl(&[]), inter.crl(&[100])];
    for mode in [RevocationMode::Require, RevocationMode::IfAvailable] {
        let v = verifier(PeerRole::Server, &root, mode, crls.clone());
        let refusal = v.verify(&chain(&[&leaf, &inter.der])).expect_err("refused");
        assert_eq!(refusal.position, Position::Leaf);
        assert_eq!(refusal.serial, "64");
        assert!(
            matches!(&refusal.problem, Problem::Revoked { issuer, reason, .. }
                if issuer == "CN=test intermediate" && reason == "keyCompromise"),
            "{refusal}"
        );
        assert!(
            refusal
                .to_string()
                .starts_with("server leaf subject=\"CN=leaf.test\" serial=64: revoked"),
            "{refusal}"
        );
    }
    // Off: CRLs are not consulted.
    let v = verifier(PeerRole::Server, &root, RevocationMode::Off, crls);
    assert_eq!(v.verify(&chain(&[&leaf, &inter.der])), Ok(()));
}

#[test]
fn a_revoked_intermediate_is_refused_and_named() {
    let (root, inter, leaf) = two_level();
    let v = verifier(
        PeerRole::Server,
        &root,
        RevocationMode::Require,
        vec![root.crl(&[10]), inter.crl(&[])],
    );
    let refusal = v.verify(&chain(&[&leaf, &inter.der])).expect_err("refused");
    assert_eq!(refusal.position, Position::Issuer(1));
    assert_eq!(refusal.serial, "0A");
    assert!(
        matches!(refusal.problem, Problem::Revoked { .. }),
        "{refusal}"
    );
}

#[test]
fn a_missing_crl_refuses_under_require_only() {
    let (root, inter, leaf) = two_level();
    // The intermediate's CRL covers the leaf; nothing covers the intermediate.
    let crls = vec![inter.crl(&[])];
    let v = verifier(
        PeerRole::Server,
        &root,
        RevocationMode::Require,
        crls.clone(),
    );
    let refusal = v.verify(&chain(&[&leaf, &inter.der])).expect_err("refused");
    assert_eq!(refusal.position, Position::Issuer(1));
    assert_eq!(
        refusal.problem,
        Problem::NoCrl {
            issuer: "CN=test root".into()
        }
    );
    let v = verifier(PeerRole::Server, &root, RevocationMode::IfAvailable, crls);
    assert_eq!(v.verify(&chain(&[&leaf, &inter.der])), Ok(()));
    // Require with no CRL at all: nothing is covered.
    let v = verifier(PeerRole::Server, &root, RevocationMode::Require, vec![]);
    assert!(matches!(
        refused(v.verify(&chain(&[&leaf, &inter.der]))),
        (Position::Leaf, Problem::NoCrl { .. })
    ));
}

#[test]
fn an_expired_crl_refuses_under_require_and_still_revokes_if_available() {
    let (root, inter, leaf) = two_level();
    let stale = inter.crl_at(&[], NOW - 10 * DAY, NOW - DAY);
    let crls = vec![root.crl(&[]), stale];
    let v = verifier(
        PeerRole::Server,
        &root,
        RevocationMode::Require,
        crls.clone(),
    );
    let (position, problem) = refused(v.verify(&chain(&[&leaf, &inter.der])));
    assert_eq!(position, Position::Leaf);
    assert!(
        matches!(&problem, Problem::CrlExpired { issuer, .. } if issuer == "CN=test intermediate"),
        "{problem}"
    );
    let v = verifier(PeerRole::Server, &root, RevocationMode::IfAvailable, crls);
    assert_eq!(v.verify(&chain(&[&leaf, &inter.der])), Ok(()));
    let stale_revoking = inter.crl_at(&[100], NOW - 10 * DAY, NOW - DAY);
    let v = verifier(
        PeerRole::Server,
        &root,
        RevocationMode::IfAvailable,
        vec![root.crl(&[]), stale_revoking],
    );
    assert!(matches!(
        refused(v.verify(&chain(&[&leaf, &inter.der]))),
        (Position::Leaf, Problem::Revoked { .. })
    ));
}

#[test]
fn a_crl_signed_by_the_wrong_key_is_refused_in_both_modes() {
    let (root, inter, leaf) = two_level();
    // Same issuer name, another key.
    let impostor = Ca::root("test intermediate", ca_usages());
    let forged = impostor.crl(&[]);
    for mode in [RevocationMode::Require, RevocationMode::IfAvailable] {
        let v = verifier(
            PeerRole::Server,
            &root,
            mode,
            vec![root.crl(&[]), forged.clone()],
        );
        let (position, problem) = refused(v.verify(&chain(&[&leaf, &inter.der])));
        assert_eq!(position, Position::Leaf, "{mode}");
        assert_eq!(
            problem,
            Problem::CrlBadSignature {
                issuer: "CN=test intermediate".into()
            }
        );
    }
}

#[test]
fn a_crl_issuer_without_crl_sign_is_refused() {
    let root = Ca::root("root without crlsign", vec![KeyUsagePurpose::KeyCertSign]);
    let leaf = root.server_leaf(12);
    let v = verifier(
        PeerRole::Server,
        &root,
        RevocationMode::IfAvailable,
        vec![root.crl(&[])],
    );
    let (_, problem) = refused(v.verify(&chain(&[&leaf])));
    assert!(
        matches!(&problem, Problem::IssuerNotCrlSigner { issuer } if issuer == "CN=root without crlsign"),
        "{problem}"
    );
    let parsed = parse_cert(&root.der).expect("root");
    assert!(check_crl_issuer(&parsed).is_err());
    assert_eq!(
        check_crl_signed_by(&root.crl(&[]), &root.der),
        Some(Err(Problem::IssuerNotCrlSigner {
            issuer: "CN=root without crlsign".into()
        }))
    );
}

#[test]
fn crl_summaries_and_signatures_at_load_time() {
    let (root, inter, _) = two_level();
    let crl = root.crl(&[10, 11]);
    let summary = summarize_crl(&crl).expect("summary");
    assert_eq!(summary.issuer, "CN=test root");
    assert_eq!(summary.revoked, 2);
    assert_eq!(summary.next_update_unix, Some((NOW + 7 * DAY) as i64));
    assert_eq!(check_crl_signed_by(&crl, &root.der), Some(Ok(())));
    assert_eq!(
        check_crl_signed_by(&crl, &inter.der),
        None,
        "another issuer"
    );
    let impostor = Ca::root("test root", ca_usages());
    assert!(matches!(
        check_crl_signed_by(&impostor.crl(&[]), &root.der),
        Some(Err(Problem::CrlBadSignature { .. }))
    ));
    assert!(summarize_crl(b"not a CRL").is_err());
    let mut trailing = crl.clone();
    trailing.push(0);
    assert!(summarize_crl(&trailing).is_err());
}

#[test]
fn validity_is_judged_by_the_given_clock() {
    let (root, inter, leaf) = two_level();
    let v = PeerVerifier::new(
        PeerRole::Server,
        std::slice::from_ref(&root.der),
        &Verification::without_revocation(WallClock::fixed(NOW + 400 * DAY)),
    )
    .expect("verifier");
    let (_, problem) = refused(v.verify(&chain(&[&leaf, &inter.der])));
    assert!(matches!(problem, Problem::Chain(_)), "{problem}");
}

#[test]
fn revocation_modes_round_trip_their_labels() {
    for mode in [
        RevocationMode::Off,
        RevocationMode::IfAvailable,
        RevocationMode::Require,
    ] {
        assert_eq!(RevocationMode::parse(mode.label()), Some(mode));
    }
    assert_eq!(RevocationMode::parse("maybe"), None);
}
