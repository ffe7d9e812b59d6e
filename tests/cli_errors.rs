//! Bad input is a clear one-line error and a non-zero exit, never a hang or a crash.

mod common;

use std::net::UdpSocket;
use std::process::Command;
use std::time::Duration;

use common::relays::Pki;
use common::*;

/// Runs ntp-dtls with `args`; returns (success, stderr).
fn ntp_dtls(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new(ntp_dtls_bin());
    cmd.args(args).env("NO_COLOR", "1");
    let out = run_command(cmd, Duration::from_secs(20)).expect("ntp-dtls ran to completion");
    (out.status.success(), out.stderr)
}

/// The error is one line starting "ntp-dtls: error:" and containing every `needles`.
fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let (ok, stderr) = ntp_dtls(args);
    assert!(!ok, "{args:?} succeeded");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("ntp-dtls: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{args:?}: stderr was:\n{stderr}");
    // Nothing else: a message that spans lines is not a one-line error.
    assert_eq!(
        stderr.lines().filter(|l| !l.trim().is_empty()).count(),
        1,
        "{args:?}: stderr was:\n{stderr}"
    );
    for needle in needles {
        assert!(
            errors[0].contains(needle),
            "{args:?}: {:?} lacks {needle:?}",
            errors[0]
        );
    }
}

#[test]
fn a_missing_certificate_file_is_named() {
    let pki = Pki::generate(&["localhost"]);
    let key = pki.path("server.key.pem").display().to_string();
    assert_one_line_error(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            "/nonexistent/server.pem",
            "--key",
            &key,
        ],
        &["/nonexistent/server.pem", "No such file"],
    );
}

#[test]
fn a_key_that_does_not_match_its_certificate_is_refused() {
    let pki = Pki::generate(&["localhost"]);
    let cert = pki.path("server.pem").display().to_string();
    let key = pki.path("client.key.pem").display().to_string();
    assert_one_line_error(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
        &["client.key.pem", "different pairs", "server.pem"],
    );
}

#[test]
fn a_chain_whose_first_certificate_is_not_the_leaf_says_so() {
    let pki = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    let chain = dir.join("reversed.pem");
    let text = std::fs::read_to_string(pki.path("ca.pem")).expect("ca")
        + &std::fs::read_to_string(pki.path("server.pem")).expect("server");
    std::fs::write(&chain, text).expect("write");
    let cert = chain.display().to_string();
    let key = pki.path("server.key.pem").display().to_string();
    assert_one_line_error(
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
        &[
            "reversed.pem",
            "is not the leaf of the key",
            "#2 in the file",
        ],
    );
}

