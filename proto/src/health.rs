//! The client relay's view of one established association: alive, dead, due for a rekey, quiet
//! long enough to need a keepalive, or alive with nothing behind it.
//!
//! An association is judged by DTLS-level evidence, not by whether the time server answered a
//! particular request. The server relay answers a keepalive probe ([`crate::ntp::keepalive`])
//! itself, so when NTP requests go unanswered, or an ICMP error says the server relay's
//! port is closed, the client asks the association itself: a few keepalives, the last one
//! given twice the measured round trip to be answered. Any authenticated record back proves
//! it alive: the time server behind it is down, which costs no handshake. Silence proves it
//! dead. A server relay that has never acknowledged a keepalive (an older ntp-dtls, or another
//! DTLS peer carrying plain NTP) is judged by NTP replies alone, as before.
//!
//! Pure: the tunnel reports what it sent and received and when, and asks for the verdict.

use std::time::{Duration, Instant};

/// When an association is checked, given up on, replaced or kept warm. Keys in the client's
/// config file.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    /// This many requests in a row without a reply, the oldest overdue by reply_grace: the
    /// association is checked with keepalives (or, with a peer that never acknowledges them,
    /// declared dead).
    pub dead_after_unanswered: u32,
    /// How long a reply may take before its request counts as unanswered. A burst of requests
    /// is in flight, not unanswered.
    pub reply_grace: Duration,
    /// A request unanswered this long: the association is checked likewise.
    pub dead_after: Duration,
    /// Keepalives sent to check an association before it is declared dead.
    pub probe_attempts: u32,
    /// The time between two keepalives of a check, and the least wait after the last one
    /// (the measured round trip, doubled, when that is longer).
    pub probe_spacing: Duration,
    /// Rekey after this many records sent. AES-GCM nonces in rtc-dtls are 64 random bits, so a
    /// collision reaches 2^-32 probability around 92 000 records: stay far below.
    pub rekey_after_records: u64,
    /// Rekey after this age, whatever the traffic.
    pub rekey_after: Duration,
    /// Send a keepalive after this much silence, so the server relay's idle timeout (1 h
    /// by default) never removes an association whose NTP client polls rarely.
    pub keepalive_after: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            dead_after_unanswered: 3,
            reply_grace: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            probe_attempts: 3,
            probe_spacing: Duration::from_millis(250),
            rekey_after_records: 50_000,
            rekey_after: Duration::from_secs(6 * 3600),
            keepalive_after: Duration::from_secs(300),
        }
    }
}

/// What the tunnel should do about an association now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Send a keepalive probe (to keep the association warm, or as part of a check); then
    /// report it with
    /// [`Health::keepalive_sent`].
    KeepAlive,
    /// Set up a fresh association beside this one, then switch.
    Rekey,
    /// Every keepalive of a check has gone unanswered so far: set up a replacement beside this
    /// association now, while the last one's wait runs out. If the association proves alive
    /// the replacement costs one handshake; if it is dead (a server relay that restarted and
    /// knows it no more) the replacement is already under way when the verdict comes.
    Replace,
    /// Give it up and handshake anew.
    Dead(DeathCause),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    /// The peer never acknowledges keepalives, and this many requests went unanswered.
    UnansweredRequests(u32),
    /// Likewise, one request unanswered for this long.
    NoReplyFor(Duration),
    /// Checked with this many keepalives, none acknowledged.
    NoAcknowledgement(u32),
}

impl std::fmt::Display for DeathCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeathCause::UnansweredRequests(n) => write!(f, "no reply to the last {n} requests"),
            DeathCause::NoReplyFor(d) => write!(f, "no reply for {:.1} s", d.as_secs_f64()),
            DeathCause::NoAcknowledgement(n) => {
                write!(f, "no record from the server relay after {n} keepalives")
            }
        }
    }
}

/// Why an association is being checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Suspicion {
    /// NTP requests went unanswered.
    Unanswered,
    /// An ICMP error said the server relay's port is closed (possibly forged).
    Unreachable,
    /// Right after the handshake: does the peer acknowledge keepalives at all?
    Discovery,
}

