//! The client relay's view of one association's health: is it dead, due for a rekey, or quiet
//! long enough to need a keepalive? Pure: the shell reports what it sent and received and when.

use std::time::{Duration, Instant};

/// When an association is given up on, replaced or kept warm. Keys in the client's file.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPolicy {
    /// This many requests in a row without a reply, the oldest overdue by reply_grace: the
    /// association is dead.
    pub dead_after_unanswered: u32,
    /// How long a reply may take before its request counts as unanswered. A burst of requests
    /// is in flight, not unanswered.
    pub reply_grace: Duration,
    /// A request unanswered this long: the association is dead.
    pub dead_after: Duration,
    /// Rekey after this many records sent. AES-GCM nonces in rtc-dtls are 64 random bits, so a
    /// collision reaches 2^-32 probability around 92 000 records: stay far below.
    pub rekey_after_records: u64,
    /// Rekey after this age, whatever the traffic.
    pub rekey_after: Duration,
    /// Send an empty record after this much silence, so the server relay's idle timeout (1 h
    /// by default) never removes an association whose NTP client polls rarely.
    pub keepalive_after: Duration,
}

impl Default for HealthPolicy {
    fn default() -> Self {
        HealthPolicy {
            dead_after_unanswered: 3,
            reply_grace: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            rekey_after_records: 50_000,
            rekey_after: Duration::from_secs(6 * 3600),
            keepalive_after: Duration::from_secs(300),
        }
    }
}

/// What the shell should do about an association now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fine,
    /// Send an empty record.
    KeepAlive,
    /// Set up a fresh association beside this one, then switch.
    Rekey,
    /// Give it up and handshake anew.
    Dead(DeathCause),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeathCause {
    UnansweredRequests(u32),
    NoReplyFor(Duration),
}

impl std::fmt::Display for DeathCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeathCause::UnansweredRequests(n) => write!(f, "no reply to the last {n} requests"),
            DeathCause::NoReplyFor(d) => write!(f, "no reply for {:.1} s", d.as_secs_f64()),
        }
    }
}

/// One established association's record.
#[derive(Debug, Clone)]
pub struct Health {
    established: Instant,
    records_sent: u64,
    unanswered: u32,
    oldest_unanswered: Option<Instant>,
    last_sent: Instant,
}

impl Health {
    pub fn new(now: Instant) -> Self {
        Health {
            established: now,
            records_sent: 0,
            unanswered: 0,
            oldest_unanswered: None,
            last_sent: now,
        }
    }

    pub fn request_sent(&mut self, now: Instant) {
        self.records_sent += 1;
        self.unanswered = self.unanswered.saturating_add(1);
        self.oldest_unanswered.get_or_insert(now);
        self.last_sent = now;
    }

    pub fn keepalive_sent(&mut self, now: Instant) {
        self.records_sent += 1;
        self.last_sent = now;
    }

    /// Any reply proves the association alive.
    pub fn reply_received(&mut self) {
        self.unanswered = 0;
        self.oldest_unanswered = None;
    }

    pub fn records_sent(&self) -> u64 {
        self.records_sent
    }

    pub fn verdict(&self, now: Instant, policy: &HealthPolicy) -> Verdict {
        let overdue = self
            .oldest_unanswered
            .is_some_and(|oldest| oldest + policy.reply_grace <= now);
        if self.unanswered >= policy.dead_after_unanswered && overdue {
            return Verdict::Dead(DeathCause::UnansweredRequests(self.unanswered));
        }
        if let Some(oldest) = self.oldest_unanswered {
            let waited = now.saturating_duration_since(oldest);
            if waited >= policy.dead_after {
                return Verdict::Dead(DeathCause::NoReplyFor(waited));
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
    /// when it is due now).
    pub fn next_deadline(&self, policy: &HealthPolicy) -> Instant {
        if self.records_sent >= policy.rekey_after_records {
            return self.last_sent;
        }
        if let (true, Some(oldest)) = (
            self.unanswered >= policy.dead_after_unanswered,
            self.oldest_unanswered,
        ) {
            return oldest + policy.reply_grace;
        }
        let mut next =
            (self.established + policy.rekey_after).min(self.last_sent + policy.keepalive_after);
        if let Some(oldest) = self.oldest_unanswered {
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
            dead_after_unanswered: 3,
            reply_grace: Duration::from_secs(1),
            dead_after: Duration::from_secs(5),
            rekey_after_records: 10,
            rekey_after: Duration::from_secs(3600),
            keepalive_after: Duration::from_secs(300),
        }
    }

    #[test]
    fn replies_keep_it_fine() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        for i in 0..5 {
            let t = t0 + Duration::from_secs(i);
            h.request_sent(t);
            h.reply_received();
            assert_eq!(h.verdict(t, &policy()), Verdict::Fine);
        }
    }

    #[test]
    fn k_unanswered_requests_mean_dead_once_overdue() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        for _ in 0..3 {
            h.request_sent(t0);
        }
        // In flight, not unanswered: a burst is no death.
        assert_eq!(h.verdict(t0, &policy()), Verdict::Fine);
        let overdue = t0 + Duration::from_secs(1);
        assert_eq!(h.next_deadline(&policy()), overdue);
        assert_eq!(
            h.verdict(overdue, &policy()),
            Verdict::Dead(DeathCause::UnansweredRequests(3))
        );
    }

    #[test]
    fn a_burst_answered_within_the_grace_stays_fine() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        for _ in 0..50 {
            h.request_sent(t0);
        }
        h.reply_received();
        let policy = HealthPolicy {
            rekey_after_records: 1_000,
            ..policy()
        };
        assert_eq!(
            h.verdict(t0 + Duration::from_secs(2), &policy),
            Verdict::Fine
        );
    }

    #[test]
    fn one_request_unanswered_for_t_means_dead() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        h.request_sent(t0);
        assert_eq!(h.next_deadline(&policy()), t0 + Duration::from_secs(5));
        assert_eq!(
            h.verdict(t0 + Duration::from_millis(4999), &policy()),
            Verdict::Fine
        );
        assert!(matches!(
            h.verdict(t0 + Duration::from_secs(5), &policy()),
            Verdict::Dead(DeathCause::NoReplyFor(_))
        ));
    }

    #[test]
    fn rekey_by_records_and_by_age() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        for _ in 0..10 {
            h.request_sent(t0);
            h.reply_received();
        }
        assert_eq!(h.verdict(t0, &policy()), Verdict::Rekey);
        assert!(h.next_deadline(&policy()) <= t0, "due at once");
        let h = Health::new(t0);
        assert_eq!(
            h.verdict(t0 + Duration::from_secs(3600), &policy()),
            Verdict::Rekey
        );
    }

    #[test]
    fn silence_asks_for_a_keepalive_and_the_keepalive_resets_it() {
        let t0 = Instant::now();
        let mut h = Health::new(t0);
        let later = t0 + Duration::from_secs(300);
        assert_eq!(h.next_deadline(&policy()), later);
        assert_eq!(h.verdict(later, &policy()), Verdict::KeepAlive);
        h.keepalive_sent(later);
        assert_eq!(h.verdict(later, &policy()), Verdict::Fine);
        // A keepalive expects no reply: it never counts towards death.
        assert_eq!(
            h.verdict(later + Duration::from_secs(299), &policy()),
            Verdict::Fine
        );
    }
}
