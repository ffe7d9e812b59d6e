//! Operating the relays: metrics (checked by promtool) and `status`, SIGHUP reload of
//! certificates (server relay) and of the CA file (client relay), JSON logs, dropping root and
//! the files that user must read, `--check`, a second server on a held address, and the
//! README's by-hand section run as written. Real processes on loopback.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use common::relays::{Pki, start_client, start_server, start_server_on};
use common::*;

fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// The `metrics=ADDR` field of a daemon's ready line.
fn metrics_addr(daemon: &Daemon) -> String {
    let ready = daemon.wait_for_line(" ready ", READY_TIMEOUT);
    find_field(&ready, "metrics")
        .unwrap_or_else(|| panic!("no metrics= in {ready}"))
        .to_string()
}

fn scrape(addr: &str) -> String {
    let out = run_command(
        {
            let mut c = Command::new(ntp_dtls_bin());
            c.args(["status", addr]);
            c
        },
        Duration::from_secs(10),
    )
    .expect("status ran");
    assert!(out.status.success(), "{}", out.combined());
    out.stdout
}

/// The value of `name` at `addr` once it equals `want`, or its last value after 2 s. A relay
/// counts a datagram after the sendmmsg that carried it, so a reply can reach the test before
/// the counter moves: the counter is awaited, not read once.
fn awaited_metric(addr: &str, name: &str, want: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let value = metric(addr, name);
        if value == want || Instant::now() >= deadline {
            return value;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn metrics_move_as_traffic_flows_and_status_summarises_them() {
    let pki = Pki::generate(&["localhost"]);
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        "builtin".into(),
        "--metrics".into(),
        "127.0.0.1:0".into(),
    ];
    args.extend(pki.server_identity());
    let server = spawn_ntp_dtls("server-relay", &args);
    let server_addr = server.wait_ready(READY_TIMEOUT)[0];
    let server_metrics = metrics_addr(&server);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server_addr,
        &["--server-name", "localhost", "--metrics", "127.0.0.1:0"],
    );
    let client_metrics = metrics_addr(&client.daemon);

    // The builtin source answers in-process: the server relay forwards nothing, it replies.
    let before = metric(&server_metrics, "ntp_dtls_replies_delivered_total ");
    for _ in 0..3 {
        assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    }
    assert_eq!(
        awaited_metric(
            &server_metrics,
            "ntp_dtls_replies_delivered_total ",
            before + 3.0
        ),
        before + 3.0
    );
    assert_eq!(
        awaited_metric(&client_metrics, "ntp_dtls_requests_forwarded_total ", 3.0),
        3.0
    );
    assert_eq!(
        awaited_metric(&client_metrics, "ntp_dtls_replies_delivered_total ", 3.0),
        3.0
    );
    assert_eq!(
        metric(
            &server_metrics,
            "ntp_dtls_associations{state=\"established\"} "
        ),
        1.0
    );
    let rtt = metric(
        &client_metrics,
        &format!("ntp_dtls_upstream_rtt_seconds{{upstream=\"{server_addr}\"}} "),
    );
    assert!(rtt > 0.0 && rtt < 0.5, "rtt {rtt}");

    let summary = scrape(&server_metrics);
    assert!(summary.contains("ntp-dtls server relay"), "{summary}");
    assert!(summary.contains("1 established"), "{summary}");
    assert!(summary.contains("certificate server: expires"), "{summary}");
    assert!(summary.contains("MiB resident"), "{summary}");
    let summary = scrape(&client_metrics);
    assert!(
        summary.contains("traffic: 3 requests forwarded"),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("upstream {server_addr}: rtt ")),
        "{summary}"
    );
}

/// The whole text of `GET path` at `addr`.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_string()
}

/// promtool, or None (skipped with a message) when it is missing outside CI.
fn promtool() -> Option<std::path::PathBuf> {
    match find_tool("promtool") {
        Some(path) => Some(path),
        None if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!(
                "promtool not found under CI=true: run `make deps` (Debian's prometheus package)"
            )
        }
        None => {
            eprintln!(
                "SKIPPED: promtool not found (make deps installs Debian's prometheus package)"
            );
            None
        }
    }
}

