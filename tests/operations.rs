//! Operating the relays: metrics and `status`, SIGHUP reload of certificates (server relay) and
//! of the CA file (client relay), JSON logs, dropping root. Real processes on loopback.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

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

/// A value of the Prometheus text served at `addr`, read over plain HTTP.
fn metric(addr: &str, name: &str) -> f64 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).expect("connect to metrics");
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    write!(stream, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    let _ = stream.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} not in:\n{text}"))
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

    let before = metric(&server_metrics, "ntp_dtls_requests_forwarded_total ");
    for _ in 0..3 {
        assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
    }
    assert_eq!(
        metric(&server_metrics, "ntp_dtls_requests_forwarded_total "),
        before + 3.0
    );
    assert_eq!(
        metric(&client_metrics, "ntp_dtls_replies_delivered_total "),
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
    assert!(summary.contains("1 established"), "{summary}");
    assert!(summary.contains("certificate server: expires"), "{summary}");
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
