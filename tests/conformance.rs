//! NDcPP-style conformance cases with OpenSSL as the independent peer.
//!
//! An evaluator brings their own tools: here `openssl s_client` / `s_server` (Debian's OpenSSL
//! 3.0) and socat's openssl-dtls addresses talk to the relays as real processes on loopback, and
//! a test-only UDP proxy tampers with records between our own DTLS client and the server relay.
//!
//! Every test is named `case_<short_name>`; scripts/conformance.sh maps those names to the NDcPP
//! elements they evidence and prints the table. Negative cases check the same three things each
//! time: the relay the case applies to logged a refusal naming the reason (the server relay
//! exactly one association line; the client relay, which retries with backoff, a first
//! association line that is that refusal and never an established one); the peer never got an
//! association; and no datagram went past the relay, although the peer had one to send (a
//! request waits on s_client's stdin; a request goes to the client relay).
//!
//! Rekeying is a new association (fresh handshake, fresh keys) made before the old one is
//! closed, as the client relay does; `case_old_association_record_discarded_after_rekey` plays
//! it with the crate's own DTLS client.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::relays::{DtlsTestClient, Relay};
use common::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};

/// Wall-clock limit for one openssl command that is expected to finish by itself.
const OPENSSL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a relay may take to log a refusal, or a peer to show a handshake result.
const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long to wait for an NTP reply that should come.
const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for an NTP reply that must not come.
const SILENCE: Duration = Duration::from_millis(400);

/// The one suite the relays accept, in OpenSSL's spelling.
const OPENSSL_SUITE: &str = "ECDHE-ECDSA-AES128-GCM-SHA256";

// ---------------------------------------------------------------------------------------------
// A lab PKI that can also make bad certificates (rcgen, in-process)
// ---------------------------------------------------------------------------------------------

/// A certificate and its PKCS#8 key, as PEM files, and the intermediates that go with it.
struct Credential {
    cert: PathBuf,
    key: PathBuf,
    /// Intermediate certificates (PEM), sent after the leaf.
    chain: Option<PathBuf>,
}

/// What a leaf certificate says. Validity is in days relative to now.
struct Leaf {
    cn: &'static str,
    dns: Vec<&'static str>,
    ips: Vec<IpAddr>,
    eku: Vec<ExtendedKeyUsagePurpose>,
    key_usages: Vec<KeyUsagePurpose>,
    valid_from_days: i64,
    valid_to_days: i64,
}

impl Leaf {
    /// A good server certificate for localhost and 127.0.0.1.
    fn server() -> Leaf {
        Leaf {
            cn: "localhost",
            dns: vec!["localhost"],
            ips: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            valid_from_days: -1,
            valid_to_days: 30,
        }
    }

    /// A good client certificate.
    fn client() -> Leaf {
        Leaf {
            cn: "conformance-client",
            dns: vec!["conformance-client"],
            ips: vec![],
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            valid_from_days: -1,
            valid_to_days: 30,
        }
    }

    fn params(&self) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, self.cn);
        params.distinguished_name = dn;
        let dns = self.dns.iter().map(|d| {
            SanType::DnsName(rcgen::string::Ia5String::try_from(*d).expect("ASCII DNS name"))
        });
        params.subject_alt_names = dns
            .chain(self.ips.iter().map(|ip| SanType::IpAddress(*ip)))
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = self.key_usages.clone();
        params.extended_key_usages = self.eku.clone();
        params.use_authority_key_identifier_extension = true;
        set_validity(&mut params, self.valid_from_days, self.valid_to_days);
        params
    }
}

fn set_validity(params: &mut CertificateParams, from_days: i64, to_days: i64) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let at = |days: i64| {
        let secs = u64::try_from(now + days * 86_400).expect("after 1970");
        rcgen::date_time_ymd(1970, 1, 1) + Duration::from_secs(secs)
    };
    params.not_before = at(from_days);
    params.not_after = at(to_days);
}

fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key")
}

/// A CA in a temporary directory, issuing whatever it is asked to.
struct Lab {
    dir: TempDir,
    ca: Issuer<'static, KeyPair>,
    ca_pem: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        let dir = TempDir::new();
        let key = p256();
        // Each lab CA has its own name, so chains from another lab fail as unknown issuer.
        let tag: String = key.public_key_raw()[1..5]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("conformance CA {tag}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        set_validity(&mut params, -1, 30);
        let cert = params.self_signed(&key).expect("CA certificate");
        let ca_pem = dir.write("ca.pem", cert.pem());
        // For `openssl ca -gencrl`.
        dir.write("ca.key.pem", key.serialize_pem());
        Lab {
            dir,
            ca: Issuer::new(params, key),
            ca_pem,
        }
    }

    fn ca(&self) -> &Path {
        &self.ca_pem
    }

    fn write(&self, name: &str, cert_pem: &str, key: &KeyPair) -> Credential {
        Credential {
            cert: self.dir.write(&format!("{name}.pem"), cert_pem),
            key: self
                .dir
                .write(&format!("{name}.key.pem"), key.serialize_pem()),
            chain: None,
        }
    }

    /// A leaf issued by this lab's CA.
    fn issue(&self, name: &str, leaf: &Leaf) -> Credential {
        let key = p256();
        let cert = leaf.params().signed_by(&key, &self.ca).expect("leaf");
        self.write(name, &cert.pem(), &key)
    }

    /// A leaf issued by an intermediate that the CA issued with `basic_constraints` (anything
    /// but CA:TRUE makes the chain invalid); the intermediate is in `chain`.
    fn issue_via_intermediate(
        &self,
        name: &str,
        leaf: &Leaf,
        basic_constraints: IsCa,
    ) -> Credential {
        // Everything else an issuer needs is there: only basicConstraints is wrong.
        self.issue_via_intermediate_with(
            name,
            leaf,
            basic_constraints,
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
        )
        .0
    }

    /// A leaf via an intermediate with these basicConstraints and key usages; also returns
    /// the intermediate itself (its certificate and key), which can sign CRLs.
    fn issue_via_intermediate_with(
        &self,
        name: &str,
        leaf: &Leaf,
        basic_constraints: IsCa,
        key_usages: Vec<KeyUsagePurpose>,
    ) -> (Credential, Credential) {
        let inter_key = p256();
        let mut inter = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{name} intermediate"));
        inter.distinguished_name = dn;
        inter.is_ca = basic_constraints;
        inter.key_usages = key_usages;
        inter.use_authority_key_identifier_extension = true;
        set_validity(&mut inter, -1, 30);
        let inter_cert = inter.signed_by(&inter_key, &self.ca).expect("intermediate");
        let intermediate = self.write(
            &format!("{name}-intermediate"),
            &inter_cert.pem(),
            &inter_key,
        );
        let issuer = Issuer::new(inter, inter_key);
        let key = p256();
        let cert = leaf.params().signed_by(&key, &issuer).expect("leaf");
        let credential = Credential {
            chain: Some(
                self.dir
                    .write(&format!("{name}.chain.pem"), inter_cert.pem()),
            ),
            ..self.write(name, &cert.pem(), &key)
        };
        (credential, intermediate)
    }

    /// A leaf signed by its own key.
    fn self_signed(&self, name: &str, leaf: &Leaf) -> Credential {
        let key = p256();
        let cert = leaf.params().self_signed(&key).expect("self-signed leaf");
        self.write(name, &cert.pem(), &key)
    }
}

// ---------------------------------------------------------------------------------------------
// The relays, on this lab's certificates
// ---------------------------------------------------------------------------------------------

fn start_server_relay(identity: &Credential, upstream: SocketAddr, extra: &[&str]) -> Relay {
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        upstream.to_string(),
        "--cert".into(),
        identity.cert.display().to_string(),
        "--key".into(),
        identity.key.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = spawn_ntp_dtls("server-relay", &args);
    let addr = daemon.wait_ready(READY_TIMEOUT)[0];
    Relay { daemon, addr }
}

/// The client relay towards `server`, trusting `ca`; `server_name` None means the default
/// reference identifier (the host of --server, 127.0.0.1).
fn start_client_relay(ca: &Path, server: SocketAddr, server_name: Option<&str>) -> Relay {
    start_client_relay_with(ca, server, server_name, &[])
}

