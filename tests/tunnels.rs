//! The client relay's tunnels against real processes: names looked up each time an association
//! is made and every address tried, one bad tunnel stopping no other, and a time server down
//! behind a healthy association costing no handshake.
//!
//! Name resolution runs against a hosts file this test controls: the client relay runs in a
//! mount namespace of its own (`unshare --mount`) with the file bound over /etc/hosts, so the
//! machine's resolver configuration is neither used nor touched. That needs root; so does CI.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::relays::{Pki, Relay, start_client, start_server};
use common::*;

/// `ntp-dtls ARGS` in a mount namespace where /etc/hosts is `hosts`. None when not root (the
/// caller skips; under CI=true that is a failure).
fn client_with_hosts(hosts: &Path, args: &[String]) -> Option<Daemon> {
    if !is_root() {
        assert!(
            std::env::var_os("CI").is_none(),
            "tests/tunnels.rs needs root for its mount namespace, and CI runs as root"
        );
        eprintln!("not root: skipped (needs a mount namespace for its own /etc/hosts)");
        return None;
    }
    let mut cmd = Command::new(tool("unshare"));
    cmd.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg("mount --bind \"$0\" /etc/hosts && exec \"$@\"")
        .arg(hosts)
        .arg(ntp_dtls_bin())
        .args(args);
    Some(Daemon::spawn_command("client-relay", cmd))
}

/// The value of the first sample of `name` whose labels contain every one of `labels`, from
/// the Prometheus text at the relay's `--metrics` address.
fn gauge(daemon: &Daemon, name: &str, labels: &[&str]) -> f64 {
    let ready = daemon.wait_for_line(" ready ", READY_TIMEOUT);
    let addr = find_field(&ready, "metrics").expect("metrics= in the ready line");
    let text = metrics_text(addr);
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|label| l.contains(label)))
        .find_map(|l| l.rsplit(' ').next().and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("{name} {labels:?} not in:\n{text}"))
}

