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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// The wake-ups of one process's workers.
#[derive(Debug, Default)]
pub struct JobSignal {
    /// Woken by every wake-up, whatever the kinds (the events relay's stamping loop).
    any: Notify,
    /// One per step kind a loop has asked for.
    kinds: Mutex<HashMap<String, Arc<Notify>>>,
}

impl JobSignal {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
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

    fn futures_ready(future: std::pin::Pin<&mut tokio::sync::futures::Notified<'_>>) -> bool {
        let waker = std::task::Waker::noop();
        let mut context = std::task::Context::from_waker(waker);
        std::future::Future::poll(future, &mut context).is_ready()
    }
}
