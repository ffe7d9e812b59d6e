//! Outstanding NTP requests, so each reply goes back to whoever asked.
//!
//! The client relay multiplexes many local sockets over one DTLS association,
//! and the server relay multiplexes many DTLS peers over one upstream socket
//! to chronyd. In both cases the only thing tying a reply to its request is
//! a timestamp: a normal reply's origin equals the request's transmit
//! timestamp, and an interleaved (chronyd `xleave`) reply's origin equals the
//! request's receive-timestamp field. Each entry is therefore reachable by
//! its transmit key and, when usable, its receive key.
//!
//! Sans-I/O: the caller passes `now` and drives expiry from its own timer
//! using [`PendingTable::next_deadline`].

use std::collections::VecDeque;
use std::fmt;
use std::time::{Duration, Instant};

use crate::hash::{KeyedMap, keyed_map};

/// Longest ttl honoured. NTP replies arrive within seconds; the cap keeps
/// `now + ttl` far from the end of `Instant`'s range.
pub const MAX_TTL: Duration = Duration::from_secs(3600);

// Up-front allocation is capped so a huge configured capacity costs memory
// only as entries actually arrive (and cannot abort on allocation).
const PREALLOC_LIMIT: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertOutcome {
    Inserted,
    /// The oldest entry was evicted to make room.
    InsertedEvictingOldest,
    /// Same transmit timestamp already pending from the same address: a
    /// retransmission, entry refreshed.
    Refreshed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InsertError {
    /// The transmit timestamp is already pending for a different address, or
    /// is another pending entry's receive key: first come keeps it, so nobody
    /// can steal a reply.
    Collision,
    /// A zero transmit timestamp can't be matched.
    ZeroTransmit,
}

impl fmt::Display for InsertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            InsertError::Collision => "transmit timestamp already pending for another request",
            InsertError::ZeroTransmit => "zero transmit timestamp cannot be matched to a reply",
        })
    }
}

impl std::error::Error for InsertError {}

#[derive(Debug, Clone, Copy)]
struct Entry<A, T> {
    addr: A,
    /// What the caller keeps with the request (e.g. when it arrived and left).
    value: T,
    /// Only set when the key was free at insert time and is in `by_receive`.
    receive: Option<u64>,
    deadline: Instant,
    generation: u64,
}

/// Queue item; stale once its entry is gone or has been refreshed under a
/// newer generation.
#[derive(Debug, Clone, Copy)]
struct Slot {
    deadline: Instant,
    transmit: u64,
    generation: u64,
}

/// Bounded table of requests awaiting replies, keyed by NTP timestamps
/// (as raw `u64`s) and mapping to the return address `A`.
///
/// Invariants: transmit keys and receive keys are disjoint, so a reply origin
/// names at most one entry; every entry has exactly one current slot in
/// `queue`; the queue is in deadline order and its front, if any, is current.
#[derive(Debug, Clone)]
pub struct PendingTable<A, T = ()> {
    // The keys are chosen by remote parties: a keyed hash (crate::hash), never an unkeyed one.
    entries: KeyedMap<u64, Entry<A, T>>,
    /// receive key -> transmit key of the owning entry.
    by_receive: KeyedMap<u64, u64>,
    queue: VecDeque<Slot>,
    capacity: usize,
    ttl: Duration,
    next_generation: u64,
}

/// Which key of its request a reply's origin matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matched {
    /// The request's transmit timestamp: a basic-mode reply.
    Transmit,
    /// The request's receive field: an interleaved reply (chronyd `xleave`).
    Receive,
}

/// A reply's request, as [`PendingTable::take_entry`] finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken<A, T> {
    pub addr: A,
    pub value: T,
    pub matched: Matched,
    /// The request's transmit timestamp (its key).
    pub transmit: u64,
}