/// Keys outside the policy (RSA under 2048 bits, P-521) are refused at start with one line
/// naming the file and the supported key types; an RSA-2048 key is loaded, and then refused
/// only because it is not the certificate's.
#[test]
fn a_key_outside_the_policy_is_refused_at_start_up() {
    let dir = TempDir::new();
    let openssl = |args: &[&str]| {
        let mut c = Command::new("openssl");
        c.args(args).current_dir(dir.path());
        let out = run_command(c, Duration::from_secs(30)).expect("openssl ran");
        assert!(out.status.success(), "{}", out.combined());
    };
    openssl(&["genrsa", "-out", "rsa1024.key.pem", "1024"]);
    openssl(&["genrsa", "-out", "rsa2048.key.pem", "2048"]);
    openssl(&[
        "ecparam",
        "-name",
        "secp521r1",
        "-genkey",
        "-noout",
        "-out",
        "p521.key.pem",
    ]);
    let pki = Pki::generate(&["localhost"]);
    let cert = pki.path("server.pem").display().to_string();
    let server = |key: &str| {
        vec![
            "server".to_string(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--cert".into(),
            cert.clone(),
            "--key".into(),
            dir.join(key).display().to_string(),
        ]
    };
    let supported = "ntp-dtls uses ECDSA P-256, ECDSA P-384 or RSA 2048-4096 bit keys";
    for (key, what) in [
        ("rsa1024.key.pem", "RSA keys of 1024 bits"),
        ("p521.key.pem", "EC keys on curve secp521r1 (P-521)"),
    ] {
        let args = server(key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&args, &[key, what, "are not supported", supported]);
    }
    let args = server("rsa2048.key.pem");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_one_line_error(
        &args,
        &[
            "rsa2048.key.pem",
            "no certificate in the file belongs to the key",
            "different pairs",
        ],
    );
}

#[test]
fn an_address_in_use_is_reported() {
    let pki = Pki::generate(&["localhost"]);
    let taken = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    let cert = pki.path("server.pem").display().to_string();
    let key = pki.path("server.key.pem").display().to_string();
    assert_one_line_error(
        &[
            "server",
            "--listen",
            &addr,
            "--upstream",
            "builtin",
            "--cert",
            &cert,
            "--key",
            &key,
        ],
        &["cannot listen on", &addr, "in use"],
    );
    let ca = pki.ca().display().to_string();
    assert_one_line_error(
        &[
            "client",
            "--listen",
            &addr,
            "--server",
            "127.0.0.1:9",
            "--ca",
            &ca,
        ],
        &["cannot listen on", &addr, "in use"],
    );
}

#[test]
fn config_file_errors_name_the_line_and_the_field() {
    let dir = TempDir::new();
    let config = dir.write(
        "client.toml",
        "ca = \"ca.pem\"\n\n[[tunnel]]\nlisten = \"127.0.0.1:123\"\nsever = \"time:1123\"\n",
    );
    let path = config.display().to_string();
    assert_one_line_error(&["client", "--config", &path], &[&path, "line 5", "sever"]);

    let config = dir.write(
        "server.toml",
        "listen = \"0.0.0.0:1123\"\nstratum = \"two\"\n",
    );
    let path = config.display().to_string();
    assert_one_line_error(
        &["server", "--config", &path],
        &[&path, "line 2", "stratum"],
    );

    let config = dir.write("syntax.toml", "[t");
    let path = config.display().to_string();
    assert_one_line_error(
        &["server", "--config", &path],
        &[&path, "line 1", "table header"],
    );

    let config = dir.write("empty.toml", "ca = \"ca.pem\"\n");
    let path = config.display().to_string();
    assert_one_line_error(&["client", "--config", &path], &["no [[tunnel]]"]);
}

/// A name that does not resolve is no start-up error (the tunnel keeps looking it up, and
/// tests/tunnels.rs shows it); a server that is not HOST:PORT at all is.
#[test]
fn a_malformed_server_is_reported() {
    let pki = Pki::generate(&["localhost"]);
    let ca = pki.ca().display().to_string();
    for server in ["time.example.net:ntp", "[::1:1123"] {
        assert_one_line_error(
            &[
                "client",
                "--listen",
                "127.0.0.1:0",
                "--server",
                server,
                "--ca",
                &ca,
            ],
            &[server, "--server"],
        );
    }
}

#[test]
fn certs_refuses_to_overwrite_without_force() {
    let dir = TempDir::new();
    let out = dir.path().display().to_string();
    let (ok, _) = ntp_dtls(&["certs", "--out", &out, "--server-name", "localhost"]);
    assert!(ok);
    let before = std::fs::read(dir.join("ca.pem")).expect("ca.pem");
    assert_one_line_error(
        &["certs", "--out", &out, "--server-name", "localhost"],
        &["ca.pem", "--force"],
    );
    assert_eq!(std::fs::read(dir.join("ca.pem")).expect("ca.pem"), before);
    let (ok, _) = ntp_dtls(&[
        "certs",
        "--out",
        &out,
        "--server-name",
        "localhost",
        "--force",
    ]);
    assert!(ok);
    assert_ne!(std::fs::read(dir.join("ca.pem")).expect("ca.pem"), before);
}

#[test]
fn a_ca_file_that_holds_a_leaf_is_refused() {
    let pki = Pki::generate(&["localhost"]);
    let leaf = pki.path("server.pem").display().to_string();
    assert_one_line_error(
        &[
            "client",
            "--listen",
            "127.0.0.1:0",
            "--server",
            "127.0.0.1:9",
            "--ca",
            &leaf,
        ],
        &["server.pem"],
    );
}

#[test]
fn with_json_logs_a_start_up_error_is_one_json_line() {
    let pki = Pki::generate(&["localhost"]);
    let key = pki.path("server.key.pem").display().to_string();
    let (ok, stderr) = ntp_dtls(&[
        "--log-format",
        "json",
        "server",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        "/nonexistent/server.pem",
        "--key",
        &key,
    ]);
    assert!(!ok);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    let line: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON line");
    assert_eq!(line["level"], "ERROR", "{stderr}");
    assert!(line["timestamp"].is_string() && line["target"].is_string());
    let error = line["fields"]["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("/nonexistent/server.pem") && error.contains("No such file"),
        "{stderr}"
    );
    // Text stays the default.
    assert_one_line_error(
        &["server", "--cert", "/nonexistent/server.pem", "--key", &key],
        &["/nonexistent/server.pem"],
    );
}

#[test]
fn status_without_a_metrics_endpoint_says_what_to_check() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let addr = format!("127.0.0.1:{port}");
    assert_one_line_error(
        &["status", &addr],
        &[
            &addr,
            "Connection refused",
            &format!("--metrics {addr}"),
            "is the relay running",
        ],
    );
}

