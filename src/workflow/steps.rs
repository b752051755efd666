//! The saga's steps. Each reads what it needs, makes at most one outside call (with an
//! idempotency key derived from the order), then commits its effects together with its job's
//! completion ([`JobStore::complete_job`]). Compensations (refund, release, cancel) are idempotent
//! and get many attempts, so they are dead-lettered only as a last resort.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{
    ALL_STEPS, CHARGE_PAYMENT, COMMIT_INVENTORY, FULFIL_ORDER, REFUND_PAYMENT, SEND_CANCELLATION, SEND_CONFIRMATION,
    SEND_RECEIPT,
};
use crate::adapters::notify::{Message, Notifier};
use crate::adapters::payment::{ChargeRequest, PaymentError, PaymentProvider, RefundRequest};
use crate::clock;
use crate::domain::events::{EventType, NewEvent};
use crate::domain::{Order, OrderId, OrderStatus};
use crate::monitoring::metrics::{CancelReason, Metrics};
use crate::queue::{Runner, Step, StepError};
use crate::store::jobs::{
    ClaimedJob, CompleteOutcome, InventoryAction, NotificationSent, NotificationSlot, PaymentChange, PaymentState,
    StepEffects,
};
use crate::store::{NewJob, Store, StoreError};

/// Attempts settings for the jobs the saga enqueues.
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// Forward steps (payment, inventory, fulfilment, e-mails).
    pub max_attempts: u32,
    /// Compensations (refunds): retried much longer before a dead letter.
    pub compensation_max_attempts: u32,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            compensation_max_attempts: 10,
        }
    }
}

/// What the steps need from the outside world.
pub struct Saga {
    pub store: Arc<dyn Store>,
    pub payments: Arc<dyn PaymentProvider>,
    pub notifier: Arc<dyn Notifier>,
    pub settings: SagaSettings,
    /// Where orders fulfilled/cancelled, jobs enqueued and payment calls are counted.
    pub metrics: Metrics,
}

/// The provider idempotency key of an order's charge: the same on every attempt (I4).
pub fn charge_key(order: OrderId) -> String {
    format!("orderflow-charge-{order}")
}

pub fn refund_key(order: OrderId) -> String {
    format!("orderflow-refund-{order}")
}

impl Saga {
    /// Registers every step with the runner.
    pub fn register(self: Arc<Self>, runner: &mut Runner) {
        for kind in ALL_STEPS {
            runner.register(
                kind,
                Arc::new(SagaStep {
                    saga: self.clone(),
                    kind,
                }),
            );
        }
    }

    fn job(&self, kind: &'static str, order: OrderId) -> NewJob {
        let max_attempts = if kind == REFUND_PAYMENT {
            self.settings.compensation_max_attempts
        } else {
            self.settings.max_attempts
        };
        NewJob {
            kind,
            payload: crate::telemetry::with_trace_context(json!({ "order_id": order })),
            run_at: clock::now(),
            max_attempts,
        }
    }

    async fn order(&self, job: &ClaimedJob) -> Result<Order, StepError> {
        let id = job
            .order_id
            .ok_or_else(|| StepError::Fatal("job has no order".into()))?;
        let details = self.store.get_order(id).await.map_err(retry)?;
        Ok(details
            .ok_or_else(|| StepError::Fatal(format!("order {id} does not exist")))?
            .order)
    }

    async fn complete(&self, job: &ClaimedJob, effects: StepEffects) -> Result<CompleteOutcome, StepError> {
        // The step's transaction: its effects and the job's completion, committed together.
        let span = tracing::info_span!(
            "store.complete_job",
            otel.kind = "client",
            db.operation.name = "complete_job",
            new_status = effects.new_status.map(|s| s.as_str()),
            enqueued = effects.enqueue.len()
        );
        match tracing::Instrument::instrument(self.store.complete_job(Some(&job.lease), &effects, clock::now()), span)
            .await
            .map_err(retry)?
        {
            CompleteOutcome::LeaseLost => Err(StepError::LeaseLost),
            CompleteOutcome::Completed => {
                for next in &effects.enqueue {
                    self.metrics.step_enqueued(next.kind, 1);
                }
                if effects.new_status == Some(OrderStatus::Fulfilled) {
                    self.metrics.order_fulfilled();
                }
                Ok(CompleteOutcome::Completed)
            }
            outcome => Ok(outcome),
        }
    }

    /// Completes the job with no effects (the step found nothing to do).
    async fn nothing_to_do(&self, job: &ClaimedJob) -> Result<(), StepError> {
        self.complete(job, StepEffects::default()).await.map(|_| ())
    }

