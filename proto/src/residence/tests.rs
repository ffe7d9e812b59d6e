use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::*;
use crate::forward::Forward;
use crate::ntp::{HEADER_LEN, NtpTimestamp, Rewritten, check_reply, correct_reply, ntp_units};
use crate::stats::{RttGauge, Stats};

fn ts(secs: u32, frac: u32) -> NtpTimestamp {
    NtpTimestamp::from_parts(secs, frac)
}

fn reply(receive: NtpTimestamp, transmit: NtpTimestamp) -> [u8; 48] {
    let mut p = [0u8; 48];
    p[0] = (4 << 3) | 4;
    p[1] = 2;
    p[24..32].copy_from_slice(&0x1234_5678_9abc_def0u64.to_be_bytes());
    p[32..40].copy_from_slice(&receive.0.to_be_bytes());
    p[40..48].copy_from_slice(&transmit.0.to_be_bytes());
    p
}

#[test]
fn durations_become_ntp_units_rounded() {
    assert_eq!(ntp_units(Duration::from_secs(1)), 1 << 32);
    assert_eq!(ntp_units(Duration::from_millis(500)), 1 << 31);
    assert_eq!(ntp_units(Duration::ZERO), 0);
    // 1 ns is 4.29 units, 1 us 4294.97.
    assert_eq!(ntp_units(Duration::from_nanos(1)), 4);
    assert_eq!(ntp_units(Duration::from_micros(1)), 4295);
    assert_eq!(ntp_units(Duration::new(2, 999_999_999)), (3 << 32) - 4);
    assert_eq!(ntp_units(Duration::MAX), u64::MAX);
}

#[test]
fn the_rewrite_borrows_and_carries_across_seconds_and_eras() {
    let us = Duration::from_micros(1);
    // The receive fraction borrows from the seconds; the transmit fraction carries into them.
    let mut p = reply(ts(100, 0x0000_0011), ts(100, 0xFFFF_FF00));
    let r = correct_reply(&mut p, us, us).expect("a header");
    assert_eq!(r.receive_before, ts(100, 0x11));
    assert_eq!(r.receive_after, ts(99, 0xFFFF_EF4B));
    assert_eq!(r.transmit_after, ts(101, 0x0000_0FC6));
    let v = check_reply(&p).expect("still a reply");
    assert_eq!((v.receive, v.transmit), (r.receive_after, r.transmit_after));
    assert_eq!(v.origin.0, 0x1234_5678_9abc_def0, "origin untouched");
    // Across the era boundary (2036): seconds wrap modulo 2^32 both ways.
    let mut p = reply(ts(0, 0x1001), ts(u32::MAX, 0xFFFF_F000));
    let r = correct_reply(&mut p, Duration::from_millis(1), Duration::from_millis(1)).unwrap();
    assert_eq!(r.receive_after.seconds(), u32::MAX);
    assert_eq!(r.transmit_after.seconds(), 0);
    assert!((r.receive_before.diff_seconds(r.receive_after) - 0.001).abs() < 1e-9);
    assert!((r.transmit_after.diff_seconds(r.transmit_before) - 0.001).abs() < 1e-9);
}

#[test]
fn the_rewrite_keeps_chronyds_lowest_bit_flags() {
    // chronyd sets the lowest bit of its receive timestamps and clears it in its transmit
    // timestamps; it recognises an interleaved request by that bit in the origin.
    for residence in [1u64, 2, 3, 4295, 999_999] {
        let d = Duration::from_nanos(residence);
        let mut p = reply(ts(7, 0x8000_0001), ts(7, 0x8000_1000));
        let r = correct_reply(&mut p, d, d).unwrap();
        assert_eq!(r.receive_after.0 & 1, 1, "{residence}");
        assert_eq!(r.transmit_after.0 & 1, 0, "{residence}");
        let moved = r.receive_before.0 - r.receive_after.0;
        assert!(moved.abs_diff(ntp_units(d)) <= 1, "{residence}");
    }
}

#[test]
fn only_a_plain_v3_or_v4_server_reply_is_rewritable() {
    let good = reply(ts(5, 1), ts(5, 2));
    assert_eq!(ntp::rewritable_reply(&good), Ok(()));
    let mut v3 = good;
    v3[0] = (3 << 3) | 4;
    assert_eq!(ntp::rewritable_reply(&v3), Ok(()));
    for (what, change) in [
        ("version 2", (0usize, (2u8 << 3) | 4)),
        ("kiss-o'-death", (1, 0)),
        ("client mode", (0, (4 << 3) | 3)),
    ] {
        let mut p = good;
        p[change.0] = change.1;
        assert_eq!(
            ntp::rewritable_reply(&p),
            Err(NotRewritable::NotPlain),
            "{what}"
        );
    }
    let zero_transmit = reply(ts(5, 1), NtpTimestamp::ZERO);
    assert_eq!(
        ntp::rewritable_reply(&zero_transmit),
        Err(NotRewritable::NotPlain)
    );
    // A symmetric-key MAC: key ID and an MD5 (16) or SHA-1 (20) digest.
    for mac in [20usize, 24] {
        let mut p = good.to_vec();
        p.extend_from_slice(&1u32.to_be_bytes());
        p.extend(std::iter::repeat_n(0xA5, mac - 4));
        assert_eq!(ntp::rewritable_reply(&p), Err(NotRewritable::Mac), "{mac}");
    }
    // Anything else after the header is treated as a MAC too.
    let mut odd = good.to_vec();
    odd.extend_from_slice(&[1, 2, 3]);
    assert_eq!(ntp::rewritable_reply(&odd), Err(NotRewritable::Mac));
    // An extension field (type, length 16, body), alone or with a MAC behind it.
    let mut ef = good.to_vec();
    ef.extend_from_slice(&[0x01, 0x04, 0x00, 0x10]);
    ef.extend_from_slice(&[0; 12]);
    assert_eq!(
        ntp::rewritable_reply(&ef),
        Err(NotRewritable::ExtensionFields)
    );
    ef.extend_from_slice(&[0; 24]);
    assert_eq!(
        ntp::rewritable_reply(&ef),
        Err(NotRewritable::ExtensionFields)
    );
}

