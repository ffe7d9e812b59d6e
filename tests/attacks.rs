//! Attacks from unauthenticated senders (issue 10) replayed against the real relays, with a
//! legitimate client polling through the chain (chronyd -x behind the server relay) the whole
//! time. Each test asserts what must hold: the relays' CPU time over the attack stays within a
//! budget, every legitimate reply arrives without a clock error, no association is torn down
//! (logs), RSS stays bounded, and an address that never proved itself never receives more bytes
//! than it sent. Every flood is bounded in count and in time.
//!
//! Spoofing another host's address (the client relay's upstream socket toward the server relay,
//! the server relay toward the client relay) and forging ICMP need raw sockets: those tests run
//! as root (CI does) and skip with a message otherwise.

mod common;

use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::relays::{Pki, Relay, cpu_seconds, rss_kib, start_client, start_server};
use common::*;
use ntp_dtls::proto::engine::{DtlsEngine, Engine};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// CPU seconds either relay may spend over one attack (a debug build, on a machine other
/// builds load). Before the fixes one fragment chain alone cost 0.76 s of a release build's
/// CPU; the attacks below send 20 of them.
const CPU_BUDGET_S: f64 = 3.0;
/// RSS either relay may grow by over one attack. Before the fixes 90 000 zero-length fragments
/// grew the server relay by 6.4 MB.
const RSS_BUDGET_KIB: u64 = 4 * 1024;
/// The legitimate client's clock error through the chain: loopback, so anything near the
/// 0.17 s the fragment chains caused is the attack's doing.
const OFFSET_LIMIT_S: f64 = 0.05;

fn any_local() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// chronyd -x, a server relay in front of it, a client relay towards that, one association up.
struct Chain {
    _chronyd: Chronyd,
    _pki: Pki,
    server: Relay,
    client: Relay,
    /// The client relay's upstream socket, as the server relay saw it.
    device: SocketAddr,
}

impl Chain {
    fn start() -> Chain {
        let chronyd = Chronyd::start(loopback_ip(1));
        let pki = Pki::generate(&["localhost"]);
        let server = start_server(&pki, &chronyd.addr().to_string(), &[]);
        let client = start_client(
            &pki.ca(),
            any_local(),
            server.addr,
            &["--server-name", "localhost"],
        );
        assert!(
            wait_ntp_answers(client.addr, Duration::from_secs(10)).is_some(),
            "no reply through the chain before the attack"
        );
        let line = server
            .daemon
            .wait_for_line("association established", Duration::from_secs(5));
        let device = find_field(&line, "peer")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no peer= in {line}"));
        Chain {
            _chronyd: chronyd,
            _pki: pki,
            server,
            client,
            device,
        }
    }

    fn snapshot(&self) -> Usage {
        let (s, c) = (self.server.daemon.pid(), self.client.daemon.pid());
        Usage {
            cpu: [cpu_seconds(s), cpu_seconds(c)],
            rss: [rss_kib(s), rss_kib(c)],
        }
    }

    /// Both relays' `stopped` lines (their counters), after a clean stop.
    fn stop(mut self) -> (String, String) {
        self.client.daemon.terminate();
        self.server.daemon.terminate();
        let client = self
            .client
            .daemon
            .wait_for_line("stopped", Duration::from_secs(5));
        let server = self
            .server
            .daemon
            .wait_for_line("stopped", Duration::from_secs(5));
        (server, client)
    }
}

#[derive(Debug, Clone, Copy)]
struct Usage {
    cpu: [f64; 2],
    rss: [u64; 2],
}

/// What the legitimate client saw: one NTP exchange through the chain every 50 ms.
#[derive(Debug, Default)]
struct Polls {
    asked: u32,
    answered: u32,
    delays: Vec<f64>,
    offsets: Vec<f64>,
}

impl Polls {
    fn p50_delay(&self) -> f64 {
        let mut d = self.delays.clone();
        d.sort_by(f64::total_cmp);
        d.get(d.len() / 2).copied().unwrap_or(f64::NAN)
    }
    fn max_delay(&self) -> f64 {
        self.delays.iter().copied().fold(0.0, f64::max)
    }
    fn max_offset(&self) -> f64 {
        self.offsets.iter().map(|o| o.abs()).fold(0.0, f64::max)
    }
}