fn start_client_relay_with(
    ca: &Path,
    server: SocketAddr,
    server_name: Option<&str>,
    extra: &[&str],
) -> Relay {
    let mut args: Vec<String> = vec![
        "client".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--server".into(),
        server.to_string(),
        "--ca".into(),
        ca.display().to_string(),
    ];
    if let Some(name) = server_name {
        args.extend(["--server-name".into(), name.into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    let daemon = spawn_ntp_dtls("client-relay", &args);
    let addr = daemon.wait_ready(READY_TIMEOUT)[0];
    Relay { daemon, addr }
}

/// SIGTERMs a relay and returns its association lines and its `stopped` summary: once it has
/// exited nothing more can be logged or forwarded, so counts taken now are final.
fn stop_relay(relay: &mut Relay) -> (Vec<String>, String) {
    relay.daemon.terminate();
    let stopped = relay
        .daemon
        .wait_for_line("stopped counters=", Duration::from_secs(5));
    let associations = relay
        .daemon
        .lines()
        .into_iter()
        .filter(|l| l.contains(" association "))
        .collect();
    (associations, stopped)
}

/// Exactly one association line, a refusal with this reason label; returns it.
fn assert_one_refusal(associations: &[String], reason: &str) -> String {
    assert_eq!(
        associations.len(),
        1,
        "expected exactly one association line (a refusal), got:\n{}",
        associations.join("\n")
    );
    let line = &associations[0];
    assert!(line.contains("association refused"), "{line}");
    assert!(
        line.contains(&format!("reason={reason} ")),
        "expected reason={reason}: {line}"
    );
    eprintln!("audit: {line}");
    line.clone()
}

/// For the client relay, which tries again after a refusal (backoff 0.5-1 s at first, then
/// longer): how many attempts fall between its start and its stop depends on the machine's
/// speed, so the count is not the claim. The first association line is the refusal with this
/// reason, and no line says an association was established; returns the first line.
fn assert_first_refusal(associations: &[String], reason: &str) -> String {
    let first = associations
        .first()
        .unwrap_or_else(|| panic!("no association line: expected a refusal, reason={reason}"));
    assert!(first.contains("association refused"), "{first}");
    assert!(
        first.contains(&format!("reason={reason} ")),
        "expected reason={reason}: {first}"
    );
    assert!(
        !associations
            .iter()
            .any(|l| l.contains("association established")),
        "an association was established:\n{}",
        associations.join("\n")
    );
    eprintln!("audit: {first}");
    first.clone()
}

// ---------------------------------------------------------------------------------------------
// OpenSSL and socat as processes
// ---------------------------------------------------------------------------------------------

struct Captured {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
}

/// A peer process with a writable stdin and byte-exact captured output, killed with its whole
/// process group on Drop. (Daemon captures lines and closes stdin; s_client and s_server carry
/// binary NTP packets on stdin and stdout.)
struct Peer {
    name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<(Mutex<Captured>, Condvar)>,
    readers: Vec<JoinHandle<()>>,
}

impl Peer {
    fn spawn(name: &str, mut cmd: Command) -> Peer {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0);
        let desc = format!("{cmd:?}");
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot spawn {desc}: {e}"));
        eprintln!("[{name}] spawned pid {}: {desc}", child.id());
        let out = Arc::new((
            Mutex::new(Captured {
                stdout: Vec::new(),
                stderr: Vec::new(),
            }),
            Condvar::new(),
        ));
        let reader = |mut stream: Box<dyn Read + Send>, is_stdout: bool| {
            let out = out.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    let mut captured = out.0.lock().unwrap_or_else(|e| e.into_inner());
                    let sink = if is_stdout {
                        &mut captured.stdout
                    } else {
                        &mut captured.stderr
                    };
                    sink.extend_from_slice(&buf[..n]);
                    out.1.notify_all();
                }
            })
        };
        let readers = vec![
            reader(Box::new(child.stdout.take().expect("stdout")), true),
            reader(Box::new(child.stderr.take().expect("stderr")), false),
        ];
        Peer {
            name: name.to_string(),
            stdin: child.stdin.take(),
            child,
            out,
            readers,
        }
    }

    /// Closes the peer's stdin (EOF after whatever was written).
    fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits for the peer to exit by itself (panics after `timeout`), then for its output to be
    /// read to the end.
    fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                break status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{}: still running after {timeout:?}\n{}",
                    self.name,
                    self.text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        };
        // A grandchild could hold the pipes open: end the group, then read to the end.
        kill_group(self.child.id());
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
        status
    }

    fn write(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(bytes).expect("write to peer stdin");
        stdin.flush().expect("flush peer stdin");
    }

    fn stdout(&self) -> Vec<u8> {
        self.out
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stdout
            .clone()
    }

    /// stdout and stderr as text, for assertions on OpenSSL's reports and for panic messages.
    fn text(&self) -> String {
        let captured = self.out.0.lock().unwrap_or_else(|e| e.into_inner());
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            String::from_utf8_lossy(&captured.stdout),
            String::from_utf8_lossy(&captured.stderr)
        )
    }

    /// Waits until `pred(stdout, stderr)` holds; panics with the output on timeout.
    fn wait_for<T>(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&[u8], &[u8]) -> Option<T>,
    ) -> T {
        let deadline = Instant::now() + timeout;
        let mut captured = self.out.0.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(found) = pred(&captured.stdout, &captured.stderr) {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                drop(captured);
                panic!(
                    "{}: no {what} within {timeout:?}\n{}",
                    self.name,
                    self.text()
                );
            }
            captured = self
                .out
                .1
                .wait_timeout(captured, left.min(Duration::from_millis(100)))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn wait_for_text(&self, needle: &str, timeout: Duration) {
        self.wait_for(&format!("{needle:?}"), timeout, |out, err| {
            (contains(out, needle.as_bytes()) || contains(err, needle.as_bytes())).then_some(())
        })
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        kill_group(self.child.id());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// SIGKILLs the process group `pgid` (a child spawned with `process_group(0)`).
///
/// Through sh's builtin kill, as the harness does: procps-ng 4.0.2's /usr/bin/kill parses
/// `kill -KILL -12` as kill(-1, SIGKILL), which as root ends every process on the machine.
fn kill_group(pgid: u32) {
    assert!(pgid > 1, "refusing to signal process group {pgid}");
    let _ = Command::new("sh")
        .args(["-c", &format!("kill -KILL -{pgid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// Whether `out` holds the client request `request` as the client relay forwards it: as it
/// was, or marked for the time server's transmit time (origin 1, docs/TIMESTAMPS.md "The time
/// server's own transmit time"), the one field it may change in a basic request.
fn carries_request(out: &[u8], request: &[u8; 48]) -> bool {
    let mut marked = *request;
    marked[24..32].copy_from_slice(&1u64.to_be_bytes());
    contains(out, request) || contains(out, &marked)
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// A Daemon (line-captured logs) in its own process group, killed as a group on Drop: socat
/// forks a child per association.
struct GroupDaemon(Daemon);

impl GroupDaemon {
    fn spawn(name: &str, program: &str, args: &[String]) -> GroupDaemon {
        let mut cmd = Command::new(tool(program));
        cmd.args(args).process_group(0);
        GroupDaemon(Daemon::spawn_command(name, cmd))
    }
}

impl Drop for GroupDaemon {
    fn drop(&mut self) {
        kill_group(self.0.pid());
    }
}

fn openssl() -> Command {
    Command::new(tool("openssl"))
}

/// `openssl s_client -connect SERVER -CAfile CA -verify_hostname localhost -verify_return_error`
/// plus `extra`, with an NTP request waiting on its stdin, then EOF. s_client reads stdin only
/// once its handshake has completed: if the relay let one complete, the request would go into
/// the association (one record) and reach the time server, which the cases' "nothing
/// forwarded" check would see (s_client_request_reaches_the_time_server_once_accepted shows
/// it does). Returns s_client's exit status and output.
fn s_client_with_request(
    server: SocketAddr,
    ca: &Path,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> (std::process::ExitStatus, String) {
    let mut cmd = openssl();
    cmd.args(["s_client", "-connect", &server.to_string(), "-CAfile"])
        .arg(ca)
        .args(["-verify_hostname", "localhost", "-verify_return_error"])
        .args(extra);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut peer = Peer::spawn("s_client", cmd);
    // Written before the handshake can be over; should s_client already be gone, it never had
    // an association to send in, and the write's error does not matter.
    if let Some(stdin) = peer.stdin.as_mut() {
        let _ = stdin.write_all(&ntp_client_request(ntp_now()));
    }
    peer.close_stdin();
    let status = peer.wait_exit(OPENSSL_TIMEOUT);
    let text = peer.text();
    eprintln!("[s_client {}] {status}\n{text}", extra.join(" "));
    (status, text)
}

/// s_client_with_request, expected to be refused with an alert; returns s_client's output.
fn s_client_once(server: SocketAddr, ca: &Path, extra: &[&str], env: &[(&str, &Path)]) -> String {
    let (status, text) = s_client_with_request(server, ca, extra, env);
    assert!(
        !text.contains("no cipher match") && !text.contains("no ciphers available"),
        "s_client could not offer what the case asks for:\n{text}"
    );
    // OpenSSL reports the pending suite even for a failed handshake: what counts is that it
    // failed, on a fatal alert from the relay.
    assert!(
        !status.success() && text.contains("SSL alert number"),
        "s_client was not refused with an alert:\n{text}"
    );
    text
}

/// `openssl s_server -dtls1_2` (or `version`) on a kernel-chosen loopback port, stdin open.
fn s_server(
    identity: &Credential,
    version: &str,
    extra: &[&str],
    env: &[(&str, &Path)],
) -> (Peer, SocketAddr) {
    let mut cmd = openssl();
    cmd.args(["s_server", version, "-accept", "127.0.0.1:0", "-cert"])
        .arg(&identity.cert)
        .arg("-key")
        .arg(&identity.key)
        .args(extra);
    if let Some(chain) = &identity.chain {
        // -cert reads one certificate; the intermediates go separately.
        cmd.arg("-cert_chain").arg(chain);
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    let peer = Peer::spawn("s_server", cmd);
    let port = peer.wait_for("ACCEPT line", EVENT_TIMEOUT, |out, _| {
        let text = String::from_utf8_lossy(out);
        let line = text.lines().find(|l| l.starts_with("ACCEPT "))?;
        line.rsplit(':').next()?.trim().parse::<u16>().ok()
    });
    (peer, SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// An OPENSSL_CONF that turns off the extended master secret for every OpenSSL context.
fn no_ems_conf(dir: &TempDir) -> PathBuf {
    dir.write(
        "no-ems.cnf",
        "openssl_conf = openssl_init\n\n\
         [openssl_init]\nssl_conf = ssl_sect\n\n\
         [ssl_sect]\nsystem_default = system_default_sect\n\n\
         [system_default_sect]\nOptions = -ExtendedMasterSecret\n",
    )
}

// ---------------------------------------------------------------------------------------------
// NTP helpers
// ---------------------------------------------------------------------------------------------

/// A mode-4 reply in `bytes` whose origin is `transmit`, wherever it starts (s_client and
/// s_server print their session report on the same stdout).
fn find_reply(bytes: &[u8], transmit: u64) -> Option<NtpPacket> {
    let at = find(bytes, &transmit.to_be_bytes())?;
    let start = at.checked_sub(24)?;
    let reply = parse_ntp(bytes.get(start..start + 48)?)?;
    (reply.mode == 4 && reply.origin_ts == transmit).then_some(reply)
}

fn assert_valid_reply(reply: &NtpPacket, transmit: u64) {
    assert_eq!(reply.mode, 4, "{reply:?}");
    assert_eq!(reply.origin_ts, transmit, "{reply:?}");
    assert!(
        (1..16).contains(&reply.stratum),
        "unsynchronised: {reply:?}"
    );
    let offset = ntp_diff(reply.transmit_ts, ntp_now());
    assert!(
        offset.abs() < 1.0,
        "reply time off by {offset} s: {reply:?}"
    );
}

/// One request to `addr` from a fresh socket, and the first datagram that comes back (not
/// filtered: a reply to some other request is the caller's to see). Returns the transmit
/// timestamp sent and the reply.
fn query_once(addr: SocketAddr) -> (u64, NtpPacket) {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(addr).expect("connect");
    socket
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
    let transmit = ntp_now();
    socket.send(&ntp_client_request(transmit)).expect("send");
    let mut buf = [0u8; 2048];
    let len = socket
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no reply from {addr}: {e}"));
    let reply = parse_ntp(&buf[..len]).unwrap_or_else(|| panic!("not NTP: {:?}", &buf[..len]));
    (transmit, reply)
}

/// A request through the client relay must go unanswered.
fn assert_no_reply_through(client: &Relay) {
    assert!(
        ntp_query(client.addr, SILENCE).is_none(),
        "the client relay answered without an association"
    );
}

// ---------------------------------------------------------------------------------------------
// Positive interop
// ---------------------------------------------------------------------------------------------

#[test]
fn case_openssl_client_interop() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let lab = Lab::new();
    let mut server = start_server_relay(&lab.issue("server", &Leaf::server()), chronyd.addr(), &[]);

    let mut cmd = openssl();
    cmd.args([
        "s_client",
        "-dtls1_2",
        "-connect",
        &server.addr.to_string(),
        "-CAfile",
    ])
    .arg(lab.ca())
    .args([
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-ign_eof",
    ]);
    let mut s_client = Peer::spawn("s_client", cmd);
    s_client.wait_for_text("Verify return code: 0 (ok)", EVENT_TIMEOUT);
    let report = s_client.text();
    for expected in [
        "Protocol  : DTLSv1.2",
        &format!("Cipher    : {OPENSSL_SUITE}"),
        "Extended master secret: yes",
    ] {
        assert!(report.contains(expected), "{expected:?} missing:\n{report}");
    }

    // Two requests, each one datagram written to s_client, each one record.
    for _ in 0..2 {
        let transmit = ntp_now();
        s_client.write(&ntp_client_request(transmit));
        let reply = s_client.wait_for("the NTP reply", REPLY_TIMEOUT, |out, _| {
            find_reply(out, transmit)
        });
        assert_valid_reply(&reply, transmit);
    }
    drop(s_client);
    let (associations, stopped) = stop_relay(&mut server);
    assert!(
        associations[0].contains("association established"),
        "{associations:?}"
    );
    assert!(stopped.contains("replies_delivered=2"), "{stopped}");
}

#[test]
fn case_mutual_auth_interop() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let ca = lab.ca().display().to_string();
    let server = start_server_relay(
        &lab.issue("server", &Leaf::server()),
        upstream.addr(),
        &["--client-ca", &ca],
    );
    let client = lab.issue("client", &Leaf::client());
    let mut cmd = openssl();
    cmd.args([
        "s_client",
        "-dtls1_2",
        "-connect",
        &server.addr.to_string(),
        "-CAfile",
    ])
    .arg(lab.ca())
    .args([
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-ign_eof",
    ])
    .arg("-cert")
    .arg(&client.cert)
    .arg("-key")
    .arg(&client.key);
    let mut s_client = Peer::spawn("s_client", cmd);
    s_client.wait_for_text("Verify return code: 0 (ok)", EVENT_TIMEOUT);
    let transmit = ntp_now();
    s_client.write(&ntp_client_request(transmit));
    let reply = s_client.wait_for("the NTP reply", REPLY_TIMEOUT, |out, _| {
        find_reply(out, transmit)
    });
    assert_valid_reply(&reply, transmit);
    let established = server
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
    assert!(
        established.contains("subject=CN=conformance-client"),
        "{established}"
    );
}

#[test]
fn case_socat_client_interop() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let lab = Lab::new();
    let server = start_server_relay(&lab.issue("server", &Leaf::server()), chronyd.addr(), &[]);
    let port = free_udp_port(loopback_ip(1));
    let socat = GroupDaemon::spawn(
        "socat-dtls-client",
        "socat",
        &[
            "-d".into(),
            "-d".into(),
            // Each forked child gets one request and then sees EOF on its UDP side. By default
            // it would pass that on as a close_notify at once, and the relay (as TLS demands)
            // drops the association before chronyd's reply is back. shut-none keeps the DTLS
            // side open, -t 2 lets the child wait for the reply.
            "-t".into(),
            "2".into(),
            format!("UDP4-RECVFROM:{port},bind=127.0.0.1,fork"),
            format!(
                "OPENSSL-DTLS-CLIENT:{},cafile={},commonname=localhost,shut-none",
                server.addr,
                lab.ca().display()
            ),
        ],
    );
    socat.0.wait_for_line("receiving on", EVENT_TIMEOUT);
    let front = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    // socat forks one child, and one DTLS association, per request datagram.
    for i in 0..5 {
        eprintln!("request {i} through socat");
        let (transmit, reply) = query_once(front);
        assert_valid_reply(&reply, transmit);
    }
    // Each child logs its handshake; the last one may still be on its way through the pipe.
    let negotiated = format!("SSL connection using {OPENSSL_SUITE}");
    socat.0.wait_for_count(&negotiated, 5, EVENT_TIMEOUT);
    // None refused: a final count, once the relay has exited.
    assert_eq!(server.daemon.count_after_exit("association refused"), 0);
}

#[test]
fn case_socat_server_interop() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let lab = Lab::new();
    let identity = lab.issue("server", &Leaf::server());
    let port = free_udp_port(loopback_ip(1));
    let socat = GroupDaemon::spawn(
        "socat-dtls-server",
        "socat",
        &[
            "-d".into(),
            "-d".into(),
            format!(
                "OPENSSL-DTLS-SERVER:{port},bind=127.0.0.1,fork,cert={},key={},cafile={},verify=0",
                identity.cert.display(),
                identity.key.display(),
                lab.ca().display()
            ),
            format!("UDP4:{}", chronyd.addr()),
        ],
    );
    socat.0.wait_for_line("listening on", EVENT_TIMEOUT);
    let client = start_client_relay(
        lab.ca(),
        SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        Some("localhost"),
    );
    client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
    // Several requests over the one association socat accepted.
    for i in 0..5 {
        eprintln!("request {i} through the client relay and socat");
        let (transmit, reply) = query_once(client.addr);
        assert_valid_reply(&reply, transmit);
    }
    socat
        .0
        .wait_for_line("accepting UDP connection", EVENT_TIMEOUT);
    assert_eq!(socat.0.count_lines("accepting UDP connection"), 1);
    // The client relay's whole life, counted once it has exited: the one association, closed
    // only by the shutdown.
    let lines = client.daemon.terminate_and_drain();
    let associations: Vec<&String> = lines
        .iter()
        .filter(|l| l.contains(" association ") && !l.contains("reason=shutdown"))
        .collect();
    assert_eq!(associations.len(), 1, "{associations:#?}");
    assert!(
        associations[0].contains("association established"),
        "{associations:#?}"
    );
}

#[test]
fn case_openssl_server_interop() {
    let lab = Lab::new();
    let (mut s_server, addr) =
        s_server(&lab.issue("server", &Leaf::server()), "-dtls1_2", &[], &[]);
    let client = start_client_relay(lab.ca(), addr, Some("localhost"));
    client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
    s_server.wait_for_text(&format!("CIPHER is {OPENSSL_SUITE}"), EVENT_TIMEOUT);
    let report = s_server.text();
    // Of every suite this OpenSSL offers, the client relay shares exactly the policy's two
    // (ECDSA and RSA, AES-128-GCM), and its four signature schemes.
    assert!(
        report.contains(&format!(
            "Shared ciphers:{OPENSSL_SUITE}:ECDHE-RSA-AES128-GCM-SHA256\n"
        )),
        "{report}"
    );
    assert!(
        report.contains(
            "Shared Signature Algorithms: ECDSA+SHA256:ECDSA+SHA384:RSA+SHA256:RSA+SHA384\n"
        ),
        "{report}"
    );

    // A request through the client relay arrives at s_server as one record; a reply written to
    // s_server goes back as one record, to the local client that asked.
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket.connect(client.addr).expect("connect");
    let transmit = ntp_now();
    let request = ntp_client_request(transmit);
    socket.send(&request).expect("send");
    s_server.wait_for("the NTP request", REPLY_TIMEOUT, |out, _| {
        carries_request(out, &request).then_some(())
    });
    let mut reply = [0u8; 48];
    reply[0] = 0x24; // LI 0, VN 4, mode 4
    reply[1] = 2;
    reply[24..32].copy_from_slice(&transmit.to_be_bytes());
    reply[32..40].copy_from_slice(&ntp_now().to_be_bytes());
    reply[40..48].copy_from_slice(&ntp_now().to_be_bytes());
    s_server.write(&reply);
    socket
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .expect("timeout");
    let mut buf = [0u8; 2048];
    let len = socket
        .recv(&mut buf)
        .expect("the reply written at s_server");
    // The client relay corrects T2 and T3 for its residence (docs/TIMESTAMPS.md), and nothing
    // else.
    assert_eq!(len, 48);
    assert_eq!(&buf[..32], &reply[..32]);
    let ts = |p: &[u8], at: usize| u64::from_be_bytes(p[at..at + 8].try_into().expect("8 bytes"));
    assert!(ts(&buf, 32) <= ts(&reply, 32) && ts(&buf, 40) >= ts(&reply, 40));
    assert!(
        ntp_diff(ts(&reply, 32), ts(&buf, 32)) < 1.0
            && ntp_diff(ts(&buf, 40), ts(&reply, 40)) < 1.0
    );
}

// ---------------------------------------------------------------------------------------------
// Server relay: versions, suites and the extended master secret (peer: s_client)
// ---------------------------------------------------------------------------------------------

/// One refused s_client handshake against a fresh server relay: exactly one audit line with
/// `reason`, nothing forwarded. Returns s_client's output.
fn server_refuses(extra: &[&str], env: &[(&str, &Path)], reason: &str) -> String {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let mut server =
        start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    let output = s_client_once(server.addr, lab.ca(), extra, env);
    let (associations, stopped) = stop_relay(&mut server);
    assert_one_refusal(&associations, reason);
    assert!(stopped.contains("associations_refused=1"), "{stopped}");
    assert_eq!(
        upstream.datagrams(),
        0,
        "a datagram reached the time server"
    );
    output
}

/// Not a case: shows that the refusal cases' "nothing forwarded" can fail. The same s_client
/// run, on a handshake the relay accepts, delivers its request to the time server.
#[test]
fn s_client_request_reaches_the_time_server_once_accepted() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let mut server =
        start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    let (_, text) = s_client_with_request(server.addr, lab.ca(), &["-dtls1_2"], &[]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let (associations, stopped) = stop_relay(&mut server);
    assert!(
        associations[0].contains("association established"),
        "{associations:?}"
    );
    assert!(stopped.contains("requests_forwarded=1"), "{stopped}");
    assert_eq!(
        upstream.requests(),
        1,
        "the request did not reach the time server"
    );
}

#[test]
fn case_server_refuses_dtls1_0() {
    let out = server_refuses(&["-dtls1"], &[], "protocol_version");
    assert!(out.contains("alert protocol version"), "{out}");
}

#[test]
fn case_server_refuses_cbc_sha() {
    server_refuses(
        &["-dtls1_2", "-cipher", "ECDHE-ECDSA-AES128-SHA"],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_aes256_cbc() {
    server_refuses(
        &["-dtls1_2", "-cipher", "ECDHE-ECDSA-AES256-SHA"],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_ccm() {
    server_refuses(
        &["-dtls1_2", "-cipher", "ECDHE-ECDSA-AES128-CCM"],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_ccm8() {
    server_refuses(
        &["-dtls1_2", "-cipher", "ECDHE-ECDSA-AES128-CCM8"],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_chacha20() {
    server_refuses(
        &["-dtls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_x25519_only() {
    // NDcPP allows the NIST curves only. The relays offer P-256 and P-384; a peer that offers
    // neither is refused with handshake_failure (vendor/PATCHES.md, patch h): no association,
    // one audit line, nothing forwarded.
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let mut server =
        start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    let (status, text) = s_client_with_request(
        server.addr,
        lab.ca(),
        &["-dtls1_2", "-groups", "X25519"],
        &[],
    );
    assert!(!status.success(), "{text}");
    assert!(!text.contains("Server Temp Key: X25519"), "{text}");
    let (associations, stopped) = stop_relay(&mut server);
    assert_one_refusal(&associations, "no_shared_cipher");
    assert!(text.contains("SSL alert number 40"), "{text}");
    assert!(stopped.contains("associations_refused=1"), "{stopped}");
    assert_eq!(
        upstream.datagrams(),
        0,
        "a datagram reached the time server"
    );
}

#[test]
fn case_server_refuses_psk() {
    server_refuses(
        &[
            "-dtls1_2",
            "-cipher",
            "PSK-AES128-GCM-SHA256",
            "-psk",
            "000102030405060708090a0b0c0d0e0f",
        ],
        &[],
        "no_shared_cipher",
    );
}

#[test]
fn case_server_refuses_no_ems() {
    let dir = TempDir::new();
    let conf = no_ems_conf(&dir);
    let out = server_refuses(
        &["-dtls1_2", "-trace"],
        &[("OPENSSL_CONF", &conf)],
        "no_extended_master_secret",
    );
    // The ClientHello really went without the extension: -trace names every extension sent.
    assert!(out.contains("ClientHello"), "{out}");
    assert!(!out.contains("extended_master_secret"), "{out}");
}

// ---------------------------------------------------------------------------------------------
// Client relay: the server's version, EMS and certificate (peer: s_server)
// ---------------------------------------------------------------------------------------------

/// A client relay against s_server presenting `identity`: its first association line is the
/// refusal with `reason`, it never establishes an association, and s_server never sees the
/// request sent to the client relay.
fn client_refuses(ca: &Path, identity: &Credential, server_name: Option<&str>, reason: &str) {
    client_refuses_with(ca, identity, server_name, &["-dtls1_2"], &[], reason);
}

fn client_refuses_with(
    ca: &Path,
    identity: &Credential,
    server_name: Option<&str>,
    s_server_args: &[&str],
    env: &[(&str, &Path)],
    reason: &str,
) -> (String, String) {
    client_refuses_full(ca, identity, server_name, s_server_args, env, &[], reason)
}

/// client_refuses_with, the client relay started with `client_extra` flags (--crl ...).
fn client_refuses_full(
    ca: &Path,
    identity: &Credential,
    server_name: Option<&str>,
    s_server_args: &[&str],
    env: &[(&str, &Path)],
    client_extra: &[&str],
    reason: &str,
) -> (String, String) {
    let (s_server, addr) = s_server(identity, s_server_args[0], &s_server_args[1..], env);
    let mut client = start_client_relay_with(ca, addr, server_name, client_extra);
    client
        .daemon
        .wait_for_line("association refused", EVENT_TIMEOUT);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let request = ntp_client_request(ntp_now());
    socket.send_to(&request, client.addr).expect("send");
    assert_no_reply_through(&client);
    let (associations, stopped) = stop_relay(&mut client);
    let audit = assert_first_refusal(&associations, reason);
    assert!(stopped.contains("associations_refused="), "{stopped}");
    assert!(!stopped.contains("associations_established"), "{stopped}");
    assert!(
        !carries_request(&s_server.stdout(), &request),
        "the request reached the server"
    );
    let text = s_server.text();
    eprintln!("[s_server]\n{text}");
    (audit, text)
}

#[test]
fn case_client_refuses_dtls1_0_server() {
    let lab = Lab::new();
    let server = lab.issue("server", &Leaf::server());
    let (audit, text) = client_refuses_with(
        lab.ca(),
        &server,
        Some("localhost"),
        &["-dtls1"],
        &[],
        "peer_alert",
    );
    // The client offers only an AEAD suite, which DTLS 1.0 does not have: the server gives up
    // with handshake_failure, and no DTLS 1.0 association can form.
    assert!(text.contains("no shared cipher"), "{text}");
    assert!(audit.contains("fatal alert (handshake_failure)"), "{audit}");
}

#[test]
fn case_client_refuses_no_ems_server() {
    let lab = Lab::new();
    let dir = TempDir::new();
    let conf = no_ems_conf(&dir);
    let server = lab.issue("server", &Leaf::server());
    let (_, text) = client_refuses_with(
        lab.ca(),
        &server,
        Some("localhost"),
        &["-dtls1_2", "-trace"],
        &[("OPENSSL_CONF", &conf)],
        "no_extended_master_secret",
    );
    // Our ClientHello offered the extension; s_server's ServerHello really left it out.
    let server_hello = text
        .find("ServerHello,")
        .expect("s_server sent a ServerHello");
    let hello_end = text[server_hello..]
        .find("Certificate,")
        .map_or(text.len(), |n| server_hello + n);
    assert!(
        text[..server_hello].contains("extended_master_secret"),
        "{text}"
    );
    assert!(
        !text[server_hello..hello_end].contains("extended_master_secret"),
        "{text}"
    );
}

#[test]
fn case_client_refuses_unknown_ca() {
    let trusted = Lab::new();
    let other = Lab::new();
    let server = other.issue("server", &Leaf::server());
    client_refuses(trusted.ca(), &server, Some("localhost"), "unknown_ca");
}

#[test]
fn case_client_refuses_wrong_dns_san() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            cn: "localhost",
            dns: vec!["time.example.net"],
            ips: vec![],
            ..Leaf::server()
        },
    );
    // The CN says localhost: only the SAN may count (RFC 6125).
    let (audit, _) = client_refuses_with(
        lab.ca(),
        &server,
        Some("localhost"),
        &["-dtls1_2"],
        &[],
        "name_mismatch",
    );
    // PKG_TLS 2.x: the audit record carries the reference and the presented identifiers.
    assert!(
        audit.contains("reference identifier localhost; presented DNS:time.example.net"),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_wrong_ip_san() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            cn: "127.0.0.1",
            dns: vec!["localhost"],
            ips: vec![IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2))],
            ..Leaf::server()
        },
    );
    // Reference identifier: the IP of --server, 127.0.0.1. Neither the DNS SAN that resolves
    // to it nor the CN may stand in for an IP SAN.
    let (audit, _) =
        client_refuses_with(lab.ca(), &server, None, &["-dtls1_2"], &[], "name_mismatch");
    assert!(
        audit.contains("reference identifier 127.0.0.1; presented DNS:localhost,IP:127.0.0.2"),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_expired() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            valid_from_days: -30,
            valid_to_days: -1,
            ..Leaf::server()
        },
    );
    client_refuses(lab.ca(), &server, Some("localhost"), "expired");
}

#[test]
fn case_client_refuses_not_yet_valid() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            valid_from_days: 1,
            valid_to_days: 30,
            ..Leaf::server()
        },
    );
    client_refuses(lab.ca(), &server, Some("localhost"), "not_yet_valid");
}

#[test]
fn case_client_refuses_no_server_auth_eku() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            eku: vec![ExtendedKeyUsagePurpose::ClientAuth],
            ..Leaf::server()
        },
    );
    client_refuses(lab.ca(), &server, Some("localhost"), "wrong_usage");
}

/// The same chain with a proper CA:TRUE intermediate is accepted: what the issuer cases
/// change is the intermediate's basicConstraints and nothing else.
fn assert_intermediate_chain_accepted(lab: &Lab) {
    let good = lab.issue_via_intermediate(
        "good-chain",
        &Leaf::server(),
        IsCa::Ca(BasicConstraints::Unconstrained),
    );
    let (_s_server, addr) = s_server(&good, "-dtls1_2", &[], &[]);
    let client = start_client_relay(lab.ca(), addr, Some("localhost"));
    client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
}

#[test]
fn case_client_refuses_issuer_not_ca() {
    let lab = Lab::new();
    assert_intermediate_chain_accepted(&lab);
    let server = lab.issue_via_intermediate("server", &Leaf::server(), IsCa::ExplicitNoCa);
    client_refuses(lab.ca(), &server, Some("localhost"), "unknown_ca");
}

#[test]
fn case_client_refuses_issuer_without_basic_constraints() {
    let lab = Lab::new();
    assert_intermediate_chain_accepted(&lab);
    let server = lab.issue_via_intermediate("server", &Leaf::server(), IsCa::NoCa);
    client_refuses(lab.ca(), &server, Some("localhost"), "unknown_ca");
}

#[test]
fn case_client_refuses_self_signed_leaf() {
    let lab = Lab::new();
    let server = lab.self_signed("server", &Leaf::server());
    client_refuses(lab.ca(), &server, Some("localhost"), "unknown_ca");
}

// ---------------------------------------------------------------------------------------------
// Server relay under mutual authentication: the client's certificate (peer: s_client -cert)
// ---------------------------------------------------------------------------------------------

fn mutual_refuses(lab: &Lab, client: Option<&Credential>, reason: &str) -> String {
    mutual_refuses_with(lab, client, &[], reason).0
}

/// mutual_refuses, the server relay started with `server_extra` flags as well; returns the
/// audit line and s_client's output.
fn mutual_refuses_with(
    lab: &Lab,
    client: Option<&Credential>,
    server_extra: &[&str],
    reason: &str,
) -> (String, String) {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let ca = lab.ca().display().to_string();
    let mut args = vec!["--client-ca", ca.as_str()];
    args.extend_from_slice(server_extra);
    let mut server = start_server_relay(
        &lab.issue("server", &Leaf::server()),
        upstream.addr(),
        &args,
    );
    let mut extra = vec!["-dtls1_2".to_string()];
    if let Some(client) = client {
        extra.extend([
            "-cert".into(),
            client.cert.display().to_string(),
            "-key".into(),
            client.key.display().to_string(),
        ]);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let output = s_client_once(server.addr, lab.ca(), &extra, &[]);
    let (associations, _) = stop_relay(&mut server);
    let audit = assert_one_refusal(&associations, reason);
    assert_eq!(
        upstream.datagrams(),
        0,
        "a datagram reached the time server"
    );
    (audit, output)
}

#[test]
fn case_mutual_refuses_missing_cert() {
    let lab = Lab::new();
    let (_, output) = mutual_refuses_with(&lab, None, &[], "no_client_certificate");
    // handshake_failure (RFC 5246 7.4.6), not SSLv3's no_certificate (41): vendor/PATCHES.md d.
    assert!(output.contains("SSL alert number 40"), "{output}");
}

#[test]
fn case_mutual_refuses_unknown_ca() {
    let lab = Lab::new();
    let other = Lab::new();
    let client = other.issue("client", &Leaf::client());
    mutual_refuses(&lab, Some(&client), "unknown_ca");
}

#[test]
fn case_mutual_refuses_expired() {
    let lab = Lab::new();
    let client = lab.issue(
        "client",
        &Leaf {
            valid_from_days: -30,
            valid_to_days: -1,
            ..Leaf::client()
        },
    );
    mutual_refuses(&lab, Some(&client), "expired");
}

#[test]
fn case_mutual_refuses_no_client_auth_eku() {
    let lab = Lab::new();
    let client = lab.issue(
        "client",
        &Leaf {
            eku: vec![ExtendedKeyUsagePurpose::ServerAuth],
            ..Leaf::client()
        },
    );
    mutual_refuses(&lab, Some(&client), "wrong_usage");
}

// ---------------------------------------------------------------------------------------------
// Record layer: tampering and replay (a test-only proxy), and plain NTP at the DTLS port
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Tamper {
    Pass,
    /// Flip the low bit of the last transmit-timestamp byte in the next record that carries a
    /// 48-byte NTP packet.
    FlipNext,
}

/// A UDP proxy between one client and the server relay that can flip a ciphertext bit in an
/// application-data record, and resend the last one it forwarded.
///
/// AES-GCM encrypts like a stream cipher: a flipped ciphertext bit flips the same plaintext bit
/// if the record is decrypted without its tag being checked. So the bit chosen is one no NTP
/// check reads: the last byte of the transmit timestamp. (Bit 0 of the first byte would turn
/// mode 3 into mode 2, which the relay drops as drop_wrong_mode even without authentication.)
/// A record whose tag were not checked would reach the time server as a valid request.
struct TamperProxy {
    addr: SocketAddr,
    tamper: Arc<Mutex<Tamper>>,
    last_app_data: Arc<Mutex<Option<Vec<u8>>>>,
    back: UdpSocket,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

const CONTENT_APPLICATION_DATA: u8 = 23;
/// DTLS record header, then AES-GCM's 8-byte explicit nonce: the ciphertext starts here.
const CIPHERTEXT_OFFSET: usize = 13 + 8;
/// A record carrying one 48-byte NTP packet: header, nonce, ciphertext, 16-byte tag.
const NTP_RECORD_LEN: usize = CIPHERTEXT_OFFSET + 48 + 16;
/// The byte flipped: the NTP transmit timestamp's last (bytes 40..48 of the packet).
const FLIPPED_BYTE: usize = CIPHERTEXT_OFFSET + 47;

impl TamperProxy {
    fn start(server: SocketAddr) -> TamperProxy {
        let front = UdpSocket::bind("127.0.0.1:0").expect("bind front");
        let back = UdpSocket::bind("127.0.0.1:0").expect("bind back");
        back.connect(server).expect("connect back");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("timeout");
        }
        let addr = front.local_addr().expect("addr");
        let tamper = Arc::new(Mutex::new(Tamper::Pass));
        let last_app_data = Arc::new(Mutex::new(None));
        let client = Arc::new(Mutex::new(None::<SocketAddr>));
        let stop = Arc::new(AtomicBool::new(false));

        let upstream = {
            let (front, back) = (
                front.try_clone().expect("clone"),
                back.try_clone().expect("clone"),
            );
            let (tamper, last, client, stop) = (
                tamper.clone(),
                last_app_data.clone(),
                client.clone(),
                stop.clone(),
            );
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((len, from)) = front.recv_from(&mut buf) else {
                        continue;
                    };
                    *client.lock().expect("lock") = Some(from);
                    let mut datagram = buf[..len].to_vec();
                    if datagram[0] == CONTENT_APPLICATION_DATA && len > CIPHERTEXT_OFFSET {
                        *last.lock().expect("lock") = Some(datagram.clone());
                        let mut mode = tamper.lock().expect("lock");
                        if *mode == Tamper::FlipNext && len == NTP_RECORD_LEN {
                            datagram[FLIPPED_BYTE] ^= 1;
                            *mode = Tamper::Pass;
                        }
                    }
                    let _ = back.send(&datagram);
                }
            })
        };
        let downstream = {
            let (front, back) = (front, back.try_clone().expect("clone"));
            let (client, stop) = (client, stop.clone());
            thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    let Ok(len) = back.recv(&mut buf) else {
                        continue;
                    };
                    if let Some(to) = *client.lock().expect("lock") {
                        let _ = front.send_to(&buf[..len], to);
                    }
                }
            })
        };
        TamperProxy {
            addr,
            tamper,
            last_app_data,
            back,
            stop,
            threads: vec![upstream, downstream],
        }
    }

    fn flip_next(&self) {
        *self.tamper.lock().expect("lock") = Tamper::FlipNext;
    }

    /// Waits until the proxy has flipped the bit (it forwards in its own thread).
    fn wait_flipped(&self) {
        let deadline = Instant::now() + EVENT_TIMEOUT;
        while *self.tamper.lock().expect("lock") != Tamper::Pass {
            assert!(
                Instant::now() < deadline,
                "no application-data record to tamper with"
            );
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// The last application-data record the client sent.
    fn last_record(&self) -> Vec<u8> {
        self.last_app_data
            .lock()
            .expect("lock")
            .clone()
            .expect("a record was captured")
    }

    /// Sends `record` to the server from the proxy's address.
    fn send_raw(&self, record: &[u8]) {
        self.back.send(record).expect("send");
    }

    /// Sends the last application-data record the client sent, once more, to the server.
    fn replay_last(&self) {
        let record = self
            .last_app_data
            .lock()
            .expect("lock")
            .clone()
            .expect("a record was captured");
        self.back.send(&record).expect("replay");
    }
}

impl Drop for TamperProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A DtlsTestClient through a TamperProxy to a server relay in front of a FakeNtpServer.
fn tamper_setup() -> (FakeNtpServer, Lab, Relay, TamperProxy, DtlsTestClient) {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let server = start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    let proxy = TamperProxy::start(server.addr);
    let dtls = DtlsTestClient::connect(proxy.addr, lab.ca(), "localhost", None).expect("handshake");
    (upstream, lab, server, proxy, dtls)
}

fn exchange(dtls: &mut DtlsTestClient) -> NtpPacket {
    let transmit = ntp_now();
    dtls.send(&ntp_client_request(transmit));
    let reply = dtls
        .recv(REPLY_TIMEOUT)
        .expect("a reply in the association");
    let reply = parse_ntp(&reply).expect("an NTP reply");
    assert_eq!(
        reply.origin_ts, transmit,
        "a reply to another request arrived"
    );
    reply
}

/// The relay's `stopped` summary names every counter that moved; none of the drop_* ones may
/// have: rtc-dtls discards a record that fails authentication before the relay sees it, and
/// nothing counts or logs that (see the tampering case), so an NTP check that caught the
/// record instead would show up here.
fn assert_no_drop_counter(stopped: &str) {
    let drops: Vec<&str> = stopped
        .split_whitespace()
        .filter(|field| field.starts_with("drop_") || field.contains("=drop_"))
        .collect();
    assert!(drops.is_empty(), "{drops:?} moved: {stopped}");
}

#[test]
fn case_tampered_record_discarded() {
    let (upstream, _lab, mut server, proxy, mut dtls) = tamper_setup();
    exchange(&mut dtls);
    assert_eq!(upstream.requests(), 1);

    proxy.flip_next();
    let tampered = ntp_now();
    dtls.send(&ntp_client_request(tampered));
    proxy.wait_flipped();
    // The relay handles datagrams in order: once the next request is answered, the tampered
    // record before it has been dealt with, and nothing came of it. Decrypted without its tag
    // checked, it would be a valid request (its transmit timestamp one bit off) and would be
    // forwarded and answered.
    let reply = exchange(&mut dtls);
    assert_eq!(reply.mode, 4);
    assert_eq!(upstream.requests(), 2, "the tampered record was forwarded");
    assert_eq!(upstream.datagrams(), 2);
    assert!(
        dtls.recv(SILENCE).is_none(),
        "the tampered record was answered"
    );

    // Neither the relay nor rtc-dtls counts or logs a record that fails authentication (rtc-dtls
    // logs `decrypt failed` through the `log` crate at debug level, which the relays' tracing
    // subscriber does not carry). The evidence is: nothing forwarded, no drop_* counter moved
    // (no NTP check caught it instead), and the association is still up (answered above, and
    // closed only at shutdown).
    let (associations, stopped) = stop_relay(&mut server);
    assert_no_drop_counter(&stopped);
    assert_eq!(associations.len(), 2, "{associations:?}"); // established, closed at shutdown
    assert!(
        associations[0].contains("association established"),
        "{associations:?}"
    );
    assert!(
        associations[1].contains("reason=shutdown"),
        "{associations:?}"
    );
    assert!(stopped.contains("requests_forwarded=2"), "{stopped}");
}

#[test]
fn case_replayed_record_discarded() {
    let (upstream, _lab, mut server, proxy, mut dtls) = tamper_setup();
    exchange(&mut dtls);
    assert_eq!(upstream.requests(), 1);

    // The request's record once more, after its reply (so no relay state still expects it).
    proxy.replay_last();
    exchange(&mut dtls);
    assert_eq!(upstream.requests(), 2, "the replayed record was forwarded");
    assert_eq!(upstream.datagrams(), 2);
    assert!(dtls.recv(SILENCE).is_none(), "a second reply arrived");

    let (associations, stopped) = stop_relay(&mut server);
    assert_eq!(associations.len(), 2, "{associations:?}");
    assert!(
        associations[1].contains("reason=shutdown"),
        "{associations:?}"
    );
    assert!(stopped.contains("requests_forwarded=2"), "{stopped}");
}

/// The epoch and sequence number of a DTLS record (header bytes 3..5 and 5..11).
fn epoch_and_sequence(record: &[u8]) -> (u16, u64) {
    let epoch = u16::from_be_bytes([record[3], record[4]]);
    let mut sequence = [0u8; 8];
    sequence[2..].copy_from_slice(&record[5..11]);
    (epoch, u64::from_be_bytes(sequence))
}

#[test]
fn case_old_association_record_discarded_after_rekey() {
    // A rekey here is a new association (fresh keys, epoch 1 again) made before the old one is
    // closed. Through the proxy both come from one address, so a record of the old association
    // reaches the new one: it must not decrypt, and must cost the new association nothing.
    //
    // rtc-dtls checks the replay window before it decrypts. A record of the old association
    // whose sequence number the new one has already used would be dropped as a duplicate, keys
    // or no keys; so the old association sends four requests first, and the record replayed is
    // its fourth (epoch 1, sequence 4) while the new association has sent one (sequence 1).
    // Only the keys can tell that record apart from the new association's next.
    let (upstream, lab, mut server, proxy, mut old) = tamper_setup();
    for _ in 0..4 {
        exchange(&mut old);
    }
    let old_record = proxy.last_record();
    let mut new = DtlsTestClient::connect(proxy.addr, lab.ca(), "localhost", None).expect("rekey");
    exchange(&mut new);
    let new_record = proxy.last_record();
    let (old_epoch, old_sequence) = epoch_and_sequence(&old_record);
    let (new_epoch, new_sequence) = epoch_and_sequence(&new_record);
    assert_eq!((old_epoch, new_epoch), (1, 1), "both in their first epoch");
    assert!(
        old_sequence > new_sequence,
        "the old record (sequence {old_sequence}) must be ahead of the new association's \
         (sequence {new_sequence}) for the replay window to let it through"
    );
    assert_eq!(upstream.requests(), 5);

    proxy.send_raw(&old_record);
    // Handled in order: the reply to the next request comes after the old record was dealt
    // with. Decrypted, that record would be a valid request, forwarded and answered first.
    let transmit = ntp_now();
    new.send(&ntp_client_request(transmit));
    let reply = new
        .recv(REPLY_TIMEOUT)
        .expect("the new association still answers");
    let reply = parse_ntp(&reply).expect("an NTP reply");
    assert_eq!(
        reply.origin_ts, transmit,
        "the old association's record was answered in the new one"
    );
    assert_eq!(
        upstream.requests(),
        6,
        "the old association's record was forwarded"
    );
    assert!(
        new.recv(SILENCE).is_none(),
        "a reply to the old record arrived"
    );

    // The old association's close_notify, under its own keys (sequence 5), reaches the new
    // association too, and must not end it.
    old.close();
    exchange(&mut new);
    assert_eq!(upstream.requests(), 7);

    let (associations, stopped) = stop_relay(&mut server);
    assert!(stopped.contains("requests_forwarded=7"), "{stopped}");
    assert_no_drop_counter(&stopped);
    assert!(
        !associations
            .iter()
            .any(|l| l.contains("association refused")),
        "{associations:?}"
    );
}

#[test]
fn case_plain_ntp_creates_no_state() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let mut server =
        start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    assert!(
        ntp_query(server.addr, SILENCE).is_none(),
        "the DTLS port answered plain NTP"
    );
    let (associations, stopped) = stop_relay(&mut server);
    assert!(associations.is_empty(), "{associations:?}");
    assert!(stopped.contains("drop_not_client_hello=1"), "{stopped}");
    assert!(!stopped.contains("associations_"), "{stopped}");
    assert_eq!(upstream.datagrams(), 0);
}

