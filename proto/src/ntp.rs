//! NTP packet checks and construction over the RFC 5905 §7.3 header.
//!
//! Everything here is sans-I/O: buffers in, buffers or views out, and every
//! clock reading is passed in by the caller.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Length of the fixed NTP header; anything after it (extension fields,
/// MACs) is carried untouched.
pub const HEADER_LEN: usize = 48;

/// Largest NTP datagram the relay accepts, chosen so that one NTP datagram
/// plus DTLS overhead stays within a 1500-byte MTU over IPv6.
pub const MAX_PACKET_LEN: usize = 1400;

/// Version written into packets we originate.
pub const NTP_VERSION: u8 = 4;

pub const MODE_CLIENT: u8 = 3;
pub const MODE_SERVER: u8 = 4;
/// ntpq/ntpdc-style management traffic: a classic amplification vector,
/// never relayed.
pub const MODE_CONTROL: u8 = 6;
pub const MODE_PRIVATE: u8 = 7;

/// Root dispersion of built-in replies, in NTP short format (16.16 seconds):
/// about 1 ms. Nonzero because zero would claim a perfect clock, and clients
/// use it when weighing sources.
pub const BUILTIN_ROOT_DISPERSION: u32 = 0x0000_0042;

const UNIX_TO_NTP_SECS: u64 = 2_208_988_800;
const FRACTION_PER_SEC: f64 = 4_294_967_296.0;
const NANOS_PER_SEC: u64 = 1_000_000_000;

// The poll range chronyd accepts for server replies; keeps a hostile or
// buggy request from making us advertise an absurd interval.
const MIN_REPLY_POLL: i8 = 4;
const MAX_REPLY_POLL: i8 = 17;

const OFF_ROOT_DISPERSION: usize = 8;
const OFF_REFERENCE_ID: usize = 12;
const OFF_REFERENCE_TS: usize = 16;
const OFF_ORIGIN_TS: usize = 24;
const OFF_RECEIVE_TS: usize = 32;
const OFF_TRANSMIT_TS: usize = 40;

/// A 64-bit NTP timestamp: seconds since 1900 in the high 32 bits, fraction
/// in the low 32 bits. The era is not stored; arithmetic follows RFC 5905.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct NtpTimestamp(pub u64);

impl NtpTimestamp {
    pub const ZERO: NtpTimestamp = NtpTimestamp(0);

    pub const fn from_parts(seconds: u32, fraction: u32) -> Self {
        NtpTimestamp(((seconds as u64) << 32) | fraction as u64)
    }

    pub const fn seconds(self) -> u32 {
        (self.0 >> 32) as u32
    }

    pub const fn fraction(self) -> u32 {
        self.0 as u32
    }

    /// Zero means "unknown" on the wire (e.g. origin of a first request).
    pub const fn is_zero(self) -> bool {
        self.0 == 0
    }

    /// Converts wall-clock time; seconds wrap modulo 2^32 (era 0 from 1900,
    /// era 1 from 2036), as on the wire.
    pub fn from_system_time(t: SystemTime) -> Self {
        let (unix_secs, nanos) = match t.duration_since(UNIX_EPOCH) {
            Ok(d) => (i128::from(d.as_secs()), d.subsec_nanos()),
            Err(e) => {
                let d = e.duration();
                let secs = -i128::from(d.as_secs());
                match d.subsec_nanos() {
                    0 => (secs, 0),
                    n => (secs - 1, 1_000_000_000 - n),
                }
            }
        };
        // Truncating to u32 is exactly the era wrap.
        let seconds = (unix_secs + i128::from(UNIX_TO_NTP_SECS)) as u32;
        // nanos < 2^30, so the shift cannot overflow and the quotient is < 2^32.
        let fraction = ((u64::from(nanos) << 32) / NANOS_PER_SEC) as u32;
        Self::from_parts(seconds, fraction)
    }

    /// Seconds since 1900 extended to 64 bits by picking the era that puts
    /// the time in 1968..2104 (high bit set means era 0), the usual pivot.
    fn era_seconds(self) -> u64 {
        let secs = u64::from(self.seconds());
        if secs & 0x8000_0000 == 0 {
            secs + (1 << 32)
        } else {
            secs
        }
    }

    /// Unix time in seconds, assuming the 1968..2104 window.
    pub fn to_unix_f64(self) -> f64 {
        (self.era_seconds() as f64 - UNIX_TO_NTP_SECS as f64)
            + f64::from(self.fraction()) / FRACTION_PER_SEC
    }