#[test]
fn residences_are_believed_between_zero_and_one_second() {
    let t = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
    assert_eq!(residence(t, t), Ok(Duration::ZERO));
    assert_eq!(
        residence(t, t + Duration::from_micros(30)),
        Ok(Duration::from_micros(30))
    );
    assert_eq!(residence(t, t + MAX_RESIDENCE), Ok(MAX_RESIDENCE));
    assert_eq!(
        residence(t, t + MAX_RESIDENCE + Duration::from_nanos(1)),
        Err(Unchanged::LargeResidence)
    );
    assert_eq!(
        residence(t, t - Duration::from_nanos(1)),
        Err(Unchanged::NegativeResidence)
    );
}

#[test]
fn a_reply_is_corrected_whole_or_left_alone() {
    let us = |n| Ok(Duration::from_micros(n));
    let original = reply(ts(9, 0x1000_0001), ts(9, 0x2000_0000));
    let cases = [
        (us(1), Err(Unchanged::NegativeResidence), None),
        (Err(Unchanged::LargeResidence), us(1), None),
        (Err(Unchanged::UnknownResidence), us(1), None),
        (us(1), us(1), Some(Err(Unchanged::UnknownResidence))),
    ];
    for (request, reply_residence, interleaved_previous) in cases {
        let mut p = original;
        let residences = Residences {
            request,
            reply: reply_residence,
            interleaved_previous,
            time_server_lag: None,
        };
        assert!(correct(&mut p, &residences).is_err(), "{residences:?}");
        assert_eq!(p, original, "{residences:?}");
    }
    // An interleaved reply's transmit gets the previous reply's residence, not this one's.
    let mut p = original;
    let c = correct(
        &mut p,
        &Residences {
            request: us(10),
            reply: us(500),
            interleaved_previous: Some(us(3)),
            time_server_lag: None,
        },
    )
    .unwrap();
    assert_eq!(c.kind, Corrected::Interleaved);
    let Rewritten {
        receive_before,
        receive_after,
        transmit_before,
        transmit_after,
        ..
    } = c.rewritten;
    assert!((receive_before.diff_seconds(receive_after) - 10e-6).abs() < 1e-9);
    assert!((transmit_after.diff_seconds(transmit_before) - 3e-6).abs() < 1e-9);
}

#[test]
fn a_time_servers_own_send_lag_moves_a_basic_replys_transmit_timestamp_with_its_residence() {
    use crate::time_server_tx::Shift;
    let us = |n| Duration::from_micros(n);
    let original = reply(ts(9, 0x1000_0001), ts(9, 0x2000_0000));
    // Request residence 10 us, reply residence 20 us; the shift the answer gave.
    let correct_with = |interleaved_previous: Option<u64>, shift| {
        let mut p = original;
        correct(
            &mut p,
            &Residences {
                request: Ok(us(10)),
                reply: Ok(us(20)),
                interleaved_previous: interleaved_previous.map(|n| Ok(us(n))),
                time_server_lag: Some(shift),
            },
        )
    };
    let t3_moved = |c: &Correction| {
        c.rewritten
            .transmit_after
            .diff_seconds(c.rewritten.transmit_before)
    };
    let c = correct_with(None, Shift::Later(us(12))).unwrap();
    assert_eq!(c.kind, Corrected::TimeServerTx);
    let r = c.rewritten;
    assert!((r.receive_before.diff_seconds(r.receive_after) - 10e-6).abs() < 1e-9);
    assert!((t3_moved(&c) - 32e-6).abs() < 1e-9);
    // Behind a server relay whose predicted departure was 5 us late: T3 moves 5 us less.
    let c = correct_with(None, Shift::Earlier(us(5))).unwrap();
    assert!((t3_moved(&c) - 15e-6).abs() < 1e-9);
    // Never to a negative residence: the reply passes as it came.
    assert_eq!(
        correct_with(None, Shift::Earlier(us(25))).unwrap_err(),
        Unchanged::NegativeResidence
    );
    // An interleaved reply's T3 is already the time server's transmit time: no lag added.
    let c = correct_with(Some(3), Shift::Later(us(12))).unwrap();
    assert_eq!(c.kind, Corrected::Interleaved);
    assert!((t3_moved(&c) - 3e-6).abs() < 1e-9);
}

#[test]
fn translations_are_bounded_by_count_and_age() {
    let t0 = Instant::now();
    let tr = |n: u64| Translation {
        original: NtpTimestamp(n + 1000),
        reply_residence: Duration::from_nanos(n),
    };
    let mut t = Translations::new(3, Duration::from_secs(10));
    for n in 1..=4u64 {
        t.insert(t0, NtpTimestamp(n), tr(n));
    }
    assert_eq!(t.len(), 3);
    assert_eq!(t.get(t0, NtpTimestamp(1)), None, "the oldest went");
    assert_eq!(t.get(t0, NtpTimestamp(2)), Some(tr(2)));
    assert_eq!(
        t.get(t0, NtpTimestamp(2)),
        Some(tr(2)),
        "a lookup does not consume"
    );
    assert_eq!(t.get(t0, NtpTimestamp::ZERO), None);
    // Written again later: the newer one lives on when the older slot expires.
    t.insert(t0 + Duration::from_secs(5), NtpTimestamp(3), tr(30));
    assert_eq!(t.get(t0 + Duration::from_secs(10), NtpTimestamp(2)), None);
    assert_eq!(
        t.get(t0 + Duration::from_secs(10), NtpTimestamp(3)),
        Some(tr(30))
    );
    assert_eq!(t.get(t0 + Duration::from_secs(15), NtpTimestamp(3)), None);
    assert!(t.is_empty());
}

