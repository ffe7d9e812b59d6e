//! The relay as a transparent clock: each relay measures how long an exchange spent inside it
//! and takes that time out of the timestamps it carries back.
//!
//! Per exchange a relay knows its request residence `r_req` (request received -> request sent
//! on) and its reply residence `r_rep` (reply received -> reply sent on). In the reply it
//! rewrites the receive timestamp T2 := T2 - r_req and the transmit timestamp T3 := T3 + r_rep.
//! The client then computes the RFC 5905 offset and delay as if the time server stood at the
//! relay's wire; two relays correcting compose (each takes out its own part). The residences
//! are differences on the relay's own clock, so the relay's clock need not be synchronised:
//! only its rate matters, over a millisecond.
//!
//! chronyd's interleaved mode (`xleave`) needs two more things:
//! - its next request echoes the T2 it received, corrected, as the origin, and the time server
//!   recognises only the value it sent: [`Translations`] maps each corrected T2 back to the
//!   original, and the relay puts the original back into the request it forwards;
//! - an interleaved reply's T3 is the transmit time of the previous reply, so it gets that
//!   previous reply's residence, which the translation remembers too.
//!
//! What cannot be rewritten safely passes unchanged, counted by [`Unchanged`] reason: a MAC or
//! extension fields (whatever covers the timestamps is the endpoints' business), anything but
//! a plain NTPv3/v4 server reply, a residence that is negative or over [`MAX_RESIDENCE`] (the
//! clock stepped in between), an interleaved reply whose previous reply this relay did not
//! correct. A reply is corrected whole or not at all.

use std::collections::VecDeque;
use std::collections::hash_map::Entry;
use std::time::{Duration, Instant, SystemTime};

use crate::hash::{KeyedMap, keyed_map};
use crate::ntp::{self, NotRewritable, NtpTimestamp};

/// Longest residence believed. A relay holds a datagram for microseconds; a second means the
/// wall clock was stepped between the two readings, or the host stalled, and either way the
/// difference is not the time the datagram spent here.
pub const MAX_RESIDENCE: Duration = Duration::from_secs(1);

/// Corrected receive timestamps remembered for interleaved requests. Each reply corrected adds
/// one (about 40 bytes); the oldest goes first, and a client whose translation went is
/// answered in basic mode once, then interleaved again.
pub const TRANSLATION_CAPACITY: usize = 16_384;

/// How long a translation is kept: past chronyd's default maximum poll interval (1024 s) with
/// room to spare. A client polling less often is answered in basic mode.
pub const TRANSLATION_TTL: Duration = Duration::from_secs(4096);

/// Longest send lag believed: from the clock read a datagram was stamped with to the kernel's
/// transmit timestamp of it. A relay hands a datagram to the kernel within microseconds of
/// stamping it; more means the clock was stepped, or the timestamp is another datagram's.
pub const MAX_SEND_LAG: Duration = Duration::from_millis(10);

/// Send lags remembered by [`SendLag`].
const SEND_LAG_SAMPLES: usize = 15;

/// How long a relay's datagrams take from the clock read they are stamped with to the wire,
/// measured on its earlier datagrams (kernel transmit timestamps), so that a reply, whose
/// departure must be written into the reply before it leaves, can be stamped with its
/// predicted departure rather than the moment it was finished. The prediction is the median
/// of the last few lags: one datagram that waited behind a busy CPU does not move it.
#[derive(Debug, Clone, Default)]
pub struct SendLag {
    /// Lags in nanoseconds, a ring of the last [`SEND_LAG_SAMPLES`] in arrival order.
    samples: [u32; SEND_LAG_SAMPLES],
    /// The same lags, sorted: kept so by insertion, so the median costs a read (a reply is
    /// predicted on every send; a sort per reply was a tenth of the relay's instructions).
    sorted: [u32; SEND_LAG_SAMPLES],
    len: usize,
    next: usize,
    /// The clock read of the last datagram [`SendLag::due`] chose, and when the next one is
    /// due (kept, so that the check per datagram is two comparisons, not a subtraction).
    last_due: Option<(SystemTime, SystemTime)>,
}

