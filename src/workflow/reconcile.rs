//! Reconciliation with the payment provider's books, through the provider's own API.
//!
//! Invariant I4 has two halves: what the shop recorded (the `payments` table, checked by
//! `Store::audit`'s SQL) and what the provider holds. For the built-in sandbox both live in the
//! same database (`payment_in_provider_books` compares them in SQL); for Stripe the other half is
//! only reachable over Stripe's API. [`reconcile`] compares them and returns violations in the
//! audit's shape, and [`add_to_report`] merges them into an [`AuditReport`] (`orderflow audit
//! --payment-provider stripe` does both).
//!
//! # The checks
//!
//! - [`INTENT_STATE`]: every payment recorded with this provider as authorized, captured
//!   (`captured`, `partially_refunded`, `refunded`) or voided has its `provider_ref` PaymentIntent
//!   at the provider, naming the order in `metadata[order_id]`, in status `requires_capture`,
//!   `succeeded` or `canceled` respectively. (`found 0, expected 1`, like the SQL checks that test
//!   a condition; the details are logged.)
//! - [`AMOUNTS_AGREE`]: the amounts agree — an authorized payment's amount is the intent's
//!   `amount`, a captured one's `captured_minor` is the intent's `amount_received` (found =
//!   the provider's, expected = ours).
//! - [`REFUNDS_AGREE`]: a captured payment's refunded amount is the provider's (the intent's
//!   charge's `amount_refunded`, when the provider's list carries it).
//! - [`INTENT_HAS_PAYMENT`]: every PaymentIntent holding money (any status but `canceled` and
//!   `requires_payment_method`, which hold none: a void, a decline) that names an order is that
//!   order's recorded payment. Found = the intents naming the order that are not, expected = 0:
//!   money taken for an order we never recorded, or a second charge (I4's "at most one").
//!
//! # What is not flagged
//!
//! A crash between the provider's answer and our commit leaves the provider ahead of our books
//! until the step's retry, which sends the same idempotency key, gets the first answer back and
//! commits it. So an order whose payment step is still `ready` or `running` is not flagged:
//! `charge_payment` for an unexplained intent; `charge_payment`, `fulfil_order` (capture) or
//! `refund_payment` (void, refund) for a payment whose intent moved on. Once the step is dead the
//! difference is flagged (and `nothing_silently_stuck` shows the step). A step that succeeded
//! heals nothing: its difference is flagged.
//!
//! A live system moves while it is audited. The provider's list is read first; then our records
//! are paged. A difference is confirmed before it is flagged: the record is read again and the
//! intent retrieved again (one call per difference, none when the books agree), so a payment that
//! moved during the audit is not reported.
//!
//! # Limits
//!
//! - Memory: our side is paged ([`JobStore::payments_after`](crate::store::jobs::JobStore));
//!   the provider's side is whatever [`PaymentProvider::list_intents`] returns (every intent with
//!   `metadata[order_id]`), held while our side is paged.
//! - Refunded amounts are not compared: [`PaymentIntent`] does not carry the provider's refunded
//!   amount, so `refunded_minor` is checked only against our own capture (`refunds_within_capture`).
//! - Any provider failure (an outage, a rejected key) fails the reconciliation: an audit that
//!   could not read the provider's books is not clean.

use std::collections::{BTreeMap, HashMap, HashSet};

use crate::adapters::payment::PaymentError;
use crate::adapters::payment::intents::{IntentStatus, PaymentIntent, PaymentProvider};
use crate::domain::OrderId;
use crate::store::jobs::{PaymentRecord, PaymentState};
use crate::store::{AuditReport, Store, StoreError, Violation};
use crate::workflow::{CHARGE_PAYMENT, FULFIL_ORDER, REFUND_PAYMENT};

/// A check of the provider's books: its name and the invariant it guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub invariant: &'static str,
}

impl Check {
    fn violation(&self, subject: impl Into<String>, found: i64, expected: i64) -> Violation {
        Violation::new(self.name, self.invariant, subject, found, expected)
    }
}

/// See the module docs.
pub const INTENT_STATE: Check = Check {
    name: "provider_intent_state",
    invariant: "I4 (provider's API): every payment we recorded as authorized, captured/refunded or voided is \
                its PaymentIntent at the provider, naming the order, in status requires_capture, succeeded or \
                canceled",
};

/// See the module docs.
pub const AMOUNTS_AGREE: Check = Check {
    name: "provider_amounts_agree",
    invariant: "I4 (provider's API): the provider's amounts are ours: authorized = the intent's amount, captured \
                = its amount_received (found = the provider's, expected = ours)",
};

