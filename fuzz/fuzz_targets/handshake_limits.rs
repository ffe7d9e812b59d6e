//! The relay's pre-parser and handshake limits (`record::records`, `record::fragments`,
//! `admission::HandshakeGuard`, `Admission::admit_datagram` and `Admission::outbound`) driven by
//! a byte-coded sequence of datagrams and events in simulated time.
//!
//! Input: 3-byte operation headers `[op, arg, len]` each followed by `len` bytes of datagram
//! (fewer at the end of the input). Two server-side peers share one `Admission`; one
//! client-side `HandshakeGuard` stands for a client relay's association.
//!
//! Checked: the record and fragment walkers never claim more than the datagram holds and account
//! for every byte of a well-formed one; nothing opens server state but the start of one
//! ClientHello alone in one record, whole or (if small) a first fragment; no fragment of a
//! ClientHello longer than `max_fragmented_hello_len` is ever admitted; a
//! handshake never gets more plaintext handshake fragments through than the per-handshake cap
//! (plus the late allowance after it); a client relay's guard lets no plaintext handshake
//! fragment through after its handshake; and what `outbound` lets go to an unproven address is
//! never more bytes than that address got admitted, nor more HelloVerifyRequests than whole
//! ClientHellos (or last pieces of one).
#![no_main]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use ntp_dtls::proto::admission::{
    Admission, HandshakeGuard, HandshakeLimits, Limits, Refusal, Side,
};
use ntp_dtls::proto::record::{
    self, HANDSHAKE_CLIENT_HELLO, HANDSHAKE_HELLO_VERIFY_REQUEST, HANDSHAKE_SERVER_HELLO,
    RECORD_HEADER_LEN,
};

fn peer(b: u8) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + (b & 1))), 1000)
}

/// The plaintext handshake fragments of a datagram (empty if any header is malformed), and
/// checks on the walkers themselves.
fn fragments_of(datagram: &[u8]) -> Vec<record::Fragment> {
    let mut out = Vec::new();
    let mut consumed = 0usize;
    let mut well_formed = true;
    for r in record::records(datagram) {
        let Ok(r) = r else {
            well_formed = false;
            break;
        };
        consumed += RECORD_HEADER_LEN + r.body.len();
        assert!(consumed <= datagram.len(), "records overrun the datagram");
        if !r.is_plaintext_handshake() {
            continue;
        }
        let mut inner = 0usize;
        for f in record::fragments(r.body) {
            let Ok(f) = f else {
                well_formed = false;
                break;
            };
            inner += 12 + f.fragment_length as usize;
            assert!(inner <= r.body.len(), "fragments overrun the record");
            assert!(u64::from(f.offset) + u64::from(f.fragment_length) <= u64::from(f.length));
            out.push(f);
        }
    }
    if well_formed {
        assert_eq!(consumed, datagram.len(), "well formed, every byte a record's");
    }
    out
}

