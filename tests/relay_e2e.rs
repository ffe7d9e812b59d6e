//! The relay pair end to end: real chronyd, real NTP clients (ntpsec's ntpdate and sntp, chronyd
//! as a client), both relays as real processes, on loopback.
//!
//! ntpdate and sntp only query port 123, so each test that runs them binds its client relay on
//! its own 127.0.0.N:123 (CI runs as root); everything else uses kernel-chosen ports.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::relays::{DtlsTestClient, Pki, cpu_seconds, start_client, start_server};
use common::*;

const LOCAL_ANY: &str = "127.0.0.1:0";
/// Offsets through the chain must stay under this (all processes share one clock).
const MAX_OFFSET_S: f64 = 0.001;

/// Like an NTP client's clock filter: of `n` samples, the one with the lowest delay (whose offset
/// error bound, delay/2, is the tightest). A loaded 2-core machine delays some samples.
fn best_of<T>(
    n: usize,
    key: impl Fn(&T) -> f64,
    mut sample: impl FnMut() -> Option<T>,
) -> Option<T> {
    (0..n)
        .filter_map(|_| sample())
        .min_by(|a, b| key(a).total_cmp(&key(b)))
}

fn any_local() -> SocketAddr {
    LOCAL_ANY.parse().expect("addr")
}

/// Port 123 needs root. CI runs as root; elsewhere such a test says so and does nothing, except
/// under CI=true where not being root is a failure.
fn root_or_skip(test: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: CI must run as root to bind port 123"
    );
    eprintln!("{test}: SKIPPED (not root: ntpdate and sntp need the relay on port 123)");
    false
}

#[test]
fn ntpdate_and_sntp_get_valid_replies_through_the_chain() {
    if !root_or_skip("ntpdate_and_sntp") {
        return;
    }
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost", "127.0.0.1"]);
    let server = start_server(&pki, &chronyd.addr().to_string(), &[]);
    let listen = SocketAddr::new(loopback_ip(21), 123);
    let client = start_client(&pki.ca(), listen, server.addr, &[]);
    assert_eq!(client.addr, listen);

    let ntpdate = best_of(
        3,
        |r: &NtpClientResult| r.sync_distance_s.unwrap_or(f64::MAX),
        || ntpdate_query(listen.ip()).ok(),
    )
    .expect("ntpdate got a reply through the chain");
    assert!(
        ntpdate.offset_s.abs() < MAX_OFFSET_S,
        "ntpdate offset {} s:\n{}",
        ntpdate.offset_s,
        ntpdate.raw
    );
    let sntp = best_of(
        3,
        |r: &NtpClientResult| r.delay_s.unwrap_or(f64::MAX),
        || sntp_query(listen.ip()).ok(),
    )
    .expect("sntp got a reply through the chain");
    assert!(
        sntp.offset_s.abs() < MAX_OFFSET_S,
        "sntp offset {} s:\n{}",
        sntp.offset_s,
        sntp.raw
    );
    assert!(
        sntp.delay_s.is_some_and(|d| d > 0.0 && d < 0.05),
        "{}",
        sntp.raw
    );
    // The requests really went through DTLS: the server relay has exactly one association,
    // made at start-up, not one per request (counted once it has exited: final).
    assert_eq!(server.daemon.count_after_exit("association established"), 1);
}

#[test]
fn chronyd_as_a_client_measures_through_the_chain_in_basic_and_interleaved_mode() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, &chronyd.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );

    let basic = chronyd_client_measure(client.addr, false).expect("chronyd -Q measured");
    assert!(
        basic.offset_s.abs() < MAX_OFFSET_S,
        "offset {}:\n{}",
        basic.offset_s,
        basic.raw
    );
    let xleave = chronyd_client_measure(client.addr, true).expect("chronyd -Q xleave measured");
    assert!(
        xleave.offset_s.abs() < MAX_OFFSET_S,
        "offset {}:\n{}",
        xleave.offset_s,
        xleave.raw
    );
    // Interleaved replies carry the request's receive field as origin: the relay matched them.
    assert!(
        xleave.samples.iter().any(|s| s.interleaved),
        "no interleaved sample came through:\n{}",
        xleave.raw
    );
    // Both measurements over the one association made at start-up (a final count).
    assert_eq!(server.daemon.count_after_exit("association established"), 1);
}

