//! The saga's steps. Each reads what it needs, makes at most one outside call (with an
//! idempotency key derived from the order), then commits its effects together with its job's
//! completion ([`JobStore::complete_job`]). Compensations (refund, release, cancel) are idempotent
//! and get many attempts, so they are dead-lettered only as a last resort.

use std::sync::Arc;

use async_trait::async_trait;
use serde_json::json;

use super::{
    ALL_STEPS, CHARGE_PAYMENT, COMMIT_INVENTORY, FULFIL_ORDER, REFUND_PAYMENT, SEND_CANCELLATION, SEND_CONFIRMATION,
    SEND_RECEIPT, SETTLE_REFUND,
};
use crate::adapters::notify::{Message, Notifier};
use crate::adapters::payment::PaymentError;
use crate::adapters::payment::intents::{
    AuthorizeRequest, CaptureMethod, CaptureRequest, IntentStatus, PaymentIntent, PaymentProvider, RefundRequest,
    VoidRequest,
};
use crate::clock;
use crate::domain::events::{EventType, NewEvent};
use crate::domain::fulfilment::{self, RefundState};
use crate::domain::{Money, Order, OrderId, OrderStatus};
use crate::monitoring::metrics::{CancelReason, Metrics};
use crate::queue::{Runner, Step, StepError};
use crate::store::jobs::{
    ClaimedJob, CompleteOutcome, InventoryAction, NotificationSent, NotificationSlot, PaymentChange, PaymentState,
    RefundSettlement, Refusal, StepEffects, StepOrder,
};
use crate::store::{NewJob, Store, StoreError};

/// When an order's money is taken.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum CaptureMode {
    /// Authorize at checkout, capture when the goods leave (fulfilment).
    OnShipment,
    /// Authorize and capture at once.
    OnPayment,
}

/// Who ships the goods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FulfilmentMode {
    /// The built-in step ships at once when stock is committed (demos, digital goods).
    Auto,
    /// A warehouse ships and reports shipments back (`POST /orders/{id}/shipments`); the order
    /// is fulfilled when every unit has shipped.
    External,
}

/// Attempts and payment settings for the jobs the saga enqueues.
#[derive(Clone, Debug)]
pub struct SagaSettings {
    /// Forward steps (payment, inventory, fulfilment, e-mails).
    pub max_attempts: u32,
    /// Compensations (refunds): retried much longer before a dead letter.
    pub compensation_max_attempts: u32,
    pub capture: CaptureMode,
    pub fulfilment: FulfilmentMode,
}

impl Default for SagaSettings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            compensation_max_attempts: 10,
            capture: CaptureMode::OnShipment,
            fulfilment: FulfilmentMode::Auto,
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

/// The key of capturing an order's authorized payment.
pub fn capture_key(order: OrderId) -> String {
    format!("orderflow-capture-{order}")
}

/// The key of voiding an order's authorization.
pub fn void_key(order: OrderId) -> String {
    format!("orderflow-void-{order}")
}

/// The key of refunding a cancelled order's captured payment in full.
pub fn refund_key(order: OrderId) -> String {
    format!("orderflow-refund-{order}")
}

/// The key of one accepted refund of a fulfilled order (`POST /orders/{id}/refunds`).
pub fn settle_refund_key(refund: uuid::Uuid) -> String {
    format!("orderflow-refund-{refund}")
}

/// A job of `kind` for the order (payload `{"order_id"}` with the trace context), with the
/// attempts its kind gets: compensations and refunds many, forward steps few.
pub fn step_job(settings: &SagaSettings, kind: &'static str, order: OrderId) -> NewJob {
    let max_attempts = if kind == REFUND_PAYMENT || kind == SETTLE_REFUND {
        settings.compensation_max_attempts
    } else {
        settings.max_attempts
    };
    NewJob {
        kind,
        payload: crate::telemetry::with_trace_context(json!({ "order_id": order })),
        run_at: clock::now(),
        max_attempts,
    }
}

