//! The durable job queue's persistence contract, and the effects a finished step commits.
//!
//! A step's database effects and its job's completion commit in ONE transaction
//! ([`JobStore::complete_job`]), fenced by the lease token: a worker whose lease was taken over
//! (it stalled past the visibility timeout) cannot complete the job, so its effects are refused.
//! Effects are described as data ([`StepEffects`]) by the workflow layer and applied by the store.

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

use super::{NewJob, Page, StoreResult};
use crate::domain::fulfilment::{ItemQuantity, RefundReason};
use crate::domain::{OrderId, OrderStatus, ProductId};

/// Proof that a worker holds a job: its id and the token of the claim.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobLease {
    pub job_id: Uuid,
    pub token: Uuid,
}

/// A job handed to a worker.
#[derive(Clone, Debug)]
pub struct ClaimedJob {
    pub lease: JobLease,
    pub kind: String,
    pub order_id: Option<OrderId>,
    pub payload: serde_json::Value,
    /// 1 for the first try.
    pub attempt: u32,
    pub max_attempts: u32,
    /// How many earlier runs died without a word (their worker crashed and the lease ran out).
    /// Those runs did not spend attempts.
    pub lease_expiries: u32,
    /// An earlier run of this job failed (its error history is not empty). Unlike `attempt`,
    /// this survives a replay, which gives the job fresh attempts.
    pub failed_before: bool,
    pub correlation_id: Option<String>,
}

/// What happened when a failure was recorded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailOutcome {
    /// Scheduled to run again.
    Retrying,
    /// Out of attempts (or failed permanently): dead-lettered until replayed.
    Dead,
    /// Someone else holds the job now; nothing was recorded.
    LeaseLost,
}

/// What happened when a step's effects were committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompleteOutcome {
    Completed,
    /// The lease was taken over: nothing was written.
    LeaseLost,
    /// The order was not in an expected status: nothing was written; the step should look again.
    UnexpectedStatus(OrderStatus),
    /// The order's payment was not in a state the effects expect (another step moved it
    /// meanwhile; `None`: there is no payment): nothing was written.
    UnexpectedPayment(Option<PaymentState>),
    /// A shipment or refund request with this Idempotency-Key was recorded before, with the same
    /// body: nothing was written; this is the first one's id.
    Replayed(Uuid),
    /// A business rule refused the effects (checked under the order's lock): nothing was written.
    Refused(Refusal),
}

/// Why a shipment, refund or cancellation was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Shipments need a paid order whose stock is committed.
    NotReadyToShip(OrderStatus),
    /// Every unit has shipped already.
    NothingToShip,
    /// (product, requested, still unshipped) per line that asks for too much.
    ExceedsUnshipped(Vec<(ProductId, u32, u32)>),
    /// Refunds are for fulfilled orders.
    NotRefundable(OrderStatus),
    /// More than captured minus refunded (settled or pending).
    ExceedsRefundable {
        requested_minor: i64,
        refundable_minor: i64,
    },
    /// (product, requested, shipped and not yet restocked) per restock line that asks for too much.
    ExceedsReturnable(Vec<(ProductId, u32, u32)>),
    /// The Idempotency-Key was used on this order with a different body.
    KeyReused,
    /// Cancelling an order some of whose goods have shipped.
    AlreadyShipped,
}

/// A shipment to record (`POST /orders/{id}/shipments`), items resolved.
#[derive(Clone, Debug)]
pub struct ShipmentDraft {
    pub id: Uuid,
    pub idempotency_key: String,
    /// A hash of the request body: the same key with another body is refused.
    pub request_hash: String,
    pub carrier: String,
    pub tracking_number: String,
    pub tracking_url: Option<String>,
    pub items: Vec<ItemQuantity>,
}

/// A refund to accept (`POST /orders/{id}/refunds`), amount resolved.
#[derive(Clone, Debug)]
pub struct RefundDraft {
    pub id: Uuid,
    pub idempotency_key: String,
    pub request_hash: String,
    pub amount_minor: i64,
    pub reason: RefundReason,
    /// Units back on the shelf now (`return` ledger rows).
    pub restock: Vec<ItemQuantity>,
}

/// The provider refunded a pending refund.
#[derive(Clone, Debug)]
pub struct RefundSettlement {
    pub refund_id: Uuid,
    pub provider_ref: String,
}