#[test]
fn fifty_concurrent_clients_on_fresh_ports_each_get_their_own_reply() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, &chronyd.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );

    // All 50 requests are in flight at once, each from its own socket with its own timestamp.
    let base = ntp_now();
    let sockets: Vec<(UdpSocket, u64)> = (0..50u64)
        .map(|i| {
            let socket = UdpSocket::bind(LOCAL_ANY).expect("bind");
            socket.connect(client.addr).expect("connect");
            // Distinct low bits, as real clients randomise them.
            let transmit = base + (i << 8) + 1;
            (socket, transmit)
        })
        .collect();
    for (socket, transmit) in &sockets {
        socket.send(&ntp_client_request(*transmit)).expect("send");
    }
    let mut answered = 0;
    let mut buf = [0u8; 2048];
    for (socket, transmit) in &sockets {
        socket
            .set_read_timeout(Some(Duration::from_secs(3)))
            .expect("timeout");
        let len = socket.recv(&mut buf).expect("every client gets a reply");
        let reply = parse_ntp(&buf[..len]).expect("an NTP reply");
        assert_eq!(reply.mode, 4);
        assert_eq!(
            reply.origin_ts, *transmit,
            "a reply was delivered to a client that did not ask for it"
        );
        answered += 1;
    }
    assert_eq!(answered, 50);
    // Exactly one reply each. A duplicate (the same reply delivered twice, or a second reply
    // from chronyd) would come through the same two relays a round trip behind the first, well
    // under a millisecond here; 200 ms after the last first reply leaves it room on a loaded
    // machine. Every socket has had at least that long since its own first reply by then, so
    // this is a silence window, not a wait for anything to happen.
    let quiet_until = Instant::now() + Duration::from_millis(200);
    for (i, (socket, _)) in sockets.iter().enumerate() {
        let left = quiet_until.saturating_duration_since(Instant::now());
        socket
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .expect("timeout");
        assert!(
            socket.recv(&mut buf).is_err(),
            "client {i}: a duplicate reply arrived"
        );
    }
    assert_eq!(server.daemon.count_after_exit("association established"), 1);
}

/// Busy polling keeps the server relay's loop reading its sockets after each forwarded request
/// and reply: with the widest window (10 ms) every request of a paced client is still answered,
/// and once the traffic stops the loop sleeps again. A loop that kept polling would spend the
/// whole idle second on the CPU; one that sleeps spends next to nothing.
#[test]
fn a_busy_polling_server_relay_answers_every_request_and_sleeps_once_traffic_stops() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(
        &pki,
        &chronyd.addr().to_string(),
        &["--busy-poll-us", "10000"],
    );
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );
    for i in 0..20 {
        assert!(
            ntp_query(client.addr, Duration::from_secs(2)).is_some(),
            "request {i} went unanswered"
        );
    }
    let pid = server.daemon.pid();
    let before = cpu_seconds(pid);
    // The measurement window: an idle second, after the last window of 10 ms has passed.
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_seconds(pid) - before;
    assert!(
        spent < 0.2,
        "the idle server relay spent {spent:.2} CPU-seconds in a second: it did not sleep"
    );
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());
}

fn mode_packet(mode: u8) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = (4 << 3) | mode;
    p
}

#[test]
fn control_and_private_mode_packets_never_reach_the_time_server() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, &upstream.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );

    // Through the client relay: it drops them itself.
    let socket = UdpSocket::bind(LOCAL_ANY).expect("bind");
    for mode in [6, 7, 0, 5] {
        socket
            .send_to(&mode_packet(mode), client.addr)
            .expect("send");
    }
    let sample = ntp_query(client.addr, Duration::from_secs(3)).expect("mode 3 still answered");
    assert_eq!(sample.reply.stratum, 2);

    // Straight into an association with the server relay: it drops them too.
    let mut dtls =
        DtlsTestClient::connect(server.addr, &pki.ca(), "localhost", None).expect("handshake");
    for mode in [6, 7] {
        dtls.send(&mode_packet(mode));
    }
    let mut short = ntp_client_request(ntp_now()).to_vec();
    short.truncate(47);
    dtls.send(&short);
    let transmit = ntp_now();
    dtls.send(&ntp_client_request(transmit));
    let reply = dtls
        .recv(Duration::from_secs(3))
        .expect("mode 3 answered in the association");
    assert_eq!(parse_ntp(&reply).map(|p| p.origin_ts), Some(transmit));
    assert!(
        dtls.recv(Duration::from_millis(200)).is_none(),
        "nothing answers a dropped packet"
    );

    // The time server saw exactly the two client-mode requests, nothing else.
    assert_eq!(
        upstream.datagrams(),
        2,
        "a non-client packet reached the time server"
    );
    assert_eq!(upstream.requests(), 2);
}

