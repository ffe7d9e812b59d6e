//! Certificate policy and revocation: the one place that decides whether a peer's chain is
//! acceptable beyond what rtc-dtls's rustls verifier already checked (path to a trusted CA,
//! validity, the reference identifier, an EKU if one is present).
//!
//! What is added here, for both roles (NDcPP FIA_X509_EXT.1, PKG_TLS):
//!
//! - **EKU required.** A server leaf must carry extendedKeyUsage with serverAuth, a client leaf
//!   clientAuth. A leaf with no EKU extension is refused (rustls-webpki accepts it: it requires
//!   the purpose only if the extension is present).
//! - **keyUsage.** A leaf that has a keyUsage needs digitalSignature (ECDHE_ECDSA and
//!   ECDHE_RSA both sign with the leaf key); every issuing CA in the verified path needs
//!   basicConstraints CA:TRUE and a keyUsage with keyCertSign; the issuer of a CRL that is used
//!   needs cRLSign.
//! - **Revocation.** CRLs (rustls-webpki's CRL support) applied to every certificate of the
//!   verified path but the trust anchor, under [`RevocationMode`].
//!
//! rustls-webpki gives the verdict on the path and on revocation; x509-parser then names the
//! certificate concerned (webpki says "revoked", not which certificate), so every refusal says
//! subject, serial and reason. Pure: the wall clock is a parameter ([`WallClock`]).

use std::fmt;
use std::sync::Arc;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use webpki::{
    CertRevocationList, EndEntityCert, ExpirationPolicy, KeyUsage, OwnedCertRevocationList,
    RevocationCheckDepth, RevocationOptionsBuilder, UnknownStatusPolicy,
};
use x509_parser::certificate::X509Certificate;
use x509_parser::prelude::FromDer;
use x509_parser::revocation_list::CertificateRevocationList;

use crate::x509::{parse_cert, serial_hex};

/// Which role the holder of the certificate being verified plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    /// A server relay (or any DTLS server) our client relay connects to: needs serverAuth.
    Server,
    /// A client under `--client-ca`: needs clientAuth.
    Client,
}

impl PeerRole {
    fn eku_name(self) -> &'static str {
        match self {
            PeerRole::Server => "serverAuth",
            PeerRole::Client => "clientAuth",
        }
    }
}

impl fmt::Display for PeerRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PeerRole::Server => "server",
            PeerRole::Client => "client",
        })
    }
}

/// What to do about revocation. The configuration's default: [`RevocationMode::Require`] when
/// a CRL is configured, [`RevocationMode::Off`] when none is (docs/OPERATIONS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RevocationMode {
    /// No revocation check (CRLs, if any, are not read at handshakes).
    #[default]
    Off,
    /// Every CRL present is used (a revoked certificate is refused, so is a CRL with a bad
    /// signature); a certificate whose issuer has no CRL is accepted, and an expired CRL still
    /// revokes but its nextUpdate is not enforced.
    IfAvailable,
    /// Every certificate of the path but the trust anchor must be covered by a CRL of its
    /// issuer that is correctly signed and not expired; otherwise it is refused.
    Require,
}

impl RevocationMode {
    /// As the flag and the config file spell it.
    pub fn label(self) -> &'static str {
        match self {
            RevocationMode::Off => "off",
            RevocationMode::IfAvailable => "if-available",
            RevocationMode::Require => "require",
        }
    }

    pub fn parse(text: &str) -> Option<RevocationMode> {
        match text {
            "off" => Some(RevocationMode::Off),
            "if-available" => Some(RevocationMode::IfAvailable),
            "require" => Some(RevocationMode::Require),
            _ => None,
        }
    }
}

impl fmt::Display for RevocationMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// The wall clock, in seconds since 1970, as the shell reads it (certificate and CRL validity
/// are wall-clock questions). Tests pass a fixed one.
#[derive(Clone)]
pub struct WallClock(Arc<dyn Fn() -> u64 + Send + Sync>);

impl WallClock {
    pub fn new(read: impl Fn() -> u64 + Send + Sync + 'static) -> WallClock {
        WallClock(Arc::new(read))
    }

    /// A clock that always reads `unix_secs`.
    pub fn fixed(unix_secs: u64) -> WallClock {
        WallClock::new(move || unix_secs)
    }

