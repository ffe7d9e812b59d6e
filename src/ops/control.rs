//! What a relay loop hears besides its sockets: shutdown, and new settings after a reload.
//!
//! A relay loop selects on its sockets, its timer and these two once per wakeup, and a wakeup
//! comes with every few datagrams. Selecting on [`Shutdown::wait`] and a watch channel's
//! `changed` directly costs each a lock and a waiter check per poll, even when the futures are
//! kept across iterations (callgrind: about 230 and 200 instructions a poll, 110 a reply on
//! the server relay). A [`Control`] is polled with one atomic load when nothing happened; a
//! helper task on the loop's runtime waits on the shutdown and settings channels and raises
//! its flags.

use std::future::poll_fn;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Poll, Waker};

use tokio::sync::watch;

use crate::ops::daemon::Shutdown;

/// What [`Control::next`] reports, shutdown first.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlEvent<T> {
    Stop,
    Settings(T),
}

const STOP: u8 = 1;
const SETTINGS: u8 = 2;

struct Shared<T> {
    flags: AtomicU8,
    /// The newest settings not yet taken (a reload that follows another replaces it).
    settings: Mutex<Option<T>>,
    /// The loop's waker, while it waits.
    waker: Mutex<Option<Waker>>,
}

impl<T> Shared<T> {
    fn raise(&self, flag: u8) {
        self.flags.fetch_or(flag, Ordering::SeqCst);
        let waker = self.waker.lock().ok().and_then(|mut w| w.take());
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// One relay loop's shutdown and settings signals; see the module's documentation.
pub struct Control<T> {
    shared: Arc<Shared<T>>,
}

impl<T: Clone + Send + Sync + 'static> Control<T> {
    /// Starts the helper task (on the current runtime) that turns `shutdown` and each value
    /// sent on `settings` after the current one into events. It ends with the shutdown.
    pub fn spawn(mut shutdown: Shutdown, mut settings: watch::Receiver<T>) -> Self {
        let shared = Arc::new(Shared {
            flags: AtomicU8::new(0),
            settings: Mutex::new(None),
            waker: Mutex::new(None),
        });
        let signals = shared.clone();
        tokio::spawn(async move {
            let mut settings_open = true;
            loop {
                tokio::select! {
                    _ = shutdown.wait() => break,
                    changed = settings.changed(), if settings_open => {
                        if changed.is_err() {
                            // The sender is gone: no more reloads, only the shutdown.
                            settings_open = false;
                            continue;
                        }
                        let value = settings.borrow_and_update().clone();
                        if let Ok(mut slot) = signals.settings.lock() {
                            *slot = Some(value);
                        }
                        signals.raise(SETTINGS);
                    }
                }
            }
            signals.raise(STOP);
        });
        Control { shared }
    }
}

impl<T> Control<T> {
    /// The next event. Cancel-safe: an event is taken only when this resolves.
    pub async fn next(&self) -> ControlEvent<T> {
        poll_fn(|cx| {
            if let Some(event) = self.take() {
                return Poll::Ready(event);
            }
            if let Ok(mut waker) = self.shared.waker.lock() {
                match waker.as_ref() {
                    Some(w) if w.will_wake(cx.waker()) => {}
                    _ => *waker = Some(cx.waker().clone()),
                }
            }
            // Raised between the first look and the waker's registration: seen now.
            match self.take() {
                Some(event) => Poll::Ready(event),
                None => Poll::Pending,
            }
        })
        .await
    }

    fn take(&self) -> Option<ControlEvent<T>> {
        let flags = self.shared.flags.load(Ordering::SeqCst);
        if flags == 0 {
            return None;
        }
        if flags & STOP != 0 {
            return Some(ControlEvent::Stop);
        }
        self.shared.flags.fetch_and(!SETTINGS, Ordering::SeqCst);
        let value = self.shared.settings.lock().ok().and_then(|mut s| s.take());
        value.map(ControlEvent::Settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn within<F: std::future::Future>(f: F) -> Option<F::Output> {
        tokio::time::timeout(Duration::from_secs(5), f).await.ok()
    }

    #[tokio::test]
    async fn a_waiting_loop_hears_each_reload_and_the_shutdown() {
        let (trigger, shutdown) = Shutdown::manual();
        let (sender, receiver) = watch::channel(0u32);
        let control = Control::spawn(shutdown, receiver);
        // Nothing yet: the wait does not resolve on its own.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), control.next())
                .await
                .is_err()
        );
        // A reload sent while the loop waits wakes it with the value.
        let waiting = tokio::spawn(async move {
            let event = control.next().await;
            (control, event)
        });
        sender.send(7).expect("send");
        let (control, event) = within(waiting).await.expect("woken").expect("task");
        assert_eq!(event, ControlEvent::Settings(7));
        // Two reloads while the loop is busy: it hears the newer, once.
        sender.send(8).expect("send");
        sender.send(9).expect("send");
        tokio::task::yield_now().await;
        assert_eq!(
            within(control.next()).await,
            Some(ControlEvent::Settings(9))
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), control.next())
                .await
                .is_err()
        );
        // The shutdown, even with the settings sender gone first; and it stays heard.
        drop(sender);
        trigger.fire();
        assert_eq!(within(control.next()).await, Some(ControlEvent::Stop));
        assert_eq!(within(control.next()).await, Some(ControlEvent::Stop));
    }
}