    async fn charge_payment(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let order = self.order(job).await?;
        if order.status != OrderStatus::PendingPayment {
            // Cancelled or expired before we got here: nothing to charge.
            return self.nothing_to_do(job).await;
        }
        let key = charge_key(order.id);
        let request = ChargeRequest {
            idempotency_key: key.clone(),
            amount_minor: order.total.minor(),
            currency: order.currency.code().to_string(),
            token: order.payment_token.as_str().to_string(),
            reference: order.id.to_string(),
            correlation_id: job.correlation_id.clone(),
        };
        let payment = |state, provider_ref: Option<String>, detail: Option<String>| PaymentChange {
            provider: self.payments.name().to_string(),
            idempotency_key: key.clone(),
            state,
            provider_ref,
            amount_minor: order.total.minor(),
            currency: order.currency.code().to_string(),
            detail,
        };
        let started = std::time::Instant::now();
        let charged = self.payments.charge(&request).await;
        let outcome = match &charged {
            Ok(_) => "succeeded",
            Err(PaymentError::Declined(_)) => "declined",
            Err(PaymentError::Transient(_)) => "unavailable",
            Err(PaymentError::Rejected(_)) => "rejected",
        };
        self.metrics.payment("charge", outcome, started.elapsed());
        match charged {
            Ok(charge_id) => {
                let paid = StepEffects {
                    order_id: Some(order.id),
                    expect_status: vec![OrderStatus::PendingPayment],
                    new_status: Some(OrderStatus::Paid),
                    events: vec![(
                        "payment_captured".into(),
                        Some(format!("{} charge {charge_id}", self.payments.name())),
                    )],
                    payment: Some(payment(PaymentState::Captured, Some(charge_id.clone()), None)),
                    emit: vec![
                        NewEvent::new(EventType::OrderPaid),
                        NewEvent::new(EventType::PaymentCaptured),
                    ],
                    enqueue: vec![self.job(COMMIT_INVENTORY, order.id), self.job(SEND_RECEIPT, order.id)],
                    ..Default::default()
                };
                match self.complete(job, paid).await? {
                    CompleteOutcome::UnexpectedStatus(_) => {
                        // Cancelled while we were charging: keep the record and give the money back.
                        let refund = StepEffects {
                            order_id: Some(order.id),
                            events: vec![("payment_captured_after_cancel".into(), Some(charge_id.clone()))],
                            payment: Some(payment(PaymentState::Captured, Some(charge_id), None)),
                            emit: vec![NewEvent::new(EventType::PaymentCaptured)],
                            enqueue: vec![self.job(REFUND_PAYMENT, order.id)],
                            ..Default::default()
                        };
                        self.complete(job, refund).await.map(|_| ())
                    }
                    _ => Ok(()),
                }
            }
            Err(PaymentError::Declined(reason)) => {
                let declined = StepEffects {
                    order_id: Some(order.id),
                    expect_status: vec![OrderStatus::PendingPayment],
                    new_status: Some(OrderStatus::Cancelled),
                    events: vec![("payment_declined".into(), Some(reason.clone()))],
                    emit: vec![NewEvent::cancelled(CancelReason::PaymentDeclined, Some(&reason))],
                    inventory: Some(InventoryAction::Release),
                    payment: Some(payment(PaymentState::Declined, None, Some(reason))),
                    enqueue: vec![self.job(SEND_CANCELLATION, order.id)],
                    ..Default::default()
                };
                match self.complete(job, declined).await? {
                    CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
                    _ => {
                        self.metrics.orders_cancelled(CancelReason::PaymentDeclined, 1);
                        Ok(())
                    }
                }
            }
            Err(PaymentError::Transient(error)) => Err(StepError::Retry(error)),
            Err(PaymentError::Rejected(error)) => Err(StepError::Fatal(error)),
        }
    }

    async fn commit_inventory(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let id = job
            .order_id
            .ok_or_else(|| StepError::Fatal("job has no order".into()))?;
        let effects = StepEffects {
            order_id: Some(id),
            expect_status: vec![OrderStatus::Paid],
            events: vec![("inventory_committed".into(), None)],
            emit: vec![NewEvent::new(EventType::OrderReadyToShip)],
            inventory: Some(InventoryAction::Commit),
            enqueue: vec![self.job(FULFIL_ORDER, id)],
            ..Default::default()
        };
        match self.complete(job, effects).await? {
            // Cancelled (and refunded) meanwhile: the compensation gave the stock back.
            CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
            _ => Ok(()),
        }
    }

    async fn fulfil_order(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let id = job
            .order_id
            .ok_or_else(|| StepError::Fatal("job has no order".into()))?;
        let effects = StepEffects {
            order_id: Some(id),
            expect_status: vec![OrderStatus::Paid],
            new_status: Some(OrderStatus::Fulfilled),
            events: vec![("fulfilled".into(), None)],
            emit: vec![NewEvent::new(EventType::OrderFulfilled)],
            enqueue: vec![self.job(SEND_CONFIRMATION, id)],
            ..Default::default()
        };
        match self.complete(job, effects).await? {
            CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
            _ => Ok(()),
        }
    }