    /// Wall-clock time, assuming the 1968..2104 window. Rounds the fraction
    /// up to whole nanoseconds so that `from_system_time` round-trips exactly.
    /// `None` only if the platform cannot represent the result.
    pub fn to_system_time(self) -> Option<SystemTime> {
        // fraction * 1e9 < 2^62, so no overflow.
        let nanos = (u64::from(self.fraction()) * NANOS_PER_SEC + (1 << 32) - 1) >> 32;
        let secs = self.era_seconds();
        let whole = if secs >= UNIX_TO_NTP_SECS {
            UNIX_EPOCH.checked_add(Duration::from_secs(secs - UNIX_TO_NTP_SECS))
        } else {
            UNIX_EPOCH.checked_sub(Duration::from_secs(UNIX_TO_NTP_SECS - secs))
        };
        whole?.checked_add(Duration::from_nanos(nanos))
    }

    /// `self - earlier` in seconds. The 64-bit difference is read as signed,
    /// so results are correct across an era boundary as long as the two
    /// timestamps are within 68 years of each other (RFC 5905 arithmetic).
    pub fn diff_seconds(self, earlier: NtpTimestamp) -> f64 {
        let d = self.0.wrapping_sub(earlier.0) as i64;
        d as f64 / FRACTION_PER_SEC
    }
}

/// Why a datagram was not relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Shorter than [`HEADER_LEN`]; carries the length seen.
    TooShort(usize),
    /// Longer than [`MAX_PACKET_LEN`]; carries the length seen.
    TooLong(usize),
    /// Version outside 1..=4; carries the version seen.
    BadVersion(u8),
    /// Not the mode expected in this direction; carries the mode seen.
    WrongMode(u8),
}

impl Rejection {
    /// Every label [`Rejection::reason`] can return, so counters can be
    /// registered up front and show zero rather than being absent.
    pub const ALL_REASONS: [&'static str; 6] = [
        "too_short",
        "too_long",
        "bad_version",
        "control_mode",
        "private_mode",
        "wrong_mode",
    ];

    /// Stable snake_case label for metrics; mode 6 and 7 get their own
    /// labels because they indicate scanning or amplification attempts rather
    /// than a misconfigured client.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooShort(_) => "too_short",
            Rejection::TooLong(_) => "too_long",
            Rejection::BadVersion(_) => "bad_version",
            Rejection::WrongMode(MODE_CONTROL) => "control_mode",
            Rejection::WrongMode(MODE_PRIVATE) => "private_mode",
            Rejection::WrongMode(_) => "wrong_mode",
        }
    }
}

fn mode_name(mode: u8) -> &'static str {
    match mode {
        0 => "reserved",
        1 => "symmetric active",
        2 => "symmetric passive",
        3 => "client",
        4 => "server",
        5 => "broadcast",
        6 => "control",
        7 => "private",
        _ => "invalid",
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Rejection::TooShort(len) => write!(
                f,
                "NTP packet too short ({len} bytes, need at least {HEADER_LEN}) dropped"
            ),
            Rejection::TooLong(len) => write!(
                f,
                "NTP packet too long ({len} bytes, limit {MAX_PACKET_LEN}) dropped"
            ),
            Rejection::BadVersion(v) => {
                write!(f, "NTP version {v} packet dropped (only 1-4 accepted)")
            }
            Rejection::WrongMode(m) => {
                write!(f, "NTP mode {m} ({}) packet dropped", mode_name(m))
            }
        }
    }
}

impl std::error::Error for Rejection {}

/// The fields of a client request the relay needs for routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestView {
    pub version: u8,
    /// Zero from most clients; in chronyd's interleaved mode the receive timestamp of the
    /// previous reply, which the time server recognises (docs/TIMESTAMPS.md).
    pub origin: NtpTimestamp,
    /// Primary routing key: a normal reply echoes it as its origin.
    pub transmit: NtpTimestamp,
    /// Secondary routing key: an interleaved reply echoes it as its origin.
    pub receive: NtpTimestamp,
}

/// The fields of a server reply the relay needs for routing and monitoring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplyView {
    pub version: u8,
    pub stratum: u8,
    pub origin: NtpTimestamp,
    pub receive: NtpTimestamp,
    pub transmit: NtpTimestamp,
}

/// Length, version and mode checks shared by both directions, in that order
/// so the cheapest and least ambiguous reason wins.
fn checked_header(buf: &[u8], expected_mode: u8) -> Result<&[u8; HEADER_LEN], Rejection> {
    if buf.len() > MAX_PACKET_LEN {
        return Err(Rejection::TooLong(buf.len()));
    }
    let header = buf
        .first_chunk::<HEADER_LEN>()
        .ok_or(Rejection::TooShort(buf.len()))?;
    let version = version_of(header);
    if !(1..=4).contains(&version) {
        return Err(Rejection::BadVersion(version));
    }
    let mode = header[0] & 0x07;
    if mode != expected_mode {
        return Err(Rejection::WrongMode(mode));
    }
    Ok(header)
}

fn version_of(header: &[u8; HEADER_LEN]) -> u8 {
    (header[0] >> 3) & 0x07
}

fn read_ts<const OFF: usize>(header: &[u8; HEADER_LEN]) -> NtpTimestamp {
    const { assert!(OFF + 8 <= HEADER_LEN) };
    let mut bytes = [0u8; 8];
    bytes.copy_from_slice(&header[OFF..OFF + 8]);
    NtpTimestamp(u64::from_be_bytes(bytes))
}