// ---------------------------------------------------------------------------------------------
// Through two relays: a chronyd-like client and time server, simulated time
// ---------------------------------------------------------------------------------------------

/// Nanoseconds of true time since the start of a run.
type Ns = i64;

/// A node's clock: true time plus its offset, from a base instant.
#[derive(Clone, Copy)]
struct Clock {
    base: SystemTime,
    offset: Ns,
}

impl Clock {
    fn wall(&self, t: Ns) -> SystemTime {
        let at = t + self.offset;
        if at >= 0 {
            self.base + Duration::from_nanos(at as u64)
        } else {
            self.base - Duration::from_nanos(at.unsigned_abs())
        }
    }

    fn ntp(&self, t: Ns) -> NtpTimestamp {
        NtpTimestamp::from_system_time(self.wall(t))
    }
}

fn get_ts(p: &[u8], off: usize) -> NtpTimestamp {
    let mut b = [0u8; 8];
    b.copy_from_slice(&p[off..off + 8]);
    NtpTimestamp(u64::from_be_bytes(b))
}

fn put_ts(p: &mut [u8], off: usize, t: NtpTimestamp) {
    p[off..off + 8].copy_from_slice(&t.0.to_be_bytes());
}

/// chronyd as a time server (ntp_core.c, NCR_ProcessRxUnknown and transmit_packet): receive
/// timestamps flagged with the lowest bit; a v4 request whose origin has it, whose receive and
/// transmit differ and whose origin is a receive timestamp it remembers, is answered in
/// interleaved mode, once.
struct TimeServer {
    clock: Clock,
    /// receive timestamp -> transmit time of the reply to that request.
    sent: Vec<(NtpTimestamp, NtpTimestamp)>,
}

impl TimeServer {
    fn answer(&mut self, request: &[u8; 48], rx: Ns, tx: Ns) -> [u8; 48] {
        let origin = get_ts(request, 24);
        let receive_field = get_ts(request, 32);
        let transmit_field = get_ts(request, 40);
        let received = NtpTimestamp(self.clock.ntp(rx).0 | 1);
        let sent_at = NtpTimestamp(self.clock.ntp(tx).0 & !1);
        let previous = (origin.0 & 1 == 1 && receive_field != transmit_field)
            .then(|| self.sent.iter().position(|(r, _)| *r == origin))
            .flatten()
            .map(|i| self.sent.remove(i).1);
        let mut p = [0u8; 48];
        p[0] = (4 << 3) | 4;
        p[1] = 1;
        match previous {
            Some(previous_tx) => {
                put_ts(&mut p, 24, receive_field);
                put_ts(&mut p, 40, previous_tx);
            }
            None => {
                put_ts(&mut p, 24, transmit_field);
                put_ts(&mut p, 40, sent_at);
            }
        }
        put_ts(&mut p, 32, received);
        self.sent.push((received, sent_at));
        p
    }
}

/// One offset and delay, as chronyd computes them ((T2+T3)/2 - (T1+T4)/2, |(T4-T1)-(T3-T2)|).
#[derive(Debug, Clone, Copy)]
struct Measured {
    interleaved: bool,
    offset: f64,
    delay: f64,
}

fn measure(
    interleaved: bool,
    t1: NtpTimestamp,
    t2: NtpTimestamp,
    t3: NtpTimestamp,
    t4: NtpTimestamp,
) -> Measured {
    let s = ntp::sample(t1, t2, t3, t4);
    Measured {
        interleaved,
        offset: s.offset,
        delay: s.delay.abs(),
    }
}

/// chronyd as a client with `xleave` (ntp_core.c, transmit_packet and process_response): the
/// request's origin is the previous reply's receive timestamp and its receive field the
/// client's own receive time of that reply; a reply whose origin is that receive field is
/// interleaved, and both of chronyd's choices of timestamps are measured.
#[derive(Default)]
struct Client {
    xleave: bool,
    local_ntp_tx: NtpTimestamp,
    local_ntp_rx: NtpTimestamp,
    remote_ntp_rx: NtpTimestamp,
    local_tx: Option<NtpTimestamp>,
    prev_local_tx: Option<NtpTimestamp>,
    local_rx: Option<NtpTimestamp>,
}

impl Client {
    fn request(&mut self, clock: &Clock, at: Ns) -> [u8; 48] {
        let tx = clock.ntp(at);
        let mut p = ntp::build_request(tx);
        if self.xleave && !self.remote_ntp_rx.is_zero() {
            put_ts(&mut p, 24, self.remote_ntp_rx);
            put_ts(&mut p, 32, self.local_ntp_rx);
        }
        self.prev_local_tx = self.local_tx;
        self.local_tx = Some(tx);
        self.local_ntp_tx = tx;
        p
    }