#[test]
fn a_client_relay_with_the_wrong_ca_never_forwards_a_reply_and_logs_the_refusal() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let pki = Pki::generate(&["localhost"]);
    let impostor = Pki::generate(&["localhost"]);
    let server = start_server(&impostor, &upstream.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );

    let refusal = client
        .daemon
        .wait_for_line("association refused", Duration::from_secs(5));
    assert!(refusal.contains("reason=unknown_ca"), "{refusal}");
    assert!(refusal.contains(&server.addr.to_string()), "{refusal}");
    // The client's fatal alert reaches the server relay, which audits it too.
    let seen = server
        .daemon
        .wait_for_line("association refused", Duration::from_secs(5));
    // rtc-dtls answers every failed verification with a bad_certificate alert.
    assert!(
        seen.contains("reason=peer_alert") && seen.contains("bad_certificate"),
        "{seen}"
    );
    assert!(client.daemon.count_lines("associations_up=0") == 1);
    assert!(ntp_query(client.addr, Duration::from_millis(500)).is_none());
    assert_eq!(
        upstream.datagrams(),
        0,
        "a request was forwarded to an untrusted server"
    );
}

#[test]
fn a_client_relay_expecting_another_name_never_forwards_a_reply_and_logs_the_refusal() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let pki = Pki::generate(&["time.example.net"]);
    let server = start_server(&pki, &upstream.addr().to_string(), &[]);
    // Default reference identifier: the host of --server, 127.0.0.1, which the cert lacks.
    let client = start_client(&pki.ca(), any_local(), server.addr, &[]);

    let refusal = client
        .daemon
        .wait_for_line("association refused", Duration::from_secs(5));
    assert!(refusal.contains("reason=name_mismatch"), "{refusal}");
    assert!(ntp_query(client.addr, Duration::from_millis(500)).is_none());
    assert_eq!(upstream.datagrams(), 0);
}

#[test]
fn mutual_authentication_refuses_a_client_without_a_certificate_and_accepts_one_with() {
    let upstream = FakeNtpServer::start(loopback_ip(1), 0.0);
    let pki = Pki::generate(&["localhost"]);
    let ca = pki.ca().display().to_string();
    let server = start_server(&pki, &upstream.addr().to_string(), &["--client-ca", &ca]);

    let anonymous = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );
    let refusal = server
        .daemon
        .wait_for_line("association refused", Duration::from_secs(5));
    assert!(
        refusal.contains("reason=no_client_certificate"),
        "{refusal}"
    );
    assert!(ntp_query(anonymous.addr, Duration::from_millis(500)).is_none());
    assert_eq!(upstream.datagrams(), 0);

    let mut args = vec!["--server-name".to_string(), "localhost".to_string()];
    args.extend(pki.client_identity());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let known = start_client(&pki.ca(), any_local(), server.addr, &args);
    let established = server
        .daemon
        .wait_for_line("association established", Duration::from_secs(5));
    assert!(
        established.contains("subject=CN=ntp-dtls-client"),
        "{established}"
    );
    let sample =
        ntp_query(known.addr, Duration::from_secs(3)).expect("authenticated client served");
    assert_eq!(sample.reply.stratum, 2);
}