fn write_at<const OFF: usize, const N: usize>(header: &mut [u8; HEADER_LEN], bytes: [u8; N]) {
    const { assert!(OFF + N <= HEADER_LEN) };
    header[OFF..OFF + N].copy_from_slice(&bytes);
}

/// Accepts a client-mode (3) request of version 1..=4 and
/// `HEADER_LEN..=MAX_PACKET_LEN` bytes. Trailing extension fields or MACs are
/// allowed; they are the endpoints' business, not the relay's.
pub fn check_request(buf: &[u8]) -> Result<RequestView, Rejection> {
    let header = checked_header(buf, MODE_CLIENT)?;
    Ok(RequestView {
        version: version_of(header),
        origin: read_ts::<OFF_ORIGIN_TS>(header),
        transmit: read_ts::<OFF_TRANSMIT_TS>(header),
        receive: read_ts::<OFF_RECEIVE_TS>(header),
    })
}

/// Accepts a server-mode (4) reply under the same version and length rules
/// as [`check_request`]. Kiss-o'-death replies (stratum 0) pass: the NTP
/// client must see them to back off.
pub fn check_reply(buf: &[u8]) -> Result<ReplyView, Rejection> {
    let header = checked_header(buf, MODE_SERVER)?;
    Ok(ReplyView {
        version: version_of(header),
        stratum: header[1],
        origin: read_ts::<OFF_ORIGIN_TS>(header),
        receive: read_ts::<OFF_RECEIVE_TS>(header),
        transmit: read_ts::<OFF_TRANSMIT_TS>(header),
    })
}

/// Why a server reply's timestamps may not be rewritten (see [`rewritable_reply`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotRewritable {
    /// Something follows the header that is not a chain of extension fields: a MAC (symmetric
    /// key), whose digest covers the timestamps.
    Mac,
    /// Extension fields follow the header (NTS, chrony's experimental fields), possibly with a
    /// MAC: authenticated or not, they are the endpoints' business.
    ExtensionFields,
    /// Not a plain NTPv3/v4 server reply with both timestamps set: another version, a
    /// kiss-o'-death, a zero receive or transmit timestamp.
    NotPlain,
}

/// Smallest extension field (RFC 7822: 16 bytes, a multiple of 4).
const MIN_EXTENSION_FIELD: usize = 16;

/// Whether the bytes after the header are one or more well-formed extension fields (RFC 7822
/// §7.5), possibly followed by a MAC of 20 or 24 bytes (key ID + MD5/AES-CMAC or SHA-1).
fn is_extension_chain(mut rest: &[u8]) -> bool {
    let mut fields = 0;
    while rest.len() >= MIN_EXTENSION_FIELD {
        let length = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        if length < MIN_EXTENSION_FIELD || length % 4 != 0 || length > rest.len() {
            break;
        }
        rest = &rest[length..];
        fields += 1;
    }
    fields > 0 && matches!(rest.len(), 0 | 20 | 24)
}

/// Whether a server reply (already through [`check_reply`]) is one whose receive and transmit
/// timestamps the relay may correct: exactly the 48-byte header (nothing a MAC or an extension
/// field could cover), version 3 or 4, not a kiss-o'-death, both timestamps set.
pub fn rewritable_reply(buf: &[u8]) -> Result<(), NotRewritable> {
    let header: &[u8; HEADER_LEN] = match buf.first_chunk::<HEADER_LEN>() {
        Some(header) => header,
        None => return Err(NotRewritable::NotPlain),
    };
    if buf.len() > HEADER_LEN {
        return Err(if is_extension_chain(&buf[HEADER_LEN..]) {
            NotRewritable::ExtensionFields
        } else {
            NotRewritable::Mac
        });
    }
    let plain = matches!(version_of(header), 3 | 4)
        && header[0] & 0x07 == MODE_SERVER
        && header[1] != 0
        && !read_ts::<OFF_RECEIVE_TS>(header).is_zero()
        && !read_ts::<OFF_TRANSMIT_TS>(header).is_zero();
    if plain {
        Ok(())
    } else {
        Err(NotRewritable::NotPlain)
    }
}

/// A duration in NTP units (2^-32 s), rounded to the nearest; saturates far beyond any
/// residence the relay accepts.
pub fn ntp_units(d: Duration) -> u64 {
    let nanos = u128::from(d.subsec_nanos());
    let fraction = ((nanos << 32) + u128::from(NANOS_PER_SEC / 2)) / u128::from(NANOS_PER_SEC);
    d.as_secs()
        .checked_mul(1 << 32)
        .and_then(|whole| whole.checked_add(fraction as u64))
        .unwrap_or(u64::MAX)
}