    pub fn now(&self) -> u64 {
        (self.0)()
    }
}

impl fmt::Debug for WallClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WallClock(..)")
    }
}

/// What a relay checks a peer's chain against beyond the trust anchors: revocation, and the
/// clock to judge validity by.
#[derive(Clone, Debug)]
pub struct Verification {
    pub revocation: RevocationMode,
    /// DER CRLs (the shell reads PEM or DER files and re-reads them at SIGHUP).
    pub crls: Vec<Vec<u8>>,
    pub clock: WallClock,
}

impl Verification {
    /// No revocation check, judged by `clock`.
    pub fn without_revocation(clock: WallClock) -> Verification {
        Verification {
            revocation: RevocationMode::Off,
            crls: Vec::new(),
            clock,
        }
    }
}

/// Why a certificate is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error("no extendedKeyUsage extension (a {role} certificate must carry {role_eku})", role_eku = role.eku_name())]
    NoEku { role: PeerRole },
    #[error("extendedKeyUsage without {role_eku} (it has {found})", role_eku = role.eku_name())]
    WrongEku { role: PeerRole, found: String },
    #[error(
        "keyUsage without digitalSignature (it has {found}), so its key may not sign a handshake"
    )]
    NoDigitalSignature { found: String },
    #[error("issuing CA without basicConstraints CA:TRUE")]
    NotCa,
    #[error("issuing CA without keyUsage keyCertSign ({found})")]
    NoKeyCertSign { found: String },
    #[error("its CRL's issuer {issuer} has a keyUsage without cRLSign")]
    IssuerNotCrlSigner { issuer: String },
    #[error("revoked: listed in the CRL of {issuer} (revoked {date}, reason {reason})")]
    Revoked {
        issuer: String,
        date: String,
        reason: String,
    },
    #[error(
        "revocation status unknown: no CRL of its issuer {issuer} is configured (revocation = require)"
    )]
    NoCrl { issuer: String },
    #[error(
        "revocation status unknown: the CRL of {issuer} expired at {next_update} (revocation = require)"
    )]
    CrlExpired { issuer: String, next_update: String },
    #[error("the CRL of {issuer} is not signed by that issuer's key")]
    CrlBadSignature { issuer: String },
    #[error("{0}")]
    Chain(String),
    #[error("malformed certificate: {0}")]
    Malformed(String),
}

impl Problem {
    /// Revoked, or the status could not be established (the two FIA_X509_EXT.2.2 outcomes).
    pub fn is_revocation(&self) -> bool {
        matches!(
            self,
            Problem::Revoked { .. }
                | Problem::NoCrl { .. }
                | Problem::CrlExpired { .. }
                | Problem::CrlBadSignature { .. }
                | Problem::IssuerNotCrlSigner { .. }
        )
    }
}

/// Where in the presented chain the refused certificate sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Leaf,
    /// The n-th issuing CA above the leaf (1 = the leaf's issuer) in the verified path.
    Issuer(usize),
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Position::Leaf => f.write_str("leaf"),
            Position::Issuer(n) => write!(f, "intermediate {n}"),
        }
    }
}

/// A refused certificate: who (subject, serial, its place in the chain) and why. Its Display
/// is the audit line's detail.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{role} {position} subject=\"{subject}\" serial={serial}: {problem}")]
pub struct Refusal {
    pub role: PeerRole,
    pub position: Position,
    pub subject: String,
    pub serial: String,
    pub problem: Problem,
}

