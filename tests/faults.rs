//! Faults and floods against real processes on loopback: restarts, loss, spoofed handshakes,
//! garbage, a time server that goes away. Every loop is bounded in count and time.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::relays::{
    DtlsTestClient, LossyProxy, Pki, rss_kib, start_client, start_client_config, start_server,
    start_server_config, start_server_on,
};
use common::*;
use ntp_dtls::proto::engine::{DtlsEngine, Engine};

fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Queries every `every` until a reply arrives or `limit` passes; the time it took.
fn time_to_reply(addr: SocketAddr, every: Duration, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if ntp_query(addr, every).is_some() {
            return Some(start.elapsed());
        }
    }
    None
}

#[test]
fn a_killed_and_restarted_server_relay_serves_again_within_three_seconds() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let mut server = start_server(&pki, &chronyd.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(client.addr, Duration::from_secs(3)).is_some());

    server.daemon.kill();
    // While it is gone, requests go unanswered and the client relay notices.
    assert!(ntp_query(client.addr, Duration::from_millis(300)).is_none());
    let restarted = start_server_on(&pki, server.addr, &chronyd.addr().to_string(), &[]);
    let took = time_to_reply(
        client.addr,
        Duration::from_millis(200),
        Duration::from_secs(10),
    )
    .expect("replies flow again after the restart");
    eprintln!("replies flowed again {took:?} after the restarted server relay was ready");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(
        client.daemon.try_exit_status().is_none(),
        "the client relay kept running"
    );
    // One association, not one per retry: counted once the relay has exited and every line
    // it wrote has been read.
    let lines = restarted.daemon.terminate_and_drain();
    let established = lines
        .iter()
        .filter(|l| l.contains("association established"))
        .count();
    assert_eq!(established, 1, "{lines:#?}");
}

#[test]
fn thirty_percent_loss_both_ways_misroutes_and_duplicates_nothing() {
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, "builtin", &[]);
    let proxy = LossyProxy::start(server.addr, 0.30, 0x5eed);
    let dir = TempDir::new();
    let (client, listening) = start_client_config(
        &dir,
        &format!(
            "ca = \"{}\"\n# loss is expected here: do not give up on the association for it\n\
             dead_after_unanswered = 20\n\n[[tunnel]]\nlisten = \"127.0.0.1:0\"\n\
             server = \"{}\"\nserver_name = \"localhost\"\n",
            pki.ca().display(),
            proxy.addr()
        ),
    );
    client.wait_for_line("association established", Duration::from_secs(40));
    let relay = listening[0];

    let (mut sent, mut answered) = (0, 0);
    let base = ntp_now();
    for round in 0..10u64 {
        let sockets: Vec<(UdpSocket, u64)> = (0..10u64)
            .map(|i| {
                let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
                let transmit = base + ((round * 10 + i) << 12) + 7;
                socket
                    .send_to(&ntp_client_request(transmit), relay)
                    .expect("send");
                (socket, transmit)
            })
            .collect();
        sent += sockets.len();
        for (socket, transmit) in &sockets {
            socket
                .set_read_timeout(Some(Duration::from_millis(400)))
                .expect("timeout");
            let mut buf = [0u8; 2048];
            let mut replies = 0;
            while let Ok(len) = socket.recv(&mut buf) {
                let reply = parse_ntp(&buf[..len]).expect("NTP reply");
                assert_eq!(reply.origin_ts, *transmit, "misrouted reply");
                replies += 1;
                socket
                    .set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("timeout");
            }
            assert!(replies <= 1, "{replies} replies to one request");
            answered += replies;
        }
    }
    eprintln!("{answered} of {sent} answered through 30% loss each way");
    // Each exchange survives with probability 0.7 * 0.7 = 0.49.
    assert!(answered >= sent / 4, "only {answered} of {sent} answered");
}

/// The first flight of a real client: a ClientHello as a spoofer would replay it.
fn client_hello(pki: &Pki) -> Vec<u8> {
    let settings =
        ntp_dtls::config::client_settings("127.0.0.1:1", Some("localhost"), &pki.ca(), None, None)
            .expect("settings");
    let mut engine = Engine::client(&settings).expect("engine");
    engine
        .connect(Instant::now(), "127.0.0.1:1".parse().expect("addr"))
        .expect("connect");
    engine
        .poll_transmit()
        .expect("a ClientHello")
        .datagram
        .to_vec()
}