#[test]
fn promtool_finds_nothing_wrong_with_either_relays_metrics() {
    let Some(promtool) = promtool() else {
        return;
    };
    let pki = Pki::generate(&["localhost"]);
    let mut args: Vec<String> = ["server", "--listen", "127.0.0.1:0", "--upstream", "builtin"]
        .map(String::from)
        .to_vec();
    args.extend([
        "--metrics".into(),
        "127.0.0.1:0".into(),
        "--workers".into(),
        "2".into(),
    ]);
    args.extend(pki.server_identity());
    let server = spawn_ntp_dtls("server-relay", &args);
    let server_addr = server.wait_ready(READY_TIMEOUT)[0];
    let server_metrics = metrics_addr(&server);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server_addr,
        &["--server-name", "localhost", "--metrics", "127.0.0.1:0"],
    );
    let client_metrics = metrics_addr(&client.daemon);
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    for (who, addr) in [("server", &server_metrics), ("client", &client_metrics)] {
        let text = http_get(addr, "/metrics");
        for family in [
            "ntp_dtls_build_info{",
            "ntp_dtls_dropped_total{reason=\"no_association\"} ",
            "ntp_dtls_handshakes_failed_total{reason=\"unknown_ca\"} 0",
            "ntp_dtls_associations_refused_total 0",
            "ntp_dtls_residence_seconds_bucket{direction=\"request\",le=\"+Inf\"} ",
            "process_resident_memory_bytes ",
            "process_cpu_seconds_total ",
            "process_open_fds ",
            "process_max_fds ",
            "process_start_time_seconds ",
        ] {
            assert!(text.contains(family), "{who}: no {family} in:\n{text}");
        }
        assert!(
            !text.contains("_drop_"),
            "{who}: drops are one labelled family:\n{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let labels = line.split_once('{').map_or("", |(_, rest)| rest);
            let labels = labels.split_once('}').map_or("", |(labels, _)| labels);
            assert!(
                !labels.contains(' '),
                "{who}: a label value with a space: {line}"
            );
        }
        // promtool reads the exposition on stdin.
        let dir = TempDir::new();
        let file = dir.write("metrics.txt", &text);
        let out = run_command(
            {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("\"$0\" check metrics < \"$1\"")
                    .arg(&promtool)
                    .arg(&file);
                c
            },
            Duration::from_secs(20),
        )
        .expect("promtool ran");
        assert!(
            out.status.success() && out.combined().trim().is_empty(),
            "{who}: promtool check metrics:\n{}\n{text}",
            out.combined()
        );
        let json: serde_json::Value =
            serde_json::from_str(&http_get(addr, "/status.json")).expect("status.json is JSON");
        assert_eq!(json["role"], who);
    }
}

#[test]
fn sighup_swaps_the_server_certificate_without_dropping_live_associations() {
    let old = Pki::generate(&["localhost"]);
    let new = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    let (cert, key) = (dir.join("server.pem"), dir.join("server.key.pem"));
    std::fs::copy(old.path("server.pem"), &cert).expect("copy");
    std::fs::copy(old.path("server.key.pem"), &key).expect("copy");
    let server = spawn_ntp_dtls(
        "server-relay",
        &[
            "server",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "builtin",
            "--cert",
            &cert.display().to_string(),
            "--key",
            &key.display().to_string(),
        ],
    );
    let server_addr = server.wait_ready(READY_TIMEOUT)[0];
    let live = start_client(
        &old.ca(),
        any_local(),
        server_addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(live.addr, Duration::from_secs(2)).is_some());

    // Renewal: a certificate from a new CA at the same paths, then SIGHUP.
    std::fs::copy(new.path("server.pem"), &cert).expect("copy");
    std::fs::copy(new.path("server.key.pem"), &key).expect("copy");
    let mark = server.line_count();
    hup(server.pid());
    let line = server.wait_for_new_line("config reload", mark, Duration::from_secs(5));
    assert!(line.contains("result=ok"), "{line}");

    // The live association keeps working; a client that trusts only the new CA connects.
    assert!(ntp_query(live.addr, Duration::from_secs(2)).is_some());
    let fresh = start_client(
        &new.ca(),
        any_local(),
        server_addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(fresh.addr, Duration::from_secs(2)).is_some());
    // The live association and the fresh one; the line may trail the reply, so wait for it.
    let established = server.wait_for_count("association established", 2, Duration::from_secs(5));
    assert_eq!(established, 2, "{}", server.tail(10));

    // A corrupt new file: the reload fails, says why, and the material in service stays.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
    let mark = server.line_count();
    hup(server.pid());
    let line = server.wait_for_new_line("config reload", mark, Duration::from_secs(5));
    assert!(
        line.contains("result=failed") && line.contains("server.pem"),
        "{line}"
    );
    let another = start_client(
        &new.ca(),
        any_local(),
        server_addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(another.addr, Duration::from_secs(2)).is_some());
    assert!(server.try_exit_status().is_none());
    // Nothing was dropped by either reload: three associations set up, none refused or closed
    // before shutdown (counted once the relay has exited and its output is read).
    let lines = server.terminate_and_drain();
    let count = |needle: &str| lines.iter().filter(|l| l.contains(needle)).count();
    assert_eq!(count("association established"), 3, "{lines:#?}");
    assert_eq!(count("association refused"), 0, "{lines:#?}");
    assert_eq!(
        lines
            .iter()
            .filter(|l| l.contains("association closed") && !l.contains("reason=shutdown"))
            .count(),
        0,
        "{lines:#?}"
    );
}