#[derive(Debug, Clone, Copy)]
struct Check {
    why: Suspicion,
    /// When the check began.
    started: Instant,
    sent: u32,
    /// When the next keepalive goes, or (all sent) when the check fails.
    next: Instant,
}

/// One established association's record.
#[derive(Debug, Clone)]
pub struct Health {
    established: Instant,
    records_sent: u64,
    unanswered: u32,
    oldest_unanswered: Option<Instant>,
    last_sent: Instant,
    /// The last authenticated record of any kind from the server relay.
    last_evidence: Instant,
    /// The peer has acknowledged at least one keepalive.
    acknowledges: bool,
    check: Option<Check>,
    /// Alive (it acknowledged a check) but NTP requests go unanswered.
    upstream_down: bool,
    /// Smoothed round trip of NTP exchanges and keepalive acknowledgements.
    rtt: Option<Duration>,
    /// When the last keepalive went, to time its acknowledgement.
    keepalive_at: Option<Instant>,
}

impl Health {
    /// A fresh association: a discovery check starts at once, to learn whether the peer
    /// acknowledges keepalives.
    pub fn new(now: Instant) -> Self {
        Health {
            established: now,
            records_sent: 0,
            unanswered: 0,
            oldest_unanswered: None,
            last_sent: now,
            last_evidence: now,
            acknowledges: false,
            check: Some(Check {
                why: Suspicion::Discovery,
                started: now,
                sent: 0,
                next: now,
            }),
            upstream_down: false,
            rtt: None,
            keepalive_at: None,
        }
    }

    pub fn request_sent(&mut self, now: Instant) {
        self.records_sent += 1;
        self.unanswered = self.unanswered.saturating_add(1);
        self.oldest_unanswered.get_or_insert(now);
        self.last_sent = now;
    }

    pub fn keepalive_sent(&mut self, now: Instant, policy: &HealthPolicy) {
        self.records_sent += 1;
        self.last_sent = now;
        self.keepalive_at = Some(now);
        let last_wait = self.last_wait(policy);
        if let Some(check) = self.check.as_mut() {
            check.sent += 1;
            // The keepalives of a check go probe_spacing apart, whatever the round trip: each
            // is one more chance through a lossy path. Only the wait after the last one
            // follows the round trip, so that a slow path's acknowledgement is not missed. (A
            // round trip inflated by a busy server relay, e.g. a reconnect storm just before
            // a restart, once spaced all three by it and delayed a death verdict by seconds.)
            check.next = now
                + if check.sent < policy.probe_attempts.max(1) {
                    policy.probe_spacing
                } else {
                    last_wait
                };
        }
    }

    /// An NTP reply came back through the association, `rtt` after its request.
    pub fn reply_received(&mut self, now: Instant, rtt: Option<Duration>) {
        self.unanswered = 0;
        self.oldest_unanswered = None;
        self.upstream_down = false;
        self.evidence(now, rtt);
    }

    /// A keepalive came back: the server relay acknowledging it.
    pub fn acknowledgement_received(&mut self, now: Instant) {
        self.acknowledges = true;
        let rtt = self
            .keepalive_at
            .take()
            .map(|sent| now.saturating_duration_since(sent));
        // A check answered while NTP requests go unanswered: the time server is down.
        if self
            .check
            .is_some_and(|check| check.why == Suspicion::Unanswered)
        {
            self.upstream_down = true;
            // Count afresh: the next run of unanswered requests starts the next check.
            self.unanswered = 0;
            self.oldest_unanswered = None;
        }
        self.evidence(now, rtt);
    }

    fn evidence(&mut self, now: Instant, rtt: Option<Duration>) {
        self.last_evidence = now;
        self.check = None;
        if let Some(sample) = rtt {
            self.rtt = Some(match self.rtt {
                None => sample,
                Some(smoothed) => (smoothed * 7 + sample) / 8,
            });
        }
    }

    /// An ICMP error on the association's socket: check it rather than believe it.
    pub fn unreachable(&mut self, now: Instant) {
        self.suspect(now, Suspicion::Unreachable);
    }