/// How an order's reserved stock moves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InventoryAction {
    /// Reserved → sold: on_hand and reserved go down, one `sale` ledger row per line.
    Commit,
    /// Give the stock back: a reservation is dropped; committed stock is returned to on_hand
    /// with a `return` ledger row per line. Already released: nothing.
    Release,
}

/// The state of an order's payment, as the shop records it (the PaymentIntents model: authorized
/// at checkout, captured when the goods leave or at once, voided or refunded when cancelled).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    /// The customer must finish 3-D Secure; the order waits.
    RequiresAction,
    Authorized,
    Captured,
    /// The authorization was released; no money moved.
    Voided,
    Declined,
    PartiallyRefunded,
    Refunded,
}

impl PaymentState {
    pub const ALL: [PaymentState; 7] = [
        PaymentState::RequiresAction,
        PaymentState::Authorized,
        PaymentState::Captured,
        PaymentState::Voided,
        PaymentState::Declined,
        PaymentState::PartiallyRefunded,
        PaymentState::Refunded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PaymentState::RequiresAction => "requires_action",
            PaymentState::Authorized => "authorized",
            PaymentState::Captured => "captured",
            PaymentState::Voided => "voided",
            PaymentState::Declined => "declined",
            PaymentState::PartiallyRefunded => "partially_refunded",
            PaymentState::Refunded => "refunded",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == text)
    }
}

/// A payment row to write (insert or update by order). Amounts are absolute, not deltas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaymentChange {
    pub provider: String,
    pub idempotency_key: String,
    pub state: PaymentState,
    /// The provider's PaymentIntent id.
    pub provider_ref: Option<String>,
    /// Authorized.
    pub amount_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub currency: String,
    pub detail: Option<String>,
    /// For [`PaymentState::RequiresAction`].
    pub client_secret: Option<String>,
}

/// A message recorded as sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NotificationSent {
    pub kind: String,
    pub message_id: String,
}

/// Everything a finished step writes, atomically with its job's completion.
#[derive(Clone, Debug, Default)]
pub struct StepEffects {
    pub order_id: Option<OrderId>,
    /// When not empty, the order must be in one of these statuses or nothing is written.
    pub expect_status: Vec<OrderStatus>,
    /// When not empty, the order's payment must be recorded in one of these states or nothing is
    /// written ([`CompleteOutcome::UnexpectedPayment`]): a step that acted on the payment it read
    /// does not overwrite what another step recorded since.
    pub expect_payment: Vec<PaymentState>,
    /// The order's new status; must be a legal transition (checked against the domain).
    pub new_status: Option<OrderStatus>,
    /// Timeline entries (kind, detail), recorded with the order's resulting status (I7).
    pub events: Vec<(String, Option<String>)>,
    pub inventory: Option<InventoryAction>,
    pub payment: Option<PaymentChange>,
    pub notification_sent: Option<NotificationSent>,
    /// Business facts for integrators (events out), written with the order as it stands after
    /// these effects, in this same transaction.
    pub emit: Vec<crate::domain::events::NewEvent>,
    pub enqueue: Vec<NewJob>,
    /// Record a shipment (replayed or refused as [`CompleteOutcome`] says).
    pub shipment: Option<ShipmentDraft>,
    /// Accept a refund and restock its units (replayed or refused as [`CompleteOutcome`] says).
    pub refund: Option<RefundDraft>,
    /// Settle a pending refund: the payment's refunded amount grows by it, and a fulfilled order
    /// refunded in full becomes `refunded`. Already settled: only the job completes.
    pub refund_settled: Option<RefundSettlement>,
    /// Refuse ([`Refusal::AlreadyShipped`]) when any shipment was recorded (cancellations).
    pub unless_shipped: bool,
}

/// Per step kind: the numbers an operator watches.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct QueueStats {
    pub kind: String,
    /// Ready to run now or waiting for a retry.
    pub ready: i64,
    pub running: i64,
    pub dead: i64,
    /// Seconds since the oldest ready job became ready (retries do not reset it).
    pub oldest_ready_age_seconds: Option<f64>,
}

/// One entry of a job's error history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct JobError {
    pub attempt: u32,
    pub error: String,
    pub at: DateTime<Utc>,
}