    async fn refund_payment(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let order = self.order(job).await?;
        if order.status == OrderStatus::Fulfilled {
            return Err(StepError::Fatal(
                "a fulfilled order cannot be refunded by cancellation".into(),
            ));
        }
        let payment = self.store.payment(order.id).await.map_err(retry)?;
        let mut effects = StepEffects {
            order_id: Some(order.id),
            new_status: Some(OrderStatus::Cancelled),
            inventory: Some(InventoryAction::Release),
            enqueue: vec![self.job(SEND_CANCELLATION, order.id)],
            ..Default::default()
        };
        match payment {
            Some(payment) if payment.state == PaymentState::Captured.as_str() => {
                let charge_id = payment
                    .provider_ref
                    .clone()
                    .ok_or_else(|| StepError::Fatal("captured payment without a charge id".into()))?;
                let request = RefundRequest {
                    idempotency_key: refund_key(order.id),
                    charge_id,
                    amount_minor: payment.amount_minor,
                    correlation_id: job.correlation_id.clone(),
                };
                let started = std::time::Instant::now();
                let refunded = self.payments.refund(&request).await;
                let outcome = match &refunded {
                    Ok(_) => "succeeded",
                    Err(PaymentError::Declined(_)) => "declined",
                    Err(PaymentError::Transient(_)) => "unavailable",
                    Err(PaymentError::Rejected(_)) => "rejected",
                };
                self.metrics.payment("refund", outcome, started.elapsed());
                let refund_id = match refunded {
                    Ok(id) => id,
                    Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
                    Err(error) => return Err(StepError::Fatal(error.to_string())),
                };
                effects
                    .events
                    .push(("payment_refunded".into(), Some(format!("refund {refund_id}"))));
                effects.emit.push(NewEvent::new(EventType::PaymentRefunded).with(
                    "refund",
                    json!({
                        "refund_id": refund_id,
                        "amount": crate::domain::Money::from_minor(payment.amount_minor)
                            .unwrap_or_default()
                            .to_json_number(order.currency),
                    }),
                ));
                effects.payment = Some(PaymentChange {
                    provider: payment.provider,
                    idempotency_key: payment.idempotency_key,
                    state: PaymentState::Refunded,
                    provider_ref: payment.provider_ref,
                    amount_minor: payment.amount_minor,
                    currency: payment.currency,
                    detail: Some(format!("refund {refund_id}")),
                });
            }
            _ => effects
                .events
                .push(("cancelled".into(), Some("nothing to refund".into()))),
        }
        self.complete(job, effects).await.map(|_| ())
    }

    async fn send(&self, job: &ClaimedJob, kind: &str) -> Result<(), StepError> {
        let order = self.order(job).await?;
        let customer = self
            .store
            .get_customer(order.customer_id)
            .await
            .map_err(retry)?
            .ok_or_else(|| StepError::Fatal("the order's customer does not exist".into()))?;
        let recipient = customer.email.as_str().to_string();
        if self
            .store
            .prepare_notification(order.id, kind, &recipient, clock::now())
            .await
            .map_err(retry)?
            == NotificationSlot::AlreadySent
        {
            return self.nothing_to_do(job).await;
        }
        let message = compose(
            kind,
            &order,
            &customer.first_name,
            &recipient,
            job.correlation_id.clone(),
        );
        self.notifier
            .send(&message)
            .await
            .map_err(|e| StepError::Retry(e.to_string()))?;
        let effects = StepEffects {
            order_id: Some(order.id),
            events: vec![("notification_sent".into(), Some(kind.to_string()))],
            notification_sent: Some(NotificationSent {
                kind: kind.to_string(),
                message_id: message.message_id,
            }),
            ..Default::default()
        };
        self.complete(job, effects).await.map(|_| ())
    }
}

/// The e-mail for a notification kind.
fn compose(kind: &str, order: &Order, first_name: &str, to: &str, correlation_id: Option<String>) -> Message {
    let total = format!("{} {}", order.total.to_decimal(order.currency), order.currency);
    let (subject, body) = match kind {
        SEND_RECEIPT => (
            format!("Payment received for order {}", order.id),
            format!(
                "Hello {first_name},\n\nwe received your payment of {total} for order {}.\n",
                order.id
            ),
        ),
        SEND_CONFIRMATION => (
            format!("Your order {} is on its way", order.id),
            format!(
                "Hello {first_name},\n\nyour order {} ({total}) has been handed to fulfilment.\n",
                order.id
            ),
        ),
        _ => (
            format!("Your order {} was cancelled", order.id),
            format!(
                "Hello {first_name},\n\nyour order {} was cancelled; any payment taken has been refunded.\n",
                order.id
            ),
        ),
    };
    Message {
        to: to.to_string(),
        subject,
        body,
        message_id: format!("<{}.{}@orderflow>", kind.trim_start_matches("send_"), order.id),
        correlation_id,
    }
}