    fn suspect(&mut self, now: Instant, why: Suspicion) {
        if let Some(check) = self.check.as_mut() {
            // Requests unanswered while we still wait to learn whether the peer acknowledges
            // keepalives: the check under way answers both questions.
            if check.why == Suspicion::Discovery && why != Suspicion::Discovery {
                check.why = why;
            }
        } else {
            self.check = Some(Check {
                why,
                started: now,
                sent: 0,
                next: now,
            });
        }
    }

    pub fn records_sent(&self) -> u64 {
        self.records_sent
    }

    /// Alive, but the time server behind the server relay does not answer.
    pub fn upstream_down(&self) -> bool {
        self.upstream_down
    }

    /// The peer has acknowledged a keepalive at least once.
    pub fn acknowledges_keepalives(&self) -> bool {
        self.acknowledges
    }

    /// A check (not discovery) that has sent all its keepalives with none answered yet: how
    /// many went. The condition for [`Verdict::Replace`], and for reporting the association
    /// dead when its replacement takes over.
    pub fn unanswered_check(&self, policy: &HealthPolicy) -> Option<u32> {
        self.check
            .filter(|check| {
                check.why != Suspicion::Discovery && check.sent >= policy.probe_attempts.max(1)
            })
            .map(|check| check.sent)
    }

    /// When the check under way began, if one is.
    pub fn check_started(&self) -> Option<Instant> {
        self.check.map(|check| check.started)
    }

    /// What the association is being checked for, if it is.
    pub fn checking(&self) -> Option<Suspicion> {
        self.check.map(|check| check.why)
    }

    /// How long a check waits after its last keepalive: probe_spacing, or the smoothed round
    /// trip doubled when that is longer.
    fn last_wait(&self, policy: &HealthPolicy) -> Duration {
        policy
            .probe_spacing
            .max(self.rtt.map_or(Duration::ZERO, |rtt| rtt * 2))
    }

    /// NTP requests unanswered long enough to doubt the association.
    fn unanswered_cause(&self, now: Instant, policy: &HealthPolicy) -> Option<DeathCause> {
        let oldest = self.oldest_unanswered?;
        if self.unanswered >= policy.dead_after_unanswered && oldest + policy.reply_grace <= now {
            return Some(DeathCause::UnansweredRequests(self.unanswered));
        }
        let waited = now.saturating_duration_since(oldest);
        (waited >= policy.dead_after).then_some(DeathCause::NoReplyFor(waited))
    }

    /// The verdict now. Asking may start a check (which is why it takes `&mut self`).
    pub fn verdict(&mut self, now: Instant, policy: &HealthPolicy) -> Verdict {
        if let Some(cause) = self.unanswered_cause(now, policy) {
            if !self.acknowledges && self.check.is_none() {
                // A peer that never acknowledged a keepalive can only be judged by replies.
                return Verdict::Dead(cause);
            }
            self.suspect(now, Suspicion::Unanswered);
        }
        if let Some(check) = self.check {
            if check.next <= now {
                if check.sent < policy.probe_attempts.max(1) {
                    return Verdict::KeepAlive;
                }
                if check.why == Suspicion::Discovery {
                    // Never acknowledged: judged by NTP replies from now on.
                    self.check = None;
                } else {
                    return Verdict::Dead(DeathCause::NoAcknowledgement(check.sent));
                }
            } else if self.unanswered_check(policy).is_some() {
                return Verdict::Replace;
            }
        }
        if self.records_sent >= policy.rekey_after_records
            || now.saturating_duration_since(self.established) >= policy.rekey_after
        {
            return Verdict::Rekey;
        }
        if now.saturating_duration_since(self.last_sent) >= policy.keepalive_after {
            return Verdict::KeepAlive;
        }
        Verdict::Fine
    }

