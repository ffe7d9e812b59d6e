//! Exponential backoff with jitter for re-handshakes: pure, the caller supplies time and chance.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempts: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            attempts: 0,
        }
    }

    /// The wait before the next attempt: initial * 2^failures, capped, then scaled by a jitter
    /// factor in [0.5, 1.0] so a fleet of clients does not retry in lockstep after a server
    /// restart. `unit` is a uniformly random number in [0, 1).
    pub fn next_delay(&mut self, unit: f64) -> Duration {
        let exponent = self.attempts.min(20);
        self.attempts = self.attempts.saturating_add(1);
        let base = self.initial.saturating_mul(1u32 << exponent).min(self.max);
        base.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// Called when an association came up: the next failure starts again from `initial`.
    pub fn reset(&mut self) {
        self.attempts = 0;
    }

    pub fn failures(&self) -> u32 {
        self.attempts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        let delays: Vec<u64> = (0..9).map(|_| b.next_delay(1.0).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        b.reset();
        assert_eq!(b.next_delay(1.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_half_and_full() {
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(60));
        assert_eq!(b.next_delay(0.0), Duration::from_secs(4));
        let mut b = Backoff::new(Duration::from_secs(8), Duration::from_secs(60));
        assert_eq!(b.next_delay(2.0), Duration::from_secs(8));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
        for _ in 0..10_000 {
            assert!(b.next_delay(0.99) <= Duration::from_secs(60));
        }
    }
}
