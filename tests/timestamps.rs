//! The residence-time correction against real processes (docs/TIMESTAMPS.md): chronyd in
//! interleaved mode through the corrected chain, one device and two behind one server relay;
//! a reply with a MAC, from chronyd with a key file, delivered byte for byte as chronyd sent it;
//! a plain reply corrected (T2 earlier, T3 later, nothing else changed), its T3 from chronyd's
//! own transmit time (asked in its interleaved mode), or without it from a chronyd that does
//! not answer so; and `--no-timestamp-correction` delivering it untouched. Not a timing test: what is checked is
//! what the relays do to the packets, seen by a recording proxy in front of the time server.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::relays::{Pki, Relay, start_client, start_server};
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

/// `ntp_dtls_timestamps_total{result=..,reason=..}` of the relay serving metrics at `addr`.
fn timestamps(addr: &str, result: &str, reason: &str) -> f64 {
    metric(
        addr,
        &format!("ntp_dtls_timestamps_total{{result=\"{result}\",reason=\"{reason}\"}}"),
    )
}

/// Both relays with metrics, the server relay towards `upstream`; `extra` for both.
fn chain(pki: &Pki, upstream: SocketAddr, extra: &[&str]) -> (Relay, Relay) {
    let mut server_args = vec!["--metrics", "127.0.0.1:0"];
    server_args.extend_from_slice(extra);
    let server = start_server(pki, &upstream.to_string(), &server_args);
    let client = client_relay(pki, &server, extra);
    (server, client)
}

fn client_relay(pki: &Pki, server: &Relay, extra: &[&str]) -> Relay {
    let mut client_args = vec!["--server-name", "localhost", "--metrics", "127.0.0.1:0"];
    client_args.extend_from_slice(extra);
    start_client(&pki.ca(), any_local(), server.addr, &client_args)
}

/// A UDP proxy in front of the time server that keeps every reply the time server sent.
struct RecordingProxy {
    addr: SocketAddr,
    replies: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl RecordingProxy {
    fn start(target: SocketAddr) -> RecordingProxy {
        use std::sync::atomic::{AtomicBool, Ordering};
        let front = UdpSocket::bind("127.0.0.1:0").expect("proxy bind");
        let back = UdpSocket::bind("127.0.0.1:0").expect("proxy back bind");
        back.connect(target).expect("proxy connect");
        for s in [&front, &back] {
            s.set_read_timeout(Some(Duration::from_millis(2)))
                .expect("timeout");
        }
        let addr = front.local_addr().expect("addr");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (replies2, stop2) = (replies.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            let mut relay: Option<SocketAddr> = None;
            while !stop2.load(Ordering::Relaxed) {
                if let Ok((len, from)) = front.recv_from(&mut buf) {
                    relay = Some(from);
                    let _ = back.send(&buf[..len]);
                }
                if let Ok(len) = back.recv(&mut buf) {
                    if let Ok(mut r) = replies2.lock() {
                        r.push(buf[..len].to_vec());
                    }
                    if let Some(to) = relay {
                        let _ = front.send_to(&buf[..len], to);
                    }
                }
            }
        });
        RecordingProxy {
            addr,
            replies,
            stop,
            handle: Some(handle),
        }
    }

    /// The reply the time server sent with this origin timestamp.
    fn sent_with_origin(&self, origin: &[u8]) -> Vec<u8> {
        let replies = self.replies.lock().expect("replies");
        replies
            .iter()
            .find(|r| r.len() >= 48 && &r[24..32] == origin)
            .cloned()
            .unwrap_or_else(|| panic!("the time server sent no reply with origin {origin:02x?}"))
    }
}

impl Drop for RecordingProxy {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

const KEY: [u8; 16] = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15];
const KEY_ID: u32 = 1;