fn hup(pid: u32) {
    let status = Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());
}

#[test]
fn sighup_makes_the_client_relay_trust_a_renewed_ca_for_new_handshakes() {
    let old = Pki::generate(&["localhost"]);
    let new = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    let (ca, stale_ca) = (dir.join("ca.pem"), dir.join("stale-ca.pem"));
    for file in [&ca, &stale_ca] {
        std::fs::copy(old.ca(), file).expect("copy");
    }
    let server = start_server(&old, "builtin", &[]);
    let args = ["--server-name", "localhost"];
    let client = start_client(&ca, any_local(), server.addr, &args);
    // The control: the same client relay, never reloaded.
    let stale = start_client(&stale_ca, any_local(), server.addr, &args);
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());

    // The server side moves to a new CA: the client relay's CA file is replaced, then SIGHUP.
    std::fs::copy(new.ca(), &ca).expect("copy");
    let mark = client.daemon.line_count();
    hup(client.daemon.pid());
    let line = client
        .daemon
        .wait_for_new_line("config reload", mark, Duration::from_secs(5));
    assert!(line.contains("result=ok"), "{line}");
    // The live association goes on.
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());

    // The server relay comes back on the same address with a certificate from the new CA. The
    // client relays' next handshakes can only succeed with the reloaded CA file.
    let (client_mark, stale_mark) = (client.daemon.line_count(), stale.daemon.line_count());
    let restarted = {
        let mut server = server;
        server.daemon.terminate();
        start_server_on(&new, server.addr, "builtin", &[])
    };
    client.daemon.wait_for_new_line(
        "association established",
        client_mark,
        Duration::from_secs(15),
    );
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    // (It may first find the port closed while the server relay restarts.)
    stale.daemon.wait_until(
        "a refusal for the new CA",
        stale_mark,
        Duration::from_secs(15),
        |l| l.contains("association refused") && l.contains("reason=unknown_ca"),
    );

    // A corrupt CA file: the reload fails, says why, and the material in service stays.
    std::fs::write(&ca, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
    let mark = client.daemon.line_count();
    hup(client.daemon.pid());
    let line = client
        .daemon
        .wait_for_new_line("config reload", mark, Duration::from_secs(5));
    assert!(
        line.contains("result=failed") && line.contains("ca.pem"),
        "{line}"
    );
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    assert!(client.daemon.try_exit_status().is_none());
    drop(restarted);
}

