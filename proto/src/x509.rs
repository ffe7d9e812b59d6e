//! Reading certificates: the few fields an operator or an audit line needs (subject, names,
//! validity, serial). Parsing only, on bytes: loading files is the shell's job.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

/// The fields of a certificate an operator looks at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertSummary {
    /// RFC 4514-style, in encoded order, e.g. "CN=ntp-dtls lab CA, O=ntp-dtls lab".
    pub subject: String,
    pub issuer: String,
    pub not_before_unix: i64,
    pub not_after_unix: i64,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// Upper-case hex without separators or DER sign padding, as
    /// `openssl x509 -noout -serial` prints it, so the two can be compared.
    pub serial_hex: String,
}

impl CertSummary {
    /// The presented identifiers, as an audit line shows them: `DNS:a,IP:192.0.2.1`, or `-`.
    pub fn identifiers(&self) -> String {
        let names: Vec<String> = self
            .dns_names
            .iter()
            .map(|name| format!("DNS:{name}"))
            .chain(self.ip_addresses.iter().map(|ip| format!("IP:{ip}")))
            .collect();
        if names.is_empty() {
            "-".into()
        } else {
            names.join(",")
        }
    }
}

/// Summarizes one DER certificate; the error says what is wrong with it.
pub fn summarize(cert_der: &[u8]) -> Result<CertSummary, String> {
    let cert = parse_cert(cert_der)?;
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("subjectAltName: {e}"))?;
    if let Some(san) = san {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => dns_names.push((*dns).to_string()),
                GeneralName::IPAddress(bytes) => ip_addresses.push(ip_from_san(bytes)?),
                _ => {}
            }
        }
    }
    Ok(CertSummary {
        subject: cert.subject().to_string(),
        issuer: cert.issuer().to_string(),
        not_before_unix: cert.validity().not_before.timestamp(),
        not_after_unix: cert.validity().not_after.timestamp(),
        dns_names,
        ip_addresses,
        serial_hex: serial_hex(cert.raw_serial()),
    })
}

fn ip_from_san(bytes: &[u8]) -> Result<IpAddr, String> {
    if let Ok(v4) = <[u8; 4]>::try_from(bytes) {
        return Ok(IpAddr::V4(Ipv4Addr::from(v4)));
    }
    if let Ok(v6) = <[u8; 16]>::try_from(bytes) {
        return Ok(IpAddr::V6(Ipv6Addr::from(v6)));
    }
    Err(format!(
        "IP address SAN of {} bytes (expected 4 or 16)",
        bytes.len()
    ))
}

/// A certificate serial number as `openssl x509 -serial` prints it.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(raw.len().saturating_sub(1));
    let hex: String = raw
        .get(start..)
        .unwrap_or_default()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    if hex.is_empty() { "00".into() } else { hex }
}

/// Parses one DER certificate, refusing trailing bytes (a sign of a mangled file that other TLS
/// stacks would reject too).
pub fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    let (rest, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    if !rest.is_empty() {
        return Err(format!(
            "{} trailing bytes after the certificate",
            rest.len()
        ));
    }
    Ok(cert)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summarize_rejects_garbage() {
        assert!(summarize(b"not a certificate").is_err());
        assert!(summarize(&[]).is_err());
        let cert = crate::testpki::self_signed("x.test");
        let mut trailing = cert.clone();
        trailing.push(0);
        assert!(summarize(&trailing).is_err());
        let summary = summarize(&cert).expect("summary");
        assert_eq!(summary.dns_names, vec!["x.test".to_string()]);
        assert_eq!(summary.identifiers(), "DNS:x.test");
    }

    #[test]
    fn serial_hex_strips_sign_padding() {
        assert_eq!(serial_hex(&[0x00, 0x8f, 0x01]), "8F01");
        assert_eq!(serial_hex(&[0x7f]), "7F");
        assert_eq!(serial_hex(&[0x00]), "00");
        assert_eq!(serial_hex(&[]), "00");
    }
}
