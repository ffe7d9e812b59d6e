//! Start-up checks on certificate and key files that are not about their contents' syntax: a
//! private key others may read or write, and a chain file whose first certificate is not the
//! leaf of the key.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rustls_pki_types::CertificateDer;

use super::{PrivateKey, public_key_matches};

/// A warning when the private key file is writable by its group, or readable or writable by
/// others (mode bits 0o027); None when it is not, or cannot be stat'ed (reading it reports
/// that). Group read is not warned about: it is the documented deployment (0640
/// root:ntp-dtls, so the daemon's group reads the key and nobody else does).
pub fn key_permission_warning(path: &Path) -> Option<String> {
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    if mode & 0o027 == 0 {
        return None;
    }
    let mut who = Vec::new();
    if mode & 0o020 != 0 {
        who.push("writable by its group");
    }
    match mode & 0o006 {
        0o006 => who.push("readable and writable by others"),
        0o004 => who.push("readable by others"),
        0o002 => who.push("writable by others"),
        _ => {}
    }
    if who.is_empty() {
        who.push("executable by others");
    }
    Some(format!(
        "{}: the private key is {} (mode {mode:04o}); fix with `chmod 600 {}`, or 640 with the \
         daemon's group (`chgrp ntp-dtls`)",
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::{LabPkiRequest, generate_lab_pki, load_certificates, load_private_key};

    fn lab(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("ntp-dtls-files-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        generate_lab_pki(&LabPkiRequest {
            out_dir: dir.clone(),
            server_names: vec!["localhost".into()],
            client_names: vec![],
            days: 30,
            force: false,
            key_type: crate::pki::KeyType::EcdsaP256,
        })
        .expect("lab pki");
        dir
    }

    #[test]
    fn a_key_others_can_read_or_write_is_warned_about() {
        let dir = lab("perm");
        let key = dir.join("server.key.pem");
        assert_eq!(key_permission_warning(&key), None, "certs writes 0600");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        assert_eq!(
            key_permission_warning(&key),
            None,
            "0640 root:ntp-dtls is documented"
        );
        for (mode, words) in [
            (0o644, "readable by others (mode 0644)"),
            (0o602, "writable by others"),
            (0o660, "writable by its group"),
            (
                0o666,
                "writable by its group, readable and writable by others",
            ),
        ] {
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).expect("chmod");
            let warning = key_permission_warning(&key).unwrap_or_default();
            assert!(
                warning.contains(words) && warning.contains("chmod 600"),
                "{mode:o}: {warning}"
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_chain_in_the_wrong_order_is_named_as_such() {
        let dir = lab("order");
        let server = load_certificates(&dir.join("server.pem")).expect("server");
        let ca = load_certificates(&dir.join("ca.pem")).expect("ca");
        let key = load_private_key(&dir.join("server.key.pem")).expect("key");
        let (cert_path, key_path) = (dir.join("chain.pem"), dir.join("server.key.pem"));
        let reversed: Vec<_> = ca.iter().chain(&server).cloned().collect();
        let message = chain_mismatch(&reversed, &key, &cert_path, &key_path);
        assert!(
            message.contains("is not the leaf of the key")
                && message.contains("#2 in the file")
                && message.contains("The leaf must come first"),
            "{message}"
        );
        let message = chain_mismatch(&ca, &key, &cert_path, &key_path);
        assert!(
            message.contains("is a CA certificate, not a leaf"),
            "{message}"
        );
        let client = load_certificates(&dir.join("client.pem")).expect("client");
        let message = chain_mismatch(&client, &key, &cert_path, &key_path);
        assert!(message.contains("different pairs"), "{message}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