    /// What the client measures from `reply` received at `at`: the basic sample, or both
    /// interleaved variants.
    fn reply(&mut self, clock: &Clock, reply: &[u8; 48], at: Ns) -> Vec<Measured> {
        let rx = clock.ntp(at);
        let (origin, t2, t3) = (get_ts(reply, 24), get_ts(reply, 32), get_ts(reply, 40));
        let mut out = Vec::new();
        if origin == self.local_ntp_tx {
            out.push(measure(false, self.local_ntp_tx, t2, t3, rx));
        } else if self.xleave && origin == self.local_ntp_rx {
            let (Some(local_tx), Some(local_rx)) = (self.local_tx, self.local_rx) else {
                panic!("interleaved reply without a previous exchange");
            };
            if let Some(prev_tx) = self.prev_local_tx {
                out.push(measure(true, prev_tx, self.remote_ntp_rx, t3, local_rx));
            }
            out.push(measure(true, local_tx, t2, t3, local_rx));
        } else {
            panic!("reply matches no request of this client");
        }
        self.remote_ntp_rx = t2;
        self.local_ntp_rx = rx;
        self.local_rx = Some(rx);
        out
    }
}

/// One hop's residences and the network after it, per exchange, in ns.
#[derive(Debug, Clone, Copy)]
struct Timing {
    /// client -> client relay -> server relay -> time server, and back.
    network: [Ns; 6],
    /// client relay request, server relay request, server relay reply, client relay reply.
    residence: [Ns; 4],
    processing: Ns,
}

/// What each relay reported.
#[derive(Default)]
struct Recorder {
    outcomes: Mutex<Vec<Outcome>>,
    residences: Mutex<Vec<(Direction, f64)>>,
}

impl Observer for Recorder {
    fn residence(&self, direction: Direction, seconds: f64) {
        if let Ok(mut r) = self.residences.lock() {
            r.push((direction, seconds));
        }
    }
    fn outcome(&self, outcome: Outcome) {
        if let Ok(mut o) = self.outcomes.lock() {
            o.push(outcome);
        }
    }
}

impl Recorder {
    fn count(&self, outcome: Outcome) -> usize {
        self.outcomes
            .lock()
            .map(|o| o.iter().filter(|x| **x == outcome).count())
            .unwrap_or(0)
    }
}

fn relay(correction: bool) -> (Forward<u16>, Arc<Recorder>) {
    let mut f = Forward::new(
        64,
        Duration::from_secs(2),
        Arc::new(Stats::default()),
        Arc::new(RttGauge::default()),
    );
    f.set_correction(correction);
    let recorder = Arc::new(Recorder::default());
    f.set_observer(recorder.clone());
    (f, recorder)
}

struct Chain {
    clients: Vec<(Client, Clock, Forward<u16>, Clock)>,
    client_relays: Vec<Arc<Recorder>>,
    server_relay: Forward<u16>,
    server_relay_clock: Clock,
    server_relay_recorder: Arc<Recorder>,
    server: TimeServer,
    t0: Instant,
}

impl Chain {
    /// `devices` chronyd clients, each behind its own client relay, all behind one server
    /// relay; every clock off the truth by its own amount. `base` is where true time 0 is.
    fn new(devices: usize, xleave: bool, correction: bool, base: SystemTime) -> Chain {
        let clock = |offset: Ns| Clock { base, offset };
        let mut clients = Vec::new();
        let mut client_relays = Vec::new();
        for i in 0..devices as Ns {
            let (f, recorder) = relay(correction);
            client_relays.push(recorder);
            clients.push((
                Client {
                    xleave,
                    ..Client::default()
                },
                clock(-3_000_000 + i * 777_777),
                f,
                clock(250_000_000 - i * 1_234_567),
            ));
        }
        let (server_relay, server_relay_recorder) = relay(correction);
        Chain {
            clients,
            client_relays,
            server_relay,
            server_relay_clock: clock(-40_000_000),
            server_relay_recorder,
            server: TimeServer {
                clock: clock(1_500_000),
                sent: Vec::new(),
            },
            t0: Instant::now(),
        }
    }

    /// One exchange of device `d` starting at true time `start`; what its client measured.
    fn exchange(&mut self, d: usize, start: Ns, timing: &Timing) -> Vec<Measured> {
        let at = |t: Ns| self.t0 + Duration::from_nanos(t as u64);
        let [n0, n1, n2, n3, n4, n5] = timing.network;
        let [q1, q2, p2, p1] = timing.residence;
        let sr_clock = self.server_relay_clock;
        let (client, client_clock, cr, cr_clock) = &mut self.clients[d];
        let mut q = client.request(client_clock, start);
        // Client relay: in, out.
        let t = start + n0;
        let view = cr
            .request(at(t), cr_clock.wall(t), 7, &mut q)
            .expect("client relay forwards");
        let t = t + q1;
        cr.request_sent(at(t), cr_clock.wall(t), view.transmit.0);
        // Server relay: in, out.
        let t = t + n1;
        let view = self
            .server_relay
            .request(at(t), sr_clock.wall(t), d as u16, &mut q)
            .expect("server relay forwards");
        let t = t + q2;
        self.server_relay
            .request_sent(at(t), sr_clock.wall(t), view.transmit.0);
        // The time server.
        let t = t + n2;
        let mut r = self.server.answer(&q, t, t + timing.processing);
        let t = t + timing.processing + n3;
        // Server relay: in, out.
        let route = self
            .server_relay
            .reply(at(t), sr_clock.wall(t), &mut r)
            .expect("server relay routes");
        assert_eq!(route.to, d as u16);
        let t = t + p2;
        self.server_relay
            .reply_sent(at(t), sr_clock.wall(t), &mut r, &route.stamp);
        // Client relay: in, out.
        let t = t + n4;
        let route = cr
            .reply(at(t), cr_clock.wall(t), &mut r)
            .expect("client relay routes");
        let t = t + p1;
        cr.reply_sent(at(t), cr_clock.wall(t), &mut r, &route.stamp);
        client.reply(client_clock, &r, t + n5)
    }
}

