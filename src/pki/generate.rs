//! `ntp-dtls certs`: the lab CA and its server and client leaves, and the file writing
//! (modes, no clobbering) that `certs --request` (`keys.rs`) shares.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};

use super::{
    CA_CERT_FILE, CA_KEY_FILE, CLIENT_CERT_FILE, CLIENT_KEY_FILE, DEFAULT_CLIENT_NAME, KeyType,
    MAX_VALIDITY_DAYS, PkiError, SERVER_CERT_FILE, SERVER_KEY_FILE,
};

const CA_COMMON_NAME: &str = "ntp-dtls lab CA";
const LAB_ORGANIZATION: &str = "ntp-dtls lab";

/// Backdating of `not_before`, so a peer whose clock is a little behind ours
/// does not reject a certificate minted seconds ago. An NTP relay is exactly
/// the kind of thing that runs on hosts whose clocks are not yet right.
const CLOCK_SLACK: Duration = Duration::from_secs(3600);

/// What `ntp-dtls certs` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabPkiRequest {
    pub out_dir: PathBuf,
    /// DNS names or IP addresses of the server; the first is also its CN.
    pub server_names: Vec<String>,
    /// Names for the client certificate; empty means [`DEFAULT_CLIENT_NAME`].
    pub client_names: Vec<String>,
    /// Validity from now, 1..=[`MAX_VALIDITY_DAYS`].
    pub days: u32,
    /// Overwrite existing files instead of refusing.
    pub force: bool,
    /// The type of every key (CA, server, client).
    pub key_type: KeyType,
}

/// Writes a lab CA, a server leaf and a client leaf (certificate + key each)
/// into `req.out_dir` and returns the paths written, CA first.
///
/// Validation, the overwrite check and all key/certificate generation happen
/// before the first write, so the usual failures (bad name, existing files
/// without `force`) write nothing. A failure *while* writing (disk full, a
/// file created concurrently) can leave the earlier files in place; rerunning
/// with `force` replaces them.
pub fn generate_lab_pki(req: &LabPkiRequest) -> Result<Vec<PathBuf>, PkiError> {
    if req.server_names.is_empty() {
        return Err(PkiError::InvalidRequest(
            "at least one server name (DNS name or IP address) is required".into(),
        ));
    }
    if req.days == 0 || req.days > MAX_VALIDITY_DAYS {
        return Err(PkiError::InvalidRequest(format!(
            "validity must be 1..={MAX_VALIDITY_DAYS} days, got {}",
            req.days
        )));
    }
    let client_names: Vec<String> = if req.client_names.is_empty() {
        vec![DEFAULT_CLIENT_NAME.to_string()]
    } else {
        req.client_names.clone()
    };

    let file_names = [
        CA_CERT_FILE,
        CA_KEY_FILE,
        SERVER_CERT_FILE,
        SERVER_KEY_FILE,
        CLIENT_CERT_FILE,
        CLIENT_KEY_FILE,
    ];
    let paths: Vec<PathBuf> = file_names.iter().map(|n| req.out_dir.join(n)).collect();
    if !req.force {
        // symlink_metadata, not exists(): a dangling symlink is still
        // something we would clobber, so it counts as existing.
        if let Some(p) = paths.iter().find(|p| fs::symlink_metadata(p).is_ok()) {
            return Err(PkiError::AlreadyExists { path: p.clone() });
        }
    }

    let validity = Validity::starting_now(req.days)?;

    // Generate everything before touching the disk, so a bad name (e.g. a
    // non-ASCII DNS name) leaves no half-written PKI behind.
    let ca_key = req.key_type.generate("CA key")?;
    let ca_params = ca_params(validity, &ca_key);
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|e| PkiError::Generate {
            what: "CA certificate",
            detail: e.to_string(),
        })?;
    let ca = Issuer::new(ca_params, &ca_key);

    let server_key = req.key_type.generate("server key")?;
    let server_cert = leaf_params(
        &req.server_names,
        ExtendedKeyUsagePurpose::ServerAuth,
        validity,
    )?
    .signed_by(&server_key, &ca)
    .map_err(|e| PkiError::Generate {
        what: "server certificate",
        detail: e.to_string(),
    })?;

    let client_key = req.key_type.generate("client key")?;
    let client_cert = leaf_params(&client_names, ExtendedKeyUsagePurpose::ClientAuth, validity)?
        .signed_by(&client_key, &ca)
        .map_err(|e| PkiError::Generate {
            what: "client certificate",
            detail: e.to_string(),
        })?;

    fs::create_dir_all(&req.out_dir).map_err(|io| PkiError::CreateDir {
        path: req.out_dir.clone(),
        io,
    })?;

    let contents: [(Vec<u8>, FileKind); 6] = [
        (ca_cert.pem().into_bytes(), FileKind::Certificate),
        (ca_key.serialize_pem().into_bytes(), FileKind::Secret),
        (server_cert.pem().into_bytes(), FileKind::Certificate),
        (server_key.serialize_pem().into_bytes(), FileKind::Secret),
        (client_cert.pem().into_bytes(), FileKind::Certificate),
        (client_key.serialize_pem().into_bytes(), FileKind::Secret),
    ];
    for (path, (bytes, kind)) in paths.iter().zip(contents) {
        // Certificates too: one loop, and wiping public bytes costs nothing.
        let bytes = Zeroizing::new(bytes);
        write_file(path, &bytes, kind, req.force)?;
    }
    Ok(paths)
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum FileKind {
    Certificate,
    Secret,
}

