//! The residence-time correction's report to the metrics: the protocol core's
//! [`residence::Observer`] on the [`Observatory`]'s histogram and counters, lock-free (every
//! counter is taken once, when a loop starts).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use ntp_dtls_proto::residence::{self, Outcome};

use crate::ops::metrics::state::TimestampResult;
use crate::ops::observe::{Direction, Observatory};

pub struct TimestampMetrics {
    obs: Arc<Observatory>,
    /// One per [`Outcome::ALL`], in that order.
    counters: Vec<Arc<AtomicU64>>,
}

impl TimestampMetrics {
    /// Registers every outcome's counter (so each shows, at zero).
    pub fn new(obs: Arc<Observatory>) -> Arc<Self> {
        let counters = Outcome::ALL
            .iter()
            .map(|outcome| {
                let result = if outcome.is_corrected() {
                    TimestampResult::Corrected
                } else {
                    TimestampResult::Unchanged
                };
                obs.timestamp_counter(result, outcome.reason())
            })
            .collect();
        Arc::new(TimestampMetrics { obs, counters })
    }
}

impl residence::Observer for TimestampMetrics {
    fn residence(&self, direction: residence::Direction, seconds: f64) {
        let direction = match direction {
            residence::Direction::Request => Direction::Request,
            residence::Direction::Reply => Direction::Reply,
        };
        self.obs.observe_residence(direction, seconds);
    }

    fn outcome(&self, outcome: Outcome) {
        if let Some(counter) = Outcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.counters.get(i))
        {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}