/// `t` moved by `delta` NTP units (later when `later`), modulo 2^64 as RFC 5905 arithmetic is,
/// so an era boundary in between is no special case. The lowest bit stays as it was: chronyd
/// flags its receive timestamps with it (1) and its transmit timestamps (0), and looks for the
/// flag in an interleaved request's origin.
fn shifted(t: u64, delta: u64, later: bool) -> u64 {
    let moved = if later {
        t.wrapping_add(delta)
    } else {
        t.wrapping_sub(delta)
    };
    (moved & !1) | (t & 1)
}

/// A server reply's timestamps as they were and as rewritten by [`correct_reply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rewritten {
    pub receive_before: NtpTimestamp,
    pub receive_after: NtpTimestamp,
    pub transmit_before: NtpTimestamp,
    pub transmit_after: NtpTimestamp,
}

/// The transparent-clock rewrite of a server reply's header: receive := receive - `earlier`
/// (the request's residence), transmit := transmit + `later` (the reply's residence).
/// The caller has checked the reply with [`rewritable_reply`]; a buffer shorter than the
/// header is left alone (None).
pub fn correct_reply(buf: &mut [u8], earlier: Duration, later: Duration) -> Option<Rewritten> {
    let header: &mut [u8; HEADER_LEN] = buf.first_chunk_mut::<HEADER_LEN>()?;
    let receive_before = read_ts::<OFF_RECEIVE_TS>(header);
    let transmit_before = read_ts::<OFF_TRANSMIT_TS>(header);
    let receive_after = NtpTimestamp(shifted(receive_before.0, ntp_units(earlier), false));
    let transmit_after = NtpTimestamp(shifted(transmit_before.0, ntp_units(later), true));
    write_at::<OFF_RECEIVE_TS, 8>(header, receive_after.0.to_be_bytes());
    write_at::<OFF_TRANSMIT_TS, 8>(header, transmit_after.0.to_be_bytes());
    Some(Rewritten {
        receive_before,
        receive_after,
        transmit_before,
        transmit_after,
    })
}

/// Moves a reply's transmit timestamp `by` later (its lowest bit kept, as [`correct_reply`]
/// does). False when the buffer is shorter than the header.
pub fn advance_transmit(buf: &mut [u8], by: Duration) -> bool {
    let Some(header) = buf.first_chunk_mut::<HEADER_LEN>() else {
        return false;
    };
    let transmit = read_ts::<OFF_TRANSMIT_TS>(header);
    let moved = shifted(transmit.0, ntp_units(by), true);
    write_at::<OFF_TRANSMIT_TS, 8>(header, moved.to_be_bytes());
    true
}

/// A number of NTP units (2^-32 s) as a duration, rounded to the nearest nanosecond.
pub fn duration_of_units(units: u64) -> Duration {
    let nanos = (u128::from(units) * u128::from(NANOS_PER_SEC) + (1 << 31)) >> 32;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// Sets a request's receive field (what an interleaved reply echoes as its origin). False
/// when the buffer is shorter than the header.
pub fn set_receive(buf: &mut [u8], receive: NtpTimestamp) -> bool {
    match buf.first_chunk_mut::<HEADER_LEN>() {
        Some(header) => {
            write_at::<OFF_RECEIVE_TS, 8>(header, receive.0.to_be_bytes());
            true
        }
        None => false,
    }
}

/// Sets a request's origin timestamp (the interleaved translation back to what the time
/// server sent). False when the buffer is shorter than the header.
pub fn set_origin(buf: &mut [u8], origin: NtpTimestamp) -> bool {
    match buf.first_chunk_mut::<HEADER_LEN>() {
        Some(header) => {
            write_at::<OFF_ORIGIN_TS, 8>(header, origin.0.to_be_bytes());
            true
        }
        None => false,
    }
}

/// The client relay's keepalive: one NTP-sized record the server relay answers itself, with
/// the same bytes, without asking the time server. That answer is what tells "association
/// dead" from "time server down".
///
/// Why not an empty record: OpenSSL's s_server and socat read a zero-length record as the end
/// of the stream and close, and any DTLS peer carrying plain NTP must interoperate. Why this
/// shape: version 0 with LI 3 and mode 0 is no NTP packet any server answers (a plain DTLS peer
/// hands it to chronyd, which ignores it), and a local client cannot inject one through the
/// client relay, which forwards versions 1 to 4 only. The reference ID spells `DTKA` (DTLS
/// keepalive); the transmit field carries a counter, so each acknowledgement names its probe.
pub const KEEPALIVE_LEN: usize = HEADER_LEN;
const KEEPALIVE_FIRST_BYTE: u8 = 0xC0;
const KEEPALIVE_REFERENCE_ID: [u8; 4] = *b"DTKA";

/// A keepalive probe numbered `nonce`.
pub fn keepalive(nonce: u64) -> [u8; KEEPALIVE_LEN] {
    let mut p = [0u8; KEEPALIVE_LEN];
    p[0] = KEEPALIVE_FIRST_BYTE;
    write_at::<OFF_REFERENCE_ID, 4>(&mut p, KEEPALIVE_REFERENCE_ID);
    write_at::<OFF_TRANSMIT_TS, 8>(&mut p, nonce.to_be_bytes());
    p
}

/// The number of a keepalive probe (or of its acknowledgement, which is the same bytes);
/// None for anything else.
pub fn keepalive_nonce(datagram: &[u8]) -> Option<u64> {
    let header: &[u8; HEADER_LEN] = datagram.try_into().ok()?;
    let shape = header[0] == KEEPALIVE_FIRST_BYTE
        && header[1..OFF_REFERENCE_ID].iter().all(|b| *b == 0)
        && header[OFF_REFERENCE_ID..OFF_REFERENCE_TS] == KEEPALIVE_REFERENCE_ID
        && header[OFF_REFERENCE_TS..OFF_TRANSMIT_TS]
            .iter()
            .all(|b| *b == 0);
    shape.then(|| read_ts::<OFF_TRANSMIT_TS>(header).0)
}

/// A minimal NTPv4 client request (as SNTP sends): only the transmit
/// timestamp is set, which is all a server needs to answer it.
pub fn build_request(transmit: NtpTimestamp) -> [u8; HEADER_LEN] {
    let mut p = [0u8; HEADER_LEN];
    p[0] = (NTP_VERSION << 3) | MODE_CLIENT;
    write_at::<OFF_TRANSMIT_TS, 8>(&mut p, transmit.0.to_be_bytes());
    p
}

/// An embedded NTP server answering from the host clock, like chronyd's
/// `local stratum N`, for when no upstream chronyd is available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BuiltinSource {
    /// Advertised as-is: 0 would be read as a kiss-o'-death and 16 as
    /// unsynchronised, so keep it in 1..=15.
    pub stratum: u8,
    /// log2 seconds, as on the wire.
    pub precision: i8,
    pub reference_id: [u8; 4],
}