fn query_within(addr: SocketAddr, deadline: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < deadline {
        if ntp_query(addr, Duration::from_millis(300)).is_some() {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
fn a_name_is_tried_at_every_address_it_resolves_to_in_order() {
    let pki = Pki::generate(&["localhost"]);
    // The server relay listens on 127.0.0.1 only; the name resolves to ::1 first, as glibc
    // orders `localhost` on a stock hosts file.
    let server = start_server(&pki, "builtin", &[]);
    let dir = TempDir::new();
    let hosts = dir.write("hosts", "::1 relay.test\n127.0.0.1 relay.test\n");
    let args: Vec<String> = [
        "client",
        "--listen",
        "127.0.0.1:0",
        "--server",
        &format!("relay.test:{}", server.addr.port()),
        "--server-name",
        "localhost",
        "--ca",
        &pki.ca().display().to_string(),
        "--log-level",
        "debug",
    ]
    .map(String::from)
    .to_vec();
    let Some(client) = client_with_hosts(&hosts, &args) else {
        return;
    };
    let listening = client.wait_ready(READY_TIMEOUT);
    assert!(
        ntp_query(listening[0], Duration::from_secs(2)).is_some(),
        "served through the second address"
    );
    let lines = client.lines();
    let resolved = lines
        .iter()
        .find(|l| l.contains("server name resolved"))
        .expect("a lookup");
    assert!(
        resolved.contains(&format!(
            "addresses=[::1]:{port},127.0.0.1:{port}",
            port = server.addr.port()
        )),
        "{resolved}"
    );
    let first = lines
        .iter()
        .position(|l| l.contains("association refused") && l.contains("server=[::1]"))
        .unwrap_or_else(|| panic!("::1 tried and refused first:\n{}", client.tail(20)));
    let second = lines
        .iter()
        .position(|l| l.contains("association established") && l.contains("server=127.0.0.1"))
        .expect("then 127.0.0.1");
    assert!(first < second);
}

#[test]
fn one_unresolvable_tunnel_stops_no_other_and_is_picked_up_once_it_resolves() {
    let pki = Pki::generate(&["localhost"]);
    let one = start_server(&pki, "builtin", &[]);
    let two = start_server(&pki, "builtin", &[]);
    let late = start_server(&pki, "builtin", &[]);
    let dir = TempDir::new();
    let hosts = dir.write("hosts", "127.0.0.1 localhost\n");
    let config = dir.write(
        "client.toml",
        format!(
            "ca = \"{ca}\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"{one}\"\nserver_name = \"localhost\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"{two}\"\nserver_name = \"localhost\"\n\
             [[tunnel]]\nlisten = \"127.0.0.1:0\"\nserver = \"late.test:{port}\"\n\
             server_name = \"localhost\"\n",
            ca = pki.ca().display(),
            one = one.addr,
            two = two.addr,
            port = late.addr.port()
        ),
    );
    let args: Vec<String> = ["client", "--config", &config.display().to_string()]
        .map(String::from)
        .to_vec();
    let Some(client) = client_with_hosts(&hosts, &args) else {
        return;
    };
    let listening = client.wait_ready(READY_TIMEOUT);
    let ready = client.wait_for_line(" ready ", Duration::from_secs(1));
    assert!(ready.contains("associations_up=2"), "{ready}");
    let warning = client.wait_for_line("server name does not resolve", Duration::from_secs(5));
    assert!(
        warning.contains("WARN") && warning.contains("tunnel=tunnel 3"),
        "{warning}"
    );
    for addr in &listening[..2] {
        assert!(ntp_query(*addr, Duration::from_secs(2)).is_some(), "{addr}");
    }
    assert!(ntp_query(listening[2], Duration::from_millis(500)).is_none());

    // The record appears: written in place, so the bind mount sees it.
    std::fs::write(&hosts, "127.0.0.1 localhost\n127.0.0.1 late.test\n").expect("hosts");
    let took = query_within(listening[2], Duration::from_secs(20))
        .unwrap_or_else(|| panic!("tunnel 3 never came up:\n{}", client.tail(20)));
    eprintln!("tunnel 3 answered {took:?} after its name resolved");
    client.wait_until("tunnel 3 established", 0, Duration::from_secs(5), |l| {
        l.contains("association established") && l.contains("tunnel=tunnel 3")
    });
    // The first two never missed a beat.
    for addr in &listening[..2] {
        assert!(ntp_query(*addr, Duration::from_secs(2)).is_some(), "{addr}");
    }
    assert_eq!(
        client.count_lines("association established"),
        3,
        "one association each:\n{}",
        client.tail(20)
    );
}

#[test]
fn a_time_server_down_behind_the_server_relay_costs_no_handshake() {
    let mut chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let server: Relay = start_server(
        &pki,
        &chronyd.addr().to_string(),
        &["--metrics", "127.0.0.1:0"],
    );
    let client = start_client(
        &pki.ca(),
        "127.0.0.1:0".parse().expect("addr"),
        server.addr,
        &["--server-name", "localhost", "--metrics", "127.0.0.1:0"],
    );
    assert!(ntp_query(client.addr, Duration::from_secs(2)).is_some());

    chronyd.stop();
    // The device keeps polling; the server relay says its time server is down, the client
    // relay that the server relay answers and its time server does not.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut said = false;
    while Instant::now() < deadline && !said {
        let _ = ntp_query(client.addr, Duration::from_millis(300));
        said = client
            .daemon
            .lines()
            .iter()
            .any(|l| l.contains("its time server does not"));
    }
    assert!(said, "no upstream-down line:\n{}", client.daemon.tail(20));
    let down = server
        .daemon
        .wait_for_line("time server down", Duration::from_secs(5));
    assert!(down.contains("WARN"), "{down}");
    let device = client
        .daemon
        .wait_for_line("its time server does not", Duration::from_secs(1));
    assert!(
        device.contains("WARN") && device.contains("state=upstream_down"),
        "{device}"
    );
    // And so do the gauges: the device's tunnel is upstream_down (not up, not connecting),
    // the server relay's upstream is down.
    let state = |s: &str| {
        gauge(
            &client.daemon,
            "ntp_dtls_tunnel_state",
            &[&format!("state=\"{s}\"")],
        )
    };
    assert_eq!(
        (state("upstream_down"), state("up"), state("connecting")),
        (1.0, 0.0, 0.0)
    );
    assert_eq!(gauge(&server.daemon, "ntp_dtls_upstream_up", &[]), 0.0);

    chronyd.restart();
    let took = query_within(client.addr, Duration::from_secs(15)).expect("replies again");
    eprintln!("replies again {took:?} after chronyd was back");
    server
        .daemon
        .wait_for_line("time server answers again", Duration::from_secs(5));
    client
        .daemon
        .wait_for_line("answers again", Duration::from_secs(5));
    assert_eq!(state("up"), 1.0);
    assert_eq!(gauge(&server.daemon, "ntp_dtls_upstream_up", &[]), 1.0);
    // One association from start to end, on both sides.
    let lines = client.daemon.terminate_and_drain();
    let established = lines
        .iter()
        .filter(|l| l.contains("association established"))
        .count();
    let closed_dead = lines
        .iter()
        .filter(|l| l.contains("association closed") && l.contains("reason=dead"))
        .count();
    assert_eq!((established, closed_dead), (1, 0), "{lines:#?}");
}