// ---------------------------------------------------------------------------------------------
// Key types and signature schemes (issue 11, keys): RSA and P-384 identities both ways, the
// SHA-384 schemes, groups, peers outside the key policy, and a CSR signed by an OpenSSL CA.
// Certificates here are made by OpenSSL itself (`openssl req`, `openssl x509 -req`), so the
// other side of each case is independent of our code.
// ---------------------------------------------------------------------------------------------

/// A CA made by `openssl req -x509`, issuing leaves with `openssl x509 -req`.
struct OpensslCa {
    dir: TempDir,
    cert: PathBuf,
    key: PathBuf,
    digest: &'static str,
}

/// `openssl` with `args` in `cwd`, which must succeed; returns its stdout.
fn openssl_ok(args: &[&str], cwd: &Path) -> String {
    let mut cmd = openssl();
    cmd.args(args).current_dir(cwd);
    let out = run_command(cmd, OPENSSL_TIMEOUT).expect("openssl ran");
    assert!(
        out.status.success(),
        "openssl {}: {}",
        args.join(" "),
        out.combined()
    );
    out.stdout
}

/// `-newkey` arguments for a key type.
fn newkey(alg: &str) -> Vec<&str> {
    match alg {
        "p256" => vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
        "p384" => vec!["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384"],
        "rsa1024" => vec!["-newkey", "rsa:1024"],
        "rsa2048" => vec!["-newkey", "rsa:2048"],
        "rsa3072" => vec!["-newkey", "rsa:3072"],
        other => panic!("no key type {other}"),
    }
}

