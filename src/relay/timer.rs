//! The one timer of a relay loop (a tunnel task, a server worker).
//!
//! A loop's next deadline moves on nearly every datagram: a request adds a pending entry's
//! expiry, its reply takes it away. Moving a tokio timer costs a removal and an insertion in
//! the timer wheel each time, so this one moves only when a deadline comes *earlier* than the
//! one it is set for. A deadline that goes away leaves it to fire early, once; the loop then
//! finds nothing due and the timer is set again from the next deadline.

use std::pin::Pin;
use std::time::Instant;

use tokio::time::Sleep;

pub struct LoopTimer {
    sleep: Pin<Box<Sleep>>,
    /// The deadline the timer is set for; None once it has fired (or before it is first set).
    armed: Option<Instant>,
}

impl Default for LoopTimer {
    fn default() -> Self {
        LoopTimer {
            sleep: Box::pin(tokio::time::sleep(std::time::Duration::ZERO)),
            armed: None,
        }
    }
}

impl LoopTimer {
    /// Makes sure the timer fires no later than `deadline`.
    pub fn arm(&mut self, deadline: Option<Instant>) {
        if let Some(deadline) = deadline {
            if self.armed.is_none_or(|armed| deadline < armed) {
                self.sleep.as_mut().reset(deadline.into());
                self.armed = Some(deadline);
            }
        }
    }

    /// Resolves when the deadline it is set for passes; never while it is set for none.
    /// Cancel-safe: a cancelled wait leaves the timer set.
    pub async fn fired(&mut self) {
        if self.armed.is_none() {
            return std::future::pending().await;
        }
        self.sleep.as_mut().await;
        self.armed = None;
    }
}

/// How long a relay loop keeps reading its sockets after its last datagram worth waiting
/// for, before it sleeps (`busy_poll_us`). A request forwarded comes back as a reply tens of
/// microseconds later: a loop that slept in between is woken for it, and on a virtual machine
/// waking an idle vCPU costs as much as the relay's own work. Polling through the window
/// meets the reply awake; each such datagram (the loop says which: the server relay's
/// forwarded requests and time-server replies) restarts the window, and the loop sleeps once
/// it passes without one. Zero turns polling off.
#[derive(Debug, Clone, Copy)]
pub struct BusyPoll {
    window: std::time::Duration,
    until: Option<Instant>,
}

impl BusyPoll {
    pub fn new(window: std::time::Duration) -> Self {
        BusyPoll {
            window,
            until: None,
        }
    }

    /// The loop received (or forwarded) datagrams at `now` whose sequel is worth meeting
    /// awake.
    pub fn received(&mut self, now: Instant) {
        if !self.window.is_zero() {
            self.until = now.checked_add(self.window);
        }
    }

    /// Until when the sockets are to be read without sleeping (an instant that may have
    /// passed: [`DatagramSocket::recv_batch`] reads the clock before it polls).
    ///
    /// [`DatagramSocket::recv_batch`]: super::udp::DatagramSocket::recv_batch
    pub fn until(&self) -> Option<Instant> {
        self.until
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn busy_polling_lasts_a_window_after_each_receive_and_never_when_off() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut busy = BusyPoll::new(us(50));
        assert_eq!(busy.until(), None, "nothing received yet");
        busy.received(t0);
        assert_eq!(busy.until(), Some(t0 + us(50)));
        busy.received(t0 + us(40));
        assert_eq!(busy.until(), Some(t0 + us(90)), "restarted");
        let mut off = BusyPoll::new(Duration::ZERO);
        off.received(t0);
        assert_eq!(off.until(), None);
    }

    /// Runs `fired` until it resolves or `limit` of (paused) time passes; when it fired.
    async fn fired_within(timer: &mut LoopTimer, limit: Duration) -> Option<Instant> {
        tokio::time::timeout(limit, timer.fired())
            .await
            .ok()
            .map(|()| Instant::from(tokio::time::Instant::now()))
    }

    #[tokio::test(start_paused = true)]
    async fn an_unset_timer_never_fires() {
        let mut timer = LoopTimer::default();
        timer.arm(None);
        assert_eq!(
            fired_within(&mut timer, Duration::from_secs(3600)).await,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_deadline_moves_the_timer_and_a_later_one_does_not() {
        let start = Instant::from(tokio::time::Instant::now());
        let mut timer = LoopTimer::default();
        timer.arm(Some(start + Duration::from_secs(10)));
        timer.arm(Some(start + Duration::from_secs(2)));
        timer.arm(Some(start + Duration::from_secs(5)));
        let fired = fired_within(&mut timer, Duration::from_secs(60)).await;
        assert_eq!(fired, Some(start + Duration::from_secs(2)));
        // Fired: the next deadline sets it again, even a later one.
        timer.arm(Some(start + Duration::from_secs(10)));
        let fired = fired_within(&mut timer, Duration::from_secs(60)).await;
        assert_eq!(fired, Some(start + Duration::from_secs(10)));
        // And once fired with nothing set since, it stays quiet.
        assert_eq!(
            fired_within(&mut timer, Duration::from_secs(3600)).await,
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_wait_leaves_the_timer_set() {
        let start = Instant::from(tokio::time::Instant::now());
        let mut timer = LoopTimer::default();
        timer.arm(Some(start + Duration::from_secs(5)));
        assert_eq!(fired_within(&mut timer, Duration::from_secs(1)).await, None);
        let fired = fired_within(&mut timer, Duration::from_secs(60)).await;
        assert_eq!(fired, Some(start + Duration::from_secs(5)));
    }
}