#[test]
fn one_client_process_serves_three_independent_upstreams_from_a_config_file() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost", "127.0.0.1", "::1"]);
    let upstream = chronyd.addr().to_string();
    let v4 = start_server(&pki, &upstream, &[]);
    let v6 = common::relays::start_server_on(&pki, "[::1]:0".parse().expect("v6"), &upstream, &[]);
    let by_name = start_server(&pki, "builtin", &[]);
    let dir = TempDir::new();
    let config = dir.write(
        "client.toml",
        format!(
            "# three time sources, as NDcPP asks of a device\n\
             ca = \"{ca}\"\n\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"{v4}\"\n\n\
             [[tunnel]]\nlisten = \"[::1]:0\"\nserver = \"{v6}\"\n\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"localhost:{port}\"\n",
            ca = pki.ca().display(),
            v4 = v4.addr,
            v6 = v6.addr,
            port = by_name.addr.port(),
        ),
    );
    let client = spawn_ntp_dtls(
        "client-relay",
        &["client", "--config", &config.display().to_string()],
    );
    let listening = client.wait_ready(READY_TIMEOUT);
    assert_eq!(listening.len(), 3, "{listening:?}");
    assert!(
        client.count_lines("associations_up=3") == 1,
        "{}",
        client.tail(10)
    );
    for addr in &listening {
        let sample = best_of(
            3,
            |s: &NtpSample| s.delay_s,
            || ntp_query(*addr, Duration::from_secs(3)),
        )
        .unwrap_or_else(|| panic!("no reply through the tunnel on {addr}"));
        assert!(
            sample.offset_s.abs() < MAX_OFFSET_S,
            "{addr}: {}",
            sample.offset_s
        );
    }
    // Every query answered, not just one of a few: each tunnel keeps serving.
    for round in 0..5 {
        for addr in &listening {
            assert!(
                ntp_query(*addr, Duration::from_secs(3)).is_some(),
                "round {round}: no reply through {addr}\n{}",
                v6.daemon.tail(10)
            );
        }
    }
    // Each upstream saw its own association, and the builtin one answered by itself (counted
    // once each server relay has exited: final).
    for relay in [&v4, &v6, &by_name] {
        assert_eq!(
            relay.daemon.count_after_exit("association established"),
            1,
            "{}",
            relay.daemon.tail(10)
        );
    }
    assert!(matches!(listening[1].ip(), IpAddr::V6(_)));
}

#[test]
fn query_speaks_dtls_straight_to_a_server_relay() {
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, "builtin", &["--stratum", "3"]);
    let mut cmd = std::process::Command::new(ntp_dtls_bin());
    cmd.args(["query", "--dtls", "--ca"])
        .arg(pki.ca())
        .args([
            "--server-name",
            "localhost",
            "--count",
            "3",
            "--interval",
            "0",
        ])
        .arg(server.addr.to_string());
    let out = run_command(cmd, Duration::from_secs(30)).expect("query ran");
    assert!(out.status.success(), "{}", out.combined());
    assert_eq!(
        out.stdout.matches("stratum 3").count(),
        3,
        "{}",
        out.combined()
    );
    server
        .daemon
        .wait_for_line("association closed", Duration::from_secs(5));

    // The wrong CA: no reply, a non-zero exit and the reason.
    let other = Pki::generate(&["localhost"]);
    let mut cmd = std::process::Command::new(ntp_dtls_bin());
    cmd.args(["query", "--dtls", "--ca"])
        .arg(other.ca())
        .args(["--server-name", "localhost"])
        .arg(server.addr.to_string());
    let out = run_command(cmd, Duration::from_secs(30)).expect("query ran");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("not issued by a trusted CA"),
        "{}",
        out.combined()
    );
}

#[test]
fn query_exits_non_zero_when_nothing_answers() {
    let silent = UdpSocket::bind(LOCAL_ANY).expect("bind");
    let mut cmd = std::process::Command::new(ntp_dtls_bin());
    cmd.args(["query", "--timeout", "0.3"])
        .arg(silent.local_addr().expect("addr").to_string());
    let started = Instant::now();
    let out = run_command(cmd, Duration::from_secs(10)).expect("query ran");
    assert!(!out.status.success(), "{}", out.combined());
    assert!(out.stderr.contains("no reply"), "{}", out.combined());
    assert!(started.elapsed() < Duration::from_secs(5));
}