/// See the module docs.
pub const REFUNDS_AGREE: Check = Check {
    name: "provider_refunds_agree",
    invariant: "I4 (provider's API): the provider refunded what we recorded: the intent's charge's \
                amount_refunded = our refunded amount (found = the provider's, expected = ours)",
};

/// See the module docs.
pub const INTENT_HAS_PAYMENT: Check = Check {
    name: "provider_intent_recorded",
    invariant: "I4 (provider's API): no PaymentIntent holding money names an order whose recorded payment it is \
                not, unless the order's charge step is still queued or running (found = such intents)",
};

/// Every check [`reconcile`] runs, in the order they are printed.
pub const CHECKS: [Check; 4] = [INTENT_STATE, AMOUNTS_AGREE, REFUNDS_AGREE, INTENT_HAS_PAYMENT];

/// Our payment records are read this many at a time.
pub const PAGE_SIZE: u32 = 500;

/// Why the provider's books could not be compared with ours.
#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("reading our payment records: {0}")]
    Store(#[from] StoreError),
    #[error("reading the {provider} books: {error}")]
    Provider { provider: String, error: PaymentError },
}

/// Compares our payment records with the provider's PaymentIntents (see the module docs).
pub async fn reconcile(store: &dyn Store, provider: &dyn PaymentProvider) -> Result<Vec<Violation>, ReconcileError> {
    reconcile_paged(store, provider, PAGE_SIZE).await
}

/// [`reconcile`], reading `page_size` of our records at a time.
pub async fn reconcile_paged(
    store: &dyn Store,
    provider: &dyn PaymentProvider,
    page_size: u32,
) -> Result<Vec<Violation>, ReconcileError> {
    let books = Books {
        store,
        provider,
        intents: provider.list_intents().await.map_err(|e| provider_error(provider, e))?,
    };
    let by_id: HashMap<&str, &PaymentIntent> = books.intents.iter().map(|i| (i.id.as_str(), i)).collect();
    // Intents that are some record's provider_ref.
    let mut recorded: HashSet<&str> = HashSet::new();
    let mut violations = Vec::new();

    let mut after = None;
    loop {
        let page = store.payments_after(after, page_size.max(1)).await?;
        let Some((last, _)) = page.last() else { break };
        after = Some(*last);
        for (order, record) in &page {
            if record.provider != provider.name() {
                continue;
            }
            if let Some(intent) = record.provider_ref.as_deref().and_then(|id| by_id.get(id)) {
                recorded.insert(intent.id.as_str());
            }
            let listed = record.provider_ref.as_deref().and_then(|id| by_id.get(id)).copied();
            if differences(*order, record, listed).is_empty() {
                continue;
            }
            violations.extend(books.confirm_difference(*order).await?);
        }
        if page.len() < page_size.max(1) as usize {
            break;
        }
    }

    // Intents holding money that no record of ours names, grouped by the order they name.
    let mut unexplained: BTreeMap<&str, Vec<&PaymentIntent>> = BTreeMap::new();
    for intent in &books.intents {
        if holds_money(&intent.status) && !recorded.contains(intent.id.as_str()) {
            let order = intent.order_id.as_deref().unwrap_or_default();
            unexplained.entry(order).or_default().push(intent);
        }
    }
    for (named, intents) in unexplained {
        violations.extend(books.confirm_unexplained(named, &intents).await?);
    }
    Ok(violations)
}

/// Lists [`CHECKS`] in `report` and adds their violations.
pub fn add_to_report(report: &mut AuditReport, violations: Vec<Violation>) {
    for check in CHECKS {
        report.add_check(check.name, check.invariant);
    }
    report.violations.extend(violations);
}

struct Books<'a> {
    store: &'a dyn Store,
    provider: &'a dyn PaymentProvider,
    /// The provider's list, read before our records.
    intents: Vec<PaymentIntent>,
}