#[test]
fn a_flood_of_spoofed_handshakes_and_garbage_leaves_a_legitimate_client_served() {
    let pki = Pki::generate(&["localhost"]);
    let dir = TempDir::new();
    // Rate limits off, so the half-open table itself is what bounds the flood; short timeout,
    // so the memory comes back within the test.
    let mut server = start_server_config(
        &pki,
        &dir,
        "builtin",
        "[limits]\nhandshake_rate = 1000000\nhandshake_burst = 1000000\n\
         max_half_open = 500\nhandshake_timeout_secs = 2\n",
    );
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(client.addr, Duration::from_secs(3)).is_some());
    let pid = server.daemon.pid();
    let baseline = rss_kib(pid);

    // A legitimate client polls every 20 ms throughout.
    let flooding = Arc::new(AtomicBool::new(true));
    let (asked, answered, peak) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(baseline)),
    );
    let poller = {
        let (flooding, asked, answered, peak) = (
            flooding.clone(),
            asked.clone(),
            answered.clone(),
            peak.clone(),
        );
        let relay = client.addr;
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            while flooding.load(Ordering::Relaxed) && Instant::now() < deadline {
                asked.fetch_add(1, Ordering::Relaxed);
                if ntp_query(relay, Duration::from_millis(500)).is_some() {
                    answered.fetch_add(1, Ordering::Relaxed);
                }
                peak.fetch_max(rss_kib(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };

    let hello = client_hello(&pki);
    // Two identical floods, each followed by the handshake timeout: the second must find the
    // memory the first left (glibc keeps freed heap) and grow nothing.
    let mut rounds = Vec::new();
    for round in 0..2u64 {
        let started = Instant::now();
        flood(server.addr, &hello, 5_000, 50_000, 0x1234_5678 + round);
        let took = started.elapsed();
        let at_peak = peak.load(Ordering::Relaxed);
        std::thread::sleep(Duration::from_secs(3)); // past handshake_timeout_secs = 2
        rounds.push((took, at_peak, rss_kib(pid)));
    }
    flooding.store(false, Ordering::Relaxed);
    poller.join().expect("poller");

    let (asked, answered) = (
        asked.load(Ordering::Relaxed),
        answered.load(Ordering::Relaxed),
    );
    eprintln!(
        "legitimate client: {answered}/{asked} answered; server RSS baseline {baseline} KiB; \
         per round (flood time, peak KiB, after timeout KiB): {rounds:?}"
    );
    assert!(asked >= 10, "the poller barely ran");
    assert!(
        answered * 100 >= asked * 90,
        "the legitimate client lost replies: {answered}/{asked}"
    );
    let (first_peak, second_peak) = (rounds[0].1, rounds[1].1);
    // What bounds the flood's memory is the half-open table (max_half_open = 500 above). Here
    // (2026-12-02, 2-vCPU VM, three runs) the relay went from 9.3 MB to 11.5-11.6 MB, i.e.
    // +2.2 MiB for 500 pending handshakes; with the limit raised to 5 000 the same flood took
    // it to 29.6 MB (+20 MiB). So +8 MiB leaves room for allocator slack and a loaded machine
    // but fails if the table does not hold the flood to its limit.
    assert!(
        first_peak < baseline + 8 * 1024,
        "peak RSS {first_peak} KiB from {baseline} KiB: more than +8 MiB for 500 half-open \
         handshakes"
    );
    assert!(
        second_peak < first_peak + 4 * 1024,
        "a second flood grew RSS from {first_peak} to {second_peak} KiB: state is not freed"
    );
    assert!(client.daemon.try_exit_status().is_none());

    server.daemon.terminate();
    let stopped = server
        .daemon
        .wait_for_line("stopped", Duration::from_secs(5));
    for counter in [
        "drop_not_client_hello=",
        "drop_half_open_limit=",
        "handshake_timeouts=",
    ] {
        assert!(stopped.contains(counter), "{counter} missing in {stopped}");
    }
    // Spoofed ClientHellos time out silently; garbage that happens to pass for a ClientHello
    // is refused in the engine and audited, within the audit rate limit.
    let refusals = server.daemon.count_lines("association refused");
    assert!(refusals <= 250, "{refusals} refusal lines for a flood");
}

/// `hellos` copies of a real ClientHello, each from its own source port on 127.0.0.2-5, then
/// `garbage` random datagrams of every length up to 1500 bytes; bounded in time too.
fn flood(target: SocketAddr, hello: &[u8], hellos: u32, garbage: usize, seed: u64) {
    let started = Instant::now();
    for i in 0..hellos {
        let socket = UdpSocket::bind((loopback(2 + (i % 4) as u8), 0)).expect("bind spoofer");
        let _ = socket.send_to(hello, target);
    }
    let sockets: Vec<UdpSocket> = (0..8)
        .map(|i| UdpSocket::bind((loopback(6 + i), 0)).expect("bind"))
        .collect();
    let mut state = seed | 1;
    let mut buf = [0u8; 1500];
    for i in 0..garbage {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = (state % 1500) as usize;
        for (j, byte) in buf[..len].iter_mut().enumerate() {
            *byte = (state >> ((j % 8) * 8)) as u8 ^ j as u8;
        }
        // A third look like DTLS records at first glance.
        if i % 3 == 0 && len > 13 {
            buf[0] = 22 + (i % 3) as u8;
            buf[1] = 0xfe;
            buf[2] = 0xfd;
        }
        let _ = sockets[i % sockets.len()].send_to(&buf[..len], target);
        if started.elapsed() > Duration::from_secs(30) {
            break;
        }
    }
}

#[test]
fn a_client_that_comes_back_on_the_same_port_after_a_crash_is_served() {
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, "builtin", &[]);
    // From an address of its own (127.0.0.31), not 127.0.0.1: between the crash and the comeback
    // the port is free, and parallel tests binding 127.0.0.1:0 could take it (seen once in CI:
    // "Address already in use").
    let mut first = DtlsTestClient::connect_from(
        SocketAddr::new(loopback_ip(31), 0),
        server.addr,
        &pki.ca(),
        "localhost",
        None,
    )
    .expect("first");
    let local = first.local_addr();
    first.send(&ntp_client_request(ntp_now()));
    assert!(first.recv(Duration::from_secs(2)).is_some());
    drop(first); // a crash: no close_notify

    let mut second = DtlsTestClient::connect_from(local, server.addr, &pki.ca(), "localhost", None)
        .expect("a handshake from the same address and port succeeds");
    let transmit = ntp_now();
    second.send(&ntp_client_request(transmit));
    let reply = second.recv(Duration::from_secs(2)).expect("served");
    assert_eq!(parse_ntp(&reply).map(|p| p.origin_ts), Some(transmit));
    // Both handshakes from that address completed. The lines may trail the reply the test just
    // got (they go through a pipe): counted after the relay has exited and its output is read.
    let peer = local.to_string();
    let lines = server.daemon.terminate_and_drain();
    let established = lines
        .iter()
        .filter(|l| l.contains("association established") && l.contains(&peer))
        .count();
    assert_eq!(established, 2, "{lines:#?}");
}

#[test]
fn chronyd_stopped_and_started_again_under_the_relays() {
    let mut chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, &chronyd.addr().to_string(), &[]);
    let client = start_client(
        &pki.ca(),
        any_local(),
        server.addr,
        &["--server-name", "localhost"],
    );
    assert!(ntp_query(client.addr, Duration::from_secs(3)).is_some());

    chronyd.stop();
    for _ in 0..5 {
        assert!(ntp_query(client.addr, Duration::from_millis(200)).is_none());
    }
    assert!(
        server.daemon.try_exit_status().is_none(),
        "server relay survived"
    );
    assert!(
        client.daemon.try_exit_status().is_none(),
        "client relay survived"
    );

    chronyd.restart();
    let took = time_to_reply(
        client.addr,
        Duration::from_millis(300),
        Duration::from_secs(15),
    )
    .expect("replies flow again once chronyd is back");
    eprintln!("replies flowed again {took:?} after chronyd was back");
}