impl FileKind {
    fn mode(self) -> u32 {
        match self {
            FileKind::Certificate => 0o644,
            FileKind::Secret => 0o600,
        }
    }
}

/// Writes `bytes` to `path`, creating the file with its final mode so a key
/// is never readable by others, not even for a moment.
///
/// Without `force` we open with `create_new`: the existence check above is
/// racy, this is not. With `force` we write a fresh temporary file and rename
/// it over the target: `mode()` only applies when a file is *created*, so
/// truncating an existing 0644 key file in place would keep it 0644.
pub(super) fn write_file(
    path: &Path,
    bytes: &[u8],
    kind: FileKind,
    force: bool,
) -> Result<(), PkiError> {
    let werr = |io| PkiError::Write {
        path: path.to_path_buf(),
        io,
    };
    if !force {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(kind.mode())
            .open(path)
            .map_err(|io| {
                if io.kind() == io::ErrorKind::AlreadyExists {
                    PkiError::AlreadyExists {
                        path: path.to_path_buf(),
                    }
                } else {
                    werr(io)
                }
            })?;
        return f.write_all(bytes).and_then(|()| f.sync_all()).map_err(werr);
    }

    let tmp = temp_path(path);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(kind.mode())
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        })
        .and_then(|()| fs::rename(&tmp, path));
    if let Err(io) = result {
        // Best effort: don't leave a stray temporary (possibly a key) behind.
        let _ = fs::remove_file(&tmp);
        return Err(werr(io));
    }
    Ok(())
}

/// A hidden sibling of `path`, unique per process and moment, so concurrent
/// runs (or a stale file from a crash) never collide with `create_new`.
fn temp_path(path: &Path) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}.{nanos}", std::process::id()))
}

/// Certificate validity as offsets from the Unix epoch. Kept as
/// `Duration`s and turned into rcgen's `time::OffsetDateTime` only when
/// applied, so this crate needs no direct dependency on `time`.
#[derive(Clone, Copy)]
struct Validity {
    not_before: Duration,
    not_after: Duration,
}

impl Validity {
    fn starting_now(days: u32) -> Result<Self, PkiError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| PkiError::ClockBeforeEpoch)?;
        // Whole seconds: X.509 times carry none, so don't make rcgen round.
        let now = Duration::from_secs(now.as_secs());
        Ok(Validity {
            not_before: now.saturating_sub(CLOCK_SLACK),
            not_after: now + Duration::from_secs(u64::from(days) * 86_400),
        })
    }

    fn apply(self, params: &mut CertificateParams) {
        // `days` is capped by MAX_VALIDITY_DAYS, so these additions stay far
        // inside `time`'s range (its `+` panics on overflow).
        let epoch = rcgen::date_time_ymd(1970, 1, 1);
        params.not_before = epoch + self.not_before;
        params.not_after = epoch + self.not_after;
    }
}

fn ca_params(validity: Validity, key: &KeyPair) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Each lab CA gets its own name: chain building matches issuers by name, so two labs'
    // CAs with one name would make a foreign chain fail as "bad signature" instead of the
    // accurate "unknown issuer". The suffix is the start of the CA's public key (of the EC
    // point's x, or of the RSA modulus past its DER header).
    let raw = key.public_key_raw();
    let skip = if raw.first() == Some(&0x30) { 9 } else { 1 };
    let tag: String = raw
        .iter()
        .skip(skip)
        .take(4)
        .map(|b| format!("{b:02x}"))
        .collect();
    // CN first so x509-parser (which prints in encoded order) shows
    // "CN=ntp-dtls lab CA 1a2b3c4d, O=ntp-dtls lab" in audit lines.
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    dn.push(DnType::OrganizationName, LAB_ORGANIZATION);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    validity.apply(&mut params);
    params
}