/// The end-entity rules: EKU present with the role's purpose; keyUsage, if present, with
/// digitalSignature.
pub fn check_end_entity(cert: &X509Certificate<'_>, role: PeerRole) -> Result<(), Problem> {
    let eku = cert
        .extended_key_usage()
        .map_err(|e| Problem::Malformed(format!("extendedKeyUsage: {e}")))?;
    let Some(eku) = eku else {
        return Err(Problem::NoEku { role });
    };
    let eku = eku.value;
    let has = match role {
        PeerRole::Server => eku.server_auth,
        PeerRole::Client => eku.client_auth,
    };
    if !has {
        let mut found: Vec<String> = [
            (eku.any, "anyExtendedKeyUsage"),
            (eku.server_auth, "serverAuth"),
            (eku.client_auth, "clientAuth"),
            (eku.code_signing, "codeSigning"),
            (eku.email_protection, "emailProtection"),
            (eku.time_stamping, "timeStamping"),
            (eku.ocsp_signing, "OCSPSigning"),
        ]
        .iter()
        .filter(|(set, _)| *set)
        .map(|(_, name)| name.to_string())
        .collect();
        found.extend(eku.other.iter().map(|oid| oid.to_id_string()));
        return Err(Problem::WrongEku {
            role,
            found: if found.is_empty() {
                "no purpose".into()
            } else {
                found.join(", ")
            },
        });
    }
    let ku = cert
        .key_usage()
        .map_err(|e| Problem::Malformed(format!("keyUsage: {e}")))?;
    if let Some(ku) = ku {
        if !ku.value.digital_signature() {
            return Err(Problem::NoDigitalSignature {
                found: key_usage_text(&ku.value.to_string()),
            });
        }
    }
    Ok(())
}

/// The rules for a certificate that issued another in the path: CA:TRUE, keyUsage with
/// keyCertSign (RFC 5280 4.2.1.3: a CA certificate MUST carry keyUsage).
pub fn check_issuing_ca(cert: &X509Certificate<'_>) -> Result<(), Problem> {
    let bc = cert
        .basic_constraints()
        .map_err(|e| Problem::Malformed(format!("basicConstraints: {e}")))?;
    if !bc.is_some_and(|bc| bc.value.ca) {
        return Err(Problem::NotCa);
    }
    let ku = cert
        .key_usage()
        .map_err(|e| Problem::Malformed(format!("keyUsage: {e}")))?;
    match ku {
        Some(ku) if ku.value.key_cert_sign() => Ok(()),
        Some(ku) => Err(Problem::NoKeyCertSign {
            found: format!("it has {}", key_usage_text(&ku.value.to_string())),
        }),
        None => Err(Problem::NoKeyCertSign {
            found: "it has no keyUsage extension".into(),
        }),
    }
}

/// The rule for the issuer of a CRL: a keyUsage, if present, must allow cRLSign.
pub fn check_crl_issuer(cert: &X509Certificate<'_>) -> Result<(), Problem> {
    let ku = cert
        .key_usage()
        .map_err(|e| Problem::Malformed(format!("keyUsage: {e}")))?;
    match ku {
        Some(ku) if !ku.value.crl_sign() => Err(Problem::IssuerNotCrlSigner {
            issuer: cert.subject().to_string(),
        }),
        _ => Ok(()),
    }
}

fn key_usage_text(flags: &str) -> String {
    if flags.is_empty() {
        "no usage".into()
    } else {
        flags.to_string()
    }
}

/// A CRL as read from a file, with what an operator needs to know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrlSummary {
    pub issuer: String,
    pub this_update_unix: i64,
    /// None when the CRL has no nextUpdate (RFC 5280 requires one; webpki treats it as never
    /// expiring).
    pub next_update_unix: Option<i64>,
    pub revoked: usize,
}

/// Parses one DER CRL the way the handshake will (rustls-webpki), and summarizes it.
pub fn summarize_crl(der: &[u8]) -> Result<CrlSummary, String> {
    OwnedCertRevocationList::from_der(der).map_err(|e| format!("not a usable CRL: {e}"))?;
    let (rest, crl) = CertificateRevocationList::from_der(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!("{} trailing bytes after the CRL", rest.len()));
    }
    Ok(CrlSummary {
        issuer: crl.issuer().to_string(),
        this_update_unix: crl.last_update().timestamp(),
        next_update_unix: crl.next_update().map(|t| t.timestamp()),
        revoked: crl.iter_revoked_certificates().count(),
    })
}

