//! Certificate revocation lists: reading `--crl` / `crl = [...]` files (PEM or DER), the
//! revocation mode an operator gets when they name none, and what start-up and `--check` say
//! about each CRL. The handshake-time checks are `ntp_dtls_proto::verify`'s.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use ntp_dtls_proto::verify::{
    CrlSummary, Problem, RevocationMode, Verification, WallClock, check_crl_signed_by,
    summarize_crl,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::{PemObject, SectionKind};

/// One CRL as read from its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedCrl {
    pub path: PathBuf,
    /// 1-based among the file's CRLs (a PEM file may hold several).
    pub index: usize,
    pub der: Vec<u8>,
    pub summary: CrlSummary,
}

/// Why a CRL file cannot be used. Messages name the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CrlError {
    #[error("{}: cannot read: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{}: malformed PEM: {detail}", path.display())]
    Pem { path: PathBuf, detail: String },
    #[error("{}: no CRL found (expected PEM blocks \"X509 CRL\" or one DER CRL)", path.display())]
    Empty { path: PathBuf },
    #[error("{}: CRL #{index} is not a usable CRL: {detail}", path.display())]
    Bad {
        path: PathBuf,
        index: usize,
        detail: String,
    },
    #[error("{}: CRL #{index} of {issuer}: {problem}", path.display())]
    NotFromIssuer {
        path: PathBuf,
        index: usize,
        issuer: String,
        problem: Box<Problem>,
    },
    #[error(
        "revocation = require needs at least one CRL (--crl FILE, or crl = [\"FILE\"] in the config file)"
    )]
    RequireWithoutCrl,
}