/// Exchanges with residences of either sign of asymmetry (request side longer, reply side
/// longer, one relay slow and the other fast) and changing network delays.
fn timings() -> Vec<Timing> {
    let us = 1_000;
    let residences = [
        [300 * us, 20 * us, 5 * us, 40 * us],
        [5 * us, 2 * us, 250 * us, 80 * us],
        [0, 700 * us, 0, 3 * us],
        [12 * us, 13 * us, 11 * us, 14 * us],
        [1, 999_999, 777 * us, 2],
        [80 * us, 0, 900 * us, 0],
    ];
    (0..18)
        .map(|i| Timing {
            network: [
                10 * us + i * 100,
                35 * us,
                7 * us + (i % 3) * 1_000,
                7 * us,
                33 * us + (i % 2) * 5 * us,
                9 * us,
            ],
            residence: residences[i as usize % residences.len()],
            processing: 25 * us + i * 10,
        })
        .collect()
}

/// Every client measurement of a run; residences zeroed give "the wire at the relay".
fn run(devices: usize, xleave: bool, correction: bool, zero: bool, base: SystemTime) -> Chain {
    let mut chain = Chain::new(devices, xleave, correction, base);
    let mut results = Vec::new();
    for (k, timing) in timings().into_iter().enumerate() {
        let mut timing = timing;
        if zero {
            timing.residence = [0; 4];
        }
        for d in 0..devices {
            // A second apart per exchange: the client polls.
            let start = (k as Ns) * 1_000_000_000 + d as Ns * 3_000_000;
            results.push(chain.exchange(d, start, &timing));
        }
    }
    MEASURED.with_borrow_mut(|m| *m = results);
    chain
}

thread_local! {
    static MEASURED: std::cell::RefCell<Vec<Vec<Measured>>> = const { std::cell::RefCell::new(Vec::new()) };
}

fn measured() -> Vec<Vec<Measured>> {
    MEASURED.with_borrow(|m| m.clone())
}

/// The corrected chain measures what the chain with instant relays measures, sample by sample;
/// the uncorrected chain does not (so the comparison can fail).
fn assert_corrected_equals_wire(devices: usize, xleave: bool, base: SystemTime) {
    let corrected_chain = run(devices, xleave, true, false, base);
    let corrected = measured();
    run(devices, xleave, true, true, base);
    let wire = measured();
    run(devices, xleave, false, false, base);
    let uncorrected = measured();
    assert_eq!(corrected.len(), wire.len());
    let mut interleaved = 0;
    let mut worst_uncorrected: f64 = 0.0;
    for (k, ((c, w), u)) in corrected.iter().zip(&wire).zip(&uncorrected).enumerate() {
        assert_eq!(c.len(), w.len(), "exchange {k}: same kind of sample");
        for ((c, w), u) in c.iter().zip(w).zip(u) {
            assert_eq!(c.interleaved, w.interleaved, "exchange {k}");
            interleaved += usize::from(c.interleaved);
            // A few NTP units (0.23 ns each) of rounding per timestamp.
            assert!(
                (c.offset - w.offset).abs() < 5e-9,
                "exchange {k}: offset {c:?} vs wire {w:?}"
            );
            assert!(
                (c.delay - w.delay).abs() < 5e-9,
                "exchange {k}: delay {c:?} vs wire {w:?}"
            );
            worst_uncorrected = worst_uncorrected.max((u.offset - w.offset).abs());
        }
    }
    assert!(
        worst_uncorrected > 100e-6,
        "the residences must matter uncorrected: {worst_uncorrected}"
    );
    let exchanges = timings().len() * devices;
    if xleave {
        // The first two exchanges of each client are basic (nothing to echo yet, then the
        // time server has no transmit time for the echoed receive timestamp).
        assert!(
            interleaved >= exchanges - 2 * devices,
            "interleaved samples: {interleaved} of {exchanges}"
        );
        let sr = &corrected_chain.server_relay_recorder;
        assert!(sr.count(Outcome::Corrected(Corrected::Interleaved)) >= exchanges - 2 * devices);
        for cr in &corrected_chain.client_relays {
            assert!(cr.count(Outcome::Corrected(Corrected::Interleaved)) >= timings().len() - 2);
        }
    } else {
        assert_eq!(interleaved, 0);
        assert_eq!(
            corrected_chain
                .server_relay_recorder
                .count(Outcome::Corrected(Corrected::Basic)),
            exchanges
        );
    }
    // Every reply of the corrected run was corrected by both relays.
    let sr = &corrected_chain.server_relay_recorder;
    assert_eq!(
        sr.count(Outcome::Corrected(Corrected::Basic))
            + sr.count(Outcome::Corrected(Corrected::Interleaved)),
        exchanges
    );
    let observed = sr.residences.lock().map(|r| r.len()).unwrap_or(0);
    assert_eq!(observed, 2 * exchanges, "both directions observed");
}

fn base() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

#[test]
fn basic_exchanges_through_two_relays_measure_as_at_the_wire() {
    assert_corrected_equals_wire(1, false, base());
}

#[test]
fn interleaved_exchanges_through_two_relays_measure_as_at_the_wire() {
    assert_corrected_equals_wire(1, true, base());
}

#[test]
fn two_devices_behind_one_server_relay_each_measure_as_at_the_wire() {
    assert_corrected_equals_wire(2, true, base());
    assert_corrected_equals_wire(3, false, base());
}