/// Whether `crl_der` is signed by `issuer_der`'s key, if `issuer_der` is its issuer by name:
/// None when the names differ, Some(Err) for a bad signature or an issuer without cRLSign.
pub fn check_crl_signed_by(crl_der: &[u8], issuer_der: &[u8]) -> Option<Result<(), Problem>> {
    let (_, crl) = CertificateRevocationList::from_der(crl_der).ok()?;
    let issuer = parse_cert(issuer_der).ok()?;
    if crl.issuer().as_raw() != issuer.subject().as_raw() {
        return None;
    }
    if let Err(problem) = check_crl_issuer(&issuer) {
        return Some(Err(problem));
    }
    Some(
        crl.verify_signature(issuer.public_key())
            .map_err(|_| Problem::CrlBadSignature {
                issuer: crl.issuer().to_string(),
            }),
    )
}

/// Verifies peers' chains for one role against one set of trust anchors.
pub struct PeerVerifier {
    role: PeerRole,
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
    crls: Vec<CertRevocationList<'static>>,
    crl_ders: Vec<Vec<u8>>,
    revocation: RevocationMode,
    clock: WallClock,
}

/// A CRL that rustls-webpki cannot parse (the settings could not be used).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CRL {index}: {detail}")]
pub struct CrlError {
    /// 1-based, in the order configured.
    pub index: usize,
    pub detail: String,
}

impl PeerVerifier {
    pub fn new(
        role: PeerRole,
        roots: &[CertificateDer<'static>],
        verification: &Verification,
    ) -> Result<PeerVerifier, String> {
        let mut anchors = Vec::with_capacity(roots.len());
        for root in roots {
            let anchor =
                webpki::anchor_from_trusted_cert(root).map_err(|e| format!("trust anchor: {e}"))?;
            anchors.push(anchor.to_owned());
        }
        let mut crls = Vec::with_capacity(verification.crls.len());
        for (i, der) in verification.crls.iter().enumerate() {
            let crl = OwnedCertRevocationList::from_der(der).map_err(|e| {
                CrlError {
                    index: i + 1,
                    detail: e.to_string(),
                }
                .to_string()
            })?;
            crls.push(CertRevocationList::from(crl));
        }
        Ok(PeerVerifier {
            role,
            roots: roots.to_vec(),
            anchors,
            crls,
            crl_ders: verification.crls.clone(),
            revocation: verification.revocation,
            clock: verification.clock.clone(),
        })
    }

    pub fn role(&self) -> PeerRole {
        self.role
    }

    /// Checks a presented chain (leaf first, DER), at the clock's time.
    pub fn verify(&self, presented: &[Vec<u8>]) -> Result<(), Box<Refusal>> {
        self.verify_inner(presented).map_err(Box::new)
    }

    #[allow(clippy::result_large_err)] // boxed once, in verify
    fn verify_inner(&self, presented: &[Vec<u8>]) -> Result<(), Refusal> {
        let now = self.clock.now();
        let chain: Vec<CertificateDer<'_>> = presented
            .iter()
            .map(|der| CertificateDer::from(der.as_slice()))
            .collect();
        let Some((leaf_der, intermediates)) = chain.split_first() else {
            return Err(self.refusal_unnamed(Problem::Chain("no certificate presented".into())));
        };
        let leaf = parse_cert(leaf_der).map_err(|e| self.refusal_unnamed(Problem::Malformed(e)))?;
        let refuse = |position: Position, cert: &X509Certificate<'_>, problem: Problem| Refusal {
            role: self.role,
            position,
            subject: cert.subject().to_string(),
            serial: serial_hex(cert.raw_serial()),
            problem,
        };
        let end_entity = EndEntityCert::try_from(leaf_der)
            .map_err(|e| refuse(Position::Leaf, &leaf, Problem::Malformed(e.to_string())))?;
        let algorithms = rustls::crypto::ring::default_provider()
            .signature_verification_algorithms
            .all;
        let usage = match self.role {
            PeerRole::Server => KeyUsage::server_auth(),
            PeerRole::Client => KeyUsage::client_auth(),
        };
        let time = UnixTime::since_unix_epoch(std::time::Duration::from_secs(now));
        let path = end_entity
            .verify_for_usage(
                algorithms,
                &self.anchors,
                intermediates,
                time,
                usage,
                None,
                None,
            )
            .map_err(|e| refuse(Position::Leaf, &leaf, Problem::Chain(e.to_string())))?;

        check_end_entity(&leaf, self.role).map_err(|p| refuse(Position::Leaf, &leaf, p))?;
        // The verified path, leaf first, then each issuing CA up to (not including) the anchor.
        let mut path_ders: Vec<CertificateDer<'_>> = vec![leaf_der.clone()];
        for (n, cert) in path.intermediate_certificates().enumerate() {
            let der = cert.der();
            let parsed = parse_cert(&der)
                .map_err(|e| refuse(Position::Issuer(n + 1), &leaf, Problem::Malformed(e)))?;
            check_issuing_ca(&parsed).map_err(|p| refuse(Position::Issuer(n + 1), &parsed, p))?;
            path_ders.push(CertificateDer::from(der.to_vec()));
        }

        if self.revocation == RevocationMode::Off {
            return Ok(());
        }
        let crl_refs: Vec<&CertRevocationList<'_>> = self.crls.iter().collect();
        let Ok(builder) = RevocationOptionsBuilder::new(&crl_refs) else {
            // No CRL at all: nothing to check if-available; under require, nothing is covered.
            if self.revocation == RevocationMode::Require {
                return Err(refuse(
                    Position::Leaf,
                    &leaf,
                    Problem::NoCrl {
                        issuer: leaf.issuer().to_string(),
                    },
                ));
            }
            return Ok(());
        };
        let require = self.revocation == RevocationMode::Require;
        let options = builder
            .with_depth(RevocationCheckDepth::Chain)
            .with_status_policy(if require {
                UnknownStatusPolicy::Deny
            } else {
                UnknownStatusPolicy::Allow
            })
            .with_expiration_policy(if require {
                ExpirationPolicy::Enforce
            } else {
                ExpirationPolicy::Ignore
            })
            .build();
        match end_entity.verify_for_usage(
            algorithms,
            &self.anchors,
            intermediates,
            time,
            usage,
            Some(options),
            None,
        ) {
            Ok(_) => self.check_crl_issuers(&path_ders),
            Err(err) => Err(self.attribute(&err, &path_ders, now)),
        }
    }