fn retry(error: StoreError) -> StepError {
    StepError::Retry(error.to_string())
}

struct SagaStep {
    saga: Arc<Saga>,
    kind: &'static str,
}

#[async_trait]
impl Step for SagaStep {
    async fn run(&self, job: &ClaimedJob) -> Result<(), StepError> {
        match self.kind {
            CHARGE_PAYMENT => self.saga.charge_payment(job).await,
            COMMIT_INVENTORY => self.saga.commit_inventory(job).await,
            FULFIL_ORDER => self.saga.fulfil_order(job).await,
            REFUND_PAYMENT => self.saga.refund_payment(job).await,
            kind => self.saga.send(job, kind).await,
        }
    }
}

/// What cancelling an order did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// It was pending: stock released, order cancelled now.
    Cancelled,
    /// It was paid: cancelled and stock released now; the refund is queued.
    RefundQueued,
    /// It was already cancelled.
    AlreadyCancelled,
    /// Fulfilled orders cannot be cancelled.
    TooLate,
}

impl CancelOutcome {
    /// The job the cancellation enqueued, if it cancelled anything.
    pub fn enqueued(self) -> Option<&'static str> {
        match self {
            CancelOutcome::Cancelled => Some(SEND_CANCELLATION),
            CancelOutcome::RefundQueued => Some(REFUND_PAYMENT),
            CancelOutcome::AlreadyCancelled | CancelOutcome::TooLate => None,
        }
    }
}

/// Cancels an order (customer request, operator, or reservation expiry): compensation in reverse
/// order of the forward steps.
pub async fn cancel_order(
    store: &dyn Store,
    settings: &SagaSettings,
    id: OrderId,
    reason: CancelReason,
) -> Result<CancelOutcome, StoreError> {
    for _ in 0..5 {
        let Some(details) = store.get_order(id).await? else {
            return Err(StoreError::Corrupt(format!("order {id} vanished")));
        };
        let job = |kind, max_attempts| NewJob {
            kind,
            payload: crate::telemetry::with_trace_context(json!({ "order_id": id })),
            run_at: clock::now(),
            max_attempts,
        };
        let (expect, effects, outcome) = match details.order.status {
            OrderStatus::Cancelled => return Ok(CancelOutcome::AlreadyCancelled),
            OrderStatus::Fulfilled => return Ok(CancelOutcome::TooLate),
            OrderStatus::PendingPayment => (
                OrderStatus::PendingPayment,
                StepEffects {
                    new_status: Some(OrderStatus::Cancelled),
                    inventory: Some(InventoryAction::Release),
                    events: vec![("cancelled".into(), Some(reason.description().to_string()))],
                    emit: vec![NewEvent::cancelled(reason, None)],
                    enqueue: vec![job(SEND_CANCELLATION, settings.max_attempts)],
                    ..Default::default()
                },
                CancelOutcome::Cancelled,
            ),
            // Cancelled at once (so fulfilment, which expects `paid`, stops here) with the stock
            // back; the refund follows as a durable compensation.
            OrderStatus::Paid => (
                OrderStatus::Paid,
                StepEffects {
                    new_status: Some(OrderStatus::Cancelled),
                    inventory: Some(InventoryAction::Release),
                    events: vec![("cancelled".into(), Some(reason.description().to_string()))],
                    emit: vec![NewEvent::cancelled(reason, None)],
                    enqueue: vec![job(REFUND_PAYMENT, settings.compensation_max_attempts)],
                    ..Default::default()
                },
                CancelOutcome::RefundQueued,
            ),
        };
        let effects = StepEffects {
            order_id: Some(id),
            expect_status: vec![expect],
            ..effects
        };
        match store.complete_job(None, &effects, clock::now()).await? {
            CompleteOutcome::Completed => return Ok(outcome),
            // The status moved under us (payment landed): look again.
            _ => continue,
        }
    }
    Err(StoreError::Unavailable(
        "the order kept changing while cancelling it".into(),
    ))
}

/// Cancels orders still unpaid `ttl` after they were placed, releasing their stock. Returns how
/// many were cancelled. Safe to run from every process at once: each cancel is conditional.
pub async fn expire_reservations(
    store: &dyn Store,
    settings: &SagaSettings,
    ttl: std::time::Duration,
) -> Result<usize, StoreError> {
    let before = clock::now() - ttl;
    let mut expired = 0;
    for id in store.expired_orders(before, 500).await? {
        if cancel_order(store, settings, id, CancelReason::ReservationExpired).await? == CancelOutcome::Cancelled {
            expired += 1;
        }
    }
    Ok(expired)
}