fn path_arg(path: &Path) -> String {
    path.display().to_string()
}

impl OpensslCa {
    /// A CA with a key of `alg` ("p256", "p384", "rsa3072"), signing with SHA-384 for P-384
    /// and SHA-256 otherwise.
    fn new(alg: &str) -> OpensslCa {
        let dir = TempDir::new();
        let digest = if alg == "p384" { "-sha384" } else { "-sha256" };
        // Each CA its own name (chain building matches issuers by name).
        let tag = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = format!("/CN=keys CA {alg} {tag}");
        let mut args = vec![
            "req", "-x509", "-nodes", digest, "-days", "30", "-subj", &name,
        ];
        args.extend(newkey(alg));
        args.extend([
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
        openssl_ok(&args, dir.path());
        OpensslCa {
            cert: dir.join("ca.pem"),
            key: dir.join("ca.key"),
            dir,
            digest,
        }
    }

    /// Signs `csr`, with `ext` (an OpenSSL extension file's lines) or, for None, the request's
    /// own extensions copied.
    fn sign(&self, name: &str, csr: &Path, ext: Option<&str>) -> PathBuf {
        let out = self.dir.join(format!("{name}.pem"));
        let serial = format!("{}", ntp_now() & 0xffff_ffff);
        let (csr, ca, ca_key, out_s) = (
            path_arg(csr),
            path_arg(&self.cert),
            path_arg(&self.key),
            path_arg(&out),
        );
        let mut args = vec![
            "x509",
            "-req",
            self.digest,
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-days",
            "30",
            "-out",
            &out_s,
        ];
        let ext_file;
        match ext {
            Some(ext) => {
                ext_file = path_arg(&self.dir.write(&format!("{name}.ext"), ext));
                args.extend(["-extfile", &ext_file]);
            }
            None => args.extend(["-copy_extensions", "copy"]),
        }
        openssl_ok(&args, self.dir.path());
        out
    }

    /// A leaf with a fresh `alg` key: "server" (localhost, 127.0.0.1, serverAuth) or "client"
    /// (keys-client, clientAuth).
    fn issue(&self, name: &str, alg: &str, role: &str) -> Credential {
        let key = self.dir.join(format!("{name}.key.pem"));
        let csr = self.dir.join(format!("{name}.csr"));
        let subj = format!("/CN={name}");
        let (key_s, csr_s) = (path_arg(&key), path_arg(&csr));
        let mut args = vec!["req", "-new", "-nodes", "-subj", &subj];
        args.extend(newkey(alg));
        args.extend(["-keyout", &key_s, "-out", &csr_s]);
        openssl_ok(&args, self.dir.path());
        let ext = match role {
            "server" => {
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
            }
            _ => {
                "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                 extendedKeyUsage=clientAuth\nsubjectAltName=DNS:keys-client\n"
            }
        };
        Credential {
            cert: self.sign(name, &csr, Some(ext)),
            key,
            chain: None,
        }
    }
}

/// Our server relay with `identity` (and `server_extra`), an s_client run with `extra` that
/// must complete, verify our chain and carry one NTP request to the time server; returns
/// s_client's report.
fn server_accepts(
    identity: &Credential,
    ca: &Path,
    extra: &[&str],
    server_extra: &[&str],
) -> String {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let mut server = start_server_relay(identity, upstream.addr(), server_extra);
    let mut args = vec!["-dtls1_2"];
    args.extend(extra);
    let (_, text) = s_client_with_request(server.addr, ca, &args, &[]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    let (associations, _) = stop_relay(&mut server);
    assert!(
        associations
            .first()
            .is_some_and(|l| l.contains("association established")),
        "{associations:?}"
    );
    eprintln!("audit: {}", associations[0]);
    assert_eq!(
        upstream.requests(),
        1,
        "the request did not reach the time server"
    );
    text
}

/// Our server relay with `identity` (and `server_extra`); one s_client run with `extra`
/// refused with an alert, one audit line with `reason`, nothing forwarded. Returns the audit
/// line and s_client's output.
fn server_refuses_identity(
    identity: &Credential,
    ca: &Path,
    extra: &[&str],
    server_extra: &[&str],
    reason: &str,
) -> (String, String) {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let mut server = start_server_relay(identity, upstream.addr(), server_extra);
    let out = s_client_once(server.addr, ca, extra, &[]);
    let (associations, _) = stop_relay(&mut server);
    let audit = assert_one_refusal(&associations, reason);
    assert_eq!(
        upstream.datagrams(),
        0,
        "a datagram reached the time server"
    );
    (audit, out)
}

/// Our client relay (trusting `ca`, expecting localhost, `identity_args` as its own
/// certificate) against s_server with `identity` and `extra`: the association comes up and an
/// NTP request arrives at s_server as one record. Returns s_server's report and the client's
/// established line.
fn client_accepts(
    ca: &Path,
    identity: &Credential,
    extra: &[&str],
    identity_args: &[String],
) -> (String, String) {
    let (s_server, addr) = s_server(identity, "-dtls1_2", extra, &[]);
    let mut args: Vec<String> = vec![
        "client".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--server".into(),
        addr.to_string(),
        "--server-name".into(),
        "localhost".into(),
        "--ca".into(),
        path_arg(ca),
    ];
    args.extend(identity_args.iter().cloned());
    let daemon = spawn_ntp_dtls("client-relay", &args);
    let client = Relay {
        addr: daemon.wait_ready(READY_TIMEOUT)[0],
        daemon,
    };
    let line = client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let request = ntp_client_request(ntp_now());
    socket.send_to(&request, client.addr).expect("send");
    s_server.wait_for("the NTP request", REPLY_TIMEOUT, |out, _| {
        carries_request(out, &request).then_some(())
    });
    eprintln!("audit: {line}");
    (s_server.text(), line)
}

fn cert_args(identity: &Credential) -> Vec<String> {
    vec![
        "--cert".into(),
        path_arg(&identity.cert),
        "--key".into(),
        path_arg(&identity.key),
    ]
}

#[test]
fn case_keys_rsa_server_with_openssl_client() {
    // An RSA-2048 server certificate from an RSA-3072 CA, its key in PKCS#1 ("RSA PRIVATE
    // KEY", as `openssl rsa -traditional` writes it): TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256.
    let ca = OpensslCa::new("rsa3072");
    let identity = ca.issue("rsa-server", "rsa2048", "server");
    let pkcs1 = ca.dir.join("rsa-server.pkcs1.pem");
    openssl_ok(
        &[
            "rsa",
            "-traditional",
            "-in",
            &path_arg(&identity.key),
            "-out",
            &path_arg(&pkcs1),
        ],
        ca.dir.path(),
    );
    let pem = std::fs::read_to_string(&pkcs1).expect("key");
    assert!(pem.contains("BEGIN RSA PRIVATE KEY"), "{pem}");
    let identity = Credential {
        key: pkcs1,
        ..identity
    };
    let text = server_accepts(&identity, &ca.cert, &[], &[]);
    assert!(
        text.contains("Cipher    : ECDHE-RSA-AES128-GCM-SHA256"),
        "{text}"
    );
    assert!(text.contains("Peer signature type: RSA"), "{text}");
}

#[test]
fn case_keys_rsa_client_against_openssl_server() {
    let ca = OpensslCa::new("rsa3072");
    let server = ca.issue("rsa-server", "rsa2048", "server");
    let (report, line) = client_accepts(&ca.cert, &server, &[], &[]);
    assert!(
        report.contains("CIPHER is ECDHE-RSA-AES128-GCM-SHA256"),
        "{report}"
    );
    assert!(
        line.contains("cipher=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
        "{line}"
    );
}

#[test]
fn case_keys_rsa_client_certificate_both_ways() {
    // Mutual authentication with an RSA client certificate: s_client's against our server
    // relay, our client relay's against s_server -Verify.
    let ca = OpensslCa::new("rsa3072");
    let client = ca.issue("rsa-client", "rsa2048", "client");
    let ca_arg = path_arg(&ca.cert);
    server_accepts(
        &ca.issue("server", "p256", "server"),
        &ca.cert,
        &[
            "-cert",
            &path_arg(&client.cert),
            "-key",
            &path_arg(&client.key),
        ],
        &["--client-ca", &ca_arg],
    );
    let (report, _) = client_accepts(
        &ca.cert,
        &ca.issue("rsa-server", "rsa2048", "server"),
        &["-Verify", "1", "-verify_return_error", "-CAfile", &ca_arg],
        &cert_args(&client),
    );
    assert!(report.contains("subject=CN = rsa-client"), "{report}");
}

#[test]
fn case_keys_sha384_signature_schemes_offered_and_used() {
    // Server side: s_client accepting only ecdsa_secp384r1_sha384 (a P-384 key) or only
    // rsa_pkcs1_sha384 (an RSA key).
    let ec = OpensslCa::new("p384");
    let text = server_accepts(
        &ec.issue("p384-server", "p384", "server"),
        &ec.cert,
        &["-sigalgs", "ecdsa_secp384r1_sha384"],
        &[],
    );
    assert!(text.contains("Peer signing digest: SHA384"), "{text}");
    assert!(text.contains("Peer signature type: ECDSA"), "{text}");
    // A P-256 key signs with SHA-256 only (ring ties an ECDSA key to its curve's hash), so a
    // client accepting only ecdsa_secp384r1_sha384 is refused cleanly (handshake_failure).
    let (_, out) = server_refuses_identity(
        &ec.issue("p256-server", "p256", "server"),
        &ec.cert,
        &["-dtls1_2", "-sigalgs", "ecdsa_secp384r1_sha384"],
        &[],
        "no_shared_cipher",
    );
    assert!(out.contains("SSL alert number 40"), "{out}");
    let rsa = OpensslCa::new("rsa3072");
    let text = server_accepts(
        &rsa.issue("rsa-server", "rsa2048", "server"),
        &rsa.cert,
        &["-sigalgs", "rsa_pkcs1_sha384"],
        &[],
    );
    assert!(text.contains("Peer signing digest: SHA384"), "{text}");
    assert!(text.contains("Peer signature type: RSA"), "{text}");

    // Client side: the client relay offers both SHA-384 schemes; s_server restricted to one of
    // them still completes, and says which it shared.
    let (report, _) = client_accepts(
        &ec.cert,
        &ec.issue("p384-s", "p384", "server"),
        &["-sigalgs", "ecdsa_secp384r1_sha384"],
        &[],
    );
    assert!(
        report.contains("Shared Signature Algorithms: ECDSA+SHA384\n"),
        "{report}"
    );
    let (report, _) = client_accepts(
        &rsa.cert,
        &rsa.issue("rsa-s", "rsa2048", "server"),
        &["-sigalgs", "rsa_pkcs1_sha384"],
        &[],
    );
    assert!(
        report.contains("Shared Signature Algorithms: RSA+SHA384\n"),
        "{report}"
    );
}

#[test]
fn case_keys_client_offers_the_policy_suites_schemes_and_groups() {
    // What the client relay's ClientHello offers, as s_server reads it: the two suites, the
    // four signature schemes, the two groups, nothing else.
    let ca = OpensslCa::new("p256");
    let (report, _) = client_accepts(&ca.cert, &ca.issue("server", "p256", "server"), &[], &[]);
    for expected in [
        "Shared ciphers:ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256\n",
        "Signature Algorithms: ECDSA+SHA256:ECDSA+SHA384:RSA+SHA256:RSA+SHA384\n",
        "Supported groups: secp256r1:secp384r1\n",
    ] {
        assert!(report.contains(expected), "{expected:?} missing:\n{report}");
    }
}

#[test]
fn case_keys_p384_group_and_groups_mismatch() {
    // secp384r1 is in the policy: s_client offering only P-384 gets it (with a P-384
    // certificate: in TLS 1.2 the client's groups also bound the ECDSA certificate's curve, and
    // OpenSSL ends the handshake with illegal_parameter if the server's is another). A server
    // offering only X25519 to the client relay is refused (the server side of the mismatch is
    // case_server_refuses_x25519_only).
    let p384 = OpensslCa::new("p384");
    let text = server_accepts(
        &p384.issue("server", "p384", "server"),
        &p384.cert,
        &["-groups", "P-384"],
        &[],
    );
    assert!(
        text.contains("Server Temp Key: ECDH, secp384r1, 384 bits"),
        "{text}"
    );

    let ca = OpensslCa::new("p256");
    let (_, text) = client_refuses_with(
        &ca.cert,
        &ca.issue("x25519-server", "p256", "server"),
        Some("localhost"),
        &["-dtls1_2", "-groups", "X25519"],
        &[],
        "peer_alert",
    );
    assert!(!text.contains("CIPHER is"), "{text}");
}

#[test]
fn case_keys_p384_peers_accepted() {
    // A P-384 server certificate from a P-384 CA for the client relay, and a P-384 client
    // certificate for the server relay.
    let ca = OpensslCa::new("p384");
    let (report, _) = client_accepts(
        &ca.cert,
        &ca.issue("p384-server", "p384", "server"),
        &[],
        &[],
    );
    assert!(
        report.contains("CIPHER is ECDHE-ECDSA-AES128-GCM-SHA256"),
        "{report}"
    );
    let client = ca.issue("p384-client", "p384", "client");
    let ca_arg = path_arg(&ca.cert);
    server_accepts(
        &ca.issue("server", "p384", "server"),
        &ca.cert,
        &[
            "-cert",
            &path_arg(&client.cert),
            "-key",
            &path_arg(&client.key),
        ],
        &["--client-ca", &ca_arg],
    );
}

#[test]
fn case_keys_rsa1024_peers_refused() {
    // An RSA-1024 leaf from an RSA-3072 CA: the chain verifies, the key is outside the policy.
    // OpenSSL's own default (security level 2) refuses RSA-1024 too: level 0 lets it try.
    let ca = OpensslCa::new("rsa3072");
    let (audit, _) = client_refuses_with(
        &ca.cert,
        &ca.issue("weak-server", "rsa1024", "server"),
        Some("localhost"),
        &["-dtls1_2", "-cipher", "DEFAULT@SECLEVEL=0"],
        &[],
        "key_policy",
    );
    assert!(
        audit.contains("an RSA key of 1024 bits (2048 to 4096 only)"),
        "{audit}"
    );

    // The same as a client certificate, at the server relay.
    let weak = ca.issue("weak-client", "rsa1024", "client");
    let ca_arg = path_arg(&ca.cert);
    let (audit, _) = server_refuses_identity(
        &ca.issue("server", "rsa2048", "server"),
        &ca.cert,
        &[
            "-dtls1_2",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
            "-cert",
            &path_arg(&weak.cert),
            "-key",
            &path_arg(&weak.key),
        ],
        &["--client-ca", &ca_arg],
        "key_policy",
    );
    assert!(audit.contains("an RSA key of 1024 bits"), "{audit}");
}

#[test]
fn case_keys_csr_signed_by_an_openssl_ca() {
    // `ntp-dtls certs --request` for both roles, signed by an RSA CA the operator runs with the
    // request's extensions copied, then used: the server's by the server relay against
    // s_client, the client's by the client relay against s_server -Verify.
    let ca = OpensslCa::new("rsa3072");
    let out = TempDir::new();
    for (role, names) in [
        (
            "server",
            ["--server-name", "localhost", "--server-name", "127.0.0.1"].as_slice(),
        ),
        ("client", ["--client-name", "keys-device"].as_slice()),
    ] {
        let mut cmd = Command::new(ntp_dtls_bin());
        cmd.args(["certs", "--out"])
            .arg(out.path())
            .args(["--request", role, "--key-type", "rsa-3072"])
            .args(names);
        let result = run_command(cmd, Duration::from_secs(120)).expect("certs --request ran");
        assert!(result.status.success(), "{}", result.combined());
        let key = out.join(format!("{role}.key.pem"));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(&key).expect("key").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600, "{}", key.display());
        let csr = path_arg(&out.join(format!("{role}.csr.pem")));
        let text = openssl_ok(
            &["req", "-in", &csr, "-noout", "-text", "-verify"],
            out.path(),
        );
        let eku = if role == "server" {
            "TLS Web Server Authentication"
        } else {
            "TLS Web Client Authentication"
        };
        assert!(text.contains(eku), "{text}");
        assert!(text.contains("Public-Key: (3072 bit)"), "{text}");
        let sans = if role == "server" {
            "DNS:localhost, IP Address:127.0.0.1"
        } else {
            "DNS:keys-device"
        };
        assert!(text.contains(sans), "{text}");
    }
    let signed = |role: &str| Credential {
        cert: ca.sign(role, &out.join(format!("{role}.csr.pem")), None),
        key: out.join(format!("{role}.key.pem")),
        chain: None,
    };
    let text = server_accepts(&signed("server"), &ca.cert, &[], &[]);
    assert!(
        text.contains("Cipher    : ECDHE-RSA-AES128-GCM-SHA256"),
        "{text}"
    );

    let ca_arg = path_arg(&ca.cert);
    let (report, _) = client_accepts(
        &ca.cert,
        &ca.issue("s-server", "p256", "server"),
        &["-Verify", "1", "-verify_return_error", "-CAfile", &ca_arg],
        &cert_args(&signed("client")),
    );
    assert!(report.contains("subject=CN = keys-device"), "{report}");
}

#[test]
fn case_keys_rsa_lab_pki_end_to_end() {
    // `ntp-dtls certs --key-type rsa-3072`, then ntpdate through both relays on it.
    if !is_root() {
        eprintln!("SKIP case_keys_rsa_lab_pki_end_to_end: ntpdate needs port 123 (run as root)");
        return;
    }
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = common::relays::Pki::generate_with(
        &["localhost", "127.0.0.1"],
        &["--key-type", "rsa-3072"],
    );
    let ca_text = openssl_ok(
        &["x509", "-in", &path_arg(&pki.ca()), "-noout", "-text"],
        pki.dir(),
    );
    assert!(ca_text.contains("Public-Key: (3072 bit)"), "{ca_text}");
    let server = common::relays::start_server(&pki, &chronyd.addr().to_string(), &[]);
    let listen = SocketAddr::new(loopback_ip(22), 123);
    let client = common::relays::start_client(&pki.ca(), listen, server.addr, &[]);
    let line = client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
    assert!(
        line.contains("cipher=TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256"),
        "{line}"
    );
    let result = (0..3)
        .find_map(|_| ntpdate_query(listen.ip()).ok())
        .expect("ntpdate got a reply through the chain");
    assert!(result.offset_s.abs() < 0.1, "{}", result.raw);
}

// ---------------------------------------------------------------------------------------------
// X.509 policy and revocation (pki-verify): CRLs from `openssl ca -gencrl`, EKU and keyUsage
// ---------------------------------------------------------------------------------------------

impl Lab {
    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key.pem")
    }
}

/// `date -u` for `openssl ca -crl_lastupdate/-crl_nextupdate`: YYYYMMDDHHMMSSZ, `days` from now.
fn openssl_time(days: i64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64;
    let out = Command::new("date")
        .args([
            "-u",
            "-d",
            &format!("@{}", now + days * 86_400),
            "+%Y%m%d%H%M%SZ",
        ])
        .output()
        .expect("date");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// [`openssl_ok`] in the current directory (the revocation cases pass absolute paths).
fn openssl_run(args: &[&str]) -> String {
    openssl_ok(args, Path::new("."))
}

/// `openssl x509 -serial`'s hex, as our audit lines print serials.
fn serial_of(cert: &Path) -> String {
    let cert = cert.display().to_string();
    openssl_run(&["x509", "-noout", "-serial", "-in", &cert])
        .trim()
        .trim_start_matches("serial=")
        .to_string()
}

/// A CRL from `openssl ca -gencrl`, signed by `signer` (a CA certificate and its key), listing
/// the certificates `revoked` (each through `openssl ca -revoke`), valid for 7 days from now
/// or over `window` (days from now of lastUpdate and nextUpdate). PEM.
fn openssl_crl(
    dir: &TempDir,
    name: &str,
    signer_cert: &Path,
    signer_key: &Path,
    revoked: &[&Path],
    window: Option<(i64, i64)>,
) -> PathBuf {
    let db = dir.join(format!("{name}.ca"));
    std::fs::create_dir_all(&db).expect("CA database directory");
    std::fs::write(db.join("index.txt"), "").expect("index.txt");
    std::fs::write(db.join("crlnumber"), "01\n").expect("crlnumber");
    let conf = db.join("openssl.cnf");
    std::fs::write(
        &conf,
        format!(
            "[ca]\ndefault_ca = ca_sect\n\n[ca_sect]\ndatabase = {db}/index.txt\n\
             crlnumber = {db}/crlnumber\ndefault_md = sha256\ndefault_crl_days = 7\n",
            db = db.display()
        ),
    )
    .expect("openssl.cnf");
    let (conf, cert, key) = (
        conf.display().to_string(),
        signer_cert.display().to_string(),
        signer_key.display().to_string(),
    );
    for victim in revoked {
        let victim = victim.display().to_string();
        openssl_run(&[
            "ca",
            "-config",
            &conf,
            "-cert",
            &cert,
            "-keyfile",
            &key,
            "-revoke",
            &victim,
            "-crl_reason",
            "keyCompromise",
        ]);
    }
    let out = dir.join(format!("{name}.crl.pem"));
    let out_arg = out.display().to_string();
    let mut args = vec![
        "ca", "-config", &conf, "-cert", &cert, "-keyfile", &key, "-gencrl", "-out", &out_arg,
    ];
    let times = window.map(|(last, next)| (openssl_time(last), openssl_time(next)));
    if let Some((last, next)) = &times {
        args.extend(["-crl_lastupdate", last, "-crl_nextupdate", next]);
    }
    openssl_run(&args);
    out
}

/// A self-signed CA certificate with `subject`'s name and a new key: a CRL it signs names the
/// real issuer but carries another key's signature.
fn impostor(dir: &TempDir, name: &str, subject_of: &Path) -> (PathBuf, PathBuf) {
    let subject = openssl_run(&[
        "x509",
        "-noout",
        "-subject",
        "-nameopt",
        "compat",
        "-in",
        &subject_of.display().to_string(),
    ]);
    let subject = subject
        .trim()
        .trim_start_matches("subject=")
        .trim()
        .to_string();
    let key = dir.join(format!("{name}.key.pem"));
    let cert = dir.join(format!("{name}.pem"));
    let (key_arg, cert_arg) = (key.display().to_string(), cert.display().to_string());
    openssl_run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:P-256",
        "-nodes",
        "-keyout",
        &key_arg,
        "-out",
        &cert_arg,
        "-subj",
        &subject,
        "-days",
        "30",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
    ]);
    (cert, key)
}

/// The intermediate chain every revocation case below uses, and an empty CRL of each CA.
struct CrlLab {
    lab: Lab,
    server: Credential,
    intermediate: Credential,
}

impl CrlLab {
    fn new() -> CrlLab {
        let lab = Lab::new();
        let (server, intermediate) = lab.issue_via_intermediate_with(
            "server",
            &Leaf::server(),
            IsCa::Ca(BasicConstraints::Unconstrained),
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign],
        );
        CrlLab {
            lab,
            server,
            intermediate,
        }
    }