#[derive(Clone, Copy, PartialEq)]
enum Model {
    /// No state in the table.
    None,
    /// A first handshake whose address is unproven: bytes admitted, bytes let out, whole
    /// ClientHellos admitted, HelloVerifyRequests let out, fragments admitted.
    Unproven {
        bytes_in: usize,
        bytes_out: usize,
        hellos: u32,
        hvrs: u32,
        fragments: u32,
    },
    /// Proven or established: no longer modelled.
    Free,
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_handshake_bytes: 16 * 1024,
        ..Limits::default()
    };
    let hl = HandshakeLimits::default();
    let mut table = Admission::new(limits);
    let mut models = [Model::None; 2];
    let mut guard = HandshakeGuard::new(Side::Client);
    let mut guard_through = 0u32;
    let start = Instant::now();
    let mut now = start;
    let mut rest = data;
    while let [op, arg, len, tail @ ..] = rest {
        let n = usize::from(*len).min(tail.len());
        // Datagrams up to 255 bytes, or repeated to a few kB for the larger ops.
        let mut datagram = tail[..n].to_vec();
        rest = &tail[n..];
        if op & 0x80 != 0 && !datagram.is_empty() {
            let times = 1 + usize::from(*arg % 16);
            datagram = datagram.repeat(times);
        }
        let fragments = fragments_of(&datagram);
        let p = peer(*arg);
        let index = usize::from(*arg & 1);
        match op & 0x07 {
            0 | 1 => {
                let result = table.admit_datagram(now, p, &datagram);
                if result.is_ok() {
                    for f in &fragments {
                        if f.msg_type == HANDSHAKE_CLIENT_HELLO {
                            assert!(
                                f.is_whole() || f.length <= hl.max_fragmented_hello_len,
                                "a large ClientHello's fragment admitted: {f:?}"
                            );
                        }
                    }
                }
                match (models[index], result) {
                    (Model::None, Ok(())) => {
                        if record::is_client_hello(&datagram) {
                            let f = record::lone_client_hello(&datagram);
                            assert!(
                                f.is_some_and(|f| f.offset == 0
                                    && f.length <= hl.max_message_len
                                    && (f.is_whole() || f.length <= hl.max_fragmented_hello_len)),
                                "state opened by {f:?}"
                            );
                            models[index] = Model::Unproven {
                                bytes_in: datagram.len(),
                                bytes_out: 0,
                                hellos: u32::from(f.is_some_and(|f| f.is_whole())),
                                hvrs: 0,
                                fragments: 1,
                            };
                        }
                        // Otherwise no state was made (the endpoint's engine would drop it).
                    }
                    (
                        Model::Unproven {
                            bytes_in,
                            bytes_out,
                            hellos,
                            hvrs,
                            fragments: f,
                        },
                        Ok(()),
                    ) => {
                        let f = f + fragments.len() as u32;
                        assert!(
                            f <= hl.max_fragments_per_handshake,
                            "{f} fragments through one handshake"
                        );
                        let hello = record::lone_client_hello(&datagram)
                            .is_some_and(|f| f.offset + f.fragment_length == f.length);
                        models[index] = Model::Unproven {
                            bytes_in: bytes_in + datagram.len(),
                            bytes_out,
                            hellos: hellos + u32::from(hello),
                            hvrs,
                            fragments: f,
                        };
                    }
                    (Model::Unproven { .. }, Err(Refusal::HandshakeBytes)) => {
                        // As the endpoint does: the handshake is abandoned.
                        table.handshake_failed(p);
                        models[index] = Model::None;
                    }
                    (Model::None, Err(_)) | (Model::Unproven { .. }, Err(_)) => {}
                    (Model::Free, _) => {}
                }
            }
            2 => {
                let result = table.outbound(p, &datagram);
                let server_hello = fragments
                    .iter()
                    .any(|f| f.msg_type == HANDSHAKE_SERVER_HELLO);
                let hvr = fragments
                    .iter()
                    .any(|f| f.msg_type == HANDSHAKE_HELLO_VERIFY_REQUEST);
                if let (
                    Model::Unproven {
                        bytes_in,
                        bytes_out,
                        hellos,
                        hvrs,
                        fragments: f,
                    },
                    Ok(()),
                ) = (models[index], result)
                {
                    if server_hello {
                        models[index] = Model::Free;
                    } else {
                        let bytes_out = bytes_out + datagram.len();
                        let hvrs = hvrs + u32::from(hvr);
                        assert!(
                            bytes_out <= bytes_in,
                            "{bytes_out} bytes out to an unproven address that sent {bytes_in}"
                        );
                        assert!(hvrs <= hellos, "{hvrs} HelloVerifyRequests for {hellos}");
                        models[index] = Model::Unproven {
                            bytes_in,
                            bytes_out,
                            hellos,
                            hvrs,
                            fragments: f,
                        };
                    }
                }
            }
            3 => {
                table.established(now, p);
                if matches!(models[index], Model::Unproven { .. }) {
                    models[index] = Model::Free;
                }
            }
            4 => {
                table.removed(p);
                models[index] = Model::None;
            }
            5 => {
                // Toward a client relay.
                let was_established = guard.is_established();
                if guard.check(now, &datagram, &hl).is_ok() {
                    if was_established {
                        assert!(
                            fragments.is_empty(),
                            "a plaintext handshake fragment after the client's handshake"
                        );
                    }
                    guard_through += fragments.len() as u32;
                    assert!(guard_through <= hl.max_fragments_per_handshake);
                    assert_eq!(guard.fragments(), guard_through);
                }
            }
            6 => guard.established(now, &hl),
            _ => now += Duration::from_millis(u64::from(*arg) * 40),
        }
    }
});