    /// When the verdict may next change without anything being sent or received (already past
    /// when it is due now). With `rekeying`, a rekey already under way, its deadline is left
    /// out: it has been acted on.
    pub fn next_deadline(&self, policy: &HealthPolicy, rekeying: bool) -> Instant {
        let mut next = self.last_sent + policy.keepalive_after;
        if !rekeying {
            next = next.min(self.established + policy.rekey_after);
            if self.records_sent >= policy.rekey_after_records {
                next = next.min(self.last_sent);
            }
        }
        if let Some(check) = self.check {
            // A check under way decides; unanswered requests can add nothing to it.
            return next.min(check.next);
        }
        if let Some(oldest) = self.oldest_unanswered {
            if self.unanswered >= policy.dead_after_unanswered {
                next = next.min(oldest + policy.reply_grace);
            }
            next = next.min(oldest + policy.dead_after);
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> HealthPolicy {
        HealthPolicy {
            rekey_after_records: 1_000,
            rekey_after: Duration::from_secs(3600),
            ..HealthPolicy::default()
        }
    }

    /// A fresh association whose peer acknowledged the discovery keepalive.
    fn acknowledged(t0: Instant) -> Health {
        let mut h = Health::new(t0);
        assert_eq!(h.verdict(t0, &policy()), Verdict::KeepAlive, "discovery");
        h.keepalive_sent(t0, &policy());
        h.acknowledgement_received(t0 + Duration::from_millis(1));
        assert!(h.acknowledges_keepalives());
        assert_eq!(h.checking(), None);
        h
    }

    fn ms(t0: Instant, n: u64) -> Instant {
        t0 + Duration::from_millis(n)
    }

    #[test]
    fn replies_keep_it_fine() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        for i in 0..5 {
            let t = t0 + Duration::from_secs(i);
            h.request_sent(t);
            h.reply_received(t, Some(Duration::from_micros(100)));
            assert_eq!(h.verdict(t, &policy()), Verdict::Fine);
        }
    }

    #[test]
    fn unanswered_requests_start_a_check_not_a_death() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        for _ in 0..3 {
            h.request_sent(t0);
        }
        // In flight, not unanswered: a burst is no suspicion.
        assert_eq!(h.verdict(t0, &policy()), Verdict::Fine);
        let overdue = ms(t0, 1000);
        assert_eq!(h.next_deadline(&policy(), false), overdue);
        assert_eq!(h.verdict(overdue, &policy()), Verdict::KeepAlive);
        assert_eq!(h.checking(), Some(Suspicion::Unanswered));
    }