impl Books<'_> {
    /// A record that differs from the listed intent: read both again (either may have moved since
    /// they were read) and report what still differs, unless a payment step is in flight.
    async fn confirm_difference(&self, order: OrderId) -> Result<Vec<Violation>, ReconcileError> {
        let Some(record) = self.store.payment(order).await? else {
            return Ok(Vec::new());
        };
        let intent = match record.provider_ref.as_deref() {
            Some(id) => self.retrieve(id).await?,
            None => None,
        };
        let found = differences(order, &record, intent.as_ref());
        if found.is_empty()
            || self
                .step_in_flight(order, &[CHARGE_PAYMENT, FULFIL_ORDER, REFUND_PAYMENT])
                .await?
        {
            return Ok(Vec::new());
        }
        tracing::warn!(
            order = %order,
            payment_state = %record.state,
            intent = record.provider_ref.as_deref().unwrap_or("-"),
            intent_status = intent.as_ref().map(|i| i.status.as_str()).unwrap_or("missing"),
            intent_order = intent.as_ref().and_then(|i| i.order_id.as_deref()).unwrap_or("-"),
            "the {} books disagree with ours",
            self.provider.name()
        );
        Ok(found)
    }

    /// Intents holding money that name `named` but are not its recorded payment: confirmed with a
    /// fresh read of the order's record, excused while its charge step is queued or running.
    async fn confirm_unexplained(
        &self,
        named: &str,
        intents: &[&PaymentIntent],
    ) -> Result<Vec<Violation>, ReconcileError> {
        let order = named.parse::<OrderId>().ok();
        let mut count = intents.len();
        if let Some(order) = order {
            // Recorded while we were paging (a charge that committed during the audit).
            if let Some(record) = self.store.payment(order).await?
                && record.provider == self.provider.name()
                && let Some(reference) = record.provider_ref.as_deref()
            {
                count = intents.iter().filter(|i| i.id != reference).count();
            }
            if count == 0 || self.step_in_flight(order, &[CHARGE_PAYMENT]).await? {
                return Ok(Vec::new());
            }
        }
        let ids: Vec<&str> = intents.iter().map(|i| i.id.as_str()).collect();
        tracing::warn!(
            order = named,
            intents = %ids.join(","),
            "the {} holds money for an order that does not record it",
            self.provider.name()
        );
        let subject = if named.is_empty() { "-" } else { named };
        Ok(vec![INTENT_HAS_PAYMENT.violation(subject, count as i64, 0)])
    }

    /// The intent as the provider reports it now; `None` when it will not show it (404: missing).
    async fn retrieve(&self, id: &str) -> Result<Option<PaymentIntent>, ReconcileError> {
        match self.provider.retrieve(id).await {
            Ok(intent) => Ok(Some(intent)),
            Err(PaymentError::Rejected(_)) => Ok(None),
            Err(error) => Err(provider_error(self.provider, error)),
        }
    }

    async fn step_in_flight(&self, order: OrderId, kinds: &[&str]) -> Result<bool, ReconcileError> {
        let jobs = self.store.jobs_for_order(order).await?;
        Ok(jobs
            .iter()
            .any(|job| kinds.contains(&job.kind.as_str()) && matches!(job.state.as_str(), "ready" | "running")))
    }
}

fn provider_error(provider: &dyn PaymentProvider, error: PaymentError) -> ReconcileError {
    ReconcileError::Provider {
        provider: provider.name().to_string(),
        error,
    }
}

/// Whether an intent in this status holds or moved money (a void or a decline holds none).
fn holds_money(status: &IntentStatus) -> bool {
    !matches!(status, IntentStatus::Canceled | IntentStatus::RequiresPaymentMethod)
}