/// Once the window is full, at most one datagram per this much time is measured: devices
/// polling every few seconds each, even hundreds of them behind one server relay, nearly
/// every one; under load a thousand a second, while each kernel timestamp costs the relay two
/// setsockopt calls and an error-queue read and the kernel a queued message. Not sparser: the
/// window must follow a change of pace (idle to back-to-back) within milliseconds, or the
/// stale lags of the idle pace over-correct (one measured datagram per 10 ms put a
/// back-to-back client's delay at -33 us in `make bench`, 12:27 on 2026-12-03).
pub const SEND_LAG_SPACING: Duration = Duration::from_millis(1);

impl SendLag {
    /// One measured lag: the kernel's transmit timestamp minus the clock read. Lags outside
    /// 0 to [`MAX_SEND_LAG`] are not believed; false for those.
    pub fn observe(&mut self, read: SystemTime, transmitted: SystemTime) -> bool {
        let Ok(lag) = transmitted.duration_since(read) else {
            return false;
        };
        if lag > MAX_SEND_LAG {
            return false;
        }
        // At most 10 ms: fits.
        let lag = lag.as_nanos() as u32;
        if self.len == SEND_LAG_SAMPLES {
            // The oldest goes out of the sorted window first.
            let oldest = self.samples[self.next];
            if let Some(at) = self.sorted.iter().position(|&v| v == oldest) {
                self.sorted.copy_within(at + 1.., at);
            }
            self.len -= 1;
        }
        let at = self.sorted[..self.len].partition_point(|&v| v <= lag);
        self.sorted.copy_within(at..self.len, at + 1);
        self.sorted[at] = lag;
        self.len += 1;
        self.samples[self.next] = lag;
        self.next = (self.next + 1) % SEND_LAG_SAMPLES;
        true
    }

    /// Whether the datagram stamped with the clock read `read`, about to be sent, should be
    /// measured (its kernel transmit timestamp asked for): each one until the window is full,
    /// then one per [`SEND_LAG_SPACING`].
    /// A clock stepped back makes the next datagram due (rather than none until the clock is
    /// back where it was).
    pub fn due(&mut self, read: SystemTime) -> bool {
        let due = self.len < SEND_LAG_SAMPLES
            || self
                .last_due
                .is_none_or(|(last, next)| read >= next || read < last);
        if due {
            self.last_due = Some((read, read.checked_add(SEND_LAG_SPACING).unwrap_or(read)));
        }
        due
    }

    /// The lag to expect for the next datagram: the median of the recent ones, zero until
    /// one was measured.
    pub fn predict(&self) -> Duration {
        if self.len == 0 {
            return Duration::ZERO;
        }
        Duration::from_nanos(u64::from(self.sorted[self.len / 2]))
    }
}

/// Which way a datagram crosses the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// From the NTP client towards the time server.
    Request,
    /// From the time server back to the NTP client.
    Reply,
}

/// Which exchange a corrected reply belonged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corrected {
    Basic,
    Interleaved,
    /// A basic reply whose T3 was also moved to the time server's own transmit time, which it
    /// gave in its interleaved mode ([`crate::time_server_tx`]).
    TimeServerTx,
}

/// Why a reply passed with its timestamps unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unchanged {
    /// `timestamp_correction = false` on this relay.
    Disabled,
    /// A MAC follows the header.
    Mac,
    /// Extension fields follow the header.
    ExtensionFields,
    /// Not a plain NTPv3/v4 server reply (another version, a kiss-o'-death, a zero timestamp).
    NotPlain,
    /// A residence came out negative: the wall clock went back in between.
    NegativeResidence,
    /// A residence came out over [`MAX_RESIDENCE`].
    LargeResidence,
    /// A residence is not known: the request's departure was not noted, or an interleaved
    /// reply's previous reply was not corrected here.
    UnknownResidence,
}