    #[test]
    fn an_acknowledged_check_means_the_time_server_is_down_and_costs_no_handshake() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        for _ in 0..3 {
            h.request_sent(t0);
        }
        let t = ms(t0, 1000);
        assert_eq!(h.verdict(t, &policy()), Verdict::KeepAlive);
        h.keepalive_sent(t, &policy());
        h.acknowledgement_received(ms(t0, 1001));
        assert!(h.upstream_down());
        assert_eq!(h.verdict(ms(t0, 1001), &policy()), Verdict::Fine);
        // Long after: still no death; the next unanswered run checks again.
        for i in 0..3 {
            h.request_sent(ms(t0, 2000 + i));
        }
        assert_eq!(h.verdict(ms(t0, 3002), &policy()), Verdict::KeepAlive);
        // The time server comes back: an NTP reply clears it.
        h.reply_received(ms(t0, 3003), None);
        assert!(!h.upstream_down());
        assert_eq!(h.checking(), None);
    }

    #[test]
    fn an_unacknowledged_check_means_dead() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        h.unreachable(ms(t0, 10));
        let mut t = ms(t0, 10);
        for sent in 1..=3 {
            assert_eq!(h.verdict(t, &policy()), Verdict::KeepAlive);
            h.keepalive_sent(t, &policy());
            let expected = if sent < 3 {
                Verdict::Fine
            } else {
                // All three unanswered so far: a replacement goes up while the last one waits.
                Verdict::Replace
            };
            assert_eq!(h.verdict(t, &policy()), expected);
            assert_eq!(
                h.unanswered_check(&policy()),
                (sent == 3).then_some(3),
                "only once all three have gone"
            );
            t = h.next_deadline(&policy(), false);
        }
        assert_eq!(t, ms(t0, 10 + 750), "three keepalives 250 ms apart");
        assert_eq!(
            h.verdict(t, &policy()),
            Verdict::Dead(DeathCause::NoAcknowledgement(3))
        );
    }

    #[test]
    fn a_forged_unreachable_costs_one_keepalive() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        h.unreachable(ms(t0, 5));
        assert_eq!(h.verdict(ms(t0, 5), &policy()), Verdict::KeepAlive);
        h.keepalive_sent(ms(t0, 5), &policy());
        h.acknowledgement_received(ms(t0, 6));
        assert_eq!(h.checking(), None);
        assert!(
            !h.upstream_down(),
            "an ICMP check says nothing of the time server"
        );
        assert_eq!(h.verdict(ms(t0, 2000), &policy()), Verdict::Fine);
    }

    #[test]
    fn a_peer_that_never_acknowledges_is_judged_by_replies() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let mut t = t0;
        for _ in 0..3 {
            assert_eq!(h.verdict(t, &policy()), Verdict::KeepAlive);
            h.keepalive_sent(t, &policy());
            t = h.next_deadline(&policy(), false);
        }
        assert_eq!(
            h.verdict(t, &policy()),
            Verdict::Fine,
            "discovery ends quietly"
        );
        assert_eq!(h.checking(), None);
        for _ in 0..3 {
            h.request_sent(t);
        }
        assert_eq!(
            h.verdict(t + Duration::from_secs(1), &policy()),
            Verdict::Dead(DeathCause::UnansweredRequests(3))
        );
        let mut h2 = Health::new(t0);
        h2.check = None;
        h2.request_sent(t0);
        assert!(matches!(
            h2.verdict(t0 + Duration::from_secs(5), &policy()),
            Verdict::Dead(DeathCause::NoReplyFor(_))
        ));
    }

    #[test]
    fn the_wait_after_the_last_keepalive_follows_the_round_trip() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        // A long path: the smoothed round trip converges on 400 ms.
        for _ in 0..60 {
            h.request_sent(t0);
            h.reply_received(ms(t0, 400), Some(Duration::from_millis(400)));
        }
        h.unreachable(ms(t0, 500));
        let mut t = ms(t0, 500);
        for _ in 0..2 {
            assert_eq!(h.verdict(t, &policy()), Verdict::KeepAlive);
            h.keepalive_sent(t, &policy());
            let next = h.next_deadline(&policy(), false);
            assert_eq!(
                next - t,
                Duration::from_millis(250),
                "keepalives 250 ms apart"
            );
            t = next;
        }
        assert_eq!(h.verdict(t, &policy()), Verdict::KeepAlive);
        h.keepalive_sent(t, &policy());
        let last = t;
        let next = h.next_deadline(&policy(), false);
        assert!(
            next > last + Duration::from_millis(750) && next <= last + Duration::from_millis(800),
            "the last keepalive waits about 2 x 400 ms: {:?}",
            next - last
        );
        assert_eq!(
            h.verdict(next - Duration::from_millis(1), &policy()),
            Verdict::Replace
        );
        // A late acknowledgement (of any of the three) still proves it alive.
        h.acknowledgement_received(next - Duration::from_millis(1));
        assert_eq!(h.checking(), None);
        assert_eq!(h.verdict(next, &policy()), Verdict::Fine);
    }

    #[test]
    fn rekey_by_records_and_by_age() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        let p = HealthPolicy {
            rekey_after_records: 10,
            ..policy()
        };
        for _ in 0..10 {
            h.request_sent(t0);
            h.reply_received(t0, None);
        }
        assert_eq!(h.verdict(t0, &p), Verdict::Rekey);
        assert!(h.next_deadline(&p, false) <= t0, "due at once");
        let mut h = acknowledged(t0);
        assert_eq!(
            h.verdict(t0 + Duration::from_secs(3600), &policy()),
            Verdict::Rekey
        );
    }

    #[test]
    fn silence_asks_for_a_keepalive_and_the_keepalive_resets_it() {
        let t0 = Instant::now();
        let mut h = acknowledged(t0);
        let later = t0 + Duration::from_secs(300);
        assert_eq!(h.next_deadline(&policy(), false), later);
        assert_eq!(h.verdict(later, &policy()), Verdict::KeepAlive);
        h.keepalive_sent(later, &policy());
        assert_eq!(h.verdict(later, &policy()), Verdict::Fine);
        // A keepalive is no request: its acknowledgement is welcome, its absence no death.
        assert_eq!(
            h.verdict(later + Duration::from_secs(299), &policy()),
            Verdict::Fine
        );
    }
}