#[test]
fn the_correction_holds_across_the_ntp_era_boundary() {
    // 2036-02-07T06:28:16Z, the start of NTP era 1, falls in the middle of the run.
    let era1 = UNIX_EPOCH + Duration::from_secs(2_085_978_496);
    assert_corrected_equals_wire(1, true, era1 - Duration::from_secs(9));
    assert_corrected_equals_wire(2, false, era1 - Duration::from_secs(9));
}

#[test]
fn without_translation_the_time_server_answers_interleaved_requests_in_basic_mode() {
    // The relays must translate: a time server seeing the corrected origin answers basic.
    let mut server = TimeServer {
        clock: Clock {
            base: base(),
            offset: 0,
        },
        sent: Vec::new(),
    };
    let mut client = Client {
        xleave: true,
        ..Client::default()
    };
    let clock = Clock {
        base: base(),
        offset: 0,
    };
    let q = client.request(&clock, 0);
    let mut r = server.answer(&q, 1_000, 2_000);
    client.reply(&clock, &r, 3_000);
    let q = client.request(&clock, 1_000_000);
    r = server.answer(&q, 1_001_000, 1_002_000);
    client.reply(&clock, &r, 1_003_000);
    let mut q = client.request(&clock, 2_000_000);
    // As a relay that forgot its translation would forward it: the corrected origin.
    let origin = get_ts(&q, 24);
    put_ts(&mut q, 24, NtpTimestamp(origin.0.wrapping_sub(4295 * 2)));
    let r = server.answer(&q, 2_001_000, 2_002_000);
    assert!(!client.reply(&clock, &r, 2_003_000)[0].interleaved);
}

// ---------------------------------------------------------------------------------------------
// What passes unchanged, through the forward path
// ---------------------------------------------------------------------------------------------

struct OneHop {
    f: Forward<u16>,
    recorder: Arc<Recorder>,
    t0: Instant,
    wall: SystemTime,
}

impl OneHop {
    fn new(correction: bool) -> OneHop {
        let (f, recorder) = relay(correction);
        OneHop {
            f,
            recorder,
            t0: Instant::now(),
            wall: base(),
        }
    }

    /// A request in at 0 and out at `out_us`, its reply (`reply` as the server sends it, with
    /// the origin filled in) in at 100 us and out at `reply_out_us`: the bytes delivered.
    fn exchange(&mut self, mut reply: Vec<u8>, out_us: i64, reply_out_us: i64) -> Vec<u8> {
        let us = |n: i64| {
            if n >= 0 {
                self.wall + Duration::from_micros(n as u64)
            } else {
                self.wall - Duration::from_micros(n.unsigned_abs())
            }
        };
        let mut q = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0042));
        let view = self
            .f
            .request(self.t0, us(0), 1, &mut q)
            .expect("forwarded");
        self.f.request_sent(self.t0, us(out_us), view.transmit.0);
        reply[24..32].copy_from_slice(&q[40..48]);
        let route = self.f.reply(self.t0, us(100), &mut reply).expect("routed");
        self.f
            .reply_sent(self.t0, us(reply_out_us), &mut reply, &route.stamp);
        reply
    }
}

#[test]
fn what_cannot_be_rewritten_safely_passes_byte_for_byte_and_is_counted() {
    let plain = reply(
        ts(3_900_000_000, 0x1000_0001),
        ts(3_900_000_000, 0x2000_0000),
    )
    .to_vec();
    let mut with_mac = plain.clone();
    with_mac.extend_from_slice(&7u32.to_be_bytes());
    with_mac.extend_from_slice(&[0x5A; 20]);
    let mut with_extension = plain.clone();
    with_extension.extend_from_slice(&[0xF3, 0x23, 0x00, 0x20]);
    with_extension.extend_from_slice(&[0x11; 28]);
    let mut kod = plain.clone();
    kod[1] = 0;
    // (what, the reply as sent, request out at, reply out at (us), correction on, reason)
    type Case = (&'static str, Vec<u8>, i64, i64, bool, Unchanged);
    let cases: [Case; 6] = [
        ("mac", with_mac, 20, 130, true, Unchanged::Mac),
        (
            "extension",
            with_extension,
            20,
            130,
            true,
            Unchanged::ExtensionFields,
        ),
        ("kod", kod, 20, 130, true, Unchanged::NotPlain),
        (
            "clock went back",
            plain.clone(),
            -5,
            130,
            true,
            Unchanged::NegativeResidence,
        ),
        (
            "clock stepped",
            plain.clone(),
            20,
            1_000_101,
            true,
            Unchanged::LargeResidence,
        ),
        ("off", plain.clone(), 20, 130, false, Unchanged::Disabled),
    ];
    for (what, sent, out, reply_out, correction, why) in cases {
        let mut hop = OneHop::new(correction);
        let delivered = hop.exchange(sent.clone(), out, reply_out);
        let mut expected = sent.clone();
        expected[24..32].copy_from_slice(&delivered[24..32]);
        assert_eq!(delivered, expected, "{what}: byte for byte");
        assert_eq!(hop.recorder.count(Outcome::Unchanged(why)), 1, "{what}");
    }
    // The same plain reply with believable residences is corrected: 20 us and 30 us.
    let mut hop = OneHop::new(true);
    let delivered = hop.exchange(plain.clone(), 20, 130);
    assert_eq!(hop.recorder.count(Outcome::Corrected(Corrected::Basic)), 1);
    let (t2, t3) = (get_ts(&delivered, 32), get_ts(&delivered, 40));
    assert!((get_ts(&plain, 32).diff_seconds(t2) - 20e-6).abs() < 1e-9);
    assert!((t3.diff_seconds(get_ts(&plain, 40)) - 30e-6).abs() < 1e-9);
    assert_eq!(delivered.len(), HEADER_LEN);
}

#[test]
fn an_interleaved_reply_the_relay_cannot_place_passes_unchanged() {
    // A request whose origin this relay never wrote, answered interleaved (its origin is the
    // request's receive field): the T3 belongs to a reply corrected elsewhere, or not at all.
    let (mut f, recorder) = relay(true);
    let t0 = Instant::now();
    let wall = base();
    let mut q = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0042));
    put_ts(&mut q, 24, NtpTimestamp(0xE000_0000_0000_0011));
    put_ts(&mut q, 32, NtpTimestamp(0xE000_0000_0000_0099));
    let view = f.request(t0, wall, 1, &mut q).expect("forwarded");
    assert_eq!(
        get_ts(&q, 24),
        NtpTimestamp(0xE000_0000_0000_0011),
        "untouched"
    );
    f.request_sent(t0, wall + Duration::from_micros(5), view.transmit.0);
    let mut r = reply(ts(3_900_000_000, 1), ts(3_900_000_000, 2));
    put_ts(&mut r, 24, NtpTimestamp(0xE000_0000_0000_0099));
    let sent = r;
    let route = f.reply(t0, wall, &mut r).expect("routed");
    f.reply_sent(t0, wall + Duration::from_micros(9), &mut r, &route.stamp);
    assert_eq!(r, sent);
    assert_eq!(
        recorder.count(Outcome::Unchanged(Unchanged::UnknownResidence)),
        1
    );
}