/// MD5(key || packet), as chronyd's symmetric keys compute a MAC, by `openssl dgst`.
fn md5(key: &[u8], packet: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut child = Command::new(tool("openssl"))
        .args(["dgst", "-md5", "-binary"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl runs");
    {
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(key).expect("write key");
        stdin.write_all(packet).expect("write packet");
    }
    let out = child.wait_with_output().expect("openssl finished");
    assert!(out.status.success() && out.stdout.len() == 16, "{out:?}");
    out.stdout
}

/// A client request with a fresh transmit timestamp, plain or with an MD5 MAC of key 1.
fn request(mac: bool) -> Vec<u8> {
    let mut p = ntp_client_request(ntp_now()).to_vec();
    if mac {
        let digest = md5(&KEY, &p);
        p.extend_from_slice(&KEY_ID.to_be_bytes());
        p.extend_from_slice(&digest);
    }
    p
}

/// Sends `request` to the client relay until a reply to it comes back (a few tries).
fn ask(client: SocketAddr, request: &[u8]) -> Vec<u8> {
    let socket = UdpSocket::bind("127.0.0.1:0").expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let deadline = Instant::now() + CLIENT_TIMEOUT;
    let mut buf = [0u8; 2048];
    while Instant::now() < deadline {
        socket.send_to(request, client).expect("send");
        while let Ok((len, _)) = socket.recv_from(&mut buf) {
            if len >= 48 && buf[24..32] == request[40..48] {
                return buf[..len].to_vec();
            }
        }
    }
    panic!("no reply through the chain within {CLIENT_TIMEOUT:?}");
}

fn ts(p: &[u8], off: usize) -> u64 {
    u64::from_be_bytes(p[off..off + 8].try_into().expect("8 bytes"))
}

#[test]
fn chronyd_in_xleave_logs_interleaved_samples_through_the_corrected_chain() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let (server, client) = chain(&pki, chronyd.addr(), &[]);
    let (server_metrics, client_metrics) =
        (metrics_addr(&server.daemon), metrics_addr(&client.daemon));

    let xleave = chronyd_client_measure(client.addr, true).expect("chronyd -Q xleave measured");
    assert!(
        xleave.samples.iter().any(|s| s.interleaved && s.valid),
        "no valid interleaved sample through the corrected chain:\n{}",
        xleave.raw
    );
    // And they were corrected, interleaved, by both relays (translated back on the way up).
    for (relay, metrics) in [("server", &server_metrics), ("client", &client_metrics)] {
        let corrected = timestamps(metrics, "corrected", "interleaved");
        assert!(corrected >= 1.0, "{relay} relay corrected {corrected}");
    }
}

#[test]
fn two_devices_behind_one_server_relay_both_get_interleaved_samples() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let pki = Pki::generate(&["localhost"]);
    let (server, first) = chain(&pki, chronyd.addr(), &[]);
    let second = client_relay(&pki, &server, &[]);
    let server_metrics = metrics_addr(&server.daemon);

    let devices: Vec<_> = [first.addr, second.addr]
        .into_iter()
        .map(|addr| std::thread::spawn(move || chronyd_client_measure(addr, true)))
        .collect();
    for (i, device) in devices.into_iter().enumerate() {
        let measured = device
            .join()
            .expect("device thread")
            .expect("chronyd -Q xleave measured");
        assert!(
            measured.samples.iter().any(|s| s.interleaved && s.valid),
            "device {i}: no valid interleaved sample:\n{}",
            measured.raw
        );
    }
    let corrected = timestamps(&server_metrics, "corrected", "interleaved");
    assert!(corrected >= 2.0, "server relay corrected {corrected}");
}

#[test]
fn a_reply_with_a_mac_comes_back_byte_for_byte_and_a_plain_one_is_corrected() {
    let dir = TempDir::new();
    let keys = dir.write(
        "chrony.keys",
        "1 MD5 HEX:000102030405060708090A0B0C0D0E0F\n",
    );
    let keyfile = format!("keyfile {}", keys.display());
    let chronyd = Chronyd::start_with(loopback_ip(1), &[&keyfile]);
    let proxy = RecordingProxy::start(chronyd.addr());
    let pki = Pki::generate(&["localhost"]);
    let (server, client) = chain(&pki, proxy.addr, &[]);
    let server_metrics = metrics_addr(&server.daemon);

    let asked = request(true);
    let delivered = ask(client.addr, &asked);
    let sent = proxy.sent_with_origin(&asked[40..48]);
    assert_eq!(sent.len(), 68, "chronyd answered with its MAC: {sent:02x?}");
    assert_eq!(&sent[48..52], &KEY_ID.to_be_bytes());
    assert_eq!(
        md5(&KEY, &sent[..48]),
        &sent[52..],
        "chronyd's MAC verifies"
    );
    assert_eq!(delivered, sent, "the reply with a MAC, byte for byte");
    assert!(timestamps(&server_metrics, "unchanged", "mac") >= 1.0);

    // The same chain corrects a plain reply: T2 earlier, T3 later, nothing else.
    let asked = request(false);
    let delivered = ask(client.addr, &asked);
    let sent = proxy.sent_with_origin(&asked[40..48]);
    assert_eq!(delivered.len(), 48);
    assert_eq!(&delivered[..32], &sent[..32]);
    let (t2_sent, t3_sent) = (ts(&sent, 32), ts(&sent, 40));
    let (t2, t3) = (ts(&delivered, 32), ts(&delivered, 40));
    assert!(
        t2 < t2_sent && t3 > t3_sent,
        "{delivered:02x?} vs {sent:02x?}"
    );
    assert!(t2 <= t3, "a corrected reply's T2 is no later than its T3");
    // Both relays' residences together stay far below a second.
    assert!(ntp_diff(t2_sent, t2) < 0.1 && ntp_diff(t3, t3_sent) < 0.1);
    let basic = timestamps(&server_metrics, "corrected", "basic")
        + timestamps(&server_metrics, "corrected", "basic_time_server_tx");
    assert!(basic >= 1.0, "server relay corrected {basic} basic replies");
}