    /// cRLSign of every issuer whose CRL was consulted. webpki checks it for intermediates
    /// but cannot for a trust anchor (it keeps no keyUsage of anchors), so it is checked here
    /// for the whole path.
    #[allow(clippy::result_large_err)] // boxed once, in verify
    fn check_crl_issuers(&self, path: &[CertificateDer<'_>]) -> Result<(), Refusal> {
        let parsed: Vec<X509Certificate<'_>> =
            path.iter().filter_map(|der| parse_cert(der).ok()).collect();
        let roots: Vec<X509Certificate<'_>> = self
            .roots
            .iter()
            .filter_map(|der| parse_cert(der).ok())
            .collect();
        let crl_issuers: Vec<Vec<u8>> = self
            .crl_ders
            .iter()
            .filter_map(|der| CertificateRevocationList::from_der(der).ok())
            .map(|(_, crl)| crl.issuer().as_raw().to_vec())
            .collect();
        for (i, cert) in parsed.iter().enumerate() {
            if !crl_issuers
                .iter()
                .any(|name| name == cert.issuer().as_raw())
            {
                continue;
            }
            let issuer = parsed.get(i + 1).or_else(|| {
                roots
                    .iter()
                    .find(|root| root.subject().as_raw() == cert.issuer().as_raw())
            });
            if let Some(Err(problem)) = issuer.map(check_crl_issuer) {
                return Err(Refusal {
                    role: self.role,
                    position: if i == 0 {
                        Position::Leaf
                    } else {
                        Position::Issuer(i)
                    },
                    subject: cert.subject().to_string(),
                    serial: serial_hex(cert.raw_serial()),
                    problem,
                });
            }
        }
        Ok(())
    }

    fn refusal_unnamed(&self, problem: Problem) -> Refusal {
        Refusal {
            role: self.role,
            position: Position::Leaf,
            subject: "-".into(),
            serial: "-".into(),
            problem,
        }
    }

    /// Names the certificate a revocation error from webpki is about: the lowest one in the
    /// path (webpki checks from the leaf up) that the error describes.
    fn attribute(&self, err: &webpki::Error, path: &[CertificateDer<'_>], now: u64) -> Refusal {
        let parsed: Vec<X509Certificate<'_>> =
            path.iter().filter_map(|der| parse_cert(der).ok()).collect();
        let crls: Vec<CertificateRevocationList<'_>> = self
            .crl_ders
            .iter()
            .filter_map(|der| {
                CertificateRevocationList::from_der(der)
                    .ok()
                    .map(|(_, c)| c)
            })
            .collect();
        let roots: Vec<X509Certificate<'_>> = self
            .roots
            .iter()
            .filter_map(|der| parse_cert(der).ok())
            .collect();
        for (i, cert) in parsed.iter().enumerate() {
            let position = if i == 0 {
                Position::Leaf
            } else {
                Position::Issuer(i)
            };
            let issuer_name = cert.issuer().to_string();
            let issuer_cert = parsed.get(i + 1).or_else(|| {
                roots
                    .iter()
                    .find(|root| root.subject().as_raw() == cert.issuer().as_raw())
            });
            let crl = crls
                .iter()
                .find(|crl| crl.issuer().as_raw() == cert.issuer().as_raw());
            let problem = match (err, crl) {
                (webpki::Error::CertRevoked, Some(crl)) => crl
                    .iter_revoked_certificates()
                    .find(|r| r.raw_serial() == cert.raw_serial())
                    .map(|r| Problem::Revoked {
                        issuer: issuer_name.clone(),
                        date: r.revocation_date.to_string(),
                        reason: r
                            .reason_code()
                            .map_or("unspecified".into(), |(_, code)| reason_name(code.0)),
                    }),
                (webpki::Error::UnknownRevocationStatus, None) => Some(Problem::NoCrl {
                    issuer: issuer_name.clone(),
                }),
                (webpki::Error::CrlExpired { .. }, Some(crl)) => crl
                    .next_update()
                    .filter(|next| next.timestamp() < i64::try_from(now).unwrap_or(i64::MAX))
                    .map(|next| Problem::CrlExpired {
                        issuer: issuer_name.clone(),
                        next_update: next.to_string(),
                    }),
                (webpki::Error::IssuerNotCrlSigner, Some(_)) => {
                    issuer_cert.and_then(|issuer| check_crl_issuer(issuer).err())
                }
                (
                    webpki::Error::InvalidCrlSignatureForPublicKey
                    | webpki::Error::UnsupportedCrlSignatureAlgorithmContext(_)
                    | webpki::Error::UnsupportedCrlSignatureAlgorithmForPublicKeyContext(_),
                    Some(crl),
                ) => issuer_cert
                    .filter(|issuer| crl.verify_signature(issuer.public_key()).is_err())
                    .map(|_| Problem::CrlBadSignature {
                        issuer: issuer_name.clone(),
                    }),
                _ => None,
            };
            if let Some(problem) = problem {
                return Refusal {
                    role: self.role,
                    position,
                    subject: cert.subject().to_string(),
                    serial: serial_hex(cert.raw_serial()),
                    problem,
                };
            }
        }
        // webpki found what we cannot place: say it of the leaf, in webpki's words.
        let (subject, serial) = parsed.first().map_or(("-".into(), "-".into()), |leaf| {
            (leaf.subject().to_string(), serial_hex(leaf.raw_serial()))
        });
        Refusal {
            role: self.role,
            position: Position::Leaf,
            subject,
            serial,
            problem: match err {
                webpki::Error::CertRevoked => Problem::Revoked {
                    issuer: "?".into(),
                    date: "?".into(),
                    reason: "?".into(),
                },
                webpki::Error::UnknownRevocationStatus => Problem::NoCrl { issuer: "?".into() },
                other => Problem::Chain(format!("revocation check: {other}")),
            },
        }
    }
}

/// RFC 5280 5.3.1 CRLReason names.
fn reason_name(code: u8) -> String {
    let name = match code {
        0 => "unspecified",
        1 => "keyCompromise",
        2 => "cACompromise",
        3 => "affiliationChanged",
        4 => "superseded",
        5 => "cessationOfOperation",
        6 => "certificateHold",
        8 => "removeFromCRL",
        9 => "privilegeWithdrawn",
        10 => "aACompromise",
        other => return format!("code {other}"),
    };
    name.to_string()
}

#[cfg(test)]
#[path = "verify_tests.rs"]
mod tests;