#[test]
fn every_outcome_has_its_own_label() {
    let labels: std::collections::HashSet<_> = Outcome::ALL.iter().map(|o| o.reason()).collect();
    assert_eq!(labels.len(), Outcome::ALL.len());
    assert_eq!(Outcome::ALL.iter().filter(|o| o.is_corrected()).count(), 3);
}

// ---------------------------------------------------------------------------------------------
// Kernel transmit timestamps: exact request departures, predicted reply departures
// ---------------------------------------------------------------------------------------------

/// How far `after` is from `before` in NTP units, against `expected` (the lowest bit of a
/// rewritten field is the time server's, so one unit of slack).
fn assert_moved(before: NtpTimestamp, after: NtpTimestamp, expected: i64, what: &str) {
    let moved = after.0.wrapping_sub(before.0) as i64;
    assert!(
        (moved - expected).abs() <= 1,
        "{what}: moved by {moved} units, expected {expected}"
    );
}

fn micros(n: u64) -> i64 {
    ntp_units(Duration::from_micros(n)) as i64
}

#[test]
fn send_lag_predicts_the_median_of_recent_lags_and_ignores_the_unbelievable() {
    let read = base();
    let mut lag = SendLag::default();
    assert_eq!(lag.predict(), Duration::ZERO, "nothing measured yet");
    for us in [4, 5, 40, 3, 4] {
        assert!(lag.observe(read, read + Duration::from_micros(us)));
    }
    assert_eq!(
        lag.predict(),
        Duration::from_micros(4),
        "one slow send does not move it"
    );
    assert!(
        !lag.observe(read, read - Duration::from_micros(1)),
        "before the read"
    );
    assert!(!lag.observe(read, read + MAX_SEND_LAG + Duration::from_nanos(1)));
    // Only the last SEND_LAG_SAMPLES count.
    for i in 0..SEND_LAG_SAMPLES as u64 {
        let read = read + Duration::from_millis(1 + i);
        lag.observe(read, read + Duration::from_micros(9));
    }
    assert_eq!(lag.predict(), Duration::from_micros(9));
}

#[test]
fn send_lag_measures_each_datagram_at_a_devices_pace_and_a_sample_under_load() {
    let t = base();
    let mut lag = SendLag::default();
    // Until the window is full: every one.
    for i in 0..SEND_LAG_SAMPLES as u32 {
        let read = t + Duration::from_micros(10) * i;
        assert!(lag.due(read));
        lag.observe(read, read + Duration::from_micros(5));
    }
    // Full, 10 us apart (load): one per SEND_LAG_SPACING.
    let start = t + Duration::from_secs(1);
    assert!(lag.due(start), "the first after a quiet second");
    let due: Vec<u32> = (1..=300)
        .filter(|i| lag.due(start + Duration::from_micros(10) * *i))
        .collect();
    assert_eq!(due, vec![100, 200, 300]);
    // 2 ms apart: each.
    let start = start + Duration::from_secs(1);
    assert!((1..=20).all(|i| lag.due(start + Duration::from_millis(2) * i)));
    // A second apart (devices polling): every one.
    let start = start + Duration::from_secs(1);
    assert!((0..5).all(|i| lag.due(start + Duration::from_secs(i))));
    // The clock stepped back a second: the next is due, then one per spacing again.
    let stepped = start + Duration::from_secs(3);
    assert!(lag.due(stepped), "the first after the step");
    assert!(!lag.due(stepped + Duration::from_micros(10)));
    assert!(lag.due(stepped + SEND_LAG_SPACING));
}