impl Default for BuiltinSource {
    /// Stratum 2, precision 2^-20 s (about 1 µs, typical of a modern host
    /// clock), reference id "LOCL" (the conventional tag for a local clock).
    /// Stratum 2 rather than 1 so that clients prefer a real stratum-1 source
    /// when they have one.
    fn default() -> Self {
        BuiltinSource {
            stratum: 2,
            precision: -20,
            reference_id: *b"LOCL",
        }
    }
}

impl BuiltinSource {
    /// Answers `request` with `receive` and `transmit` as taken by the
    /// caller from the host clock. Fails with the request's [`Rejection`]
    /// if it is not a valid client request.
    pub fn reply(
        &self,
        request: &[u8],
        receive: NtpTimestamp,
        transmit: NtpTimestamp,
    ) -> Result<[u8; HEADER_LEN], Rejection> {
        let req_header = checked_header(request, MODE_CLIENT)?;
        let req_transmit = read_ts::<OFF_TRANSMIT_TS>(req_header);
        let req_poll = req_header[2] as i8;

        let mut p = [0u8; HEADER_LEN];
        // LI = 0: the host clock is assumed synchronised, or we would not
        // be serving it.
        p[0] = (version_of(req_header) << 3) | MODE_SERVER;
        p[1] = self.stratum;
        p[2] = req_poll.clamp(MIN_REPLY_POLL, MAX_REPLY_POLL) as u8;
        p[3] = self.precision as u8;
        write_at::<OFF_ROOT_DISPERSION, 4>(&mut p, BUILTIN_ROOT_DISPERSION.to_be_bytes());
        write_at::<OFF_REFERENCE_ID, 4>(&mut p, self.reference_id);
        // The host clock is our reference and is read "now", so its last
        // update is as recent as the request.
        write_at::<OFF_REFERENCE_TS, 8>(&mut p, receive.0.to_be_bytes());
        write_at::<OFF_ORIGIN_TS, 8>(&mut p, req_transmit.0.to_be_bytes());
        // The lowest bit clear (0.23 ns): chronyd sets it on the receive timestamps it can be
        // asked about in its interleaved mode; this source cannot be, so it does not invite
        // the question (crate::time_server_tx holds only replies that carry it).
        write_at::<OFF_RECEIVE_TS, 8>(&mut p, (receive.0 & !1).to_be_bytes());
        write_at::<OFF_TRANSMIT_TS, 8>(&mut p, transmit.0.to_be_bytes());
        Ok(p)
    }
}

/// One clock-offset measurement from the four timestamps of an exchange.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Server clock minus client clock, in seconds.
    pub offset: f64,
    /// Round-trip network delay excluding server processing, in seconds.
    pub delay: f64,
}

