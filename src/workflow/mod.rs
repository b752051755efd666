//! The checkout saga: what happens to an order, step by step.
//!
//! Placing an order is the synchronous commitment ([`checkout::place_order`]); it writes the first
//! job, `charge_payment`. Each later step is a durable job ([`steps`]) whose database effects and
//! completion commit in one transaction, and whose calls to the outside world carry idempotency
//! keys derived from the order:
//!
//! ```text
//! charge_payment ─┬─ authorized; stock committed ─┬─ fulfil_order (captures) ── send_confirmation
//!  (authorize)    │                                └─ send_receipt
//!                 └─ declined ── (release stock, cancel) ── send_cancellation
//! --fulfilment external: no fulfil_order at payment; each POST /orders/{id}/shipments runs it
//!                        (the first captures, the last fulfils)
//! cancel (API) / expiry: pending → release stock, cancel ── send_cancellation
//!                        paid    → release stock, cancel ── refund_payment (void or refund) ── send_cancellation
//! POST /orders/{id}/refunds (fulfilled): restock now ── settle_refund (provider refund) → `refunded` when whole
//! ```

pub mod checkout;
pub mod idempotency;
pub mod reconcile;
pub mod steps;

/// Authorize the payment (and capture it at once with `--capture on-payment`).
pub const CHARGE_PAYMENT: &str = "charge_payment";
/// Reserved stock becomes sold stock. The payment step does this in its own commit now; the
/// step runs `commit_inventory` jobs that earlier versions enqueued.
pub const COMMIT_INVENTORY: &str = "commit_inventory";
/// Hand the order to fulfilment; it becomes `fulfilled`.
pub const FULFIL_ORDER: &str = "fulfil_order";
/// Give a cancelled order's money back (compensation): void an authorization, refund a capture.
pub const REFUND_PAYMENT: &str = "refund_payment";
/// Refund an accepted (partial or full) refund of a fulfilled order at the provider.
pub const SETTLE_REFUND: &str = "settle_refund";
/// E-mail: payment received.
pub const SEND_RECEIPT: &str = "send_receipt";
/// E-mail: order fulfilled.
pub const SEND_CONFIRMATION: &str = "send_confirmation";
/// E-mail: order cancelled.
pub const SEND_CANCELLATION: &str = "send_cancellation";

/// Every step kind, for runners and dashboards.
pub const ALL_STEPS: [&str; 8] = [
    CHARGE_PAYMENT,
    COMMIT_INVENTORY,
    FULFIL_ORDER,
    REFUND_PAYMENT,
    SETTLE_REFUND,
    SEND_RECEIPT,
    SEND_CONFIRMATION,
    SEND_CANCELLATION,
];
