//! Event sinks: where committed events leave orderflow. The relay (`crate::events`) decides what
//! to send and records what each channel acknowledged; these adapters only speak the wire
//! protocols — NATS JetStream ([`nats`]) and Standard Webhooks over HTTP ([`webhook`]).

pub mod nats;
pub mod webhook;

use uuid::Uuid;

/// One committed, positioned event on its way out: its identity, routing facts and the
/// CloudEvent JSON body exactly as every channel receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingEvent {
    /// The CloudEvent `id`: the same on every channel and every re-send (the dedup key).
    pub id: Uuid,
    /// The CloudEvent `type`, e.g. `order.paid`.
    pub event_type: String,
    /// The order it is about, if any (per-order delivery order is kept per channel).
    pub order_id: Option<Uuid>,
    /// Per-subject sequence: 1, 2, 3 … with no gap.
    pub sequence: i64,
    /// Global, gap-free position.
    pub position: i64,
    /// The structured-mode CloudEvent JSON.
    pub body: bytes::Bytes,
}