#[test]
fn every_json_log_line_parses() {
    let pki = Pki::generate(&["localhost"]);
    let other = Pki::generate(&["localhost"]);
    let mut args: Vec<String> = vec![
        "--log-format".into(),
        "json".into(),
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        "builtin".into(),
    ];
    args.extend(pki.server_identity());
    let server = spawn_ntp_dtls("server-relay", &args);
    let ready = server.wait_for_line("\"ready\"", READY_TIMEOUT);
    let ready: serde_json::Value = serde_json::from_str(&ready).expect("ready line is JSON");
    let addr: SocketAddr = ready["fields"]["listen"]
        .as_str()
        .and_then(|a| a.parse().ok())
        .expect("fields.listen");
    // An association set up, one refused, traffic, then shutdown: every kind of line.
    let good = start_client(
        &pki.ca(),
        any_local(),
        addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(good.addr, Duration::from_secs(2)).is_some());
    let _bad = start_client(
        &other.ca(),
        any_local(),
        addr,
        &["--server-name", "localhost"],
    );
    server.wait_for_line("association refused", Duration::from_secs(5));
    let lines = server.terminate_and_drain();
    assert!(lines.len() >= 5, "{lines:?}");
    for line in &lines {
        let value: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for key in ["timestamp", "level", "target"] {
            assert!(value.get(key).is_some(), "{key} missing: {line}");
        }
        assert!(value["fields"]["message"].is_string(), "{line}");
    }
    let refused = lines
        .iter()
        .find(|l| l.contains("association refused"))
        .expect("refusal line");
    let refused: serde_json::Value = serde_json::from_str(refused).expect("json");
    assert_eq!(refused["fields"]["reason"], "peer_alert");
    assert!(refused["fields"]["peer"].is_string());
}

#[test]
fn started_as_root_the_server_drops_to_the_configured_user() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: not root, nothing to drop");
        return;
    }
    let pki = Pki::generate(&["localhost"]);
    let mut args: Vec<String> = vec![
        "server".into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--upstream".into(),
        "builtin".into(),
        "--user".into(),
        "nobody".into(),
    ];
    args.extend(pki.server_identity());
    let server = spawn_ntp_dtls("server-relay", &args);
    let addr = server.wait_ready(READY_TIMEOUT)[0];
    server.wait_for_line("privileges dropped", Duration::from_secs(1));
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    let uid = status
        .lines()
        .find(|l| l.starts_with("Uid:"))
        .expect("Uid line")
        .to_string();
    assert!(!uid.split_whitespace().skip(1).any(|id| id == "0"), "{uid}");
    let client = start_client(
        &pki.ca(),
        any_local(),
        addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
}

#[test]
fn a_second_server_on_the_same_address_is_refused_and_the_first_keeps_serving() {
    let pki = Pki::generate(&["localhost"]);
    let first = common::relays::start_server(&pki, "builtin", &["--workers", "2"]);
    let addr = first.addr.to_string();
    let mut args: Vec<String> = ["server", "--listen", &addr, "--upstream", "builtin"]
        .map(String::from)
        .to_vec();
    args.extend(["--workers".into(), "2".into()]);
    args.extend(pki.server_identity());
    let out = run_command(
        {
            let mut c = Command::new(ntp_dtls_bin());
            c.args(&args).env("NO_COLOR", "1");
            c
        },
        Duration::from_secs(20),
    )
    .expect("the second server ran");
    assert!(!out.status.success(), "{}", out.combined());
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("ntp-dtls: error:"))
        .collect();
    assert_eq!(errors.len(), 1, "{}", out.stderr);
    assert!(
        errors[0].contains(&format!("cannot listen on {addr}")) && errors[0].contains("in use"),
        "{}",
        errors[0]
    );
    assert!(!out.stderr.contains(" ready "), "{}", out.stderr);
    // Every new association still reaches the first server.
    for _ in 0..3 {
        let client = start_client(
            &pki.ca(),
            any_local(),
            first.addr,
            &["--server-name", "localhost"],
        );
        assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    }
    assert_eq!(first.daemon.count_lines("association established"), 3);
    assert!(first.daemon.try_exit_status().is_none());
}

/// `ntp-dtls ARGS...`: (exit success, stdout, stderr).
fn ntp_dtls(args: &[&str]) -> (bool, String, String) {
    let out = run_command(
        {
            let mut c = Command::new(ntp_dtls_bin());
            c.args(args).env("NO_COLOR", "1");
            c
        },
        Duration::from_secs(30),
    )
    .expect("ntp-dtls ran to completion");
    (out.status.success(), out.stdout, out.stderr)
}

