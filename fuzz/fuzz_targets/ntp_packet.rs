//! NTP packet checks on arbitrary bytes: `check_request`, `check_reply` and the built-in
//! server's `reply`, with the invariants the relays rely on.
//!
//! Input: the whole input is checked as a request and as a reply. If it is at least
//! `PARAMS_LEN` bytes long, its first bytes also choose a `BuiltinSource` and the receive and
//! transmit timestamps, and the rest is answered as a request.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ntp_dtls::proto::ntp::{
    BuiltinSource, HEADER_LEN, MAX_PACKET_LEN, MODE_CLIENT, MODE_SERVER, NtpTimestamp, Rejection,
    check_reply, check_request,
};

/// stratum (1), precision (1), reference id (4), receive (8), transmit (8).
const PARAMS_LEN: usize = 22;

fn ts_at(buf: &[u8], off: usize) -> NtpTimestamp {
    let mut b = [0u8; 8];
    b.copy_from_slice(&buf[off..off + 8]);
    NtpTimestamp(u64::from_be_bytes(b))
}

/// What every rejection must agree with, whichever direction was checked.
fn check_rejection(buf: &[u8], r: Rejection, expected_mode: u8) {
    assert!(Rejection::ALL_REASONS.contains(&r.reason()), "{r:?}");
    assert!(!r.to_string().is_empty());
    match r {
        Rejection::TooLong(n) => assert!(n == buf.len() && n > MAX_PACKET_LEN),
        Rejection::TooShort(n) => assert!(n == buf.len() && n < HEADER_LEN),
        Rejection::BadVersion(v) => {
            assert_eq!(v, (buf[0] >> 3) & 7);
            assert!(!(1..=4).contains(&v));
        }
        Rejection::WrongMode(m) => {
            assert_eq!(m, buf[0] & 7);
            assert_ne!(m, expected_mode);
        }
    }
}

/// Length, version and mode of an accepted packet.
fn check_accepted(buf: &[u8], version: u8, mode: u8) {
    assert!((HEADER_LEN..=MAX_PACKET_LEN).contains(&buf.len()));
    assert!((1..=4).contains(&version));
    assert_eq!(version, (buf[0] >> 3) & 7);
    assert_eq!(buf[0] & 7, mode);
}

fn checks(buf: &[u8]) {
    let request = check_request(buf);
    let reply = check_reply(buf);
    match request {
        Ok(v) => {
            check_accepted(buf, v.version, MODE_CLIENT);
            assert_eq!(v.transmit, ts_at(buf, 40));
            assert_eq!(v.receive, ts_at(buf, 32));
        }
        Err(r) => check_rejection(buf, r, MODE_CLIENT),
    }
    match reply {
        Ok(v) => {
            check_accepted(buf, v.version, MODE_SERVER);
            assert_eq!(v.stratum, buf[1]);
            assert_eq!(v.origin, ts_at(buf, 24));
            assert_eq!(v.receive, ts_at(buf, 32));
            assert_eq!(v.transmit, ts_at(buf, 40));
        }
        Err(r) => check_rejection(buf, r, MODE_SERVER),
    }
    assert!(request.is_err() || reply.is_err(), "one packet, two modes");
}

fn builtin(params: &[u8], request: &[u8]) {
    let source = BuiltinSource {
        stratum: params[0],
        precision: params[1] as i8,
        reference_id: [params[2], params[3], params[4], params[5]],
    };
    let receive = ts_at(params, 6);
    let transmit = ts_at(params, 14);
    let answer = source.reply(request, receive, transmit);
    let checked = check_request(request);
    match (answer, checked) {
        (Ok(p), Ok(req)) => {
            let v = check_reply(&p).expect("a built-in reply passes check_reply");
            assert_eq!(v.version, req.version, "version echoed");
            assert_eq!(v.origin, req.transmit, "transmit echoed as origin");
            assert_eq!(v.receive, receive);
            assert_eq!(v.transmit, transmit);
            assert_eq!(v.stratum, source.stratum);
            assert_eq!(p[0] >> 6, 0, "leap indicator");
            assert!((4..=17).contains(&(p[2] as i8)), "poll {}", p[2] as i8);
            assert_eq!(p[3] as i8, source.precision);
            assert_eq!(&p[12..16], &source.reference_id);
            assert_eq!(ts_at(&p, 16), receive, "reference timestamp");
            checks(&p);
        }
        (Err(a), Err(b)) => assert_eq!(a, b, "reply refuses as check_request does"),
        (a, b) => panic!("reply {a:?} disagrees with check_request {b:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    checks(data);
    if let Some((params, request)) = data.split_at_checked(PARAMS_LEN) {
        builtin(params, request);
    }
});