#[test]
fn a_request_departs_when_the_kernel_sent_it_and_a_reply_when_earlier_replies_did() {
    let (mut f, _) = relay(true);
    let t0 = Instant::now();
    let at = |us: u64| base() + Duration::from_micros(us);
    let exchange = |f: &mut Forward<u16>, n: u64, tx_request: Option<u64>| {
        let mut q = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0040 + n));
        let view = f.request(t0, at(0), 1, &mut q).expect("forwarded");
        let departure = f.request_sent(t0, at(5), view.transmit.0);
        if let Some(us) = tx_request {
            assert!(
                f.departed(&departure, at(us)),
                "the request is still pending"
            );
        }
        let mut r = reply(
            ts(3_900_000_000, 0x1000_0001),
            ts(3_900_000_000, 0x2000_0000),
        );
        r[24..32].copy_from_slice(&q[40..48]);
        let sent = r;
        let route = f.reply(t0, at(100), &mut r).expect("routed");
        let done = f.reply_sent(t0, at(110), &mut r, &route.stamp);
        assert!(done.outcome.is_corrected());
        (sent, r, done.departure)
    };
    // No transmit timestamps: the clock reads (5 us in, 10 us out).
    let (sent, r, reply_departure) = exchange(&mut f, 0, None);
    assert_moved(get_ts(&sent, 32), get_ts(&r, 32), -micros(5), "T2, read");
    assert_moved(get_ts(&sent, 40), get_ts(&r, 40), micros(10), "T3, read");
    // The reply left 4 us after its read; the next request 9 us after arriving.
    assert!(f.departed(&reply_departure, at(114)));
    let (sent, r, _) = exchange(&mut f, 1, Some(9));
    assert_moved(get_ts(&sent, 32), get_ts(&r, 32), -micros(9), "T2, kernel");
    assert_moved(
        get_ts(&sent, 40),
        get_ts(&r, 40),
        micros(14),
        "T3, predicted",
    );
    // A departure whose reply already came back changes nothing.
    let mut q = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0050));
    let view = f.request(t0, at(0), 1, &mut q).expect("forwarded");
    let departure = f.request_sent(t0, at(5), view.transmit.0);
    let mut r = reply(
        ts(3_900_000_000, 0x1000_0001),
        ts(3_900_000_000, 0x2000_0000),
    );
    r[24..32].copy_from_slice(&q[40..48]);
    f.reply(t0, at(100), &mut r).expect("routed");
    assert!(!f.departed(&departure, at(7)));
}

#[test]
fn an_interleaved_reply_gets_the_previous_replys_measured_residence() {
    let (mut f, _) = relay(true);
    let t0 = Instant::now();
    let at = |us: u64| base() + Duration::from_micros(us);
    // A basic exchange whose reply is predicted to leave at 110 us and really leaves at 117.
    let mut q1 = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0041));
    let view = f.request(t0, at(0), 1, &mut q1).expect("forwarded");
    f.request_sent(t0, at(5), view.transmit.0);
    let mut r1 = reply(
        ts(3_900_000_000, 0x1000_0001),
        ts(3_900_000_000, 0x2000_0000),
    );
    r1[24..32].copy_from_slice(&q1[40..48]);
    let route = f.reply(t0, at(100), &mut r1).expect("routed");
    let done = f.reply_sent(t0, at(110), &mut r1, &route.stamp);
    assert!(f.departed(&done.departure, at(117)));
    // chronyd's interleaved request: origin the corrected T2 it got, receive its own
    // arrival time of that reply.
    let client_rx = ts(3_900_000_001, 0x0000_0300);
    let mut q2 = ntp::build_request(NtpTimestamp(0xE000_0000_0000_0042));
    q2[24..32].copy_from_slice(&r1[32..40]);
    q2[32..40].copy_from_slice(&client_rx.0.to_be_bytes());
    let view = f.request(t0, at(1_000), 1, &mut q2).expect("forwarded");
    assert_eq!(
        get_ts(&q2, 24),
        ts(3_900_000_000, 0x1000_0001),
        "origin translated back"
    );
    let departure = f.request_sent(t0, at(1_004), view.transmit.0);
    assert!(f.departed(&departure, at(1_006)));
    // The time server's interleaved reply: origin the request's receive field, T3 the
    // precise transmit time of reply 1.
    let reply1_tx = ts(3_900_000_000, 0x2000_0100);
    let mut r2 = reply(ts(3_900_000_001, 0x1000_0001), reply1_tx);
    r2[24..32].copy_from_slice(&client_rx.0.to_be_bytes());
    let sent = r2;
    let route = f.reply(t0, at(1_100), &mut r2).expect("routed");
    let done = f.reply_sent(t0, at(1_110), &mut r2, &route.stamp);
    assert_eq!(done.outcome, Outcome::Corrected(Corrected::Interleaved));
    assert_moved(
        get_ts(&sent, 32),
        get_ts(&r2, 32),
        -micros(6),
        "T2: this request's",
    );
    assert_moved(
        get_ts(&sent, 40),
        get_ts(&r2, 40),
        micros(17),
        "T3: reply 1's measured",
    );
}

#[test]
fn send_lag_keeps_its_window_sorted_as_samples_come_and_go() {
    let read = base();
    let mut lag = SendLag::default();
    let mut window: Vec<u64> = Vec::new();
    // A fixed pseudo-random walk with repeats, several times round the ring.
    let mut x: u64 = 12345;
    for i in 0..200 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let us = (x >> 33) % 40;
        let read = read + SEND_LAG_SPACING * i;
        lag.observe(read, read + Duration::from_micros(us));
        window.push(us * 1000);
        if window.len() > SEND_LAG_SAMPLES {
            window.remove(0);
        }
        let mut sorted = window.clone();
        sorted.sort_unstable();
        assert_eq!(
            lag.predict(),
            Duration::from_nanos(sorted[sorted.len() / 2]),
            "window {window:?}"
        );
    }
}