    fn root_crl(&self, revoked: &[&Path]) -> PathBuf {
        openssl_crl(
            &self.lab.dir,
            "root",
            self.lab.ca(),
            &self.lab.ca_key(),
            revoked,
            None,
        )
    }

    fn intermediate_crl(&self, revoked: &[&Path], window: Option<(i64, i64)>) -> PathBuf {
        openssl_crl(
            &self.lab.dir,
            "intermediate",
            &self.intermediate.cert,
            &self.intermediate.key,
            revoked,
            window,
        )
    }
}

fn crl_flags(crls: &[&Path], mode: Option<&str>) -> Vec<String> {
    let mut flags = Vec::new();
    for crl in crls {
        flags.extend(["--crl".to_string(), crl.display().to_string()]);
    }
    if let Some(mode) = mode {
        flags.extend(["--revocation".to_string(), mode.to_string()]);
    }
    flags
}

/// The client relay with these flags against s_server presenting `server`: associated.
fn assert_client_accepts(lab: &Lab, server: &Credential, flags: &[String]) {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let (_s_server, addr) = s_server(server, "-dtls1_2", &[], &[]);
    let client = start_client_relay_with(lab.ca(), addr, Some("localhost"), &flags);
    client
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);
}

fn client_refuses_flags(lab: &Lab, server: &Credential, flags: &[String], reason: &str) -> String {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    client_refuses_full(
        lab.ca(),
        server,
        Some("localhost"),
        &["-dtls1_2"],
        &[],
        &flags,
        reason,
    )
    .0
}