impl<A: Copy + Eq, T: Default> PendingTable<A, T> {
    /// [`PendingTable::insert_with`] with a default value.
    pub fn insert(
        &mut self,
        now: Instant,
        transmit: u64,
        receive: u64,
        addr: A,
    ) -> Result<InsertOutcome, InsertError> {
        self.insert_with(now, transmit, receive, addr, T::default())
    }

    /// [`PendingTable::take_entry`], the address only.
    pub fn take(&mut self, now: Instant, origin: u64) -> Option<A> {
        self.take_entry(now, origin).map(|taken| taken.addr)
    }
}

impl<A: Copy + Eq, T> PendingTable<A, T> {
    /// `capacity` 0 is treated as 1, and `ttl` is capped at [`MAX_TTL`].
    /// A zero ttl makes every entry expire the moment it is inserted.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        let capacity = capacity.max(1);
        let prealloc = capacity.min(PREALLOC_LIMIT);
        PendingTable {
            entries: keyed_map(prealloc),
            by_receive: keyed_map(prealloc),
            queue: VecDeque::with_capacity(prealloc.saturating_mul(2)),
            capacity,
            ttl: ttl.min(MAX_TTL),
            next_generation: 0,
        }
    }

    /// Records a request with transmit timestamp `transmit` and receive field
    /// `receive` (0 if unset) from `addr`.
    ///
    /// Never refuses for lack of room: when full, the oldest entry goes,
    /// being the one most likely already lost. The receive key is indexed
    /// only if it is nonzero and not already some other live entry's key;
    /// otherwise the entry is still matched by its transmit key.
    ///
    /// `now` should not go backwards; if it does, deadlines are held in
    /// insertion order rather than misordering the queue.
    pub fn insert_with(
        &mut self,
        now: Instant,
        transmit: u64,
        receive: u64,
        addr: A,
        value: T,
    ) -> Result<InsertOutcome, InsertError> {
        if transmit == 0 {
            return Err(InsertError::ZeroTransmit);
        }
        // A key held by an expired entry belongs to nobody: a late
        // retransmission or a reused timestamp must not be refused for it.
        self.purge_owner_if_expired(now, transmit);
        if self.by_receive.contains_key(&transmit) {
            return Err(InsertError::Collision);
        }

        let deadline = self.deadline_for(now);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);

        let outcome = match self.entries.get_mut(&transmit) {
            Some(entry) if entry.addr == addr => {
                entry.deadline = deadline;
                entry.value = value;
                entry.generation = generation;
                // The retransmission may carry a different receive field;
                // it is re-indexed below like a fresh one.
                if let Some(old) = entry.receive.take() {
                    self.by_receive.remove(&old);
                }
                InsertOutcome::Refreshed
            }
            Some(_) => return Err(InsertError::Collision),
            None => {
                let evicted_live = self.entries.len() >= self.capacity && self.evict_oldest(now);
                self.entries.insert(
                    transmit,
                    Entry {
                        addr,
                        value,
                        receive: None,
                        deadline,
                        generation,
                    },
                );
                if evicted_live {
                    InsertOutcome::InsertedEvictingOldest
                } else {
                    InsertOutcome::Inserted
                }
            }
        };

        self.queue.push_back(Slot {
            deadline,
            transmit,
            generation,
        });
        self.index_receive(now, transmit, receive);
        self.compact_if_needed();
        // A refresh leaves the entry's previous slot stale, possibly at the
        // front.
        self.trim_front();
        Ok(outcome)
    }

    /// Takes the entry whose transmit or receive key equals `origin`, if it
    /// has not expired at `now`. Removes both of its keys. An expired entry
    /// found this way is removed too, and `None` returned: its requester has
    /// given up, and a stale reply would only mislead it.
    pub fn take_entry(&mut self, now: Instant, origin: u64) -> Option<Taken<A, T>> {
        if origin == 0 {
            return None;
        }
        let (transmit, matched) = if self.entries.contains_key(&origin) {
            (origin, Matched::Transmit)
        } else {
            (*self.by_receive.get(&origin)?, Matched::Receive)
        };
        let entry = self.remove_entry(transmit)?;
        (entry.deadline > now).then_some(Taken {
            addr: entry.addr,
            value: entry.value,
            matched,
            transmit,
        })
    }

    /// The value kept with the live request whose transmit timestamp is `transmit`.
    pub fn value_mut(&mut self, transmit: u64) -> Option<&mut T> {
        self.entries
            .get_mut(&transmit)
            .map(|entry| &mut entry.value)
    }

    /// Removes every entry whose deadline (insert time + ttl) is <= now;
    /// returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut expired = 0;
        while let Some(slot) = self.queue.front().copied() {
            if slot.deadline > now {
                break;
            }
            self.queue.pop_front();
            if self.is_current(&slot) && self.remove_entry(slot.transmit).is_some() {
                expired += 1;
            }
        }
        self.trim_front();
        expired
    }

    /// Earliest deadline among live entries, for the caller's timer.
    pub fn next_deadline(&self) -> Option<Instant> {
        // The front is kept current, and the queue is in deadline order.
        self.queue.front().map(|slot| slot.deadline)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn deadline_for(&self, now: Instant) -> Instant {
        // Cannot fail with ttl <= MAX_TTL and any real clock reading; if it
        // somehow does, expiring immediately is the harmless fallback.
        let deadline = now.checked_add(self.ttl).unwrap_or(now);
        match self.queue.back() {
            Some(last) if last.deadline > deadline => last.deadline,
            _ => deadline,
        }
    }

    fn is_current(&self, slot: &Slot) -> bool {
        self.entries
            .get(&slot.transmit)
            .is_some_and(|e| e.generation == slot.generation)
    }

    fn owner_of(&self, key: u64) -> Option<u64> {
        if self.entries.contains_key(&key) {
            Some(key)
        } else {
            self.by_receive.get(&key).copied()
        }
    }

    fn purge_owner_if_expired(&mut self, now: Instant, key: u64) {
        if let Some(owner) = self.owner_of(key)
            && self.entries.get(&owner).is_some_and(|e| e.deadline <= now)
        {
            self.remove_entry(owner);
        }
    }

    fn index_receive(&mut self, now: Instant, transmit: u64, receive: u64) {
        if receive == 0 || receive == transmit {
            return;
        }
        self.purge_owner_if_expired(now, receive);
        if self.owner_of(receive).is_some() {
            // Taken by another live entry: indexing it would let this
            // request capture that entry's reply.
            return;
        }
        if let Some(entry) = self.entries.get_mut(&transmit) {
            entry.receive = Some(receive);
            self.by_receive.insert(receive, transmit);
        }
    }

    /// Removes the oldest entry; returns whether it was still live (an
    /// expired one is just a purge the caller's timer had not got to yet).
    fn evict_oldest(&mut self, now: Instant) -> bool {
        while let Some(slot) = self.queue.pop_front() {
            if self.is_current(&slot) {
                self.remove_entry(slot.transmit);
                return slot.deadline > now;
            }
        }
        false
    }

    fn remove_entry(&mut self, transmit: u64) -> Option<Entry<A, T>> {
        let entry = self.entries.remove(&transmit)?;
        if let Some(receive) = entry.receive {
            self.by_receive.remove(&receive);
        }
        self.trim_front();
        Some(entry)
    }

    /// Keeps the front slot current so `next_deadline` is O(1); each stale
    /// slot is popped at most once, so this is amortised O(1).
    fn trim_front(&mut self) {
        while let Some(slot) = self.queue.front() {
            if self.is_current(slot) {
                break;
            }
            self.queue.pop_front();
        }
    }

    /// Stale slots left in the middle by `take` and refreshes are dropped
    /// once they could outnumber live ones. After a compaction at most
    /// `capacity` slots remain, so the next one is at least `capacity`
    /// pushes away: amortised O(1), and the queue never exceeds
    /// 2 * capacity.
    fn compact_if_needed(&mut self) {
        if self.queue.len() > self.capacity.saturating_mul(2) {
            let entries = &self.entries;
            self.queue.retain(|slot| {
                entries
                    .get(&slot.transmit)
                    .is_some_and(|e| e.generation == slot.generation)
            });
        }
    }

    #[cfg(test)]
    fn queue_len(&self) -> usize {
        self.queue.len()
    }

    #[cfg(test)]
    fn assert_invariants(&self) {
        assert!(self.entries.len() <= self.capacity);
        assert!(self.queue.len() <= self.capacity.saturating_mul(2));
        for (&rx, &tx) in &self.by_receive {
            assert!(!self.entries.contains_key(&rx), "key in both maps");
            assert_eq!(self.entries.get(&tx).and_then(|e| e.receive), Some(rx));
        }
        let mut current = 0;
        for w in self.queue.iter().zip(self.queue.iter().skip(1)) {
            assert!(w.0.deadline <= w.1.deadline, "queue out of order");
        }
        for slot in &self.queue {
            if self.is_current(slot) {
                current += 1;
                assert_eq!(
                    self.entries.get(&slot.transmit).map(|e| e.deadline),
                    Some(slot.deadline)
                );
            }
        }
        assert_eq!(current, self.entries.len(), "entry without current slot");
        if let Some(front) = self.queue.front() {
            assert!(self.is_current(front), "stale front");
        }
        for (&tx, e) in &self.entries {
            if let Some(rx) = e.receive {
                assert_eq!(self.by_receive.get(&rx), Some(&tx));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddr};

    const TTL: Duration = Duration::from_secs(2);

    type Table = PendingTable<SocketAddr>;

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, port))
    }

    #[test]
    fn insert_and_take_by_transmit() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        assert_eq!(t.insert(t0, 100, 0, addr(1)), Ok(InsertOutcome::Inserted));
        assert_eq!(t.len(), 1);
        assert_eq!(t.take(ms(t0, 10), 100), Some(addr(1)));
        assert!(t.is_empty());
        assert_eq!(t.take(ms(t0, 10), 100), None, "a reply is delivered once");
        t.assert_invariants();
    }

    #[test]
    fn take_by_receive_for_interleaved_reply() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        assert_eq!(t.take(ms(t0, 10), 555), Some(addr(1)));
        t.assert_invariants();
    }

    #[test]
    fn take_removes_both_keys() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        assert_eq!(t.take(ms(t0, 1), 100), Some(addr(1)));
        assert_eq!(t.take(ms(t0, 1), 555), None);

        t.insert(t0, 200, 666, addr(2)).unwrap();
        assert_eq!(t.take(ms(t0, 1), 666), Some(addr(2)));
        assert_eq!(t.take(ms(t0, 1), 200), None);
        assert!(t.is_empty());
        t.assert_invariants();
    }

    #[test]
    fn late_reply_is_not_matched() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        t.insert(t0, 200, 0, addr(2)).unwrap();
        assert_eq!(t.take(t0 + TTL, 100), None, "deadline is exclusive");
        assert_eq!(t.len(), 1, "expired entry found by take is removed");
        assert_eq!(t.take(t0 + TTL, 555), None);
        assert_eq!(t.take(ms(t0, 1999), 200), Some(addr(2)));
        assert!(t.is_empty());
        t.assert_invariants();
    }

    #[test]
    fn expire_counts_and_removes() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 1, 11, addr(1)).unwrap();
        t.insert(ms(t0, 100), 2, 0, addr(2)).unwrap();
        t.insert(ms(t0, 200), 3, 0, addr(3)).unwrap();
        t.insert(ms(t0, 300), 4, 0, addr(4)).unwrap();
        assert_eq!(t.take(ms(t0, 150), 2), Some(addr(2)));
        assert_eq!(t.expire(ms(t0, 1999)), 0);
        // Entry 2 was taken, so only 1 and 3 are due.
        assert_eq!(t.expire(ms(t0, 2200)), 2);
        assert_eq!(t.len(), 1);
        assert_eq!(t.take(ms(t0, 2200), 11), None);
        assert_eq!(t.take(ms(t0, 2200), 4), Some(addr(4)));
        assert_eq!(t.expire(ms(t0, 10_000)), 0);
        t.assert_invariants();
    }

    #[test]
    fn capacity_eviction_keeps_the_newest() {
        let t0 = Instant::now();
        let mut t = Table::new(3, TTL);
        for i in 1..=3u64 {
            assert_eq!(
                t.insert(ms(t0, i), i, i + 100, addr(i as u16)),
                Ok(InsertOutcome::Inserted)
            );
        }
        assert_eq!(
            t.insert(ms(t0, 4), 4, 104, addr(4)),
            Ok(InsertOutcome::InsertedEvictingOldest)
        );
        assert_eq!(
            t.insert(ms(t0, 5), 5, 0, addr(5)),
            Ok(InsertOutcome::InsertedEvictingOldest)
        );
        assert_eq!(t.len(), 3);
        assert_eq!(t.capacity(), 3);
        let now = ms(t0, 6);
        assert_eq!(t.take(now, 1), None);
        assert_eq!(
            t.take(now, 102),
            None,
            "evicted entry's receive key is gone"
        );
        assert_eq!(t.take(now, 3), Some(addr(3)));
        assert_eq!(t.take(now, 104), Some(addr(4)));
        assert_eq!(t.take(now, 5), Some(addr(5)));
        t.assert_invariants();
    }

    #[test]
    fn displacing_an_expired_entry_is_not_reported_as_eviction() {
        let t0 = Instant::now();
        let mut t = Table::new(1, TTL);
        t.insert(t0, 1, 0, addr(1)).unwrap();
        assert_eq!(
            t.insert(t0 + TTL, 2, 0, addr(2)),
            Ok(InsertOutcome::Inserted)
        );
        assert_eq!(t.len(), 1);
    }

    #[test]
    fn refresh_moves_entry_to_the_back_of_the_eviction_order() {
        let t0 = Instant::now();
        let mut t = Table::new(2, TTL);
        t.insert(ms(t0, 0), 1, 0, addr(1)).unwrap();
        t.insert(ms(t0, 1), 2, 0, addr(2)).unwrap();
        assert_eq!(
            t.insert(ms(t0, 2), 1, 0, addr(1)),
            Ok(InsertOutcome::Refreshed)
        );
        t.insert(ms(t0, 3), 3, 0, addr(3)).unwrap();
        assert_eq!(t.take(ms(t0, 4), 2), None, "2 was the oldest");
        assert_eq!(t.take(ms(t0, 4), 1), Some(addr(1)));
        t.assert_invariants();
    }

    #[test]
    fn collision_from_other_address_refused_original_still_routes() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        assert_eq!(
            t.insert(ms(t0, 1), 100, 0, addr(2)),
            Err(InsertError::Collision)
        );
        // Someone else's receive key cannot be claimed as a transmit key.
        assert_eq!(
            t.insert(ms(t0, 1), 555, 0, addr(2)),
            Err(InsertError::Collision)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.take(ms(t0, 2), 100), Some(addr(1)));
        t.assert_invariants();
    }

    #[test]
    fn collision_with_expired_entry_is_allowed() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        assert_eq!(
            t.insert(t0 + TTL, 100, 0, addr(2)),
            Ok(InsertOutcome::Inserted)
        );
        assert_eq!(
            t.insert(t0 + TTL, 555, 0, addr(3)),
            Ok(InsertOutcome::Inserted)
        );
        assert_eq!(t.take(ms(t0, 2001), 100), Some(addr(2)));
        assert_eq!(t.take(ms(t0, 2001), 555), Some(addr(3)));
        t.assert_invariants();
    }

    #[test]
    fn colliding_receive_key_is_not_indexed_and_other_entry_intact() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        // Receive field equal to another entry's receive key...
        assert_eq!(t.insert(t0, 200, 555, addr(2)), Ok(InsertOutcome::Inserted));
        // ...or to another entry's transmit key.
        assert_eq!(t.insert(t0, 300, 100, addr(3)), Ok(InsertOutcome::Inserted));
        t.assert_invariants();
        assert_eq!(t.take(ms(t0, 1), 555), Some(addr(1)));
        assert_eq!(t.take(ms(t0, 1), 200), Some(addr(2)));
        assert_eq!(t.take(ms(t0, 1), 300), Some(addr(3)));
        assert_eq!(t.take(ms(t0, 1), 100), None);
        t.assert_invariants();
    }

    #[test]
    fn same_address_retransmission_refreshes() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 555, addr(1)).unwrap();
        assert_eq!(
            t.insert(ms(t0, 1500), 100, 777, addr(1)),
            Ok(InsertOutcome::Refreshed)
        );
        assert_eq!(t.len(), 1);
        assert_eq!(t.next_deadline(), Some(ms(t0, 1500) + TTL));
        t.assert_invariants();
        // The new receive field replaced the old one.
        assert_eq!(t.take(ms(t0, 2500), 555), None);
        assert_eq!(t.take(ms(t0, 2500), 777), Some(addr(1)));
        t.assert_invariants();
    }

    #[test]
    fn zero_transmit_refused() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        assert_eq!(t.insert(t0, 0, 5, addr(1)), Err(InsertError::ZeroTransmit));
        assert!(t.is_empty());
        assert_eq!(t.take(t0, 0), None);
        assert_eq!(t.take(t0, 5), None);
    }

    #[test]
    fn zero_receive_not_indexed() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(t0, 100, 0, addr(1)).unwrap();
        t.insert(t0, 200, 0, addr(2)).unwrap();
        assert_eq!(t.take(t0, 0), None);
        assert_eq!(t.len(), 2);
        assert_eq!(t.take(t0, 100), Some(addr(1)));
        assert_eq!(t.take(t0, 200), Some(addr(2)));
        t.assert_invariants();
    }

    #[test]
    fn fifty_addresses_no_misrouting() {
        let t0 = Instant::now();
        let mut t = Table::new(64, TTL);
        let key = |i: u64| 0xE900_0000_0000_0000u64 + i * 0x1_0001;
        for i in 0..50u64 {
            let port = 40_000 + i as u16;
            let rx = if i % 2 == 0 { key(i) ^ 0xFFFF_FFFF } else { 0 };
            t.insert(ms(t0, i), key(i), rx, addr(port)).unwrap();
        }
        assert_eq!(t.len(), 50);
        // Reverse order, half via the interleaved key.
        for i in (0..50u64).rev() {
            let origin = if i % 4 == 0 {
                key(i) ^ 0xFFFF_FFFF
            } else {
                key(i)
            };
            assert_eq!(
                t.take(ms(t0, 100), origin),
                Some(addr(40_000 + i as u16)),
                "{i}"
            );
        }
        assert!(t.is_empty());
        t.assert_invariants();
    }

    #[test]
    fn next_deadline_tracks_oldest_live_entry() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        assert_eq!(t.next_deadline(), None);
        t.insert(ms(t0, 0), 1, 0, addr(1)).unwrap();
        t.insert(ms(t0, 10), 2, 0, addr(2)).unwrap();
        t.insert(ms(t0, 20), 3, 0, addr(3)).unwrap();
        assert_eq!(t.next_deadline(), Some(ms(t0, 0) + TTL));
        t.take(ms(t0, 30), 1);
        assert_eq!(t.next_deadline(), Some(ms(t0, 10) + TTL));
        t.take(ms(t0, 30), 3); // taking from the middle doesn't matter
        assert_eq!(t.next_deadline(), Some(ms(t0, 10) + TTL));
        t.insert(ms(t0, 40), 2, 0, addr(2)).unwrap(); // refresh
        assert_eq!(t.next_deadline(), Some(ms(t0, 40) + TTL));
        assert_eq!(t.expire(ms(t0, 40) + TTL), 1);
        assert_eq!(t.next_deadline(), None);
        t.assert_invariants();
    }

    #[test]
    fn backwards_time_keeps_queue_ordered() {
        let t0 = Instant::now();
        let mut t = Table::new(8, TTL);
        t.insert(ms(t0, 500), 1, 0, addr(1)).unwrap();
        t.insert(ms(t0, 100), 2, 0, addr(2)).unwrap();
        t.assert_invariants();
        assert_eq!(t.expire(ms(t0, 500) + TTL), 2);
    }

    #[test]
    fn degenerate_parameters_do_not_panic() {
        let t0 = Instant::now();
        let mut t = Table::new(0, Duration::MAX);
        assert_eq!(t.capacity(), 1);
        assert_eq!(t.ttl(), MAX_TTL);
        t.insert(t0, 1, 1, addr(1)).unwrap();
        assert_eq!(t.take(t0, 1), Some(addr(1)));

        let mut t = Table::new(usize::MAX, Duration::ZERO);
        t.insert(t0, 1, 2, addr(1)).unwrap();
        assert_eq!(t.take(t0, 1), None, "zero ttl expires immediately");
        t.insert(t0, u64::MAX, u64::MAX, addr(1)).unwrap();
        assert_eq!(t.expire(t0), 1);
        t.assert_invariants();
    }

    #[test]
    fn retransmissions_do_not_grow_the_queue() {
        let t0 = Instant::now();
        let mut t = Table::new(4, TTL);
        for i in 0..10_000u64 {
            t.insert(ms(t0, i / 100), 42, 0, addr(1)).unwrap();
            assert!(t.queue_len() <= 8);
        }
        assert_eq!(t.len(), 1);
        t.assert_invariants();
    }

    #[test]
    fn stale_slots_behind_a_live_front_are_compacted() {
        let t0 = Instant::now();
        let mut t = Table::new(4, TTL);
        t.insert(t0, 1, 0, addr(1)).unwrap();
        let mut max_queue = 0;
        for i in 0..1000u64 {
            // Each take leaves a stale slot that the live front shields from
            // trim_front; only compaction can drop it.
            t.insert(t0, 100 + i, 0, addr(2)).unwrap();
            assert_eq!(t.take(t0, 100 + i), Some(addr(2)));
            max_queue = max_queue.max(t.queue_len());
            assert!(t.queue_len() <= 8);
        }
        assert_eq!(max_queue, 8, "compaction ran");
        assert_eq!(t.next_deadline(), Some(t0 + TTL));
        assert_eq!(t.take(t0, 1), Some(addr(1)));
        assert_eq!(t.queue_len(), 0);
        t.assert_invariants();
    }

    struct XorShift(u64);

    impl XorShift {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// Straightforward O(n) reference implementation of the same rules,
    /// in eviction order.
    struct Model {
        v: Vec<(u64, Option<u64>, u16, Instant)>,
        cap: usize,
        ttl: Duration,
    }

    impl Model {
        fn owner(&self, key: u64) -> Option<usize> {
            self.v.iter().position(|e| e.0 == key || e.1 == Some(key))
        }

        fn purge(&mut self, now: Instant, key: u64) {
            if let Some(i) = self.owner(key)
                && self.v[i].3 <= now
            {
                self.v.remove(i);
            }
        }

        fn insert(
            &mut self,
            now: Instant,
            tx: u64,
            rx: u64,
            a: u16,
        ) -> Result<InsertOutcome, InsertError> {
            if tx == 0 {
                return Err(InsertError::ZeroTransmit);
            }
            self.purge(now, tx);
            if self.v.iter().any(|e| e.1 == Some(tx)) {
                return Err(InsertError::Collision);
            }
            let deadline = now + self.ttl;
            let out = match self.v.iter().position(|e| e.0 == tx) {
                Some(i) if self.v[i].2 == a => {
                    self.v.remove(i);
                    InsertOutcome::Refreshed
                }
                Some(_) => return Err(InsertError::Collision),
                None if self.v.len() >= self.cap => {
                    let old = self.v.remove(0);
                    if old.3 > now {
                        InsertOutcome::InsertedEvictingOldest
                    } else {
                        InsertOutcome::Inserted
                    }
                }
                None => InsertOutcome::Inserted,
            };
            self.v.push((tx, None, a, deadline));
            if rx != 0 && rx != tx {
                self.purge(now, rx);
                if self.owner(rx).is_none()
                    && let Some(last) = self.v.last_mut()
                {
                    last.1 = Some(rx);
                }
            }
            Ok(out)
        }

        fn take(&mut self, now: Instant, origin: u64) -> Option<u16> {
            if origin == 0 {
                return None;
            }
            let e = self.v.remove(self.owner(origin)?);
            (e.3 > now).then_some(e.2)
        }

        fn expire(&mut self, now: Instant) -> usize {
            let before = self.v.len();
            self.v.retain(|e| e.3 > now);
            before - self.v.len()
        }
    }

    #[test]
    fn randomized_against_model_stays_bounded() {
        const CAP: usize = 64;
        let ttl = Duration::from_millis(2000);
        let t0 = Instant::now();
        let mut now = t0;
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        let mut t: PendingTable<u16> = PendingTable::new(CAP, ttl);
        let mut m = Model {
            v: Vec::new(),
            cap: CAP,
            ttl,
        };
        let mut outcomes = [0usize; 5];
        let mut matched = 0usize;
        let mut max_queue = 0usize;
        let mut expired = 0usize;

        for step in 0..100_000u32 {
            // Alternate busy phases (table full, evictions) with quiet ones
            // (entries expire before they are pushed out).
            let max_step_ms = if (step / 5000) % 2 == 0 { 10 } else { 80 };
            now += Duration::from_millis(rng.below(max_step_ms));
            match rng.below(10) {
                0..=5 => {
                    // Small key space so collisions, refreshes and shared
                    // receive keys actually happen.
                    let tx = rng.below(400);
                    let rx = if rng.below(3) == 0 { 0 } else { rng.below(400) };
                    let a = rng.below(6) as u16;
                    let got = t.insert(now, tx, rx, a);
                    assert_eq!(got, m.insert(now, tx, rx, a), "step {step}");
                    let idx = match got {
                        Ok(InsertOutcome::Inserted) => 0,
                        Ok(InsertOutcome::InsertedEvictingOldest) => 1,
                        Ok(InsertOutcome::Refreshed) => 2,
                        Err(InsertError::Collision) => 3,
                        Err(InsertError::ZeroTransmit) => 4,
                    };
                    outcomes[idx] += 1;
                }
                6..=8 => {
                    let origin = rng.below(400);
                    let got = t.take(now, origin);
                    assert_eq!(got, m.take(now, origin), "step {step}");
                    matched += usize::from(got.is_some());
                }
                _ => {
                    let n = t.expire(now);
                    assert_eq!(n, m.expire(now), "step {step}");
                    expired += n;
                }
            }
            assert!(t.len() <= CAP);
            assert_eq!(t.len(), m.v.len());
            assert_eq!(t.next_deadline(), m.v.first().map(|e| e.3));
            max_queue = max_queue.max(t.queue_len());
            assert!(t.queue_len() <= 2 * CAP, "step {step}");
            if step % 97 == 0 {
                t.assert_invariants();
            }
        }
        t.assert_invariants();
        assert!(outcomes.iter().all(|&n| n > 0), "{outcomes:?}");
        assert!(matched > 1000, "{matched}");
        assert!(expired > 1000, "{expired}");
        assert!(max_queue > CAP, "stale slots accumulated: {max_queue}");
    }
}