/// Runs `attack` while a legitimate client polls the client relay; the usage before and after.
fn under_attack(chain: &Chain, attack: impl FnOnce()) -> (Polls, Usage, Usage) {
    let polls = Arc::new(Mutex::new(Polls::default()));
    let running = Arc::new(AtomicBool::new(true));
    let before = chain.snapshot();
    let poller = {
        let (polls, running, relay) = (polls.clone(), running.clone(), chain.client.addr);
        thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(90);
            while running.load(Ordering::Relaxed) && Instant::now() < deadline {
                let sample = ntp_query(relay, Duration::from_secs(2));
                if let Ok(mut p) = polls.lock() {
                    p.asked += 1;
                    if let Some(s) = sample {
                        p.answered += 1;
                        p.delays.push(s.delay_s);
                        p.offsets.push(s.offset_s);
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    attack();
    // One more second of polling after the last forged datagram: queued work shows here.
    thread::sleep(Duration::from_secs(1));
    running.store(false, Ordering::Relaxed);
    poller.join().expect("poller");
    let after = chain.snapshot();
    let polls = std::mem::take(&mut *polls.lock().expect("polls"));
    (polls, before, after)
}

/// The assertions every attack shares.
fn assert_unharmed(chain: &Chain, what: &str, polls: &Polls, before: Usage, after: Usage) {
    let cpu = [after.cpu[0] - before.cpu[0], after.cpu[1] - before.cpu[1]];
    let rss = [
        after.rss[0].saturating_sub(before.rss[0]),
        after.rss[1].saturating_sub(before.rss[1]),
    ];
    eprintln!(
        "{what}: legitimate {}/{} answered, delay p50 {:.1} ms max {:.1} ms, max |offset| \
         {:.1} ms; CPU server {:.2} s client {:.2} s; RSS growth server {} KiB client {} KiB",
        polls.answered,
        polls.asked,
        polls.p50_delay() * 1e3,
        polls.max_delay() * 1e3,
        polls.max_offset() * 1e3,
        cpu[0],
        cpu[1],
        rss[0],
        rss[1]
    );
    assert!(polls.asked >= 10, "{what}: the poller barely ran");
    assert_eq!(
        polls.answered, polls.asked,
        "{what}: legitimate requests went unanswered"
    );
    assert!(
        polls.max_offset() < OFFSET_LIMIT_S,
        "{what}: the legitimate client saw a clock error of {:.3} s",
        polls.max_offset()
    );
    for (relay, spent) in ["server", "client"].iter().zip(cpu) {
        assert!(
            spent < CPU_BUDGET_S,
            "{what}: the {relay} relay spent {spent:.2} CPU-seconds (budget {CPU_BUDGET_S})"
        );
    }
    for (relay, grew) in ["server", "client"].iter().zip(rss) {
        assert!(
            grew < RSS_BUDGET_KIB,
            "{what}: the {relay} relay's RSS grew by {grew} KiB"
        );
    }
    for (daemon, relay) in [
        (&chain.server.daemon, "server"),
        (&chain.client.daemon, "client"),
    ] {
        assert_eq!(
            daemon.count_lines("association closed"),
            0,
            "{what}: the {relay} relay tore an association down:\n{}",
            daemon.tail(20)
        );
    }
    assert_eq!(
        chain.client.daemon.count_lines("association established"),
        1,
        "{what}: the client relay made another association:\n{}",
        chain.client.daemon.tail(20)
    );
}

/// The counter `name` in a `stopped` line (`counters="a=1 b=2"`), 0 when absent.
fn counter(stopped: &str, name: &str) -> u64 {
    stopped
        .split(|c: char| c.is_whitespace() || c == '"')
        .map(|kv| kv.strip_prefix("counters=").unwrap_or(kv))
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

// ---- hand-made DTLS records -----------------------------------------------------------------

/// A DTLS 1.2 record in `epoch` around `body`.
fn record(content_type: u8, epoch: u16, seq: u64, body: &[u8]) -> Vec<u8> {
    let mut out = vec![content_type, 0xfe, 0xfd];
    out.extend_from_slice(&epoch.to_be_bytes());
    out.extend_from_slice(&seq.to_be_bytes()[2..]);
    out.extend_from_slice(&(body.len() as u16).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// A handshake fragment header and `data` bytes.
fn fragment(msg_type: u8, length: u32, message_seq: u16, offset: u32, data: usize) -> Vec<u8> {
    let mut out = vec![msg_type];
    out.extend_from_slice(&length.to_be_bytes()[1..]);
    out.extend_from_slice(&message_seq.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes()[1..]);
    out.extend_from_slice(&(data as u32).to_be_bytes()[1..]);
    out.extend(std::iter::repeat_n(0x41, data));
    out
}

/// A real first ClientHello of our client engine.
fn client_hello(pki_ca: &std::path::Path) -> Vec<u8> {
    let settings =
        ntp_dtls::config::client_settings("127.0.0.1:1", Some("localhost"), pki_ca, None, None)
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

/// Sends `datagrams` through `send`, `per_tick` every 10 ms (a rate, not a burst the socket
/// buffers would drop), stopping after `limit`.
fn paced(datagrams: &[Vec<u8>], per_tick: usize, limit: Duration, mut send: impl FnMut(&[u8])) {
    let started = Instant::now();
    for (i, batch) in datagrams.chunks(per_tick.max(1)).enumerate() {
        if started.elapsed() > limit {
            break;
        }
        for datagram in batch {
            send(datagram);
        }
        let next = started + Duration::from_millis(10 * (i as u64 + 1));
        thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

// ---- raw sockets (root) ---------------------------------------------------------------------

/// A raw IPv4 socket whose datagrams carry our own IP header (IPPROTO_RAW), or None (with a
/// message) when not permitted.
fn raw_ip_socket(test: &str) -> Option<Socket> {
    if !is_root() {
        eprintln!("SKIP {test}: spoofing a source address needs a raw socket (run as root)");
        return None;
    }
    match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(255))) {
        Ok(socket) => Some(socket),
        Err(e) => {
            eprintln!("SKIP {test}: no raw socket ({e})");
            None
        }
    }
}

fn checksum(bytes: &[u8]) -> u16 {
    let mut sum = 0u32;
    for pair in bytes.chunks(2) {
        let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(a) => a,
        SocketAddr::V6(_) => panic!("IPv4 only: {addr}"),
    }
}

/// An IPv4 header (checksum included) and a UDP header (checksum 0: none, allowed in IPv4)
/// for `payload_len` bytes from `from` to `to`.
fn ip_udp_header(from: SocketAddrV4, to: SocketAddrV4, payload_len: usize) -> Vec<u8> {
    let total = (20 + 8 + payload_len) as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
    ip[2..4].copy_from_slice(&total.to_be_bytes());
    ip.extend_from_slice(&from.ip().octets());
    ip.extend_from_slice(&to.ip().octets());
    let sum = checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&from.port().to_be_bytes());
    ip.extend_from_slice(&to.port().to_be_bytes());
    ip.extend_from_slice(&((8 + payload_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0, 0]);
    ip
}

/// A UDP datagram from `from` (any address: spoofed) to `to`, through a raw IP socket.
fn send_spoofed(raw: &Socket, from: SocketAddr, to: SocketAddr, payload: &[u8]) {
    let (from, to) = (v4(from), v4(to));
    let mut packet = ip_udp_header(from, to, payload.len());
    packet.extend_from_slice(payload);
    let _ = raw.send_to(&packet, &SockAddr::from(to));
}

// ---- the attacks ----------------------------------------------------------------------------

#[test]
fn fragment_chains_before_the_cookie_cost_nothing() {
    let chain = Chain::start();
    // The finding: chains of 2 500 one-byte fragments of a claimed 60 000-byte ClientHello at
    // ascending offsets, four chains a second from varied addresses, here for five seconds.
    let chains: Vec<Vec<u8>> = (0..2_500u32)
        .map(|offset| record(22, 0, u64::from(offset), &fragment(1, 60_000, 0, offset, 1)))
        .collect();
    let sockets: Vec<UdpSocket> = (0..4)
        .map(|i| UdpSocket::bind((loopback(2 + i), 0)).expect("bind attacker"))
        .collect();
    let target = chain.server.addr;
    let (polls, before, after) = under_attack(&chain, || {
        for round in 0..20usize {
            let socket = &sockets[round % sockets.len()];
            // 2 500 datagrams in 250 ms: 100 every 10 ms.
            paced(&chains, 100, Duration::from_secs(1), |d| {
                let _ = socket.send_to(d, target);
            });
        }
    });
    assert_unharmed(&chain, "fragment chains", &polls, before, after);
    let (server, _) = chain.stop();
    let refused = counter(&server, "drop_fragmented_client_hello");
    assert!(
        refused >= 40_000,
        "{refused} fragments refused of 50 000: {server}"
    );
    assert_eq!(counter(&server, "associations_refused"), 0, "{server}");
}

/// The forged datagrams of finding 2: Certificate fragment chains packed 150 to a datagram
/// (77 datagrams of 2 kB), then 90 000 zero-length fragments, 100 to a datagram.
fn epoch0_flood() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for d in 0..77u32 {
        let body: Vec<u8> = (0..150u32)
            .flat_map(|i| fragment(11, 60_000, 2, d * 150 + i, 1))
            .collect();
        out.push(record(22, 0, 1_000 + u64::from(d), &body));
    }
    for d in 0..900u64 {
        let body: Vec<u8> = (0..100).flat_map(|_| fragment(16, 66, 3, 0, 0)).collect();
        out.push(record(22, 0, 2_000 + d, &body));
    }
    out
}

#[test]
fn forged_epoch0_fragments_toward_either_relay_cost_nothing() {
    let test = "forged_epoch0_fragments_toward_either_relay_cost_nothing";
    let Some(raw) = raw_ip_socket(test) else {
        return;
    };
    let chain = Chain::start();
    let flood = epoch0_flood();
    let (device, server) = (chain.device, chain.server.addr);
    let (polls, before, after) = under_attack(&chain, || {
        // From the device's address to the server relay, and from the server relay's address
        // to the device's upstream socket (which froze the whole client relay before).
        paced(&flood, 50, Duration::from_secs(10), |d| {
            send_spoofed(&raw, device, server, d);
            send_spoofed(&raw, server, device, d);
        });
    });
    assert_unharmed(&chain, "forged epoch-0 fragments", &polls, before, after);
    let (server, client) = chain.stop();
    for (relay, stopped) in [("server", &server), ("client", &client)] {
        let refused = counter(stopped, "drop_late_handshake")
            + counter(stopped, "drop_late_handshake_rate")
            + counter(stopped, "drop_empty_fragment");
        // Every one that arrived (loopback may drop a few from a full socket buffer).
        let sent = flood.len() as u64;
        assert!(
            refused * 10 >= sent * 9 && refused <= sent,
            "the {relay} relay refused {refused} of {sent} forged datagrams: {stopped}"
        );
    }
}

#[test]
fn forged_port_unreachables_tear_no_association_down() {
    let test = "forged_port_unreachables_tear_no_association_down";
    if !is_root() {
        eprintln!("SKIP {test}: forging ICMP needs a raw socket (run as root)");
        return;
    }
    let icmp = match Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4)) {
        Ok(socket) => socket,
        Err(e) => {
            eprintln!("SKIP {test}: no raw ICMP socket ({e})");
            return;
        }
    };
    let chain = Chain::start();
    let (device, server) = (v4(chain.device), v4(chain.server.addr));
    // Port unreachable (type 3, code 3) quoting a datagram the device's socket sent.
    let mut message = vec![3, 3, 0, 0, 0, 0, 0, 0];
    message.extend(ip_udp_header(device, server, 48));
    let sum = checksum(&message);
    message[2..4].copy_from_slice(&sum.to_be_bytes());
    let to = SockAddr::from(SocketAddrV4::new(*device.ip(), 0));
    let (polls, before, after) = under_attack(&chain, || {
        // One, then a sweep's worth at this port: 20 a second for 5 s.
        let _ = icmp.send_to(&message, &to);
        thread::sleep(Duration::from_millis(500));
        for _ in 0..100 {
            let _ = icmp.send_to(&message, &to);
            thread::sleep(Duration::from_millis(50));
        }
    });
    assert_unharmed(&chain, "forged ICMP", &polls, before, after);
    let (_, client) = chain.stop();
    let seen = counter(&client, "upstream_unreachable");
    assert!(
        seen >= 50,
        "the client relay saw {seen} of 101 forged ICMP errors (did they arrive?): {client}"
    );
}

#[test]
fn an_unproven_address_never_receives_more_than_it_sent() {
    let chain = Chain::start();
    let capture = UdpSocket::bind((loopback(9), 0)).expect("bind capture socket");
    let target = chain.server.addr;
    let hello = client_hello(&chain._pki.ca());
    let mut bytes_in = 0usize;
    let (mut bytes_out, mut datagrams_out) = (0usize, 0usize);
    let mut drain = |capture: &UdpSocket, wait: Duration| {
        let deadline = Instant::now() + wait;
        let mut buf = [0u8; 2048];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            let _ = capture.set_read_timeout(Some(left));
            match capture.recv(&mut buf) {
                Ok(n) => {
                    bytes_out += n;
                    datagrams_out += 1;
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return;
                }
                Err(_) => return,
            }
        }
    };
    let (polls, before, after) = under_attack(&chain, || {
        capture.send_to(&hello, target).expect("send ClientHello");
        bytes_in += hello.len();
        // The finding: 26-byte ClientHello fragments with message_seq 1, each of which drew
        // another 48-byte HelloVerifyRequest. 200 of them, 20 a second.
        for i in 0..200u64 {
            let piece = record(22, 0, 10 + i, &fragment(1, 200, 1, 0, 1));
            bytes_in += piece.len();
            let _ = capture.send_to(&piece, target);
            drain(&capture, Duration::from_millis(50));
        }
        drain(&capture, Duration::from_secs(3));
    });
    assert_unharmed(&chain, "amplification", &polls, before, after);
    eprintln!(
        "unproven address: {bytes_in} bytes in, {bytes_out} bytes in {datagrams_out} datagrams out"
    );
    assert_eq!(
        datagrams_out, 1,
        "one HelloVerifyRequest for one ClientHello"
    );
    assert!(
        bytes_out <= bytes_in,
        "{bytes_out} bytes out for {bytes_in} in"
    );
    let (server, _) = chain.stop();
    // A small ClientHello may come in a few fragments: 16 per message are taken (rtc-dtls
    // answers each with a HelloVerifyRequest, which `drop_amplification` holds back), the
    // rest refused.
    assert!(
        counter(&server, "drop_handshake_fragments") >= 150,
        "{server}"
    );
}

#[test]
fn requests_the_time_server_ignores_cost_no_handshake() {
    let chain = Chain::start();
    let local = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let relay = chain.client.addr;
    // The finding: three 49-byte mode-3 requests every 1.5 s (forwarded; chronyd ignores a
    // length that is no multiple of 4), here for 9 s with nobody else asking...
    let odd = |n: u64| {
        let mut request = ntp_client_request(ntp_now().wrapping_add(n)).to_vec();
        request.push(0);
        request
    };
    let send_odd = |rounds: u64| {
        for round in 0..rounds {
            for i in 0..3 {
                let _ = local.send_to(&odd(round * 3 + i), relay);
            }
            thread::sleep(Duration::from_millis(1500));
        }
    };
    send_odd(6);
    assert_eq!(
        chain.client.daemon.count_lines("association established"),
        1,
        "the client relay made another association:\n{}",
        chain.client.daemon.tail(20)
    );
    // ...and then beside a legitimate client.
    let (polls, before, after) = under_attack(&chain, || send_odd(6));
    assert_unharmed(&chain, "unanswerable requests", &polls, before, after);
}