#[test]
fn rekeying_switches_associations_without_losing_a_request() {
    let pki = Pki::generate(&["localhost"]);
    let server = start_server(&pki, "builtin", &[]);
    let dir = TempDir::new();
    let (client, listening) = start_client_config(
        &dir,
        &format!(
            "ca = \"{}\"\nrekey_after_records = 5\n\n[[tunnel]]\nlisten = \"127.0.0.1:0\"\n\
             server = \"{}\"\nserver_name = \"localhost\"\n",
            pki.ca().display(),
            server.addr
        ),
    );
    let mut answered = 0;
    for _ in 0..30 {
        if ntp_query(listening[0], Duration::from_secs(2)).is_some() {
            answered += 1;
        }
    }
    assert_eq!(answered, 30, "a request was lost across a rekey");
    // 30 records with a limit of 5: at least one switch to a fresh association (requests keep
    // flowing on the old one while the next handshakes; log lines may trail the replies). A
    // rekey that fails is logged `association refused ... rekey=true`: only an established
    // one counts.
    let rekeyed = |l: &str| l.contains("association established") && l.contains("rekey=true");
    client.wait_until("a successful rekey", 0, Duration::from_secs(5), rekeyed);
    server
        .daemon
        .wait_for_count("association established", 2, Duration::from_secs(5));
    // A replaced association is closed once it has drained: it stays DRAIN (2 s,
    // proto/src/tunnel.rs) for replies still on their way, then the client relay sends
    // close_notify. Rekeys every 5 records come faster than that: a newer rekey closes the one
    // still draining at once (with close_notify too), so a tunnel never holds more than three
    // associations. The last one replaced drains the full 2 s: by the two relays' own log
    // timestamps (one clock), its close comes 2 s after the last rekey.
    let last_rekey = || {
        client
            .lines()
            .iter()
            .filter(|l| rekeyed(l))
            .map(|l| log_time(l))
            .fold(f64::MIN, f64::max)
    };
    // A close a second after the last rekey the client relay has logged: by then any rekey
    // before it has been logged too (the predicate reads the client's lines afresh).
    let (_, closed) = server.daemon.wait_until(
        "the last replaced association closed by close_notify",
        0,
        Duration::from_secs(10),
        |l| {
            l.contains("association closed")
                && l.contains("reason=peer sent close_notify")
                && log_time(l) > last_rekey() + 1.0
        },
    );
    let last_rekey = last_rekey();
    let drained = log_time(&closed) - last_rekey;
    eprintln!("the replaced association drained for {drained:.3} s");
    assert!(
        (1.95..4.0).contains(&drained),
        "closed {drained:.3} s after the last rekey, not after DRAIN (2 s):\n{closed}\n{}",
        client.tail(20)
    );
    // No rekey came after the one measured from.
    let after = client.terminate_and_drain();
    let latest = after
        .iter()
        .filter(|l| rekeyed(l))
        .map(|l| log_time(l))
        .fold(f64::MIN, f64::max);
    assert_eq!(
        latest, last_rekey,
        "a later rekey makes the measurement moot"
    );
}