/// How a record and its intent (`None`: the provider has none by that id) disagree.
fn differences(order: OrderId, record: &PaymentRecord, intent: Option<&PaymentIntent>) -> Vec<Violation> {
    let subject = order.to_string();
    let expected_status = match record.state() {
        Some(PaymentState::Authorized) => IntentStatus::RequiresCapture,
        Some(PaymentState::Captured | PaymentState::PartiallyRefunded | PaymentState::Refunded) => {
            IntentStatus::Succeeded
        }
        Some(PaymentState::Voided) => IntentStatus::Canceled,
        // Waiting for the customer, declined (no intent recorded), or a state we do not know.
        _ => return Vec::new(),
    };
    let Some(intent) = intent else {
        return vec![INTENT_STATE.violation(subject, 0, 1)];
    };
    let mut found = Vec::new();
    if intent.status != expected_status || intent.order_id.as_deref() != Some(subject.as_str()) {
        found.push(INTENT_STATE.violation(subject.clone(), 0, 1));
    }
    let amounts = match expected_status {
        IntentStatus::RequiresCapture => Some((intent.amount_minor, record.amount_minor)),
        IntentStatus::Succeeded => Some((intent.amount_captured_minor, record.captured_minor)),
        _ => None,
    };
    if let Some((theirs, ours)) = amounts
        && theirs != ours
    {
        found.push(AMOUNTS_AGREE.violation(subject.clone(), theirs, ours));
    }
    // Refunds, where the provider's answer carries them.
    if expected_status == IntentStatus::Succeeded
        && let Some(refunded) = intent.amount_refunded_minor
        && refunded != record.refunded_minor
    {
        found.push(REFUNDS_AGREE.violation(subject, refunded, record.refunded_minor));
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(state: &str, reference: Option<&str>, amount: i64, captured: i64) -> PaymentRecord {
        PaymentRecord {
            provider: "stripe".into(),
            idempotency_key: "k".into(),
            state: state.into(),
            provider_ref: reference.map(str::to_string),
            amount_minor: amount,
            captured_minor: captured,
            refunded_minor: 0,
            currency: "EUR".into(),
            detail: None,
            client_secret: None,
            updated_at: chrono::Utc::now(),
        }
    }

    fn intent(order: OrderId, status: IntentStatus, amount: i64, captured: i64) -> PaymentIntent {
        PaymentIntent {
            id: "pi_1".into(),
            status,
            amount_minor: amount,
            amount_captured_minor: captured,
            amount_refunded_minor: None,
            client_secret: None,
            order_id: Some(order.to_string()),
            last_error: None,
        }
    }

    fn checks(found: &[Violation]) -> Vec<(&'static str, i64, i64)> {
        found.iter().map(|v| (v.check, v.found, v.expected)).collect()
    }

    #[test]
    fn matching_books_have_no_differences() {
        let order = OrderId::new();
        let cases = [
            ("authorized", IntentStatus::RequiresCapture, 0),
            ("captured", IntentStatus::Succeeded, 4200),
            ("partially_refunded", IntentStatus::Succeeded, 4200),
            ("refunded", IntentStatus::Succeeded, 4200),
            ("voided", IntentStatus::Canceled, 0),
        ];
        for (state, status, captured) in cases {
            let record = record(state, Some("pi_1"), 4200, captured);
            let intent = intent(order, status, 4200, captured);
            assert!(differences(order, &record, Some(&intent)).is_empty(), "{state}");
        }
        // Nothing is expected of these.
        for state in ["declined", "requires_action", "pending"] {
            assert!(differences(order, &record(state, None, 4200, 0), None).is_empty());
        }
    }

    #[test]
    fn each_difference_is_named() {
        let order = OrderId::new();
        let authorized = record("authorized", Some("pi_1"), 4200, 0);
        assert_eq!(
            checks(&differences(order, &authorized, None)),
            [(INTENT_STATE.name, 0, 1)]
        );
        let captured_elsewhere = intent(order, IntentStatus::Succeeded, 4200, 4200);
        assert_eq!(
            checks(&differences(order, &authorized, Some(&captured_elsewhere))),
            [(INTENT_STATE.name, 0, 1)]
        );
        let other_amount = intent(order, IntentStatus::RequiresCapture, 4300, 0);
        assert_eq!(
            checks(&differences(order, &authorized, Some(&other_amount))),
            [(AMOUNTS_AGREE.name, 4300, 4200)]
        );
        let captured = record("captured", Some("pi_1"), 4200, 4100);
        assert_eq!(
            checks(&differences(order, &captured, Some(&captured_elsewhere))),
            [(AMOUNTS_AGREE.name, 4200, 4100)]
        );
        let mut other_order = captured_elsewhere.clone();
        other_order.order_id = Some(OrderId::new().to_string());
        assert_eq!(
            checks(&differences(
                order,
                &record("captured", Some("pi_1"), 4200, 4200),
                Some(&other_order)
            )),
            [(INTENT_STATE.name, 0, 1)]
        );
        let voided = record("voided", Some("pi_1"), 4200, 0);
        assert_eq!(
            checks(&differences(
                order,
                &voided,
                Some(&intent(order, IntentStatus::RequiresCapture, 4200, 0))
            )),
            [(INTENT_STATE.name, 0, 1)]
        );
    }

    #[test]
    fn voids_and_declines_hold_no_money() {
        assert!(!holds_money(&IntentStatus::Canceled));
        assert!(!holds_money(&IntentStatus::RequiresPaymentMethod));
        for status in [
            IntentStatus::RequiresCapture,
            IntentStatus::Succeeded,
            IntentStatus::RequiresAction,
            IntentStatus::Processing,
        ] {
            assert!(holds_money(&status), "{status:?}");
        }
    }
}
