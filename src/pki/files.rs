//! Start-up checks on certificate and key files that are not about their contents' syntax: a
//! private key others may read or write, and a chain file whose first certificate is not the
//! leaf of the key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::CertificateDer;

use super::{PrivateKey, public_key_matches};

/// A warning when the private key file is readable or writable by its group or by others
/// (mode bits 0o077); None when it is not, or cannot be stat'ed (reading it reports that).
pub fn key_permission_warning(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    if mode & 0o077 == 0 {
        return None;
    }
    let mut who = Vec::new();
    if mode & 0o060 != 0 {
        who.push(match mode & 0o060 {
            0o060 => "readable and writable by its group",
            0o040 => "readable by its group",
            _ => "writable by its group",
        });
    }
    if mode & 0o006 != 0 {
        who.push(match mode & 0o006 {
            0o006 => "readable and writable by others",
            0o004 => "readable by others",
            _ => "writable by others",
        });
    }
    if mode & 0o011 != 0 && who.is_empty() {
        who.push("executable by group or others");
    }
    Some(format!(
        "{}: the private key is {} (mode {mode:04o}); fix with `chmod 600 {}` (and chown it to \
         the user the daemon runs as)",
        path.display(),
        who.join(", "),
        path.display()
    ))
}

/// Why `key` does not go with the first certificate of `chain` (read from `cert_path`), in
/// words that point at the fix: another certificate of the file is the key's (the order is
/// wrong), the first one is a CA certificate, or none matches (wrong key or wrong file).
pub fn chain_mismatch(
    chain: &[CertificateDer<'static>],
    key: &PrivateKey,
    cert_path: &Path,
    key_path: &Path,
) -> String {
    let describe = |der: &CertificateDer<'_>| {
        super::summarize(der).map_or_else(|_| "an unreadable certificate".into(), |s| s.subject)
    };
    let matching = chain
        .iter()
        .position(|cert| public_key_matches(cert, key).unwrap_or(false));
    let first = chain
        .first()
        .map_or_else(|| "nothing".to_string(), describe);
    let first_is_ca = chain.first().is_some_and(|der| {
        ntp_dtls_proto::x509::parse_cert(der)
            .ok()
            .and_then(|c| c.basic_constraints().ok().flatten().map(|bc| bc.value.ca))
            .unwrap_or(false)
    });
    match matching {
        Some(index) => format!(
            "{}: the first certificate ({first}) is not the leaf of the key {}; the key's \
             certificate ({}) is #{} in the file. The leaf must come first, then its \
             intermediates in order (leaf, issuer, issuer's issuer)",
            cert_path.display(),
            key_path.display(),
            describe(&chain[index]),
            index + 1
        ),
        None if first_is_ca => format!(
            "{}: the first certificate ({first}) is a CA certificate, not a leaf, and no \
             certificate in the file belongs to the key {}: give the server's own certificate \
             first (the CA belongs in --ca / --client-ca on the other side)",
            cert_path.display(),
            key_path.display()
        ),
        None => format!(
            "{}: no certificate in the file belongs to the key {} (the first is {first}): the key \
             and the certificate are from different pairs",
            cert_path.display(),
            key_path.display()
        ),
    }
}