/// Not a case: what the revocation cases change is one CRL. With a valid, empty CRL of each
/// CA in the path, under require, the chain is accepted.
#[test]
fn a_chain_with_a_valid_crl_of_each_issuer_is_accepted() {
    let crl_lab = CrlLab::new();
    let flags = crl_flags(
        &[&crl_lab.root_crl(&[]), &crl_lab.intermediate_crl(&[], None)],
        Some("require"),
    );
    assert_client_accepts(&crl_lab.lab, &crl_lab.server, &flags);
}

#[test]
fn case_client_refuses_revoked_server_leaf() {
    let crl_lab = CrlLab::new();
    let crls = [
        crl_lab.root_crl(&[]),
        crl_lab.intermediate_crl(&[&crl_lab.server.cert], None),
    ];
    let audit = client_refuses_flags(
        &crl_lab.lab,
        &crl_lab.server,
        &crl_flags(&[&crls[0], &crls[1]], None),
        "revoked",
    );
    let serial = serial_of(&crl_lab.server.cert);
    assert!(
        audit.contains(&format!(
            "server leaf subject=\"CN=localhost\" serial={serial}"
        )) && audit.contains("reason keyCompromise"),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_revoked_intermediate() {
    let crl_lab = CrlLab::new();
    let crls = [
        crl_lab.root_crl(&[&crl_lab.intermediate.cert]),
        crl_lab.intermediate_crl(&[], None),
    ];
    let audit = client_refuses_flags(
        &crl_lab.lab,
        &crl_lab.server,
        &crl_flags(&[&crls[0], &crls[1]], None),
        "revoked",
    );
    let serial = serial_of(&crl_lab.intermediate.cert);
    assert!(
        audit.contains(&format!(
            "server intermediate 1 subject=\"CN=server intermediate\" serial={serial}"
        )),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_expired_crl() {
    let crl_lab = CrlLab::new();
    let crls = [
        crl_lab.root_crl(&[]),
        crl_lab.intermediate_crl(&[], Some((-10, -1))),
    ];
    let audit = client_refuses_flags(
        &crl_lab.lab,
        &crl_lab.server,
        &crl_flags(&[&crls[0], &crls[1]], None),
        "revocation_unknown",
    );
    assert!(
        audit.contains("the CRL of CN=server intermediate expired"),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_crl_signed_by_wrong_key() {
    let crl_lab = CrlLab::new();
    let (fake_cert, fake_key) = impostor(&crl_lab.lab.dir, "impostor", &crl_lab.intermediate.cert);
    let forged = openssl_crl(&crl_lab.lab.dir, "forged", &fake_cert, &fake_key, &[], None);
    let root = crl_lab.root_crl(&[]);
    // if-available as well: a CRL present that its issuer did not sign is never ignored.
    for mode in ["require", "if-available"] {
        let audit = client_refuses_flags(
            &crl_lab.lab,
            &crl_lab.server,
            &crl_flags(&[&root, &forged], Some(mode)),
            "revocation_unknown",
        );
        assert!(
            audit.contains("the CRL of CN=server intermediate is not signed by that issuer's key"),
            "{mode}: {audit}"
        );
    }
}

#[test]
fn case_client_no_crl_for_issuer_require_vs_if_available() {
    let crl_lab = CrlLab::new();
    // Only the intermediate's CRL: nothing says whether the intermediate is revoked.
    let crl = crl_lab.intermediate_crl(&[], None);
    let audit = client_refuses_flags(
        &crl_lab.lab,
        &crl_lab.server,
        &crl_flags(&[&crl], Some("require")),
        "revocation_unknown",
    );
    assert!(
        audit.contains("server intermediate 1")
            && audit.contains("no CRL of its issuer CN=conformance CA"),
        "{audit}"
    );
    assert_client_accepts(
        &crl_lab.lab,
        &crl_lab.server,
        &crl_flags(&[&crl], Some("if-available")),
    );
}

#[test]
fn case_mutual_refuses_revoked_client() {
    let lab = Lab::new();
    let client = lab.issue("client", &Leaf::client());
    let crl = openssl_crl(
        &lab.dir,
        "root",
        lab.ca(),
        &lab.ca_key(),
        &[&client.cert],
        None,
    );
    let crl = crl.display().to_string();
    let (audit, _) = mutual_refuses_with(&lab, Some(&client), &["--crl", &crl], "revoked");
    let serial = serial_of(&client.cert);
    assert!(
        audit.contains(&format!(
            "client leaf subject=\"CN=conformance-client\" serial={serial}: revoked"
        )),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_no_eku_server() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            eku: vec![],
            ..Leaf::server()
        },
    );
    let audit = client_refuses_flags(&lab, &server, &[], "wrong_usage");
    assert!(audit.contains("no extendedKeyUsage extension"), "{audit}");
}

#[test]
fn case_mutual_refuses_no_eku_client() {
    let lab = Lab::new();
    let client = lab.issue(
        "client",
        &Leaf {
            eku: vec![],
            ..Leaf::client()
        },
    );
    let audit = mutual_refuses(&lab, Some(&client), "wrong_usage");
    assert!(audit.contains("no extendedKeyUsage extension"), "{audit}");
}

#[test]
fn case_client_refuses_intermediate_without_key_cert_sign() {
    let lab = Lab::new();
    let (server, _) = lab.issue_via_intermediate_with(
        "server",
        &Leaf::server(),
        IsCa::Ca(BasicConstraints::Unconstrained),
        vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign],
    );
    let audit = client_refuses_flags(&lab, &server, &[], "wrong_usage");
    assert!(
        audit.contains("server intermediate 1") && audit.contains("without keyUsage keyCertSign"),
        "{audit}"
    );
}

#[test]
fn case_client_refuses_key_agreement_only_server() {
    let lab = Lab::new();
    let server = lab.issue(
        "server",
        &Leaf {
            key_usages: vec![KeyUsagePurpose::KeyAgreement],
            ..Leaf::server()
        },
    );
    // OpenSSL's s_server will not sign a handshake with such a certificate (it ends the
    // handshake with handshake_failure itself), so the peer here is our own server relay,
    // which loads it: the client relay's check is what refuses it.
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let relay = start_server_relay(&server, upstream.addr(), &[]);
    let mut client = start_client_relay(lab.ca(), relay.addr, Some("localhost"));
    client
        .daemon
        .wait_for_line("association refused", EVENT_TIMEOUT);
    assert_no_reply_through(&client);
    let (associations, _) = stop_relay(&mut client);
    let audit = assert_first_refusal(&associations, "wrong_usage");
    assert!(
        audit.contains("keyUsage without digitalSignature"),
        "{audit}"
    );
    assert_eq!(
        upstream.datagrams(),
        0,
        "a datagram reached the time server"
    );
}

#[test]
fn case_mutual_refuses_key_agreement_only_client() {
    let lab = Lab::new();
    let client = lab.issue(
        "client",
        &Leaf {
            key_usages: vec![KeyUsagePurpose::KeyAgreement],
            ..Leaf::client()
        },
    );
    let audit = mutual_refuses(&lab, Some(&client), "wrong_usage");
    assert!(
        audit.contains("keyUsage without digitalSignature"),
        "{audit}"
    );
}

// ---------------------------------------------------------------------------------------------
// Protocol details patched in rtc-dtls (vendor/PATCHES.md c and e), with OpenSSL as the peer
// ---------------------------------------------------------------------------------------------

#[test]
fn case_server_full_handshake_for_session_id() {
    // A session s_client saved from s_server (a real session_id), offered to the server relay:
    // its ClientHello carries that session_id. The relay never resumes; it must answer with a
    // full handshake (patch c), not drop the ClientHello as unparseable.
    let lab = Lab::new();
    let server_cert = lab.issue("server", &Leaf::server());
    let session = lab.dir.join("session.pem");
    let session_arg = session.display().to_string();
    {
        let (_s_server, addr) = s_server(&server_cert, "-dtls1_2", &[], &[]);
        let (_, text) = s_client_with_request(
            addr,
            lab.ca(),
            &["-dtls1_2", "-sess_out", &session_arg],
            &[],
        );
        let id = text
            .lines()
            .find_map(|l| l.trim().strip_prefix("Session-ID: "))
            .unwrap_or_default();
        assert_eq!(id.len(), 64, "s_server gave no 32-byte session ID:\n{text}");
    }
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let mut relay = start_server_relay(&server_cert, upstream.addr(), &[]);
    let (_, text) = s_client_with_request(
        relay.addr,
        lab.ca(),
        &["-dtls1_2", "-sess_in", &session_arg],
        &[],
    );
    assert!(
        text.contains("New, TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256")
            && text.contains("Verify return code: 0 (ok)")
            && !text.contains("Reused,"),
        "{text}"
    );
    let (associations, _) = stop_relay(&mut relay);
    assert!(
        associations[0].contains("association established"),
        "{associations:?}"
    );
    assert_eq!(
        upstream.requests(),
        1,
        "the request went through the new association"
    );
}

#[test]
fn case_server_refuses_renegotiation() {
    // s_client's 'R' command renegotiates inside the association: the relay answers with a
    // warning no_renegotiation alert (patch e) and never starts a second handshake.
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let lab = Lab::new();
    let mut relay = start_server_relay(&lab.issue("server", &Leaf::server()), upstream.addr(), &[]);
    let mut cmd = openssl();
    cmd.args([
        "s_client",
        "-dtls1_2",
        "-connect",
        &relay.addr.to_string(),
        "-CAfile",
    ])
    .arg(lab.ca())
    .args([
        "-verify_hostname",
        "localhost",
        "-verify_return_error",
        "-msg",
    ]);
    let mut s_client = Peer::spawn("s_client", cmd);
    s_client.wait_for_text("Verify return code: 0 (ok)", EVENT_TIMEOUT);
    s_client.write(b"R\n");
    s_client.wait_for_text("RENEGOTIATING", EVENT_TIMEOUT);
    // OpenSSL 3.0 names what it got on stderr, and -msg shows the alert's bytes: level 1
    // (warning), description 100 (no_renegotiation). It then gives up with handshake_failure.
    s_client.wait_for_text(":no renegotiation:", EVENT_TIMEOUT);
    // Awaited, not read at once: stderr and stdout come through separate pipes, and a clean
    // clone's CI run read the stderr line before the stdout -msg lines had been taken in.
    s_client.wait_for_text("\n    01 64\n", EVENT_TIMEOUT);
    let (associations, _) = stop_relay(&mut relay);
    assert_eq!(
        associations
            .iter()
            .filter(|l| l.contains("association established"))
            .count(),
        1,
        "{associations:?}"
    );
    assert_eq!(upstream.datagrams(), 0);
}

/// Not a case: CRLs are re-read at SIGHUP. A client accepted under an empty CRL is refused, as
/// revoked, once the CRL file is replaced by one that lists it and the relay has reloaded.
#[test]
fn crls_are_reread_at_sighup() {
    let lab = Lab::new();
    let client = lab.issue("client", &Leaf::client());
    let crl = lab.dir.join("live.crl.pem");
    let empty = openssl_crl(&lab.dir, "before", lab.ca(), &lab.ca_key(), &[], None);
    std::fs::copy(&empty, &crl).expect("copy");
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let (ca, crl_arg) = (lab.ca().display().to_string(), crl.display().to_string());
    let server = start_server_relay(
        &lab.issue("server", &Leaf::server()),
        upstream.addr(),
        &["--client-ca", &ca, "--crl", &crl_arg],
    );
    let (cert, key) = (
        client.cert.display().to_string(),
        client.key.display().to_string(),
    );
    let args = ["-dtls1_2", "-cert", &cert, "-key", &key];
    let (_, text) = s_client_with_request(server.addr, lab.ca(), &args, &[]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    server
        .daemon
        .wait_for_line("association established", EVENT_TIMEOUT);

    let revoking = openssl_crl(
        &lab.dir,
        "after",
        lab.ca(),
        &lab.ca_key(),
        &[&client.cert],
        None,
    );
    std::fs::copy(&revoking, &crl).expect("copy");
    let mark = server.daemon.line_count();
    let status = Command::new("kill")
        .args(["-HUP", &server.daemon.pid().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
    let line = server
        .daemon
        .wait_for_new_line("config reload", mark, EVENT_TIMEOUT);
    assert!(line.contains("result=ok"), "{line}");
    s_client_once(server.addr, lab.ca(), &args, &[]);
    let refused = server
        .daemon
        .wait_for_new_line("association refused", mark, EVENT_TIMEOUT);
    assert!(refused.contains("reason=revoked"), "{refused}");
}