/// What happened to one reply's timestamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Corrected(Corrected),
    Unchanged(Unchanged),
}

impl Outcome {
    /// Every outcome, so counters can be registered up front and show zero.
    pub const ALL: [Outcome; 10] = [
        Outcome::Corrected(Corrected::Basic),
        Outcome::Corrected(Corrected::Interleaved),
        Outcome::Corrected(Corrected::TimeServerTx),
        Outcome::Unchanged(Unchanged::Disabled),
        Outcome::Unchanged(Unchanged::Mac),
        Outcome::Unchanged(Unchanged::ExtensionFields),
        Outcome::Unchanged(Unchanged::NotPlain),
        Outcome::Unchanged(Unchanged::NegativeResidence),
        Outcome::Unchanged(Unchanged::LargeResidence),
        Outcome::Unchanged(Unchanged::UnknownResidence),
    ];

    pub fn is_corrected(self) -> bool {
        matches!(self, Outcome::Corrected(_))
    }

    /// Stable snake_case label for metrics.
    pub fn reason(self) -> &'static str {
        match self {
            Outcome::Corrected(Corrected::Basic) => "basic",
            Outcome::Corrected(Corrected::Interleaved) => "interleaved",
            Outcome::Corrected(Corrected::TimeServerTx) => "basic_time_server_tx",
            Outcome::Unchanged(Unchanged::Disabled) => "disabled",
            Outcome::Unchanged(Unchanged::Mac) => "mac",
            Outcome::Unchanged(Unchanged::ExtensionFields) => "extension_fields",
            Outcome::Unchanged(Unchanged::NotPlain) => "not_plain",
            Outcome::Unchanged(Unchanged::NegativeResidence) => "negative_residence",
            Outcome::Unchanged(Unchanged::LargeResidence) => "large_residence",
            Outcome::Unchanged(Unchanged::UnknownResidence) => "unknown_residence",
        }
    }
}

impl From<NotRewritable> for Unchanged {
    fn from(why: NotRewritable) -> Self {
        match why {
            NotRewritable::Mac => Unchanged::Mac,
            NotRewritable::ExtensionFields => Unchanged::ExtensionFields,
            NotRewritable::NotPlain => Unchanged::NotPlain,
        }
    }
}

/// Where a relay's residence times and correction outcomes go (the shell's metrics). Called
/// once per reply on the datagram path: implementations must not block.
pub trait Observer: Send + Sync {
    fn residence(&self, direction: Direction, seconds: f64);
    fn outcome(&self, outcome: Outcome);
}

/// The time between two wall-clock readings of one datagram, if it can be believed.
pub fn residence(received: SystemTime, sent: SystemTime) -> Result<Duration, Unchanged> {
    match sent.duration_since(received) {
        Ok(d) if d <= MAX_RESIDENCE => Ok(d),
        Ok(_) => Err(Unchanged::LargeResidence),
        Err(_) => Err(Unchanged::NegativeResidence),
    }
}

/// What a relay knows of one reply when it leaves: the residences of its request and of the
/// reply whose transmit time its T3 carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Residences {
    /// Request received -> request sent on.
    pub request: Result<Duration, Unchanged>,
    /// Reply received -> reply sent on (this reply).
    pub reply: Result<Duration, Unchanged>,
    /// For an interleaved reply, the residence here of the previous reply (whose transmit
    /// time the T3 is); None for a basic reply.
    pub interleaved_previous: Option<Result<Duration, Unchanged>>,
    /// For a basic reply, the time server's own send lag (its T3 to its kernel transmit
    /// timestamp), when it gave it ([`crate::time_server_tx`]): added to the reply's residence.
    pub time_server_lag: Option<crate::time_server_tx::Shift>,
}

/// A corrected reply: what the relay must remember for the client's next interleaved request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Correction {
    pub kind: Corrected,
    pub rewritten: ntp::Rewritten,
}