#[test]
fn a_key_after_the_limits_table_is_said_to_be_in_it() {
    let dir = TempDir::new();
    let config = dir.write(
        "server.toml",
        "listen = \"127.0.0.1:0\"\n[limits]\nmax_half_open = 10\n# appended later:\nworkers = 2\n",
    );
    let path = config.display().to_string();
    assert_one_line_error(
        &["server", "--config", &path],
        &[
            &path,
            "line 5",
            "workers",
            "in the [limits] table, which starts at line 2",
        ],
    );
}

#[test]
fn client_help_shows_the_defaults_and_the_check() {
    let out = run_command(
        {
            let mut c = Command::new(ntp_dtls_bin());
            c.args(["client", "--help"]);
            c
        },
        Duration::from_secs(10),
    )
    .expect("help ran");
    assert!(out.status.success(), "{}", out.combined());
    for needle in [
        "[default: 127.0.0.1:123]",
        "port 1123 when omitted",
        "--check",
    ] {
        assert!(
            out.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            out.stdout
        );
    }
}

#[test]
fn a_private_key_others_can_read_is_warned_about_at_start_and_by_check() {
    use std::os::unix::fs::PermissionsExt;
    let pki = Pki::generate(&["localhost"]);
    let key = pki.path("server.key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let cert = pki.path("server.pem").display().to_string();
    let key = key.display().to_string();
    let mut cmd = Command::new(ntp_dtls_bin());
    cmd.args([
        "server",
        "--check",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "builtin",
        "--cert",
        &cert,
        "--key",
        &key,
    ]);
    let out = run_command(cmd, Duration::from_secs(20)).expect("ran");
    // A warning, not a refusal: the check passes, and says what to do.
    assert!(out.status.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(
        out.stdout.contains("warning:")
            && out.stdout.contains("readable by others (mode 0644)")
            && out.stdout.contains("chmod 600"),
        "{}",
        out.stdout
    );
    // The same WARN the daemon logs at start-up.
    let daemon = spawn_ntp_dtls(
        "server-relay",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "builtin",
            "--cert",
            &cert,
            "--key",
            &key,
        ]
        .map(String::from),
    );
    let line = daemon.wait_for_line("readable by others", Duration::from_secs(10));
    assert!(line.contains("WARN"), "{line}");
}