#[test]
fn server_check_prints_what_would_run_and_finds_a_held_address() {
    let pki = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    let port = common::free_udp_port(loopback_ip(1));
    let config = dir.write(
        "server.toml",
        format!(
            "listen = \"127.0.0.1:{port}\"\nupstream = \"builtin\"\nworkers = 3\n\
             cert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nmetrics = \"127.0.0.1:0\"\n\
             [limits]\nmax_half_open = 9\n",
            pki.path("server.pem").display(),
            pki.path("server.key.pem").display(),
            pki.ca().display()
        ),
    );
    let config = config.display().to_string();
    let (ok, stdout, stderr) = ntp_dtls(&["server", "--check", "--config", &config]);
    assert!(ok, "{stdout}{stderr}");
    for line in [
        &format!("listen 127.0.0.1:{port}, 3 workers, upstream builtin time source (stratum 2)"),
        "CN=localhost",
        "matches it",
        "mutual authentication: on, client certificates must chain to",
        "limits: max_associations=100000 max_half_open=9 ",
        "metrics: http://127.0.0.1:0/metrics",
        "check: OK: the server relay would start",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }
    // Nothing was started: the address is still free.
    assert!(can_bind_udp(
        format!("127.0.0.1:{port}").parse().expect("addr")
    ));

    let held = std::net::UdpSocket::bind(format!("127.0.0.1:{port}")).expect("hold it");
    let (ok, stdout, _) = ntp_dtls(&["server", "--check", "--config", &config]);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "problem: listen: cannot listen on 127.0.0.1:{port}"
        )) && stdout.contains("check: 1 problem"),
        "{stdout}"
    );
    drop(held);

    // A configuration that does not load is the daemon's own one-line error.
    let (ok, stdout, stderr) = ntp_dtls(&[
        "server",
        "--check",
        "--listen",
        "127.0.0.1:0",
        "--cert",
        "/nonexistent/server.pem",
        "--key",
        "/nonexistent/server.key.pem",
    ]);
    assert!(!ok && stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with("ntp-dtls: error:") && stderr.contains("/nonexistent/server.pem"),
        "{stderr}"
    );
}

#[test]
fn client_check_reports_each_tunnel_and_every_problem() {
    let pki = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    let ca = pki.ca().display().to_string();
    let good = dir.write(
        "good.toml",
        format!(
            "ca = \"{ca}\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"localhost\"\n\
             [[tunnel]]\nlisten = \"127.0.0.2:0\"\nserver = \"127.0.0.1\"\nserver_name = \"localhost\"\n"
        ),
    );
    let (ok, stdout, stderr) =
        ntp_dtls(&["client", "--check", "--config", &good.display().to_string()]);
    assert!(ok, "{stdout}{stderr}");
    for line in [
        "tunnel 1: listen 127.0.0.1:0 -> server localhost:1123 (localhost:1123 = ",
        "expecting localhost in its certificate",
        "tunnel 2: listen 127.0.0.2:0 -> server 127.0.0.1:1123 (127.0.0.1:1123)",
        "(1 certificate), no client certificate",
        "upkeep: dead after 3 unanswered or 5 s",
        "metrics: off",
        "check: OK: the client relay would start",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    // Three tunnels: one fine, one whose name does not resolve, one whose CA is missing.
    let broken = dir.write(
        "broken.toml",
        format!(
            "ca = \"{ca}\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"127.0.0.1:1123\"\n\
             [[tunnel]]\nlisten = \"127.0.0.2:0\"\nserver = \"time2.invalid:1123\"\n\
             [[tunnel]]\nlisten = \"127.0.0.3:0\"\nserver = \"127.0.0.1:1123\"\nca = \"/nonexistent/ca.pem\"\n"
        ),
    );
    let (ok, stdout, _) = ntp_dtls(&[
        "client",
        "--check",
        "--config",
        &broken.display().to_string(),
    ]);
    assert!(!ok, "{stdout}");
    for line in [
        "tunnel 1: listen 127.0.0.1:0 -> server 127.0.0.1:1123",
        "problem: tunnel 2: server time2.invalid:1123 does not resolve now (the daemon would keep retrying)",
        "problem: ",
        "tunnel 3: CA file: /nonexistent/ca.pem",
        "check: 2 problems",
    ] {
        assert!(stdout.contains(line), "no {line:?} in:\n{stdout}");
    }

    // Flags instead of a file, and a listen address already held.
    let held = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
    let held_addr = held.local_addr().expect("addr").to_string();
    let (ok, stdout, _) = ntp_dtls(&[
        "client",
        "--check",
        "--listen",
        &held_addr,
        "--server",
        "127.0.0.1",
        "--ca",
        &ca,
    ]);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains(&format!(
            "{held_addr}: listen {held_addr} -> server 127.0.0.1:1123"
        )) && stdout.contains(&format!(
            "problem: {held_addr}: cannot listen on {held_addr}"
        )),
        "{stdout}"
    );
}