/// The system clock, for the verifier (the protocol core reads none).
pub fn system_clock() -> WallClock {
    WallClock::new(unix_now)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Every CRL in `path`: PEM "X509 CRL" blocks, or the whole file as one DER CRL.
pub fn load_crl_file(path: &Path) -> Result<Vec<LoadedCrl>, CrlError> {
    let bytes = std::fs::read(path).map_err(|e| CrlError::Read {
        path: path.to_owned(),
        detail: e.to_string(),
    })?;
    let ders: Vec<Vec<u8>> = if bytes.starts_with(&[0x30]) {
        vec![bytes]
    } else {
        let mut ders = Vec::new();
        for section in <(SectionKind, Vec<u8>)>::pem_slice_iter(&bytes) {
            let (kind, der) = section.map_err(|e| CrlError::Pem {
                path: path.to_owned(),
                detail: format!("{e:?}"),
            })?;
            if kind == SectionKind::Crl {
                ders.push(der);
            }
        }
        ders
    };
    if ders.is_empty() {
        return Err(CrlError::Empty {
            path: path.to_owned(),
        });
    }
    ders.into_iter()
        .enumerate()
        .map(|(i, der)| {
            let summary = summarize_crl(&der).map_err(|detail| CrlError::Bad {
                path: path.to_owned(),
                index: i + 1,
                detail,
            })?;
            Ok(LoadedCrl {
                path: path.to_owned(),
                index: i + 1,
                der,
                summary,
            })
        })
        .collect()
}

/// Loads every file and checks each CRL whose issuer is one of `roots` against that root (its
/// signature, and cRLSign); CRLs of intermediates are checked at each handshake, where the
/// intermediate is presented.
pub fn load_crls(
    paths: &[PathBuf],
    roots: &[CertificateDer<'static>],
) -> Result<Vec<LoadedCrl>, CrlError> {
    let mut all = Vec::new();
    for path in paths {
        for crl in load_crl_file(path)? {
            for root in roots {
                if let Some(Err(problem)) = check_crl_signed_by(&crl.der, root) {
                    return Err(CrlError::NotFromIssuer {
                        path: crl.path.clone(),
                        index: crl.index,
                        issuer: crl.summary.issuer.clone(),
                        problem: Box::new(problem),
                    });
                }
            }
            all.push(crl);
        }
    }
    Ok(all)
}

/// The mode in force: the one asked for, else `require` when a CRL is configured and `off`
/// when none is. `require` without a CRL would refuse every peer: a configuration error.
pub fn resolve_mode(
    asked: Option<RevocationMode>,
    crls: &[LoadedCrl],
) -> Result<RevocationMode, CrlError> {
    let mode = asked.unwrap_or(if crls.is_empty() {
        RevocationMode::Off
    } else {
        RevocationMode::Require
    });
    if mode == RevocationMode::Require && crls.is_empty() {
        return Err(CrlError::RequireWithoutCrl);
    }
    Ok(mode)
}

/// The verifier's settings for these CRLs in this mode.
pub fn verification(mode: RevocationMode, crls: &[LoadedCrl]) -> Verification {
    Verification {
        revocation: mode,
        crls: if mode == RevocationMode::Off {
            Vec::new()
        } else {
            crls.iter().map(|c| c.der.clone()).collect()
        },
        clock: system_clock(),
    }
}

/// A CRL past its nextUpdate: under `require` every certificate it covers is refused until it
/// is refreshed; under `if-available` it is still used.
pub fn expired(crl: &LoadedCrl, now_unix: i64) -> bool {
    crl.summary
        .next_update_unix
        .is_some_and(|next| next <= now_unix)
}

/// "FILE #N: CRL of ISSUER, R revoked, next update DATE" for start-up lines and `--check`.
pub fn describe(crl: &LoadedCrl, format_utc: impl Fn(i64) -> String) -> String {
    let next = crl
        .summary
        .next_update_unix
        .map_or("none".to_string(), &format_utc);
    format!(
        "{} #{}: CRL of {}, {} revoked, next update {next}",
        crl.path.display(),
        crl.index,
        crl.summary.issuer,
        crl.summary.revoked
    )
}

/// Warns (WARN, at start-up and at every reload) about each expired CRL.
pub fn warn_expired(crls: &[LoadedCrl], mode: RevocationMode, context: &str) {
    let now = i64::try_from(unix_now()).unwrap_or(i64::MAX);
    for crl in crls.iter().filter(|c| expired(c, now)) {
        let consequence = match mode {
            RevocationMode::Require => {
                "every certificate it covers is refused until it is refreshed (then SIGHUP)"
            }
            RevocationMode::IfAvailable => "still used; its expiry is tolerated (if-available)",
            RevocationMode::Off => "not used (revocation = off)",
        };
        tracing::warn!(
            context,
            crl = %crl.path.display(),
            issuer = %crl.summary.issuer,
            next_update_unix = crl.summary.next_update_unix.unwrap_or_default(),
            "CRL expired: {consequence}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, Issuer,
        KeyIdMethod, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SerialNumber,
    };
    use std::time::Duration;

    fn ca(name: &str) -> (CertificateDer<'static>, Issuer<'static, KeyPair>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).expect("ca");
        (cert.der().clone(), Issuer::new(params, key))
    }

    fn crl(
        issuer: &Issuer<'_, KeyPair>,
        next_update_in_days: i64,
    ) -> rcgen::CertificateRevocationList {
        let now = unix_now() as i64;
        let at = |unix: i64| rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(unix as u64);
        CertificateRevocationListParams {
            this_update: at(now - 10 * 86_400),
            next_update: at(now + next_update_in_days * 86_400),
            crl_number: SerialNumber::from(7u64),
            issuing_distribution_point: None,
            revoked_certs: vec![],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(issuer)
        .expect("crl")
    }

    #[test]
    fn crl_files_load_as_pem_or_der_and_a_roots_crl_is_checked() {
        let dir = std::env::temp_dir().join(format!("ntp-dtls-crl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let (root, issuer) = ca("crl test CA");
        let (_, impostor) = ca("crl test CA");
        let good = crl(&issuer, 7);
        let pem = dir.join("ca.crl.pem");
        let der = dir.join("ca.crl");
        std::fs::write(&pem, good.pem().expect("pem")).expect("write");
        std::fs::write(&der, good.der()).expect("write");
        let roots = vec![root];
        for path in [&pem, &der] {
            let loaded = load_crls(std::slice::from_ref(path), &roots).expect("loads");
            assert_eq!(loaded.len(), 1);
            assert_eq!(loaded[0].summary.issuer, "CN=crl test CA");
            assert!(!expired(&loaded[0], unix_now() as i64));
        }
        assert_eq!(
            resolve_mode(
                None,
                &load_crls(std::slice::from_ref(&pem), &roots).expect("loads")
            ),
            Ok(RevocationMode::Require),
            "a CRL configured means require"
        );
        assert_eq!(resolve_mode(None, &[]), Ok(RevocationMode::Off));
        assert_eq!(
            resolve_mode(Some(RevocationMode::Require), &[]),
            Err(CrlError::RequireWithoutCrl)
        );

        let forged = dir.join("forged.crl.pem");
        std::fs::write(&forged, crl(&impostor, 7).pem().expect("pem")).expect("write");
        let err = load_crls(&[forged], &roots)
            .expect_err("refused")
            .to_string();
        assert!(
            err.contains("forged.crl.pem") && err.contains("not signed"),
            "{err}"
        );

        let stale = dir.join("stale.crl.pem");
        std::fs::write(&stale, crl(&issuer, -1).pem().expect("pem")).expect("write");
        let loaded = load_crls(&[stale], &roots).expect("an expired CRL still loads");
        assert!(expired(&loaded[0], unix_now() as i64));

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "nothing here\n").expect("write");
        let err = load_crls(&[empty], &roots)
            .expect_err("refused")
            .to_string();
        assert!(err.contains("no CRL found"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