/// The PaymentIntent a recorded payment refers to.
fn intent_of(payment: &crate::store::jobs::PaymentRecord) -> Result<String, StepError> {
    payment
        .provider_ref
        .clone()
        .ok_or_else(|| StepError::Fatal("the payment has no payment intent".into()))
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
        step_job(&self.settings, kind, order)
    }

    /// The job's order with its customer's address and its payment record (one read).
    async fn order(&self, job: &ClaimedJob) -> Result<StepOrder, StepError> {
        let id = job
            .order_id
            .ok_or_else(|| StepError::Fatal("job has no order".into()))?;
        self.store
            .step_order(id)
            .await
            .map_err(StepError::from)?
            .ok_or_else(|| StepError::Fatal(format!("order {id} does not exist")))
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
            .map_err(StepError::from)?
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

    /// Times a provider call and counts its outcome (`orderflow_payments_total`).
    async fn provider_call<T>(
        &self,
        operation: &'static str,
        call: impl std::future::Future<Output = Result<T, PaymentError>>,
    ) -> Result<T, PaymentError> {
        let started = std::time::Instant::now();
        let result = call.await;
        let outcome = match &result {
            Ok(_) => "succeeded",
            Err(PaymentError::Declined(_)) => "declined",
            Err(PaymentError::Transient(_)) => "unavailable",
            Err(PaymentError::Rejected(_)) => "rejected",
        };
        self.metrics.payment(operation, outcome, started.elapsed());
        result
    }

    /// Authorizes the order's payment (capturing it at once with `--capture on-payment`).
    async fn charge_payment(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let StepOrder {
            order,
            payment: recorded,
            ..
        } = self.order(job).await?;
        // An earlier run whose outcome is unknown (a timeout or 5xx, or its worker died mid-call;
        // perhaps before the job was dead-lettered and replayed) may have authorized at the
        // provider. If the order was cancelled since, asking again with the same key finds that
        // intent (or makes one) and the cancelled branches below record and void it, so no hold
        // is left on the card (found by orderflow-chaos, docs/reliability.md).
        let earlier_run_unknown = recorded.is_none() && (job.failed_before || job.lease_expiries > 0);
        let cancelled_after_unknown_run = order.status == OrderStatus::Cancelled && earlier_run_unknown;
        if order.status != OrderStatus::PendingPayment && !cancelled_after_unknown_run {
            // Cancelled or expired before we got here: nothing to take.
            return self.nothing_to_do(job).await;
        }
        let key = charge_key(order.id);
        let capture = match self.settings.capture {
            CaptureMode::OnPayment => CaptureMethod::Automatic,
            CaptureMode::OnShipment => CaptureMethod::Manual,
        };
        let request = AuthorizeRequest {
            idempotency_key: key.clone(),
            amount_minor: order.total.minor(),
            currency: order.currency.code().to_string(),
            payment_method: order.payment_token.as_str().to_string(),
            capture,
            order_id: order.id.to_string(),
            correlation_id: job.correlation_id.clone(),
        };
        let payment = |state, intent: Option<&PaymentIntent>, detail: Option<String>| PaymentChange {
            provider: self.payments.name().to_string(),
            idempotency_key: key.clone(),
            state,
            provider_ref: intent.map(|i| i.id.clone()),
            amount_minor: order.total.minor(),
            captured_minor: intent.map(|i| i.amount_captured_minor).unwrap_or(0),
            refunded_minor: 0,
            currency: order.currency.code().to_string(),
            detail,
            client_secret: intent.and_then(|i| i.client_secret.clone()),
        };
        // A payment waiting for the customer (3-D Secure) is resumed by asking the provider where
        // its intent stands: replaying the authorization would only replay its first answer.
        let waiting = match recorded {
            Some(record) if record.state() == Some(PaymentState::RequiresAction) => record.provider_ref,
            _ => None,
        };
        let authorized = match &waiting {
            Some(intent_id) => self.provider_call("retrieve", self.payments.retrieve(intent_id)).await,
            None => self.provider_call("authorize", self.payments.authorize(&request)).await,
        };
        let authorized = match authorized {
            // The customer failed (or abandoned) the authentication: a decline like any other.
            Ok(intent)
                if waiting.is_some()
                    && matches!(
                        intent.status,
                        IntentStatus::RequiresPaymentMethod | IntentStatus::Canceled
                    ) =>
            {
                Err(PaymentError::Declined(
                    intent
                        .last_error
                        .clone()
                        .unwrap_or_else(|| "authentication_failed".into()),
                ))
            }
            other => other,
        };
        let intent = match authorized {
            Ok(intent) => intent,
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
                return match self.complete(job, declined).await? {
                    CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
                    _ => {
                        self.metrics.orders_cancelled(CancelReason::PaymentDeclined, 1);
                        Ok(())
                    }
                };
            }
            Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
            Err(PaymentError::Rejected(error)) => return Err(StepError::Fatal(error)),
        };
        let (state, emit, timeline) = match intent.status {
            IntentStatus::RequiresCapture => (
                PaymentState::Authorized,
                vec![NewEvent::new(EventType::OrderPaid)],
                "payment_authorized",
            ),
            IntentStatus::Succeeded => (
                PaymentState::Captured,
                vec![
                    NewEvent::new(EventType::OrderPaid),
                    NewEvent::new(EventType::PaymentCaptured),
                ],
                "payment_captured",
            ),
            IntentStatus::RequiresAction => {
                // 3-D Secure: the customer finishes it with the client secret; the order waits
                // (Stripe's webhook, or reservation expiry, moves it on).
                if waiting.is_some() {
                    return self.nothing_to_do(job).await;
                }
                let waiting = StepEffects {
                    order_id: Some(order.id),
                    expect_status: vec![OrderStatus::PendingPayment],
                    events: vec![("payment_requires_action".into(), Some(intent.id.clone()))],
                    payment: Some(payment(PaymentState::RequiresAction, Some(&intent), None)),
                    ..Default::default()
                };
                return match self.complete(job, waiting).await? {
                    // Cancelled while we were asking: record the intent and void it.
                    CompleteOutcome::UnexpectedStatus(OrderStatus::Cancelled) => {
                        let give_back = self.payment_after_cancel(
                            order.id,
                            &intent.id,
                            payment(PaymentState::RequiresAction, Some(&intent), None),
                        );
                        self.complete(job, give_back).await.map(|_| ())
                    }
                    CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
                    _ => Ok(()),
                };
            }
            IntentStatus::Processing => return Err(StepError::Retry("the provider is still processing".into())),
            IntentStatus::Canceled | IntentStatus::RequiresPaymentMethod => {
                return Err(StepError::Fatal(format!(
                    "the provider answered a {} PaymentIntent {}",
                    intent.status.as_str(),
                    intent.id
                )));
            }
        };
        // Paid: the reserved stock becomes sold in the same commit (no outside call needed, so no
        // step of its own), and the order is ready to ship. With `--fulfilment external` the
        // order waits for the warehouse's shipments, each of which runs fulfil_order.
        let mut emit = emit;
        emit.push(NewEvent::new(EventType::OrderReadyToShip));
        let mut enqueue = vec![self.job(SEND_RECEIPT, order.id)];
        if self.settings.fulfilment == FulfilmentMode::Auto {
            enqueue.insert(0, self.job(FULFIL_ORDER, order.id));
        }
        let paid = StepEffects {
            order_id: Some(order.id),
            expect_status: vec![OrderStatus::PendingPayment],
            new_status: Some(OrderStatus::Paid),
            events: vec![
                (
                    timeline.into(),
                    Some(format!("{} payment intent {}", self.payments.name(), intent.id)),
                ),
                ("inventory_committed".into(), None),
            ],
            payment: Some(payment(state, Some(&intent), None)),
            inventory: Some(InventoryAction::Commit),
            emit,
            enqueue,
            ..Default::default()
        };
        match self.complete(job, paid).await? {
            // Another run of this step (a webhook's wake-up racing a retry) recorded the same
            // intent first: nothing to give back.
            CompleteOutcome::UnexpectedStatus(status) if status != OrderStatus::Cancelled => {
                self.nothing_to_do(job).await
            }
            CompleteOutcome::UnexpectedStatus(_) => {
                // Cancelled while we were authorizing: keep the record and give it back (void or
                // refund, by the compensation).
                let give_back = self.payment_after_cancel(order.id, &intent.id, payment(state, Some(&intent), None));
                self.complete(job, give_back).await.map(|_| ())
            }
            _ => Ok(()),
        }
    }

    /// What a step records when it finds the order cancelled after the provider authorized or
    /// captured its payment: the payment as the provider left it (`payment.captured` when money
    /// was taken), and the compensation that gives it back (void or refund).
    fn payment_after_cancel(&self, order: OrderId, intent_id: &str, payment: PaymentChange) -> StepEffects {
        StepEffects {
            order_id: Some(order),
            events: vec![("payment_after_cancel".into(), Some(intent_id.to_string()))],
            emit: if payment.state == PaymentState::Captured {
                vec![NewEvent::new(EventType::PaymentCaptured)]
            } else {
                Vec::new()
            },
            payment: Some(payment),
            enqueue: vec![self.job(REFUND_PAYMENT, order)],
            ..Default::default()
        }
    }

    /// Commits the reserved stock of a paid order. Payment now does this in its own commit;
    /// the step stays for `commit_inventory` jobs enqueued by earlier versions.
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
            // External fulfilment: the order waits for the warehouse's shipments, each of which
            // runs fulfil_order.
            enqueue: match self.settings.fulfilment {
                FulfilmentMode::Auto => vec![self.job(FULFIL_ORDER, id)],
                FulfilmentMode::External => Vec::new(),
            },
            ..Default::default()
        };
        match self.complete(job, effects).await? {
            // Cancelled (and refunded) meanwhile: the compensation gave the stock back.
            CompleteOutcome::UnexpectedStatus(_) => self.nothing_to_do(job).await,
            _ => Ok(()),
        }
    }

    /// The goods leave: an authorized payment is captured (the first shipment), and the order is
    /// fulfilled once every unit has shipped (at once with `--fulfilment auto`).
    async fn fulfil_order(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let StepOrder { order, payment, .. } = self.order(job).await?;
        if order.status != OrderStatus::Paid {
            return self.nothing_to_do(job).await;
        }
        let all_shipped = match self.settings.fulfilment {
            FulfilmentMode::Auto => true,
            FulfilmentMode::External => {
                let shipments = self
                    .store
                    .after_sale()
                    .shipments(order.id)
                    .await
                    .map_err(StepError::from)?;
                fulfilment::remaining(
                    fulfilment::ordered(&order.lines),
                    shipments.iter().flat_map(|s| s.items.iter().copied()),
                )
                .values()
                .all(|&left| left == 0)
            }
        };
        let mut effects = StepEffects {
            order_id: Some(order.id),
            expect_status: vec![OrderStatus::Paid],
            ..Default::default()
        };
        if all_shipped {
            effects.new_status = Some(OrderStatus::Fulfilled);
            effects.events.push(("fulfilled".into(), None));
            effects.emit.push(NewEvent::new(EventType::OrderFulfilled));
            effects.enqueue.push(self.job(SEND_CONFIRMATION, order.id));
        }
        // The capture this run made: (intent, payment), recorded even if the order was cancelled.
        let mut captured_now = None;
        if let Some(payment) = payment.filter(|p| p.state() == Some(PaymentState::Authorized)) {
            let intent_id = payment
                .provider_ref
                .clone()
                .ok_or_else(|| StepError::Fatal("authorized payment without a payment intent".into()))?;
            let request = CaptureRequest {
                idempotency_key: capture_key(order.id),
                intent_id,
                amount_minor: payment.amount_minor,
                correlation_id: job.correlation_id.clone(),
            };
            let capture = match self.provider_call("capture", self.payments.capture(&request)).await {
                Ok(intent) if intent.status == IntentStatus::Succeeded => Ok(intent),
                // Some providers answer a capture of a cancelled intent with the intent as it
                // is: no money moved, so nothing may be recorded as captured.
                Ok(intent) => Err(format!(
                    "capturing the payment left payment intent {} {}",
                    intent.id,
                    intent.status.as_str()
                )),
                Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
                Err(error) => Err(format!("capturing the payment failed: {error}")),
            };
            let captured = match capture {
                Ok(intent) => intent,
                // The buyer cancelled meanwhile and the cancellation's refund_payment voided the
                // authorization first: nothing was taken, nothing is left to do.
                Err(_) if self.order(job).await?.order.status == OrderStatus::Cancelled => {
                    return self.nothing_to_do(job).await;
                }
                // An authorization that can no longer be captured (expired, voided elsewhere):
                // parked for an operator (docs/fulfilment.md: a new payment is needed).
                Err(error) => return Err(StepError::Fatal(error)),
            };
            let mut change = payment.change(PaymentState::Captured);
            change.captured_minor = captured.amount_captured_minor;
            captured_now = Some((captured.id.clone(), change.clone()));
            effects.payment = Some(change);
            effects.events.insert(
                0,
                (
                    "payment_captured".into(),
                    Some(format!("payment intent {}", captured.id)),
                ),
            );
            effects.emit.insert(0, NewEvent::new(EventType::PaymentCaptured));
        } else if !all_shipped {
            // A later partial shipment: the money was taken with the first one.
            return self.nothing_to_do(job).await;
        }
        match (self.complete(job, effects).await?, captured_now) {
            // The buyer cancelled while the capture was on the wire: the money was taken, so it
            // is recorded and given back — unless the cancellation's refund_payment found the
            // capture first and recorded it refunded (the payment is no longer the authorization
            // this run read).
            (CompleteOutcome::UnexpectedStatus(OrderStatus::Cancelled), Some((intent_id, change))) => {
                let give_back = StepEffects {
                    expect_payment: vec![PaymentState::Authorized],
                    ..self.payment_after_cancel(order.id, &intent_id, change)
                };
                match self.complete(job, give_back).await? {
                    CompleteOutcome::UnexpectedPayment(_) => self.nothing_to_do(job).await,
                    _ => Ok(()),
                }
            }
            (CompleteOutcome::UnexpectedStatus(_), _) => self.nothing_to_do(job).await,
            _ => Ok(()),
        }
    }

    /// Refunds one accepted refund of a fulfilled order at the provider (key: the refund's id),
    /// then adds it to the payment's refunded amount; a refund that makes it whole makes the
    /// order `refunded`.
    async fn settle_refund(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let StepOrder { order, payment, .. } = self.order(job).await?;
        let refund_id = job
            .payload
            .get("refund_id")
            .and_then(|id| id.as_str())
            .and_then(|id| id.parse::<uuid::Uuid>().ok())
            .ok_or_else(|| StepError::Fatal("job has no refund_id".into()))?;
        let refunds = self
            .store
            .after_sale()
            .refunds(order.id)
            .await
            .map_err(StepError::from)?;
        let refund = refunds
            .into_iter()
            .find(|r| r.id == refund_id)
            .ok_or_else(|| StepError::Fatal(format!("refund {refund_id} does not exist")))?;
        if refund.state != RefundState::Pending {
            return self.nothing_to_do(job).await;
        }
        let payment = payment.ok_or_else(|| StepError::Fatal("the order has no payment to refund".into()))?;
        let request = RefundRequest {
            idempotency_key: settle_refund_key(refund.id),
            intent_id: intent_of(&payment)?,
            amount_minor: refund.amount_minor,
            // Stripe knows `requested_by_customer`; the adapter sends the others (returned,
            // damaged, other) as metadata.
            reason: Some(refund.reason.as_str().to_string()),
            correlation_id: job.correlation_id.clone(),
        };
        let settled = match self.provider_call("refund", self.payments.refund(&request)).await {
            Ok(settled) => settled,
            Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
            // Refused by the provider (e.g. disputed): parked for an operator, the refund stays
            // pending and counts against what may still be refunded.
            Err(error) => return Err(StepError::Fatal(format!("the provider refused the refund: {error}"))),
        };
        let effects = StepEffects {
            order_id: Some(order.id),
            refund_settled: Some(RefundSettlement {
                refund_id: refund.id,
                provider_ref: settled.id.clone(),
            }),
            events: vec![(
                "payment_refunded".into(),
                Some(format!(
                    "refund {} of {} {} ({})",
                    settled.id,
                    Money::from_minor(refund.amount_minor)
                        .unwrap_or_default()
                        .to_decimal(order.currency),
                    order.currency,
                    refund.reason.as_str()
                )),
            )],
            emit: vec![NewEvent::new(EventType::PaymentRefunded).with(
                "refund",
                json!({
                    "refund_id": refund.id,
                    "provider_refund_id": settled.id,
                    "amount": Money::from_minor(refund.amount_minor).unwrap_or_default().to_json_number(order.currency),
                    "reason": refund.reason.as_str(),
                }),
            )],
            ..Default::default()
        };
        self.complete(job, effects).await.map(|_| ())
    }

    /// The cancellation's compensation: void an authorization, refund a capture, in full.
    async fn refund_payment(&self, job: &ClaimedJob) -> Result<(), StepError> {
        let StepOrder { order, payment, .. } = self.order(job).await?;
        if matches!(order.status, OrderStatus::Fulfilled | OrderStatus::Refunded) {
            return Err(StepError::Fatal(
                "a fulfilled order cannot be refunded by cancellation".into(),
            ));
        }
        let mut effects = StepEffects {
            order_id: Some(order.id),
            new_status: Some(OrderStatus::Cancelled),
            inventory: Some(InventoryAction::Release),
            enqueue: vec![self.job(SEND_CANCELLATION, order.id)],
            ..Default::default()
        };
        let state = payment.as_ref().and_then(|p| p.state());
        match (payment, state) {
            (Some(payment), Some(state @ (PaymentState::Authorized | PaymentState::RequiresAction))) => {
                let request = VoidRequest {
                    idempotency_key: void_key(order.id),
                    intent_id: intent_of(&payment)?,
                    correlation_id: job.correlation_id.clone(),
                };
                effects.expect_payment = vec![state];
                let refused = match self.provider_call("void", self.payments.void(&request)).await {
                    Ok(intent) => {
                        effects
                            .events
                            .push(("payment_voided".into(), Some(format!("payment intent {}", intent.id))));
                        effects.payment = Some(payment.change(PaymentState::Voided));
                        None
                    }
                    Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
                    Err(error) => Some(error),
                };
                if let Some(refused) = refused {
                    // Too late to void: fulfil_order captured while the buyer cancelled, and has
                    // not recorded it yet (docs/payments.md). The provider's intent says what
                    // happened; captured money is refunded instead.
                    let intent = match self
                        .provider_call("retrieve", self.payments.retrieve(&request.intent_id))
                        .await
                    {
                        Ok(intent) => intent,
                        Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
                        Err(error) => {
                            return Err(StepError::Fatal(format!(
                                "{refused}; reading the payment intent failed: {error}"
                            )));
                        }
                    };
                    match intent.status {
                        IntentStatus::Succeeded => {
                            let mut captured = payment.change(PaymentState::Captured);
                            captured.captured_minor = intent.amount_captured_minor;
                            effects.events.push((
                                "payment_captured".into(),
                                Some(format!("payment intent {} was captured before the void", intent.id)),
                            ));
                            effects.emit.push(NewEvent::new(EventType::PaymentCaptured));
                            self.refund_in_full(job, &order, captured, &mut effects).await?;
                        }
                        IntentStatus::Processing => {
                            return Err(StepError::Retry("the provider is still processing".into()));
                        }
                        _ => return Err(StepError::Fatal(refused.to_string())),
                    }
                }
            }
            (Some(payment), Some(state @ (PaymentState::Captured | PaymentState::PartiallyRefunded))) => {
                effects.expect_payment = vec![state];
                self.refund_in_full(job, &order, payment.change(state), &mut effects)
                    .await?;
            }
            // Given back by an earlier run (a second refund_payment, e.g. enqueued by fulfil_order
            // after a capture that met the cancellation): that run finished the cancellation.
            (Some(_), Some(PaymentState::Voided | PaymentState::Refunded)) => return self.nothing_to_do(job).await,
            _ => effects
                .events
                .push(("cancelled".into(), Some("nothing to give back".into()))),
        }
        match self.complete(job, effects).await? {
            // Another step recorded the payment since we read it (fulfil_order's capture that
            // met the cancellation): look again; the provider calls carry the same keys.
            CompleteOutcome::UnexpectedPayment(_) => Err(StepError::Retry(
                "the payment was recorded anew while giving it back".into(),
            )),
            _ => Ok(()),
        }
    }

    /// Refunds what is left of a cancelled order's captured `payment` (key [`refund_key`], so a
    /// retry finds the same refund, never a second one) and records it in `effects`: the payment
    /// refunded in full, `payment.refunded` emitted.
    async fn refund_in_full(
        &self,
        job: &ClaimedJob,
        order: &Order,
        payment: PaymentChange,
        effects: &mut StepEffects,
    ) -> Result<(), StepError> {
        let request = RefundRequest {
            idempotency_key: refund_key(order.id),
            intent_id: payment
                .provider_ref
                .clone()
                .ok_or_else(|| StepError::Fatal("the payment has no payment intent".into()))?,
            amount_minor: payment.captured_minor - payment.refunded_minor,
            reason: Some("requested_by_customer".into()),
            correlation_id: job.correlation_id.clone(),
        };
        let refund = match self.provider_call("refund", self.payments.refund(&request)).await {
            Ok(refund) => refund,
            Err(PaymentError::Transient(error)) => return Err(StepError::Retry(error)),
            Err(error) => return Err(StepError::Fatal(error.to_string())),
        };
        effects
            .events
            .push(("payment_refunded".into(), Some(format!("refund {}", refund.id))));
        effects.emit.push(NewEvent::new(EventType::PaymentRefunded).with(
            "refund",
            json!({
                "refund_id": refund.id,
                "provider_refund_id": refund.id,
                "reason": "cancelled",
                "amount": Money::from_minor(refund.amount_minor)
                    .unwrap_or_default()
                    .to_json_number(order.currency),
            }),
        ));
        effects.payment = Some(PaymentChange {
            state: PaymentState::Refunded,
            refunded_minor: payment.refunded_minor + refund.amount_minor,
            detail: Some(format!("refund {}", refund.id)),
            ..payment
        });
        Ok(())
    }

    async fn send(&self, job: &ClaimedJob, kind: &str) -> Result<(), StepError> {
        let StepOrder { order, recipient, .. } = self.order(job).await?;
        let (recipient, first_name) =
            recipient.ok_or_else(|| StepError::Fatal("the order's customer does not exist".into()))?;
        if self
            .store
            .prepare_notification(order.id, kind, &recipient, clock::now())
            .await
            .map_err(StepError::from)?
            == NotificationSlot::AlreadySent
        {
            return self.nothing_to_do(job).await;
        }
        let message = compose(kind, &order, &first_name, &recipient, job.correlation_id.clone());
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
            SETTLE_REFUND => self.saga.settle_refund(job).await,
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
    /// Fulfilled (or partly shipped) orders cannot be cancelled.
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
        let (expect, effects, outcome) = match details.order.status {
            OrderStatus::Cancelled => return Ok(CancelOutcome::AlreadyCancelled),
            OrderStatus::Fulfilled | OrderStatus::Refunded => return Ok(CancelOutcome::TooLate),
            OrderStatus::PendingPayment => {
                // A payment waiting for 3-D Secure holds an open intent: void it (the
                // compensation sends the cancellation e-mail after), so a late authentication
                // cannot leave a hold on the customer's card.
                let waiting = store
                    .payment(id)
                    .await?
                    .is_some_and(|p| p.state() == Some(PaymentState::RequiresAction));
                let next = if waiting { REFUND_PAYMENT } else { SEND_CANCELLATION };
                (
                    OrderStatus::PendingPayment,
                    StepEffects {
                        new_status: Some(OrderStatus::Cancelled),
                        inventory: Some(InventoryAction::Release),
                        events: vec![("cancelled".into(), Some(reason.description().to_string()))],
                        emit: vec![NewEvent::cancelled(reason, None)],
                        enqueue: vec![step_job(settings, next, id)],
                        ..Default::default()
                    },
                    CancelOutcome::Cancelled,
                )
            }
            // Cancelled at once (so fulfilment, which expects `paid`, stops here) with the stock
            // back; the refund follows as a durable compensation.
            OrderStatus::Paid => (
                OrderStatus::Paid,
                StepEffects {
                    new_status: Some(OrderStatus::Cancelled),
                    inventory: Some(InventoryAction::Release),
                    events: vec![("cancelled".into(), Some(reason.description().to_string()))],
                    emit: vec![NewEvent::cancelled(reason, None)],
                    enqueue: vec![step_job(settings, REFUND_PAYMENT, id)],
                    ..Default::default()
                },
                CancelOutcome::RefundQueued,
            ),
        };
        let effects = StepEffects {
            order_id: Some(id),
            expect_status: vec![expect],
            // Goods that left cannot be called back: a refund after delivery is the way.
            unless_shipped: true,
            ..effects
        };
        match store.complete_job(None, &effects, clock::now()).await? {
            CompleteOutcome::Completed => return Ok(outcome),
            CompleteOutcome::Refused(Refusal::AlreadyShipped) => return Ok(CancelOutcome::TooLate),
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