/// A job as the admin API shows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobRecord {
    pub job_id: Uuid,
    pub kind: String,
    pub order_id: Option<Uuid>,
    pub state: String,
    pub attempts: i32,
    pub max_attempts: i32,
    pub last_error: Option<String>,
    pub errors: Vec<JobError>,
    pub run_at: DateTime<Utc>,
    pub correlation_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// Which jobs to list.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub state: Option<String>,
    pub kind: Option<String>,
    pub after: Option<Uuid>,
    pub limit: u32,
}

/// Which dead jobs to move back to ready.
#[derive(Clone, Debug)]
pub enum ReplaySelector {
    One(Uuid),
    /// Every dead job, or every dead job of one kind.
    AllDead {
        kind: Option<String>,
    },
}

/// What preparing to send a notification found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotificationSlot {
    /// Nothing recorded yet (or an earlier attempt crashed before recording "sent"): send now.
    Send,
    /// Already sent: do not send again.
    AlreadySent,
}

/// An order's payment as the shop recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct PaymentRecord {
    pub provider: String,
    pub idempotency_key: String,
    pub state: String,
    pub provider_ref: Option<String>,
    /// Authorized.
    pub amount_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    pub currency: String,
    pub detail: Option<String>,
    pub client_secret: Option<String>,
    pub updated_at: DateTime<Utc>,
}

impl PaymentRecord {
    pub fn state(&self) -> Option<PaymentState> {
        PaymentState::parse(&self.state)
    }

    /// The record as a change to write (to move it on from here).
    pub fn change(&self, state: PaymentState) -> PaymentChange {
        PaymentChange {
            provider: self.provider.clone(),
            idempotency_key: self.idempotency_key.clone(),
            state,
            provider_ref: self.provider_ref.clone(),
            amount_minor: self.amount_minor,
            captured_minor: self.captured_minor,
            refunded_minor: self.refunded_minor,
            currency: self.currency.clone(),
            detail: self.detail.clone(),
            client_secret: None,
        }
    }
}

/// What a step reads before it acts: the order (with its lines), its customer's address, and
/// its payment record — in one query, not one per table.
#[derive(Clone, Debug)]
pub struct StepOrder {
    pub order: crate::domain::Order,
    /// The customer's e-mail address and first name; `None` if the customer row is gone.
    pub recipient: Option<(String, String)>,
    pub payment: Option<PaymentRecord>,
}

/// A message recorded for an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct NotificationRecord {
    pub kind: String,
    pub state: String,
    pub recipient: String,
    pub attempts: i32,
    pub sent_at: Option<DateTime<Utc>>,
}

pub(crate) const PAYMENT_SQL: &str = "SELECT provider, idempotency_key, state, provider_ref, amount_minor, captured_minor, \
     refunded_minor, currency, detail, client_secret, updated_at FROM payments WHERE order_id = $1";
/// [`JobStore::payments_after`]: payment records in order-id order, one page (the first page, and
/// the pages after a given order id).
pub(crate) const PAYMENTS_FIRST_SQL: &str = "SELECT order_id, provider, idempotency_key, state, provider_ref, \
     amount_minor, captured_minor, refunded_minor, currency, detail, client_secret, updated_at FROM payments \
     ORDER BY order_id LIMIT $1";
pub(crate) const PAYMENTS_AFTER_SQL: &str = "SELECT order_id, provider, idempotency_key, state, provider_ref, \
     amount_minor, captured_minor, refunded_minor, currency, detail, client_secret, updated_at FROM payments \
     WHERE order_id > $1 ORDER BY order_id LIMIT $2";

/// A row of [`PAYMENTS_FIRST_SQL`] / [`PAYMENTS_AFTER_SQL`].
#[derive(sqlx::FromRow)]
pub(crate) struct PaymentRow {
    pub order_id: Uuid,
    #[sqlx(flatten)]
    pub record: PaymentRecord,
}

impl PaymentRow {
    pub fn into_pair(self) -> (OrderId, PaymentRecord) {
        (OrderId::from_uuid(self.order_id), self.record)
    }
}

pub(crate) const NOTIFICATIONS_SQL: &str =
    "SELECT kind, state, recipient, attempts, sent_at FROM notifications WHERE order_id = $1 ORDER BY created_at, kind";
pub(crate) const EXPIRED_SQL: &str =
    "SELECT id FROM orders WHERE status = 'pending_payment' AND created_at < $1 ORDER BY created_at LIMIT $2";