/// Seconds since 1970 (UTC) of a text log line's timestamp (`2026-12-02T07:40:06.003725Z`).
fn log_time(line: &str) -> f64 {
    let stamp = line
        .split_whitespace()
        .find(|w| w.len() > 20 && w.ends_with('Z') && w.as_bytes()[10] == b'T')
        .unwrap_or_else(|| panic!("no timestamp in {line}"));
    let number = |range: std::ops::Range<usize>| -> f64 {
        stamp[range]
            .parse()
            .unwrap_or_else(|e| panic!("{stamp}: {e}"))
    };
    let (y, m, d) = (
        number(0..4) as i64,
        number(5..7) as i64,
        number(8..10) as i64,
    );
    // Days from civil (H. Hinnant's algorithm), exact for the proleptic Gregorian calendar.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    days as f64 * 86_400.0
        + number(11..13) * 3600.0
        + number(14..16) * 60.0
        + number(17..stamp.len() - 1)
}

#[test]
fn keepalives_keep_a_quiet_association_past_the_server_idle_timeout() {
    let pki = Pki::generate(&["localhost"]);
    let server_dir = TempDir::new();
    let server = start_server_config(
        &pki,
        &server_dir,
        "builtin",
        "[limits]\nidle_timeout_secs = 1.5\n",
    );
    let client_toml = |keepalive: f64| {
        format!(
            "ca = \"{}\"\nkeepalive_secs = {keepalive}\n\n[[tunnel]]\nlisten = \"127.0.0.1:0\"\n\
             server = \"{}\"\nserver_name = \"localhost\"\n",
            pki.ca().display(),
            server.addr
        )
    };
    // Without keepalives in time, the server closes the quiet association and the client
    // relay comes straight back.
    let lazy_dir = TempDir::new();
    let (lazy, _) = start_client_config(&lazy_dir, &client_toml(60.0));
    server
        .daemon
        .wait_for_line("reason=idle", Duration::from_secs(10));
    lazy.wait_for_line("association closed", Duration::from_secs(5));
    drop(lazy);

    let keen_dir = TempDir::new();
    let (keen, listening) = start_client_config(&keen_dir, &client_toml(0.5));
    // Quiet for twice the server's idle timeout: a timed behaviour, so the test waits. (The
    // killed lazy relay's last association idles out on the server meanwhile: judge the keen
    // relay by its own log.)
    std::thread::sleep(Duration::from_secs(3));
    assert!(ntp_query(listening[0], Duration::from_secs(2)).is_some());
    // Over its whole life (counted once it has exited and its output is read): one association,
    // closed only by the shutdown.
    let lines = keen.terminate_and_drain();
    let closed = lines
        .iter()
        .filter(|l| l.contains("association closed") && !l.contains("reason=shutdown"))
        .count();
    assert_eq!(closed, 0, "{lines:#?}");
    let established = lines
        .iter()
        .filter(|l| l.contains("association established"))
        .count();
    assert_eq!(established, 1, "{lines:#?}");
}
