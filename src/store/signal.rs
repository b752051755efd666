//! Wake-ups of idle job workers, per step kind.
//!
//! Each step kind has its own claiming loop ([`crate::queue::Runner`]). With one shared wake-up,
//! every commit that enqueued a job woke every loop, and each ran a claim — mostly empty: about
//! twelve claim statements per order on an idle-ish pipeline (docs/BENCHMARKS.md). Here a commit
//! wakes only the loops of the kinds it enqueued; the events relay, which follows every commit
//! that wrote events (they come with jobs), listens to all of them.
//!
//! Across PostgreSQL processes the kinds travel as the NOTIFY payload (comma-separated); an empty
//! payload (an older process, a replay of unknown kinds) wakes every loop.
//!
//! Where nothing carries wake-ups between processes (the distributed-SQL profile: no
//! LISTEN/NOTIFY) the signal is [`JobSignal::polled`]: this process's own enqueues still wake its
//! workers at once, and for the others' the workers poll — soon after they last found work, then
//! less and less often while they find none ([`IdlePoll`]), so an idle process costs a claim
//! per kind per poll interval and a busy one picks up other processes' jobs within tens of ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The wake-ups of one process's workers.
#[derive(Debug, Default)]
pub struct JobSignal {
    /// Other processes' enqueues wake nobody here: idle workers poll, backing off.
    polled: bool,
    /// Woken by every wake-up, whatever the kinds (the events relay's stamping loop).
    any: Notify,
    /// One per step kind a loop has asked for.
    kinds: Mutex<HashMap<String, Arc<Notify>>>,
}

impl JobSignal {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A signal that only this process's enqueues reach; other processes' jobs are found by
    /// polling ([`IdlePoll`]).
    pub fn polled() -> Arc<Self> {
        Arc::new(Self {
            polled: true,
            ..Self::default()
        })
    }

    /// How long an idle worker of this process sleeps before it looks again, at most `poll`.
    pub fn idle_poll(&self, poll: Duration) -> IdlePoll {
        IdlePoll {
            polled: self.polled,
            max: poll,
            next: IdlePoll::FIRST.min(poll),
        }
    }

    /// The wake-up of `kind`'s workers.
    pub fn kind(&self, kind: &str) -> Arc<Notify> {
        let mut kinds = self.kinds.lock().expect("signal lock");
        kinds.entry(kind.to_string()).or_default().clone()
    }

    /// Woken whenever any kind is.
    pub fn any(&self) -> &Notify {
        &self.any
    }

    /// Wakes the workers of these kinds (and the `any` listeners).
    pub fn wake<'a>(&self, kinds: impl IntoIterator<Item = &'a str>) {
        self.any.notify_waiters();
        let registered = self.kinds.lock().expect("signal lock");
        for kind in kinds {
            if let Some(signal) = registered.get(kind) {
                signal.notify_waiters();
            }
        }
    }

    /// Wakes every worker: the kinds are unknown (a replay, a lost or kind-less notification).
    pub fn wake_all(&self) {
        self.any.notify_waiters();
        for signal in self.kinds.lock().expect("signal lock").values() {
            signal.notify_waiters();
        }
    }

    /// Wakes the kinds named in a NOTIFY payload (`kind,kind,…`); all of them when it is empty.
    pub fn wake_payload(&self, payload: &str) {
        if payload.is_empty() {
            self.wake_all();
        } else {
            self.wake(payload.split(','));
        }
    }
}

/// The sleeps of one idle worker loop. With wake-ups from every process it always sleeps the poll
/// interval (a fallback only). Polled, it sleeps [`IdlePoll::FIRST`] after a look that found
/// work, doubling after each look that found none, up to the poll interval.
#[derive(Clone, Debug)]
pub struct IdlePoll {
    polled: bool,
    max: Duration,
    next: Duration,
}

impl IdlePoll {
    /// The first sleep after work was found.
    pub const FIRST: Duration = Duration::from_millis(20);

    /// The sleep before the next look, after one that found `found` jobs.
    pub fn after(&mut self, found: usize) -> Duration {
        if !self.polled {
            return self.max;
        }
        if found > 0 {
            self.next = Self::FIRST.min(self.max);
        }
        let sleep = self.next;
        self.next = (self.next * 2).min(self.max);
        sleep
    }
}

/// The NOTIFY payload naming `kinds` (deduplicated, sorted, so a burst coalesces).
pub fn payload<'a>(kinds: impl IntoIterator<Item = &'a str>) -> String {
    let kinds: std::collections::BTreeSet<&str> = kinds.into_iter().collect();
    kinds.into_iter().collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wakes_only_the_kinds_named() {
        let signal = JobSignal::new();
        let (payment, receipt) = (signal.kind("charge_payment"), signal.kind("send_receipt"));
        let woken_payment = payment.notified();
        let woken_receipt = receipt.notified();
        let woken_any = signal.any().notified();
        tokio::pin!(woken_payment, woken_receipt, woken_any);
        for waiting in [woken_payment.as_mut(), woken_receipt.as_mut(), woken_any.as_mut()] {
            waiting.enable();
        }
        signal.wake_payload("charge_payment");
        assert!(futures_ready(woken_payment.as_mut()));
        assert!(futures_ready(woken_any.as_mut()));
        assert!(!futures_ready(woken_receipt.as_mut()), "another kind stays asleep");
        signal.wake_payload("");
        assert!(
            futures_ready(woken_receipt.as_mut()),
            "an empty payload wakes every kind"
        );
        assert_eq!(payload(["b", "a", "b"]), "a,b");
    }

    #[test]
    fn polling_backs_off_while_idle_and_comes_back_after_work() {
        let poll = Duration::from_secs(5);
        let mut idle = JobSignal::polled().idle_poll(poll);
        let sleeps: Vec<Duration> = (0..12).map(|_| idle.after(0)).collect();
        assert_eq!(sleeps[0], IdlePoll::FIRST);
        assert!(sleeps.windows(2).all(|pair| pair[1] >= pair[0]), "{sleeps:?}");
        assert_eq!(*sleeps.last().unwrap(), poll, "settles at the poll interval");
        assert_eq!(idle.after(3), IdlePoll::FIRST, "work found: look again soon");
        let mut notified = JobSignal::new().idle_poll(poll);
        assert_eq!(
            (notified.after(0), notified.after(5)),
            (poll, poll),
            "NOTIFY wakes; poll is a fallback"
        );
    }

    fn futures_ready(future: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        std::future::Future::poll(future, &mut context).is_ready()
    }
}