/// The queue's persistence. Implementations: SQLite (single writer `UPDATE … RETURNING`) and
/// PostgreSQL (`FOR UPDATE SKIP LOCKED`).
#[async_trait]
pub trait JobStore: Send + Sync {
    /// Claims up to `limit` runnable jobs of `kind` (ready and due, or running with an expired
    /// lease), leasing them for `lease`.
    async fn claim_jobs(
        &self,
        kind: &str,
        limit: u32,
        lease: Duration,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<ClaimedJob>>;
    /// Extends a lease (heartbeat). False when the lease was lost.
    async fn extend_lease(&self, lease: &JobLease, until: DateTime<Utc>) -> StoreResult<bool>;
    /// Records a failed attempt: retried at `retry_at`, or dead when `retry_at` is `None` or the
    /// job is out of attempts.
    async fn fail_job(
        &self,
        lease: &JobLease,
        error: &str,
        retry_at: Option<DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> StoreResult<FailOutcome>;
    /// Gives a claimed job back to the queue, due at `run_at`, without spending the attempt it
    /// was claimed for: its step could not reach the database, which says nothing about the job.
    /// False when the lease was lost.
    async fn postpone_job(
        &self,
        lease: &JobLease,
        error: &str,
        run_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> StoreResult<bool>;
    /// Commits a step: its effects and its job's completion, in one transaction. Without a lease
    /// (an API action such as cancel), only the effects are committed.
    async fn complete_job(
        &self,
        lease: Option<&JobLease>,
        effects: &StepEffects,
        now: DateTime<Utc>,
    ) -> StoreResult<CompleteOutcome>;
    /// Completes several jobs in ONE transaction, each in its own savepoint: each succeeds, is
    /// refused (lease lost, order moved on) or fails alone; answers in the same order.
    async fn complete_jobs(
        &self,
        completions: &[(Option<JobLease>, StepEffects)],
        now: DateTime<Utc>,
    ) -> Vec<StoreResult<CompleteOutcome>>;
    /// Records that a notification is about to be sent (I8), unless it already was.
    async fn prepare_notification(
        &self,
        order: OrderId,
        kind: &str,
        recipient: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<NotificationSlot>;
    /// Ready, running and dead jobs per kind (cheap: finished jobs are not counted).
    async fn queue_stats(&self, now: DateTime<Utc>) -> StoreResult<Vec<QueueStats>>;
    /// Succeeded jobs still kept, per kind (a scan of them: for on-demand reads only).
    async fn succeeded_jobs(&self) -> StoreResult<Vec<(String, i64)>>;
    async fn list_jobs(&self, filter: &JobFilter) -> StoreResult<Page<JobRecord>>;
    /// Moves dead jobs back to ready with fresh attempts, keeping their error history.
    async fn replay_jobs(&self, selector: &ReplaySelector, now: DateTime<Utc>) -> StoreResult<u64>;
    /// Deletes succeeded jobs finished before `before`.
    async fn prune_jobs(&self, before: DateTime<Utc>) -> StoreResult<u64>;
    /// Whether any job is ready (due now or waiting for a retry) or running; draining the queue
    /// means running jobs until this is false.
    async fn has_pending_work(&self) -> StoreResult<bool>;
    async fn payment(&self, order: OrderId) -> StoreResult<Option<PaymentRecord>>;
    /// The order as a step needs it ([`StepOrder`]): two queries (the order joined with its
    /// customer and payment, then its lines), where reading each part alone took five.
    async fn step_order(&self, order: OrderId) -> StoreResult<Option<StepOrder>>;
    /// Every order's payment record, a page at a time in order-id order: up to `limit` records of
    /// orders after `after` (from the first when `None`). The reconciliation with the provider's
    /// books (`workflow::reconcile`) pages through them so its memory stays bounded.
    async fn payments_after(&self, after: Option<OrderId>, limit: u32) -> StoreResult<Vec<(OrderId, PaymentRecord)>>;
    async fn notifications(&self, order: OrderId) -> StoreResult<Vec<NotificationRecord>>;
    /// Orders still `pending_payment` that were placed before `before` (reservation expiry).
    async fn expired_orders(&self, before: DateTime<Utc>, limit: u32) -> StoreResult<Vec<OrderId>>;
}