fn leaf_params(
    names: &[String],
    eku: ExtendedKeyUsagePurpose,
    validity: Validity,
) -> Result<CertificateParams, PkiError> {
    let mut params = leaf_params_for(names, eku)?;
    validity.apply(&mut params);
    Ok(params)
}

/// A leaf's names and extensions, without validity (a request carries none).
pub(super) fn leaf_params_for(
    names: &[String],
    eku: ExtendedKeyUsagePurpose,
) -> Result<CertificateParams, PkiError> {
    let mut sans = Vec::with_capacity(names.len());
    for name in names {
        let san = match name.parse::<IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => {
                if name.is_empty() {
                    return Err(PkiError::InvalidRequest("empty name".into()));
                }
                let dns = rcgen::string::Ia5String::try_from(name.as_str()).map_err(|_| {
                    PkiError::InvalidRequest(format!(
                        "{name:?} is neither an IP address nor an ASCII DNS name (use the punycode xn-- form for internationalised names)"
                    ))
                })?;
                SanType::DnsName(dns)
            }
        };
        sans.push(san);
    }
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    // Callers guarantee `names` is non-empty; the fallback only avoids a panic.
    dn.push(
        DnType::CommonName,
        names.first().map(String::as_str).unwrap_or_default(),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    // Explicit CA:FALSE rather than omitting basicConstraints, so no
    // verifier can be talked into treating a leaf as an issuer.
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDHE with ECDSA or RSA signatures: the leaf key only signs the handshake.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![eku];
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::test_support::*;
    use crate::pki::{load_ca_roots, load_private_key, public_key_matches, summarize};
    use rcgen::PKCS_ECDSA_P256_SHA256;
    use std::os::unix::fs::{PermissionsExt, symlink};
    use x509_parser::certificate::X509Certificate;
    use x509_parser::prelude::FromDer;
    #[test]
    fn generate_then_load_everything_back() {
        let tmp = TempDir::new("roundtrip");
        let req = request(tmp.join("pki"));
        let written = generate_lab_pki(&req).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key.pem",
                "server.pem",
                "server.key.pem",
                "client.pem",
                "client.key.pem"
            ]
        );
        for p in &written {
            assert_eq!(p.parent().unwrap(), req.out_dir);
        }

        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            let path = req.out_dir.join(key);
            assert_eq!(mode(&path), 0o600, "{key}");
            let text = fs::read_to_string(&path).unwrap();
            assert!(text.starts_with("-----BEGIN PRIVATE KEY-----"), "{key}");
            let loaded = load_private_key(&path).unwrap();
            // What we wrote is exactly what rcgen serialised: PKCS#8 P-256.
            let pair = KeyPair::try_from(loaded.pkcs8_der()).unwrap();
            assert!(pair.is_compatible(&PKCS_ECDSA_P256_SHA256));
        }
        for cert in ["ca.pem", "server.pem", "client.pem"] {
            let m = mode(&req.out_dir.join(cert));
            assert_eq!(m & !0o644, 0, "{cert} mode {m:o}");
            assert_eq!(m & 0o600, 0o600, "{cert} mode {m:o}");
        }

        let ca = cert_der(&req.out_dir.join("ca.pem"));
        let server = cert_der(&req.out_dir.join("server.pem"));
        let client = cert_der(&req.out_dir.join("client.pem"));
        assert_eq!(
            load_ca_roots(&req.out_dir.join("ca.pem")).unwrap(),
            std::slice::from_ref(&ca)
        );

        let ca_key = load_private_key(&req.out_dir.join("ca.key.pem")).unwrap();
        let server_key = load_private_key(&req.out_dir.join("server.key.pem")).unwrap();
        let client_key = load_private_key(&req.out_dir.join("client.key.pem")).unwrap();
        assert!(public_key_matches(&server, &server_key).unwrap());
        assert!(public_key_matches(&client, &client_key).unwrap());
        assert!(public_key_matches(&ca, &ca_key).unwrap());
        assert!(!public_key_matches(&server, &client_key).unwrap());
        assert!(!public_key_matches(&server, &ca_key).unwrap());
        assert!(!public_key_matches(&client, &server_key).unwrap());

        let now = now_unix();
        let ca_sum = summarize(&ca).unwrap();
        assert!(
            ca_sum.subject.starts_with("CN=ntp-dtls lab CA ")
                && ca_sum.subject.ends_with(", O=ntp-dtls lab"),
            "{}",
            ca_sum.subject
        );
        assert_eq!(ca_sum.issuer, ca_sum.subject);
        assert!(ca_sum.dns_names.is_empty() && ca_sum.ip_addresses.is_empty());

        let s = summarize(&server).unwrap();
        assert_eq!(s.subject, "CN=ntp.example.test");
        assert_eq!(s.issuer, ca_sum.subject);
        assert_eq!(s.dns_names, ["ntp.example.test"]);
        assert_eq!(
            s.ip_addresses,
            [
                "192.0.2.10".parse::<IpAddr>().unwrap(),
                "2001:db8::10".parse::<IpAddr>().unwrap()
            ]
        );
        assert!((s.not_before_unix - (now - 3600)).abs() <= 60, "{s:?}");
        assert!(
            (s.not_after_unix - (now + 30 * 86_400)).abs() <= 60,
            "{s:?}"
        );
        assert!(!s.serial_hex.is_empty());
        assert!(s.serial_hex.chars().all(|c| c.is_ascii_hexdigit()));

        let c = summarize(&client).unwrap();
        assert_eq!(c.subject, "CN=ntp-dtls-client");
        assert_eq!(c.dns_names, [DEFAULT_CLIENT_NAME]);
        assert!(c.ip_addresses.is_empty());
        assert_ne!(c.serial_hex, s.serial_hex);
    }

    #[test]
    fn generated_extensions_are_as_specified() {
        let tmp = TempDir::new("ext");
        let mut req = request(tmp.join("pki"));
        req.client_names = vec!["client-a.example.test".into(), "198.51.100.7".into()];
        generate_lab_pki(&req).unwrap();

        let ca = cert_der(&req.out_dir.join("ca.pem"));
        let (_, ca) = X509Certificate::from_der(&ca).unwrap();
        let bc = ca.basic_constraints().unwrap().unwrap();
        assert!(bc.value.ca, "CA must carry CA:TRUE");
        let ku = ca.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        assert!(!ku.digital_signature());

        for (file, server_auth) in [("server.pem", true), ("client.pem", false)] {
            let der = cert_der(&req.out_dir.join(file));
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let bc = cert.basic_constraints().unwrap().unwrap();
            assert!(!bc.value.ca, "{file} must not be a CA");
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            assert_eq!(eku.server_auth, server_auth, "{file}");
            assert_eq!(eku.client_auth, !server_auth, "{file}");
            assert!(!eku.any && eku.other.is_empty(), "{file}");
            let ku = cert.key_usage().unwrap().unwrap().value;
            assert!(ku.digital_signature() && !ku.key_cert_sign(), "{file}");
            assert_eq!(cert.issuer().as_raw(), ca.subject().as_raw());
        }

        let client = summarize(&cert_der(&req.out_dir.join("client.pem"))).unwrap();
        assert_eq!(client.subject, "CN=client-a.example.test");
        assert_eq!(client.dns_names, ["client-a.example.test"]);
        assert_eq!(
            client.ip_addresses,
            ["198.51.100.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn openssl_accepts_the_generated_pki() {
        let tmp = TempDir::new("verify");
        let req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let dir = &req.out_dir;
        let out = openssl_ok(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslserver",
                "server.pem",
            ],
        );
        assert!(out.contains("server.pem: OK"), "{out}");
        let out = openssl_ok(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslclient",
                "client.pem",
            ],
        );
        assert!(out.contains("client.pem: OK"), "{out}");
        // The EKUs really restrict: a client cert is no server cert.
        let wrong = openssl(
            dir,
            &[
                "verify",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "sslserver",
                "client.pem",
            ],
        );
        assert!(!wrong.status.success());
        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            openssl_ok(dir, &["pkey", "-in", key, "-noout", "-check"]);
        }
        // serial_hex matches what operators see from openssl.
        let serial = openssl_ok(dir, &["x509", "-in", "server.pem", "-noout", "-serial"]);
        let summary = summarize(&cert_der(&dir.join("server.pem"))).unwrap();
        assert_eq!(serial.trim(), format!("serial={}", summary.serial_hex));
    }

    #[test]
    fn refuses_to_overwrite_and_writes_nothing() {
        let tmp = TempDir::new("noclobber");
        let req = request(tmp.join("pki"));
        fs::create_dir_all(&req.out_dir).unwrap();
        fs::write(req.out_dir.join("client.key.pem"), "keep me").unwrap();
        fs::write(req.out_dir.join("server.pem"), "keep me too").unwrap();

        let err = generate_lab_pki(&req).unwrap_err();
        match &err {
            PkiError::AlreadyExists { path } => {
                assert_eq!(path, &req.out_dir.join("server.pem"), "first existing file");
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(
            msg.contains("server.pem") && msg.contains("--force"),
            "{msg}"
        );

        let mut entries: Vec<_> = fs::read_dir(&req.out_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries, ["client.key.pem", "server.pem"]);
        assert_eq!(
            fs::read_to_string(req.out_dir.join("client.key.pem")).unwrap(),
            "keep me"
        );
        assert_eq!(
            fs::read_to_string(req.out_dir.join("server.pem")).unwrap(),
            "keep me too"
        );
    }

    #[test]
    fn dangling_symlink_counts_as_existing() {
        let tmp = TempDir::new("symlink");
        let req = request(tmp.join("pki"));
        fs::create_dir_all(&req.out_dir).unwrap();
        symlink(tmp.join("nowhere"), req.out_dir.join("ca.key.pem")).unwrap();
        let err = generate_lab_pki(&req).unwrap_err();
        assert!(
            matches!(&err, PkiError::AlreadyExists { path } if path.ends_with("ca.key.pem")),
            "{err:?}"
        );
        assert!(
            !tmp.join("nowhere").exists(),
            "must not write through the link"
        );
    }

    #[test]
    fn force_overwrites_with_fresh_files_and_tight_modes() {
        let tmp = TempDir::new("force");
        let mut req = request(tmp.join("pki"));
        generate_lab_pki(&req).unwrap();
        let old_ca = fs::read(req.out_dir.join("ca.pem")).unwrap();
        let old_key = fs::read(req.out_dir.join("server.key.pem")).unwrap();
        // Someone loosened a key file; a forced run must not inherit that.
        fs::set_permissions(
            req.out_dir.join("server.key.pem"),
            fs::Permissions::from_mode(0o644),
        )
        .unwrap();

        assert!(matches!(
            generate_lab_pki(&req),
            Err(PkiError::AlreadyExists { .. })
        ));
        req.force = true;
        let written = generate_lab_pki(&req).unwrap();
        assert_eq!(written.len(), 6);
        assert_ne!(fs::read(req.out_dir.join("ca.pem")).unwrap(), old_ca);
        assert_ne!(
            fs::read(req.out_dir.join("server.key.pem")).unwrap(),
            old_key
        );
        for key in ["ca.key.pem", "server.key.pem", "client.key.pem"] {
            assert_eq!(mode(&req.out_dir.join(key)), 0o600, "{key}");
        }
        // No temporary files left behind.
        assert_eq!(fs::read_dir(&req.out_dir).unwrap().count(), 6);
        // And the new set is consistent.
        let server = cert_der(&req.out_dir.join("server.pem"));
        let key = load_private_key(&req.out_dir.join("server.key.pem")).unwrap();
        assert!(public_key_matches(&server, &key).unwrap());
    }

    #[test]
    fn invalid_requests_are_refused_before_writing() {
        let tmp = TempDir::new("invalid");
        let base = request(tmp.join("pki"));

        let mut r = base.clone();
        r.server_names.clear();
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.days = 0;
        let err = generate_lab_pki(&r).unwrap_err();
        assert!(err.to_string().contains("days"), "{err}");

        let mut r = base.clone();
        r.days = MAX_VALIDITY_DAYS + 1;
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.days = u32::MAX;
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        let mut r = base.clone();
        r.server_names.push("ntp.exämple.test".into());
        let err = generate_lab_pki(&r).unwrap_err();
        assert!(err.to_string().contains("ntp.exämple.test"), "{err}");

        let mut r = base.clone();
        r.client_names = vec![String::new()];
        assert!(matches!(
            generate_lab_pki(&r),
            Err(PkiError::InvalidRequest(_))
        ));

        assert!(!base.out_dir.exists(), "nothing may be written");

        // The longest allowed validity works (no overflow in time arithmetic).
        let mut r = base.clone();
        r.days = MAX_VALIDITY_DAYS;
        generate_lab_pki(&r).unwrap();
    }

    #[test]
    fn out_dir_that_is_a_file_is_a_clear_error() {
        let tmp = TempDir::new("outfile");
        fs::write(tmp.join("pki"), "").unwrap();
        let err = generate_lab_pki(&request(tmp.join("pki"))).unwrap_err();
        assert!(matches!(err, PkiError::CreateDir { .. }), "{err:?}");
        assert!(err.to_string().contains("pki"), "{err}");
    }

    // ---- loading keys from OpenSSL ----------------------------------------
}
