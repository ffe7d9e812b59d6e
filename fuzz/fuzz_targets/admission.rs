//! The server's admission table driven by a byte-coded sequence of operations in simulated
//! time, checking the flood limits after every step.
//!
//! Input: 8 bytes of limits, then 3-byte operations `[op, peer, arg]`. Peers come from a small
//! pool (4 addresses x 8 ports) so that operations collide on the same peers and sources.
//!
//! Checked after every step: `half_open() <= max_half_open`, `associations() <=
//! max_associations`, `half_open() <= associations()` (one handshake per peer at most),
//! nothing admitted from an unknown peer but a ClientHello, each source's handshakes within its
//! token bucket (burst + rate x elapsed), nothing overdue after `expire`, and, at the end, an
//! empty table once every timeout has passed.
#![no_main]

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ntp_dtls::proto::admission::{Admission, Arrival, Expiry, Limits, Refusal};

fn peer(b: u8) -> SocketAddr {
    let ip = Ipv4Addr::new(127, 0, 0, 1 + (b & 3));
    SocketAddr::new(IpAddr::V4(ip), 1000 + u16::from((b >> 2) & 7))
}

fn limits(b: &[u8; 8]) -> Limits {
    Limits {
        max_associations: 1 + usize::from(b[0] % 24),
        max_half_open: 1 + usize::from(b[1] % 12),
        handshake_timeout: Duration::from_millis(100 + 100 * u64::from(b[2] % 50)),
        handshake_rate: f64::from(1 + b[3] % 40) / 4.0,
        // As the config resolves it: at least one.
        handshake_burst: f64::from(b[4] % 16).max(1.0),
        max_handshake_bytes: 1 + usize::from(u16::from_be_bytes([b[5], b[6]])),
        idle_timeout: Duration::from_millis(100 + 250 * u64::from(b[7] % 40)),
    }
}

struct Run {
    table: Admission,
    limits: Limits,
    start: Instant,
    now: Instant,
    /// Per source address: handshakes started (tokens taken).
    started: HashMap<IpAddr, u32>,
    expired: Vec<Expiry>,
}

impl Run {
    fn check_bounds(&self) {
        let (assoc, half) = (self.table.associations(), self.table.half_open());
        assert!(
            assoc <= self.limits.max_associations,
            "{assoc} associations, limit {}",
            self.limits.max_associations
        );
        assert!(
            half <= self.limits.max_half_open,
            "{half} half-open, limit {}",
            self.limits.max_half_open
        );
        assert!(half <= assoc, "{half} half-open but {assoc} associations");
    }

    fn admit(&mut self, p: SocketAddr, len: usize, arrival: Arrival) {
        let (assoc, half) = (self.table.associations(), self.table.half_open());
        let result = self.table.admit(self.now, p, len, arrival);
        let (assoc2, half2) = (self.table.associations(), self.table.half_open());
        assert!(assoc2 == assoc || (assoc2 == assoc + 1 && result.is_ok()));
        assert!(half2 == half || (half2 == half + 1 && result.is_ok()));
        if assoc2 > assoc {
            assert_eq!(
                arrival,
                Arrival::ClientHello,
                "only a ClientHello opens state"
            );
            assert_eq!(half2, half + 1, "a new association starts half-open");
        }
        if half2 > half {
            assert_eq!(
                arrival,
                Arrival::ClientHello,
                "only a ClientHello starts a handshake"
            );
            let n = self.started.entry(p.ip()).or_default();
            *n += 1;
            let elapsed = self.now.duration_since(self.start).as_secs_f64();
            let allowed = self.limits.handshake_burst + self.limits.handshake_rate * elapsed;
            assert!(
                f64::from(*n) <= allowed + 1e-6,
                "{} started {n} handshakes in {elapsed} s, bucket allows {allowed}",
                p.ip()
            );
        }
        if result == Err(Refusal::HandshakeBytes) {
            // The caller forgets the peer's handshake, as the server relay does.
            self.table.handshake_failed(p);
        }
    }

    fn expire(&mut self) {
        self.expired.clear();
        self.table.expire(self.now, &mut self.expired);
        if let Some(due) = self.table.next_deadline() {
            assert!(due > self.now, "a timer is overdue right after expire");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((head, ops)) = data.split_first_chunk::<8>() else {
        return;
    };
    let limits = limits(head);
    let start = Instant::now();
    let mut run = Run {
        table: Admission::new(limits.clone()),
        limits,
        start,
        now: start,
        started: HashMap::new(),
        expired: Vec::new(),
    };
    for op in ops.chunks_exact(3) {
        let (p, arg) = (peer(op[1]), op[2]);
        match op[0] % 10 {
            0 | 1 => run.admit(p, 1 + usize::from(arg) * 8, Arrival::ClientHello),
            2 => run.admit(p, 1 + usize::from(arg) * 8, Arrival::Handshake),
            3 => run.admit(p, usize::from(arg), Arrival::Other),
            4 => run.table.established(run.now, p),
            5 => run.table.activity(run.now, p),
            6 => run.table.handshake_failed(p),
            7 => run.table.removed(p),
            8 => run.expire(),
            _ => {
                // Time only moves forward, by up to 25.5 s a step.
                run.now += Duration::from_millis(100 * u64::from(arg));
                run.expire();
            }
        }
        run.check_bounds();
    }
    // Once every timeout has passed, nothing is left.
    run.now += run.limits.handshake_timeout + run.limits.idle_timeout + Duration::from_secs(1);
    run.expire();
    assert_eq!(
        run.table.half_open(),
        0,
        "half-open handshakes outlived their timeout"
    );
    assert_eq!(
        run.table.associations(),
        0,
        "associations outlived the idle timeout"
    );
    assert_eq!(
        run.table.next_deadline(),
        None,
        "timers left for an empty table"
    );
});