/// RFC 5905 on-wire calculation: `t1` client transmit, `t2` server receive,
/// `t3` server transmit, `t4` client receive.
pub fn sample(t1: NtpTimestamp, t2: NtpTimestamp, t3: NtpTimestamp, t4: NtpTimestamp) -> Sample {
    Sample {
        offset: (t2.diff_seconds(t1) + t3.diff_seconds(t4)) / 2.0,
        delay: t4.diff_seconds(t1) - t3.diff_seconds(t2),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_keepalive_is_recognised_and_is_no_ntp_packet() {
        let probe = keepalive(7);
        assert_eq!(keepalive_nonce(&probe), Some(7));
        assert_eq!(check_request(&probe), Err(Rejection::BadVersion(0)));
        assert_eq!(check_reply(&probe), Err(Rejection::BadVersion(0)));
        let mut other = probe;
        other[20] = 1;
        assert_eq!(keepalive_nonce(&other), None);
        assert_eq!(keepalive_nonce(&probe[..47]), None);
        assert_eq!(keepalive_nonce(&build_request(NtpTimestamp(7))), None);
        assert_eq!(keepalive_nonce(&[]), None);
    }

    fn packet(len: usize, version: u8, mode: u8) -> Vec<u8> {
        let mut p = vec![0u8; len];
        if let Some(b) = p.first_mut() {
            *b = (version << 3) | mode;
        }
        p
    }

    fn ts(secs: u32, frac: u32) -> NtpTimestamp {
        NtpTimestamp::from_parts(secs, frac)
    }

    #[test]
    fn too_short_rejected_at_47_and_empty() {
        for len in [0, 1, 47] {
            let p = packet(len, 4, MODE_CLIENT);
            let r = check_request(&p).unwrap_err();
            assert_eq!(r, Rejection::TooShort(len));
            assert_eq!(r.reason(), "too_short");
            assert_eq!(check_reply(&packet(len, 4, MODE_SERVER)).unwrap_err(), r);
        }
    }

    #[test]
    fn too_long_rejected_at_1401() {
        for len in [1401, 65535] {
            let r = check_request(&packet(len, 4, MODE_CLIENT)).unwrap_err();
            assert_eq!(r, Rejection::TooLong(len));
            assert_eq!(r.reason(), "too_long");
            let r = check_reply(&packet(len, 4, MODE_SERVER)).unwrap_err();
            assert_eq!(r, Rejection::TooLong(len));
        }
    }

    #[test]
    fn boundary_lengths_48_and_1400_accepted() {
        for len in [48, 49, 1400] {
            assert!(check_request(&packet(len, 4, MODE_CLIENT)).is_ok(), "{len}");
            assert!(check_reply(&packet(len, 4, MODE_SERVER)).is_ok(), "{len}");
        }
    }

    #[test]
    fn extension_bytes_do_not_affect_view() {
        let mut p = build_request(ts(7, 9)).to_vec();
        p.extend_from_slice(&[0xAB; 100]);
        let v = check_request(&p).unwrap();
        assert_eq!(v.transmit, ts(7, 9));
        assert_eq!(v.receive, NtpTimestamp::ZERO);
    }

    #[test]
    fn versions_0_5_6_7_rejected_1_to_4_accepted() {
        for v in [0u8, 5, 6, 7] {
            let r = check_request(&packet(48, v, MODE_CLIENT)).unwrap_err();
            assert_eq!(r, Rejection::BadVersion(v));
            assert_eq!(r.reason(), "bad_version");
            assert_eq!(
                check_reply(&packet(48, v, MODE_SERVER)).unwrap_err(),
                Rejection::BadVersion(v)
            );
        }
        for v in 1..=4u8 {
            assert_eq!(
                check_request(&packet(48, v, MODE_CLIENT)).unwrap().version,
                v
            );
            assert_eq!(check_reply(&packet(48, v, MODE_SERVER)).unwrap().version, v);
        }
    }

    #[test]
    fn mode_6_is_control_and_mode_7_is_private() {
        let r = check_request(&packet(48, 2, 6)).unwrap_err();
        assert_eq!(r, Rejection::WrongMode(6));
        assert_eq!(r.reason(), "control_mode");
        assert_eq!(r.to_string(), "NTP mode 6 (control) packet dropped");

        let r = check_request(&packet(48, 2, 7)).unwrap_err();
        assert_eq!(r, Rejection::WrongMode(7));
        assert_eq!(r.reason(), "private_mode");
        assert_eq!(r.to_string(), "NTP mode 7 (private) packet dropped");

        assert_eq!(
            check_reply(&packet(48, 2, 6)).unwrap_err().reason(),
            "control_mode"
        );
        assert_eq!(
            check_reply(&packet(48, 2, 7)).unwrap_err().reason(),
            "private_mode"
        );
    }

    #[test]
    fn other_modes_are_wrong_mode() {
        for m in [0u8, 1, 2, 4, 5] {
            let r = check_request(&packet(48, 4, m)).unwrap_err();
            assert_eq!(r, Rejection::WrongMode(m));
            assert_eq!(r.reason(), "wrong_mode");
        }
        for m in [0u8, 1, 2, 3, 5] {
            let r = check_reply(&packet(48, 4, m)).unwrap_err();
            assert_eq!(r, Rejection::WrongMode(m));
            assert_eq!(r.reason(), "wrong_mode");
        }
    }

    #[test]
    fn leap_bits_are_ignored_by_checks() {
        let mut p = packet(48, 4, MODE_CLIENT);
        p[0] |= 0xC0;
        assert!(check_request(&p).is_ok());
    }

    #[test]
    fn checks_run_length_then_version_then_mode() {
        // Short and bad version and mode 6: length wins.
        assert_eq!(
            check_request(&packet(47, 0, 6)).unwrap_err(),
            Rejection::TooShort(47)
        );
        assert_eq!(
            check_request(&packet(1401, 0, 6)).unwrap_err(),
            Rejection::TooLong(1401)
        );
        // Bad version and mode 6: version wins.
        assert_eq!(
            check_request(&packet(48, 0, 6)).unwrap_err(),
            Rejection::BadVersion(0)
        );
    }

    #[test]
    fn reasons_are_distinct_and_listed() {
        let all = [
            Rejection::TooShort(0),
            Rejection::TooLong(0),
            Rejection::BadVersion(0),
            Rejection::WrongMode(6),
            Rejection::WrongMode(7),
            Rejection::WrongMode(1),
        ];
        let labels: Vec<_> = all.iter().map(Rejection::reason).collect();
        assert_eq!(labels, Rejection::ALL_REASONS);
        // Display never panics, even for modes a 3-bit field cannot hold.
        assert!(Rejection::WrongMode(200).to_string().contains("invalid"));
        assert!(Rejection::TooShort(3).to_string().contains("3 bytes"));
    }

    #[test]
    fn reply_view_reads_the_right_offsets() {
        let mut p = packet(48, 3, MODE_SERVER);
        p[1] = 0;
        p[24..32].copy_from_slice(&0x1111_1111_2222_2222u64.to_be_bytes());
        p[32..40].copy_from_slice(&0x3333_3333_4444_4444u64.to_be_bytes());
        p[40..48].copy_from_slice(&0x5555_5555_6666_6666u64.to_be_bytes());
        let v = check_reply(&p).unwrap();
        assert_eq!(
            v,
            ReplyView {
                version: 3,
                stratum: 0,
                origin: NtpTimestamp(0x1111_1111_2222_2222),
                receive: NtpTimestamp(0x3333_3333_4444_4444),
                transmit: NtpTimestamp(0x5555_5555_6666_6666),
            }
        );
    }

    #[test]
    fn kiss_o_death_passes_check_reply() {
        let mut p = packet(48, 4, MODE_SERVER);
        p[1] = 0;
        p[12..16].copy_from_slice(b"RATE");
        assert_eq!(check_reply(&p).unwrap().stratum, 0);
    }

    #[test]
    fn build_request_is_plain_v4_client() {
        let t = ts(3_900_000_000, 0xDEAD_BEEF);
        let p = build_request(t);
        assert_eq!(p[0], 0x23);
        assert!(p[1..40].iter().all(|&b| b == 0));
        let v = check_request(&p).unwrap();
        assert_eq!(v.version, 4);
        assert_eq!(v.transmit, t);
        assert!(v.receive.is_zero());
    }

    #[test]
    fn builtin_reply_passes_check_reply_and_echoes_transmit() {
        let src = BuiltinSource::default();
        let t1 = ts(3_900_000_000, 0x1234_5678);
        let mut req = build_request(t1);
        req[0] = (3 << 3) | MODE_CLIENT; // v3 client: version must be echoed
        req[2] = 6;
        let t2 = ts(3_900_000_001, 0x10);
        let t3 = ts(3_900_000_001, 0x20);
        let p = src.reply(&req, t2, t3).unwrap();
        let v = check_reply(&p).unwrap();
        assert_eq!(v.origin, t1);
        assert_eq!(v.receive, t2);
        assert_eq!(v.transmit, t3);
        assert_eq!(v.version, 3);
        assert_eq!(v.stratum, 2);
        assert_eq!(p[0] >> 6, 0, "LI must be 0");
        assert_eq!(p[2], 6);
        assert_eq!(p[3] as i8, -20);
        assert_eq!(&p[4..8], &[0; 4]);
        assert_ne!(&p[8..12], &[0; 4]);
        assert_eq!(&p[12..16], b"LOCL");
        assert_eq!(&p[16..24], &t2.0.to_be_bytes());
        // A receive time with chronyd's interleaved flag (lowest bit) loses it: this source
        // cannot be asked about its replies.
        let flagged = ts(3_900_000_001, 0x11);
        let p = src.reply(&req, flagged, t3).unwrap();
        assert_eq!(check_reply(&p).unwrap().receive, t2);
    }

    #[test]
    fn builtin_reply_clamps_poll_and_uses_configured_fields() {
        let src = BuiltinSource {
            stratum: 10,
            precision: -7,
            reference_id: [127, 0, 0, 1],
        };
        let mut req = build_request(ts(1, 1));
        for (poll, want) in [(0u8, 4u8), (0xFA, 4), (30, 17), (10, 10)] {
            req[2] = poll;
            let p = src.reply(&req, ts(2, 0), ts(2, 1)).unwrap();
            assert_eq!(p[2], want, "poll {poll}");
            assert_eq!(p[1], 10);
            assert_eq!(p[3] as i8, -7);
            assert_eq!(&p[12..16], &[127, 0, 0, 1]);
        }
    }

    #[test]
    fn builtin_reply_refuses_non_requests() {
        let src = BuiltinSource::default();
        let ctl = packet(48, 2, MODE_CONTROL);
        assert_eq!(
            src.reply(&ctl, ts(1, 0), ts(1, 0)).unwrap_err().reason(),
            "control_mode"
        );
        assert_eq!(
            src.reply(&[0u8; 10], ts(1, 0), ts(1, 0)).unwrap_err(),
            Rejection::TooShort(10)
        );
        let reply = src
            .reply(&build_request(ts(1, 0)), ts(1, 0), ts(1, 0))
            .unwrap();
        assert_eq!(
            src.reply(&reply, ts(1, 0), ts(1, 0)).unwrap_err(),
            Rejection::WrongMode(MODE_SERVER)
        );
    }

    #[test]
    fn sample_on_known_numbers() {
        // Server 0.625 s ahead, 0.125 s each way, 0.25 s processing.
        let t1 = ts(100, 0);
        let t2 = ts(100, 0xC000_0000); // 100.75
        let t3 = ts(101, 0); // 101.0
        let t4 = ts(100, 0x8000_0000); // 100.5
        let s = sample(t1, t2, t3, t4);
        assert_eq!(s.offset, 0.625);
        assert_eq!(s.delay, 0.25);
    }

    #[test]
    fn sample_across_era_boundary() {
        let t1 = ts(u32::MAX, 0);
        let t2 = ts(0, 0);
        let t3 = ts(0, 0x8000_0000);
        let t4 = ts(1, 0);
        let s = sample(t1, t2, t3, t4);
        assert_eq!(s.offset, 0.25);
        assert_eq!(s.delay, 1.5);
    }

    #[test]
    fn timestamp_from_known_system_times() {
        assert_eq!(
            NtpTimestamp::from_system_time(UNIX_EPOCH),
            ts(2_208_988_800, 0)
        );
        assert_eq!(
            NtpTimestamp::from_system_time(UNIX_EPOCH + Duration::from_millis(1500)),
            ts(2_208_988_801, 0x8000_0000)
        );
        // 2036-02-07T06:28:16Z is the start of era 1.
        let era1 = UNIX_EPOCH + Duration::from_secs(2_085_978_496);
        assert_eq!(NtpTimestamp::from_system_time(era1), NtpTimestamp::ZERO);
        assert_eq!(
            NtpTimestamp::from_system_time(era1 + Duration::from_secs(1)),
            ts(1, 0)
        );
        // Before the Unix epoch.
        assert_eq!(
            NtpTimestamp::from_system_time(UNIX_EPOCH - Duration::from_millis(250)),
            ts(2_208_988_799, 0xC000_0000)
        );
    }

    #[test]
    fn timestamp_round_trips_through_system_time() {
        let cases = [
            SystemTime::now(),
            UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789),
            UNIX_EPOCH + Duration::new(1_700_000_000, 999_999_999),
            UNIX_EPOCH + Duration::new(2_200_000_000, 1), // era 1
            UNIX_EPOCH - Duration::new(12_345, 678_000_000),
        ];
        for t in cases {
            let n = NtpTimestamp::from_system_time(t);
            assert_eq!(n.to_system_time(), Some(t), "{t:?}");
            let unix = match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_secs_f64(),
                Err(e) => -e.duration().as_secs_f64(),
            };
            assert!((n.to_unix_f64() - unix).abs() < 1e-6, "{t:?}");
        }
    }

    #[test]
    fn diff_seconds_handles_era_wrap() {
        let before = ts(u32::MAX, 0x8000_0000); // end of era 0
        let after = ts(1, 0); // early era 1
        assert_eq!(after.diff_seconds(before), 1.5);
        assert_eq!(before.diff_seconds(after), -1.5);
        assert_eq!(ts(5, 0).diff_seconds(ts(7, 0x4000_0000)), -2.25);
        assert_eq!(ts(5, 0).diff_seconds(ts(5, 0)), 0.0);
    }

    #[test]
    fn zero_and_parts() {
        assert!(NtpTimestamp::ZERO.is_zero());
        assert!(NtpTimestamp::default().is_zero());
        assert!(!ts(0, 1).is_zero());
        let t = ts(0xAABB_CCDD, 0x1122_3344);
        assert_eq!(t.seconds(), 0xAABB_CCDD);
        assert_eq!(t.fraction(), 0x1122_3344);
        assert_eq!(t.0, 0xAABB_CCDD_1122_3344);
    }
}
