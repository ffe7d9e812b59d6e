//! What operators read about certificates and files: [`summarize`] for audit lines and
//! `ntp-dtls check`, and the loaders' explanation of what a file holds when it lacks what was
//! asked for.

use super::PkiError;

pub use ntp_dtls_proto::x509::CertSummary;

/// The fields of a certificate an operator looks at.
pub fn summarize(cert_der: &[u8]) -> Result<CertSummary, PkiError> {
    ntp_dtls_proto::x509::summarize(cert_der).map_err(PkiError::InvalidCertificate)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Expected {
    Certificate,
    Key,
}

/// Explains what a file holds when it lacks what we wanted, with a hint for
/// the usual mix-ups (key and certificate swapped, DER instead of PEM).
pub(super) fn describe_contents(bytes: &[u8], expected: Expected) -> String {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return "the file is empty".into();
    }
    let labels = pem_labels(bytes);
    if labels.is_empty() {
        let der_hint = if bytes.first() == Some(&0x30) {
            " (it may be DER; convert it to PEM, e.g. with `openssl x509 -inform DER` or `openssl pkey -inform DER`)"
        } else {
            ""
        };
        return format!("the file contains no PEM block at all{der_hint}");
    }
    let list = labels
        .iter()
        .map(|l| format!("\"{l}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let hint = match expected {
        Expected::Key if labels.iter().any(|l| l == "CERTIFICATE") => {
            " (is this the certificate rather than its key?)"
        }
        Expected::Certificate if labels.iter().any(|l| l.ends_with("PRIVATE KEY")) => {
            " (is this the private key rather than the certificate?)"
        }
        _ => "",
    };
    format!("the file holds only {list}{hint}")
}

/// Labels of all `-----BEGIN X-----` lines, deduplicated, sanitised for
/// printing (a hostile file must not inject control characters into logs).
pub(super) fn pem_labels(bytes: &[u8]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for line in bytes.split(|&b| b == b'\n') {
        let line = line.trim_ascii();
        let Some(rest) = line.strip_prefix(b"-----BEGIN ") else {
            continue;
        };
        let Some(label) = rest.strip_suffix(b"-----") else {
            continue;
        };
        let label: String = label
            .iter()
            .take(64)
            .map(|&b| {
                if b.is_ascii_graphic() || b == b' ' {
                    char::from(b)
                } else {
                    '?'
                }
            })
            .collect();
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    labels
}