/// Rewrites a server reply's T2 and T3 for the residences, or leaves it as it is and says why.
pub fn correct(datagram: &mut [u8], residences: &Residences) -> Result<Correction, Unchanged> {
    ntp::rewritable_reply(datagram)?;
    let request = residences.request?;
    let reply = residences.reply?;
    let (later, kind) = match (residences.interleaved_previous, residences.time_server_lag) {
        (None, None) => (reply, Corrected::Basic),
        (None, Some(shift)) => (
            shift.apply(reply).ok_or(Unchanged::NegativeResidence)?,
            Corrected::TimeServerTx,
        ),
        (Some(previous), _) => (previous?, Corrected::Interleaved),
    };
    let rewritten = ntp::correct_reply(datagram, request, later).ok_or(Unchanged::NotPlain)?;
    Ok(Correction { kind, rewritten })
}

/// What a corrected receive timestamp stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The receive timestamp as the time server sent it.
    pub original: NtpTimestamp,
    /// The residence here of the reply that carried it.
    pub reply_residence: Duration,
}

#[derive(Debug, Clone, Copy)]
struct TranslationEntry {
    translation: Translation,
    /// Which queue slot is this entry's (a key written again has a newer one).
    serial: u64,
}

/// Corrected receive timestamp -> the original and its reply's residence, bounded in size and
/// age. Lookups do not consume: chronyd repeats the same origin when a request went unanswered.
#[derive(Debug)]
pub struct Translations {
    // Keyed with per-process secrets (crate::hash): the keys pass through the clients' hands.
    // (std's SipHash cost a reply about 450 instructions here: three operations per insert.)
    map: KeyedMap<u64, TranslationEntry>,
    /// (key, deadline, serial), oldest first.
    order: VecDeque<(u64, Instant, u64)>,
    capacity: usize,
    ttl: Duration,
    next_serial: u64,
}

impl Translations {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Translations {
            map: keyed_map(0),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            ttl,
            next_serial: 0,
        }
    }

    /// Remembers that the relay wrote `corrected` where the time server had written
    /// `translation.original`.
    pub fn insert(&mut self, now: Instant, corrected: NtpTimestamp, translation: Translation) {
        self.expire(now);
        if corrected.is_zero() {
            return;
        }
        while self.map.len() >= self.capacity {
            if !self.pop_oldest() {
                break;
            }
        }
        let deadline = now.checked_add(self.ttl).unwrap_or(now);
        let serial = self.next_serial;
        self.next_serial = self.next_serial.wrapping_add(1);
        self.map.insert(
            corrected.0,
            TranslationEntry {
                translation,
                serial,
            },
        );
        self.order.push_back((corrected.0, deadline, serial));
    }

    /// The translation of a request's origin, if the relay wrote it and still remembers.
    pub fn get(&mut self, now: Instant, corrected: NtpTimestamp) -> Option<Translation> {
        self.expire(now);
        if corrected.is_zero() {
            return None;
        }
        self.map.get(&corrected.0).map(|entry| entry.translation)
    }

    /// Replaces the reply residence remembered with `corrected` by a better measurement (the
    /// reply's kernel transmit timestamp, known only once it has left).
    pub fn refine(&mut self, corrected: NtpTimestamp, reply_residence: Duration) {
        if let Some(entry) = self.map.get_mut(&corrected.0) {
            entry.translation.reply_residence = reply_residence;
        }
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(_, deadline, _)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.pop_oldest();
        }
    }

    /// Drops the oldest queue slot and its entry if the slot is the entry's current one (a key
    /// written again has a newer slot). False when the queue is empty.
    fn pop_oldest(&mut self) -> bool {
        let Some((key, _, serial)) = self.order.pop_front() else {
            return false;
        };
        // One look-up, not a get and a remove.
        if let Entry::Occupied(entry) = self.map.entry(key) {
            if entry.get().serial == serial {
                entry.remove();
            }
        }
        true
    }
}

impl Default for Translations {
    fn default() -> Self {
        Translations::new(TRANSLATION_CAPACITY, TRANSLATION_TTL)
    }
}

#[cfg(test)]
mod tests;