/// The situation of issue 12: keys as `certs` writes them (0600 root) and `--user` another
/// user. The relay starts (it read them as root) but says the reload will fail, and how to fix
/// it; `--check` fails on it.
#[test]
fn files_the_service_user_cannot_read_are_named_at_start_and_by_check() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: not root: --user needs root");
        return;
    }
    let pki = Pki::generate(&["localhost"]);
    // The lab PKI directory is the test's own (0700): let nobody in, keep the key 0600.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(pki.dir(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let key = pki.path("server.key.pem").display().to_string();
    let cert = pki.path("server.pem").display().to_string();
    let args = [
        "server",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        "builtin",
        "--cert",
        &cert,
        "--key",
        &key,
        "--user",
        "nobody",
    ];
    let mut check = vec!["server", "--check"];
    check.extend(&args[1..]);
    let (ok, stdout, _) = ntp_dtls(&check);
    assert!(!ok, "{stdout}");
    assert!(
        stdout.contains(&format!("problem: {key}: user nobody cannot read it"))
            && stdout.contains("mode 0600")
            && stdout.contains(&format!("chgrp nogroup {key} && chmod 0640 {key}")),
        "{stdout}"
    );
    let server = spawn_ntp_dtls("server-relay", &args);
    server.wait_ready(READY_TIMEOUT);
    let warning = server.wait_for_line(
        "the service user cannot read this file",
        Duration::from_secs(1),
    );
    assert!(
        warning.contains("WARN")
            && warning.contains(&format!("file={key}"))
            && warning.contains("chmod 0640"),
        "{warning}"
    );
    assert_eq!(
        server.count_lines("the service user cannot read this file"),
        1,
        "the cert is 0644"
    );
}

/// The README's "By hand" block, run as written (only its `cargo build` line is left out and
/// `B=` points at the binary under test), in a network namespace of its own so that its fixed
/// ports are free.
#[test]
fn the_readme_by_hand_section_runs_as_written_on_one_host() {
    if !is_root() {
        assert!(std::env::var_os("CI").is_none(), "CI must run as root");
        eprintln!("SKIPPED: not root: the block runs in its own network namespace");
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let section = readme
        .split_once("By hand, on one host")
        .map(|(_, rest)| rest)
        .expect("a by-hand section");
    let block = section
        .split_once("```sh\n")
        .and_then(|(_, rest)| rest.split_once("```"))
        .map(|(block, _)| block)
        .expect("a sh block");
    let mut script = String::from("set -e\n");
    for line in block.lines() {
        if line.starts_with("cargo build") {
            continue;
        }
        if line.starts_with("B=") {
            script.push_str(&format!("B={}\n", ntp_dtls_bin().display()));
            continue;
        }
        script.push_str(line);
        script.push('\n');
    }
    assert!(
        script.contains("$B server") && script.contains("$B client"),
        "{script}"
    );
    let dir = TempDir::new();
    let path = dir.write("by-hand.sh", &script);
    let out = run_command(
        {
            let mut c = Command::new("unshare");
            c.args(["--net", "sh", "-c", "ip link set lo up && exec bash \"$0\""])
                .arg(&path)
                .current_dir(dir.path())
                .env("NO_COLOR", "1");
            c
        },
        Duration::from_secs(60),
    )
    .expect("the block ran");
    assert!(out.status.success(), "{script}\n{}", out.combined());
    assert!(out.stdout.contains("offset"), "{}", out.combined());
    assert!(
        out.stderr.contains("association established"),
        "{}",
        out.combined()
    );
}