/// `ntp_dtls_NAME_total` of the relay serving metrics at `addr`.
fn counter(addr: &str, name: &str) -> f64 {
    metric(addr, &format!("ntp_dtls_{name}_total "))
}

#[test]
fn a_basic_reply_leaves_with_its_real_transmit_times_asked_in_chronyds_interleaved_mode() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let proxy = RecordingProxy::start(chronyd.addr());
    let pki = Pki::generate(&["localhost"]);
    let (server, client) = chain(&pki, proxy.addr, &[]);
    let server_metrics = metrics_addr(&server.daemon);
    let client_metrics = metrics_addr(&client.daemon);

    let asked = request(false);
    let delivered = ask(client.addr, &asked);
    let sent = proxy.sent_with_origin(&asked[40..48]);
    let t3_sent = ts(&sent, 40);
    // The client relay asked, through the server relay and in chronyd's interleaved mode,
    // when that reply left: chronyd's answer carries its kernel transmit time, just after its
    // T3 (and the server relay adds the residence it measured).
    let answers = proxy.replies.lock().expect("replies").clone();
    let transmitted = answers
        .iter()
        .filter(|r| r.len() == 48 && r[24..32] != asked[40..48])
        .map(|r| ts(r, 40))
        .find(|&t| t > t3_sent && ntp_diff(t, t3_sent) < 0.01)
        .unwrap_or_else(|| panic!("chronyd gave no transmit time for {sent:02x?}: {answers:02x?}"));
    assert_eq!(&delivered[..32], &sent[..32], "only T2 and T3 differ");
    let t3 = ts(&delivered, 40);
    assert!(
        t3 > transmitted && ntp_diff(t3, transmitted) < 0.1,
        "T3 {t3:x} is the time server's transmit time {transmitted:x} plus the relays' residences"
    );
    assert_eq!(
        timestamps(&client_metrics, "corrected", "basic_time_server_tx"),
        1.0
    );
    assert_eq!(counter(&client_metrics, "time_server_tx_queries"), 1.0);
    assert_eq!(counter(&client_metrics, "time_server_tx_unavailable"), 0.0);
    // The server relay left the request the client relay had marked alone (no second
    // query), and translated the query's origin back to what chronyd sent.
    assert_eq!(counter(&server_metrics, "time_server_tx_queries"), 0.0);
    assert_eq!(timestamps(&server_metrics, "corrected", "interleaved"), 1.0);
}

#[test]
fn a_time_server_without_interleaved_answers_gets_its_basic_replies_corrected_as_before() {
    // Without its client log chronyd answers every request in basic mode.
    let chronyd = Chronyd::start_with(loopback_ip(1), &["noclientlog"]);
    let pki = Pki::generate(&["localhost"]);
    let (server, client) = chain(&pki, chronyd.addr(), &[]);
    let server_metrics = metrics_addr(&server.daemon);
    let client_metrics = metrics_addr(&client.daemon);
    let asked = request(false);
    let delivered = ask(client.addr, &asked);
    assert_eq!(delivered[24..32], asked[40..48], "the reply to our request");
    assert!(timestamps(&server_metrics, "corrected", "basic") >= 1.0);
    assert!(timestamps(&client_metrics, "corrected", "basic") >= 1.0);
    assert_eq!(
        timestamps(&client_metrics, "corrected", "basic_time_server_tx"),
        0.0
    );
    assert!(counter(&client_metrics, "time_server_tx_unavailable") >= 1.0);
}

#[test]
fn no_timestamp_correction_leaves_the_reply_as_the_time_server_sent_it() {
    let chronyd = Chronyd::start(loopback_ip(1));
    let proxy = RecordingProxy::start(chronyd.addr());
    let pki = Pki::generate(&["localhost"]);
    let (server, client) = chain(&pki, proxy.addr, &["--no-timestamp-correction"]);
    let (server_metrics, client_metrics) =
        (metrics_addr(&server.daemon), metrics_addr(&client.daemon));
    let asked = request(false);
    let delivered = ask(client.addr, &asked);
    assert_eq!(delivered, proxy.sent_with_origin(&asked[40..48]));
    for metrics in [&server_metrics, &client_metrics] {
        assert!(timestamps(metrics, "unchanged", "disabled") >= 1.0);
        assert_eq!(timestamps(metrics, "corrected", "basic"), 0.0);
    }
}
